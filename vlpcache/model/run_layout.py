"""The run directory, defined once and torch-free: what pretraining writes, and how `index`, `search`
and `eval` find the checkpoint to use (checkpoint.py writes and loads; search reads this without torch).

    <run>/config.json                 {"model": ModelConfig, "train": TrainConfig, "cache_settings": ..., ...}
    <run>/text/                       tokenizer and text-model architecture (config.json), no weights
    <run>/checkpoints/epoch-0003/     model.safetensors, training_state.pt, meta.json (written last)
    <run>/checkpoints/.epoch-0004.tmp-<pid>/   a checkpoint being written: never read, removed on resume
    <run>/checkpoints/partial-epoch-0004-step-120/  the place within epoch 4 (after 120 of its steps) that
                                      --resume continues from: saved every --save-every minutes and on Ctrl-C or
                                      SIGTERM, a new one before the one before it goes, all gone once epoch 4's
                                      checkpoint is; the files of a checkpoint; index, search and eval never load one
    <run>/best.json                   {"epoch": 3, "metrics": ...}: the epoch with the best validation
    <run>/log.jsonl, <run>/tensorboard/   a JSON line per epoch (LOG_FIELDS); TensorBoard events per step
    <run>/pretrain.lock               held (fcntl) by the process training the run; gone when it ends
    <run>/videos.npz                  which videos it trained and validated on (video_keys), for eval; a run
                                      started from another (--init) keeps that run's apart ("inherited")

A checkpoint counts once its meta.json exists ({"epoch", "sha256" of model.safetensors, "metrics",
"rerank_weight", ...}); older checkpoints are removed as new ones land, except the best.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from vlpcache.errors import UserError
from vlpcache.files import replace_atomically
from vlpcache.locks import Holder, holder_active, holder_of, lock_held
from vlpcache.records import read_json, read_optional_json

CONFIG_NAME = "config.json"
TEXT_DIR = "text"
CHECKPOINT_DIR = "checkpoints"
BEST_NAME = "best.json"
WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "training_state.pt"
META_NAME = "meta.json"
LOG_NAME = "log.jsonl"  # one JSON line per epoch, with the fields of LOG_FIELDS
LOG_FIELDS = {  # written by train.py, read by name by inspect_run.py (and by people: this is its schema)
    "epoch": "the epoch the line ends (1-based); an epoch redone after a resume has a later line",
    "step": "optimisation steps taken so far, this epoch's included",
    "loss": "mean training loss over the epoch's steps: contrastive + rwa_weight * rwa",
    "contrastive": "its mean text-video InfoNCE part",
    "rwa": "its mean region-word alignment part; absent when the run trains without it",
    "samples_per_s": "training videos a second over the epoch, all processes together",
    "epoch_seconds": "seconds of training in the epoch, validation not included",
    "precision": "the training step's arithmetic in the epoch (bf16, fp16 or fp32: what --precision resolved to "
                 "on the machine); absent in runs made before it was logged",
    "temperature": "the contrastive loss's learned temperature at the end of the epoch",
    "batch": "videos a step and process in the epoch: --batch-size, or the training videos a process has where they "
             "are fewer; absent in runs made before it was logged",
    "val": "validation metrics (R@1, R@5, R@10, MdR, MnR, queries, candidates, rerank_weight and rerank: "
           "the metrics of each re-rank weight tried); absent without validation captions",
    "val_seconds": "seconds the validation took; there when val is",
    "time": "when the line was written (seconds since the Unix epoch)",
    "resumed": "in the first epoch a `pretrain --resume` trained: where it went on from, {\"after_epoch\": the "
               "checkpoint's epoch (0: none yet), \"steps_done\": the steps of this epoch a saved place held (0: "
               "none), \"time\": when it resumed}; absent in other epochs (an epoch resumed twice: the last)",
}
TRAINING_LOCK_NAME = "pretrain.lock"
TENSORBOARD_DIR = "tensorboard"
VIDEOS_NAME = "videos.npz"  # "trained" and "validation": video_keys of the items, so eval can tell what the run saw
_EPOCH_DIR = re.compile(r"^epoch-(\d+)$")
_PARTIAL_DIR = re.compile(r"^partial-epoch-(\d+)-step-(\d+)$")
TEMPORARY_PATTERNS = (".epoch-*.tmp-*", ".partial-epoch-*.tmp-*")  # being written (globs within CHECKPOINT_DIR)


def epoch_dir(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"epoch-{epoch:04d}"


def partial_dir(run_dir: Path, epoch: int, steps_done: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"partial-epoch-{epoch:04d}-step-{steps_done}"


def temporary_checkpoint_dir(final: Path) -> Path:
    """Where checkpoint `final` is written before it is renamed into place (one per process)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def epoch_of(checkpoint: Path) -> int | None:
    """The epoch of a checkpoint directory (epoch-0003 -> 3), None for any other name."""
    m = _EPOCH_DIR.match(Path(checkpoint).name)
    return int(m.group(1)) if m else None


def checkpoints(run_dir: Path) -> dict[int, Path]:
    """epoch -> directory of every complete checkpoint (temporaries are never listed)."""
    found = {}
    try:
        for path in (Path(run_dir) / CHECKPOINT_DIR).glob("epoch-*"):
            epoch = epoch_of(path)
            if epoch is not None and (path / META_NAME).is_file():
                found[epoch] = path
    except PermissionError:  # another user's run this one may not read (made with umask 077): none it can load
        return {}
    return dict(sorted(found.items()))


def partial_checkpoints(run_dir: Path) -> dict[tuple[int, int], Path]:
    """(epoch, steps done in it) -> directory of each complete place within an epoch (with its meta.json),
    the latest last."""
    found = {}
    try:
        for path in (Path(run_dir) / CHECKPOINT_DIR).glob("partial-epoch-*"):
            m = _PARTIAL_DIR.match(path.name)
            if m and (path / META_NAME).is_file():
                found[(int(m.group(1)), int(m.group(2)))] = path
    except PermissionError:
        return {}
    return dict(sorted(found.items()))


def read_run_config(run_dir: Path) -> dict:
    return read_json(
        Path(run_dir) / CONFIG_NAME,
        missing=f"{run_dir}: not a pretraining run (no {CONFIG_NAME}); run `vlpcache pretrain` or pass --run",
        what="run config",
    )


LOCATED = ("caches", "captions", "val_captions")  # the train config's locations (absolute, as given)


def location_list(value) -> list[str]:
    """A train config location as a list: the caches and caption files are lists, val_captions a path or None."""
    return value if isinstance(value, list) else [value] if value else []


def located(path: str, made_in: str | None, run_dir: Path) -> str:
    """Where a location the run recorded is now. A run records the absolute paths of its caches and
    caption files, and where it was made (`made_in`, its folder then). The recorded path while it is
    there (a run copied into another project keeps reading its own data, not another cache that happens
    to sit at the same place); where it is gone and the run folder is elsewhere now (the project moved
    with its data), the same place relative to the run folder where that exists; else the recorded path
    (its reader says it is missing)."""
    if not path or not made_in or os.path.exists(path):
        return path
    here = os.path.realpath(run_dir)
    if os.path.normpath(made_in) != here:
        moved = os.path.normpath(os.path.join(here, os.path.relpath(path, made_in)))
        if os.path.exists(moved):
            return moved
    return path


def run_locations(run_dir: Path, train: dict) -> dict:
    """A run config's train section with its caches and caption files where they are now (located)."""
    made_in = train.get("made_in")
    found = dict(train)
    for key in LOCATED:
        value = train.get(key)
        if isinstance(value, list):
            found[key] = [located(p, made_in, run_dir) for p in value]
        elif isinstance(value, str):
            found[key] = located(value, made_in, run_dir)
    return found


def read_run_locations(run_dir: Path) -> dict:
    """The run config's train section, its locations where they are now (see located)."""
    train = read_run_config(run_dir).get("train", {})
    if not isinstance(train, dict):
        raise UserError(f"{Path(run_dir) / CONFIG_NAME}: unreadable run config (no train settings)")
    return run_locations(run_dir, train)


def read_best(run_dir: Path) -> dict | None:
    """best.json: {"epoch", "metrics"} of the best validation so far; None for a run without validation. Where a
    kill came between the newest checkpoint's save and best.json's, the checkpoint's own meta says it is the best:
    it is (the training state it holds compares the next epochs with its score; pruning must keep it)."""
    best = read_optional_json(Path(run_dir) / BEST_NAME)
    found = checkpoints(run_dir)
    if found and (newest := max(found)) != (best or {}).get("epoch"):
        meta = read_optional_json(found[newest] / META_NAME)
        if isinstance(meta, dict) and meta.get("best"):
            return {"epoch": newest, "metrics": meta.get("metrics", {})}
    return best


def read_checkpoint_meta(checkpoint: Path) -> dict:
    return read_json(checkpoint / META_NAME, missing=f"{checkpoint}: no {META_NAME}; not a complete checkpoint",
                     what="checkpoint meta")


def saved_place(run_dir: Path, done: int) -> dict | None:
    """The place saved within the epoch after `done` (the last epoch checkpointed): {"epoch", "steps_done",
    "steps_per_epoch" (None where its meta.json is unreadable), "path"}; None where there is none."""
    places = [(place, path) for place, path in partial_checkpoints(run_dir).items() if place[0] == done + 1]
    if not places:
        return None
    (epoch, steps), path = max(places)
    try:
        of = read_checkpoint_meta(path).get("steps_per_epoch")
    except UserError:
        of = None
    return {"epoch": epoch, "steps_done": steps, "steps_per_epoch": of if isinstance(of, int) else None,
            "path": str(path)}


def place_text(place: dict) -> str:
    """"its place in epoch 4 (after 120 of its 300 steps)"."""
    of = f" of its {place['steps_per_epoch']:,}" if place.get("steps_per_epoch") else ""
    return f"its place in epoch {place['epoch']} (after {place['steps_done']:,}{of} steps)"


def trainer_of(run_dir: Path) -> Holder | None:
    """The process training the run now (it holds the run's pretrain lock), as the lock file records it;
    None when none does."""
    lock = Path(run_dir) / TRAINING_LOCK_NAME
    holder = holder_of(lock)
    return holder if holder is not None and holder_active(lock, holder) else None


def being_trained_note(run_dir: Path, epoch: int | None, chosen: bool = True) -> str:
    """A note on a run some process trains now (its checkpoints may still change), "" for most runs;
    chosen: the checkpoint was the default (the best so far), not one the user named."""
    lock = Path(run_dir) / TRAINING_LOCK_NAME
    if not lock.exists() or lock_held(lock) is False:  # the kernel's table says at once (its record may not read)
        return ""
    holder = trainer_of(run_dir)
    if holder is None:
        return ""
    which = f"epoch {epoch}, the best so far" if chosen else f"epoch {epoch}"
    return (f"note: {Path(run_dir).name} is being trained now ({holder.describe()}): this is its {which}; a later "
            "epoch may replace it")


def resolve_checkpoint(run_dir: Path, checkpoint: str | int | os.PathLike | None = None) -> Path:
    """checkpoint: None (the best by validation, else the last), "best", "last", an epoch or a directory."""
    run_dir = Path(run_dir)
    found = checkpoints(run_dir)
    named = checkpoint in ("best", "last") or str(checkpoint).isdigit()  # never a folder of that name here
    if checkpoint is not None and not named and Path(str(checkpoint)).is_dir():
        return Path(checkpoint)
    if not found:
        if (holder := trainer_of(run_dir)) is not None:
            raise UserError(f"{run_dir}: no checkpoint yet; it is being trained ({holder.describe()}), and its first "
                            "checkpoint is saved at the end of its first epoch: wait for that, or pass another --run")
        raise UserError(f"{run_dir}: no checkpoint yet; run `vlpcache pretrain` (or --resume it) first")
    if checkpoint in (None, "best"):
        best = read_best(run_dir)
        if best and best.get("epoch") in found:
            return found[best["epoch"]]
        if checkpoint == "best":
            raise UserError(f"{run_dir}: no best checkpoint (the run had no validation captions); use 'last'")
        return found[max(found)]
    if checkpoint == "last":
        return found[max(found)]
    try:
        return found[int(checkpoint)]
    except (KeyError, ValueError):
        raise UserError(f"{run_dir}: no checkpoint {checkpoint!r}; there are epochs {sorted(found)}") from None


def designated_checkpoint_sha256(run_dir: Path) -> str | None:
    """sha256 of the weights that load_run(run_dir) loads by default (the best by validation, else the
    last), as its meta.json records it; None when the run has no checkpoint or the meta does not say."""
    try:
        chosen = resolve_checkpoint(run_dir)
    except UserError:
        return None
    meta = read_optional_json(chosen / META_NAME)
    return meta.get("sha256") if isinstance(meta, dict) else None


def last_saved(run_dir: Path) -> float:
    """When the run last saved a checkpoint (its newest checkpoint folder's time), else when its folder
    changed: what orders runs, not the folder's own time, which a file written into an old run (a resume
    that trains nothing, a record added) moves."""
    times = []
    for path in checkpoints(run_dir).values():
        try:
            times.append(path.stat().st_mtime)
        except OSError:  # removed by its trainer meanwhile
            continue
    return max(times) if times else Path(run_dir).stat().st_mtime


def runs_newest_first(runs_dir: Path) -> list[Path]:
    """The run directories under runs_dir that hold a complete checkpoint, the one that saved one last first."""
    runs = [p for p in Path(runs_dir).glob("*") if p.is_dir() and checkpoints(p)]
    return sorted(runs, key=last_saved, reverse=True)


def latest_run(runs_dir: Path) -> Path:
    """The run directory under runs_dir that saved a complete checkpoint last."""
    runs = runs_newest_first(runs_dir)
    if not runs:
        training = [(p.name, holder) for p in sorted(Path(runs_dir).glob("*")) if p.is_dir()
                    and (holder := trainer_of(p)) is not None]
        if training:  # started a moment ago: "no pretraining run" would send the user to start another
            name, holder = training[0]
            more = f" (and {len(training) - 1} more run(s))" if len(training) > 1 else ""
            raise UserError(f"no run in {runs_dir} has a checkpoint yet: {name} is being trained by {holder.describe()}"
                            f"{more}, and its first checkpoint is saved at the end of its first epoch: wait for that, "
                            "or pass --run")
        raise UserError(f"no pretraining run in {runs_dir}; run `vlpcache pretrain` first or pass --run")
    return runs[0]


def default_run(runs_dir: Path, cache_dir: Path) -> tuple[Path, str]:
    """The run index, search, serve and eval use without --run, and a note where it is not the latest: the latest
    (latest_run) among the runs trained on region features of the kind `cache_dir` holds; the latest of all where
    none is, or the cache cannot tell (the command then says what differs)."""
    from vlpcache.cache.manifest import read_manifest

    runs = runs_newest_first(runs_dir)  # listed once (each run's checkpoints), not again by latest_run
    latest = runs[0] if runs else latest_run(runs_dir)  # none: latest_run's line says why
    try:
        settings = read_manifest(cache_dir)
    except UserError:
        return latest, ""
    for run in runs:
        recorded = (read_optional_json(run / CONFIG_NAME) or {}).get("cache_settings")
        if not isinstance(recorded, dict) or not settings.feature_differences(recorded):
            note = "" if run == latest else (
                f"note: {latest.name}, the latest run, was trained on other region features than the cache {cache_dir} "
                f"holds; {run.name}, the latest trained on features of its kind, answers (--run chooses)")
            return run, note
    return latest, ""


def init_runs(run_dir: Path) -> list[Path]:
    """The runs a run started from (config.json's "init", --init), nearest first: its init run, that run's init...,
    those still there; [] for a run that began from random weights."""
    chain, run = [], Path(run_dir)
    while isinstance(init := (read_optional_json(run / CONFIG_NAME) or {}).get("init"), dict):
        run = Path(str(init.get("run")))
        if not (run / CONFIG_NAME).is_file() or run.resolve() in {r.resolve() for r in [Path(run_dir), *chain]}:
            break
        chain.append(run)
    return chain


def video_keys(ids: Iterable[str]) -> np.ndarray:
    """Sorted unique 64-bit keys of item ids (the first 8 bytes of the UTF-8 id's BLAKE2b): 8 bytes a video
    whatever its id's length, with a chance of a false match of about n / 2^64 per id looked up."""
    return np.unique(np.fromiter(map(_key, ids), dtype=np.uint64))


def video_key_each(ids: Iterable[str]) -> np.ndarray:
    """video_keys of each id in order, unsorted (uint64)."""
    return np.fromiter(map(_key, ids), dtype=np.uint64)


def content_keys(stamps: Iterable[str]) -> np.ndarray:
    """Sorted unique 64-bit keys of what sources hold, wherever they are and under whatever id: a source stamp's
    size, frame names and digest (extract/stamps.py), not its modification time; an unknown stamp gives none."""
    return video_keys(content for content in map(_content, stamps) if content)


def content_key_each(stamps: Iterable[str]) -> np.ndarray:
    """content_keys of each stamp in order, unsorted, 0 for an unknown stamp (no source's key, but 1 in 2^64)."""
    return np.fromiter((_key(content) if (content := _content(stamp)) else 0 for stamp in stamps), dtype=np.uint64)


def _content(stamp: str) -> str:
    parts = stamp.split(":")
    return ":".join((parts[1], parts[3], parts[4])) if len(parts) in (5, 6) and parts[0] == "1" else ""


def _key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


def save_run_videos(run_dir: Path, trained: Iterable[str], validation: Iterable[str],
                    inherited: np.ndarray | None = None, trained_stamps: Iterable[str] = (),
                    inherited_content: np.ndarray | None = None) -> None:
    """Record the item ids the run trains and validates on (videos.npz), whole or not at all; `inherited`:
    the video keys that the run it started from (--init) trained on, which its weights have seen too. Also
    the content keys (content_keys) of the sources it trains on and its --init run trained on, so that eval
    tells the same videos in another cache or under other ids."""
    arrays = {"trained": video_keys(trained), "validation": video_keys(validation),
              "trained_content": np.union1d(content_keys(trained_stamps), inherited_content if inherited_content is
                                            not None else np.zeros(0, np.uint64)).astype(np.uint64)}
    if inherited is not None:
        arrays["inherited"] = inherited
    replace_atomically(Path(run_dir) / VIDEOS_NAME, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")


def add_run_videos(run_dir: Path, trained: Iterable[str], validation: Iterable[str],
                   trained_stamps: Iterable[str] = ()) -> tuple[int, int, int, int] | None:
    """Add the videos a resumed run trains on now to its record, where they differ from those recorded
    (a caption file or cache changed since it began): (recorded, now, recorded but not now, now but not
    recorded) training videos; None when they are the same, or the record cannot be read."""
    recorded = read_run_videos(run_dir, inherited=False)
    now = video_keys(trained)
    if recorded is None or np.array_equal(recorded[0], now):
        return None
    arrays = {"trained": np.union1d(recorded[0], now), "validation": np.union1d(recorded[1], video_keys(validation)),
              "trained_content": np.union1d(read_trained_content(run_dir), content_keys(trained_stamps)).astype(np.uint64)}
    if len(recorded) > 2:
        arrays["inherited"] = recorded[2]
    replace_atomically(Path(run_dir) / VIDEOS_NAME, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")
    return len(recorded[0]), len(now), len(np.setdiff1d(recorded[0], now)), len(np.setdiff1d(now, recorded[0]))


def _stored_videos(run_dir: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a run's videos.npz; None where it has none, or it does not read (empty, damaged)."""
    try:
        with np.load(Path(run_dir) / VIDEOS_NAME) as stored:
            return {name: stored[name] for name in stored.files}
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def read_trained_content(run_dir: Path) -> np.ndarray:
    """The content keys of the sources a run (and its --init run) trained on; empty where it kept none (a run
    made before they were kept, a cache without stamps) or the record does not read."""
    stored = _stored_videos(run_dir) or {}
    return stored.get("trained_content", np.zeros(0, np.uint64))


def read_run_videos(run_dir: Path, inherited: bool = True) -> tuple[np.ndarray, ...] | None:
    """(trained, validation) video_keys of a run, or None for a run that has no record (made before it was kept)
    or one that cannot be read (empty, damaged): the record only adds to what eval and inspect say. Trained
    includes the videos of the run it started from (--init); inherited=False keeps those apart, a third array
    where there are any."""
    stored = _stored_videos(run_dir)
    if stored is None or "trained" not in stored or "validation" not in stored:
        return None
    if "inherited" not in stored:
        return stored["trained"], stored["validation"]
    if inherited:
        return np.union1d(stored["trained"], stored["inherited"]), stored["validation"]
    return stored["trained"], stored["validation"], stored["inherited"]
