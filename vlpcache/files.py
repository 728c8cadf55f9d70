"""File-level durability and identity shared by every stage: fsync, whole-or-nothing replacement,
content hashes of weights and checkpoints (what provenance and index checks compare), and the one line
that a failed write (disk full, I/O error, read-only filesystem) becomes."""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path
from typing import Callable

from vlpcache.errors import UserError

# what the libraries that write our files say instead of raising OSError: h5py (RuntimeError "... errno
# = 28, error message = ..."), safetensors (SafetensorError "... (os error 28)")
_ERRNO_IN_MESSAGE = re.compile(r"errno = (\d+)|os error (\d+)")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (after a rename, the directory entry must reach the disk too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: Path, write: Callable[[Path], object], suffix: str = "") -> None:
    """Write `path` whole or not at all: `write(tmp)` fills a temporary beside it, which is fsynced and
    renamed over `path`, and the folder fsynced. A crash at any instant leaves the old file or the new
    one, never a part. `suffix` ends the temporary's name, for writers that add one (np.save: ".npy")."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def create_atomically(path: Path, write: Callable[[Path], object]) -> bool:
    """Create `path` whole, unless it exists: when several processes race, the first one's file stays
    and the others leave it alone (False). Filled and fsynced under a temporary name, then hard-linked."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fsync_path(tmp)
        os.link(tmp, path)  # fails if the file exists: never replaces it
        fsync_path(path.parent)
        return True
    except FileExistsError:
        return False
    finally:
        if tmp.exists():
            tmp.unlink()


def failure_errno(err: BaseException) -> int | None:
    """The errno behind a failed file operation: the exception's own, that of the OSError it arose from
    (torch.save writing to a file object raises a RuntimeError from it), or one its message quotes."""
    while err is not None:
        if isinstance(getattr(err, "errno", None), int):
            return err.errno
        if match := _ERRNO_IN_MESSAGE.search(str(err)):
            return int(match.group(1) or match.group(2))
        err = err.__cause__ or err.__context__
    return None


def system_reason(err: BaseException) -> str:
    """The operating system's reason for a failed file operation, e.g. "No space left on device (ENOSPC)",
    also where a library reports it only in its message; else the message's first line."""
    code = failure_errno(err)
    if code is not None:
        return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def write_failure(path: Path, err: BaseException, then: str) -> UserError:
    """One line for a write that failed: the path, the system's reason, and what became of the work."""
    return UserError(f"{path}: cannot write ({system_reason(err)}); {then}")
