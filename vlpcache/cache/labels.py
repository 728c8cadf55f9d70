"""The names of the labels a cache stores, without torch: `vlpcache search`, `inspect --render` and the
serve page print them. A cache's detector decides its vocabulary: COCO's 80 classes (yolox, frcnn) or
Visual Genome's 1,600 objects and 400 attributes (vg; files in vocab/, with their source and licence).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from vlpcache.cache.schema import FRAME_REGION_LABEL, VALUE_BOUNDS, detector_name

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


NO_ATTRIBUTE = -1  # the attribute label of regions without one: every region of detectors without attributes


@dataclass(frozen=True)
class RegionNames:
    """How one cache's integer labels read: its detector's class names, and attribute names where it has them."""

    vocabulary: str  # where the names come from
    classes: tuple[str, ...]
    attributes: tuple[str, ...] = ()

    def describe(self) -> str:
        """e.g. "Visual Genome: 1600 objects, 400 attributes"."""
        counts = f"{len(self.classes)} objects, {len(self.attributes)} attributes" if self.attributes else f"{len(self.classes)} classes"
        return f"{self.vocabulary}: {counts}"

    def label(self, label: int, attribute: int = NO_ATTRIBUTE) -> str:
        """"frame" for the whole-frame region, else the class name, with its attribute before it ("red car")."""
        if label == FRAME_REGION_LABEL:
            return "frame"
        name = self.classes[label] if 0 <= label < len(self.classes) else f"class{label}"
        return f"{self.attributes[attribute]} {name}" if 0 <= attribute < len(self.attributes) else name

    def of(self, item: dict, t: int, n: int) -> str:
        """The name of region n of frame t of a cached item: its label, with its attribute where it has one."""
        attribute = int(item["attributes"][t, n]) if "attributes" in item else NO_ATTRIBUTE
        return self.label(int(item["labels"][t, n]), attribute)


COCO = RegionNames("COCO", COCO_CLASSES)


def vocabulary_file(name: str) -> tuple[str, ...]:
    """One class per line; the first of its comma-separated synonyms is its name."""
    lines = files("vlpcache.cache").joinpath("vocab", name).read_text(encoding="utf-8").splitlines()
    return tuple(line.split(",")[0].strip() for line in lines)


@cache
def visual_genome() -> RegionNames:
    """Visual Genome's 1,600 objects and 400 attributes, in the order of the vg detector's outputs."""
    return RegionNames("Visual Genome", vocabulary_file("vg_objects.txt"), vocabulary_file("vg_attributes.txt"))


def region_names(detector: str) -> RegionNames:
    """The vocabulary of a cache made by `detector` (CacheSettings.detector, e.g. "vg:..." or "yolox:...")."""
    return visual_genome() if detector_name(detector) == "vg" else COCO


def value_bounds(detector: str) -> dict[str, tuple[float, float]]:
    """schema.VALUE_BOUNDS, with those of the labels and attributes of a cache made by `detector`: its
    vocabulary's, or FRAME_REGION_LABEL and NO_ATTRIBUTE."""
    names = region_names(detector)
    return {**VALUE_BOUNDS, "labels": (FRAME_REGION_LABEL, len(names.classes) - 1),
            "attributes": (NO_ATTRIBUTE, len(names.attributes) - 1)}
