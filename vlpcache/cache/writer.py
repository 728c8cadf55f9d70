"""Write region features into a cache directory, crash-safely.

Each writer (one per `--shard i/n`) fills its own shard files under a temporary name and renames a
shard into place only after it is flushed, closed and fsynced, so a kill -9 at any instant loses at
most the shard in progress and never leaves a half-written file that a reader takes for whole.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import h5py
import numpy as np

from vlpcache import __version__
from vlpcache.cache.manifest import read_manifest
from vlpcache.cache.schema import (
    ARRAYS,
    FAILURE_DIR,
    MANIFEST_NAME,
    SHARD_DIR,
    SHARD_ITEMS,
    SHARD_SECONDS,
    SHARD_SUFFIX,
    STRINGS,
    TMP_SUFFIX,
    CacheSettings,
    outdated_schema,
    shard_attrs,
)
from vlpcache.errors import UserError
from vlpcache.files import fsync_path
from vlpcache.records import write_json

FEATURE_COMPRESSION = "lzf"  # fast; padded frames and regions are zeros and shrink to almost nothing


def open_cache_dir(cache_dir: Path, settings: CacheSettings) -> None:
    """Create the cache directory with its manifest, or check that an existing one matches settings."""
    cache_dir = Path(cache_dir)
    (cache_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    (cache_dir / FAILURE_DIR).mkdir(parents=True, exist_ok=True)
    # the first writer's manifest stays when several start at once; theirs is compared below
    write_json(cache_dir / MANIFEST_NAME, settings.to_json(), keep_existing=True)
    existing = read_manifest(cache_dir)
    outdated = outdated_schema(existing)
    if outdated:
        raise UserError(f"{cache_dir}: {outdated}; extract into a new directory (-o) or delete this one to re-extract")
    diffs = existing.differences(settings)
    if diffs:
        raise UserError(
            f"{cache_dir}: cache was made with different settings ({'; '.join(diffs)}); "
            "use another output directory (-o) or the same settings"
        )


class FailureLog:
    """Append-only JSON-lines record of failed items, fsynced per line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")
        # a kill -9 mid-line leaves a partial last line: end it so the next record starts clean
        if self._file.tell() > 0:
            self._file.seek(-1, os.SEEK_END)
            if self._file.read(1) != b"\n":
                self._file.write(b"\n")

    def record(self, item_id: str, path: str, reason: str) -> None:
        line = json.dumps({"id": item_id, "path": path, "reason": reason, "time": time.time()}, ensure_ascii=False)
        self._file.write(line.encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class ShardWriter:
    """Appends videos to the current temporary shard; `commit()` renames it into place.

    A shard is committed automatically after `max_items` videos or `max_seconds` of writing, so
    that a crash costs at most that much work.
    """

    def __init__(
        self,
        cache_dir: Path,
        settings: CacheSettings,
        writer_name: str = "s0of1",
        max_items: int = SHARD_ITEMS,
        max_seconds: float = SHARD_SECONDS,
    ):
        self.cache_dir = Path(cache_dir)
        self.settings = settings
        self.writer_name = writer_name
        self.max_items = max_items
        self.max_seconds = max_seconds
        open_cache_dir(self.cache_dir, settings)
        self.shard_dir = self.cache_dir / SHARD_DIR
        self.failures = FailureLog(self.cache_dir / FAILURE_DIR / f"{writer_name}.jsonl")
        self._remove_own_temporaries()
        self._file: h5py.File | None = None
        self._tmp_path: Path | None = None
        self._count = 0
        self._opened_at = 0.0
        self.committed_items = 0

    def _remove_own_temporaries(self) -> None:
        # a temporary shard of ours is the unfinished work of a killed run: resume redoes its items;
        # the pattern also takes those of writers named after us (`s0of1-ray-<actor>`: a Ray run's actors)
        for tmp in self.shard_dir.glob(f"{self.writer_name}-*{SHARD_SUFFIX}{TMP_SUFFIX}"):
            tmp.unlink()

    def _next_seq(self) -> int:
        pattern = re.compile(rf"^{re.escape(self.writer_name)}-(\d+){re.escape(SHARD_SUFFIX)}")
        seqs = [int(m.group(1)) for p in self.shard_dir.iterdir() if (m := pattern.match(p.name))]
        return max(seqs, default=-1) + 1

    def _open_shard(self) -> None:
        name = f"{self.writer_name}-{self._next_seq():05d}{SHARD_SUFFIX}"
        self._tmp_path = self.shard_dir / (name + TMP_SUFFIX)
        f = h5py.File(self._tmp_path, "w", libver="latest")
        for key, value in shard_attrs(self.settings, __version__).items():
            f.attrs[key] = value
        for spec in ARRAYS:
            shape = self.settings.shape_of(spec)
            f.create_dataset(
                spec.name,
                shape=(0, *shape),
                maxshape=(None, *shape),
                dtype=spec.dtype,
                chunks=(1, *shape) if shape else (1024,),  # one video per chunk
                compression=FEATURE_COMPRESSION if spec.name == "features" else None,
            )
        for name in STRINGS:
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"), chunks=(1024,))
        self._file = f
        self._count = 0
        self._opened_at = time.monotonic()

    def add(self, item_id: str, path: str, kind: str, arrays: dict[str, np.ndarray]) -> None:
        """Append one video; arrays are keyed by schema.ARRAYS names with the settings' shapes."""
        if self._file is None:
            self._open_shard()
        f, i = self._file, self._count
        for spec in ARRAYS:
            value = np.asarray(arrays[spec.name], dtype=spec.dtype)
            expected = self.settings.shape_of(spec)
            if value.shape != expected:
                raise ValueError(f"{item_id}: {spec.name} has shape {value.shape}, cache expects {expected}")
            ds = f[spec.name]
            ds.resize(i + 1, axis=0)
            ds[i] = value
        for name, value in zip(STRINGS, (item_id, path, kind)):
            ds = f[name]
            ds.resize(i + 1, axis=0)
            ds[i] = value
        self._count += 1
        if self._count >= self.max_items or time.monotonic() - self._opened_at >= self.max_seconds:
            self.commit()

    def commit(self) -> None:
        """Finish the current shard: flush, fsync, rename into place. No-op when nothing is pending."""
        if self._file is None:
            return
        for name in self._file:  # an add() interrupted half-way leaves a partial last row: drop it
            if self._file[name].shape[0] != self._count:
                self._file[name].resize(self._count, axis=0)
        self._file.attrs["complete"] = True
        self._file.flush()
        self._file.close()
        self._file = None
        fsync_path(self._tmp_path)
        final = self._tmp_path.with_name(self._tmp_path.name[: -len(TMP_SUFFIX)])
        os.replace(self._tmp_path, final)
        fsync_path(self.shard_dir)
        self.committed_items += self._count
        self._count = 0

    @property
    def pending_items(self) -> int:
        return self._count

    def record_failure(self, item_id: str, path: str, reason: str) -> None:
        self.failures.record(item_id, path, reason)

    def close(self) -> None:
        self.commit()
        self.failures.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
