"""Decode the sampled frames of many items in parallel worker processes.

Yields one `DecodedItem` per input item, in completion order, with at most `window` items in
flight so that memory stays bounded however large the collection. Each worker has its own pipe, so a
worker that dies, however and wherever (a decoder segfault on a hostile file; SIGKILL, the OOM killer
or SIGTERM, even halfway through sending a result), is seen at once and the pool knows which item it
was decoding: that item is decoded again, alone, and reported as failed if it kills its worker again;
the items queued behind it go back to the queue. Nothing hangs and nothing is lost or duplicated. An
item whose decoding overruns the time limit (a hostile file can send a decoder into a loop) has its
worker killed and is reported as failed.

Workers leave Ctrl-C to the parent (which stops them and says what was kept, instead of a traceback
from every worker) and end themselves when the parent dies without stopping them (kill -9 of the
extract alone), also in the middle of decoding a long video.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import multiprocessing
import multiprocessing.connection
import multiprocessing.resource_tracker as resource_tracker
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable, Iterable, Iterator

from vlpcache.extract.stamps import source_stamp
from vlpcache.errors import ItemError, UserError
from vlpcache.interrupts import ctrl_c_held, let_ctrl_c_through
from vlpcache.extract.options import DECODE_TIMEOUT_S
from vlpcache.extract.sampling import SampledFrames, read_item
from vlpcache.extract.sources import Item


DECODED_BYTES_AHEAD = 256 * 2**20  # decoded frames held ready for the detector, per detector


def decoded_items_within_budget(max_side: int, num_frames: int) -> int:
    """How many decoded items (at most `num_frames` RGB frames of `max_side`) fit DECODED_BYTES_AHEAD,
    at least 8: how far the local engine decodes ahead, how many items a Ray actor takes at once."""
    return max(8, DECODED_BYTES_AHEAD // (3 * max_side**2 * num_frames))


@dataclass
class DecodedItem:
    item: Item
    sampled: SampledFrames | None  # None when decoding failed
    error: str | None = None
    source: str = ""  # the source's stamp (extract.stamps), taken before it was read


def decode_item(item: Item, num_frames: int, max_side: int) -> DecodedItem:
    """Decode one item; bad input becomes a DecodedItem with an error, never an exception."""
    stamp = source_stamp(item.path)  # before reading: a file that changes meanwhile is redone next time
    try:
        return DecodedItem(item, read_item(item, num_frames, max_side), source=stamp)
    except ItemError as err:
        return DecodedItem(item, None, str(err) or "unreadable", source=stamp)
    except MemoryError:
        return DecodedItem(item, None, "too large to decode in memory", source=stamp)
    except Exception as err:  # a decoder bug on a hostile file must not end the run
        return DecodedItem(item, None, f"decoder error ({type(err).__name__}: {err})", source=stamp)


PARENT_CHECK_SECONDS = 1.0
STOP_WAIT_SECONDS = 5.0  # how long a worker that is dying may take to exit before it is killed
WAKE_AT_LEAST_S = 3600.0  # a time limit further away is waited for in steps (poll() takes no larger timeout)
FAILED_STARTS = 3  # workers that die before they are ready (not killed), in a row, before the reader gives up
_READY = "ready"  # a worker's first message: its imports are done
Decode = Callable[[Item, int, int], DecodedItem]  # decode_item, or a stand-in that tests crash on purpose


def _start_worker(parent_pid: int) -> None:
    """A decoding worker's signals: ignore Ctrl-C, die of SIGTERM (or SIGHUP), and exit once the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    let_ctrl_c_through()  # blocked from its start (ctrl_c_held): one that came while it imported is dropped
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def exit_when_orphaned():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, name="parent-watch", daemon=True).start()


def _decode_items(conn: Connection, parent_pid: int, decode: Decode, num_frames: int, max_side: int) -> None:
    """A decoding worker's life: say it is ready (its imports are done), then take items from its own
    pipe and send each result back on it, in order, until the pool closes its end."""
    _start_worker(parent_pid)
    try:
        conn.send(_READY)
        while True:
            conn.send(decode(conn.recv(), num_frames, max_side))
    except (EOFError, BrokenPipeError, ConnectionResetError):  # the pool is done with this worker
        pass


def how_it_ended(exitcode: int | None) -> str:
    """A worker's exit code in words: 'SIGSEGV', 'exit status 1'."""
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-exitcode).name
    return f"exit status {exitcode}"


class _Worker:
    """One decoding process and its own pipe.

    Nothing else holds the other end of the pipe, so when the process dies, however and wherever
    (SIGKILL halfway through sending a result), reading our end ends at once in EOF instead of waiting
    for the rest of the result forever, and the items it held are exactly those sent and not answered:
    the first is the one it was decoding, once it has said it is ready. (A shared result pipe, as in a
    ProcessPoolExecutor, is also held open by the other workers, and its lock dies locked with a worker
    killed while sending: both hung the extract.)"""

    def __init__(self, context, decode: Decode, num_frames: int, max_side: int):
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=_decode_items, name="vlpcache-decode", daemon=True,
                                       args=(theirs, os.getpid(), decode, num_frames, max_side))
        resource_tracker.ensure_running()  # before: starting it unblocks Ctrl-C (its own mask, bpo-33613)
        with ctrl_c_held():
            self.process.start()
        theirs.close()
        self.items: deque[Item] = deque()  # sent and not yet answered, the one being decoded first
        self.ready = False
        self.since = 0.0  # when the first of `items` became the one it decodes (at the latest), once ready

    def send(self, item: Item) -> bool:
        try:
            self.conn.send(item)
        except (BrokenPipeError, ConnectionResetError):  # it died: reading its end says how
            return False
        if not self.items:
            self.since = time.monotonic()
        self.items.append(item)
        return True

    def receive(self) -> DecodedItem | None:
        """Its next result, or None for its ready message; EOFError or OSError once it has died."""
        message = self.conn.recv()  # OSError: "got end of file during message"
        self.since = time.monotonic()
        if message == _READY:
            self.ready = True
            return None
        self.items.popleft()
        return message

    def end(self, kill: bool = False) -> str:
        """Make sure the process is gone (a worker holds nothing worth waiting for); how it ended."""
        self.conn.close()
        if kill:
            self.process.kill()
        self.process.join(STOP_WAIT_SECONDS)  # it died: the pipe closes before the process is reaped
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
        return how_it_ended(self.process.exitcode)


@dataclass
class _Died:
    item: Item | None  # the item it was decoding (or sending); None if it died before it was ready
    not_begun: list[Item]
    why: str  # "decoder crashed on this file (SIGSEGV)"
    again: bool  # worth decoding again, alone (a crash); not after a decoder overran the time limit


def _is_main_test(test: ast.expr) -> bool:
    return ast.unparse(test).replace("'", '"') in ('__name__ == "__main__"', '"__main__" == __name__')


def unguarded_script_line() -> str | None:
    """Where the script Python runs (its __main__ file) is running vlpcache from top-level code outside
    `if __name__ == "__main__":` ("script.py:12"). A spawned worker imports that script as it starts, so it would
    run that code again and die. None where it is not: a notebook, `python -c`, the vlpcache command, a guarded
    call, a script whose source cannot be read."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    frame = sys._current_frames().get(threading.main_thread().ident)  # (a Prefetch thread's reader asks too)
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_globals is vars(main)):
        frame = frame.f_back
    if path is None or frame is None:
        return None
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return None
    guards = [node for node in ast.walk(tree) if isinstance(node, ast.If) and _is_main_test(node.test)]
    if any(guard.lineno <= frame.f_lineno <= guard.end_lineno for guard in guards):
        return None
    return f"{path}:{frame.f_lineno}"


class _WorkerPool:
    """Decoding workers, each fed through its own pipe; one that dies is replaced by a new one."""

    def __init__(self, size: int, decode: Decode, num_frames: int, max_side: int, timeout: float | None,
                 stopping: threading.Event):
        if (line := unguarded_script_line()) is not None:  # each worker would fail to start, after ~30 s of tries
            raise UserError(f"{line}: starts vlpcache's decoding worker processes from the script's top-level code, "
                            "which each of them runs again as it starts (they are spawned): put that code under "
                            "`if __name__ == \"__main__\":`, or decode in this process (--workers 0)")
        self._start = functools.partial(_Worker, multiprocessing.get_context("spawn"), decode, num_frames, max_side)
        self.workers = [self._start() for _ in range(size)]
        self.timeout = timeout  # seconds one item may take, None: no limit
        self.failed_starts = 0
        self.stopping = stopping  # set by FrameReader.stop: workers that end are not replaced

    def stop(self) -> None:
        """End the workers from another thread: wait() then returns, replacing none of them."""
        for worker in self.workers:
            worker.process.terminate()

    @property
    def in_flight(self) -> int:
        return sum(len(worker.items) for worker in self.workers)

    def submit(self, item: Item) -> bool:
        """Send `item` to the least busy worker; False if that worker has died (wait() replaces it)."""
        return min(self.workers, key=lambda worker: len(worker.items)).send(item)

    def wait(self) -> list[DecodedItem | _Died]:
        """Block until a worker answers, dies, or overruns the time limit on an item: the results
        received, and a _Died for each worker that died (or was stopped) holding items. Call it only
        with items in flight or after a failed submit()."""
        outcomes: list[DecodedItem | _Died] = []
        ready = multiprocessing.connection.wait([worker.conn for worker in self.workers], self._time_left())
        if self.stopping.is_set():
            return outcomes
        for index, worker in enumerate(self.workers):
            if worker.conn in ready:
                try:
                    if (result := worker.receive()) is not None:
                        outcomes.append(result)
                    else:
                        self.failed_starts = 0
                    continue
                except (EOFError, OSError):
                    how = worker.end()
                    why, again = f"decoder crashed on this file ({how})", True
            elif worker.items and self._time_left(worker) == 0:  # an answer waiting in its pipe is never late
                how = worker.end(kill=True)
                why, again = f"decoder took more than {self.timeout:g} s on this file", False
            else:
                continue
            if not worker.ready and how not in ("SIGKILL", "SIGTERM"):  # not killed by someone: it cannot start
                self.failed_starts += 1
                if self.failed_starts >= FAILED_STARTS:
                    raise UserError(f"decoding workers die before they are ready ({how}), {FAILED_STARTS} in a row: "
                                    "see their error above; --workers 0 decodes in this process")
            self.workers[index] = self._start()
            if not worker.ready:
                outcomes.append(_Died(None, list(worker.items), why, again))
            elif worker.items:
                outcomes.append(_Died(worker.items[0], list(worker.items)[1:], why, again))
        return outcomes

    def _time_left(self, worker: _Worker | None = None) -> float | None:
        """Seconds until `worker`, or the first busy worker, overruns the limit; None: no limit, or none busy."""
        busy = [w for w in ([worker] if worker else self.workers) if w.items and w.ready]
        if self.timeout is None or not busy:
            return None
        return min(WAKE_AT_LEAST_S, max(0.0, min(w.since for w in busy) + self.timeout - time.monotonic()))

    def __enter__(self) -> "_WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        for worker in self.workers:  # nothing in a worker is worth waiting for: stop them all at once
            worker.conn.close()
            worker.process.terminate()
        for worker in self.workers:
            worker.end()


class FrameReader:
    def __init__(self, num_frames: int, max_side: int, workers: int, window: int | None = None,
                 decode: Decode = decode_item, timeout: float | None = DECODE_TIMEOUT_S):
        self.num_frames = num_frames
        self.max_side = max_side
        self.workers = workers
        self.window = window or max(4, 4 * workers)
        self.decode = decode
        self.timeout = timeout  # seconds a worker may take on one item (None: no limit; in-process: none)
        self.stopping = threading.Event()
        self.pool: _WorkerPool | None = None

    def stop(self) -> None:
        """From another thread (Ctrl-C in the command's): the reader ends at once, its workers stopped even
        in the middle of an hour of video, rather than the reader finishing that item first, and replacing
        the workers it found dead while the interpreter shut down (a traceback from each)."""
        self.stopping.set()
        if (pool := self.pool) is not None:
            pool.stop()

    def __call__(self, items: Iterable[Item]) -> Iterator[DecodedItem]:
        if self.workers == 0:  # in-process decoding: simplest to debug and profile
            for item in items:
                yield self.decode(item, self.num_frames, self.max_side)
            return
        todo = _Todo(items)
        with _WorkerPool(min(self.workers, self.window), self.decode, self.num_frames, self.max_side,
                         self.timeout, self.stopping) as pool:
            self.pool = pool
            if self.stopping.is_set():  # stopped while the pool started
                pool.stop()
            while (todo or pool.in_flight) and not self.stopping.is_set():
                todo.fill(pool, self.window)
                for outcome in pool.wait():
                    if isinstance(outcome, DecodedItem):
                        todo.answered(outcome)
                        yield outcome
                    elif failed := todo.died(outcome):
                        yield failed


class _Todo:
    """The items still to send to the workers: new ones in order, except that one whose worker died
    decoding it (a suspect) is decoded again with nothing else in flight, so that only it can be to
    blame if its worker dies again."""

    def __init__(self, items: Iterable[Item]):
        self.pending = deque(items)
        self.suspects: deque[Item] = deque()
        self.alone: Item | None = None  # the suspect being decoded again

    def __bool__(self) -> bool:
        return bool(self.pending or self.suspects)

    def fill(self, pool: _WorkerPool, window: int) -> None:
        if self.suspects and not pool.in_flight:
            self.alone = self.suspects.popleft()
            if not pool.submit(self.alone):
                self.suspects.appendleft(self.alone)
                self.alone = None
        while self.pending and not self.suspects and self.alone is None and pool.in_flight < window:
            if not pool.submit(item := self.pending.popleft()):
                self.pending.appendleft(item)
                return

    def answered(self, result: DecodedItem) -> None:
        if self.alone is not None and result.item.id == self.alone.id:  # a copy, back from the worker
            self.alone = None

    def died(self, death: _Died) -> DecodedItem | None:
        """Take back what a dead worker held; the failure to report if the item it decoded is to blame."""
        for item in reversed(death.not_begun):
            if item is self.alone:  # its worker died as it started
                self.suspects.appendleft(item)
                self.alone = None
            else:
                self.pending.appendleft(item)
        if death.item is None:  # it died as it started: no item did that
            return None
        if death.item is self.alone:  # alone, it died again: this file did it
            self.alone = None
            return DecodedItem(death.item, None, death.why)
        if not death.again:  # it overran the time limit: decoding it again would only wait as long
            return DecodedItem(death.item, None, death.why)
        self.suspects.append(death.item)
        return None


_DONE = object()
# what a Prefetch given `idle_after` yields where its source has given nothing for that long (a decode stalled on
# a hostile file, up to --decode-timeout): the detector runs the frames it holds, the writer commits what is due
IDLE = object()
IDLE_AFTER_S = 10.0


class Prefetch:
    """Iterate `iterable` in a background thread, up to `depth` items ahead, from construction on.

    Decoding thus starts while the detector is still loading, and receiving and unpickling decoded
    frames overlaps with detection (onnxruntime and CUDA release the GIL), so the detector finds its
    next batch ready instead of waiting for it. Use as a context manager: leaving it stops the thread
    and closes `iterable` (a reader generator shuts its worker pool down)."""

    def __init__(self, iterable: Iterable, depth: int, stop: Callable[[], None] = lambda: None,
                 idle_after: float | None = None):
        self.idle_after = idle_after  # seconds without an element after which IDLE is yielded (None: never)
        self._buffer: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._stop_source = stop  # ends `iterable` where it blocks (a FrameReader waiting on its workers)
        self._thread = threading.Thread(target=self._fill, args=(iterable,), name="vlpcache-prefetch", daemon=True)
        self._thread.start()

    def _put(self, element) -> bool:
        while not self._stop.is_set():
            try:
                self._buffer.put(element, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, iterable: Iterable) -> None:
        try:
            for element in iterable:
                if not self._put(element):
                    return
            self._put(_DONE)
        except BaseException as err:  # re-raised in the consumer's thread
            self._put(err)
        finally:
            getattr(iterable, "close", lambda: None)()

    def __iter__(self) -> Iterator:
        while True:
            try:
                element = self._buffer.get(timeout=self.idle_after)
            except queue.Empty:
                yield IDLE
                continue
            if element is _DONE:
                return
            if isinstance(element, BaseException):
                raise element
            yield element

    def close(self) -> None:
        self._stop.set()
        self._stop_source()
        self._thread.join(timeout=5)

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
