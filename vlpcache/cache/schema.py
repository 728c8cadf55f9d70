"""The HDF5 region-cache format, defined once; the shard writer and the reader both import it.

A cache is a directory:

    manifest.json                  settings and provenance every shard must share (CacheSettings)
    shards/<writer>-<seq>.h5       finished shards; a shard is renamed here only once complete
    shards/<writer>-<seq>.h5.tmp   the shard being written (ignored by readers, redone on resume)
    moves/<writer>.jsonl           one JSON line per cached item found at another path: {"id", "from", "to"}
    failures/<writer>.jsonl        one JSON line per failed item: {"id", "path", "reason"}
                                   (an item kept despite problems carries them in its shard's "notes")
    locks/<writer>.lock            held (fcntl) by the one process writing <writer>'s files; freed when it exits

Per shard file, V videos with fixed-shape arrays (T frames, N regions per frame, D feature dims),
chunked one video per chunk so that one training read is one chunk read.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import numpy as np

from vlpcache.records import JsonRecord

SCHEMA_VERSION = 2
# what changed at each version, for the message that tells a user why an older cache must be re-extracted
SCHEMA_CHANGES = {
    2: "the whole-frame region's feature is the exact mean of the feature map over the frame "
       "(schema 1 sampled it with a 2x2 RoIAlign)",
}

def not_finite(arrays: dict) -> str:
    """The name of the first floating array holding a NaN or an infinity, "" when none does: extract never
    writes one, so a reader takes one for damage the chunk checksum missed (fletcher32 cannot tell a 16-bit
    word of zeros from one of ones)."""
    return next((name for name, a in arrays.items()
                 if isinstance(a, (np.ndarray, np.generic)) and a.dtype.kind == "f" and not _all_finite(a)), "")


# a float's bits as an unsigned integer, and its exponent's: all ones is a NaN or an infinity
_EXPONENT_BITS = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000),
                  np.dtype(np.float64): (np.uint64, 0x7FF0000000000000)}


def _all_finite(a: np.ndarray) -> bool:
    """np.isfinite(a).all(), by the exponent bits where it can: every read a training step makes checks one
    item's features, and np.isfinite takes 0.53 ms for an MSR-VTT item's float16 ones (8 x 31 x 1280), the
    bits 0.05 ms."""
    if (bits := _EXPONENT_BITS.get(a.dtype)) is None:
        return bool(np.isfinite(a).all())
    kind, exponent = bits
    return not ((a.view(kind) & kind(exponent)) == kind(exponent)).any()


# The values extract writes, (lowest, highest) per array: detectors' boxes are clipped to the frame
# (regions.pack_frame_regions), 1e-3 past it is rounding; times and durations count seconds from the file's
# start (sampling clamps a frame that starts before the video to the video's start); a backbone's features are
# tens at most (mobilenet_v2's ReLU6: 6), and a projection of ones near float16's 65504 overflows in fp16
# autocast. Labels and attributes: labels.value_bounds, by the cache's vocabulary.
BOX_SLACK = 1e-3
FEATURE_LIMIT = 4096.0
VALUE_BOUNDS: dict[str, tuple[float, float]] = {
    "boxes": (-BOX_SLACK, 1.0 + BOX_SLACK), "timestamps": (0.0, np.inf), "duration": (0.0, np.inf),
    "features": (-FEATURE_LIMIT, FEATURE_LIMIT),
}


def out_of_range(arrays: dict, bounds: dict[str, tuple[float, float]]) -> str:
    """What the first of `arrays` that has bounds holds past them ("its 'boxes' hold 3e+38, not within [-0.001,
    1.001]"), "" when none does: extract never writes such a value (a row with one is damage no checksum saw, or
    made by hand), and read as a number it made an index's embedding NaN and a training run's loss."""
    for name, (low, high) in bounds.items():
        a = arrays.get(name)
        if not isinstance(a, (np.ndarray, np.generic)) or a.size == 0:  # a per-video scalar reads as np.float32
            continue
        if _within(a, low, high):
            continue
        least, most = float(a.min()), float(a.max())
        return f"its {name!r} hold {least if least < low else most:.4g}, not within [{low:.4g}, {high:.4g}]"
    return ""


def _within(a: np.ndarray, low: float, high: float) -> bool:
    """low <= a <= high; for float16 by the bits, where the bounds are -m and m: numpy's float16 min and max take
    4.5 ms for an MSR-VTT item's features (8 x 31 x 1280), the largest magnitude by the bits 0.05 ms."""
    if a.dtype == np.float16 and low == -high:
        return float(np.array((a.view(np.uint16) & np.uint16(0x7FFF)).max(), np.uint16).view(np.float16)) <= high
    return low <= a.min() and a.max() <= high


MANIFEST_NAME = "manifest.json"
# manifest.json's random id of the collection, drawn when the cache is created (not a setting: CacheSettings
# leaves it out): a copy or a move of the cache is the same collection, a cache extracted elsewhere another
COLLECTION_KEY = "collection"
SHARD_DIR = "shards"
FAILURE_DIR = "failures"
MOVES_DIR = "moves"  # a cached item found under its id at another path, its old file gone: the reader's path is the new one
DAMAGED_DIR = "damaged"  # rows found damaged by a read (a checksum failure): the reader leaves them out, extract redoes them
REMOVED_DIR = "removed"  # rows of items whose files are no longer there, dropped by `extract --prune`: left out
PASSED_OVER_SUFFIX = ".passed-over.json"  # failures/<writer>.passed-over.json: paths discovery left out
LOCK_DIR = "locks"
SHARD_SUFFIX = ".h5"
# HDF5 file format bounds of every .h5 file vlpcache writes: HDF5 1.10's (its chunk indexes for arrays appended to,
# which "latest" chose before), which every h5py this package admits reads (3.9 on HDF5 1.10 or 1.12 included).
# "latest" is the writing library's own: HDF5 2.0's wrote layout messages HDF5 1.12 cannot read
HDF5_FORMAT = ("v110", "v110")
TMP_SUFFIX = ".tmp"

# label of the whole-frame region that every frame carries at region index 0
FRAME_REGION_LABEL = -1

# detection settings every cache records (CacheSettings); extract uses these unless told otherwise
SCORE_THRESHOLD = 0.1  # detections below this score are dropped
NMS_IOU = 0.5  # class-agnostic NMS: of two boxes overlapping more, the lower-scored one goes
SHARD_ITEMS = 512  # videos per shard file: a crash loses at most the shard in progress
SHARD_SECONDS = 120.0  # a shard is also committed after this long

# the settings that decide what a region feature means: a model reads a cache, and caches mix into
# one training set, only where these agree (frames and regions per frame may differ)
FEATURE_SETTINGS = (
    "schema_version", "feature_dim", "detector", "detector_weights_sha256", "backbone", "backbone_weights_sha256",
)
# the backbone's weights are the same where both records name the same tensors (backbone_tensors_sha256: torch.save
# of the same state dict is another file, of another sha256, under another torch version), else where they name the
# same file; compared by weights_difference, not key by key
WEIGHTS_FILE, WEIGHTS_TENSORS = "backbone_weights_sha256", "backbone_tensors_sha256"


def weights_difference(mine: dict, theirs: dict) -> tuple[str, Any, Any] | None:
    """(key, my value, theirs) of the backbone weights in which two settings records differ, None where they are
    the same weights (see WEIGHTS_TENSORS). A record that names no weights file (a run's, partly) is not compared."""
    if WEIGHTS_FILE not in theirs or WEIGHTS_FILE not in mine:
        return None
    if mine.get(WEIGHTS_TENSORS) and theirs.get(WEIGHTS_TENSORS):
        key = WEIGHTS_TENSORS
    else:  # one of them was written before trunks were identified by their tensors: by the file
        key = WEIGHTS_FILE
    return None if mine[key] == theirs[key] else (key, mine[key], theirs[key])


def weights_differences(mine: dict, theirs: dict) -> list[str]:
    """weights_difference as CacheSettings.differences words each setting: ["key: mine != theirs"], or []."""
    weights = weights_difference(mine, theirs)
    return [f"{weights[0]}: {weights[1]!r} != {weights[2]!r}"] if weights else []


@dataclass(frozen=True)
class ArraySpec:
    name: str
    dims: tuple[str, ...]  # symbolic shape after the leading video axis V
    dtype: Any
    attributes_only: bool = False  # only in caches whose detector labels attributes (CacheSettings.attributes)


# Per-video arrays; "T", "N", "D" and "4" are resolved from CacheSettings.
ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("features", ("T", "N", "D"), np.float16),
    ArraySpec("boxes", ("T", "N", "4"), np.float32),  # normalised x1, y1, x2, y2 in [0, 1]
    ArraySpec("scores", ("T", "N"), np.float16),
    ArraySpec("labels", ("T", "N"), np.int16),  # COCO class index, FRAME_REGION_LABEL for the whole frame
    ArraySpec("region_mask", ("T", "N"), np.bool_),
    ArraySpec("frame_mask", ("T",), np.bool_),
    ArraySpec("timestamps", ("T",), np.float32),  # seconds from the file's start (older shards: TIMES_ATTR)
    ArraySpec("frame_size", ("2",), np.int32),  # original (height, width) in pixels
    ArraySpec("duration", (), np.float32),  # seconds; 0 for still images and frame folders
    # vg only: each region's best attribute (Visual Genome's 400; labels.NO_ATTRIBUTE = -1 for none) and its score
    ArraySpec("attributes", ("T", "N"), np.int16, attributes_only=True),
    ArraySpec("attribute_scores", ("T", "N"), np.float16, attributes_only=True),
)
# Per-video strings (variable-length UTF-8). "notes": what went wrong with an item that was kept anyway
# ("1 of 40 frames unreadable, ..."), "" for most; "sources": the stamp of the file or folder it was
# extracted from (vlpcache/extract/stamps.py); "replaces": for an item extracted again because its source
# changed, the stamp of the row it replaces ("" for most). An id in two shards is read from the row no
# other row replaces. Older shards lack these and read as "" for all.
STRINGS: tuple[str, ...] = ("ids", "paths", "kinds", "notes", "sources", "replaces")
# shard attribute: when the shard was committed (time.time()), 0 for shards without it; of two rows of an
# id that neither replaces (two writers given overlapping work), the one committed last is read
COMMITTED_ATTR = "committed"
# shard attribute: where its videos' timestamps count from. TIMES_FROM_FILE: the file's start, as players and
# `ffmpeg -ss` count; shards without it were written when they counted from the video stream's first frame
# (TIMES_FROM_VIDEO), which differs only where the video starts after another stream (audio, by -itsoffset or a
# cut): such a video's thumbnails are read back at that count, its times are printed as stored
TIMES_ATTR = "times_from"
TIMES_FROM_FILE, TIMES_FROM_VIDEO = "file start", "video start"


@dataclass(frozen=True)
class CacheSettings(JsonRecord):
    """Everything that must be equal for two extraction runs to write into one cache."""

    frames: int  # T
    regions: int  # N, including the whole-frame region
    feature_dim: int  # D
    detector: str
    detector_weights_sha256: str
    backbone: str
    backbone_weights_sha256: str  # of the file; frcnn and vg: their one weights file
    # the sha256 of the trunk's tensors (state_dicts.tensors_sha256), of yolox's MobileNetV2 trunk file; "" for the
    # others and in caches written before it was recorded (see weights_difference)
    backbone_tensors_sha256: str = ""
    sampling: str = "segment-centres"
    score_threshold: float = SCORE_THRESHOLD
    nms_iou: float = NMS_IOU
    schema_version: int = SCHEMA_VERSION
    attributes: bool = False  # items also hold the attribute arrays (the vg detector's); older caches have none
    extra: dict = field(default_factory=dict)

    def arrays(self) -> tuple[ArraySpec, ...]:
        """The ARRAYS this cache holds: all but the attribute arrays unless its detector labels attributes."""
        return tuple(spec for spec in ARRAYS if self.attributes or not spec.attributes_only)

    def shape_of(self, spec: ArraySpec) -> tuple[int, ...]:
        sizes = {"T": self.frames, "N": self.regions, "D": self.feature_dim, "4": 4, "2": 2}
        return tuple(sizes[d] for d in spec.dims)

    def differences(self, other: "CacheSettings") -> list[str]:
        """Human-readable list of the settings in which two caches differ."""
        mine, theirs = self.to_json(), other.to_json()

        def shown(key: str, value) -> str:  # regions count the whole-frame region; --regions does not
            return f"{value!r} ({value - 1} + the whole frame)" if key == "regions" and isinstance(value, int) else repr(value)

        diffs = [f"{k}: {shown(k, mine[k])} != {shown(k, theirs.get(k))}" for k in mine
                 if k not in (WEIGHTS_FILE, WEIGHTS_TENSORS) and mine[k] != theirs.get(k)]
        return diffs + weights_differences(mine, theirs)

    def feature_differences(self, other: "CacheSettings | dict") -> list[str]:
        """Human-readable list of the FEATURE_SETTINGS in which `other` differs: empty when a model
        trained on one reads the other, and when the two caches may feed one model. `other` may be the
        settings a run recorded (a dict); settings it does not record are not compared."""
        mine = self.to_json()
        theirs = other if isinstance(other, dict) else other.to_json()
        diffs = [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in FEATURE_SETTINGS
                 if k != WEIGHTS_FILE and k in theirs and theirs[k] != mine[k]]
        return diffs + weights_differences(mine, theirs)


def detector_name(detector: str) -> str:
    """The detector of a CacheSettings.detector record, as --detector names it ("yolox:yolox_nano_coco.onnx": the
    detector, then its weights)."""
    return detector.split(":", 1)[0]


SETTING_DEFAULTS = {f.name: f.default for f in fields(CacheSettings) if f.default is not MISSING}


def outdated_schema(settings: CacheSettings) -> str | None:
    """Why a cache written by an older vlpcache differs from what extract writes now; None if current."""
    if settings.schema_version >= SCHEMA_VERSION:
        return None
    changes = "; ".join(text for version, text in sorted(SCHEMA_CHANGES.items()) if version > settings.schema_version)
    return f"written with cache schema {settings.schema_version}, this vlpcache writes {SCHEMA_VERSION} ({changes})"


def shard_attrs(settings: CacheSettings, tool_version: str) -> dict[str, Any]:
    """Provenance attributes stored on every shard file, so a shard read alone is self-describing."""
    attrs = {k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in settings.to_json().items()}
    attrs["vlpcache_version"] = tool_version
    attrs[TIMES_ATTR] = TIMES_FROM_FILE
    return attrs


def shard_differences(settings: CacheSettings, attrs, array_shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """How a shard file disagrees with `settings` (the manifest's, or what extract is asked for), by its own
    attributes (shard_attrs) and the shapes of its arrays; empty when it agrees. Each entry reads
    "frames 4, not 8": the shard's value, then the one of `settings`."""
    diffs, expected_record, recorded = [], settings.to_json(), {}
    for key, expected in expected_record.items():
        if key not in attrs:
            # a setting newer than the shard reads as its default; its trunk is then known by its file
            if expected != SETTING_DEFAULTS.get(key, MISSING) and key != WEIGHTS_TENSORS:
                diffs.append(f"{key} missing, not {expected!r}")
            continue
        value = attrs[key]
        value = value.item() if isinstance(value, np.generic) else value
        if isinstance(expected, dict) and isinstance(value, str):
            value = json.loads(value)
        recorded[key] = value
        if key not in (WEIGHTS_FILE, WEIGHTS_TENSORS) and value != expected:
            diffs.append(f"{key} {value!r}, not {expected!r}")
    if weights := weights_difference(recorded, expected_record):
        diffs.append(f"{weights[0]} {weights[1]!r}, not {weights[2]!r}")
    if not diffs:  # attributes agree: the arrays must have the shapes they promise
        for spec in settings.arrays():
            shape = array_shapes.get(spec.name)
            if shape is None or tuple(shape[1:]) != settings.shape_of(spec):
                diffs.append(f"{spec.name} {shape and tuple(shape[1:])} per video, not {settings.shape_of(spec)}")
    return diffs


def layout_damage(settings: CacheSettings, columns: dict[str, tuple[tuple[int, ...], np.dtype]]) -> str:
    """How a shard's datasets ({name: (shape, dtype)}) break the layout that every shard keeps whatever its
    settings, "" where they keep it: each array of its ArraySpec's dtype, each of STRINGS strings, and all
    with a row per video of "ids". extract never writes such a shard (one made by hand or by another program):
    its reader takes it as unreadable, as a shard whose data does not read."""
    if "ids" not in columns:
        return "no 'ids'"
    rows = tuple(columns["ids"][0][:1])  # (V,): a scalar has none
    for name, (shape, _) in columns.items():
        if tuple(shape[:1]) != rows or not rows:
            return f"{name!r} has {shape[0] if shape else 'no'} rows, 'ids' {rows[0] if rows else 'no'}"
    for spec in settings.arrays():
        if spec.name in columns and columns[spec.name][1] != np.dtype(spec.dtype):
            return f"{spec.name!r} holds {columns[spec.name][1]}, not {np.dtype(spec.dtype)}"
    return next((f"{name!r} holds {columns[name][1]}, not strings" for name in STRINGS
                 if name in columns and columns[name][1].kind not in "OS"), "")


def empty_item(settings: CacheSettings) -> dict[str, np.ndarray]:
    """Zero arrays of the right shapes and dtypes for one video, all masks False."""
    return {s.name: np.zeros(settings.shape_of(s), dtype=s.dtype) for s in settings.arrays()}
