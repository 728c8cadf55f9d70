"""Lines for the person at the terminal: notes, warnings and summaries go to stderr (results, which a
script may read, go to stdout), written around any progress bar on screen.

Library code reports through `say`, or through the `say` argument its caller chose (`sayer(quiet)`),
never by printing, so a command's --quiet silences all of it.

Names that come from the user's files (item ids, paths) go through `printable` in every line meant for
a person: a file name may hold a newline or a terminal escape. Output for machines (--json) keeps
them as they are.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import math
import os
import re
import sys
import threading
import time
from typing import Callable, Iterator

Say = Callable[[str], None]

UNSIZED_TERMINAL = {"ncols": 100, "nrows": 24}  # a bar's columns and lines on a terminal that reports 0 x 0


def say(line: str) -> None:
    """One line on stderr; a tqdm bar on screen is cleared first and redrawn below it."""
    if "tqdm" in sys.modules:  # a bar can only be on screen if tqdm was imported
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
        sys.stderr.flush()
    else:
        print(line, file=sys.stderr, flush=True)


SLOW_STEP_S = 3.0  # a step without a bar of its own that runs longer than this says what it is doing


@contextlib.contextmanager
def said_if_slow(line: str, say: Say = say, after: float | None = None) -> Iterator[None]:
    """`line` said once the block has run SLOW_STEP_S seconds (`after`), and nothing if it ends sooner:
    a step that is instant on most collections and takes minutes on some (a million files listed from
    a cold disk) is not silent then, and adds no line to every run."""
    timer = threading.Timer(SLOW_STEP_S if after is None else after, say, [line])
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def close_bars() -> None:
    """Close the tqdm bars still on screen (each ends its line), so that a last line of the command
    (an error, `interrupted; ...`) starts on a line of its own rather than after a bar."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()


LOGGED_BAR_S = 30.0  # a bar written to a file or pipe (a Slurm .out file) writes a line this often at most


class BarLog:
    """Where a bar goes when stderr is not a terminal (a Slurm job's .out file, a pipe, `> log 2>&1`):
    tqdm redraws in place with a carriage return ten times a second, which a log keeps as one line
    growing by up to 50 KB a minute, unreadable in `less`. Here each redraw is a line of its own, the
    first one (of a bar that stays: `leave`), then at most one every LOGGED_BAR_S seconds, and the
    last state of a bar that stays when it ends."""

    def __init__(self, stream, leave: bool = True):
        self.stream, self.pending = stream, ""
        self.written_at = None if leave else time.monotonic()  # a passing bar's lines only if it lasts

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", None)

    def write(self, text: str) -> None:
        for part in re.split(r"[\r\n]", text):
            if part.strip():  # blank: tqdm clearing its line, which a log need not do
                self.pending = part.rstrip()
        now = time.monotonic()
        ending = text == "\n"  # tqdm's close of a bar that stays (bars here are all at position 0)
        if self.pending and (ending or self.written_at is None or now - self.written_at >= LOGGED_BAR_S):
            self.stream.write(self.pending + "\n")
            self.stream.flush()
            self.pending, self.written_at = "", now

    def flush(self) -> None:
        pass


def bars_locked_in_this_process() -> None:
    """tqdm's bars share a lock between threads only. Its default also makes a multiprocessing lock: a named
    semaphore, which, made under the spawn or forkserver start method (Python 3.14's default on Linux), the
    resource tracker counts as leaked and says so on stderr after a command that ends by os._exit (extract);
    vlpcache's worker processes draw no bars."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def progress_bar(iterable=None, **options):
    """A tqdm bar on stderr that follows the terminal's size. A terminal that reports 0 x 0 (a
    pseudo-terminal nobody sized: `script` run from cron, some container sessions) gets
    UNSIZED_TERMINAL: tqdm takes the 0 lines at their word and draws nothing at all. Not on a
    terminal, the bar writes lines to a log (BarLog)."""
    from tqdm import tqdm

    if not sys.stderr.isatty():
        # position 0: a second bar open at once would move the cursor between lines, which a log cannot
        log = BarLog(sys.stderr, leave=options.get("leave", True) is not False)
        return tqdm(iterable, file=log, position=0, **options)
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # stderr without a descriptor
        size = None
    unsized = size is not None and (size.columns == 0 or size.lines == 0)
    return tqdm(iterable, **(UNSIZED_TERMINAL if unsized else {"dynamic_ncols": True}), **options)


def json_escapes(error: UnicodeEncodeError) -> tuple[str, int]:
    """What an ASCII or Latin-1 stream cannot encode, as JSON writes it (`\\u00e9`, two for an emoji): one
    escape in a line for a person, and still valid JSON in --json's strings, where `\\xe9` would not be."""
    units = error.object[error.start:error.end].encode("utf-16-be", "surrogatepass")
    return "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2)), error.end


codecs.register_error("vlpcache-json-escapes", json_escapes)


def escape_what_stdout_cannot_encode() -> None:
    """A stdout in ASCII or Latin-1 (PYTHONIOENCODING=ascii; LC_ALL=C with PYTHONUTF8=0) writes the
    characters of a query, an id or a path it cannot encode as escapes (json_escapes), as Python's
    stderr does with its own, instead of a UnicodeEncodeError once the work is done."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="vlpcache-json-escapes")


def silent(line: str) -> None:
    """A `say` that drops the line (--quiet)."""


def sayer(quiet: bool = False) -> Say:
    """`say`, or `silent` when the command runs --quiet."""
    return silent if quiet else say


def printable(text: str) -> str:
    """`text` for one line on a terminal: control and other invisible characters (newline, escape,
    bidirectional overrides) written as Python escapes (`\\n`, `\\x1b`, `\\u202e`), and the bytes of a file name
    that is not UTF-8 (lone surrogates, as Python decodes them) as the bytes they are (`\\xff`)."""
    return "".join(c if c.isprintable() else
                   f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else
                   c.encode("unicode_escape").decode("ascii") for c in str(text))


def items_word(kinds) -> str:
    """What a person calls a collection's items in a line: videos (frame folders are a video's frames),
    photos, or items where they are both."""
    kinds = set(kinds)
    return "photos" if kinds == {"image"} else "videos" if kinds <= {"video", "frames"} else "items"


def date_text(seconds: float) -> str:
    """A moment (seconds since the Unix epoch) as a person reads it in a line, local time: "2026-12-06 14:25"."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def place_text(kind: str, time: float | None) -> str:
    """Where an item's frame sits, for a person: its time in a video (clock_text), the place of a frames
    folder's image in name order (1 for the first: its stored time counts from 0), and nothing for a photo
    (its one frame)."""
    if time is None or kind == "image":
        return ""
    return f"image {int(time) + 1}" if kind == "frames" else clock_text(time)


def hundredths_down(seconds: float) -> int:
    """A frame's time in whole hundredths of a second, rounded down, so that `ffmpeg -ss` of it lands on that
    frame and not the next (a frame at 1/6 s is 0.16: at 0.17 the next one shows); the slack keeps a time
    stored as a float32 a hair under its hundredth (0.29999998 for 0.3) from reading as the one before."""
    return math.floor(seconds * 100 * (1 + 2e-7) + 1e-3)


def frame_time(seconds: float) -> float:
    """A frame's time as `--json` and the page's API give it: hundredths_down's, in seconds."""
    return hundredths_down(seconds) / 100


def clock_text(seconds: float) -> str:
    """A time in a video: `12.40 s` under a minute, else minutes and seconds, `41:15.64` (`1:02:03.50` past
    an hour), as a player shows it and `ffmpeg -ss` takes it (rounded down: hundredths_down); `2475.64 s` made
    a person do the division."""
    hundredths = hundredths_down(seconds)
    if hundredths < 6000:
        return f"{hundredths / 100:.2f} s"
    minutes, hundredths = divmod(hundredths, 6000)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours}:{minutes:02d}:" if hours else f"{minutes}:") + f"{hundredths / 100:05.2f}"


def human_duration(seconds: float) -> str:
    """Seconds as a person reads them: 6 s, 37.4 min, 2.3 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def human_size(n: float) -> str:
    """Bytes as a person reads them: 812 B, 3.4 MiB, 31.0 GiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
