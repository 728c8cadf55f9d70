"""Shared fixtures: the real data in ../shared (or $VLPCACHE_SHARED), skipped with a reason where absent."""

import contextlib
import errno
import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VLPCACHE_SHARED", REPO.parent / "shared")).resolve()

# tests (and the CLI subprocesses they start) use the offline weights in shared/models and never
# download weights: the tests of fetching lift this and point downloads at a server on 127.0.0.1
if (SHARED / "models").exists():
    os.environ.setdefault("VLPCACHE_MODELS", str(SHARED / "models"))
os.environ.setdefault("VLPCACHE_OFFLINE", "1")
# one thread for torch, faiss and MKL in every test process and the commands they start: the README's
# command runs two test processes (pytest-xdist) on the machine's 2 cores, and two processes each spinning
# two OpenMP threads made the suite slower than one process alone (BENCHMARKS.md, "The suite")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# the files that take longest, longest first (seconds in one of two test processes, 2026-12-07): pytest-xdist gives each
# test process a whole file at a time, and by default the files with the most tests first, which started the Ray
# engine's 25 tests (about 300 s) late, while the other process had run out of files
LONGEST_FIRST = ("test_ray_engine", "test_pretrain", "test_faults", "test_search", "test_like_outside", "test_extract",
                 "test_weights", "test_serve", "test_vg", "test_cache", "test_sampling")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist 3.7 and later: keep the order set below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Files in LONGEST_FIRST order, then the others as collected; each file's tests in their own order."""
    def rank(item) -> int:
        name = item.path.stem
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep pytest's order


@pytest.fixture(scope="session", autouse=True)
def _session_workspace(tmp_path_factory):
    """Module and session fixtures (which run before any test's own workspace is set) write here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLPCACHE_WORKSPACE", str(tmp_path_factory.mktemp("session-workspace") / ".vlpcache"))
        yield


@pytest.fixture(autouse=True)
def _own_workspace(tmp_path_factory, monkeypatch):
    """Every test has a workspace of its own: nothing a test or the commands it starts write by default
    (roots.json, caches, runs, indexes) reaches the user's `.vlpcache/` or another test's."""
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path_factory.mktemp("workspace") / ".vlpcache"))


START_METHODS = ["inherited", "forkserver"]  # the interpreter's own default, and Python 3.14's on Linux


@pytest.fixture(params=START_METHODS)
def start_method(request, tmp_path_factory, monkeypatch) -> str:
    """The start method of multiprocessing in the commands a test starts: the interpreter's own ("inherited":
    fork on Linux up to Python 3.13), or forkserver, Python 3.14's default on Linux, set by a sitecustomize that
    every Python started with this PYTHONPATH runs first."""
    if request.param == "forkserver":
        site = tmp_path_factory.mktemp("forkserver-site")
        (site / "sitecustomize.py").write_text('import multiprocessing\nmultiprocessing.set_start_method("forkserver", '
                                               'force=True)\n')
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    return request.param


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set VLPCACHE_SHARED to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return _need(SHARED / "models")


@pytest.fixture(scope="session")
def videos_dir() -> Path:
    return _need(SHARED / "data" / "videos")


@pytest.fixture(scope="session")
def msrvtt_dir() -> Path:
    return _need(SHARED / "data" / "msrvtt")


@pytest.fixture(scope="session")
def flickr_dir() -> Path:
    return _need(SHARED / "data" / "flickr8k")


@pytest.fixture
def unreadable(monkeypatch):
    """make(path): take every permission from a file or folder (chmod 0). Root reads whatever the
    permissions say, so where the tests run as root the answers the system gives everyone else are
    given for that path where our code asks: os.access says no, os.scandir raises PermissionError."""
    locked = []

    def make(path: Path) -> Path:
        path.chmod(0)
        locked.append(path)
        if os.geteuid() == 0 and len(locked) == 1:
            access, scandir = os.access, os.scandir

            def denied(p) -> bool:
                return isinstance(p, (str, os.PathLike)) and any(os.fspath(p) == os.fspath(x) for x in locked)

            def refused_access(p, mode, *args, **kwargs):
                return False if denied(p) and mode != os.F_OK else access(p, mode, *args, **kwargs)

            def refused_scandir(p="."):
                if denied(p):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(p))
                return scandir(p)

            monkeypatch.setattr(os, "access", refused_access)
            monkeypatch.setattr(os, "scandir", refused_scandir)
        return path

    yield make
    for path in locked:
        path.chmod(0o755)  # so that pytest can remove its temporary folders


@pytest.fixture
def read_only():
    """make(folder): make a folder and all below it read-only, as a shared, finished cache or workspace is to its
    readers: chmod -R a-w where the tests run as another user than root, else (root writes whatever the modes say)
    a read-only bind mount of it onto itself; skipped where neither can be had."""
    made = []

    def make(folder: Path) -> Path:
        if os.geteuid() != 0:
            subprocess.run(["chmod", "-R", "a-w", str(folder)], check=True)
        elif (subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode
              or subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True).returncode):
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
            pytest.skip("cannot make a folder read-only here (root, and no read-only bind mount)")
        made.append(folder)
        return folder

    yield make
    for folder in made:
        if os.geteuid() != 0:
            subprocess.run(["chmod", "-R", "u+w", str(folder)], check=False)  # so that pytest can remove it
        else:
            subprocess.run(["umount", "-l", str(folder)], check=False)


# ---------------------------------------------------------------- full disks


class Disk:
    """A folder whose writes can be made to fail: a small tmpfs where this machine lets us mount one (as root),
    else a limit on the size of any file this process and its children write (RLIMIT_FSIZE: the write that
    passes it fails with EFBIG), so that the same code paths fail on any Linux machine;
    VLPCACHE_FAULT_DISK=file-size-limit takes the second way where the first would work."""

    def __init__(self, folder: Path, tmpfs: bool):
        self.folder, self.tmpfs = folder, tmpfs

    @contextlib.contextmanager
    def full(self, room: int):
        """Writes fail once about `room` more bytes are written (tmpfs), or once a file passes `room` bytes."""
        if self.tmpfs:
            ballast = self.folder / "ballast"
            stat = os.statvfs(self.folder)
            with open(ballast, "wb") as f:
                f.truncate(0)
                f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - room))
            try:
                yield
            finally:
                ballast.unlink()
        else:
            previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (room, hard))  # children started now inherit it
            try:
                yield
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
                signal.signal(signal.SIGXFSZ, previous_handler)


@pytest.fixture
def disk(tmp_path) -> Disk:
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = os.environ.get("VLPCACHE_FAULT_DISK") != "file-size-limit" and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(folder)], capture_output=True).returncode == 0
    yield Disk(folder, tmpfs=mounted)
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)
