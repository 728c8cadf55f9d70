"""Reading a weights file as a state dict (name -> tensor), the one rule every torch detector's files follow:
.safetensors, or torch's formats read with torch.load(weights_only=True) (never unpickling code), a
training checkpoint's {"model": state_dict} unwrapped."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in `path`; ValueError saying why when it is not one."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # absent, truncated, not torch's format, or code to unpickle
        raise ValueError(f"not a readable state dict ({type(err).__name__}: {err})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("not a state dict (name -> tensor) or {'model': state_dict}")
    return state


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """The sha256 of a state dict's tensors: each name (in sorted order), dtype, shape and bytes. The same tensors
    give the same hash however they were saved (torch.save under another torch version, its legacy format,
    safetensors); a changed value, shape or name gives another."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
