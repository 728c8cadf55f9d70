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
from vlpcache.report import printable


@functools.lru_cache(maxsize=1)  # a second --like FILE of one command loads nothing again
def index_checkpoint(run_dir: str, checkpoint_path: str, sha256: str, device: str):
    """The run's model at the checkpoint an index was built with, or one clear error where it is gone."""
    from vlpcache.model.checkpoint import load_run

    if not run_dir or not Path(checkpoint_path).is_file():
        raise UserError(f"the index was built with {printable(checkpoint_path or 'a checkpoint it does not name')}, which "
                        "is no longer there: run `vlpcache index` to index the collection with the run's checkpoint now")
    run = load_run(run_dir, device=device, checkpoint=Path(checkpoint_path).parent, video_only=True)
    if run.checkpoint_sha256 != sha256:
        raise UserError(f"{printable(checkpoint_path)} is no longer the checkpoint the index was built with (it was "
                        "saved again since): run `vlpcache index` to index the collection with it")
    return run


def encode_item(meta: IndexMeta, cache: RegionCache, item_id: str, device: str, run=None) -> tuple[np.ndarray, np.ndarray]:
    """(global embedding (E,), its real region embeddings (K, E)) of `cache`'s item as `vlpcache index` encodes
    the items of the index `meta` describes; `run`: that checkpoint already loaded (a search's torch query
    model), else it is loaded on `device`."""
    from vlpcache.devices import resolve_device
    from vlpcache.model.retrieval import as_numpy, encode_videos

    if run is None or run.checkpoint_sha256 != meta.checkpoint_sha256:
        device = resolve_device(device)
        run = index_checkpoint(meta.run_dir, meta.checkpoint_path, meta.checkpoint_sha256, str(device))
    device = next(run.model.parameters()).device
    check_run_reads_cache(run, cache)
    video = encode_videos(run.model, cache, [cache.index_of(item_id)], device, 1, regions=True, progress=False)
    return as_numpy(video.global_)[0], as_numpy(video.regions[0][video.region_mask[0]])
