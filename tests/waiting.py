"""Waiting in tests without deadlines that a slow machine could miss.

A test waits for what it watches (a file, a process ending) or for the process it watches to die,
never for a number of seconds. HANG_GUARD_S bounds every wait and subprocess only against a hung
program: it is far beyond what any correct command takes here, even on a machine many times slower
(the whole suite runs in under 10 minutes), so it can fail only a program that hangs.
"""

from __future__ import annotations

import subprocess
import time
from typing import Callable, TypeVar

HANG_GUARD_S = 1800.0

T = TypeVar("T")


def wait_until(condition: Callable[[], T], alive: subprocess.Popen | None = None, poll_s: float = 0.02,
               guard_s: float = HANG_GUARD_S) -> T | None:
    """condition()'s first true value; None as soon as `alive` (the process that should make it true)
    has ended without making it true. Raises AssertionError only after `guard_s`: HANG_GUARD_S, or
    less where the wait is for one process to act on a signal, and what failing looks like is
    waiting for ever."""
    started = time.monotonic()
    while not (value := condition()):
        if alive is not None and alive.poll() is not None:
            return condition() or None
        if time.monotonic() - started > guard_s:
            raise AssertionError(f"still waiting after {guard_s:.0f} s: the program hangs")
        time.sleep(poll_s)
    return value
