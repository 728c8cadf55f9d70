"""Thumbnails of indexed items' sampled frames: decoded from the source once, at the frame's stored
time (seeking, as extract does: vlpcache.extract.sampling.read_frames_at), and kept beside the index.

    <index>/thumbnails/store.json     {"format": 2}; a store of another format is emptied and begun again
    <index>/thumbnails/<kk>/<key>.jpg one sampled frame, JPEG, longer side <= THUMBNAIL_SIDE pixels;
                                      key = sha256 of (item id, source path, kind, frame time, side,
                                      the source's stamp),
                                      <kk> its first two hex digits

A store removed while serving is begun again at the next thumbnail, but not where its index folder was removed
(`vlpcache index --prune` of the index served): that would make again a folder that holds no index.

The store is kept under a size (THUMBNAILS_MAX_BYTES, `serve --thumbnails-max`): once over it, the thumbnails
least recently shown are removed until it is 80% full (a thumbnail's mtime is when it was last shown), so
that the keys of items extracted again or moved, never asked for again, do not fill the disk. Anything in
the folder may be removed at any time: it is decoded again when asked for.

The file name is a hash: a request names an indexed item and a frame index, never a path, so nothing
a client sends reaches the filesystem. A source moved, changed kind or re-extracted at other times
gets a new key. A source that is missing, no longer decodes, or has changed since it was extracted
(its frames would not be the ones the boxes were found on) gives a placeholder of the frame's shape,
which is not stored (the source may come back, or be extracted again).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlpcache.cache.schema import TIMES_FROM_VIDEO
from vlpcache.devices import usable_cores
from vlpcache.errors import DecodingTooLong, ItemError
from vlpcache.extract.sampling import read_frames_at
from vlpcache.extract.sources import Item
from vlpcache.extract.stamps import replaced
from vlpcache.files import replace_atomically
from vlpcache.report import Say, say

STORE_FORMAT = 2  # 2: keys take the source's stamp (the files of format 1 would never be asked for again)
STORE_FILE = "store.json"
THUMBNAIL_SIDE = 480  # pixels, longer side: sharp on a high-density screen in a ~300 px card
JPEG_QUALITY = 85
PLACEHOLDER_GREY = (96, 96, 96)
THUMBNAILS_MAX_BYTES = 2 * 10**9  # the store's size at most (about 50,000 frames); over it, the least recently shown go
TRIMMED_TO = 0.8  # of the maximum, after a trim: one in a while, not one at each thumbnail kept
# seconds a video's frame may take to decode, in the server's own process (the upload's extract has a worker and its
# --decode-timeout): a frame an hour into a video without keyframes. Then a placeholder, not tried again until restarted
THUMBNAIL_DECODE_S = 30.0


@dataclass(frozen=True)
class Thumbnail:
    jpeg: bytes
    etag: str  # changes when the picture would
    placeholder: str | None = None  # why the source could not give the frame; None for a real frame


class ThumbnailStore:
    def __init__(self, folder: Path, side: int = THUMBNAIL_SIDE, say: Say = say, max_bytes: int = THUMBNAILS_MAX_BYTES):
        self.folder, self.side = Path(folder), side
        self.say = say
        self.max_bytes = max_bytes
        self._writable = True
        self._size_lock = threading.Lock()
        self._bytes: int | None = None  # the store's size, counted at the first thumbnail kept
        # decoding is CPU-bound: more at once than there are cores only adds memory
        self._decoders = threading.BoundedSemaphore(usable_cores())
        self._too_long: set[str] = set()  # keys of frames whose decoding ran out of time
        # frames being decoded, by key: another asker of one waits for that decode rather than decoding it again
        # (an item's view opened by several people at once: each of its frames once, not once each)
        self._decoding: dict[str, Future] = {}
        self._decoding_lock = threading.Lock()
        self._open_store()

    def _open_store(self) -> None:
        try:
            stored = json.loads((self.folder / STORE_FILE).read_text())
        except (OSError, ValueError):
            stored = None
        if stored == {"format": STORE_FORMAT}:
            return
        try:
            if self.folder.exists():
                shutil.rmtree(self.folder)
            self._begin_store()
        except OSError as err:
            self._not_writable(err)

    def _begin_store(self, parents: bool = True) -> None:
        self.folder.mkdir(parents=parents, exist_ok=True)
        (self.folder / STORE_FILE).write_text(json.dumps({"format": STORE_FORMAT}))

    def key(self, item: dict, frame: int) -> str:
        when = f"{float(item['timestamps'][frame]):.6f}"
        fields = [item["id"], item["path"], item["kind"], when, str(self.side), item.get("source", "")]
        return hashlib.sha256("\0".join(fields).encode("utf-8")).hexdigest()

    def path_of(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.jpg"

    def get(self, item: dict, frame: int) -> Thumbnail:
        """Frame `frame` of a cached item (the reader's dict: id, path, kind, timestamps, frame_size)."""
        key = self.key(item, frame)
        path = self.path_of(key)
        try:
            jpeg = path.read_bytes()
        except OSError:
            pass
        else:
            with contextlib.suppress(OSError):  # shown now: the last to go when the store is trimmed
                os.utime(path)
            return Thumbnail(jpeg, key)
        with self._decoding_lock:
            pending = self._decoding.get(key)
            first = pending is None
            if first:
                pending = self._decoding[key] = Future()
        if not first:
            return pending.result()  # its decode's thumbnail (or error), as the asker that started it gets it
        try:
            pending.set_result(self._decode(item, frame, key, path))
        except BaseException as err:
            pending.set_exception(err)
        finally:
            with self._decoding_lock:
                del self._decoding[key]
        return pending.result()

    def _decode(self, item: dict, frame: int, key: str, path: Path) -> Thumbnail:
        """Frame `frame` decoded from the item's source and kept at `path`; a placeholder where the source cannot
        give it."""
        source = Item(item["id"], Path(item["path"]), item["kind"])
        try:
            if key in self._too_long:
                raise ItemError(f"its decoding took more than {THUMBNAIL_DECODE_S:g} s; tried again when serve restarts")
            if replaced(item):
                raise ItemError("it changed since it was extracted (its boxes are of the old content); run "
                                "`vlpcache extract` again, then `vlpcache index`")
            with self._decoders:  # a cache's times as its shard counts them (older ones: from the video's start)
                [picture] = read_frames_at(source, [float(item["timestamps"][frame])], self.side,
                                           from_video_start=item.get("times_from") == TIMES_FROM_VIDEO,
                                           time_limit=THUMBNAIL_DECODE_S).frames
        except (ItemError, ValueError) as err:  # ValueError: the source now has no frame at that time
            if isinstance(err, DecodingTooLong):
                self._too_long.add(key)
            height, width = (int(v) for v in item["frame_size"])
            reason = f"source unavailable: {err}" if str(err) else "source unavailable"
            return Thumbnail(placeholder_jpeg(height, width, self.side), f"placeholder-{key}", reason)
        jpeg = encode_jpeg(picture)
        self._store(path, jpeg)
        return Thumbnail(jpeg, key)

    def _store(self, path: Path, jpeg: bytes) -> None:
        """Keep a thumbnail; one that cannot be kept (a full disk, the folder made read-only) is said once, and each
        later one is tried again: room made, or the store's folder removed to free space, they are kept again."""
        try:
            if not (self.folder / STORE_FILE).exists():  # removed while serving: begun again, but not in an index
                self._begin_store(parents=False)  # folder removed (`index --prune`): one no later prune would remove
            path.parent.mkdir(exist_ok=True)
            replace_atomically(path, lambda tmp: tmp.write_bytes(jpeg))
        except OSError as err:
            self._not_writable(err)
        else:
            self._writable = True
            self._count(len(jpeg))

    def _count(self, added: int) -> None:
        """Add a kept thumbnail's bytes to the store's size; over max_bytes, trim it (one thread at a time)."""
        with self._size_lock:
            self._bytes = self._bytes + added if self._bytes is not None else sum(size for _, size, _ in self._kept())
            if self._bytes > self.max_bytes:
                self._bytes = self._trim(int(TRIMMED_TO * self.max_bytes))

    def _kept(self) -> list[tuple[float, int, Path]]:
        """(mtime: when last shown, size, path) of each thumbnail in the store."""
        kept = []
        for path in self.folder.glob("??/*.jpg"):
            try:
                stat = path.stat()
            except OSError:  # removed meanwhile (a trim of another server's, the user)
                continue
            kept.append((stat.st_mtime, stat.st_size, path))
        return kept

    def _trim(self, target: int) -> int:
        """Remove the least recently shown thumbnails until the store holds at most `target` bytes; its size after."""
        kept = sorted(self._kept(), key=lambda entry: entry[0])
        total = sum(size for _, size, _ in kept)
        for _, size, path in kept:
            if total <= target:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            total -= size
        return total

    def _not_writable(self, err: OSError) -> None:
        if self._writable and not self.folder.parent.exists():
            self.say(f"note: the index folder {self.folder.parent} was removed (`vlpcache index --prune` removes those of "
                     "checkpoints no run holds): thumbnails are decoded on each request and not kept; restart `vlpcache "
                     "serve` to serve a run that is still there")
        elif self._writable:  # once until one is kept again: not a line per request
            self.say(f"note: cannot keep thumbnails in {self.folder} ({err.strerror or err}); they are decoded on each "
                     "request until one can be kept again")
        self._writable = False


def encode_jpeg(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


@functools.lru_cache(maxsize=64)
def placeholder_jpeg(height: int, width: int, side: int) -> bytes:
    """A grey frame of the item's shape (fitted into side) that says the source is missing."""
    scale = side / max(height, width, 1)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = Image.new("RGB", size, PLACEHOLDER_GREY)
    draw = ImageDraw.Draw(picture)
    text = "source not available"
    font = ImageFont.load_default(size=max(10, size[0] // 16))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((size[0] - (right - left)) / 2, (size[1] - (bottom - top)) / 2), text, fill=(230, 230, 230), font=font)
    return encode_jpeg(np.asarray(picture))
