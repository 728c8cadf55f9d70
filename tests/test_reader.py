"""The decoding workers (deaths of every kind included) and Prefetch, the background iteration
between them and the detector."""

import multiprocessing
import os
import signal
import threading
from pathlib import Path

import pytest

from vlpcache.extract.reader import FrameReader, Prefetch
from vlpcache.extract.sources import Item, discover_items
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
    import shutil

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


def images(folder: Path, names: list[str]) -> list[Item]:
    """Small real pictures to decode, one per name, in the order of the names."""
    import cv2
    import numpy as np

    folder.mkdir()
    for i, name in enumerate(names):
        cv2.imwrite(str(folder / f"{name}.jpg"), np.full((48, 64, 3), 40 * i, np.uint8))
    items, problems = discover_items([folder])
    assert not problems and [item.id for item in items] == names
    return items


def drained(results) -> list:
    """All that `results` yields, read in a thread, so that a reader that hangs fails its test."""
    out, raised = [], []

    def drain():
        try:
            out.extend(results)
        except BaseException as err:
            raised.append(err)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), f"the reader still waits after {HANG_GUARD_S:.0f} s: it hangs"
    if raised:
        raise raised[0]
    return out


@pytest.mark.parametrize("death", ["SIGKILL", "SIGTERM"])
def test_a_decoding_worker_killed_halfway_through_sending_a_result_is_seen_and_its_items_decoded(tmp_path, monkeypatch,
                                                                                                 death):
    # the OOM killer, or a Slurm stop that reaches the workers, in the middle of a result: the reader of a
    # ProcessPoolExecutor waited for the rest of it forever, and the extract hung
    from decoders import DEATH_SIGNAL, DEATHS, killed_halfway_through_sending

    monkeypatch.setenv(DEATHS, str(tmp_path))
    monkeypatch.setenv(DEATH_SIGNAL, death)
    items = images(tmp_path / "pictures", ["1-first", "2-victim", "3-queued", "4-queued"])
    results = FrameReader(num_frames=1, max_side=64, workers=1, window=4, decode=killed_halfway_through_sending)(items)
    first = next(results)  # the worker goes on to the victim and sends its result, which nobody reads yet
    worker, = [p for p in multiprocessing.active_children() if p.name == "vlpcache-decode"]
    assert wait_until(lambda: worker.exitcode is not None)
    assert worker.exitcode == -signal.Signals[death]
    assert (tmp_path / "2-victim").exists()  # it died on the victim, as planned
    results = [first, *drained(results)]
    assert sorted(r.item.id for r in results) == [item.id for item in items]
    assert [r.error for r in results] == [None] * 4


def test_a_file_that_crashes_its_decoder_every_time_is_reported_and_every_other_file_decoded_once(tmp_path):
    from decoders import segfault_on_hostile

    items = images(tmp_path / "pictures", ["1", "2-hostile", "3", "4", "5", "6"])
    results = drained(FrameReader(num_frames=1, max_side=64, workers=2, window=4, decode=segfault_on_hostile)(items))
    assert sorted(r.item.id for r in results) == [item.id for item in items]
    assert {r.item.id: r.error for r in results if r.error} == {"2-hostile": "decoder crashed on this file (SIGSEGV)"}
    assert all(len(r.sampled.frames) == 1 for r in results if not r.error)


def test_an_item_whose_decoding_overruns_the_time_limit_is_stopped_and_reported_and_the_rest_decoded(tmp_path):
    # a hostile file can send a decoder into a loop: the extract waited for it for ever
    from decoders import stuck_on_stuck

    items = images(tmp_path / "pictures", ["1", "2-stuck", "3", "4", "5"])
    reader = FrameReader(num_frames=1, max_side=64, workers=2, window=4, decode=stuck_on_stuck, timeout=5)
    results = drained(reader(items))
    assert sorted(r.item.id for r in results) == [item.id for item in items]
    assert {r.item.id: r.error for r in results if r.error} == {"2-stuck": "decoder took more than 5 s on this file"}


def test_closing_the_prefetch_stops_a_reader_whose_worker_is_in_the_middle_of_an_endless_item(tmp_path):
    # Ctrl-C while a worker decodes an hour of video: the reader's thread went on waiting for that worker
    # after the command had given up on it, and replaced the workers killed under it at exit (a traceback each)
    from decoders import stuck_on_stuck

    items = images(tmp_path / "pictures", ["1-stuck", "2"])
    reader = FrameReader(num_frames=1, max_side=64, workers=1, decode=stuck_on_stuck)  # no time limit
    ahead = Prefetch(reader(items), depth=2, stop=reader.stop)
    assert wait_until(lambda: reader.pool is not None and reader.pool.in_flight)
    pool = reader.pool
    started = [worker.process for worker in pool.workers]
    ahead.close()
    assert not ahead._thread.is_alive()  # the reader ended rather than waiting on the stuck item
    assert [worker.process for worker in pool.workers] == started and not any(p.is_alive() for p in started)


def test_a_ctrl_c_while_a_decoding_worker_still_imports_neither_ends_it_nor_prints_a_traceback(tmp_path, monkeypatch,
                                                                                                   capfd):
    # a terminal's Ctrl-C reaches every process of the job: a worker still importing printed Python's
    # KeyboardInterrupt traceback under the command's own one line (and died, to be replaced)
    from decoders import SLOW_START, segfault_on_hostile

    monkeypatch.setenv(SLOW_START, str(os.getpid()))
    # workers start with Ctrl-C as in a terminal, even where these tests were started with it ignored (`&`)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    items = images(tmp_path / "pictures", ["1", "2"])
    reader = FrameReader(num_frames=1, max_side=64, workers=1, decode=segfault_on_hostile)
    try:
        ahead = Prefetch(reader(items), depth=2, stop=reader.stop)
        assert wait_until(lambda: reader.pool is not None and reader.pool.workers)
    finally:
        signal.signal(signal.SIGINT, previous)
    first = reader.pool.workers[0]
    assert not first.ready  # importing for 2 s more
    os.kill(first.process.pid, signal.SIGINT)
    with ahead:
        results = list(ahead)
    assert sorted(r.item.id for r in results) == ["1", "2"] and [r.error for r in results] == [None, None]
    first.process.join(HANG_GUARD_S)
    assert first.process.exitcode == -signal.SIGTERM  # it lived on to be ended by the pool (not by Ctrl-C: -2 or 1)
    assert "Traceback" not in capfd.readouterr().err


def test_workers_that_cannot_start_end_the_reader_with_one_clear_error(tmp_path, monkeypatch):
    # a broken install killed every worker as it started, and the pool would have replaced them for ever
    from decoders import CANNOT_START, segfault_on_hostile
    from vlpcache.errors import UserError

    monkeypatch.setenv(CANNOT_START, str(os.getpid()))
    items = images(tmp_path / "pictures", ["1", "2"])
    reader = FrameReader(num_frames=1, max_side=64, workers=1, decode=segfault_on_hostile)
    with pytest.raises(UserError, match=r"decoding workers die before they are ready \(exit status 1\), 3 in a row"):
        drained(reader(items))


@pytest.mark.parametrize("limit", [1e12, float("inf")])
def test_a_time_limit_beyond_what_a_wait_can_take_is_waited_for_in_steps(tmp_path, limit):
    # poll() takes no timeout this large: the reader failed with OverflowError before decoding anything
    items = images(tmp_path / "pictures", ["1", "2", "3"])
    results = drained(FrameReader(num_frames=1, max_side=64, workers=1, timeout=limit)(items))
    assert sorted(r.item.id for r in results) == ["1", "2", "3"] and not any(r.error for r in results)
