"""Stand-ins for `decode_item` that the tests' decoding workers run: each decodes for real and, on the
items named for it, dies the way workers really die. Spawned workers import this module by name (the
tests folder is on the path they inherit)."""

from __future__ import annotations

import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path

from vlpcache.extract.reader import DecodedItem, decode_item
from vlpcache.extract.sources import Item

DEATHS = "VLPCACHE_TEST_DEATHS"  # a folder that remembers the deaths already died, across workers
DEATH_SIGNAL = "VLPCACHE_TEST_DEATH_SIGNAL"  # how killed_halfway_through_sending dies: SIGKILL, SIGTERM
BALLAST = 20_000_000  # bytes of a result far larger than a pipe holds: sending it waits for the reader
CANNOT_START = "VLPCACHE_TEST_WORKERS_CANNOT_START"  # a pid: any other process that imports this module dies of it

SLOW_START = "VLPCACHE_TEST_WORKERS_START_SLOWLY"  # a pid: any other process that imports this module takes 2 s more
if os.environ.get(SLOW_START, str(os.getpid())) != str(os.getpid()):
    time.sleep(2.0)  # as a worker importing torch and PyAV from a cold disk
if os.environ.get(CANNOT_START, str(os.getpid())) != str(os.getpid()):
    raise ImportError("a decoding library that does not load in the workers (a broken install)")


def segfault_on_hostile(item: Item, num_frames: int, max_side: int) -> DecodedItem:
    """A decoder that crashes on every file named 'hostile', as a decoder bug does."""
    if "hostile" in item.id:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file left behind
        os.kill(os.getpid(), signal.SIGSEGV)
    return decode_item(item, num_frames, max_side)


def stuck_on_stuck(item: Item, num_frames: int, max_side: int) -> DecodedItem:
    """A decoder that never returns on files named 'stuck', as one sent into a loop by a hostile file."""
    while "stuck" in item.id:
        time.sleep(1)
    return decode_item(item, num_frames, max_side)


def _first_death(item: Item) -> bool:
    mark = Path(os.environ[DEATHS]) / item.id
    if mark.exists():
        return False
    mark.touch()
    return True


def _sending(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "_send" and frame.f_code.co_filename.endswith("connection.py"):
            return True
        frame = frame.f_back
    return False


def killed_halfway_through_sending(item: Item, num_frames: int, max_side: int) -> DecodedItem:
    """The first time it meets a file named 'victim', its process is killed with $VLPCACHE_TEST_DEATH_SIGNAL
    while it sends a large result, with part of it written; every other time it decodes as usual."""
    if "victim" not in item.id or not _first_death(item):
        return decode_item(item, num_frames, max_side)
    signum = signal.Signals[os.environ[DEATH_SIGNAL]]
    main = threading.main_thread().ident

    def kill_once_sending():
        while not _sending(sys._current_frames().get(main)):
            time.sleep(0.001)
        time.sleep(0.05)  # the pipe is full long before: nobody reads until the test does
        os.kill(os.getpid(), signum)

    threading.Thread(target=kill_once_sending, daemon=True).start()
    return DecodedItem(item, None, "x" * BALLAST)


def signal_dispositions(item: Item, num_frames: int, max_side: int) -> DecodedItem:
    """No decoding: the worker's own SIGINT and SIGTERM dispositions, reported as the error."""
    return DecodedItem(item, None, f"{signal.getsignal(signal.SIGINT)!r} {signal.getsignal(signal.SIGTERM)!r}")
