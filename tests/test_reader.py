"""Prefetch: the background iteration between the decoding workers and the detector."""

import threading

import pytest

from vlpcache.extract.reader import Prefetch
from waiting import HANG_GUARD_S, wait_until


def test_prefetch_starts_consuming_before_anyone_iterates_and_yields_everything_in_order():
    taken = []

    def source():
        for i in range(10):
            taken.append(i)
            yield i

    with Prefetch(source(), depth=3) as ahead:
        assert wait_until(lambda: len(taken) >= 3)  # decoding starts while the detector still loads
        assert list(ahead) == list(range(10))


def test_an_error_in_the_source_reaches_the_consumer():
    def source():
        yield 1
        raise ValueError("decoder broke")

    with Prefetch(source(), depth=2) as ahead, pytest.raises(ValueError, match="decoder broke"):
        list(ahead)


def test_leaving_early_stops_the_thread_and_closes_the_source():
    closed = threading.Event()

    def source():
        try:
            for i in range(10**6):
                yield i
        finally:
            closed.set()

    with Prefetch(source(), depth=2) as ahead:
        assert next(iter(ahead)) == 0
    assert closed.wait(HANG_GUARD_S)
    assert not any(t.name == "vlpcache-prefetch" and t.is_alive() for t in threading.enumerate())


def test_a_decoding_worker_killed_mid_run_loses_and_duplicates_nothing(tmp_path, videos_dir):
    import multiprocessing
    import os
    import shutil
    import signal

    from vlpcache.extract.reader import FrameReader
    from vlpcache.extract.sources import discover_items

    for i in range(4):
        for name in ("bikes.mp4", "cup.mp4"):
            shutil.copy(videos_dir / name, tmp_path / f"{i}-{name}")
    items, _ = discover_items([tmp_path])
    results, killed = [], 0
    for decoded in FrameReader(num_frames=4, max_side=128, workers=1, window=3)(items):
        results.append(decoded)
        if not killed:  # a real crash: the worker process dies with items in flight
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)
                killed += 1
    assert killed >= 1
    assert sorted(r.item.id for r in results) == sorted(item.id for item in items)
    assert all(r.error is None and len(r.sampled.frames) == 4 for r in results)
