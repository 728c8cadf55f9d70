"""Decode the sampled frames of many items in parallel worker processes.

Yields one `DecodedItem` per input item, in completion order, with at most `window` items in
flight so that memory stays bounded however large the collection. A worker that crashes (a decoder
segfault on a hostile file) does not end the run: the items it may have held are re-decoded one at a
time, and the one that crashes alone is reported as failed.

Workers leave Ctrl-C to the parent (which stops them and says what was kept, instead of a traceback
from every worker) and end themselves when the parent dies without stopping them (kill -9, the OOM
killer): a spawned worker holds both ends of its task pipe and would otherwise wait forever. A SIGTERM
(Slurm signals every process of a job) ends a worker, but never while it writes a result to the
parent: the pool's reader would wait for the rest of a result cut short forever, and the extract, which
stops on the same SIGTERM, hung at exit.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.queues
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Iterable, Iterator

from vlpcache.errors import ItemError
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


def decode_item(item: Item, num_frames: int, max_side: int) -> DecodedItem:
    """Decode one item; bad input becomes a DecodedItem with an error, never an exception."""
    try:
        return DecodedItem(item, read_item(item, num_frames, max_side))
    except ItemError as err:
        return DecodedItem(item, None, str(err) or "unreadable")
    except MemoryError:
        return DecodedItem(item, None, "too large to decode in memory")
    except Exception as err:  # a decoder bug on a hostile file must not end the run
        return DecodedItem(item, None, f"decoder error ({type(err).__name__}: {err})")


PARENT_CHECK_SECONDS = 1.0


_RESULT_SEND = multiprocessing.queues.SimpleQueue.put.__code__  # how a worker hands a result to the pool


def _sending(frame) -> bool:
    while frame is not None:
        if frame.f_code is _RESULT_SEND:
            return True
        frame = frame.f_back
    return False


def _end_when_not_sending(signum, frame) -> None:
    """A decoding worker's SIGTERM: end as the default action would, but once the result being sent is whole."""
    if not _sending(frame):
        os._exit(128 + signum)
    main = threading.main_thread().ident

    def end_once_sent():
        while _sending(sys._current_frames().get(main)):
            time.sleep(0.005)
        os._exit(128 + signum)

    threading.Thread(target=end_once_sent, name="end-once-sent", daemon=True).start()


def _start_worker(parent_pid: int) -> None:
    """Initializer of a decoding worker: ignore Ctrl-C, end on SIGTERM between results, and exit once the
    parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _end_when_not_sending)

    def exit_when_orphaned():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, name="parent-watch", daemon=True).start()


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """Decoding worker processes, spawned (no inherited torch/onnxruntime threads or h5py handles)."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(os.getpid(),))


class FrameReader:
    def __init__(self, num_frames: int, max_side: int, workers: int, window: int | None = None):
        self.num_frames = num_frames
        self.max_side = max_side
        self.workers = workers
        self.window = window or max(4, 4 * workers)

    def __call__(self, items: Iterable[Item]) -> Iterator[DecodedItem]:
        if self.workers == 0:  # in-process decoding: simplest to debug and profile
            for item in items:
                yield decode_item(item, self.num_frames, self.max_side)
            return
        pending = deque(items)
        suspects: deque[Item] = deque()  # in flight when a worker crashed: retried alone
        while pending or suspects:
            alone = bool(suspects)
            queue = suspects if alone else pending
            try:
                yield from self._run_pool(queue, window=1 if alone else self.window)
            except _PoolCrashed as crash:
                if alone:  # it crashed with nothing else in flight: this item is the culprit
                    yield DecodedItem(crash.in_flight[0], None, "decoder crashed on this file")
                else:
                    suspects.extend(crash.in_flight)

    def _run_pool(self, queue: deque, window: int) -> Iterator[DecodedItem]:
        with worker_pool(min(self.workers, window)) as pool:
            in_flight: dict[Future, Item] = {}
            while queue or in_flight:
                while queue and len(in_flight) < window:
                    item = queue.popleft()
                    in_flight[pool.submit(decode_item, item, self.num_frames, self.max_side)] = item
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    item = in_flight.pop(future)
                    try:
                        yield future.result()
                    except BrokenProcessPool:
                        lost = [item, *in_flight.values()]
                        raise _PoolCrashed(lost) from None


_DONE = object()


class Prefetch:
    """Iterate `iterable` in a background thread, up to `depth` items ahead, from construction on.

    Decoding thus starts while the detector is still loading, and receiving and unpickling decoded
    frames overlaps with detection (onnxruntime and CUDA release the GIL), so the detector finds its
    next batch ready instead of waiting for it. Use as a context manager: leaving it stops the thread
    and closes `iterable` (a reader generator shuts its worker pool down)."""

    def __init__(self, iterable: Iterable, depth: int):
        self._buffer: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
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
        while (element := self._buffer.get()) is not _DONE:
            if isinstance(element, BaseException):
                raise element
            yield element

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _PoolCrashed(Exception):
    def __init__(self, in_flight: list[Item]):
        super().__init__(f"decoder worker crashed with {len(in_flight)} items in flight")
        self.in_flight = in_flight
