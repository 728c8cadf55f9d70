"""Errors that are the user's to fix: the CLI prints them as one line, never a traceback."""


class UserError(Exception):
    """A problem with the user's input or environment, with a message that names the fix."""


class NotComparable(UserError):
    """A file the cache does not hold cannot be extracted here as the cache's items were (another detector's
    weights, none found): `search --like FILE` says how to add it to the cache instead."""


class WriteFailed(UserError):
    """A write the system refused (a full disk, a read-only folder, an I/O error); `reason` is the system's
    words, e.g. "No space left on device (ENOSPC)", and `full` whether it was for want of room."""

    def __init__(self, message: str, reason: str = "", full: bool = False):
        super().__init__(message)
        self.reason, self.full = reason, full


class GraphTooNew(UserError):
    """An ONNX file the installed onnxruntime cannot load for its IR version or opset alone: not damaged, a newer
    onnxruntime reads it (onnx_versions.graph_too_new). `why` is the line less the file it names, for a line that
    names the file already."""

    def __init__(self, message: str, why: str = ""):
        super().__init__(message)
        self.why = why or message


class Interrupted(Exception):
    """Ctrl-C or SIGTERM, with what was kept and how to go on: the CLI prints it as one line, exit status 130
    or 143."""


class ItemError(Exception):
    """One input item cannot be processed (corrupt, unreadable, no video stream...); the run goes on."""


class DecodingTooLong(ItemError):
    """An item's decoding went past the time it was given (a thumbnail's, decoded in the server's own process)."""


def user_message(err: UserError) -> str:
    """A UserError's line; one raised in a DataLoader worker comes back from torch as the same type whose
    message is "Caught ... Original Traceback ..." ending in the original line, which is taken."""
    message = str(err)
    if "\nOriginal Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        message = last.split(": ", 1)[1] if last.startswith(f"{type(err).__module__}.{type(err).__name__}: ") else last
    return message
