"""`vlpcache inspect`: what a cache holds (items, failures, T/N/D, provenance, size); no torch.

`--render` (a picture of one item's frames with its boxes) re-decodes the item's sources, which is
extraction's business: vlpcache.extract.render.
"""

from __future__ import annotations

import collections
import json

import numpy as np

from vlpcache.cache.labels import region_names
from vlpcache.cache.manifest import newer_hdf5, read_passed_over
from vlpcache.cache.reader import RegionCache
from vlpcache.cache.schema import outdated_schema
from vlpcache.cache.writer import unfinished_shards
from vlpcache.report import human_size, printable, silent
from vlpcache.workspace import Workspace


TOP_LABELS = 8  # the commonest detected classes inspect names


def region_counts(cache: RegionCache) -> dict:
    """Sampled frames, regions (whole frames included) and the detections of the real frames by class
    (whole-frame regions left out), counted one shard at a time: what the detector found in this data."""
    frames = regions = empty = 0
    by_class = np.zeros(0, np.int64)
    for part in cache.shard_columns(("frame_mask", "region_mask", "labels")):
        frames += int(part["frame_mask"].sum())
        regions += int(part["region_mask"].sum())
        detected = part["region_mask"] & part["frame_mask"][..., None] & (part["labels"] >= 0)  # (V, T, N)
        empty += int((part["frame_mask"] & ~detected.any(-1)).sum())  # real frames with no detection
        found = np.bincount(part["labels"][detected].astype(np.int64))  # the whole-frame region (-1) left out
        by_class = np.pad(by_class, (0, max(0, len(found) - len(by_class))))
        by_class[: len(found)] += found
    return {"frames": frames, "regions": regions, "frames_without_detections": empty, "by_class": by_class}


def top_labels(cache: RegionCache, by_class: np.ndarray) -> list[dict]:
    """The TOP_LABELS commonest classes of the detections: [{"label", "count", "share"}, ...]."""
    names, total = region_names(cache.settings.detector), int(by_class.sum())
    top = [int(c) for c in np.argsort(-by_class, kind="stable")[:TOP_LABELS] if by_class[c]]
    return [{"label": names.label(c), "count": int(by_class[c]), "share": round(by_class[c] / total, 4)} for c in top]


def cache_summary(cache: RegionCache) -> dict:
    failures = cache.failures
    reasons = collections.Counter(record.get("reason", "?") for record in failures.values())
    counts = region_counts(cache)
    frames, regions = counts["frames"], counts["regions"]
    settings = cache.settings.to_json()
    return {
        "cache": str(cache.cache_dir),
        "items": len(cache),
        "kinds": dict(collections.Counter(cache.kinds)),
        "failures": len(failures),
        "failure_reasons": dict(reasons.most_common(10)),
        "kept_with_problems": len(cache.notes),
        "unreadable": len(cache.damaged),  # items whose cached row a read found damaged
        "passed_over": len(read_passed_over(cache.cache_dir)),
        "moved": len(cache.moved),  # found at new paths
        "dropped": len(cache.removed),  # by extract --prune: their files were gone
        "unfinished_shards": [p.name for p in unfinished_shards(cache.cache_dir)],
        "frames": frames,
        "mean_regions_per_frame": round(regions / frames, 2) if frames else 0.0,
        "T": settings["frames"],
        "N": settings["regions"],
        "D": settings["feature_dim"],
        "labels": region_names(cache.settings.detector).describe(),
        "detections": int(counts["by_class"].sum()),
        "frames_without_detections": counts["frames_without_detections"],
        "top_labels": top_labels(cache, counts["by_class"]),
        "provenance": settings,
        "shards": len(cache.shard_paths) - len(cache.ignored_shards) - len(cache.unreadable_shards),
        "ignored_shards": {p.name: diffs for p, diffs in cache.ignored_shards.items()},
        "unreadable_shards": {p.name: reason for p, reason in cache.unreadable_shards.items()},
        "size_bytes": cache.size_on_disk(),
        "outdated_schema": outdated_schema(cache.settings),
    }


def print_summary(summary: dict) -> None:
    p = summary["provenance"]
    lines = [
        f"cache       {summary['cache']}",
        f"items       {summary['items']}  ({', '.join(f'{k}: {v}' for k, v in summary['kinds'].items()) or 'none'})",
        f"failures    {summary['failures']}" + (
            "  (" + "; ".join(f"{v}x {k}" for k, v in summary["failure_reasons"].items()) + "); the next extract tries "
            "a file again once it changes, --retry-failed tries them all; --failures lists them"
            if summary["failures"] else ""),
        *([f"noted       {summary['kept_with_problems']} item(s) kept with a note (some frames unreadable, data "
           "truncated, photos in a frames folder, ...); --failures lists them"] if summary["kept_with_problems"] else []),
        *([f"unreadable  {summary['unreadable']} item(s) whose cached row a read found damaged (a disk fault or a bad "
           "copy) are left out; `vlpcache extract` extracts them again; --failures lists them"]
          if summary.get("unreadable") else []),
        *([f"passed over {summary['passed_over']} path(s) left out when looking for media (a broken link, an "
           "unreadable folder, a duplicate id, ...); --failures lists them"] if summary["passed_over"] else []),
        *([f"moved       {summary['moved']} item(s) read from the new paths extract found them at"] if summary["moved"] else []),
        *([f"dropped     {summary['dropped']} item(s) whose files were gone (extract --prune); --failures lists them"]
          if summary["dropped"] else []),
        f"shape       T={summary['T']} frames, N={summary['N']} regions (incl. whole frame), D={summary['D']}",
        f"frames      {summary['frames']} sampled, {summary['mean_regions_per_frame']} regions per frame on average",
        f"detector    {p['detector']}  sha256 {p['detector_weights_sha256'][:12]}",
        f"backbone    {p['backbone']}  sha256 {p['backbone_weights_sha256'][:12]}"
        + (f"  tensors {p['backbone_tensors_sha256'][:12]}" if p.get("backbone_tensors_sha256") else ""),
        f"labels      {summary['labels']}" + (", with each region's best attribute" if p.get("attributes") else ""),
        *([f"found       {summary['detections']:,} detections (none in "
           f"{summary['frames_without_detections'] / max(1, summary['frames']):.0%} of the frames): "
           + ", ".join(f"{printable(t['label'])} {t['share']:.0%}" for t in summary["top_labels"])
           + (", ..." if sum(t["count"] for t in summary["top_labels"]) < summary["detections"] else "")]
          if summary["detections"] else
          [f"found       no detections in its {summary['frames']} frames: only the whole-frame regions "
           f"(score >= {p['score_threshold']})"]
          if summary["frames"] else []),
        f"sampling    {p['sampling']}, score >= {p['score_threshold']}, NMS IoU {p['nms_iou']}, schema v{p['schema_version']}",
        f"on disk     {human_size(summary['size_bytes'])} in {summary['shards']} shard{'' if summary['shards'] == 1 else 's'}",
    ]
    for name, diffs in summary["ignored_shards"].items():
        lines.append(f"ignored     {name}: made with other settings than the manifest ({'; '.join(diffs)}); "
                     "its items are left out")
    for name, reason in summary["unreadable_shards"].items():
        lines.append(f"unreadable  {name}: {reason}; its items are left out: " + (
            newer_hdf5(reason) or "move it out of the cache and run `vlpcache extract` again to redo them"))
    for name in summary["unfinished_shards"]:
        lines.append(f"unfinished  {name}: a shard being written, or left by an extract that was stopped (the next "
                     "extract into this cache removes it and extracts its items)")
    if summary["outdated_schema"]:
        lines.append(f"note        {summary['outdated_schema']}; re-extract for the current features")
    print("\n".join(lines))


def inspect_cache(cache_dir=None, as_json=False, list_failures=False) -> None:
    """The `vlpcache inspect` command: the summary on stdout, as text or JSON."""
    cache = RegionCache(cache_dir or Workspace().cache_dir, say=silent)  # the summary lists left-out shards
    summary = cache_summary(cache)
    if cache.found_damage_since_listed():  # rows that do not read, met while counting: counted again without them
        cache.refresh()
        summary = cache_summary(cache)
    if list_failures:
        summary["failed_items"] = list(cache.failures.values())
        summary["damaged_items"] = [{"id": item_id, "path": cache.paths[cache.index_of(item_id)], "note": note}
                                    for item_id, note in cache.notes.items()]
        summary["unreadable_items"] = list(cache.damaged.values())
        summary["passed_over_paths"] = sorted(read_passed_over(cache.cache_dir).values(), key=lambda r: r["path"])
        summary["dropped_items"] = list(cache.removed.values())
    if as_json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    print_summary(summary)
    for record in summary.get("failed_items", []):
        print(f"failed      {printable(record['path'])}: {printable(record['reason'])}")
    for record in summary.get("damaged_items", []):
        print(f"noted       {printable(record['path'])}: {printable(record['note'])}")
    for record in summary.get("unreadable_items", []):
        print(f"unreadable  {printable(record['id'])}: row {record['row']} of {record['shard'].split('@')[0]} does not read "
              f"({printable(str(record.get('reason', '')))}); extract redoes it")
    for record in summary.get("passed_over_paths", []):
        print(f"passed over {printable(record['path'])}: {printable(record['reason'])}")  # stored printable already
    for record in summary.get("dropped_items", []):
        print(f"dropped     {printable(record['id'])}: {printable(record.get('path', ''))} "
              f"({printable(str(record.get('reason', 'gone')))}; extract --prune)")
