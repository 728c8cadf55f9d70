"""`vlpcache pretrain --init RUN`: a new run that starts from another run's trained weights (pretrain on
a large collection, then fine-tune on the one you search), instead of from a random region encoder.

The new run takes the model of the run it starts from whole: its region transformer, projections,
temperatures and text encoder (weights and settings); its own are only those of training (epochs,
learning rates, batch, captions, dropouts, the RWA loss's weight, --no-rwa). An architecture option
that differs from the init run's is refused: its weights could not be loaded. Which layers of the text
encoder train is part of the model too: the layers below them were frozen in every run of the chain,
so they are the text model's own and the caption features cached for them stay true.

The run records where it began (config.json's "init": the run, the checkpoint's path, epoch and
sha256), so that --resume before its first checkpoint starts from the same weights, and it counts the
videos the init run trained on (and those that run began from) as trained on, for eval.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlpcache.errors import UserError
from vlpcache.files import file_sha256
from vlpcache.model.config import ModelConfig, PretrainOptions, differing_model_options
from vlpcache.model.run_layout import (CONFIG_NAME, TEXT_DIR, WEIGHTS_NAME, checkpoints, read_checkpoint_meta,
                                       read_run_config, read_run_videos, read_trained_content, resolve_checkpoint)
from vlpcache.report import printable

# ModelConfig fields a run that starts from another may set otherwise: they shape training, not the weights
TRAINING_FIELDS = ("rwa_weight", "frame_dropout", "region_dropout")


def init_record(path: str) -> dict:
    """What `--init PATH` starts from: a run's folder (its best checkpoint, else its last) or one of its
    checkpoint folders. {"run", "checkpoint", "epoch", "sha256"}; one line where PATH is neither."""
    given = Path(path)
    if not given.is_dir():
        raise UserError(f"--init {printable(path)}: no such folder; pass a run's folder (`vlpcache inspect --runs` lists "
                        "them) or one of its checkpoints/epoch-NNNN folders")
    run_dir = given.parent.parent if (given / WEIGHTS_NAME).is_file() else given
    if not (run_dir / CONFIG_NAME).is_file():
        raise UserError(f"--init {printable(path)}: not a run (no {CONFIG_NAME}) nor one of its checkpoints; pass a run's "
                        "folder or one of its checkpoints/epoch-NNNN folders")
    if run_dir == given and not checkpoints(run_dir):
        raise UserError(f"--init {printable(path)}: the run has no checkpoint yet; start from it once its first epoch "
                        "has ended")
    checkpoint = resolve_checkpoint(run_dir, None if run_dir == given else given)
    meta = read_checkpoint_meta(checkpoint)
    return {"run": str(run_dir.resolve()), "checkpoint": str(checkpoint.resolve()), "epoch": meta.get("epoch"),
            "sha256": meta.get("sha256")}


def init_settings(record: dict) -> tuple[ModelConfig, dict]:
    """The init run's model settings and the cache settings it was trained on."""
    stored = read_run_config(Path(record["run"]))
    return ModelConfig.from_json(stored["model"]), stored.get("cache_settings") or {}


def init_model_config(options: PretrainOptions, record: dict) -> ModelConfig:
    """The model of a run that starts from `record`: the init run's, with this run's training settings;
    an option that would change the architecture is refused, all of them in one line."""
    config, _ = init_settings(record)
    chosen = read_checkpoint_meta(Path(record["checkpoint"])).get("rerank_weight")
    if isinstance(chosen, (int, float)):  # the init checkpoint's, chosen on its validation (this run's, if any, wins)
        config.rerank_weight = float(chosen)
    conflicts = []
    for field, value, given, had in differing_model_options(options, config):
        if field in TRAINING_FIELDS:
            setattr(config, field, value)
        else:
            conflicts.append(f"{given} (it has {had})")
    if conflicts:
        raise UserError(f"--init {printable(record['run'])}: a run that starts from another keeps its model; these options "
                        f"differ: {'; '.join(conflicts)}. Leave them out, or train a new run without --init")
    if options.no_rwa:
        config.rwa = False
    return config


def check_init_features(record: dict, caches) -> None:
    """The caches must hold the region features the init run's weights were trained on."""
    _, recorded = init_settings(record)
    for cache in caches:
        if recorded and (diffs := cache.settings.feature_differences(recorded)):
            raise UserError(f"--init {printable(record['run'])}: {cache.cache_dir} holds other region features than it was "
                            f"trained on ({'; '.join(diffs)}); fine-tuning needs a cache extracted with the same "
                            "detector and settings")


def initial_model(record: dict, config: ModelConfig, run_dir: Path):
    """(model, tokenizer) with the init checkpoint's weights (torch imported here: config reading stays light)."""
    from vlpcache.model.checkpoint import load_weights
    from vlpcache.model.model import AlignmentModel, load_text_backbone

    check_init_source(record, run_dir)
    backbone, tokenizer = load_text_backbone(str(Path(record["run"]) / TEXT_DIR), weights=False)
    model = AlignmentModel(config, backbone)
    load_weights(model, Path(record["checkpoint"]))
    return model, tokenizer


def check_init_source(record: dict, run_dir: Path) -> None:
    """The checkpoint a run starts from (--init) must be there still, with the weights it had when the run began."""
    checkpoint, source = Path(record["checkpoint"]), Path(record["run"])
    if not (checkpoint / WEIGHTS_NAME).is_file() or not (source / TEXT_DIR).is_dir():
        raise UserError(f"{run_dir} starts from {printable(str(checkpoint))} (--init), which is not there any more "
                        f"(moved, or removed as {printable(str(source))} trained on), and has no checkpoint of its own "
                        "yet: start it anew, with another -o or after removing it, and --init where that checkpoint is now")
    recorded = record.get("sha256")  # None in a record older than the sha256: nothing to compare
    if recorded and file_sha256(checkpoint / WEIGHTS_NAME) != recorded:
        raise UserError(f"{run_dir} starts from {printable(str(checkpoint))} (--init, sha256 {recorded[:12]}), which holds "
                        f"other weights now ({printable(str(source))} trained again, or its checkpoint replaced), and has "
                        "no checkpoint of its own yet: start it anew, with another -o or after removing it, and --init "
                        "the weights you mean")


def inherited_content(record: dict) -> np.ndarray:
    """The content keys of the sources the init run trained on (run_layout.content_keys); empty where none kept."""
    return read_trained_content(Path(record["run"]))


def inherited_videos(record: dict) -> np.ndarray | None:
    """The video keys the init run trained on (its own init's included), or None where it kept no record."""
    recorded = read_run_videos(Path(record["run"]))
    return None if recorded is None else recorded[0]
