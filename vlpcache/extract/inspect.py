"""`vlpcache inspect`: what a cache holds, and a picture of one item's frames with its regions.

Rendering re-decodes the item's frames from its source path (the cache stores features, not
pixels), with the same sampling as extraction, and draws the cached boxes on them.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import numpy as np

from vlpcache.cache.reader import RegionCache
from vlpcache.cache.schema import outdated_schema
from vlpcache.errors import ItemError, UserError
from vlpcache.extract.regions import label_name
from vlpcache.workspace import Workspace

RENDER_SIDE = 480  # longer side of each rendered frame, pixels
COLUMNS = 4


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} TiB"


def cache_summary(cache: RegionCache) -> dict:
    failures = cache.failures
    reasons = collections.Counter(record.get("reason", "?") for record in failures.values())
    frames = int(cache.column("frame_mask").sum())
    regions = int(cache.column("region_mask").sum())
    settings = cache.settings.to_json()
    return {
        "cache": str(cache.cache_dir),
        "items": len(cache),
        "kinds": dict(collections.Counter(cache.kinds)),
        "failures": len(failures),
        "failure_reasons": dict(reasons.most_common(10)),
        "frames": frames,
        "mean_regions_per_frame": round(regions / frames, 2) if frames else 0.0,
        "T": settings["frames"],
        "N": settings["regions"],
        "D": settings["feature_dim"],
        "provenance": settings,
        "shards": len(cache.shard_paths),
        "size_bytes": cache.size_on_disk(),
        "outdated_schema": outdated_schema(cache.settings),
    }


def print_summary(summary: dict) -> None:
    p = summary["provenance"]
    lines = [
        f"cache       {summary['cache']}",
        f"items       {summary['items']}  ({', '.join(f'{k}: {v}' for k, v in summary['kinds'].items()) or 'none'})",
        f"failures    {summary['failures']}" + (
            "  (" + "; ".join(f"{v}x {k}" for k, v in summary["failure_reasons"].items()) + ")" if summary["failures"] else ""),
        f"shape       T={summary['T']} frames, N={summary['N']} regions (incl. whole frame), D={summary['D']}",
        f"frames      {summary['frames']} sampled, {summary['mean_regions_per_frame']} regions per frame on average",
        f"detector    {p['detector']}  sha256 {p['detector_weights_sha256'][:12]}",
        f"backbone    {p['backbone']}  sha256 {p['backbone_weights_sha256'][:12]}",
        f"sampling    {p['sampling']}, score >= {p['score_threshold']}, NMS IoU {p['nms_iou']}, schema v{p['schema_version']}",
        f"on disk     {_human_size(summary['size_bytes'])} in {summary['shards']} shards",
    ]
    if summary["outdated_schema"]:
        lines.append(f"note        {summary['outdated_schema']}; re-extract for the current features")
    print("\n".join(lines))


def render_item(cache: RegionCache, item_id: str, output: Path) -> Path:
    """Draw the item's sampled frames in a grid with boxes, labels and scores; returns the file."""
    from PIL import Image, ImageDraw

    from vlpcache.extract.sampling import read_item
    from vlpcache.extract.sources import Item

    if item_id not in cache:
        raise UserError(f"{item_id!r} is not in {cache.cache_dir} (see `vlpcache inspect` for what is)")
    cached = cache.get(item_id)
    frame_count = int(cached["frame_mask"].sum())
    try:
        source = read_item(Item(item_id, Path(cached["path"]), cached["kind"]), cache.settings.frames, RENDER_SIDE)
        pictures = [Image.fromarray(f) for f in source.frames[:frame_count]]
    except (ItemError, OSError) as err:
        print(f"{cached['path']}: cannot re-read the source ({err}); drawing boxes on blank frames", file=sys.stderr)
        h, w = (int(x) for x in cached["frame_size"])
        scale = RENDER_SIDE / max(h, w, 1)
        pictures = [Image.new("RGB", (max(1, round(w * scale)), max(1, round(h * scale))), (96, 96, 96))] * frame_count
    if not pictures:
        raise UserError(f"{item_id}: no frames to render")

    cell_w = max(p.width for p in pictures)
    cell_h = max(p.height for p in pictures) + 18
    columns = min(COLUMNS, len(pictures))
    rows = (len(pictures) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h + 22), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 4), f"{item_id}  ({cached['kind']}, {cached['path']})", fill=(0, 0, 0))
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
               (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]
    for t, picture in enumerate(pictures):
        x0, y0 = (t % columns) * cell_w, 22 + (t // columns) * cell_h
        sheet.paste(picture, (x0, y0 + 18))
        draw.text((x0 + 4, y0 + 3), f"frame {t}  t={cached['timestamps'][t]:.2f}s", fill=(0, 0, 0))
        for n in np.flatnonzero(cached["region_mask"][t])[::-1]:  # best drawn last, on top
            label = int(cached["labels"][t, n])
            if label < 0:
                continue  # the whole-frame region
            x1, y1, x2, y2 = cached["boxes"][t, n] * np.array([picture.width, picture.height] * 2)
            colour = palette[label % len(palette)]
            box = (x0 + x1, y0 + 18 + y1, x0 + x2, y0 + 18 + y2)
            draw.rectangle(box, outline=colour, width=2)
            text = f"{label_name(label)} {float(cached['scores'][t, n]):.2f}"
            tx, ty = box[0] + 2, max(y0 + 18, box[1] - 11)
            draw.rectangle(draw.textbbox((tx, ty), text), fill=colour)
            draw.text((tx, ty), text, fill=(255, 255, 255))
    output.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(output)
    return output


def inspect_cache(cache_dir=None, render_id=None, output=None, as_json=False, list_failures=False) -> None:
    cache = RegionCache(cache_dir or Workspace().cache_dir)
    if render_id is not None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in render_id)
        path = render_item(cache, render_id, Path(output or f"{safe}.png"))
        print(f"wrote {path}")
        return
    summary = cache_summary(cache)
    if list_failures:
        summary["failed_items"] = list(cache.failures.values())
    if as_json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    print_summary(summary)
    for record in summary.get("failed_items", []):
        print(f"failed      {record['path']}: {record['reason']}")
