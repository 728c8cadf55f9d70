"""A Ctrl-C that is never lost.

Python runs the SIGINT handler in the main thread, between two bytecodes of whatever runs there. When
that is a weakref callback or a `__del__` (CI caught one in a WeakValueDictionary's callback), the
interpreter prints its KeyboardInterrupt as "Exception ignored" and drops it: a long extract asked to
stop then ran to its end and exited with status 0.

The CLI runs every command inside `ctrl_c_remembered()`: the handler records the request as well as
raising it, the long loops (an extract's items, a pretraining's steps, video and caption encoding)
call `stop_if_interrupted()` once per item, step or batch and raise it again, and a dropped one prints
nothing, since it is raised again at the next check.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Iterator

_requested = False


def _remember_and_raise(signum, frame) -> None:
    global _requested
    _requested = True
    raise KeyboardInterrupt


def _quiet_about_dropped_ctrl_c(previous):
    def hook(unraisable) -> None:
        if _requested and issubclass(unraisable.exc_type, KeyboardInterrupt):
            return  # raised again at the next stop_if_interrupted()
        previous(unraisable)

    return hook


@contextlib.contextmanager
def ctrl_c_remembered() -> Iterator[None]:
    """Within: Ctrl-C raises KeyboardInterrupt and stays requested. A SIGINT that is ignored (a job
    started in the background with `&` or `nohup`) stays ignored, and another program's handler is
    left alone."""
    global _requested
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    previous_hook = sys.unraisablehook
    signal.signal(signal.SIGINT, _remember_and_raise)
    sys.unraisablehook = _quiet_about_dropped_ctrl_c(previous_hook)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous_hook
        _requested = False


def stop_if_interrupted() -> None:
    """Raise KeyboardInterrupt when Ctrl-C was pressed, even if where it landed dropped it."""
    if _requested:
        raise KeyboardInterrupt
