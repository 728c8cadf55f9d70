"""Prefetch: the background iteration between the decoding workers and the detector."""

import threading
import time

import pytest

from vlpcache.extract.reader import Prefetch


def wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


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
    assert closed.wait(5)
    assert not any(t.name == "vlpcache-prefetch" and t.is_alive() for t in threading.enumerate())
