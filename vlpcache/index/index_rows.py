"""The rows of an index being written, read a chunk at a time, so that writing an index never holds them all.

`vlpcache index` writes an index from sources of rows, in order: the rows it keeps of the index there before
(IndexedRows: less the items dropped from the cache or extracted again), then the videos it encoded, a kept part
each (parts.KeptPart). The index's embeddings and region store are written from them a chunk at a time into their
.npy files (NpyWriter, one pass: row_files), and its FAISS index is trained on a sample and filled a block at a time
(faiss_index.Vectors): a write holds the FAISS index and a chunk, never the region store (4 KB a video of 8 regions
at E=256, 40 KB of 80: 40 GB at a million videos) nor a second copy of the embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from vlpcache.files import FileWrite
from vlpcache.index.layout import EMBEDDINGS_FILE, REGION_OFFSETS_FILE, REGION_POSITIONS_FILE, REGIONS_FILE
from vlpcache.index.parts import EncodedPart
from vlpcache.index.region_store import RegionStore

READ_ROWS = 8192  # rows of the index there before read at a time (8 MB of embeddings at 256-d, and their regions)


class RowSource(Protocol):
    """Rows of the index being written: their ids, each one's count of regions, and their vectors a chunk at a time."""

    ids: list[str]
    region_counts: np.ndarray  # (n,) int64

    def chunks(self) -> Iterator[EncodedPart]: ...  # every row, in order, with its regions

    def embedding_blocks(self) -> Iterator[np.ndarray]: ...  # (n_i, E) float32 blocks of every row, in order


@dataclass
class IndexedRows:
    """Rows `rows` (ascending) of an index: of its files in `folder`, each chunk's read from the files mapped anew
    (the pages read leave the process with it), or of its arrays in memory (folder None)."""

    embeddings: np.ndarray  # (V, E) float32 of the whole index
    regions: RegionStore | None
    rows: np.ndarray  # (n,) int64
    ids: list[str]  # of `rows`
    folder: Path | None = None

    @property
    def region_counts(self) -> np.ndarray:
        if self.regions is None:
            return np.zeros(len(self.rows), np.int64)
        return np.diff(self.regions.offsets)[self.rows]

    def chunks(self) -> Iterator[EncodedPart]:
        for start in range(0, len(self.rows), READ_ROWS):
            rows = self.rows[start : start + READ_ROWS]
            embeddings, regions = self._arrays()
            yield EncodedPart(self.ids[start : start + len(rows)], np.asarray(embeddings[rows], np.float32),
                              regions.take(rows.tolist()) if regions is not None else None, [""] * len(rows))

    def embedding_blocks(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.rows), READ_ROWS):
            yield np.asarray(self._arrays(regions=False)[0][self.rows[start : start + READ_ROWS]], np.float32)

    def _arrays(self, regions: bool = True) -> tuple[np.ndarray, RegionStore | None]:
        if self.folder is None:
            return self.embeddings, self.regions
        store = None
        if regions and self.regions is not None:
            store = RegionStore(np.load(self.folder / REGIONS_FILE, mmap_mode="r"), self.regions.offsets,
                                np.load(self.folder / REGION_POSITIONS_FILE, mmap_mode="r"))
        return np.load(self.folder / EMBEDDINGS_FILE, mmap_mode="r"), store


class NpyWriter:
    """A .npy file of a known shape written a block of rows at a time; its bytes are np.save's of the whole array."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype):
        self.shape, self.dtype, self.rows = tuple(int(n) for n in shape), np.dtype(dtype), 0
        self.file = open(path, "wb")
        np.lib.format.write_array_header_1_0(self.file, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                         "fortran_order": False, "shape": self.shape})

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, self.dtype)
        if block.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.file.name}: rows of shape {block.shape[1:]}, not {self.shape[1:]}")
        self.file.write(block.data)
        self.rows += len(block)

    def close(self) -> None:
        self.file.close()
        if self.rows != self.shape[0]:  # a source gave other rows than it counted: never a file of another shape
            raise ValueError(f"{self.file.name}: {self.rows} rows written, not {self.shape[0]}")


def row_files(index_dir: Path, sources: list[RowSource], dim: int, regions: bool) -> FileWrite:
    """embeddings.npy and (with `regions`) the region store's files of the rows of `sources`, filled in one pass over
    them, for files.replace_together."""
    counts = np.concatenate([np.zeros(0, np.int64), *(s.region_counts for s in sources)])  # (V,)
    names = [EMBEDDINGS_FILE, *([REGIONS_FILE, REGION_POSITIONS_FILE, REGION_OFFSETS_FILE] if regions else [])]

    def write(tmps: list[Path]) -> None:
        writers = [NpyWriter(tmps[0], (len(counts), dim), np.float32)]
        if regions:
            writers += [NpyWriter(tmps[1], (counts.sum(), dim), np.float16), NpyWriter(tmps[2], (counts.sum(),), np.int32)]
        try:
            for source in sources:
                for chunk in source.chunks():
                    writers[0].write(chunk.embeddings)
                    if regions:
                        writers[1].write(chunk.regions.embeddings)
                        writers[2].write(chunk.regions.positions)
        finally:
            for writer in writers:
                writer.file.close()
        for writer in writers:
            writer.close()
        if regions:
            np.save(tmps[3], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))  # (V + 1,)

    return [Path(index_dir) / name for name in names], write, ".npy"
