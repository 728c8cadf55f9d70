"""File-level durability and identity shared by every stage: fsync, whole-or-nothing replacement,
content hashes of weights and checkpoints (what provenance and index checks compare), the one line
that a failed write (disk full, I/O error, read-only filesystem) becomes, and the lines of a user's
text file (captions, queries): UTF-8, or UTF-16 or UTF-32 with its byte-order mark; bytes that are none of
these are one line naming the file and line."""

from __future__ import annotations

import codecs
import errno
import hashlib
import os
import re
import resource
import threading
from pathlib import Path
from typing import Callable

from vlpcache.errors import UserError, WriteFailed

# still images: an item each (or, all of a folder, the frames of one); captions may name their items by these names
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff"})
# photo formats read where a library for them is there (extract/sources.py's photo_extensions): AVIF by Pillow's own
# plugin (its wheels since 11.3), HEIC/HEIF (phones' photos) by pillow-heif (the heif extra)
PLUGIN_IMAGE_EXTENSIONS: frozenset[str] = frozenset({".avif", ".heic", ".heif"})

# what the libraries that write our files say instead of raising OSError: h5py (RuntimeError "... errno
# = 28, error message = ..."), safetensors (SafetensorError "... (os error 28)")
_ERRNO_IN_MESSAGE = re.compile(r"errno = (\d+)|os error (\d+)")
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG, errno.EACCES)


# files that say they are UTF-16 or UTF-32 by their byte-order mark: Excel's "Unicode Text" and Windows
# PowerShell's `>` write UTF-16 so (UTF-32's marks first: UTF-16LE's is the start of UTF-32LE's)
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
              (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def lies_under(path: str, roots) -> bool:
    """Whether `path` is one of `roots` or lies below one (paths as strings, made alike: absolute, normalised)."""
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether `a` and `b` are one file or folder (os.path.samefile); False where either is not there or unreadable."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def text_encoding(data: bytes) -> str:
    """The encoding of a text file's bytes: the UTF-32 or UTF-16 its byte-order mark names, else UTF-8
    ("utf-8-sig": a byte-order mark dropped)."""
    for bom, encoding in _WIDE_BOMS:
        if data.startswith(bom):
            return encoding
    return "utf-8-sig"


def decode_text(data: bytes) -> str:
    """A text file's bytes as text, in text_encoding's encoding; UnicodeDecodeError where they are not."""
    return data.decode(text_encoding(data))


def utf8_text(data: bytes, name: str) -> str:
    """decode_text of the bytes read from `name`; bytes that are not UTF-8 (nor UTF-16 or UTF-32 with its
    byte-order mark) are one UserError naming the file and the line."""
    try:
        return decode_text(data)
    except UnicodeDecodeError as err:
        encoding = text_encoding(data)
        if encoding != "utf-8-sig":
            raise UserError(f"{name}: not {encoding.upper()} text, though it starts with {encoding.upper()}'s byte-order "
                            f"mark ({err.reason} at byte {err.start}); save the file as UTF-8") from None
        start = err.start + (3 if data.startswith(codecs.BOM_UTF8) else 0)
        line = data.count(b"\n", 0, start) + 1
        raise UserError(f"{name}:{line}: not UTF-8 text (byte 0x{data[start]:02x}); save the file as UTF-8") from None


def read_utf8_text(path: Path) -> str:
    """utf8_text of a file."""
    return utf8_text(Path(path).read_bytes(), str(path))


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


OPEN_FILES_MOST = 1 << 20  # Linux's default nr_open: the most a soft limit may be raised to


def open_files_limit() -> int:
    """How many files this process may hold open: its soft limit, raised first to its hard limit where it is lower
    (a shell's 1,024 under systemd's 524,288), as a reader of a cache of many shards needs (1,024 of them kept
    open, and a DataLoader's pipes and shared memory besides)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    most = OPEN_FILES_MOST if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_MOST)
    if soft != resource.RLIM_INFINITY and soft < most:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (most, hard))
            soft = most
        except (ValueError, OSError):  # a container's seccomp, a hard limit nr_open refuses: the soft one stays
            pass
    return OPEN_FILES_MOST if soft == resource.RLIM_INFINITY else soft


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (after a rename, the directory entry must reach the disk too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# a file being written: ".<name>.<pid>-<thread>.tmp<suffix>" beside its final name (replace_together); the
# thread too, as a server's threads may write the same file at once (two requests for one thumbnail)
TEMPORARY_GLOB = ".*.*.tmp*"
# (path, write(tmp), suffix): `write` fills the temporary, whose name ends in `suffix` for writers that
# add one (np.save: ".npy"); or ([path, ...], write([tmp, ...]), suffix): one write fills several files, in one
# pass over what they hold (an index's embeddings and regions, index_rows.py)
FileWrite = tuple[Path, Callable[[Path], object], str] | tuple[list[Path], Callable[[list[Path]], object], str]


def _temporary(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp{suffix}")


def temporary_writer(tmp: Path, path: Path) -> int | None:
    """The process id in the name of `tmp`, a temporary of `path` (_temporary); None if it names none."""
    pid = tmp.name[len(path.name) + 2:].split(".", 1)[0].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def replace_atomically(path: Path, write: Callable[[Path], object], suffix: str = "") -> None:
    """Write `path` whole or not at all: `write(tmp)` fills a temporary beside it, which is fsynced and
    renamed over `path`, and the folder fsynced. A crash at any instant leaves the old file or the new
    one, never a part."""
    replace_together([(Path(path), write, suffix)])


def replace_together(files: list[FileWrite]) -> None:
    """Write several files whole, and none of them unless all could be written: each is filled under a
    temporary name and fsynced, and only then are they renamed into place, in order (the last one can
    be the file that commits the others), and their folders fsynced. A write that fails (disk full, I/O
    error) leaves every old file as it was and no temporary behind."""
    temporaries = []
    try:
        for paths, write, suffix in files:
            group = [Path(p) for p in paths] if isinstance(paths, list) else [Path(paths)]
            temporaries += [(_temporary(path, suffix), path) for path in group]
            filled = [tmp for tmp, _ in temporaries[-len(group):]]
            write(filled if isinstance(paths, list) else filled[0])
            for tmp in filled:
                fsync_path(tmp)
        for tmp, path in temporaries:
            os.replace(tmp, path)
        for folder in {path.parent for _, path in temporaries}:
            fsync_path(folder)
    except OSError as err:
        if err.filename is None and temporaries:  # a write to an open file (ENOSPC) names none: the file it was for
            err.filename = str(temporaries[-1][1])
        raise
    finally:
        for tmp, _ in temporaries:
            if tmp.exists():
                tmp.unlink()


def folder_bytes(folder: Path) -> int:
    """Bytes of every file below folder, or of the file itself when it is one (a file that vanishes
    while counted counts nothing)."""
    if not os.path.isdir(folder):
        try:
            return os.stat(folder).st_size
        except OSError:
            return 0
    total = 0
    for parent, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(parent, name)).st_size
            except OSError:
                pass
    return total


def remove_temporaries(folder: Path) -> None:
    """Remove what killed writers left of files being replaced in `folder`: only for a process that holds
    the folder's writer lock (locks.py), so that no temporary of a live writer is touched."""
    for tmp in Path(folder).glob(TEMPORARY_GLOB):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def create_atomically(path: Path, write: Callable[[Path], object]) -> bool:
    """Create `path` whole, unless it exists: when several processes race, the first one's file stays
    and the others leave it alone (False). Filled and fsynced under a temporary name, then hard-linked."""
    path = Path(path)
    tmp = _temporary(path)
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
    (torch.save writing to a file object raises a RuntimeError from it), or one its message quotes by
    number or by the system's words (faiss: "... write error ... (No space left on device)")."""
    while err is not None:
        if isinstance(getattr(err, "errno", None), int):
            return err.errno
        if match := _ERRNO_IN_MESSAGE.search(str(err)):
            return int(match.group(1) or match.group(2))
        for code in _WRITE_ERRNOS:
            if os.strerror(code) in str(err):
                return code
        err = err.__cause__ or err.__context__
    return None


def is_write_failure(err: BaseException) -> bool:
    """Whether `err`, raised while writing files, is the system's (disk full, I/O error...), not a bug."""
    return isinstance(err, OSError) or failure_errno(err) is not None


NOT_ALLOWED_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)  # this user may not write there (another's, read-only)


def not_allowed(err: BaseException) -> bool:
    """Whether a failed file operation was refused to this user (not a full disk or a fault)."""
    return isinstance(err, OSError) and err.errno in NOT_ALLOWED_ERRNOS


def may_write(path: Path) -> bool:
    """Whether this user may create files at `path`: in it, or where it is not there yet, in its nearest
    parent that is (it would be made there)."""
    path = Path(path).absolute()
    there = next((p for p in (path, *path.parents) if p.exists()), None)
    return there is not None and os.access(there, os.W_OK)


def read_only_reason(path: Path) -> str:
    """Why this user may not write at `path`, as a failed write would say it: "Read-only file system (EROFS)" on a
    read-only mount, else "Permission denied (EACCES)" (another user's folder, or one made read-only)."""
    try:
        mounted_read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        mounted_read_only = False
    code = errno.EROFS if mounted_read_only else errno.EACCES
    return f"{os.strerror(code)} ({errno.errorcode[code]})"


def system_reason(err: BaseException, path: Path | None = None) -> str:
    """The operating system's reason for a failed file operation, e.g. "No space left on device (ENOSPC)",
    also where a library reports it only in its message, or only as a short write (numpy: "6912 requested
    and 6112 written") on a disk that is now full; else the message's first line."""
    code = failure_errno(err)
    if code is None and path is not None and _disk_full(Path(path)):
        code = errno.ENOSPC
    if code is not None:
        return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _disk_full(path: Path) -> bool:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stat = os.statvfs(path)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < (1 << 20)


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def write_failure(path: Path, err: BaseException, then: str) -> WriteFailed:
    """One line for a write that failed: the path, the system's reason, and what became of the work."""
    reason = system_reason(err, path)  # "... (ENOSPC)": the errno's name ends it where one is known
    return WriteFailed(f"{path}: cannot write ({reason}); {then}", reason, reason.endswith(("(ENOSPC)", "(EDQUOT)")))


def current_umask() -> int:
    """The process's umask: from /proc on Linux, else read by setting it and setting it back (which a
    thread creating a file in between would see)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
