"""`vlpcache inspect --render ID`: a picture of one cached item's frames with its boxes, labels and scores.

The cache stores features, not pixels: the item's frames are re-decoded from its source path at the times
the cache stores (so the boxes fall where the detector saw them, whatever sampling a later vlpcache does)
and the cached boxes are drawn on them. No torch.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlpcache.cache.labels import RegionNames, region_names
from vlpcache.cache.reader import RegionCache
from vlpcache.cache.schema import FRAME_REGION_LABEL, TIMES_FROM_VIDEO
from vlpcache.captions import ids_like, item_named
from vlpcache.extract.stamps import replaced
from vlpcache.errors import ItemError, UserError
from vlpcache.extract.sampling import read_frames_at
from vlpcache.extract.sources import Item
from vlpcache.files import may_write, replace_atomically, write_failure
from vlpcache.report import place_text, printable, say
from vlpcache.workspace import Workspace

RENDER_SIDE = 480  # longer side of each rendered frame, pixels
COLUMNS = 4
TITLE_HEIGHT = 22  # pixels above the grid for the item's id and path
CAPTION_HEIGHT = 18  # pixels above each frame for its index and time
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]


def source_pictures(cache: RegionCache, cached: dict) -> list[Image.Image]:
    """The item's sampled frames, re-decoded; blank frames of its size when the source is gone, or has
    changed since it was extracted (its frames are not the ones the boxes were found on)."""
    frame_count = int(cached["frame_mask"].sum())
    if replaced(cached):
        say(f"{printable(cached['path'])}: changed since it was extracted (run `vlpcache extract` again to redo it); "
            "drawing its boxes on blank frames")
        return blank_frames(cached, frame_count)
    try:
        times = [float(t) for t in cached["timestamps"][:frame_count]]  # the frames the boxes were found on
        source = read_frames_at(Item(cached["id"], Path(cached["path"]), cached["kind"]), times, RENDER_SIDE,
                                from_video_start=cached.get("times_from") == TIMES_FROM_VIDEO)
        return [at_least(Image.fromarray(f)) for f in source.frames[:frame_count]]
    except (ItemError, OSError) as err:
        moved = "" if os.path.lexists(cached["path"]) else " (moved? `vlpcache extract NEW_ROOT` records where it went)"
        say(f"{printable(cached['path'])}: cannot re-read the source ({err}){moved}; drawing boxes on blank frames")
        return blank_frames(cached, frame_count)


SMALLEST_SIDE = 320  # a smaller picture (a thumbnail-sized photo, an 8x8 icon) is drawn larger: its labels need room


def at_least(picture: Image.Image) -> Image.Image:
    """The picture scaled up so that its longer side is SMALLEST_SIDE, where it is shorter."""
    longer = max(picture.size)
    if longer >= SMALLEST_SIDE:
        return picture
    scale = SMALLEST_SIDE / max(longer, 1)
    return picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                          Image.Resampling.NEAREST if longer < 64 else Image.Resampling.BILINEAR)


def blank_frames(cached: dict, count: int) -> list[Image.Image]:
    """Grey pictures of the item's frame size, to draw its boxes on."""
    h, w = (int(x) for x in cached["frame_size"])
    scale = RENDER_SIDE / max(h, w, 1)
    return [Image.new("RGB", (max(1, round(w * scale)), max(1, round(h * scale))), (96, 96, 96))] * count


def draw_regions(draw: ImageDraw.ImageDraw, cached: dict, t: int, origin: tuple[int, int], size: tuple[int, int],
                 names: RegionNames) -> None:
    """Frame t's detected boxes with label and score, best on top; the picture is at origin, of size."""
    x0, y0 = origin
    for n in np.flatnonzero(cached["region_mask"][t])[::-1]:  # best drawn last, on top
        label = int(cached["labels"][t, n])
        if label == FRAME_REGION_LABEL:
            continue
        # normalised -> picture pixels; a box past the frame (reads allow rounding past it) is drawn at its edge:
        # one of 3e38 was a SystemError of Pillow's
        x1, y1, x2, y2 = np.clip(cached["boxes"][t, n], 0.0, 1.0) * np.array(size * 2)
        colour = PALETTE[label % len(PALETTE)]
        box = (x0 + x1, y0 + y1, x0 + x2, y0 + y2)
        draw.rectangle(box, outline=colour, width=2)
        text = f"{names.of(cached, t, n)} {float(cached['scores'][t, n]):.2f}"
        tx, ty = box[0] + 2, max(y0, box[1] - 11)
        draw.rectangle(draw.textbbox((tx, ty), text), fill=colour)
        draw.text((tx, ty), text, fill=(255, 255, 255))


def named_item(cache: RegionCache, key: str) -> str:
    """The id of the cached item `key` names (captions.item_named), or one line with ids like it."""
    if key in cache:
        return key
    item_id, several = item_named(key, cache.ids)
    if item_id is not None:
        return item_id
    if not several and (left_out := cache.left_out_line(key)) is not None:
        raise UserError(left_out)
    like = several[:3] or ids_like(key, cache.ids)
    hint = (f"did you mean {' or '.join(map(repr, like))}?" if like else
            f"its ids look like {cache.ids[0]!r}" if len(cache) else "it holds no item")
    raise UserError(f"{key!r} names no item of {cache.cache_dir}: {hint} (an item is named by its id, its path below "
                    "the extracted root without extension, or by a file name or path that ends in one)")


# fonts with the accented letters of file names (é, ü, –), where the system has one: Pillow's own has ASCII only
TEXT_FONTS = ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "NotoSans-Regular.ttf", "Arial.ttf")


@functools.lru_cache(maxsize=1)
def text_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The font of a picture's words: the first of TEXT_FONTS found (Pillow looks in the system's font folders),
    else Pillow's own, whose ASCII draws `café` as `caf` and a box."""
    for name in TEXT_FONTS:
        try:
            return ImageFont.truetype(name, 11)
        except OSError:
            continue
    return ImageFont.load_default()


def cell_size(pictures: list[Image.Image]) -> tuple[int, int]:
    """(width, height) of each picture's cell with its caption: at least SMALLEST_SIDE wide, so that the title and
    the captions of a thin picture (a 1 x 300 strip) are read; the picture sits at its left, its boxes over it."""
    return max(SMALLEST_SIDE, *(p.width for p in pictures)), max(p.height for p in pictures) + CAPTION_HEIGHT


def render_item(cache: RegionCache, item_id: str, output: Path) -> Path:
    """Draw the item's sampled frames in a grid with boxes, labels and scores; returns the file."""
    cached = cache.get(item_id)
    pictures = source_pictures(cache, cached)
    if not pictures:
        raise UserError(f"{item_id}: no frames to render")
    cell_w, cell_h = cell_size(pictures)
    columns = min(COLUMNS, len(pictures))
    rows = (len(pictures) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h + TITLE_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.font = text_font()
    draw.text((6, 4), printable(f"{item_id}  ({cached['kind']}, {cached['path']})"), fill=(0, 0, 0))  # one line
    for t, picture in enumerate(pictures):
        x0, y0 = (t % columns) * cell_w, TITLE_HEIGHT + (t // columns) * cell_h
        sheet.paste(picture, (x0, y0 + CAPTION_HEIGHT))
        place = place_text(cached["kind"], float(cached["timestamps"][t]))
        which = "the photo" if cached["kind"] == "image" else f"frame {t + 1} of {len(pictures)}"
        draw.text((x0 + 4, y0 + 3), which + (f"  {place}" if place else ""), fill=(0, 0, 0))
        draw_regions(draw, cached, t, (x0, y0 + CAPTION_HEIGHT), picture.size, region_names(cache.settings.detector))
    save_picture(sheet, output)
    return output


def picture_format(output: Path) -> str:
    """The image format that output's extension names (checked before any work)."""
    image_format = Image.registered_extensions().get(output.suffix.lower())
    if image_format is None:
        raise UserError(f"-o {output}: not a picture file name; end it in .png or .jpg")
    return image_format


def save_picture(picture: Image.Image, output: Path) -> None:
    """The picture in `output`, whole or not at all, in the format its extension names."""
    image_format = picture_format(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(output, lambda tmp: picture.save(tmp, format=image_format))
    except OSError as err:
        raise write_failure(output, err, "nothing was written; pass -o a writable file") from None


PICTURE_NAME_BYTES = 200  # of a default picture's name, its .png aside


def default_picture_name(item_id: str) -> Path:
    """ID.png in the current folder, with anything but letters, digits, `-`, `_` and `.` replaced, and never
    a name that a shell reads as an option (leading `-`) or that hides the file (leading `.`)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in item_id).lstrip("-.")
    if len(safe.encode()) > PICTURE_NAME_BYTES:  # a file name has 255 bytes at most: the id's end, and a digest of it all
        digest = hashlib.blake2b(item_id.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()
        tail = safe.encode()[-(PICTURE_NAME_BYTES - len(digest) - 1):].decode("utf-8", "ignore").lstrip("-._")
        safe = f"{tail}-{digest}"
    return Path(f"{safe or 'item'}.png")


def render_cache_item(cache_dir, item_id: str, output=None) -> Path:
    """The `vlpcache inspect --render ID` command: the picture in `output` (default: ID.png). ID may name
    the item as a caption does: by a file name or path that ends in its id, or by the end of its id."""
    if output:
        picture_format(Path(output))
    cache = RegionCache(cache_dir or Workspace().cache_dir)
    item_id = named_item(cache, item_id)
    output = Path(output) if output else default_picture_name(item_id)
    if not may_write(output.parent):  # said before the frames are decoded
        raise UserError(f"{output}: this user may not write in {output.absolute().parent}; pass -o a file in a "
                        "folder of your own")
    path = render_item(cache, item_id, output)
    note = cache.note_of(item_id)
    print(f"wrote {printable(str(path))}" + (f" (the item was kept with a note: {printable(note)})" if note else ""))
    return path
