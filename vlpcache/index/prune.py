"""`vlpcache index --prune`: remove the indexes of an index root that nothing can load any more.

An index is loaded only for a checkpoint that exists (layout.index_dir_for keys it by the checkpoint's
sha256), and pretraining removes a run's older checkpoints as new ones land, so every re-training
leaves an index (embeddings, region store, the ONNX query model: 121 MB for MSR-VTT's 4,351
videos) that no command will open again. An index is stale when no run holds a checkpoint with its
sha256: neither the run it records (index.json's run_dir), nor a run of the workspace, nor the run
being indexed. Indexes of the same checkpoint over caches of other settings are not stale (those
caches may still be searched). A folder of an index without index.json (its first build stopped: kept parts,
parts.py; or the thumbnails an older `serve` of a pruned index kept there) is stale when no run of the
workspace, nor the run being indexed, holds its checkpoint, which its name holds; only a folder named as
index_key names them, or holding kept parts, and holding nothing but an index's files (layout.INDEX_ENTRIES):
a folder of the user's in the index root is never touched.

Each stale index is removed under its own lock (an index being written is left alone, saying so):
renamed to `.pruned-<name>` in one step, then deleted, so a kill -9 halfway leaves a folder no
command reads as an index and the next prune finishes deleting.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

from vlpcache.files import TEMPORARY_GLOB, folder_bytes
from vlpcache.index.layout import INDEX_ENTRIES, INDEX_FOLDER_NAME, LOCK_FILE, META_FILE, PARTS_DIR, other_indexes
from vlpcache.locks import WriterLock
from vlpcache.model.run_layout import META_NAME, checkpoints
from vlpcache.records import read_optional_json
from vlpcache.report import Say, human_size

PRUNED_PREFIX = ".pruned-"


def checkpoint_sha256s(run_dir: Path) -> set[str]:
    """sha256 of every complete checkpoint of a run, as their meta.json record it."""
    found = set()
    for checkpoint in checkpoints(run_dir).values():
        meta = read_optional_json(checkpoint / META_NAME)
        if isinstance(meta, dict) and meta.get("sha256"):
            found.add(meta["sha256"])
    return found


def stale_indexes(root: Path, keep: Path, run_dirs: list[Path]) -> list[Path]:
    """The indexes in root's subfolders, besides keep, whose checkpoint no run holds any more."""
    known = {}  # run dir -> its checkpoints' sha256s, read once

    def held_by(run_dir: Path) -> set[str]:
        if run_dir not in known:
            known[run_dir] = checkpoint_sha256s(run_dir) if run_dir.is_dir() else set()
        return known[run_dir]

    held = set().union(*(held_by(Path(r)) for r in run_dirs))
    stale = []
    for index_dir in other_indexes(root, keep):
        if index_dir == Path(root):  # an index kept in the root itself is never removed with the root
            continue
        meta = read_optional_json(index_dir / META_FILE)
        if not isinstance(meta, dict):
            continue  # unreadable: say nothing, touch nothing (load names the problem)
        sha = meta.get("checkpoint_sha256")
        if sha in held or (meta.get("run_dir") and sha in held_by(Path(meta["run_dir"]))):
            continue
        stale.append(index_dir)
    # an index folder without index.json (a first build stopped, what a serve kept of a pruned index's thumbnails):
    # its name holds its checkpoint
    held_prefixes = {sha[:16] for sha in held}
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.is_symlink()) if Path(root).is_dir() else []
    for index_dir in folders:
        if (index_dir != Path(keep) and not (index_dir / META_FILE).exists() and index_leftover(index_dir)
                and index_dir.name.split("-")[0] not in held_prefixes):
            stale.append(index_dir)
    return stale


def index_leftover(folder: Path) -> bool:
    """Whether `folder`, holding no index.json, is what is left of an index: named as one (layout.index_key) or
    holding kept parts, and holding nothing an index does not (a folder of the user's is never one)."""
    if folder.name.startswith(PRUNED_PREFIX) or not (INDEX_FOLDER_NAME.fullmatch(folder.name)
                                                     or (folder / PARTS_DIR).is_dir()):
        return False
    try:
        return all(entry in INDEX_ENTRIES or fnmatch.fnmatch(entry, TEMPORARY_GLOB) for entry in os.listdir(folder))
    except OSError:
        return False


def prune_indexes(root: Path, keep: Path, run_dirs: list[Path], say: Say) -> list[Path]:
    """Remove root's stale indexes (and what an interrupted prune left); returns those removed."""
    root = Path(root)
    for leftover in root.glob(f"{PRUNED_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    removed, freed = [], 0
    for index_dir in stale_indexes(root, keep, run_dirs):
        lock = WriterLock.take(index_dir / LOCK_FILE)
        if lock is None:
            say(f"prune: {index_dir} is being written by another process; left as it is")
            continue
        with lock:
            size = folder_bytes(index_dir)
            doomed = index_dir.with_name(PRUNED_PREFIX + index_dir.name)
            index_dir.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(index_dir)
        freed += size
    if removed:
        say(f"prune: removed {len(removed)} index(es) of checkpoints no run holds any more, {human_size(freed)} "
            f"({', '.join(p.name for p in removed)})")
    else:
        say(f"prune: nothing to remove: every index in {root} belongs to a checkpoint a run still holds")
    return removed
