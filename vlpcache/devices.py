"""The `--device auto|cpu|cuda` rule every command shares (DESIGN.md section 5)."""

from __future__ import annotations

import torch

from vlpcache.errors import UserError


def resolve_device(device: str) -> torch.device:
    """auto: CUDA when torch sees a GPU, else CPU; cuda without a GPU is one clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch; use --device cpu or auto")
    return torch.device(device)
