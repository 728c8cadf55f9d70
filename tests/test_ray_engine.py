"""`vlpcache extract --engine ray` against the local engine, on one local Ray instance per module.

The commands run as a user runs them (subprocesses joining the module's instance with --ray-address),
on real videos, photos, frame folders and broken files, with real kills of actors and drivers.
"""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import ray  # the ray extra, part of the test extra

from as_a_shell import as_a_shell_starts_it
from test_extract import vlpcache
from vlpcache.cache.reader import RegionCache
from vlpcache.cache.schema import FAILURE_DIR, LOCK_DIR, SHARD_DIR, SHARD_SUFFIX
from vlpcache.extract.stamps import source_stamp
from waiting import HANG_GUARD_S, wait_until

FRAMES = ("--frames", 2)
EXACT = ("labels", "region_mask", "frame_mask", "timestamps", "frame_size", "duration")
FLOAT16_TOLERANCE = {"rtol": 2e-3, "atol": 2e-3}  # a couple of float16 steps


@pytest.fixture(scope="module")
def ray_address():
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    # a local instance turns on token authentication (Ray 2.59+) through RAY_AUTH_MODE in this process's
    # environment, which the drivers started below inherit, as drivers on a cluster must have it
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield context.address_info["address"]
    ray.shutdown()
    if auth_mode is None:
        os.environ.pop("RAY_AUTH_MODE", None)


@pytest.fixture(scope="module")
def root(tmp_path_factory, videos_dir, msrvtt_dir, flickr_dir):
    """Real videos, photos and frame folders, and every kind of broken input."""
    from broken_media import make_broken_media

    root = tmp_path_factory.mktemp("media")
    (root / "clips").mkdir()
    for name in ("tests_data_test.mp4", "bikes.mp4", "cup.mp4"):
        shutil.copy(videos_dir / name, root / "clips" / name)
    for photo in sorted((flickr_dir / "images").iterdir())[:2]:
        shutil.copy(photo, root / photo.name)
    for folder in sorted((msrvtt_dir / "frames" / "val").iterdir())[:12]:
        shutil.copytree(folder, root / "frames" / folder.name)
    make_broken_media(root / "broken", videos_dir / "cup.mp4")
    return root


@pytest.fixture(scope="module")
def local(root, tmp_path_factory):
    work = tmp_path_factory.mktemp("local")
    vlpcache("extract", root, "-o", work / "cache", *FRAMES, cwd=work)
    return RegionCache(work / "cache")


@pytest.fixture(scope="module")
def on_ray(root, ray_address, tmp_path_factory):
    work = tmp_path_factory.mktemp("ray")
    result = vlpcache("extract", root, "-o", work / "cache", *FRAMES, "--engine", "ray", "--ray-address", ray_address,
                      cwd=work)
    return RegionCache(work / "cache"), result


def assert_same_cache(ours: RegionCache, reference: RegionCache):
    """The same items, each once, with equal arrays (floats within float16 tolerance)."""
    assert len(ours.ids) == len(set(ours.ids))
    assert sorted(ours.ids) == sorted(reference.ids)
    for item_id in reference.ids:
        a, b = ours.get(item_id), reference.get(item_id)
        assert (a["path"], a["kind"], a["source"]) == (b["path"], b["kind"], b["source"])  # the stamps of the same files
        assert ours.note_of(item_id) == reference.note_of(item_id)
        for spec in reference.settings.arrays():
            if spec.name in EXACT:
                np.testing.assert_array_equal(a[spec.name], b[spec.name], err_msg=f"{item_id} {spec.name}")
            else:
                np.testing.assert_allclose(a[spec.name].astype(np.float32), b[spec.name].astype(np.float32),
                                           err_msg=f"{item_id} {spec.name}", **FLOAT16_TOLERANCE)


def reasons(cache: RegionCache) -> dict[str, tuple[str, str]]:
    return {item_id: (record["path"], record["reason"]) for item_id, record in cache.failures.items()}


def shards(cache_dir: Path) -> dict[str, int]:
    """Committed shard name -> modification time (ns)."""
    return {p.name: p.stat().st_mtime_ns for p in (cache_dir / SHARD_DIR).glob(f"*{SHARD_SUFFIX}")}


def actor_pids(cache_dir: Path) -> set[int]:
    """The processes that hold a Ray actor's writer lock of this cache open: its detector actors."""
    prefix = str(cache_dir.resolve() / LOCK_DIR / "s0of1-ray-")
    pids = set()
    for fds in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(_link(fd).startswith(prefix) for fd in fds.iterdir()):
                pids.add(int(fds.parent.name))
        except OSError:  # the process gone meanwhile, or not ours to read
            continue
    return pids


def _link(fd: Path) -> str:
    """Where an open file descriptor points; "" for one closed meanwhile (its process goes on: an actor that
    holds the lock and opens and closes other files was passed over whole, 1 scan in 200)."""
    try:
        return os.readlink(fd)
    except FileNotFoundError:
        return ""


def start_ray_extract_at_work(root: Path, cache_dir: Path, ray_address: str) -> subprocess.Popen:
    """A driver that takes Ctrl-C even where the suite was started with SIGINT ignored (`&`, nohup), past a shard
    of its own: the cache's first, or one more than a stopped run left."""
    args = [root, "-o", cache_dir, *FRAMES, "--items-per-shard", 3, "--engine", "ray", "--ray-address", ray_address]
    command = [sys.executable, "-m", "vlpcache", "extract", *map(str, args)]
    before = len(shards(cache_dir))
    driver = subprocess.Popen(as_a_shell_starts_it(command, default=[signal.SIGINT]), cwd=cache_dir.parent,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: len(shards(cache_dir)) > before, alive=driver), "no shard committed"
    except BaseException:
        driver.kill()
        raise
    return driver


def test_the_ray_engine_caches_the_same_items_once_with_the_local_engines_features(local, on_ray):
    cache, result = on_ray
    assert_same_cache(cache, local)
    assert f"extract: {len(local)} done" in result.stderr and "Traceback" not in result.stderr
    assert "FutureWarning" not in result.stderr  # Ray up to 2.55 warned at every init
    names = [p.name for p in (cache.cache_dir / SHARD_DIR).iterdir()]
    assert names and all(n.startswith("s0of1-ray-") and n.endswith(SHARD_SUFFIX) for n in names)  # none left .tmp


def test_the_ray_engine_records_the_same_failures_with_one_line_each(local, on_ray, root):
    cache, result = on_ray
    assert reasons(cache) == reasons(local) and len(reasons(local)) >= 8
    for path, reason in reasons(local).values():
        assert [line for line in result.stderr.splitlines() if line.startswith(f"{path}: ")] == [f"{path}: {reason}"]
    assert cache.notes == local.notes and len(local.notes) == 3  # a truncated video, one with garbage in the middle, a folder with a bad frame
    for item_id, note in local.notes.items():
        path = local.paths[local.index_of(item_id)]
        assert [line for line in result.stderr.splitlines() if line.startswith(f"{path}: {note}; kept with ")]


def test_the_ray_engine_leaves_no_empty_failure_logs(on_ray):
    # every run's actors are new writers: each left an empty failures/s0of1-ray-<actor>.jsonl, run after run
    cache, _ = on_ray
    logs = list((cache.cache_dir / FAILURE_DIR).glob("*.jsonl"))
    assert logs and [log.name for log in logs if log.stat().st_size == 0] == []


def test_decode_timeout_reaches_the_ray_engines_decoders(ray_address, models_dir, tmp_path):
    from broken_media import make_slow_image

    slow = make_slow_image(tmp_path / "root" / "page.png")  # seconds to decode
    result = vlpcache("extract", slow.parent, "-o", tmp_path / "cache", *FRAMES, "--decode-timeout", 0.2,
                      "--engine", "ray", "--ray-address", ray_address, cwd=tmp_path, check=False)
    reason = "decoder took more than 0.2 s on this file"
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr  # nothing done
    assert [line for line in result.stderr.splitlines() if line.startswith(str(slow))] == [f"{slow}: {reason}"]
    assert reasons(RegionCache(tmp_path / "cache")) == {"page": (str(slow), reason)}


def test_a_source_replaced_at_its_path_is_extracted_again_by_the_ray_engine(ray_address, msrvtt_dir, tmp_path):
    folders = sorted((msrvtt_dir / "frames" / "val").iterdir())[:2]
    for name, folder in zip("ab", folders):
        shutil.copytree(folder, tmp_path / "data" / name)
    command = ("extract", tmp_path / "data", "-o", tmp_path / "cache", *FRAMES, "--engine", "ray",
               "--ray-address", ray_address)
    vlpcache(*command, cwd=tmp_path)
    first_stamp = RegionCache(tmp_path / "cache").get("a")["source"]
    assert first_stamp == source_stamp(tmp_path / "data" / "a")  # the decoding tasks stamp what they read
    shutil.rmtree(tmp_path / "data" / "a")
    shutil.copytree(folders[1], tmp_path / "data" / "a")  # b's frames under a's name: a re-downloaded video
    again = vlpcache(*command, cwd=tmp_path)
    assert "extract: 1 cached item(s) changed on disk since they were extracted" in again.stderr
    assert "1 done, 1 already cached" in again.stderr
    cached = RegionCache(tmp_path / "cache")
    a, b = cached.get("a"), cached.get("b")
    assert sorted(cached.ids) == ["a", "b"] and a["source"] == source_stamp(tmp_path / "data" / "a") != first_stamp
    np.testing.assert_allclose(a["features"].astype(np.float32), b["features"].astype(np.float32), **FLOAT16_TOLERANCE)
    with h5py.File(tmp_path / "cache" / SHARD_DIR / cached.shard_of("a"), "r") as f:  # the actor's row names the one it replaces
        assert [v.decode() for v in f["replaces"][:]] == [first_stamp]


def test_inspect_cannot_tell_the_engines_apart(local, on_ray, tmp_path):
    cache, _ = on_ray

    def summary(cache_dir):
        described = json.loads(vlpcache("inspect", cache_dir, "--json", cwd=tmp_path).stdout)
        return {k: v for k, v in described.items() if k not in ("cache", "shards", "size_bytes")}

    assert summary(cache.cache_dir) == summary(local.cache_dir)
    provenance = set()
    for shard in [*cache.shard_paths, *local.shard_paths]:
        with h5py.File(shard, "r") as f:
            provenance.add(json.dumps({k: str(v) for k, v in f.attrs.items() if k != "committed"}, sort_keys=True))
    assert len(provenance) == 1  # every shard of both caches describes itself alike


def _stop_a_ray_extract(root: Path, cache_dir: Path, ray_address: str, signum: int) -> None:
    """Start (or resume) a ray extract, send it `signum` once it committed a shard more, wait for its actors
    to end."""
    driver = start_ray_extract_at_work(root, cache_dir, ray_address)
    try:
        actors = actor_pids(cache_dir)
        driver.send_signal(signum)
        _, stderr = driver.communicate(timeout=HANG_GUARD_S)
    finally:
        driver.kill()
    status, word = (130, "interrupted") if signum == signal.SIGINT else (143, "stopped by SIGTERM")
    assert driver.returncode == status and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == f"{word}; what was committed is kept, re-run the same command to resume"
    assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in actors))


def test_a_ray_extract_stopped_by_ctrl_c_sigterm_and_kill_9_is_finished_by_a_rerun_whose_killed_actor_ray_restarts(
        root, ray_address, local, tmp_path):
    """One cache, each run a re-run of the last: stopped by Ctrl-C, by SIGTERM (Ray's driver handler took it to exit
    with 15 and no word), by kill -9 of the driver; the fourth run finishes it though its detector actor is killed."""
    cache_dir = tmp_path / "cache"
    _stop_a_ray_extract(root, cache_dir, ray_address, signal.SIGINT)
    stopped_once = len(RegionCache(cache_dir))
    assert 0 < stopped_once < len(local), "the Ctrl-C should land mid-run"
    _stop_a_ray_extract(root, cache_dir, ray_address, signal.SIGTERM)
    stopped_twice = len(RegionCache(cache_dir))
    assert stopped_once < stopped_twice < len(local), "the SIGTERM should land mid-run"

    driver = start_ray_extract_at_work(root, cache_dir, ray_address)
    try:
        actors = actor_pids(cache_dir)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        driver.kill()
    # Ray ends a dead driver's actors; a re-run started while they still write would race with them
    assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in actors))
    committed = shards(cache_dir)
    partial = RegionCache(cache_dir)
    assert stopped_twice < len(partial) < len(local), "the kill -9 should land mid-run"

    driver = start_ray_extract_at_work(root, cache_dir, ray_address)
    try:
        (actor,) = actor_pids(cache_dir)
        committed_before_the_kill = len(RegionCache(cache_dir))
        os.kill(actor, signal.SIGKILL)
        _, stderr = driver.communicate(timeout=HANG_GUARD_S)
    finally:
        driver.kill()
    assert driver.returncode == 0, stderr
    assert f"{len(partial)} already cached" in stderr
    assert committed_before_the_kill < len(local), "the actor's kill should land mid-run"
    after = shards(cache_dir)
    assert {name: after.get(name) for name in committed} == committed  # not rewritten
    cache = RegionCache(cache_dir)
    assert_same_cache(cache, local)
    assert reasons(cache) == reasons(local)
    assert not list((cache_dir / SHARD_DIR).glob("*.tmp"))
    # the restarted actor keeps its id, hence its writer name: the last run's shards continue one sequence
    assert len({name.rsplit("-", 1)[0] for name in after if name not in committed}) == 1


def test_a_full_disk_stops_the_ray_engine_with_one_line_keeping_whole_shards(root, ray_address, local, tmp_path):
    """An actor's write that fails on a full disk: one line and status 2 as with the local engine, not
    Ray's wrapping of the actor's traceback; the committed shards are whole (the re-run that finishes the
    cache is the one after a kill -9, tested above)."""
    from conftest import Disk

    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("needs a tmpfs to fill (mount, as root): Ray's actors, started by its raylet, do not inherit a "
                    "file-size limit")
    try:
        cache_dir = folder / "cache"
        command = ("extract", root, "-o", cache_dir, *FRAMES, "--items-per-shard", 3, "--engine", "ray",
                   "--ray-address", ray_address)
        with Disk(folder, tmpfs=True).full(room=150_000):  # about two shards
            failed = subprocess.run([sys.executable, "-m", "vlpcache", *map(str, command)], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
        error = failed.stderr.strip().splitlines()[-1]
        assert error.startswith("error: ") and "cannot write (No space left on device (ENOSPC))" in error, error
        partial = RegionCache(cache_dir)
        assert 0 < len(partial) < len(local)
        for item_id in partial.ids:  # every committed item reads whole
            assert partial.get(item_id)["features"].shape == local.get(item_id)["features"].shape
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_without_ray_installed_the_ray_engine_is_one_line_naming_the_extra(tmp_path):
    blocked = ("import sys; sys.modules['ray'] = None; sys.argv = ['vlpcache', 'extract', '.', '--engine', 'ray']; "
               "from vlpcache.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", blocked], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ['error: the ray engine needs Ray Data: pip install "vlpcache[ray]" '
                                                  '(or pip install "ray[data]")']
    assert not (tmp_path / ".vlpcache").exists()


def free_address() -> str:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def test_an_extract_that_fails_before_doing_anything_leaves_no_cache_where_there_was_none(ray_address, msrvtt_dir,
                                                                                           tmp_path):
    folder = sorted((msrvtt_dir / "frames" / "val").iterdir())[0]
    shutil.copytree(folder, tmp_path / "data" / folder.name)
    result = vlpcache("extract", tmp_path / "data", "-o", tmp_path / "new" / "cache", "--engine", "ray", "--ray-address",
                      ray_address, "--device", "cuda", cwd=tmp_path, check=False)  # the module's cluster has no GPU
    assert result.returncode != 0 and "--device cuda: the Ray cluster has no GPU" in result.stderr, result.stderr
    assert not (tmp_path / "new").exists()  # it held an empty manifest.json, shards/, failures/, locks/


def test_weights_an_actor_cannot_load_are_one_line_and_leave_no_cache(ray_address, msrvtt_dir, models_dir, tmp_path):
    # raised while the actor was made, Ray kept only the error's text: about 230 lines of its tracebacks, exit 1, and
    # a cache folder the actor's writer lock kept (the local engine: one line, nothing left)
    folder = sorted((msrvtt_dir / "frames" / "val").iterdir())[0]
    shutil.copytree(folder, tmp_path / "data" / folder.name)
    shutil.copytree(models_dir, tmp_path / "models")
    trunk = tmp_path / "models" / "mobilenet_v2_imagenet_features.pth"
    trunk.write_bytes(trunk.read_bytes()[: 4 << 20])  # a download cut short
    result = vlpcache("extract", tmp_path / "data", "-o", tmp_path / "new" / "cache", "--models", tmp_path / "models",
                      "--engine", "ray", "--ray-address", ray_address, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {trunk}: ") and "vlpcache models fetch" in last, last
    assert not (tmp_path / "new").exists()


def test_an_address_where_no_ray_head_answers_is_one_line_and_writes_nothing(tmp_path, msrvtt_dir):
    address = free_address()
    result = vlpcache("extract", msrvtt_dir / "frames" / "val", "-o", tmp_path / "cache", "--engine", "ray",
                      "--ray-address", address, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --ray-address {address}: no Ray head node")
    assert not (tmp_path / "cache").exists()


def test_a_ray_address_from_the_environment_where_no_head_answers_is_one_line_naming_it(tmp_path, msrvtt_dir,
                                                                                      monkeypatch):
    address = free_address()
    monkeypatch.setenv("RAY_ADDRESS", address)  # Ray's own connect to a refused port waits for minutes, deaf to Ctrl-C
    result = vlpcache("extract", msrvtt_dir / "frames" / "val", "-o", tmp_path / "cache", "--engine", "ray",
                      cwd=tmp_path, check=False, timeout=120)  # a hang guard: Ray waited for good
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: RAY_ADDRESS={address}: no Ray head node answers "
                                                             "there (Connection refused); start one with `ray start "
                                                             "--head`, or unset RAY_ADDRESS")
    assert not (tmp_path / "cache").exists()


def test_a_ray_address_without_a_port_is_one_line(tmp_path, msrvtt_dir):
    result = vlpcache("extract", msrvtt_dir / "frames" / "val", "-o", tmp_path / "cache", "--engine", "ray",
                      "--ray-address", "127.0.0.1", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr  # was Ray's ValueError
    assert result.stderr.strip().splitlines() == [
        "error: --ray-address 127.0.0.1: not an address of the form HOST:PORT; give the head node's, as `ray start "
        "--head` printed it (e.g. 10.0.0.1:6379), or auto for the cluster on this machine"]


@pytest.mark.skipif(tuple(int(part) for part in ray.__version__.split(".")[:2]) < (2, 59),
                    reason="a local Ray instance turns on token authentication from Ray 2.59")
def test_a_driver_without_the_clusters_token_authentication_is_told_to_turn_it_on(ray_address, tmp_path, msrvtt_dir,
                                                                                 monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # a new shell: the module's instance has token authentication
    monkeypatch.setenv("RAY_NUM_REDIS_GET_RETRIES", "1")  # Ray's retries of the refused token: 20 s by default
    result = vlpcache("extract", msrvtt_dir / "frames" / "val", "-o", tmp_path / "cache", "--engine", "ray",
                      "--ray-address", ray_address, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --ray-address {ray_address}: the cluster wants token authentication, which this shell has not turned "
        "on: export RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN (README: "
        "--engine ray)")


def test_without_an_address_the_ray_engine_starts_a_local_instance_despite_a_dead_ray_start_cluster(tmp_path, msrvtt_dir,
                                                                                                   monkeypatch):
    """Ray's own default joins the cluster that `ray start` recorded in its temp folder; one whose head died
    leaves the record, and ray.init waited on it for good."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(free_address())
        monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        folders = sorted((msrvtt_dir / "frames" / "val").iterdir())[:2]
        for folder in folders:
            shutil.copytree(folder, tmp_path / "data" / folder.name)
        result = vlpcache("extract", tmp_path / "data", "-o", tmp_path / "cache", *FRAMES, "--engine", "ray",
                          cwd=tmp_path, check=False, timeout=300)  # a hang guard: Ray waited for good
        assert result.returncode == 0 and "extract: 2 done" in result.stderr, result.stderr
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_an_extract_waits_for_the_ray_actors_of_an_ended_driver(tmp_path, msrvtt_dir):
    """A driver killed on a login node that is lost: Ray ends its actors only once the cluster notices, and
    what they commit meanwhile a re-run would extract a second time (after a finished run too, the actors
    end a moment after their driver). An actor holds its writer's lock while it lives."""
    for folder in sorted((msrvtt_dir / "frames" / "val").iterdir())[:2]:
        shutil.copytree(folder, tmp_path / "data" / folder.name)
    cache_dir = tmp_path / "cache"
    (cache_dir / "locks").mkdir(parents=True)
    hold = ("import sys; from vlpcache.locks import WriterLock; WriterLock.take(sys.argv[1]); "
            "print('held', flush=True); sys.stdin.read()")  # until the test ends it, as Ray ends an actor
    actor = subprocess.Popen([sys.executable, "-c", hold, str(cache_dir / "locks" / "s0of1-ray-0123456789ab.lock")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    log = tmp_path / "stderr.txt"
    try:
        assert actor.stdout.readline() == "held\n"
        with open(log, "w") as stderr:
            extract = subprocess.Popen([sys.executable, "-m", "vlpcache", "extract", str(tmp_path / "data"), "-o",
                                        str(cache_dir), *map(str, FRAMES)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                       stderr=stderr)
            assert wait_until(lambda: "extract: waiting for" in log.read_text(), alive=extract), log.read_text()
            actor.stdin.close()  # the actor ends, and its lock with it
            assert extract.wait(timeout=HANG_GUARD_S) == 0, log.read_text()
    finally:
        actor.kill()
        actor.wait()
    said = log.read_text()
    assert f"extract: waiting for pid {actor.pid} on {socket.gethostname()} " in said
    assert said.index("extract: waiting for") < said.index("extract: 2 done")
    assert not (cache_dir / "locks" / "s0of1-ray-0123456789ab.lock").exists()


def test_ray_address_auto_with_the_record_of_a_dead_ray_start_cluster_is_one_line(tmp_path, msrvtt_dir, monkeypatch):
    record = tmp_path / "ray" / "ray_current_cluster"  # what `ray start` leaves when its head dies unstopped
    record.parent.mkdir()
    record.write_text(address := free_address())
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    result = vlpcache("extract", msrvtt_dir / "frames" / "val", "-o", tmp_path / "cache", "--engine", "ray",
                      "--ray-address", "auto", cwd=tmp_path, check=False, timeout=120)  # a hang guard: Ray waited on it for good
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: --ray-address auto ({address}, as `ray start` recorded it in {record}): no Ray head node answers there")
    assert not (tmp_path / "cache").exists()


def test_two_extracts_on_one_small_cluster_both_finish(ray_address, msrvtt_dir, tmp_path):
    """Two --shard jobs on the module's 2-CPU instance: each detector actor held a CPU, none was left to decode,
    and both waited for good."""
    for folder in sorted((msrvtt_dir / "frames" / "val").iterdir())[:4]:
        shutil.copytree(folder, tmp_path / "data" / folder.name)
    jobs = [subprocess.Popen([sys.executable, "-m", "vlpcache", "extract", str(tmp_path / "data"), "-o",
                              str(tmp_path / "cache"), *map(str, FRAMES), "--shard", f"{i}/2", "--engine", "ray",
                              "--ray-address", ray_address, "--quiet"],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        errors = [job.communicate(timeout=240)[1] for job in jobs]  # a hang guard: both waited for good
    finally:
        for job in jobs:
            job.kill()
    assert [job.returncode for job in jobs] == [0, 0], errors
    assert len(RegionCache(tmp_path / "cache")) == 4


def test_ctrl_c_pressed_again_and_again_stops_the_ray_engine_with_one_line(root, ray_address, tmp_path):
    """Each Ctrl-C raised again inside the stopping (a lock's release in Ray Data's queue, ray.shutdown, the
    interpreter's teardown): tracebacks and exit -2."""
    cache_dir = tmp_path / "cache"
    driver = start_ray_extract_at_work(root, cache_dir, ray_address)
    try:
        for _ in range(40):  # a key held down
            driver.send_signal(signal.SIGINT)
            time.sleep(0.001)
        _, stderr = driver.communicate(timeout=HANG_GUARD_S)
    finally:
        driver.kill()
    assert driver.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted; what was committed is kept, re-run the same command to resume"


def test_a_killed_detector_actor_records_each_failure_of_its_batch_once(ray_address, videos_dir, tmp_path):
    """The restarted actor redoes the killed one's batch: it recorded the batch's failures a second time."""
    root = tmp_path / "root"
    root.mkdir()
    for name in ("bikes.mp4", "cup.mp4", "tests_data_test.mp4"):
        shutil.copy(videos_dir / name, root / name)
        (root / f"empty_{name}").touch()  # fails at once, while the batch's videos are still to detect
    cache_dir = tmp_path / "cache"
    command = [root, "-o", cache_dir, "--frames", 8, "--items-per-shard", 6, "--engine", "ray", "--ray-address", ray_address]
    driver = subprocess.Popen([sys.executable, "-m", "vlpcache", "extract", *map(str, command)], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def recorded():
            return [line for log in (cache_dir / FAILURE_DIR).glob("s0of1-ray-*.jsonl") for line in log.read_text().splitlines()]

        assert wait_until(lambda: cache_dir.exists() and recorded(), alive=driver, poll_s=0.002), "no failure recorded"
        (actor,) = actor_pids(cache_dir)
        os.kill(actor, signal.SIGKILL)
        _, stderr = driver.communicate(timeout=HANG_GUARD_S)
    finally:
        driver.kill()
    assert driver.returncode == 0, stderr
    ids = [json.loads(line)["id"] for line in recorded()]
    assert sorted(ids) == [f"empty_{name}" for name in ("bikes", "cup", "tests_data_test")]  # each once
    assert "extract: 3 done, 0 already cached, 0 skipped (failed before; --retry-failed retries), 3 failed" in stderr
    described = json.loads(vlpcache("inspect", cache_dir, "--json", cwd=tmp_path).stdout)
    assert (described["items"], described["failures"]) == (3, 3)


def _children_named(pid: int, name: str) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, fields = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        if comm.split("(", 1)[1] == name and int(fields.split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_a_sigterm_to_the_whole_job_while_ray_starts_stops_the_driver_with_one_line(ray_address, msrvtt_dir, tmp_path,
                                                                                    monkeypatch):
    """`timeout`, or a shell's kill of a job, signals its whole process group, where the processes of the local
    instance that the driver starts were: they died as the driver connected (Ray's C++ then exited it with 1, or
    aborted it), or Ray's own handlers of those seconds exited it (1 or 15), each without our line."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for folder in sorted((msrvtt_dir / "frames" / "val").iterdir())[:2]:
        shutil.copytree(folder, tmp_path / "data" / folder.name)
    command = ["extract", tmp_path / "data", "-o", tmp_path / "cache", *FRAMES, "--engine", "ray"]
    driver = subprocess.Popen([sys.executable, "-m", "vlpcache", *map(str, command)], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        raylets = wait_until(lambda: _children_named(driver.pid, "raylet"), alive=driver)
        assert raylets, "no raylet started"
        # out of the job's group: ended under the driver as it connects, the raylet took it down (C++, no line)
        assert [os.getpgid(pid) for pid in raylets] != [driver.pid]
        os.killpg(driver.pid, signal.SIGTERM)  # the driver (and what else is in its group)
        _, stderr = driver.communicate(timeout=HANG_GUARD_S)
    finally:
        driver.kill()
    assert driver.returncode == 143 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "stopped by SIGTERM; what was committed is kept, re-run the same command to resume"
    again = vlpcache(*command, "--ray-address", ray_address, cwd=tmp_path)
    assert "extract: 2 done" in again.stderr and sorted(RegionCache(tmp_path / "cache").ids) == sorted(
        folder.name for folder in (tmp_path / "data").iterdir())


IMPORT_STOPPED = """
import importlib.abc, os, signal, sys
from vlpcache.extract import ray_engine
from vlpcache.interrupts import stops_remembered

class SigtermWhileImporting(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "ray.data":  # the signal lands inside the import, as a job's SIGTERM in its 3 s can
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None

sys.meta_path.insert(0, SigtermWhileImporting())
with stops_remembered():
    try:
        ray_engine.require_ray()
    except KeyboardInterrupt:
        print("stopped after the import:", "ray.data" in sys.modules)
    else:
        print("not stopped")
"""


def test_a_sigterm_while_ray_imports_stops_once_the_import_is_done():
    """Raised within the import, Python 3.11 may wrap the stop in another error (a traceback, exit 1): it waits."""
    out = subprocess.run([sys.executable, "-c", IMPORT_STOPPED], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.stdout.strip() == "stopped after the import: True", out.stdout + out.stderr[-2000:]


@pytest.mark.parametrize("items, decoders", [(1, 1), (17, 1), (17, 2), (40, 1), (100, 15), (1000, 1), (1000, 15),
                                             (10_000, 1), (5, 4)])
def test_decoding_tasks_are_few_on_small_jobs_and_many_enough_on_large_ones(items, decoders):
    """Each task starts a worker process (0.5 s): 8 tasks of 2 items each made a 17-item extract 12 s long here."""
    from vlpcache.extract.ray_engine import (DECODE_TASK_ITEMS, DECODE_TASK_MIN_ITEMS, DECODE_TASKS_PER_DECODER,
                                             decode_tasks)

    tasks = decode_tasks(items, decoders)
    assert 1 <= tasks <= items and -(-items // tasks) <= DECODE_TASK_ITEMS  # every item in a task of at most 64
    assert tasks >= min(items, decoders)  # each decoder has one
    if tasks > decoders:  # more tasks than decoders only for balance, of DECODE_TASK_MIN_ITEMS items at least
        assert items // tasks >= DECODE_TASK_MIN_ITEMS
    assert tasks >= min(DECODE_TASKS_PER_DECODER * decoders, items // DECODE_TASK_MIN_ITEMS)  # balance, items enough
