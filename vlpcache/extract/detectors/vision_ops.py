"""torchvision's compiled `nms` and `roi_align`, without importing torchvision's Python package.

`import torchvision` imports its models, whose ops import torch._dynamo: 1.3-1.8 s of every extract's
start on this machine's CPUs, for the two operators the yolox detector calls. torchvision's compiled
library registers them as torch.ops.torchvision.*; loaded by its path they are the same kernels,
called as torchvision.ops calls them. Where the library is not found under the names below (another
torchvision build) or will not load, torchvision.ops is imported and used instead: slower to start,
the same numbers.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from functools import cache
from pathlib import Path

import torch

LIBRARY_NAMES = ("_C_stable", "_C")  # torchvision's compiled ops: 0.29's stable-ABI build, and before it


def library_path() -> Path | None:
    """Where torchvision's compiled ops are, found without running torchvision's __init__."""
    spec = importlib.util.find_spec("torchvision")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for name in LIBRARY_NAMES:
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                if (Path(folder) / f"{name}{suffix}").is_file():
                    return Path(folder) / f"{name}{suffix}"
    return None


@cache
def compiled_ops() -> bool:
    """True once torch.ops.torchvision holds nms and roi_align (loaded here, or by torchvision itself)."""
    if _registered():
        return True
    path = library_path()
    if path is None:
        return False
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError):  # another torch's ABI, a missing shared library
        return False
    return _registered()


def _registered() -> bool:
    try:
        torch.ops.torchvision.nms
        torch.ops.torchvision.roi_align
    except (AttributeError, RuntimeError):
        return False
    return True


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes (x1, y1, x2, y2) kept, by decreasing score: torchvision.ops.nms."""
    if compiled_ops():
        return torch.ops.torchvision.nms(boxes, scores, iou_threshold)
    from torchvision.ops import nms as torchvision_nms

    return torchvision_nms(boxes, scores, iou_threshold)


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float,
              sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """torchvision.ops.roi_align of (K, 5) rois (batch index, x1, y1, x2, y2) -> (K, C, size, size)."""
    # torchvision swaps in a Python version on GPUs when deterministic algorithms are asked for: so do we
    deterministic = torch.are_deterministic_algorithms_enabled() and features.device.type != "cpu"
    if compiled_ops() and not deterministic:
        return torch.ops.torchvision.roi_align(features, rois, spatial_scale, output_size, output_size,
                                               sampling_ratio, aligned)
    from torchvision.ops import roi_align as torchvision_roi_align

    return torchvision_roi_align(features, rois, output_size, spatial_scale=spatial_scale,
                                 sampling_ratio=sampling_ratio, aligned=aligned)
