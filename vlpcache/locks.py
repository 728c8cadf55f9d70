"""One writer at a time per name: an advisory lock (`fcntl.flock`) on a small file.

The kernel releases the lock when its holder exits, by kill -9 too, so a crash never leaves a lock to
clear by hand, and a lock that can be taken proves that nobody is writing under that name: that is
when a writer may remove another writer's leftovers. The file records its holder (pid, host, since)
for the one line a refused writer prints. flock works across processes of one machine, and across
machines on an NFS mount through Linux's byte-range emulation.

A lock file is removed by its holder on release. A holder that died leaves its file behind; the next
writer takes it over (the kernel dropped the lock with the process).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_SUFFIX = ".lock"
PROC_LOCKS = "/proc/locks"  # the kernel's table of the locks held on this machine


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file records it."""

    pid: int
    host: str
    since: float

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} (since {time.strftime('%H:%M:%S', time.localtime(self.since))})"

    @property
    def elsewhere(self) -> bool:
        """Recorded by a process on another machine (a shared folder), which this one cannot look at."""
        return self.host != socket.gethostname()


def lock_held(path: Path) -> bool | None:
    """Whether some process on this machine holds the lock of `path` now, asked of the kernel's table of
    locks (/proc/locks) without taking the lock (where the table does not list it, of flock: a shared
    lock taken and let go at once); None where that table cannot tell (not Linux, no /proc).
    A holder on another machine of a shared folder is not in the table here.

    The table names a file by device and inode number; only the inode number is compared, since the
    device there is the file system's, which stat does not give for a btrfs subvolume. Another locked
    file of the same number on another file system would read as held: rare, and what the record said."""
    try:
        inode = os.stat(path).st_ino
        table = Path(PROC_LOCKS).read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # "1: FLOCK  ADVISORY  WRITE 12345 fe:00:5373972 0 EOF"; a waiter's line has "->" after the number
    listed = any(len(fields) > 5 and fields[1] != "->" and fields[5].rsplit(":", 1)[-1] == str(inode)
                 for fields in (line.split() for line in table.splitlines()))
    # the table hides the locks of processes outside this one's PID namespace (a container with pids of its
    # own, the same host name): a shared lock refused says so, across namespaces
    return listed or _shared_lock_refused(path) is True


def holder_active(path: Path, holder: Holder) -> bool:
    """Whether the recorded holder of the lock of `path` is still at work. On this machine the kernel's lock
    table decides where there is one: a recorded pid that exists while nobody holds the lock is another
    process that was given the pid later (a container restarted, pids wrapped), not the holder."""
    if holder.elsewhere:  # not in this machine's table: a lock that can be had is nobody's (a job there killed)
        return not _free_to_share(path)
    held = lock_held(path)
    return process_alive(holder.pid) if held is None else held


def _free_to_share(path: Path) -> bool:
    """Whether nobody holds the lock of `path`: the way to ask about a holder on another machine of a shared
    folder (flock reaches it there, through NFS's byte-range locks). False where that cannot tell (a file
    system that refuses locks): as recorded."""
    return _shared_lock_refused(path) is False


def _shared_lock_refused(path: Path) -> bool | None:
    """Whether a shared lock of `path` is refused now, because some process holds it, found by taking one and
    letting it go at once; None where that cannot tell (a file system that refuses locks, a file it may not
    open). No file: nobody holds it (its holder released it meanwhile)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:  # held
        return True
    except OSError:  # locks refused
        return None
    finally:
        os.close(fd)  # lets go of the shared lock


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def own_temporary_folder(prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary folder of this process (`<prefix><pid>@<host>-XXXX` in TMPDIR, removed when its `with` ends),
    once the folders of that prefix that processes of this machine no longer running left behind are removed: a
    `kill -9` of `search --like FILE` leaves its clip's cache, of `serve` an upload of up to 2 GiB. A folder of
    another user, of a live process, or of another machine or container sharing TMPDIR is left alone."""
    base, host = Path(tempfile.gettempdir()), socket.gethostname()
    try:
        left = [p for p in base.iterdir() if p.name.startswith(prefix)]
    except OSError:  # an unreadable TMPDIR: the folder below says why
        left = []
    for path in left:
        pid, _, rest = path.name[len(prefix):].partition("@")
        try:
            mine = path.is_dir() and not path.is_symlink() and path.stat().st_uid == os.getuid()
        except OSError:
            continue
        here = rest.rpartition("-")[0] == host
        if mine and here and pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}@{host}-")


def _open_lock_file(path: Path) -> int:
    """The lock file, created where absent with the permissions the umask leaves (a group-shared cache's writers,
    umask 002, may take each other's locks); one this user may not write (another user's, of mode 644: left by a
    kill, or by an older vlpcache) is opened to read, which flock takes all the same (its holder then goes unnamed)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


class WriterLock:
    """A held lock; `release()` (or leaving the `with` block, or the process ending) frees it."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    @classmethod
    def take(cls, path: Path, wait: bool = False, patience: float = 0.0) -> "WriterLock | None":
        """The lock of `path`, created if absent. When another process holds it: None, after trying again
        for `patience` seconds; with `wait`, block until it is free."""
        path = Path(path)
        give_up = time.monotonic() + patience
        while True:
            fd = _open_lock_file(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= give_up:
                    return None
                time.sleep(0.05)
                continue
            # the previous holder removes the file on release: a lock on the inode it removed guards nothing
            if _same_file(path, fd):
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        except OSError:  # a full disk: the lock holds all the same, only its holder goes unnamed
            pass
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # while still held, so nobody takes the lock of a file about to go
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "WriterLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(path: Path, fd: int) -> bool:
    try:
        on_disk, ours = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (on_disk.st_dev, on_disk.st_ino) == (ours.st_dev, ours.st_ino)


def holder_description(path: Path) -> str:
    """Who holds the lock of `path`, for a line to the person waiting or refused: "pid N on HOST (since
    HH:MM:SS)", or "another process" when the holder is not recorded."""
    holder = holder_of(path)
    return holder.describe() if holder else "another process"


def holder_of(path: Path) -> Holder | None:
    """Who holds the lock of `path`, as recorded; None when not recorded (yet) or unreadable."""
    for _ in range(20):  # the holder writes its record right after taking the lock
        try:
            record = json.loads(Path(path).read_text(encoding="utf-8"))
            return Holder(int(record["pid"]), str(record["host"]), float(record["since"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.01)
    return None
