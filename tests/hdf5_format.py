"""The HDF5 format versions a file was written in, read from its bytes, and a file made unreadable for a version
reason (a layout message of a version no HDF5 knows, as HDF5 1.12 met HDF5 2.0's): what no h5py call reports or does.

Only version-2 object headers ("OHDR", HDF5 1.8's format and later, checksummed) are read: those of every file
written with a low bound of v110, as vlpcache writes them (schema.HDF5_FORMAT)."""

from __future__ import annotations

from pathlib import Path

LAYOUT_MESSAGE = 8  # the data layout message's type: its first byte is its version (3; 4 from HDF5 1.10; 5 from 2.0)
MASK = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & MASK


def lookup3(data: bytes) -> int:
    """Bob Jenkins' lookup3 hashlittle(data, len, 0): HDF5's checksum of its metadata (H5_checksum_lookup3)."""
    a = b = c = (0xDEADBEEF + len(data)) & MASK
    if not data:
        return c
    rest = len(data) - ((len(data) - 1) // 12) * 12  # the last block holds 1 to 12 bytes, added zero-padded
    padded = data + bytes(12 - rest)
    for start in range(0, len(padded), 12):
        a = (a + int.from_bytes(padded[start:start + 4], "little")) & MASK
        b = (b + int.from_bytes(padded[start + 4:start + 8], "little")) & MASK
        c = (c + int.from_bytes(padded[start + 8:start + 12], "little")) & MASK
        if start + 12 < len(padded):  # mix
            for x, y, z, k in ((0, 2, 1, 4), (1, 0, 2, 6), (2, 1, 0, 8), (0, 2, 1, 16), (1, 0, 2, 19), (2, 1, 0, 4)):
                v = [a, b, c]
                v[x] = ((v[x] - v[y]) & MASK) ^ _rot(v[y], k)
                v[y] = (v[y] + v[z]) & MASK
                a, b, c = v
    for x, y, k in ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14), (2, 1, 24)):  # final
        v = [a, b, c]
        v[x] = ((v[x] ^ v[y]) - _rot(v[y], k)) & MASK
        a, b, c = v
    return c


def _object_headers(data: bytes):
    """(start, end of its messages, start of its messages, flags) of each version-2 object header's first chunk,
    found by its signature and its checksum (which follows it: "OHDR" in an array's data is passed over)."""
    at = data.find(b"OHDR")
    while at >= 0:
        flags = data[at + 5]
        p = at + 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)  # times; attribute storage bounds
        width = 1 << (flags & 3)
        end = p + width + int.from_bytes(data[p:p + width], "little")
        if int.from_bytes(data[end:end + 4], "little") == lookup3(data[at:end]):
            yield at, end, p + width, flags
        at = data.find(b"OHDR", at + 4)


def _messages(data: bytes, start: int, end: int, flags: int):
    """(type, offset of its data) of each message of an object header chunk."""
    p = start
    while p + 4 <= end:
        kind, size = data[p], int.from_bytes(data[p + 1:p + 3], "little")
        p += 4 + (2 if flags & 0x04 else 0)  # type, size, flags; creation order where tracked
        yield kind, p
        p += size


def superblock_version(path: Path) -> int:
    return Path(path).read_bytes()[8]  # after the 8-byte signature


def layout_message_versions(path: Path) -> list[int]:
    """The version of each dataset's layout message, in the order of the file."""
    data = Path(path).read_bytes()
    return [data[at] for header, end, first, flags in _object_headers(data)
            for kind, at in _messages(data, first, end, flags) if kind == LAYOUT_MESSAGE]


def set_layout_message_versions(path: Path, version: int) -> int:
    """Write `version` into every layout message, each header's checksum made again: the file reads as written by
    an HDF5 of a newer format. How many were changed."""
    data = bytearray(Path(path).read_bytes())
    changed = 0
    for header, end, first, flags in list(_object_headers(bytes(data))):
        for kind, at in list(_messages(bytes(data), first, end, flags)):
            if kind == LAYOUT_MESSAGE:
                data[at] = version
                changed += 1
        data[end:end + 4] = lookup3(bytes(data[header:end])).to_bytes(4, "little")
    Path(path).write_bytes(bytes(data))
    return changed
