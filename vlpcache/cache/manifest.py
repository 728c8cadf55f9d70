"""What the reader and the writer both read of a cache directory: the manifest (settings every shard
shares), the failure logs (one JSON line per failed item), and whether a shard file agrees with the
settings."""

from __future__ import annotations

import json
from pathlib import Path

from vlpcache.cache.schema import FAILURE_DIR, MANIFEST_NAME, CacheSettings, shard_differences

# what reading a damaged HDF5 file raises
UNREADABLE = (OSError, KeyError, RuntimeError, ValueError, TypeError)


def read_manifest(cache_dir: Path) -> CacheSettings:
    return CacheSettings.read(
        Path(cache_dir) / MANIFEST_NAME,
        missing=f"{cache_dir}: not a vlpcache cache (no {MANIFEST_NAME}); run `vlpcache extract` first",
        what="manifest",
    )


def read_failures(cache_dir: Path) -> dict[str, dict]:
    """id -> last failure record, over every writer's log; partial lines from a crash are ignored."""
    failures: dict[str, dict] = {}
    for log in sorted((Path(cache_dir) / FAILURE_DIR).glob("*.jsonl")):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                failures[record["id"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return failures


def shard_file_differences(shard, settings: CacheSettings) -> list[str]:
    """schema.shard_differences of an open shard file (an h5py.File): empty when it agrees with settings."""
    shapes = {spec.name: shard[spec.name].shape for spec in settings.arrays() if spec.name in shard}
    return shard_differences(settings, shard.attrs, shapes)
