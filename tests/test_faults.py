"""Fault injection, as a hostile user or a bad day would do it: `vlpcache extract` killed with SIGKILL at
random moments and resumed, two extracts started together into one cache, disks that fill up under
extract, pretrain and index. Damaged files of every kind are fed to every command in
test_user_errors.py.

A full disk is a small tmpfs where this machine lets us mount one (we run as root), else a limit on
the size of any file this process and its children write (RLIMIT_FSIZE: the write that passes it fails
with EFBIG), so that the same code paths fail on any Linux machine.

The random moments come from $VLPCACHE_FAULT_SEED, or a fresh seed that failures print;
VLPCACHE_FAULT_DISK=file-size-limit takes the second way where the first would work.
"""

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from as_a_shell import as_a_shell_starts_it
from conftest import Disk
from test_extract import _assert_same_content
from vlpcache import __version__
from vlpcache.cache.reader import RegionCache
from vlpcache.cache.schema import SHARD_DIR
from waiting import HANG_GUARD_S, wait_until

ITEMS = 24
LONG_ITEMS = 150  # long_root: the extracts stopped midway
# small, quick settings: 2-frame items, a shard every 2 items, YOLOX's own neck features (no second network)
EXTRACT = ["--frames", "2", "--items-per-shard", "2", "--batch-size", "2", "--workers", "1", "--backbone", "neck",
           "--quiet"]
KILLS = 7  # each life starts a Python with torch: about 4 s (10 were 45 s of the suite's 10 minutes)
SEED = int(os.environ.get("VLPCACHE_FAULT_SEED", random.SystemRandom().randrange(1 << 30)))


def start_extract(root: Path, cache: Path, cwd: Path, *extra: str, default: tuple = ()) -> subprocess.Popen:
    """`vlpcache extract` as its own process group, so that a kill takes its decoding workers too; `extra`
    options override EXTRACT's, and the signals in `default` are not ignored there even where ours are."""
    command = [sys.executable, "-m", "vlpcache", "extract", str(root), "-o", str(cache), *EXTRACT, *extra]
    return subprocess.Popen(as_a_shell_starts_it(command, default=default), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def extract(root: Path, cache: Path, cwd: Path, timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess:
    proc = start_extract(root, cache, cwd)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def temporaries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / SHARD_DIR).glob("*.tmp"))


@pytest.fixture(scope="module")
def frames_root(tmp_path_factory, msrvtt_dir) -> Path:
    root = tmp_path_factory.mktemp("frames")
    for folder in sorted((msrvtt_dir / "frames" / "val").iterdir())[:ITEMS]:
        shutil.copytree(folder, root / folder.name)
    return root


@pytest.fixture(scope="module")
def together(frames_root, tmp_path_factory) -> dict:
    """Two extracts of the same items started together into one cache; the winner's cache is the reference
    the other faults are compared with."""
    work = tmp_path_factory.mktemp("together")
    started = time.monotonic()
    procs = [start_extract(frames_root, work / "cache", work) for _ in range(2)]
    results = [p.communicate(timeout=HANG_GUARD_S) for p in procs]
    return {"cache": work / "cache", "procs": procs, "stderr": [err for _, err in results],
            "seconds": time.monotonic() - started}


def test_two_extracts_into_one_cache_one_refuses_naming_the_other_and_nothing_is_stored_twice(together):
    codes = sorted(p.returncode for p in together["procs"])
    assert codes == [0, 2], together["stderr"]
    winner, loser = sorted(together["procs"], key=lambda p: p.returncode)
    refusal = together["stderr"][together["procs"].index(loser)].strip().splitlines()
    assert len(refusal) == 1 and refusal[0].startswith(f"error: {together['cache']}: shards s0of1-* are being written "
                                                       f"by pid {winner.pid} on "), refusal
    cache = RegionCache(together["cache"])
    assert len(cache) == ITEMS and len(set(cache.ids)) == ITEMS and not temporaries(together["cache"])


def wrote_since(cache: Path, since: float) -> bool:
    """Whether a shard (temporary or committed) was written after `since` (time.time()): by the current process."""
    for shard in (cache / SHARD_DIR).glob("*.h5*") if (cache / SHARD_DIR).is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            if shard.stat().st_mtime >= since:
                return True
    return False


def kill_at_a_random_moment(proc: subprocess.Popen, cache: Path, rng: random.Random, timeline: dict) -> tuple[float, str]:
    """SIGKILL the extract's process group at a random moment: a third of them in the start-up (lock,
    settings check, detector loading: the uninterrupted run's first `load` seconds), the others after its
    first shard began, within a slice of the time the uninterrupted run took to write everything (`write`
    seconds), so that the kills spread over the writing of the whole cache instead of the first of them
    finishing it. Returns (seconds after the start, what the process was doing)."""
    started_at, started = time.time(), time.monotonic()
    if rng.random() < 1 / 3:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=rng.uniform(0.05, timeline["load"]))
    else:
        while proc.poll() is None and not wrote_since(cache, started_at):
            time.sleep(0.005)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=rng.uniform(0.0, 2 * timeline["write"] / KILLS))
    doing = "finished" if proc.poll() is not None else "writing" if wrote_since(cache, started_at) else "starting"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the decoding workers die with it
    proc.communicate()
    return round(time.monotonic() - started, 2), doing


def test_extract_killed_at_random_moments_then_resumed_equals_an_uninterrupted_run(frames_root, together, tmp_path):
    rng = random.Random(SEED)
    victim = tmp_path / "cache"
    summary = together["stderr"][[p.returncode for p in together["procs"]].index(0)]
    timeline = {"load": float(re.search(r"detector loaded after ([\d.]+) s", summary)[1]),
                "write": float(re.search(r"busy ([\d.]+) s", summary)[1])}
    kills = [kill_at_a_random_moment(start_extract(frames_root, victim, tmp_path), victim, rng, timeline)
             for _ in range(KILLS)]
    done = extract(frames_root, victim, tmp_path)
    print(f"seed {SEED}: killed at (seconds, what the process was doing) {kills}")
    context = f"seed {SEED}, kills {kills}: {done.stderr}"
    assert done.returncode == 0, context
    _assert_same_content(RegionCache(victim), RegionCache(together["cache"]))  # every item once, identical arrays
    assert not temporaries(victim) and not list((victim / "locks").iterdir()), context


# ---------------------------------------------------------------- Ctrl-C, and a parent killed alone


@pytest.fixture(scope="module")
def long_root(tmp_path_factory, msrvtt_dir) -> Path:
    """150 frame folders (links to the shared ones): several seconds of work, so that a signal sent once the
    first shard is written finds the extract still at work."""
    root = tmp_path_factory.mktemp("long")
    for folder in sorted((msrvtt_dir / "frames" / "train").iterdir())[:LONG_ITEMS]:
        (root / folder.name).symlink_to(folder, target_is_directory=True)
    return root


def committed_shards(cache: Path) -> int:
    return len(list((cache / SHARD_DIR).glob("*.h5")))


def start_extract_at_work(root: Path, cache: Path, cwd: Path) -> subprocess.Popen:
    """An extract (its own process group, Ctrl-C not ignored even where ours is) past a shard of its own: the
    cache's first, or one more than a stopped run left."""
    before = committed_shards(cache)
    proc = start_extract(root, cache, cwd, default=(signal.SIGINT,))
    wait_until(lambda: committed_shards(cache) > before, alive=proc)
    assert proc.poll() is None, f"the extract ended before it could be interrupted: {proc.communicate()}"
    return proc


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def test_ctrl_c_in_the_middle_of_a_long_item_stops_at_once_without_a_traceback(models_dir, tmp_path):
    # the reader's thread waited on a worker busy with an hour of video: the command waited 5 s for it, and
    # as it exited the reader replaced the workers it found killed, each new one dying with a traceback
    from broken_media import make_slow_image
    from test_extract import _run_on_an_unsized_terminal

    page = make_slow_image(tmp_path / "root" / "scan" / "1.png")  # 1.5 s each to decode here: 12 s in all
    for n in range(2, 9):
        os.link(page, page.with_name(f"{n}.png"))
    # on a terminal, whose bar redraws as its clock moves (written to a file, it writes a line every 30 s)
    code, said = _run_on_an_unsized_terminal(["extract", str(tmp_path / "root"), "-o", str(tmp_path / "cache"),
                                              "--backbone", "neck", "--workers", "1"], tmp_path,
                                             # the detector loaded 2 s ago (the bar's clock): the worker is decoding
                                             ctrl_c_at=r"extract: +0%.*0/1 \[00:0[2-9]")
    assert code == 130 and "Traceback" not in said, said
    assert said.strip().splitlines()[-1] == "interrupted; what was committed is kept, re-run the same command to resume"


def test_sigterm_or_sighup_to_the_whole_job_and_a_ctrl_c_stops_extract_with_one_line_and_a_rerun_finishes(long_root,
                                                                                                          tmp_path):
    """One cache, each run a re-run of the last: a SIGTERM to the whole job (a Slurm time limit signals every process
    of the job, the decoding workers too: the process died of it as of kill -9, losing the shard in progress, here
    the run's first, which nothing else would have committed); a SIGHUP (the terminal or ssh connection the job ran in
    closed: it died of it, with no word); a Ctrl-C (a terminal's: the whole foreground group, once a shard is
    committed); then a re-run finishes the cache."""
    cache = tmp_path / "cache"
    stopped = 0
    for signum in (signal.SIGTERM, signal.SIGHUP):
        proc = start_extract(long_root, cache, tmp_path, "--items-per-shard", "1000", default=(signum,))
        wait_until(lambda: (cache / SHARD_DIR).is_dir() and temporaries(cache), alive=proc)
        time.sleep(1.0)  # a few items into the shard
        assert proc.poll() is None, f"the extract ended before it could be stopped: {proc.communicate()}"
        os.killpg(proc.pid, signum)
        _, stderr = proc.communicate(timeout=HANG_GUARD_S)
        assert proc.returncode == 128 + signum and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
        assert stderr.strip().splitlines()[-1] == (f"stopped by {signum.name}; what was committed is kept, re-run the "
                                                   "same command to resume")
        cache_now = RegionCache(cache)
        assert not temporaries(cache) and stopped < len(cache_now) < LONG_ITEMS and not cache_now.failures, stderr
        stopped = len(cache_now)

    proc = start_extract_at_work(long_root, cache, tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 130 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted; what was committed is kept, re-run the same command to resume"
    assert not temporaries(cache) and stopped < len(RegionCache(cache)) < LONG_ITEMS

    assert extract(long_root, cache, tmp_path).returncode == 0
    finished = RegionCache(cache)
    assert len(finished) == LONG_ITEMS and len(set(finished.ids)) == LONG_ITEMS and not finished.failures


# Python runs the Ctrl-C handler wherever the main thread happens to be; in a weakref callback or a
# __del__ (CI once caught it in a WeakValueDictionary's callback) its KeyboardInterrupt is printed as
# "Exception ignored" and dropped, and the extract ran to its end with status 0. This extract gets its
# Ctrl-C there, every time: inside a finalizer, once its third item is written
CTRL_C_IN_A_FINALIZER = """
import signal, sys
from vlpcache.cli import main
from vlpcache.extract.progress import ExtractProgress

advance = ExtractProgress.advance

class Finalizer:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)

def advance_then_ctrl_c_in_a_finalizer(self, *args):
    advance(self, *args)
    if self.summary.done == 3:
        Finalizer()  # dropped at once: its __del__ runs here

ExtractProgress.advance = advance_then_ctrl_c_in_a_finalizer
sys.argv = ["vlpcache", "extract", *sys.argv[1:]]
main()
"""


def test_a_ctrl_c_that_lands_in_a_finalizer_still_stops_extract_with_one_line(long_root, tmp_path):
    cache = tmp_path / "cache"
    command = [sys.executable, "-c", CTRL_C_IN_A_FINALIZER, str(long_root), "-o", str(cache), *EXTRACT]
    done = subprocess.run(as_a_shell_starts_it(command, default=[signal.SIGINT]), cwd=tmp_path, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 130, done.stderr
    assert "Exception ignored" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "interrupted; what was committed is kept, re-run the same command to resume"
    assert not temporaries(cache) and 0 < len(RegionCache(cache)) < LONG_ITEMS


CTRL_C_WHILE_IMPORTING = """
import importlib.abc, os, signal, sys, time

class CtrlCOnClick(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "click":  # the command table's first import: a Ctrl-C lands while the command starts
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
        return None

sys.meta_path.insert(0, CtrlCOnClick())
sys.argv = ["vlpcache", "--version"]
from vlpcache.__main__ import main  # as the `vlpcache` script pip writes does
"""


@pytest.mark.parametrize("background", [False, True])
def test_a_ctrl_c_while_the_command_still_imports_exits_with_130_and_prints_nothing(background, tmp_path):
    # the first 0.1-0.2 s of every command: Python printed its KeyboardInterrupt traceback
    script = tmp_path / "vlpcache"  # the console script: its file's name, and `main()` at its top level
    script.write_text(CTRL_C_WHILE_IMPORTING + "sys.exit(main())\n")
    as_started = {"ignore" if background else "default": [signal.SIGINT]}
    done = subprocess.run(as_a_shell_starts_it([sys.executable, str(script)], **as_started), capture_output=True,
                          text=True, timeout=HANG_GUARD_S)
    if background:  # started with `&` or `nohup`: Ctrl-C stays ignored, and the command runs
        assert (done.returncode, done.stdout.split(), done.stderr) == (0, ["vlpcache,", "version", __version__], "")
    else:
        assert (done.returncode, done.stdout, done.stderr) == (130, "", "")
    from importlib.metadata import entry_points

    assert entry_points(group="console_scripts")["vlpcache"].value == "vlpcache.__main__:main"


def test_a_ctrl_c_while_main_imports_in_another_program_is_that_program_s_keyboard_interrupt():
    # a notebook's kernel (its SIGINT handler Python's default one) called main(): the interrupt ended the whole
    # process at once with 130, the notebook's state lost, where it raises KeyboardInterrupt into the cell
    caller = CTRL_C_WHILE_IMPORTING + "try:\n    main()\nexcept KeyboardInterrupt:\n    print('KeyboardInterrupt')\nprint('went on')\n"
    done = subprocess.run(as_a_shell_starts_it([sys.executable, "-c", caller], default=[signal.SIGINT]),
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert (done.returncode, done.stdout.split(), done.stderr) == (0, ["KeyboardInterrupt", "went", "on"], "")


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # pytest's report of "Exception ignored"
def test_a_dropped_ctrl_c_or_sigterm_is_raised_at_the_next_check_and_an_ignored_ctrl_c_stays_ignored():
    from vlpcache.interrupts import (exit_status, sigterm_held, stop_if_interrupted, stop_requested, stopped,
                                     stops_remembered)

    class Finalizer:
        def __init__(self, signum):
            self.signum = signum

        def __del__(self):
            signal.raise_signal(self.signum)

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),  # a shell's foreground job
                signal.SIGTERM: signal.signal(signal.SIGTERM, signal.SIG_DFL)}
    try:
        for signum, word, status in [(signal.SIGINT, "interrupted", 130), (signal.SIGTERM, "stopped by SIGTERM", 143)]:
            with stops_remembered():
                Finalizer(signum)  # Python prints "Exception ignored" and drops the KeyboardInterrupt
                with pytest.raises(KeyboardInterrupt):
                    stop_if_interrupted()
                assert (stopped(), exit_status()) == (word, status)
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
            stop_if_interrupted()  # the next command starts without it
            assert (stopped(), exit_status()) == ("interrupted", 130)

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # started with `nohup` or `&`
        with stops_remembered():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            stop_if_interrupted()
            library_called, thread_started_before = threading.Event(), threading.Event()
            with pytest.raises(KeyboardInterrupt):  # SIGTERM waits for the library's start, then is ours
                with sigterm_held():
                    signal.signal(signal.SIGTERM, lambda signum, frame: library_called.set())  # as ray.init sets
                    signal.raise_signal(signal.SIGTERM)
                    assert not stop_requested()  # held
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        helper = threading.Thread(target=thread_started_before.wait)  # takes SIGTERM: does not block it
        helper.start()
        try:
            with stops_remembered(), pytest.raises(KeyboardInterrupt):  # ours, where a thread took it meanwhile
                with sigterm_held():
                    signal.signal(signal.SIGTERM, lambda signum, frame: library_called.set())
                    os.kill(os.getpid(), signal.SIGTERM)  # to the process: the thread that does not block it
                    while not library_called.is_set():
                        time.sleep(0.001)
        finally:
            thread_started_before.set()
            helper.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_decoding_workers_leave_ctrl_c_to_their_parent_and_die_of_sigterm(tmp_path):
    # a worker waiting for work when Ctrl-C reached the whole process group printed a traceback of its own;
    # SIGTERM ends a worker at once, wherever it is: the pool sees its death on the worker's own pipe
    from decoders import signal_dispositions
    from vlpcache.extract.reader import FrameReader
    from vlpcache.extract.sources import Item

    # a process started in the background (`cmd &` without job control, as CI or nohup may run the suite)
    # begins with SIGINT ignored and passes that on to the workers: give the parent its usual handler, so
    # that only the workers' own setting can make them ignore it
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        reported, = FrameReader(num_frames=1, max_side=64, workers=1, decode=signal_dispositions)(
            [Item("any", tmp_path, "image")])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert reported.error == f"{signal.SIG_IGN!r} {signal.SIG_DFL!r}"


def test_decoding_workers_end_themselves_when_their_extract_is_killed_alone(long_root, tmp_path):
    # kill -9 of the main process only, as the OOM killer does: its spawned workers would wait forever
    proc = start_extract_at_work(long_root, tmp_path / "cache", tmp_path)
    workers = children_of(proc.pid)
    assert workers
    proc.kill()
    proc.wait()  # not communicate(): workers that outlive it hold its output pipes open
    proc.stdout.close()
    proc.stderr.close()
    assert wait_until(lambda: not any(running(pid) for pid in workers)), [p for p in workers if running(p)]


def test_a_file_that_decodes_longer_than_decode_timeout_is_one_failed_line_and_retry_failed_caches_it(models_dir, tmp_path):
    # the option from the command line to the worker pool: a real file that takes seconds to decode, not a stand-in
    from broken_media import make_slow_image
    from test_extract import vlpcache

    slow = make_slow_image(tmp_path / "root" / "page.png")
    quick = ["-o", tmp_path / "cache", "--frames", "2", "--backbone", "neck", "--workers", "1"]
    limited = vlpcache("extract", slow.parent, *quick, "--decode-timeout", "0.2", cwd=tmp_path, check=False)
    reason = "decoder took more than 0.2 s on this file"
    assert limited.returncode == 1, limited.stderr  # nothing done
    assert [line for line in limited.stderr.splitlines() if line.startswith(str(slow))] == [f"{slow}: {reason}"]
    assert "extract: 0 done" in limited.stderr and "1 failed" in limited.stderr
    assert {r["path"]: r["reason"] for r in RegionCache(tmp_path / "cache").failures.values()} == {str(slow): reason}

    vlpcache("extract", slow.parent, *quick, "--retry-failed", cwd=tmp_path)  # the default limit, 600 s
    cache = RegionCache(tmp_path / "cache")
    assert cache.ids == ["page"] and not cache.failures


def test_the_progress_bar_clock_moves_while_one_long_item_decodes(models_dir, tmp_path):
    # tqdm redraws only when its count moves: an hour of video decoded from one keyframe showed
    # `0/1 [00:00<?` until it was done, as if extract hung; a frames folder of slow pages stands in for it
    # (on a terminal: written to a file, the bar writes a line every 30 s)
    from broken_media import make_slow_image
    from test_extract import _run_on_an_unsized_terminal

    page = make_slow_image(tmp_path / "root" / "scan" / "1.png")  # 1.5 s each to decode here
    for n in range(2, 5):
        os.link(page, page.with_name(f"{n}.png"))
    code, written = _run_on_an_unsized_terminal(["extract", str(tmp_path / "root"), "-o", str(tmp_path / "cache"),
                                                 "--frames", "4", "--backbone", "neck", "--workers", "1"], tmp_path)
    assert code == 0, written
    waiting = [line for line in re.split(r"[\r\n]", written) if " 0/1 [" in line]
    assert any(re.search(r" 0/1 \[00:0[1-9]", line) for line in waiting), waiting


# ---------------------------------------------------------------- full disks


def test_a_file_write_that_fails_on_a_full_disk_names_the_file_it_was_for(disk):
    from vlpcache.records import write_json

    target = disk.folder / "roots.json"  # the workspace's record of extracted roots: one ENOSPC named no file
    with disk.full(room=0), pytest.raises(OSError) as failed:
        write_json(target, ["x" * 100_000])
    assert failed.value.filename == str(target) and not list(disk.folder.iterdir())


def test_extract_on_a_full_disk_is_one_line_keeps_what_was_committed_and_resumes(frames_root, together, disk, tmp_path):
    cache = disk.folder / "cache"
    with disk.full(room=150_000 if disk.tmpfs else 20_000):  # tmpfs: about two shards; else less than one
        failed = extract(frames_root, cache, tmp_path)
        committed = RegionCache(cache).ids if (cache / "manifest.json").exists() else []
    *warned, error = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    assert "cannot write (" in error and ("No space left on device" in error or "File too large" in error)
    assert "the unfinished one is removed" in error or "nothing was written" in error
    # on the tmpfs, once the first shard is committed: the other 22 items will not fit, said at once (--quiet too)
    assert len(warned) == disk.tmpfs and all(line.startswith(f"{cache}: the 22 items still to extract need about ")
                                             and "is free there: make room" in line for line in warned), warned
    assert not temporaries(cache)
    assert committed or not disk.tmpfs  # on the tmpfs, shards were committed before the disk filled
    assert set(committed) <= set(RegionCache(cache).ids)  # and they are still there
    done = extract(frames_root, cache, tmp_path)
    assert done.returncode == 0 and "still to extract" not in done.stderr, done.stderr
    _assert_same_content(RegionCache(cache), RegionCache(together["cache"]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from test_search import build_tiny_workspace

    return build_tiny_workspace(tmp_path_factory.mktemp("tiny")).parent


def test_pretrain_checkpoint_on_a_full_disk_is_one_line_keeps_earlier_ones_and_resumes(tiny, disk, monkeypatch, capsys):
    from test_search import vlpcache
    from vlpcache.files import file_sha256
    from vlpcache.model.run_layout import checkpoints

    run = disk.folder / "run"
    shutil.copytree(tiny / "ws" / "runs" / "run-001", run)  # one epoch trained, checkpoint saved
    [first] = checkpoints(run).values()
    weights = file_sha256(first / "model.safetensors")
    args = ["pretrain", "--resume", "-o", run, "--epochs", "2", "--device", "cpu", "--workers", "0", "--quiet"]
    with disk.full(room=200_000):
        code, _, err = vlpcache(monkeypatch, capsys, *args)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and errors == err.splitlines()[-1:] and "Traceback" not in err, err
    assert errors[0].startswith(f"error: {run / 'checkpoints'}/.epoch-0002.tmp-"), err
    # this run's folder named: `--resume` alone resumes the workspace's latest run, another one
    assert f"the checkpoint of epoch 2 is not saved, earlier ones are kept; make room and continue with `vlpcache " \
           f"pretrain --resume -o {run}`" in err
    assert list(checkpoints(run)) == [1] and file_sha256(first / "model.safetensors") == weights
    assert not list((run / "checkpoints").glob(".*"))
    code, _, err = vlpcache(monkeypatch, capsys, *args)
    assert code == 0 and 2 in checkpoints(run), err


def test_places_within_an_epoch_give_way_to_its_checkpoint_on_a_disk_too_full_for_both(tiny, disk, monkeypatch, capsys):
    # a disk that held the run's checkpoints (the last, the next) without places: the epoch's checkpoint failed for
    # the room its place took, and every resume from that place failed there again
    from test_search import vlpcache
    from vlpcache.model.run_layout import checkpoints, partial_checkpoints

    if not disk.tmpfs:
        pytest.skip("needs a tmpfs (root): a limit on the size of one file fills no disk")
    run = disk.folder / "run"
    shutil.copytree(tiny / "ws" / "runs" / "run-001", run)  # one epoch trained, checkpoint saved
    [first] = checkpoints(run).values()
    size = sum(f.stat().st_size for f in first.iterdir())
    args = ["pretrain", "--resume", "-o", run, "--epochs", "2", "--device", "cpu", "--workers", "0", "--quiet",
            "--save-every", "1e-7"]  # a place due after every step
    with disk.full(room=int(1.5 * size)):  # one more checkpoint fits, not two: a place, then not the checkpoint
        code, _, err = vlpcache(monkeypatch, capsys, *args)
    assert code == 0 and "Traceback" not in err, err
    assert list(checkpoints(run)) == [2] and not partial_checkpoints(run) and not list((run / "checkpoints").glob(".*"))


@pytest.mark.parametrize("room, failed", [(30_000, ""), (0, "encoding")])  # the index files fail; or the first part
def test_index_on_a_full_disk_is_one_line_leaves_the_index_as_it_was_and_builds_later(tiny, disk, monkeypatch, capsys,
                                                                                      room, failed):
    from test_pretrain import write_cache
    from test_search import vlpcache
    from vlpcache.index.faiss_index import VideoIndex

    ws = tiny / "ws"
    cache = disk.folder / "cache"
    shutil.copytree(ws / "cache", cache)
    args = ["index", "--run", ws / "runs" / "run-001", "--cache", cache, "-o", disk.folder / "index", "--device", "cpu",
            "--quiet"]
    assert vlpcache(monkeypatch, capsys, *args)[0] == 0
    [index_dir] = [p.parent for p in (disk.folder / "index").glob("*/index.json")]
    before = {p.name: p.read_bytes() for p in index_dir.iterdir() if p.is_file()}
    write_cache(cache, 3, prefix="w", seed=5)  # the cache grows: the index has 3 items to add
    with disk.full(room=room):
        code, _, err = vlpcache(monkeypatch, capsys, *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {index_dir / failed}: cannot write ("), err
    assert "the index is as it was before" in err
    assert {p.name: p.read_bytes() for p in index_dir.iterdir() if p.is_file()} == before  # no temporary either
    assert vlpcache(monkeypatch, capsys, *args)[0] == 0
    assert len(VideoIndex.load(index_dir)) == len(RegionCache(cache))


@pytest.mark.parametrize("where, room, file_room, kept", [("first part", 50_000, 50_000, 0),
                                                         ("join", 300_000, 150_000, 200)])
def test_caption_encoding_on_a_full_disk_is_one_line_keeps_the_parts_and_resumes(disk, tmp_path_factory, monkeypatch,
                                                                                 where, room, file_room, kept):
    import torch

    from test_model import build_tiny_text_model, stored_arrays, tiny_config
    from vlpcache.errors import UserError
    from vlpcache.model import text_features
    from vlpcache.model.model import build_model

    monkeypatch.setattr(text_features, "PART_CAPTIONS", 100)  # two parts of about 110 kB, joined: 260 kB
    model, tokenizer = build_model(tiny_config(build_tiny_text_model(tmp_path_factory.mktemp("bert")),
                                               text_trainable_layers=0))
    captions = [f"caption {i}: a person does thing {i % 7} with a {['dog', 'cat', 'car'][i % 3]} near the river"
                for i in range(200)]

    def encode(root, say=None):
        return text_features.cached_text_features(model, tokenizer, captions, root, with_words=True,
                                                  device=torch.device("cpu"), progress=False, say=say)

    whole = encode(tmp_path_factory.mktemp("whole"))
    warned = []
    with disk.full(room=room if disk.tmpfs else file_room), pytest.raises(UserError) as failed:
        encode(disk.folder, say=warned.append)
    folder = disk.folder / text_features.FEATURES_DIR
    # with the first part whole (110 kB), the other and the join (220 kB) need more than is left: said at once
    short_of_room = disk.tmpfs and where == "join"
    assert len(warned) == short_of_room and all(line.startswith(f"{folder}: the encoded captions need about ") and
                                                 "is free there: make room before then" in line for line in warned), warned
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"{folder}: cannot write ("), message
    assert f"the {kept} of 200 captions encoded so far are kept" in message
    assert [p.name for p in folder.iterdir()] == [whole.path.with_suffix(".parts").name]  # no .h5, no lock
    parts = folder / whole.path.with_suffix(".parts").name
    assert len(list(parts.iterdir())) == kept // 100  # each kept part whole, no temporary
    lines = []
    resumed = encode(disk.folder, say=lines.append)
    assert lines == ([f"resuming: 200 of the 200 captions were encoded by a run that did not finish (kept in {parts}); "
                      "joining them"] if kept else [])
    expected, got = stored_arrays(whole), stored_arrays(resumed)
    assert expected.keys() == got.keys() and all(np.array_equal(expected[k], got[k]) for k in expected)
    assert not parts.exists()


def test_extract_into_a_read_only_filesystem_is_one_line_before_anything_loads(frames_root, tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        result = extract(frames_root, folder / "cache", tmp_path)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {folder / 'cache'}: cannot write (Read-only file system (EROFS)); "
                                    "nothing was written")


def test_extract_into_a_read_only_cache_that_holds_every_item_says_up_to_date_and_with_work_one_line(
        frames_root, together, msrvtt_dir, tmp_path, read_only):
    # a shared, finished cache: its lock could not be taken, and "nothing to do" was refused with the lock file's error
    cache = tmp_path / "shared" / "cache"
    shutil.copytree(together["cache"], cache)
    listing = sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))
    new = tmp_path / "new"
    extra = sorted((msrvtt_dir / "frames" / "val").iterdir())[ITEMS]  # not among frames_root's
    shutil.copytree(extra, new / extra.name)
    read_only(cache.parent)

    def extract_from(*roots: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vlpcache", "extract", *map(str, roots), "-o", str(cache), *EXTRACT],
                              cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)

    done = extract_from(frames_root)
    assert done.returncode == 0, done.stderr
    assert f"extract: 0 done, {ITEMS} already cached" in done.stderr and done.stderr.rstrip().endswith(
        "s; nothing left to extract"), done.stderr
    refused = extract_from(frames_root, new)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith(f"error: {cache}: the cache is read-only ("), refused.stderr
    assert "this extract has 1 item(s) to extract; nothing was written" in refused.stderr, refused.stderr
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) == listing


@pytest.mark.parametrize("message, reason", [
    # what each library that writes our files raised on a full disk, as observed on a 1 MB tmpfs
    ("Can't flush cache (file write failed: time = Wed Dec  2 08:35:14 2026\n, filename = 'x.h5.tmp', "
     "file descriptor = 4, errno = 28, error message = 'No space left on device', buf = 0x5604463c7f68)",
     "No space left on device (ENOSPC)"),  # h5py
    ("Error while serializing: I/O error: No space left on device (os error 28)",
     "No space left on device (ENOSPC)"),  # safetensors
    ("Error in faiss::FileIOWriter: write error (No space left on device)", "No space left on device (ENOSPC)"),
    ("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662", "unexpected pos"),  # no errno: as said
])
def test_the_system_reason_is_found_in_each_librarys_write_error(message, reason):
    from vlpcache.files import system_reason

    assert reason in system_reason(RuntimeError(message))


def test_torch_save_through_a_file_keeps_the_errno_of_the_failed_write(tmp_path):
    import torch

    from vlpcache.files import system_reason

    with pytest.raises(RuntimeError) as failure, Disk(tmp_path, tmpfs=False).full(room=1000):
        with open(tmp_path / "state.pt", "wb") as f:
            torch.save({"x": torch.zeros(10_000)}, f)
    assert system_reason(failure.value) == "File too large (EFBIG)"
