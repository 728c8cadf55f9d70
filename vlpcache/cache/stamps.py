"""A source's stamp: what a cached item was extracted from, so that a video or a frame folder replaced
at the same path is noticed (extract redoes it; the page and inspect --render do not draw old boxes on
new frames).

    "1:<bytes>:<mtime_ns>:<digest>"   bytes and the newest modification time (of the file, or of a
                                      frame folder and its files), digest a hash of the file's first and
                                      last 64 KiB (of each file's, with its name, for a folder)

Comparing costs a stat while size and time agree; when only the time moved (a copy that did not keep
times, a `touch`), the digest decides, so the same content is not extracted again. Items cached before
stamps were kept have "" and are never taken to have changed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

STAMP_FORMAT = "1"
SAMPLE_BYTES = 64 * 1024  # hashed at each end of a file


def source_stamp(path: str | os.PathLike) -> str:
    """The stamp of a file or a frame folder as it is now; "" when it cannot be read."""
    try:
        size, mtime, files = _size_and_time(Path(path))
        return f"{STAMP_FORMAT}:{size}:{mtime}:{_digest(files)}"
    except OSError:
        return ""


def source_changed(stamp: str, path: str | os.PathLike) -> bool:
    """Whether the source at `path` is no longer what `stamp` recorded: False for an unknown stamp (""
    or another format); True for a source that is gone or unreadable."""
    parts = stamp.split(":")
    if len(parts) != 4 or parts[0] != STAMP_FORMAT:
        return False
    try:
        size, mtime, files = _size_and_time(Path(path))
        if str(size) != parts[1]:
            return True
        return str(mtime) != parts[2] and _digest(files) != parts[3]
    except OSError:
        return True


def _size_and_time(path: Path) -> tuple[int, int, list[tuple[str, Path]]]:
    """(bytes, newest mtime in ns, the (name, path) of each file the digest reads): the file itself, or
    a folder's regular files by name."""
    info = path.stat()
    if not path.is_dir():
        return info.st_size, info.st_mtime_ns, [("", path)]
    size, mtime, files = 0, info.st_mtime_ns, []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_file():
                stat = entry.stat()
                size += stat.st_size
                mtime = max(mtime, stat.st_mtime_ns)
                files.append((entry.name, Path(entry.path)))
    return size, mtime, sorted(files)


def _digest(files: list[tuple[str, Path]]) -> str:
    digest = hashlib.blake2b(digest_size=8)
    for name, path in files:
        digest.update(name.encode("utf-8", "surrogateescape") + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read(SAMPLE_BYTES))
            end = f.seek(0, os.SEEK_END)
            if end > SAMPLE_BYTES:
                f.seek(max(SAMPLE_BYTES, end - SAMPLE_BYTES))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()
