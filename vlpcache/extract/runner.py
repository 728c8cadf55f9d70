"""`vlpcache extract`: sources -> reader (decode workers) -> mapper (detector) -> shard writer.

Resumable: items already in the cache are skipped, items recorded as failed too (unless
--retry-failed). Shards are committed atomically, so a kill -9 loses at most the shard in progress.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vlpcache.cache.reader import RegionCache
from vlpcache.cache.writer import ShardWriter
from vlpcache.errors import UserError
from vlpcache.extract.detectors.choice import choose_detector, load_detector
from vlpcache.extract.detectors.spec import DetectorSpec
from vlpcache.extract.options import ExtractOptions
from vlpcache.extract.reader import FrameReader, Prefetch
from vlpcache.extract.sources import discover_items, shard_of
from vlpcache.report import say
from vlpcache.workspace import Workspace


@dataclass
class ExtractSummary:
    done: int = 0
    skipped_cached: int = 0
    skipped_failed: int = 0
    failed: int = 0
    frames: int = 0
    seconds: float = 0.0
    detect_seconds: float = 0.0
    wait_seconds: float = 0.0
    load_seconds: float = 0.0  # from the start until the detector was ready (torch import, model loading)

    @property
    def ok(self) -> bool:
        """False only when items failed and none of the roots' items is in the cache."""
        return self.done > 0 or self.skipped_cached > 0 or self.failed == 0

    def line(self) -> str:
        rate = f"{self.done / self.seconds:.2f} items/s, {self.frames / self.seconds:.1f} frames/s" if self.seconds else "-"
        return (
            f"extract: {self.done} done, {self.skipped_cached} already cached, "
            f"{self.skipped_failed} skipped (failed before; --retry-failed retries), {self.failed} failed, "
            f"{self.seconds:.1f} s, {rate}; detector loaded after {self.load_seconds:.1f} s, "
            f"busy {self.detect_seconds:.1f} s, "
            f"waited {self.wait_seconds:.1f} s for decoded frames"
        )


def _write_results(results, writer: ShardWriter, summary: ExtractSummary, bar: tqdm, quiet: bool) -> None:
    """Each RegionItem into the shard writer (or the failure log), advancing the progress bar."""
    for result in results:
        item = result.decoded.item
        if result.arrays is None:
            summary.failed += 1
            writer.record_failure(item.id, str(item.path), result.error)
            if not quiet:
                say(f"{item.path}: {result.error}")
        else:
            writer.add(item.id, str(item.path), item.kind, result.arrays)
            summary.done += 1
            summary.frames += int(result.arrays["frame_mask"].sum())
        bar.update(1)
        elapsed = max(bar.format_dict["elapsed"], 1e-9)
        bar.set_postfix_str(f"{summary.frames / elapsed:.1f} frames/s, {summary.failed} failed", refresh=False)


def items_to_extract(items, cache: RegionCache, options: ExtractOptions, summary: ExtractSummary) -> list:
    """This shard's items that are neither cached nor (unless --retry-failed) recorded as failed."""
    shard_index, shard_count = options.shard_part()
    failed_before = cache.failures
    todo = []
    for item in items:
        if shard_of(item.id, shard_count) != shard_index:
            continue
        if item.id in cache:
            summary.skipped_cached += 1
        elif item.id in failed_before and not options.retry_failed:
            summary.skipped_failed += 1
        else:
            todo.append(item)
    return todo


def detect_and_write(todo, spec: DetectorSpec, writer: ShardWriter, options: ExtractOptions,
                     summary: ExtractSummary, started: float) -> None:
    """Decode `todo` in worker processes, run the detector on the frames, write each item or its failure."""
    from vlpcache.devices import resolve_device
    from vlpcache.extract.mapper import RegionMapper

    shard_index, shard_count = options.shard_part()
    reader = FrameReader(options.frames, spec.max_side, options.worker_count())
    desc = f"extract {shard_index}/{shard_count}" if shard_count > 1 else "extract"
    # the workers start decoding now, while torch and the networks load, up to about 256 MB of
    # decoded frames ahead (yolox at T=8: 64 items, four CUDA batches)
    depth = max(8, 256 * 2**20 // (3 * spec.max_side**2 * options.frames))
    with (Prefetch(reader(todo), depth=depth) as decoded,
          tqdm(total=len(todo), unit="item", disable=options.quiet, dynamic_ncols=True,
               desc=f"{desc} (loading {spec.detector})") as bar):
        device = resolve_device(options.device).type
        detector = load_detector(spec, device, options.score_threshold)
        mapper = RegionMapper(detector, writer.settings, options.detector_batch_size(device))
        summary.load_seconds = time.monotonic() - started
        bar.set_description(desc)
        bar.reset()  # rates and the ETA count from here: loading is over
        try:
            _write_results(mapper(decoded), writer, summary, bar, options.quiet)
        finally:
            summary.detect_seconds, summary.wait_seconds = mapper.detect_seconds, mapper.wait_seconds


def run_extract(roots, cache_dir=None, **options) -> ExtractSummary:
    """The `vlpcache extract` command; `options` are ExtractOptions fields."""
    started = time.monotonic()
    options = ExtractOptions(**options)
    shard_index, shard_count = options.shard_part()
    workspace = Workspace()
    cache_dir = Path(cache_dir) if cache_dir else workspace.cache_dir
    roots = [Path(r) for r in roots]

    items, problems = discover_items(roots)
    for path, reason in problems:
        say(f"{path}: {reason}")
    if not items:
        raise UserError(f"no videos, images or frame folders found under {', '.join(map(str, roots))}")
    workspace.remember_roots([r for r in roots if r.exists()])

    if options.device == "cuda":  # a missing GPU fails before anything is written; auto resolves while the workers decode
        from vlpcache.devices import resolve_device

        resolve_device(options.device)
    spec = choose_detector(options.detector, options.backbone, options.weights, options.models)  # nothing loaded yet
    settings = spec.cache_settings(options.frames, options.regions, options.score_threshold)
    summary = ExtractSummary()
    with ShardWriter(cache_dir, settings, writer_name=f"s{shard_index}of{shard_count}",
                     max_items=options.items_per_shard) as writer:
        cache = RegionCache(cache_dir)
        todo = items_to_extract(items, cache, options, summary)
        cache.close()
        if todo:
            detect_and_write(todo, spec, writer, options, summary, started)
    summary.seconds = time.monotonic() - started
    say(summary.line())
    return summary
