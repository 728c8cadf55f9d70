"""An item of another cache encoded as the index's items were (`Searcher.like_item`; `search --like FILE`, a
clip the collection does not hold): by the checkpoint the index was built with, the one whose embedding space
the index holds, not the run's newest."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from vlpcache.cache.reader import RegionCache
from vlpcache.errors import UserError
from vlpcache.index.build import check_run_reads_cache
from vlpcache.index.layout import IndexMeta
from vlpcache.model.run_layout import META_NAME, WEIGHTS_NAME, checkpoints
from vlpcache.records import read_optional_json
from vlpcache.report import printable


def index_checkpoint_dir(meta: IndexMeta, run_dir: Path | None) -> Path:
    """The checkpoint folder holding the weights an index was built with (its sha256): where the index recorded
    them, else among the checkpoints of the run searched with, or of the run the index recorded (a project
    moved or copied elsewhere); one clear error where none holds them."""
    recorded = Path(meta.checkpoint_path).parent if meta.checkpoint_path else None
    places = [recorded] if recorded is not None else []
    for run in dict.fromkeys(r for r in (run_dir, Path(meta.run_dir) if meta.run_dir else None) if r is not None):
        places += list(checkpoints(run).values())
    for place in places:
        stored = read_optional_json(place / META_NAME)
        if isinstance(stored, dict) and stored.get("sha256") == meta.checkpoint_sha256 and (place / WEIGHTS_NAME).is_file():
            return place
    where = f"run {printable(str(run_dir))}" if run_dir else "the run it names"
    raise UserError(f"the checkpoint the index was built with (sha256 {meta.checkpoint_sha256[:12]}, saved as "
                    f"{printable(meta.checkpoint_path or '?')}) is not in {where} any more: pass the run it was "
                    "trained in with --run, or `vlpcache index` the collection with the run's checkpoint now")


@functools.lru_cache(maxsize=1)  # a second --like FILE of one command loads nothing again
def index_checkpoint(checkpoint_dir: Path, sha256: str, device: str):
    """The video side of the run's model at `checkpoint_dir`, whose weights' sha256 is `sha256`."""
    from vlpcache.model.checkpoint import load_run

    run = load_run(checkpoint_dir.parent.parent, device=device, checkpoint=checkpoint_dir, video_only=True)
    if run.checkpoint_sha256 != sha256:
        raise UserError(f"{printable(str(checkpoint_dir))} is no longer the checkpoint the index was built with (it "
                        "was saved again since): run `vlpcache index` to index the collection with it")
    return run


def encode_item(meta: IndexMeta, cache: RegionCache, item_id: str, device: str, run=None,
                run_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(global embedding (E,), its real region embeddings (K, E)) of `cache`'s item as `vlpcache index` encodes
    the items of the index `meta` describes; `run`: that checkpoint already loaded (a search's torch query
    model), else its video side is loaded on `device`, found as index_checkpoint_dir finds it (`run_dir`: the
    run searched with)."""
    from vlpcache.devices import encoding_threads, resolve_device
    from vlpcache.model.retrieval import as_numpy, encode_videos

    if run is None or run.checkpoint_sha256 != meta.checkpoint_sha256:
        run = index_checkpoint(index_checkpoint_dir(meta, run_dir), meta.checkpoint_sha256, str(resolve_device(device)))
    device = next(run.model.parameters()).device
    check_run_reads_cache(run, cache)
    with encoding_threads():
        video = encode_videos(run.model, cache, [cache.index_of(item_id)], device, 1, regions=True, progress=False)
    return as_numpy(video.global_)[0], as_numpy(video.regions[0][video.region_mask[0]])
