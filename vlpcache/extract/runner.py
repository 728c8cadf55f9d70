"""`vlpcache extract`: sources -> reader (decode workers) -> mapper (detector) -> shard writer.

Resumable: items already in the cache are skipped, items recorded as failed too (unless
--retry-failed). Shards are committed atomically, so a kill -9 loses at most the shard in progress.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vlpcache.cache.reader import RegionCache
from vlpcache.cache.writer import ShardWriter
from vlpcache.errors import UserError
from vlpcache.extract.detectors import choose_detector, load_detector
from vlpcache.extract.reader import FrameReader, Prefetch
from vlpcache.extract.sources import discover_items, shard_of
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
                bar.write(f"{item.path}: {result.error}", file=sys.stderr)
        else:
            writer.add(item.id, str(item.path), item.kind, result.arrays)
            summary.done += 1
            summary.frames += int(result.arrays["frame_mask"].sum())
        bar.update(1)
        elapsed = max(bar.format_dict["elapsed"], 1e-9)
        bar.set_postfix_str(f"{summary.frames / elapsed:.1f} frames/s, {summary.failed} failed", refresh=False)


def parse_shard(spec: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UserError(f"--shard {spec!r}: expected i/n, e.g. 0/4") from None
    if not (count >= 1 and 0 <= index < count):
        raise UserError(f"--shard {spec!r}: need 0 <= i < n")
    return index, count


def run_extract(
    roots,
    cache_dir=None,
    frames: int = 8,
    regions: int = 30,
    detector: str = "yolox",
    backbone: str | None = None,
    weights: str | None = None,
    models: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    shard: str = "0/1",
    retry_failed: bool = False,
    items_per_shard: int = 512,
    score_threshold: float = 0.1,
    quiet: bool = False,
) -> ExtractSummary:
    started = time.monotonic()
    shard_index, shard_count = parse_shard(shard)
    workspace = Workspace()
    cache_dir = Path(cache_dir) if cache_dir else workspace.cache_dir
    roots = [Path(r) for r in roots]

    items, problems = discover_items(roots)
    for path, reason in problems:
        print(f"{path}: {reason}", file=sys.stderr)
    if not items:
        raise UserError(f"no videos, images or frame folders found under {', '.join(map(str, roots))}")
    workspace.remember_roots([r for r in roots if r.exists()])

    if device == "cuda":  # a missing GPU fails before anything is written; auto resolves while the workers decode
        from vlpcache.devices import resolve_device

        resolve_device(device)
    choice = choose_detector(detector, backbone, weights, models)  # weight files found, nothing loaded yet
    settings = choice.cache_settings(frames, regions, score_threshold)
    summary = ExtractSummary()
    with ShardWriter(cache_dir, settings, writer_name=f"s{shard_index}of{shard_count}",
                     max_items=items_per_shard) as writer:
        cache = RegionCache(cache_dir)
        failed_before = cache.failures
        todo = []
        for item in items:
            if shard_of(item.id, shard_count) != shard_index:
                continue
            if item.id in cache:
                summary.skipped_cached += 1
            elif item.id in failed_before and not retry_failed:
                summary.skipped_failed += 1
            else:
                todo.append(item)
        cache.close()
        if todo:
            workers = max(1, (os.cpu_count() or 2) - 1) if workers is None else workers
            reader = FrameReader(frames, choice.max_side, workers)
            desc = f"extract {shard_index}/{shard_count}" if shard_count > 1 else "extract"
            # the workers start decoding now, while torch and the networks load, up to about 256 MB of
            # decoded frames ahead (yolox at T=8: 64 items, four CUDA batches)
            depth = max(8, 256 * 2**20 // (3 * choice.max_side**2 * frames))
            with (Prefetch(reader(todo), depth=depth) as decoded,
                  tqdm(total=len(todo), unit="item", disable=quiet, dynamic_ncols=True,
                       desc=f"{desc} (loading {choice.detector})") as bar):
                from vlpcache.devices import resolve_device
                from vlpcache.extract.mapper import RegionMapper

                device = resolve_device(device).type
                batch_size = batch_size or (128 if device == "cuda" else 8)  # CPU: bigger batches only add memory traffic
                mapper = RegionMapper(load_detector(choice, device, score_threshold), settings, batch_size)
                summary.load_seconds = time.monotonic() - started
                bar.set_description(desc)
                bar.reset()  # rates and the ETA count from here: loading is over
                try:
                    _write_results(mapper(decoded), writer, summary, bar, quiet)
                finally:
                    summary.detect_seconds, summary.wait_seconds = mapper.detect_seconds, mapper.wait_seconds
    summary.seconds = time.monotonic() - started
    print(summary.line(), file=sys.stderr)
    return summary
