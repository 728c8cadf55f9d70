"""Videos encoded by a `vlpcache index` that has not finished, kept so that running it again resumes.

`vlpcache index` encodes the videos an index lacks ENCODE_CHUNK at a time, and writes each chunk whole
(ids, global embeddings, its region store) to <index>/encoding/part-NNNNNN.npz before starting the
next. The index files are written from the parts, one at a time (index_rows.py), once every video is
encoded, and then the folder goes. A Ctrl-C, a
kill -9 or a full disk in between keeps every finished part: the next run encodes only the videos no
part holds. An index directory belongs to one checkpoint and one set of cache settings
(layout.index_dir_for), so a part never holds another model's vectors; each video's vectors are kept
with the cache shard it was read from, so that an item extracted again since is encoded again.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from vlpcache.files import remove_temporaries, replace_atomically
from vlpcache.index.layout import PARTS_DIR
from vlpcache.index.region_store import RegionStore


@dataclass
class EncodedPart:
    """Encoded videos: their ids, global embeddings (n, E) float32, region store of n videos, and the
    keys of the cache shards they were read from (RegionCache.read_shards)."""

    ids: list[str]
    embeddings: np.ndarray
    regions: RegionStore | None  # None: an index without regions (made by an older vlpcache, or in memory by a test)
    shards: list[str]

    def save(self, path: Path) -> None:
        replace_atomically(Path(path), self._write, suffix=".npz")

    def _write(self, tmp: Path) -> None:
        np.savez(tmp, ids=np.frombuffer(json.dumps(self.ids).encode(), np.uint8), embeddings=self.embeddings,
                 regions=self.regions.embeddings, offsets=self.regions.offsets, positions=self.regions.positions,
                 shards=np.frombuffer(json.dumps(self.shards).encode(), np.uint8))

    @classmethod
    def load(cls, path: Path) -> "EncodedPart":
        with np.load(path) as data:
            ids = json.loads(data["ids"].tobytes())
            shards = json.loads(data["shards"].tobytes()) if "shards" in data else [""] * len(ids)  # older: unknown
            return cls(ids, data["embeddings"], RegionStore(data["regions"], data["offsets"], data["positions"]), shards)

    @property
    def region_counts(self) -> np.ndarray:  # (n,) int64; a part is a source of rows too (index_rows.RowSource)
        return np.diff(self.regions.offsets) if self.regions is not None else np.zeros(len(self.ids), np.int64)

    def chunks(self) -> Iterator["EncodedPart"]:
        yield self

    def embedding_blocks(self) -> Iterator[np.ndarray]:
        yield self.embeddings

    def select(self, keep: np.ndarray) -> "EncodedPart":
        """The videos where `keep` (n,) bool is true, in their order."""
        counts = np.diff(self.regions.offsets)  # (n,) regions of each video
        region_keep = np.repeat(keep, counts)  # (total,)
        regions = RegionStore(self.regions.embeddings[region_keep],
                              np.concatenate([[0], np.cumsum(counts[keep])]).astype(np.int64),
                              self.regions.positions[region_keep])
        return EncodedPart([i for i, k in zip(self.ids, keep) if k], self.embeddings[keep], regions,
                           [s for s, k in zip(self.shards, keep) if k])


@dataclass
class KeptPart:
    """The videos of a kept part that the index takes (`keep`), read from its file only when written into the index
    (index_rows.RowSource): an index run holds one part at a time, not every video it encoded."""

    path: Path
    keep: np.ndarray  # (n,) bool, over the part's videos
    ids: list[str]  # those kept
    region_counts: np.ndarray  # (len(ids),) int64

    @classmethod
    def of(cls, path: Path, part: EncodedPart, keep: np.ndarray) -> "KeptPart":
        return cls(Path(path), keep, [i for i, k in zip(part.ids, keep) if k], np.diff(part.regions.offsets)[keep])

    def chunks(self) -> Iterator[EncodedPart]:
        part = EncodedPart.load(self.path)
        yield part if self.keep.all() else part.select(self.keep)

    def embedding_blocks(self) -> Iterator[np.ndarray]:
        with np.load(self.path) as data:  # the embeddings alone: their regions are not read
            yield data["embeddings"][self.keep]


class EncodedParts:
    """The parts folder of one index directory."""

    def __init__(self, index_dir: Path):
        self.folder = Path(index_dir) / PARTS_DIR

    def paths(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.npz"))

    def load(self, wanted: dict[str, str]) -> list[KeptPart]:
        """The kept parts, each cut to the videos in `wanted` (id -> the key of the cache shard it is read
        from now) read from that shard (the index may hold some already, the cache may no longer have
        them, or have extracted them again), leftovers of killed writes removed; unreadable parts are left
        out (their videos are encoded again)."""
        if not self.folder.is_dir():
            return []
        remove_temporaries(self.folder)
        parts, seen = [], set()
        for path in self.paths():
            try:
                part = EncodedPart.load(path)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                path.unlink(missing_ok=True)
                continue
            keep = np.array([wanted.get(i) == s and i not in seen for i, s in zip(part.ids, part.shards)], bool)
            seen.update(i for i, k in zip(part.ids, keep) if k)
            if keep.any():
                parts.append(KeptPart.of(path, part, keep))
        return parts

    def add(self, part: EncodedPart) -> KeptPart:
        self.folder.mkdir(parents=True, exist_ok=True)
        numbers = [int(p.stem[5:]) for p in self.paths() if p.stem[5:].isdigit()]
        path = self.folder / f"part-{max(numbers, default=-1) + 1:06d}.npz"
        part.save(path)
        return KeptPart.of(path, part, np.ones(len(part.ids), bool))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
