"""Which items an extraction covers: video files, still images and folders of frames under the roots.

Rules (docs/design.md section 1):
- A video file or an image file is one item. Its id is its path relative to the root, without
  extension, with `/` separators (`clips/a b.mp4` -> `clips/a b`).
- A folder *below* a root whose direct children are images only (no videos, no subfolders holding
  media) is ONE "frames" item whose id is its relative path (`val/video7/0.jpg, 1.jpg` -> `val/video7`).
  A root's own images are image items, never a frames item, so that `extract flickr8k/images` gives
  one item per photo; to extract a single frames folder, give its parent as the root. With
  `--no-frame-folders` every image is an item (`coco/` holding `train2014/*.jpg`); a would-be frames
  folder whose images have `.txt` files of the same name beside them (an image-caption download) is
  said in one line.
- A root may be a single file; its id is its file name without extension.
- Media are known by their extension; a file with none (`clips/abc123`, as a download by id leaves
  it), or one of SNIFFED_SUFFIXES (`.unknown_video`, `.dat`), by its first bytes (MP4/MOV, Matroska/WebM,
  AVI, MPEG program and transport streams, FLV, ASF, Ogg, GIF; JPEG, PNG, WebP, TIFF, BMP).
- Hidden files and folders (name starting with `.`, e.g. macOS `._x.jpg`) are ignored silently;
  other files that are not media are counted by extension, for one line (OtherFiles). Symbolic links
  are followed, each real folder is walked once (no loops).
- Order is deterministic: roots in the order given, entries by natural name order (2.jpg < 10.jpg).
"""

from __future__ import annotations

import functools
import os
import re
import stat
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlpcache.captions import SIDECAR_SUFFIX
from vlpcache.errors import UserError
from vlpcache.files import IMAGE_EXTENSIONS, PLUGIN_IMAGE_EXTENSIONS
from vlpcache.report import printable

VIDEO_EXTENSIONS: frozenset[str] = frozenset({
    ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".gif", ".mpg", ".mpeg", ".m2v", ".wmv", ".asf",
    ".flv", ".f4v", ".ts", ".mts", ".m2ts", ".vob", ".3gp", ".3g2", ".ogv", ".ogg", ".divx", ".dv",
    ".mxf", ".rm", ".rmvb", ".y4m", ".nut",
})  # fmt: skip
# audio, in containers whose first bytes are those of video too (MP4, Matroska, Ogg, ASF): never said to be
# video under another extension by a run that finds no media
AUDIO_EXTENSIONS: frozenset[str] = frozenset({
    ".m4a", ".m4b", ".m4p", ".mka", ".oga", ".opus", ".wma", ".mp3", ".aac", ".flac", ".wav", ".aif", ".aiff", ".amr",
})  # fmt: skip
# known by their first bytes: no extension (downloads saved by id), yt-dlp's name for a download whose
# format it could not tell, a Video CD's MPEG files (MPEGAV/AVSEQ01.DAT)
SNIFFED_SUFFIXES: frozenset[str] = frozenset({"", ".unknown_video", ".dat"})

KINDS = ("video", "image", "frames")
SKIPPED = "skipped"  # in the reason of each discovery problem that leaves its path out
SIZES_DIFFER = "its images differ in size"  # a folder of photos, not frames: discovery's line, sampling's note


@dataclass(frozen=True)
class Item:
    id: str  # path relative to its root without extension, POSIX separators
    path: Path  # absolute path of the file or frames folder
    kind: str  # "video" | "image" | "frames"
    replaces: str = ""  # extracted again: the source stamp of the cached row it replaces (its source changed)


def natural_key(name: str) -> tuple:
    """Sort key in which digit runs compare as numbers: 2.jpg < 10.jpg; ties broken by the name."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)), name


def picture_beside(picture, picture_kind: str, video, video_kind: str) -> bool:
    """Whether a picture sits beside a video under its name (yt-dlp's --write-thumbnail, a phone's Live
    Photo): the walk takes the video for the id, and extract says why the picture is passed over."""
    picture, video = Path(picture), Path(video)
    return (picture_kind == "image" and video_kind == "video" and picture.parent == video.parent
            and picture.stem == video.stem)


def media_kind(path: Path, sniff: bool = False) -> str | None:
    """"video", "image" or None, by the extension; with sniff, a file with none (or another of
    SNIFFED_SUFFIXES) by its first bytes."""
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if suffix in IMAGE_EXTENSIONS or (suffix in PLUGIN_IMAGE_EXTENSIONS and suffix in photo_extensions()):
        return "image"
    if sniff and suffix in SNIFFED_SUFFIXES:
        return sniffed_kind(path)
    return None


# (offset, bytes, kind) of the formats a sniffed file is recognised by (RIFF, BMP and TS: in sniffed_kind)
SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (4, b"ftyp", "video"),  # MP4, MOV, M4V, 3GP (HEIF/AVIF photos are told apart by their brand below)
    (4, b"moov", "video"), (4, b"mdat", "video"), (4, b"wide", "video"),  # QuickTime without ftyp
    (0, b"\x1aE\xdf\xa3", "video"),  # Matroska, WebM
    (0, b"\x00\x00\x01\xba", "video"), (0, b"\x00\x00\x01\xb3", "video"),  # MPEG program / elementary stream
    (0, b"FLV\x01", "video"),
    (0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "video"),  # ASF, WMV
    (0, b"OggS", "video"),
    (0, b"GIF87a", "video"), (0, b"GIF89a", "video"),  # a GIF is a video, as .gif is
    (0, b"\xff\xd8\xff", "image"),  # JPEG
    (0, b"\x89PNG\r\n\x1a\n", "image"),
    (0, b"II*\x00", "image"), (0, b"MM\x00*", "image"),  # TIFF
)
HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis"})
AVIF_BRANDS = frozenset({b"avif", b"avis"})
TS_SYNC = 0x47  # MPEG transport stream: a sync byte opens each packet, 188 bytes (192 with M2TS's timestamps)
BMP_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})  # the DIB header versions
TS_PACKETS = 5  # sync bytes in a row that make a transport stream (a text file may start with "G", 0x47)
SNIFF_BYTES = TS_PACKETS * 192 + 4
SNIFFED_EXAMPLES = 3  # files of each unknown extension sniffed when a run finds no media (other_files)


def sniffed_kind(path: Path) -> str | None:
    """"video" or "image" by a file's first bytes, or None (unknown, unreadable, or a HEIF/AVIF photo,
    which the image decoder does not read). Only a regular file is opened: a named pipe would block."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return None
    if head[:4] == b"RIFF":
        return {b"AVI ": "video", b"WEBP": "image"}.get(head[8:12])
    # two bytes alone are too weak for BMP and one for TS: the reserved zeros and header size of a BMP,
    # the sync bytes of TS_PACKETS packets in a row
    if head[:2] == b"BM" and head[6:10] == bytes(4) and int.from_bytes(head[14:18], "little") in BMP_HEADER_SIZES:
        return "image"
    if any(len(head) > start + (TS_PACKETS - 1) * size and all(head[start + k * size] == TS_SYNC for k in range(TS_PACKETS))
           for start, size in ((0, 188), (4, 192))):
        return "video"
    if head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:  # a photo where its library is there (photo_extensions)
        return "image" if (".avif" if head[8:12] in AVIF_BRANDS else ".heic") in photo_extensions() else None
    for offset, signature, kind in SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return kind
    return None


@functools.cache
def photo_extensions() -> frozenset[str]:
    """Those of PLUGIN_IMAGE_EXTENSIONS this Python reads: .avif where Pillow has its AVIF plugin, .heic and
    .heif where pillow-heif is installed (its opener registered with Pillow here, once a process: every
    process that decodes asks this first, sampling.read_item included)."""
    from PIL import features

    found = {".avif"} if "avif" in features.modules and features.check_module("avif") else set()  # Pillow < 11.3: none
    try:
        import pillow_heif
    except ImportError:
        return frozenset(found)
    pillow_heif.register_heif_opener()
    return frozenset(found | {".heic", ".heif"})


def photos_hint(suffixes) -> str:
    """What to do with the phone or web photos among files passed over (their library is missing), or ""."""
    hints = []
    if {".heic", ".heif"} & set(suffixes):
        hints.append("HEIC photos: `pip install pillow-heif` (the heif extra) reads them, or convert them to JPEG")
    if ".avif" in suffixes:
        hints.append("AVIF photos: Pillow 11.3 or newer reads them (`pip install -U pillow`)")
    return f" ({'; '.join(hints)})" if hints else ""


def frame_files(folder: Path) -> list[Path]:
    """The frames of a frames folder: its image files (not hidden), in natural name order."""
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if not e.name.startswith(".") and _is_file(e)
                 and media_kind(folder / e.name, sniff=True) == "image"]
    return [folder / n for n in sorted(names, key=natural_key)]


def shard_of(item_id: str, n: int) -> int:
    """Which of n shards an item belongs to: crc32 of the UTF-8 id, the same on every machine and run."""
    return zlib.crc32(item_id.encode("utf-8")) % n


def discover_items(roots: list[Path], frame_folders: bool = True, others: OtherFiles | None = None,
                   linked: dict[str, str] | None = None,
                   known_frames: frozenset[str] | Callable[[], frozenset[str]] = frozenset()
                   ) -> tuple[list[Item], list[tuple[str, str]]]:
    """All items under the roots, and the problems met on the way as (path, reason); the reason of
    a path left out says SKIPPED. `others`, where given, collects the files in the roots' folders that are
    not media (a root file that is not is a problem). `linked`, where given, collects each symbolic link to a
    folder passed over for the folder's own path (its path -> the folder's). A folder of images whose first, middle
    and last differ in size holds photos, not one video's frames: each is an item (said in one line for all such
    folders); `known_frames`, the frames folders a cache holds as such (or what gives them, asked only where a
    folder of images is met: a collection of videos opens no cache for it), are not looked into again.

    Problems: a root that does not exist or is not media, a folder that cannot be read, a broken
    symbolic link with a media extension, a path that is not UTF-8, an id already taken (the first keeps it),
    and a frames folder whose images have caption files beside them (an image-caption download, taken
    as one video: said, not skipped). Without frame_folders every image is an item of its own.
    """
    walk = _Walk(frame_folders, others)
    walk.roots = [os.path.realpath(root) for root in roots if os.path.isdir(root)]
    walk.linked = linked if linked is not None else {}
    walk.known_frames = known_frames
    for root in roots:
        root = Path(root)
        if not root.exists():
            missing = "broken symbolic link" if root.is_symlink() else "does not exist"
            walk.problems.append((str(root), f"{missing}; {SKIPPED}"))
        elif root.is_dir():
            for item in walk.folder(_plain(root), _plain(root), is_root=True)[0]:
                walk.add(item)
        elif not root.is_file():  # a named pipe would block its reader for good
            walk.problems.append((str(root), f"{not_a_file(root)}; {SKIPPED}"))
        elif (kind := media_kind(root) or sniffed_kind(root)) is None:  # a file named: its bytes, whatever its name
            what = (f"{root.suffix or 'no extension'}, and its first bytes are of no known format"
                    if root.suffix.lower() in SNIFFED_SUFFIXES else "unknown extension, and its first bytes are of no "
                    "known format")
            walk.problems.append((str(root), f"not a video or image file ({what}); {SKIPPED}"))
        else:
            walk.add(Item(root.stem, _plain(root), kind))
    if walk.photo_folders:
        folder, (a, b) = walk.photo_folders[0]
        more = len(walk.photo_folders) - 1
        walk.problems.append((str(folder), f"{SIZES_DIFFER} ({a[0]}x{a[1]}, {b[0]}x{b[1]}): photos, not one video's "
                              f"frames, so each image is an item{f', as in {more} more such folder(s)' if more else ''} "
                              "(a folder of frames of one size is one item)"))
    return walk.items, walk.problems


def one_item(path: Path) -> Item:
    """The one item `path` is as a root of its own (a video or image file: the item of its name) or as a folder
    extract would find within its parent (a frames folder: a video's frames; or the one item a folder holds);
    else one clear error."""
    if not path.is_dir():
        items, problems = discover_items([path])
        if not items:
            raise UserError(f"{printable(str(path))}: {problems[0][1].replace(f'; {SKIPPED}', '')}")
        return items[0]
    walk = _Walk()
    items, _ = walk.folder(_plain(path.parent), _plain(path))
    if walk.problems and not items:
        raise UserError(f"{printable(walk.problems[0][0])}: {walk.problems[0][1].replace(f'; {SKIPPED}', '')}")
    if len(items) != 1:
        found = f"{len(items)} items (videos, photos or frames folders)" if items else "no videos or images"
        raise UserError(f"{printable(str(path))} is a folder of {found}: give one video, photo, or frames folder (a "
                        "folder of one video's frames)")
    return items[0]


def not_a_file(path: Path) -> str:
    """Why a path named like media is no item, where it is not a file: a broken symbolic link, or one to (or
    itself) a named pipe, a socket or a device, which are never opened (a pipe blocks its reader for good)."""
    if not os.path.exists(path):
        return "broken symbolic link"
    return f"{'symbolic link to something that is ' if os.path.islink(path) else ''}not a file (a device, a pipe or a socket)"


def _plain(root: Path) -> Path:
    """A root as an absolute path without `..` or `.` (`lab/../data` is `data`: the paths the cache keeps,
    search prints and later runs compare), where that is the same folder (through a symbolic link
    `link/..` is not the link's parent); else as given."""
    absolute = root.absolute()
    plain = Path(os.path.normpath(absolute))
    try:
        return plain if plain == absolute or os.path.samefile(plain, absolute) else absolute
    except OSError:  # not there (said below)
        return absolute


class _Walk:
    def __init__(self, frame_folders: bool = True, others: OtherFiles | None = None) -> None:
        self.frame_folders = frame_folders  # a folder of images only is one item (a video's frames)
        self.others = others if others is not None else OtherFiles()
        self.items: list[Item] = []
        self.problems: list[tuple[str, str]] = []
        self._owner: dict[str, Item] = {}  # id -> the item that took it
        self._visited: set[tuple[int, int]] = set()  # (st_dev, st_ino) of folders walked
        self.roots: list[str] = []  # the run's root folders, resolved: a link to a folder in them is not walked
        self.linked: dict[str, str] = {}  # such a link's path -> the folder's
        self.known_frames: frozenset[str] | Callable[[], frozenset[str]] = frozenset()  # folders cached as frames
        # folders: not looked into (a function: asked for them at the first folder of images)
        self.photo_folders: list[tuple[Path, tuple]] = []  # folders of images of several sizes, and two of them

    def frames_known(self) -> frozenset[str]:
        if callable(self.known_frames):
            self.known_frames = self.known_frames()
        return self.known_frames

    def photos_in(self, folder: Path, images: list[Path]) -> bool:
        """Whether a folder of images holds photos, not one video's frames: its first, middle and last image (in
        name order) are not all one size (a video's frames are; Flickr's photos are 500x375, 500x333...). Reads
        headers only (about 40 us an image); an image that does not open counts for nothing."""
        from PIL import Image

        sizes = []
        for path in dict.fromkeys((images[0], images[len(images) // 2], images[-1])):
            try:
                with Image.open(path) as image:
                    sizes.append(image.size)
            except Exception:  # a corrupt or unsupported image: decoding says what it is
                continue
            if sizes[-1] != sizes[0]:
                self.photo_folders.append((folder, (sizes[0], sizes[-1])))
                return True
        return False

    def walked_elsewhere(self, link: Path) -> str | None:
        """Where a symbolic link to a folder leads, where the walk of a root meets that folder by its own path
        (under a root, in no hidden folder); else None. A link met first in name order took that folder's items
        under its own ids (`a_link/x` for `z_real/x`), and the folder itself was passed over unsaid."""
        real = os.path.realpath(link)
        for root in self.roots:
            inside = os.path.relpath(real, root).split(os.sep)
            if inside[0] != ".." and not any(part.startswith(".") and part != "." for part in inside):
                return real
        return None

    def outside_the_roots(self, folder: Path) -> str | None:
        """Where `folder` leads where it is a symbolic link to a folder outside every root (a downloaded folder's
        `photos -> /home/me/private`, or `-> /`, which walks the whole disk); else None."""
        if not folder.is_symlink():
            return None
        real = os.path.realpath(folder)
        return None if any(os.path.relpath(real, root).split(os.sep)[0] != ".." for root in self.roots) else real

    def add(self, item: Item) -> None:
        if not is_utf8(str(item.path)):  # bytes of another encoding, as an unzipped Windows archive leaves them
            self.problems.append((str(item.path), "path is not valid UTF-8, which the cache stores ids and paths in; "
                                  f"{SKIPPED} (rename it, e.g. with convmv)"))
            return
        if (owner := self._owner.get(item.id)) is not None:
            beside = (" a picture beside a video of the same name (its thumbnail, a Live Photo's still), passed over "
                      "for the video;" if picture_beside(item.path, item.kind, owner.path, owner.kind) else "")
            self.problems.append((str(item.path), f"duplicate id '{item.id}' (already used by "
                                  f"{owner.path});{beside} {SKIPPED}"))
            return
        self._owner[item.id] = item
        self.items.append(item)

    def folder(self, root: Path, folder: Path, is_root: bool = False) -> tuple[list[Item], bool]:
        """The items in and below one folder (its own files first), and whether it holds any media."""
        try:
            stat = folder.stat()
            if (stat.st_dev, stat.st_ino) in self._visited:
                return [], False  # a symlink loop, or a second link to a folder already walked
            self._visited.add((stat.st_dev, stat.st_ino))
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: natural_key(e.name))
        except PermissionError:
            self.problems.append((str(folder), f"cannot read folder: permission denied; {SKIPPED}"))
            return [], False
        except OSError as err:
            self.problems.append((str(folder), f"cannot read folder: {err.strerror or err}; {SKIPPED}"))
            return [], False

        files, subfolders, texts = {}, [], set()  # files: path -> kind
        for entry in entries:
            path = folder / entry.name
            if _is_dir(entry):
                if entry.is_symlink() and (real := self.walked_elsewhere(path)) is not None:
                    self.linked[str(path)] = real
                    self.problems.append((str(path), f"a symbolic link to the folder {real}, which is extracted by its "
                                          f"own path; {SKIPPED}"))
                    continue
                subfolders.append(path)
            elif _is_file(entry):
                if (kind := media_kind(path, sniff=True)) is not None:
                    files[path] = kind
                    continue
                self.others.add(path)
                if path.suffix.lower() == SIDECAR_SUFFIX:  # a caption beside its image (img2dataset)
                    texts.add(path.stem)
            elif media_kind(path) is not None:  # named like media: a link to nothing, a named pipe, a socket, a device
                self.problems.append((str(path), f"{not_a_file(path)}; {SKIPPED}"))

        below, sub_has_media = [], False
        for sub in subfolders:
            sub_items, has_media = self.folder(root, sub)
            below += sub_items
            sub_has_media |= has_media
            if sub_items and (outside := self.outside_the_roots(sub)) is not None:  # said, not skipped
                self.problems.append((str(sub), f"a symbolic link to the folder {outside}, outside the folders given: "
                                      f"its {len(sub_items):,} item(s) are extracted under the link's name"))
        only_images = files and all(kind == "image" for kind in files.values())
        if (only_images and not sub_has_media and not is_root and self.frame_folders
                and (str(folder) in self.frames_known() or not self.photos_in(folder, list(files)))):
            described = [p for p in files if p.stem in texts]
            if len(described) * 2 >= len(files):
                self.problems.append((str(folder), f"its images have text files of the same name beside them (e.g. "
                                      f"{described[0].stem}.txt), as an image-caption download has; taken as one "
                                      f"video's {len(files)} frames: --no-frame-folders takes each image as an item"))
            return [Item(_relative_id(root, folder), folder, "frames")], True
        own = [Item(_relative_id(root, p.with_suffix("")), p, kind) for p, kind in files.items()]
        # a picture beside a video of the same name (yt-dlp's --write-thumbnail, a phone's Live Photo):
        # the video is the item, its picture the duplicate
        videos = {item.id for item in own if item.kind == "video"}
        own = ([item for item in own if item.kind != "image" or item.id not in videos]
               + [item for item in own if item.kind == "image" and item.id in videos])
        return own + below, bool(files) or sub_has_media


class OtherFiles:
    """The files a look for media passed over as no media, counted by extension, with the first few of each."""

    COMMONEST = 5  # extensions named in a line

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[Path]] = {}  # the first SNIFFED_EXAMPLES files met of each extension

    def add(self, path: Path) -> None:
        self.counts[suffix := path.suffix.lower() or "no extension"] += 1
        if len(seen := self.examples.setdefault(suffix, [])) < SNIFFED_EXAMPLES:
            seen.append(path)

    @property
    def total(self) -> int:
        return self.counts.total()

    def kinds(self) -> str:
        """"(.heic 3, .txt 1)", the commonest extensions, with what to do with phone photos."""
        commonest = self._commonest()
        kinds = ", ".join(f"{suffix} {n:,}" for suffix, n in commonest) + (", ..." if len(self.counts) > len(commonest) else "")
        return f"({kinds}){photos_hint(self.counts.keys())}"

    def disguised(self) -> str:
        """"; clip.bin is a video by its first bytes: ...", where a file of the commonest extensions is media
        under a name no extension rule covers: the first few of each are sniffed (those of SNIFFED_SUFFIXES
        were, and are no media; audio only looks like video); "" where none is."""
        found = next(((path, kind) for suffix, _ in self._commonest()
                      if suffix != "no extension" and suffix not in SNIFFED_SUFFIXES | AUDIO_EXTENSIONS
                      for path in self.examples[suffix] if (kind := sniffed_kind(path))), None)
        if found is None:
            return ""
        path, kind = found
        return (f"; {path} is {'a video' if kind == 'video' else 'an image'} by its first bytes: such "
                f"files need their format's extension (e.g. {'.mp4' if kind == 'video' else '.jpg'}; ffprobe names the format)")

    def _commonest(self) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:self.COMMONEST]  # ties in name order


def other_files(roots: list[Path], limit: int = 100_000) -> str:
    """What the roots hold instead of media, for the error of a run that found none: "its 4 file(s) have
    other extensions (.heic 3, .txt 1); media are known by ...", naming a file that is media by its first
    bytes under another extension (clip.bin) where one is; "it is empty". Up to `limit` files are counted."""
    existing = [root for root in map(Path, roots) if root.exists()]
    if not existing:
        return "it does not exist" if len(roots) == 1 else "none of them exists"
    others, special = OtherFiles(), 0
    walks = (os.walk(root) if root.is_dir() else [(root.parent, [], [root.name])] for root in existing)
    for top, folders, names in (step for walk in walks for step in walk):
        folders[:] = [f for f in folders if not f.startswith(".")]
        for name in sorted(names, key=natural_key):
            if name.startswith("."):
                continue
            if (Path(top) / name).is_file():
                others.add(Path(top) / name)
            else:  # a named pipe, a socket, a device: said apart, as not a file
                special += 1
        if others.total >= limit:
            break
    if not others.total and special:
        return "it holds no regular file (said above)" if len(roots) == 1 else "they hold no regular file (said above)"
    if not others.total:
        return "it is empty" if len(roots) == 1 else "they are empty"
    return f"{'its' if len(roots) == 1 else 'their'} {others.total:,}{'+' if others.total >= limit else ''} " \
           f"file(s) have other extensions {others.kinds()}; media are known by extension ({known_extensions()})" \
           f"{others.disguised()}"


def passed_over_line(others: OtherFiles) -> str | None:
    """What a run that found media says of the files beside them that are not (a folder of phone videos and
    HEIC photos, clips saved as .bin), or None where there are none; file names as they are (printable()
    them for a terminal)."""
    if not others.total:
        return None
    return f"extract: passed over {others.total:,} file(s) that are not videos or images {others.kinds()}" \
           f"{others.disguised()}"


def known_extensions() -> str:
    """The media extensions, said in a line: the common video ones, how many more, every image one, and
    which files are known by their first bytes instead (SNIFFED_SUFFIXES)."""
    common = (".mp4", ".mov", ".avi", ".mkv", ".webm")
    return (f"videos: {', '.join(common)} and {len(VIDEO_EXTENSIONS) - len(common)} more; "
            f"images: {', '.join(sorted(IMAGE_EXTENSIONS | photo_extensions()))}; a file without one, or named "
            f"{' or '.join(sorted(s for s in SNIFFED_SUFFIXES if s))}, by its first bytes")


def is_utf8(text: str) -> bool:
    """Whether text encodes as UTF-8: a file name of other bytes reaches Python as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _relative_id(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False
