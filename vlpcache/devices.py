"""The `--device auto|cpu|cuda` rule every command shares (docs/design.md, conventions).

torch is imported only when a device is resolved, so the command line reads DEVICES without it.
"""

from __future__ import annotations

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
