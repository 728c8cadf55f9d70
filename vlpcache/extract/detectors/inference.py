"""What the torch detectors (frcnn, vg) share on their device: decoded frames uploaded in one copy, and
the autocast precision chosen from the command line's `auto`, `fp16`, `bf16` or `none`."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

from vlpcache.errors import UserError

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """"auto": fp16 on CUDA, off on CPU; "none": off; else the named precision."""
    if choice == "auto":
        return torch.float16 if device.type == "cuda" else None
    if choice == "none":
        return None
    if choice not in AUTOCAST_DTYPES:
        raise UserError(f"unknown autocast {choice!r}; choose from auto, none, {', '.join(AUTOCAST_DTYPES)}")
    return AUTOCAST_DTYPES[choice]


def prepare_device(device: torch.device, choice: str, autotune: bool = True) -> torch.dtype | None:
    """The autocast precision of `choice` (autocast_dtype), with cuDNN told `autotune` (set_autotune)."""
    set_autotune(device, autotune)
    return autocast_dtype(choice, device)


def set_autotune(device: torch.device, autotune: bool) -> None:
    """On CUDA, turn cuDNN's autotuning on or off, either way, as the setting is process-wide: on, each new
    input shape costs seconds once (timing every algorithm of every convolution), then runs the fastest."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = autotune


def autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def frames_on_device(frames: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """(H, W, 3) uint8 frames as uint8 tensors on the device.

    On CUDA the uint8 pixels (4x smaller than float) go over in one non-blocking copy from a pinned
    staging buffer, or straight from frames that are already pinned tensors.
    """
    with warnings.catch_warnings():  # decoded frames may be read-only arrays; they are only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        pixels = [torch.as_tensor(f) for f in frames]  # (H, W, 3) uint8 each
    if device.type != "cuda":
        return pixels
    if all(p.is_pinned() for p in pixels):
        return [p.to(device, non_blocking=True) for p in pixels]
    sizes = [p.numel() for p in pixels]
    staging = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True)
    for chunk, p in zip(staging.split(sizes), pixels):
        chunk.copy_(p.reshape(-1))
    on_device = staging.to(device, non_blocking=True)
    return [chunk.view(p.shape) for chunk, p in zip(on_device.split(sizes), pixels)]
