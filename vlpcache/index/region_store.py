"""Region embeddings of every indexed video, kept beside the FAISS index for re-ranking.

Re-ranking needs the region tokens of each FAISS candidate; storing them at index time means a
query never runs the region encoder (nor imports torch). Only real regions are stored (padding is
most of a T x N grid: a 2-frame clip in a T=8 cache fills a quarter of it), packed one video after
another:

    regions.npy           (total, E) float16   real region embeddings, video after video
    region_offsets.npy    (V + 1,) int64       video v owns rows offsets[v]:offsets[v+1]
    region_positions.npy  (total,) int32       each region's place r = t*N + n in its video's T x N grid

~0.5 KB per region at E=256: 15 MB for 1,000 videos of 30 regions.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vlpcache.files import FileWrite
from vlpcache.index.layout import REGION_OFFSETS_FILE as OFFSETS_FILE
from vlpcache.index.layout import REGION_POSITIONS_FILE as POSITIONS_FILE
from vlpcache.index.layout import REGIONS_FILE as EMBEDDINGS_FILE


class RegionStore:
    def __init__(self, embeddings: np.ndarray, offsets: np.ndarray, positions: np.ndarray):
        self.embeddings = embeddings  # (total, E) float16
        self.offsets = offsets  # (V + 1,) int64
        self.positions = positions  # (total,) int32

    @classmethod
    def empty(cls, dim: int) -> "RegionStore":
        return cls(np.zeros((0, dim), np.float16), np.zeros(1, np.int64), np.zeros(0, np.int32))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def append(self, regions: np.ndarray, region_mask: np.ndarray) -> None:
        """Add videos: regions (B, R, E) in their T*N frame-major layout, region_mask (B, R)."""
        video, position = np.nonzero(region_mask)  # (n,) each; row-major: video by video, positions ascending
        counts = np.bincount(video, minlength=len(region_mask))  # (B,) real regions per video
        self.embeddings = np.concatenate([self.embeddings, regions[video, position].astype(np.float16)])  # (total + n, E)
        self.positions = np.concatenate([self.positions, position.astype(np.int32)])
        self.offsets = np.concatenate([self.offsets, self.offsets[-1] + np.cumsum(counts)])

    def append_store(self, other: "RegionStore") -> None:
        self.embeddings = np.concatenate([self.embeddings, other.embeddings])
        self.positions = np.concatenate([self.positions, other.positions])
        self.offsets = np.concatenate([self.offsets, self.offsets[-1] + other.offsets[1:]])

    def take(self, rows: list[int]) -> "RegionStore":
        """A store of videos `rows` alone, in that order."""
        counts = self.offsets[np.asarray(rows, np.int64) + 1] - self.offsets[rows]
        picked = np.concatenate([np.arange(self.offsets[r], self.offsets[r + 1]) for r in rows] or [np.zeros(0, np.int64)])
        return RegionStore(np.asarray(self.embeddings[picked]), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                           np.asarray(self.positions[picked]))

    def gather(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Videos `rows`, padded to the most regions among them: regions (P, K, E) float32,
        mask (P, K) bool, positions (P, K) int32 (-1 for padding)."""
        counts = [int(self.offsets[r + 1] - self.offsets[r]) for r in rows]
        width = max(counts + [1])
        regions = np.zeros((len(rows), width, self.embeddings.shape[1]), np.float32)
        mask = np.zeros((len(rows), width), bool)
        positions = np.full((len(rows), width), -1, np.int32)
        for i, (r, count) in enumerate(zip(rows, counts)):
            start = self.offsets[r]
            regions[i, :count] = self.embeddings[start : start + count]
            mask[i, :count] = True
            positions[i, :count] = self.positions[start : start + count]
        return regions, mask, positions

    def files(self, index_dir: Path) -> list[FileWrite]:
        """The store's files in index_dir, for files.replace_together (VideoIndex.save)."""
        return [(Path(index_dir) / name, lambda tmp, a=array: np.save(tmp, a), ".npy")
                for name, array in ((EMBEDDINGS_FILE, self.embeddings), (POSITIONS_FILE, self.positions),
                                    (OFFSETS_FILE, self.offsets))]

    @classmethod
    def load(cls, index_dir: Path) -> "RegionStore":
        index_dir = Path(index_dir)
        # memory-mapped: a query reads the regions of its few candidates, not the whole file
        return cls(
            np.load(index_dir / EMBEDDINGS_FILE, mmap_mode="r"),
            np.load(index_dir / OFFSETS_FILE),
            np.load(index_dir / POSITIONS_FILE, mmap_mode="r"),
        )

    @staticmethod
    def exists(index_dir: Path) -> bool:
        return all(os.path.exists(Path(index_dir) / n) for n in (EMBEDDINGS_FILE, OFFSETS_FILE, POSITIONS_FILE))
