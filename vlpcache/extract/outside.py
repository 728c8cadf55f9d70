"""A video, photo or frames folder that a cache does not hold, extracted on its own with that cache's settings
(`vlpcache search --like FILE`): into a cache of its own in a folder the caller gives (a temporary one), never
into the collection, so that looking for the items like a clip adds nothing to the collection, its index or the
workspace's record of extracted folders."""

from __future__ import annotations

import time
from pathlib import Path

from vlpcache.cache.reader import RegionCache
from vlpcache.cache.schema import CacheSettings, detector_name
from vlpcache.cache.writer import ShardWriter
from vlpcache.errors import NotComparable, UserError
from vlpcache.extract.detectors.choice import choose_detector
from vlpcache.extract.options import ExtractOptions
from vlpcache.extract.progress import ExtractSummary
from vlpcache.extract.runner import detect_and_write
from vlpcache.extract.sources import one_item
from vlpcache.report import printable
from vlpcache.workspace import Workspace

# the way out where a cache's --weights FILE is not in the workspace's record (weights.json)
RERUN_WITH_WEIGHTS = "run that extract again with the same --weights FILE, which extracts nothing again and records the file"


def options_like(settings: CacheSettings, models: str | None = None, device: str = "cpu",
                 workers: int = 1) -> ExtractOptions:
    """The extract options that give a cache of `settings` (the detector named in them, with its own weights: the
    file `extract --weights FILE` was given where the workspace recorded it; else the detector's usual ones, and a
    cache extracted with other weights gives other hashes, said by extract_outside)."""
    detector = detector_name(settings.detector)
    backbone = {"yolox": settings.backbone, "frcnn": settings.detector.partition(":")[2]}.get(detector)
    scale = settings.extra.get("scale")
    return ExtractOptions(frames=settings.frames, regions=settings.regions - 1, detector=detector, backbone=backbone or None,
                          weights=weights_given(settings), models=models,
                          scale="/".join(map(str, scale)) if scale else None,
                          proposals=settings.extra.get("proposals"), score_threshold=settings.score_threshold,
                          device=device, workers=workers, quiet=True)


def weights_given(settings: CacheSettings) -> str | None:
    """The file `extract --weights FILE` was given for a cache of `settings` (the workspace's record, by the
    sha256 the cache holds); None where it was given none. NotComparable where that file is gone."""
    if detector_name(settings.detector) == "yolox":  # its files come from the models folder, never --weights
        return None
    path = Workspace().weights_files().get(settings.detector_weights_sha256)
    if path is not None and not Path(path).is_file():
        raise NotComparable(f"the cache's {detector_name(settings.detector)} weights, {printable(path)} (given to "
                            "extract as --weights), are gone: put the file back there")
    if path is None and not torchvisions_own(settings):
        raise NotComparable(f"the cache's frcnn weights (sha256 {settings.detector_weights_sha256[:12]}…) are a file "
                            "given to extract as --weights that this workspace has no record of (extracted before "
                            f"vlpcache recorded it in weights.json, or in another workspace): {RERUN_WITH_WEIGHTS}")
    return path


def unrecorded_weights(options: ExtractOptions) -> str:
    """What to do where a vg cache was extracted with --weights FILE that the workspace has no record of (the
    published checkpoint is not pinned by a hash: such a cache is told from one of the models folder's by nothing)."""
    if options.detector != "vg" or options.weights:
        return ""
    return ("; where the cache was extracted with --weights FILE (before vlpcache recorded it in weights.json, or in "
            f"another workspace), {RERUN_WITH_WEIGHTS}")


def torchvisions_own(settings: CacheSettings) -> bool:
    """Whether a frcnn cache's weights are torchvision's own for its architecture (the sha256 its published file's
    name begins, as torch.hub checks it), else a file given as --weights; True for the other detectors. Asked before
    torchvision's file is looked for: a cache of another file would download it, then refuse it."""
    if detector_name(settings.detector) != "frcnn":
        return True
    import torch
    from torchvision.models import get_model_weights

    url = get_model_weights(settings.detector.partition(":")[2]).DEFAULT.url
    prefix = torch.hub.HASH_REGEX.search(url.rsplit("/", 1)[-1])
    return prefix is None or settings.detector_weights_sha256.startswith(prefix.group(1))


def extract_outside(path: str, settings: CacheSettings, folder: Path, models: str | None = None,
                    device: str = "cpu", workers: int = 1) -> str:
    """Extract the one item `path` is (a video or photo file, or a frames folder) into a new cache in `folder`,
    as a cache of `settings` holds its items; its id there. One clear error where `path` is no such item or
    does not decode; NotComparable where this machine's detector would give other settings (other weights, none
    found). `workers`: 1 decodes it in a worker process (the page's uploads: a file that hangs the decoder is
    stopped after --decode-timeout's default, one that crashes it takes the worker, not the server); 0 in this
    process (vlpcache.like_file, whose caller's script a spawned worker would run again)."""
    item = one_item(Path(path))
    options = options_like(settings, models, device, workers)
    try:
        spec = choose_detector(options.detector, options.backbone, options.weights, options.models,
                               options.input_scale(), options.proposals)
    except UserError as err:  # not this machine's detector, or its weights not found
        raise NotComparable(str(err) + unrecorded_weights(options)) from None
    own = spec.cache_settings(options.frames, options.regions, options.score_threshold, settings)
    if differences := own.differences(settings):  # e.g. a cache extracted with --weights FILE
        raise NotComparable(f"this machine's {options.detector} gives other settings: {'; '.join(differences)}"
                            + unrecorded_weights(options))
    summary = ExtractSummary()
    with ShardWriter(folder, own, writer_name="s0of1") as writer:
        detect_and_write([item], spec, writer, options, summary, time.monotonic())
    with RegionCache(folder, say_damaged=False) as cache:
        if item.id not in cache:
            reason = cache.failures.get(item.id, {}).get("reason", "it did not extract")
            raise UserError(f"{printable(path)}: {reason}")
    return item.id

