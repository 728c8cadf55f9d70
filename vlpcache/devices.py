"""The `--device auto|cpu|cuda` rule every command shares (docs/design.md, conventions).

torch is imported only when a device is resolved, so the command line reads DEVICES without it.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from vlpcache.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_DEVICE = "auto"


def resolve_device(device: str) -> torch.device:
    """auto: CUDA when torch sees a GPU, else CPU; cuda without a GPU is one clear error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch; use --device cpu or auto")
    return torch.device(device)


def release_freed_memory() -> None:
    """Hand the memory freed on glibc's heap back to the system (malloc_trim); nothing elsewhere. Tensors
    of a few MB a batch, freed between ones still held, stay on the heap as holes that are not reused:
    `vlpcache index` grew by 150 MB every 1,024 videos it encoded, 18 GB over 100k, and stays flat with this."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator is its own business
        pass
