"""Errors that are the user's to fix: the CLI prints them as one line, never a traceback."""


class UserError(Exception):
    """A problem with the user's input or environment, with a message that names the fix."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM, with what was kept and how to go on: the CLI prints it as one line, exit status 130
    or 143."""


class ItemError(Exception):
    """One input item cannot be processed (corrupt, unreadable, no video stream...); the run goes on."""
