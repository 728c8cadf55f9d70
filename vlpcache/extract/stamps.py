"""A source's stamp: what a cached item was extracted from, so that a video or a frame folder replaced
at the same path is noticed (extract redoes it; the page and inspect --render do not draw old boxes on
new frames).

    "1:<bytes>:<mtime_ns>:<names>:<digest>:<files>"
                        bytes and the newest modification time of the file (of a frame folder's frames: the
                        files extract reads, hidden files and other files beside them left out), a hash of
                        the frames' names ("" for a file), a hash of the first and last 64 KiB of each file,
                        and a hash of each frame's name, size and modification time ("" for a file)

Comparing costs a stat (a folder listing) while size, names and times agree; when only a time moved
(a copy that did not keep times, a `touch`), or frames of one folder swapped names (`mv` keeps each one's
time, so the newest and the set of names stay), the digest decides, so the same content is not extracted
again and other content under the same names is. Stamps written before the last field was kept (five
fields) are compared without it. Items cached before stamps were kept have "" and are never taken to have
changed. A file whose bytes changed within it while its size and time were put back is not noticed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from vlpcache.extract.sources import frame_files

STAMP_FORMAT = "1"
SAMPLE_BYTES = 64 * 1024  # hashed at each end of a file


def source_stamp(path: str | os.PathLike) -> str:
    """The stamp of a file or a frame folder as it is now; "" when it cannot be read."""
    try:
        size, mtime, names, files, each = _listing(Path(path))
        return f"{STAMP_FORMAT}:{size}:{mtime}:{names}:{_digest(files)}:{each}"
    except OSError:
        return ""


def stamp_known(stamp: str) -> bool:
    """Whether `stamp` is one source_changed can compare a source with (not "", not another format)."""
    parts = stamp.split(":")
    return len(parts) in (5, 6) and parts[0] == STAMP_FORMAT


def source_changed(stamp: str, path: str | os.PathLike) -> bool:
    """Whether the source at `path` is no longer what `stamp` recorded: False for an unknown stamp (""
    or another format); True for a source that is gone or unreadable."""
    parts = stamp.split(":")
    if not stamp_known(stamp):
        return False
    try:
        size, mtime, names, files, each = _listing(Path(path))
        if (str(size), names) != (parts[1], parts[3]):
            return True
        moved = str(mtime) != parts[2] or (len(parts) == 6 and each != parts[5])  # an older stamp has no `each`
        return moved and _digest(files) != parts[4]
    except OSError:
        return True


def replaced(cached: dict) -> bool:
    """Whether a cached item's source (the reader's dict: "path", "source") is there but no longer what it
    was extracted from: its frames are not the ones its boxes were found on. (A source that is gone
    fails to decode, and says so itself.)"""
    return source_changed(cached.get("source", ""), cached["path"]) and os.path.exists(cached["path"])


def _listing(path: Path) -> tuple[int, int, str, list[Path], str]:
    """(bytes, newest mtime in ns, a hash of the frames' names, the files the digest reads, a hash of each frame's
    name, size and mtime): of the file itself ("" for the last), or of a frame folder's frames."""
    if not path.is_dir():
        info = path.stat()
        return info.st_size, info.st_mtime_ns, "", [path], ""
    files = frame_files(path)
    infos = [f.stat() for f in files]
    names = hashlib.blake2b("\0".join(f.name for f in files).encode("utf-8", "surrogateescape"), digest_size=8)
    each = hashlib.blake2b("\0".join(f"{f.name}/{i.st_size}/{i.st_mtime_ns}" for f, i in zip(files, infos))
                           .encode("utf-8", "surrogateescape"), digest_size=8)
    return (sum(i.st_size for i in infos), max((i.st_mtime_ns for i in infos), default=0), names.hexdigest(), files,
            each.hexdigest())


def _digest(files: list[Path]) -> str:
    digest = hashlib.blake2b(digest_size=8)
    for path in files:
        with open(path, "rb") as f:
            digest.update(f.read(SAMPLE_BYTES))
            end = f.seek(0, os.SEEK_END)
            if end > SAMPLE_BYTES:
                f.seek(max(SAMPLE_BYTES, end - SAMPLE_BYTES))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()
