"""Ctrl-C, SIGTERM and SIGHUP: stop at the next safe point, keep what was committed, never lose the request.

Python runs a signal handler in the main thread, between two bytecodes of whatever runs there. When
that is a weakref callback or a `__del__` (CI caught one in a WeakValueDictionary's callback), the
interpreter prints its KeyboardInterrupt as "Exception ignored" and drops it: a long extract asked to
stop then ran to its end and exited with status 0.

The CLI runs every command inside `stops_remembered()`: the handler records the request as well as
raising KeyboardInterrupt, the long loops (an extract's items, a pretraining's steps, video and caption
encoding) call `stop_if_interrupted()` once per item, step or batch and raise it again, and a dropped
one prints nothing, since it is raised again at the next check.

SIGTERM (a Slurm time limit, `kill`, a container being stopped) takes the same path as Ctrl-C, so an
extract commits the shard in progress instead of losing it; the command then exits with 143 instead of
130, and its last line says what stopped it. So does SIGHUP (the terminal or ssh connection closed), with
129, unless the command was started under `nohup`.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from typing import Iterator

# SIGHUP: the terminal or ssh connection a command runs in went away (`nohup` ignores it: then it stays ignored)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_requested: int | None = None  # the first signal that asked this command to stop
_held: set[int] = set()  # the signals whose handler is ours, within stops_remembered()
_deferred = False  # within stops_deferred(): a stop is remembered, and raised at the next stop_if_interrupted()
_raised_at = -math.inf  # when a stop was last raised as KeyboardInterrupt (time.monotonic)
# more stop signals within this long of the last one raised are the same request (Ctrl-C pressed twice or
# held, a job's every process signalled): raised again, they broke the stopping itself (a lock's release in
# threading, ray.shutdown, the interpreter's teardown: tracebacks, exit -2); after it, a stop that hangs
# can still be interrupted
REPEAT_SECONDS = 1.0


def _remember_and_raise(signum, frame) -> None:
    global _requested, _raised_at
    if _requested is None:
        _requested = signum
    elif time.monotonic() - _raised_at < REPEAT_SECONDS:
        return
    if not _deferred:
        _raised_at = time.monotonic()
        raise KeyboardInterrupt


def _quiet_about_dropped_stop(previous):
    def hook(unraisable) -> None:
        if _requested is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            return  # raised again at the next stop_if_interrupted()
        previous(unraisable)

    return hook


def _ours_to_take(signum: int) -> bool:
    """Only the default disposition is replaced: a SIGINT ignored at start (a job started in the background
    with `&` or `nohup`) stays ignored, and another program's handler is left alone."""
    default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
    return signal.getsignal(signum) is default


def _exit_at_once(signum, frame) -> None:
    os._exit(128 + signum)  # nothing begun, nothing printed yet: nothing to keep or flush


@contextlib.contextmanager
def quiet_while_importing() -> Iterator[None]:
    """Within (the command table importing click and every stage's options, the first 0.1-0.2 s): a Ctrl-C
    exits at once with 130 and no word, where Python printed its KeyboardInterrupt traceback."""
    taken = signal.signal(signal.SIGINT, _exit_at_once) if _ours_to_take(signal.SIGINT) else None
    try:
        yield
    finally:
        if taken is not None:
            signal.signal(signal.SIGINT, taken)


@contextlib.contextmanager
def _blocked(signums: set[int]) -> Iterator[None]:
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)  # one that came meanwhile is handled now


def ctrl_c_held():
    """Within, in this thread: a Ctrl-C waits (is blocked). A process started within inherits the block
    through fork and exec, so a decoding worker that ignores Ctrl-C once it runs cannot be stopped with
    a KeyboardInterrupt traceback while Python is still importing it (the terminal sends Ctrl-C to every
    process of the job); the worker lets it through once ignored (`let_ctrl_c_through`)."""
    return _blocked({signal.SIGINT})


def stop_signals_held():
    """Within, in this thread: Ctrl-C, SIGTERM and SIGHUP wait (are blocked), as in ctrl_c_held(). Around the
    start of a loader's workers: a job's SIGTERM that came before a worker's `worker_init_fn` set its handling
    killed it (torch's own handler re-raises one its parent did not send), and the stopping training process
    failed on the lost worker; the worker lets them through once it handles them (leave_stops_to_the_parent)."""
    return _blocked(set(STOP_SIGNALS))


def let_ctrl_c_through() -> None:
    """In a process started within ctrl_c_held(), once it handles or ignores Ctrl-C."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def stops_remembered() -> Iterator[None]:
    """Within: Ctrl-C and SIGTERM raise KeyboardInterrupt and stay requested."""
    global _requested, _raised_at
    taken = {signum: signal.signal(signum, _remember_and_raise) for signum in STOP_SIGNALS if _ours_to_take(signum)}
    if not taken:
        yield
        return
    _held.update(taken)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_about_dropped_stop(previous_hook)
    try:
        yield
    finally:
        for signum, previous in taken.items():
            signal.signal(signum, previous)
        _held.clear()
        sys.unraisablehook = previous_hook
        _requested, _raised_at = None, -math.inf


@contextlib.contextmanager
def sigterm_held() -> Iterator[None]:
    """Within, in the main thread under `stops_remembered()`, around a library's start (ray.init): a SIGTERM waits
    (is blocked) until the end, and is then ours; a handler the library installs meanwhile never runs. ray.init
    installs two (one exits with 15, the other, after ending its processes for up to 30 s, with 1, neither with a
    word), and Ray's C++ core worker a third (absl's failure handler: a stack, then an abort 3 s later, while the
    core worker may hold the GIL for 3 s as it connects). The threads started within inherit the block (Ray's:
    SIGTERM then comes to this one), and so do the processes: they must unblock it themselves."""
    if signal.SIGTERM not in _held or threading.current_thread() is not threading.main_thread() or not hasattr(
            signal, "pthread_sigmask"):
        yield
        return
    install = signal.signal

    def ours_kept(signum, handler):
        if signum == signal.SIGTERM:
            return signal.getsignal(signum)  # as if installed (for a thread of Python's not blocking it)
        return install(signum, handler)

    signal.signal = ours_kept
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.signal = install
        install(signal.SIGTERM, _remember_and_raise)  # over absl's, which C code installed
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # one that came meanwhile is handled now


@contextlib.contextmanager
def stops_deferred() -> Iterator[None]:
    """Within, under stops_remembered(): a Ctrl-C or SIGTERM is remembered but not raised, so that work which
    must not stop halfway (a training step, whose parameters updated in part would be saved as a place to
    resume from) ends first; stop_if_interrupted() after it raises it."""
    global _deferred
    before = _deferred
    _deferred = True
    try:
        yield
    finally:
        _deferred = before


def stop_requested() -> bool:
    """Whether a Ctrl-C or SIGTERM asked this command to stop through our handler (not Python's own, whose
    KeyboardInterrupt may land anywhere)."""
    return _requested is not None


def requested_signal() -> int:
    """The signal that asked this command to stop (0: none)."""
    return _requested or 0


def take_request(signum: int) -> None:
    """A stop that another process of the job was asked for (torchrun's processes agree on one): this
    process's own from now on (its line and exit status), unless it was asked already."""
    global _requested
    if _requested is None:
        _requested = signum


def stop_if_interrupted() -> None:
    """Raise KeyboardInterrupt when Ctrl-C or SIGTERM came, even if where it landed dropped it."""
    global _raised_at
    if _requested is not None:
        _raised_at = time.monotonic()  # a repeat within REPEAT_SECONDS of it is the same request
        raise KeyboardInterrupt


def stopped() -> str:
    """How the line that ends a stopped command begins: "interrupted" for Ctrl-C, "stopped by SIGTERM" (SIGHUP)."""
    return f"stopped by {signal.Signals(_requested).name}" if _requested not in (None, signal.SIGINT) else "interrupted"


def exit_status() -> int:
    """128 + the signal, as a shell reports a process it ended: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + (_requested or signal.SIGINT)


def leave_stops_to_the_parent(worker_id: int = 0) -> None:
    """A DataLoader worker's `worker_init_fn`. torch's workers die of a SIGTERM sent to the whole job (Slurm
    signals every process of it) and of a Ctrl-C (torchrun passes it on to each process's whole group),
    and the training process, stopping cleanly (under torchrun up to 5 steps later, where the processes
    agree to), would fail on the loss of its workers instead. So a worker ignores Ctrl-C, outlives a
    SIGTERM while its loader is open, and ends when the training process closes the loader. Once the
    loader is closing, a SIGTERM is the loader's own `terminate()` of a worker that did not finish its batch within 5 s of being asked to: that one ends
    it (ignored too, a worker stuck in a slow read outlived the training process until the read
    returned). The loader's "closing" event is the `done_event` of torch's worker loop, which calls this.
    The worker starts with the three blocked (stop_signals_held, in the training process), and lets them
    through once they are ignored: one that came meanwhile is dropped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a terminal gone: the training process stops them all
    # ignored, a job's SIGTERM that came while it started is dropped, not taken below for the loader's own
    # (the stopping training process, already closing the loader, failed on a worker so ended)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked from its start (stop_signals_held)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS))
    closing = sys._getframe(1).f_locals.get("done_event")
    if not callable(getattr(closing, "is_set", None)):  # another torch: keep the worker through every SIGTERM
        return

    def end_once_the_loader_is_closing(signum, frame) -> None:
        if closing.is_set():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, end_once_the_loader_is_closing)
