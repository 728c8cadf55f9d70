"""Checkpoints of a run: written atomically by pretraining, loaded by index/search/eval (load_run).

The directory layout and the checkpoint lookup are run_layout.py's (torch-free, so that search can
read them without torch). A checkpoint is written whole into a temporary directory (files fsynced)
and renamed into place, so a kill -9 at any instant leaves the previous checkpoints intact and never
a partial one under a final name. Weights are safetensors; the optimizer state is loaded with
torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlpcache.errors import UserError
from vlpcache.report import printable
from vlpcache.files import (FULL_ERRNOS, current_umask, failure_errno, file_sha256, fsync_path, is_write_failure,
                            write_failure)
from vlpcache.model.run_layout import (
    BEST_NAME,
    CHECKPOINT_DIR,
    CONFIG_NAME,
    LOG_NAME,
    META_NAME,
    STATE_NAME,
    TEMPORARY_PATTERNS,
    TEXT_DIR,
    WEIGHTS_NAME,
    checkpoints,
    epoch_dir,
    partial_checkpoints,
    partial_dir,
    read_best,
    read_checkpoint_meta,
    read_run_config,
    resolve_checkpoint,
    temporary_checkpoint_dir,
)
from vlpcache.records import read_optional_json, write_json


def save_run_files(run_dir: Path, config: dict, tokenizer, text_config) -> None:
    """The run's config and text side, written once when a run starts."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(run_dir / TEXT_DIR)
    text_config.save_pretrained(run_dir / TEXT_DIR)
    write_json(run_dir / CONFIG_NAME, config)


def save_run_epochs(run_dir: Path, epochs: int) -> int | None:
    """Record a resumed run's new `--epochs` in its config.json (inspect's "N of M", a later --resume
    and the learning-rate schedule then agree); returns the number it replaced, None if unchanged."""
    config = read_run_config(run_dir)
    before = config["train"]["epochs"]
    if before == epochs:
        return None
    config["train"]["epochs"] = epochs
    write_json(Path(run_dir) / CONFIG_NAME, config)
    return before


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def remove_temporaries(run_dir: Path) -> None:
    """What killed runs left: checkpoints being written or pruned, and the folders of checkpoints whose
    removal a kill stopped halfway (before removals went through a temporary name)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    for pattern in TEMPORARY_PATTERNS:
        for tmp in folder.glob(pattern):
            shutil.rmtree(tmp, ignore_errors=True)
    for path in [*folder.glob("epoch-*"), *folder.glob("partial-epoch-*")]:
        if path.is_dir() and not (path / META_NAME).exists():  # never a checkpoint: renamed in once whole
            shutil.rmtree(path, ignore_errors=True)


def remove_checkpoint(path: Path) -> None:
    """Out of the list in one step (renamed to a temporary name), then deleted: a kill halfway leaves no
    checkpoint folder that has its meta.json and lacks its weights, nor an empty one."""
    doomed = path.with_name(f".{path.name}.tmp-pruned")
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(
    run_dir: Path, epoch: int, model: torch.nn.Module, training_state: dict, meta: dict, is_best: bool = False
) -> Path:
    """Write checkpoints/epoch-NNNN atomically, then drop older checkpoints except the best. A failed
    write (disk full, I/O error) is one line; the unfinished checkpoint goes, the earlier ones stay."""
    final = epoch_dir(run_dir, epoch)
    if (best := read_best(run_dir)) is not None and best != read_optional_json(Path(run_dir) / BEST_NAME):
        write_json(Path(run_dir) / BEST_NAME, best)  # a kill came before the last checkpoint's best.json: kept now
    meta = {**meta, "best": is_best}  # its own word, should a kill come before best.json says it (read_best)
    then = f"the checkpoint of epoch {epoch} is not saved, earlier ones are kept; make room and {resume_said(run_dir)}"
    try:
        _write_or_fail(final, epoch, model, training_state, meta, then)
    except _NoRoom as full:
        # the places within this epoch (and before) take a checkpoint's room each, and this checkpoint, which
        # they are of no use beside, would not fit on a disk that held the run before it saved places: every
        # resume from them would end here again
        if min(partial_checkpoints(run_dir), default=(epoch + 1,))[0] > epoch:
            raise full.error from None
        remove_partials(run_dir, up_to=epoch)
        try:
            _write_or_fail(final, epoch, model, training_state, meta, then)
        except _NoRoom as still:
            raise still.error from None
    if is_best:
        write_json(Path(run_dir) / BEST_NAME, {"epoch": epoch, "metrics": meta.get("metrics", {})})
    best = read_best(run_dir)
    for old_epoch, path in checkpoints(run_dir).items():
        if old_epoch < epoch and old_epoch != (best or {}).get("epoch"):
            remove_checkpoint(path)
    remove_partials(run_dir, up_to=epoch)  # the epoch's place within it is of no more use
    return final


def save_partial(run_dir: Path, epoch: int, steps_done: int, model: torch.nn.Module, training_state: dict,
                 meta: dict) -> Path:
    """Write checkpoints/partial-epoch-NNNN-step-S (the place after S steps of epoch NNNN: the files of a
    checkpoint) atomically, then drop every other such place: a kill at any instant leaves one to resume
    from. A failed write is one line, and the place saved before stays."""
    final = partial_dir(run_dir, epoch, steps_done)
    try:
        _write_or_fail(final, epoch, model, training_state, meta,
                       f"the place within epoch {epoch} is not saved (the one saved before, if any, is kept); make room")
    except _NoRoom as full:
        raise full.error from None
    for place, path in partial_checkpoints(run_dir).items():
        if place != (epoch, steps_done):
            remove_checkpoint(path)
    return final


class _NoRoom(Exception):
    """A write that found the disk full (ENOSPC, EDQUOT); `error` is its one line."""

    def __init__(self, error: UserError):
        self.error = error


def _write_or_fail(final: Path, epoch: int, model: torch.nn.Module, training_state: dict, meta: dict, then: str) -> None:
    """_write_checkpoint through a temporary folder, gone again where it fails; a failed write is one line
    (UserError, with `then`: what became of the work), raised as _NoRoom where the disk is full."""
    tmp = temporary_checkpoint_dir(final)
    try:
        _write_checkpoint(tmp, final, epoch, model, training_state, meta)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_write_failure(err):
            raise
        error = write_failure(tmp, err, then)
        if failure_errno(err) in FULL_ERRNOS:
            raise _NoRoom(error) from None
        raise error from None


def remove_partials(run_dir: Path, up_to: float = float("inf")) -> None:
    """Drop the places within epochs up to `up_to` (every one by default)."""
    for (epoch, _), path in partial_checkpoints(run_dir).items():
        if epoch <= up_to:
            remove_checkpoint(path)


def _write_checkpoint(tmp: Path, final: Path, epoch: int, model: torch.nn.Module, training_state: dict,
                      meta: dict) -> None:
    """The checkpoint's files into `tmp`, fsynced, then `tmp` renamed to `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, tmp / WEIGHTS_NAME, metadata={"epoch": str(epoch)})
    os.chmod(tmp / WEIGHTS_NAME, 0o666 & ~current_umask())  # safetensors writes 0600: others could not load it
    with open(tmp / STATE_NAME, "wb") as f:  # through a Python file: a failed write keeps its errno
        torch.save(training_state, f)
    meta = {**meta, "epoch": epoch, "sha256": file_sha256(tmp / WEIGHTS_NAME)}
    for name in (WEIGHTS_NAME, STATE_NAME):
        fsync_path(tmp / name)
    write_json(tmp / META_NAME, meta)  # last: a checkpoint counts once its meta.json exists
    if final.exists():  # the same epoch saved by a run that was killed before moving on: replace it
        remove_checkpoint(final)
    os.replace(tmp, final)
    fsync_path(final.parent)


def append_log_line(run_dir: Path, record: dict) -> None:
    """One JSON line at the end of the run's log.jsonl; a failed write is one line naming the file."""
    path = Path(run_dir) / LOG_NAME
    try:
        with open(path, "a") as log:
            log.write(json.dumps(record) + "\n")
    except OSError as err:
        then = f"the checkpoints saved before are kept; make room and {resume_said(run_dir)}"
        raise write_failure(path, err, then) from None


def resume_said(run_dir: Path) -> str:
    """How a run stopped by a full disk goes on: its own folder named (`--resume` alone takes the workspace's latest)."""
    return f"continue with `vlpcache pretrain --resume -o {printable(str(run_dir))}`"


def load_training_state(checkpoint_dir: Path) -> dict:
    path = checkpoint_dir / STATE_NAME
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises its own error types for damaged files
        raise UserError(f"{path}: unreadable training state ({_first_line(err)}); remove {checkpoint_dir} to resume from "
                        "the checkpoint before it, or start a new run") from None


def _first_line(err: Exception) -> str:
    """The gist of a library's error: its first line, up to the first full stop."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0][:200]


def load_weights(model: torch.nn.Module, checkpoint_dir: Path, part: bool = False) -> None:
    """The checkpoint's weights into `model`; `part`: the model is a part of the checkpoint's (the video side
    alone), whose own weights are all loaded and the others' passed over."""
    path = checkpoint_dir / WEIGHTS_NAME
    try:
        state = load_file(path)
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise UserError(f"{path}: unreadable checkpoint ({_first_line(err)})") from None
    own = model.state_dict()
    if part:
        state = {name: tensor for name, tensor in state.items() if name in own}
    # a tensor of another shape (the weights of another width): torch would raise, naming every one
    if other := next((name for name, tensor in state.items() if name in own and tensor.shape != own[name].shape), None):
        raise UserError(f"{path}: does not match the model of {checkpoint_dir.parent.parent / CONFIG_NAME} ({other}: "
                        f"{tuple(state[other].shape)} in the checkpoint, {tuple(own[other].shape)} in the model)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{path}: does not match the model of {checkpoint_dir.parent.parent / CONFIG_NAME} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


@dataclass
class LoadedRun:
    config: object  # ModelConfig
    checkpoint_path: Path
    checkpoint_sha256: str
    cache_settings: dict
    epoch: int
    metrics: dict
    run_dir: Path
    parts: tuple | Callable[[], tuple] = field(repr=False)  # (model, tokenizer), or what makes them at first use

    @property
    def model(self) -> torch.nn.Module:
        """AlignmentModel, eval mode."""
        return self._made()[0]

    @property
    def tokenizer(self):
        return self._made()[1]

    def _made(self) -> tuple:
        if callable(self.parts):
            self.parts = self.parts()
        return self.parts


RELOOKS = 3  # times load_run looks for the run's checkpoint again when the one it chose went meanwhile


def load_run(run_dir, device: str | torch.device = "cpu", checkpoint=None, video_only: bool = False,
             model_when_used: bool = False) -> LoadedRun:
    """The trained model of a run directory, ready for encoding (eval mode, on `device`). `video_only`: its
    video side alone (no text encoder, no tokenizer: encode_video only), without loading transformers' model
    code (about 3.5 s on 2 CPU cores). `model_when_used`: the model and tokenizer are made at their first use
    (`index` of an index up to date uses neither: the text model's code and weights took seconds to say so)."""
    from vlpcache.model.model import ModelConfig

    run_dir = Path(run_dir)
    stored = read_run_config(run_dir)
    checkpoint_dir = resolve_checkpoint(run_dir, checkpoint)
    config = ModelConfig.from_json(stored["model"])
    # a run being trained removes its older checkpoints as better ones land: one listed a moment
    # ago may be gone now, and the run's best or last is another one
    for attempt in range(RELOOKS + 1):
        if attempt:
            checkpoint_dir = resolve_checkpoint(run_dir, checkpoint)
        try:
            meta = read_checkpoint_meta(checkpoint_dir)
            parts = (lambda: _run_model(config, run_dir, checkpoint_dir, device, video_only)) if model_when_used else \
                _run_model(config, run_dir, checkpoint_dir, device, video_only)
            break
        except UserError:
            if checkpoint_dir.exists() or attempt == RELOOKS:
                raise
    if "rerank_weight" in meta:  # chosen on the validation set when this checkpoint was saved
        config.rerank_weight = float(meta["rerank_weight"])
    return LoadedRun(
        config=config,
        checkpoint_path=checkpoint_dir / WEIGHTS_NAME,
        checkpoint_sha256=meta.get("sha256") or file_sha256(checkpoint_dir / WEIGHTS_NAME),
        cache_settings=stored.get("cache_settings", {}),
        epoch=int(meta.get("epoch", 0)),
        metrics=meta.get("metrics", {}),
        run_dir=run_dir,
        parts=parts,
    )


def _run_model(config, run_dir: Path, checkpoint_dir: Path, device, video_only: bool) -> tuple:
    """A run's model with a checkpoint's weights, in eval mode on `device`, and its tokenizer (None: video_only)."""
    from vlpcache.model.model import AlignmentModel, load_text_backbone

    backbone, tokenizer = (None, None) if video_only else load_text_backbone(str(run_dir / TEXT_DIR), weights=False)
    model = AlignmentModel(config, backbone)
    load_weights(model, checkpoint_dir, part=video_only)
    return model.to(device).eval(), tokenizer
