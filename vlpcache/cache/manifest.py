"""The small files of a cache directory that the reader and the writer both read: the manifest
(settings every shard shares) and the failure logs (one JSON line per failed item)."""

from __future__ import annotations

import json
from pathlib import Path

from vlpcache.cache.schema import FAILURE_DIR, MANIFEST_NAME, CacheSettings


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
