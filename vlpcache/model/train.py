"""The pretraining loop: AdamW, warmup + cosine, bf16 autocast where the hardware has it, gradient
clipping, a checkpoint and validation every epoch, resume after kill -9, DistributedDataParallel under
torchrun.

It reads as four steps, under the run's lock (one trainer per run directory): resolve the run
(options, or the stored settings on --resume, and the data), make the trainer (model, optimizer,
resumed state) and the loader, then one epoch and the end of an epoch (validation, checkpoint, logs)
until done. The loop knows the model only through
`model(batch) -> (text, video, scales)` and `PretrainLoss`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from vlpcache import __version__
from vlpcache.cache.reader import say_damage
from vlpcache.devices import cpu_flags, resolve_device, usable_cores
from vlpcache.errors import Interrupted, UserError
from vlpcache.files import replace_atomically
from vlpcache.interrupts import (leave_stops_to_the_parent, requested_signal, stop_if_interrupted, stop_requested,
                                 stop_signals_held, stopped, stops_deferred, take_request)
from vlpcache.locks import WriterLock, holder_description
from vlpcache.metrics import RERANK_CANDIDATES, reranked, retrieval_metrics, selection_score
from vlpcache.model import checkpoint as ckpt
from vlpcache.model.batch import read_texts, unknown_texts_line
from vlpcache.model.data import CaptionedRegions, CollateCaptionedRegions, PretrainData, ValidationSet, load_pretrain_data
from vlpcache.model.config import (
    MODEL_OPTIONS,
    PRECISIONS,
    RESUMABLE_OPTIONS,
    TRAIN_OPTIONS,
    ModelConfig,
    PretrainOptions,
    TrainConfig,
    captions_per_video_cap,
    differing_model_options,
)
from vlpcache.model.finetune import (check_init_features, check_init_source, inherited_content, inherited_videos,
                                     init_model_config, init_record, initial_model)
from vlpcache.model.model import (DEFAULT_TEXT_MODEL, AlignmentModel, PretrainLoss, build_model, check_text_model_findable,
                                  load_text_backbone, text_positions)
from vlpcache.model.retrieval import candidate_local_scores, encode_texts, encode_videos
from vlpcache.model.run_layout import (BEST_NAME, CHECKPOINT_DIR, LOCATED, LOG_NAME, TENSORBOARD_DIR, TEXT_DIR,
                                       TRAINING_LOCK_NAME, VIDEOS_NAME, add_run_videos, location_list,
                                       place_text, read_checkpoint_meta, run_locations,
                                       save_run_videos, saved_place, trainer_of)
from vlpcache.model.text_features import FEATURES_DIR, TextFeatures, cache_kind, cached_text_features
from vlpcache.records import json_lines, write_json
from vlpcache.report import human_duration, printable, progress_bar, say
from vlpcache.workspace import Workspace

RERANK_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)  # candidates for global + w·S_loc, chosen on validation


def learning_rate_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------- processes and devices


# rank 0's one-time work before training (encoding millions of captions) can take hours; a collective of
# the default group gives up after its timeout (10 minutes with NCCL, 30 with gloo) and ends the run
ONE_TIME_WORK_TIMEOUT = timedelta(hours=24)
GLOO_SETTLE_SECONDS = 0.5  # settle_before_destroy's wait on torch < 2.8
# Loading workers forked, as Python up to 3.13 starts them on Linux: Python 3.14's forkserver puts them under a
# server process that a job's SIGTERM kills, and torch's workers end when their parent changes, so a stop the
# training process would have made cleanly failed on its lost workers (leave_stops_to_the_parent)
LOADER_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    quiet: bool = False
    patient_group: object = None  # gloo, ONE_TIME_WORK_TIMEOUT: for waiting on rank 0's one-time work

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def wait_for_main(self) -> None:
        """A barrier that waits as long as rank 0's one-time work takes (up to ONE_TIME_WORK_TIMEOUT)."""
        if self.world > 1:
            dist.barrier(group=self.patient_group)

    def broadcast(self, value):
        """rank 0's value on every process."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def max_of(self, *values: int) -> list[int]:
        """Each value's largest over the processes (one small collective, on the CPU)."""
        if self.world == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.patient_group)
        return tensor.tolist()

    def random_states(self) -> list[dict]:
        """Every process's random state, in rank order, on rank 0 (its own alone elsewhere): what a resume
        gives each process back, so that its next draws are those of a run never stopped."""
        state = ckpt.rng_state()
        if self.world == 1:
            return [state]
        gathered = [None] * self.world if self.main else None
        dist.gather_object(state, gathered, dst=0, group=self.patient_group)
        return gathered if self.main else [state]

    def say(self, message: str, always: bool = False) -> None:
        """One line on stderr from the main process (unless --quiet, or `always`)."""
        if self.main and (always or not self.quiet):
            say(message)


def start_processes(device: str, quiet: bool) -> Processes:
    """One process, or one of torchrun's (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    device = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(device=device, quiet=quiet)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local_rank)
    else:
        dist.init_process_group("gloo")
    patient = dist.new_group(backend="gloo", timeout=ONE_TIME_WORK_TIMEOUT)
    return Processes(dist.get_rank(), world, device, quiet, patient)


NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # /proc/cpuinfo's names for AVX512-BF16 and AMX's bf16


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where autocast made MSR-VTT
    pretraining about 1.5x faster than fp32; elsewhere bf16 is emulated, about 19x slower. torch's own checks
    where it has them (torch 2.4, admitted, has neither), else the CPU's flags in `cpuinfo` (Linux); None where
    nothing can tell (an older torch on macOS)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(check is not None and check() for check in checks):
        return True
    if all(check is not None for check in checks):
        return False
    flags = cpu_flags(cpuinfo)
    return None if flags is None else bool(flags & NATIVE_BF16_FLAGS)


@dataclass
class Precision:
    autocast: object  # a no-argument function returning the context a training step runs in
    scaler: object  # a GradScaler for fp16, else None
    label: str  # what a person reads: "bf16", "fp16", "fp32"
    reason: str  # why, for the line pretraining says


def autocast_for(device: torch.device, precision: str = "auto") -> Precision:
    """The arithmetic of a training step on `device` (see TrainConfig.precision)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return Precision(nullcontext, None, "fp32", "as asked")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(lambda: torch.autocast("cuda", dtype=torch.bfloat16), None, "bf16", "autocast on CUDA")
        if precision == "bf16":
            raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16; "
                            "leave --precision out (fp16 with a gradient scaler) or pass --precision fp32")
        return Precision(lambda: torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda"), "fp16",
                         "autocast on CUDA, with a gradient scaler (this GPU has no bf16)")
    if device.type != "cpu":
        return Precision(nullcontext, None, "fp32", f"autocast is not used on {device.type}")
    native = cpu_has_native_bf16()
    if precision == "bf16" and native is False:  # emulated, a linear layer ran 10x and a batched matmul 35x slower (AVX2)
        raise UserError("--precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), and emulated bf16 makes "
                        "training 10x slower or more than fp32; pass --precision auto (fp32 on this CPU) or "
                        "--precision fp32 (with --resume too, where the run was started with bf16)")
    unknown = f"torch {torch.__version__} cannot tell whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX)"
    if native is None and precision == "auto":
        return Precision(nullcontext, None, "fp32", f"{unknown}; --precision bf16 where it does")
    if native is False:
        return Precision(nullcontext, None, "fp32", "this CPU has no native bf16 (AVX512-BF16 or AMX)")
    return Precision(lambda: torch.autocast("cpu", dtype=torch.bfloat16), None, "bf16",
                     "autocast; this CPU multiplies bf16 natively" if native else
                     f"autocast, as asked; {unknown}: emulated, bf16 is 10x slower or more")


# ---------------------------------------------------------------- step 1: the run


# the train config's locations and the options that give them (--resume takes them anew where they are gone)
LOCATION_OPTIONS = (("caches", "--cache"), ("captions", "--captions"), ("val_captions", "--val-captions"))


@dataclass
class Run:
    dir: Path
    train: TrainConfig
    model: ModelConfig
    data: PretrainData | None  # None: a resumed run with no epoch left to train (its data is not read)
    resumed: bool  # settings read back from the run's config.json
    init: dict | None = None  # the checkpoint it started from (--init; finetune.init_record), else None


def choose_run_dir(options: PretrainOptions, processes: Processes, workspace: Workspace) -> tuple[Path, bool]:
    """(-o RUN_DIR, else the latest run on --resume, else a new run-NNN claimed by creating it; whether
    this call is where the directory begins)."""
    if options.run_dir:
        run_dir = Path(options.run_dir)
        fresh = not run_dir.exists()
    else:  # every process must agree, so rank 0 decides
        run_dir = processes.broadcast(_latest_started_run(workspace) if options.resume
                                      else workspace.new_run_dir() if processes.main else None)
        fresh = not options.resume
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"-o {run_dir}: a file, not a run folder; pass another -o RUN_DIR")
    if not fresh and not (run_dir / ckpt.CONFIG_NAME).exists() and (others := not_of_a_run(run_dir)):
        held = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise UserError(f"{'--resume' if options.resume else '-o'} {run_dir}: not a run (no {ckpt.CONFIG_NAME}; it "
                        f"holds {held}): " + ("pass a run's folder (`vlpcache inspect --runs` lists them)"
                                              if options.resume else "a run gets a folder of its own; pass a new or "
                                              "empty -o RUN_DIR"))
    return run_dir, fresh


def begun_if_nothing_saved(options: PretrainOptions, run_dir: Path, fresh: bool, processes: Processes) -> PretrainOptions:
    """`--resume -o RUN` where RUN holds nothing to resume (no run began there, or one was stopped before its
    settings were saved) begins it with the options given, so that one command serves a job requeued before
    and after its first save (a Slurm script); where it holds settings they must agree (_stored_settings)."""
    if not (options.resume and options.run_dir):
        return options
    if not processes.broadcast(not (run_dir / ckpt.CONFIG_NAME).exists() if processes.main else None):
        return options  # rank 0 looks: the others may look after it saved them
    why = "no run began there" if fresh else "its run was stopped before its settings were saved"
    processes.say(f"--resume: {run_dir} holds nothing to resume yet ({why}); beginning it with the options given")
    return dataclasses.replace(options, resume=False)


RUN_ENTRIES = {ckpt.CONFIG_NAME, TEXT_DIR, CHECKPOINT_DIR, BEST_NAME, LOG_NAME, TRAINING_LOCK_NAME, VIDEOS_NAME,
               TENSORBOARD_DIR, FEATURES_DIR}  # what pretraining writes in a run's folder


def not_of_a_run(folder: Path) -> list[str]:
    """The names in `folder` that pretraining does not write (a region cache's, a data folder's; hidden ones
    such as .DS_Store aside), sorted."""
    return sorted(p.name for p in folder.iterdir() if p.name not in RUN_ENTRIES and not p.name.startswith("."))


@contextmanager
def training_lock(run_dir: Path, fresh: bool, processes: Processes):
    """Held by the main process while it trains run_dir: a second `pretrain` into the same directory
    (two -o alike, or --resume of a run still training) stops with one line instead of interleaving
    checkpoints. The kernel frees it when the holder dies, kill -9 too, so a resume never waits on a
    dead run. A fresh run directory that a failed start left empty is removed on the way out."""
    if not processes.main:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / TRAINING_LOCK_NAME
    lock = WriterLock.take(path, patience=1.0)  # past a look at whether its trainer on another host still runs
    if lock is None:
        raise UserError(f"{run_dir} is being trained by {holder_description(path)}; "
                        "wait for it to finish, or pass another -o RUN_DIR")
    try:
        yield
    finally:
        lock.release()
        if fresh and not any(run_dir.iterdir()):
            run_dir.rmdir()


def resolve_run(options: PretrainOptions, run_dir: Path, processes: Processes, workspace: Workspace) -> Run:
    """The run's settings (the options', or the stored ones on --resume) and its data."""
    stored = ckpt.read_run_config(run_dir) if options.resume else None
    if not options.resume and ckpt.checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints; pass --resume to continue it, or another -o RUN_DIR")
    if not options.resume and (place := saved_place(run_dir, 0)) is not None:  # the same command again (a requeue)
        raise UserError(f"{run_dir} holds {place_text(place)}, saved by a run stopped within its first epoch; pass "
                        "--resume to continue it from there, or another -o RUN_DIR")
    notes = []  # a new run's lines on the defaults it resolved
    init = stored.get("init") if stored else init_record(options.init) if options.init else None
    init_config = init_model_config(options, init) if init and not stored else None  # refused before the data is read
    if stored:
        train_config, model_config = _stored_settings(options, stored, run_dir, processes)
        done = max(ckpt.checkpoints(run_dir), default=0)
        if train_config.epochs < done:  # would record an end before what is trained: "2 of 1 epochs"
            raise UserError(f"--epochs {train_config.epochs}: {run_dir} has trained {done} epochs already; pass "
                            f"--epochs {done} or more (more continues it), or start a new run")
        if train_config.epochs == done and (run_dir / VIDEOS_NAME).exists():  # said before the captions and
            # caches are read (seconds, or minutes); a run from before the videos' record reads them to write it
            return Run(run_dir, train_config, model_config, None, resumed=True, init=init)
        if init and not done and saved_place(run_dir, 0) is None:  # it starts from the init checkpoint: refused, if
            check_init_source(init, run_dir)  # it must be, before the captions are read (minutes on a big collection)
        for key, name in LOCATION_OPTIONS:
            if missing := [p for p in location_list(getattr(train_config, key)) if not os.path.exists(p)]:
                raise UserError(f"--resume: {run_dir} reads {printable(missing[0])}, which is not there (moved or "
                                f"deleted?); pass {name} with where it is now")
    else:
        train_config = TrainConfig(
            **{k: getattr(options, k) for k in TRAIN_OPTIONS if getattr(options, k) is not None},
            caches=[str(Path(c).resolve()) for c in (options.cache_dirs or [workspace.cache_dir])],
            captions=once_each(options.captions, "--captions", processes),
            val_captions=str(Path(options.val_captions).resolve()) if options.val_captions else None,
            made_in=str(run_dir.resolve()),
        )
    _check_before_loading(options, train_config, processes)
    data = load_pretrain_data(
        [Path(c) for c in train_config.caches], [Path(c) for c in train_config.captions],
        Path(train_config.val_captions) if train_config.val_captions else None,
        seed=train_config.seed, workspace=workspace, captions_per_video=train_config.captions_per_video,
        max_captions_per_video=captions_per_video_cap(init_config.text_trainable_layers if init_config
                                                      else options.trainable_layers),
        progress=processes.main and not processes.quiet,
    )
    if not stored:  # record what the defaults resolved to, so that resume reads the same data
        train_config.captions_per_video = data.train.captions_per_video
        train_config.captions = [str(p) for p in data.caption_files]
        train_config.val_captions = str(data.validation_file) if data.validation_file else None
        if init_config is not None:
            check_init_features(init, data.caches)
            model_config = init_config
        else:
            model_config, notes = _new_model_config(options, data)
    if stored and (recorded := stored.get("cache_settings")):  # a cache given anew, or extracted again since
        for cache in data.caches:
            if diffs := cache.settings.feature_differences(recorded):
                raise UserError(f"--resume: {cache.cache_dir} holds other region features than {run_dir} was trained "
                                f"on ({'; '.join(diffs)}): a run goes on with the features it began with; pass --cache "
                                "with a cache of those, or train a new run on this one")
    if len(data.train) < 2 * processes.world:  # a batch of 1: each video its own only candidate, a loss of 0
        raise UserError(f"{len(data.train)} training video(s) with captions" +
                        (f" for {processes.world} processes" if processes.world > 1 else "") +
                        ": a contrastive step needs at least 2 videos a process, each the other's negative; "
                        "extract and caption more videos")
    typical = data.train.median_captions() if len(data.train) else 0
    if not stored and options.captions_per_video and typical and options.captions_per_video > typical:
        notes.append(f"note: --captions-per-video {options.captions_per_video} is more than the {typical} captions of "
                     f"a typical training video: a step repeats its captions, more text work for the same positives")
    for line in [*data.summary(), *notes]:
        processes.say(line)
    return Run(run_dir, train_config, model_config, data, resumed=bool(stored), init=init)


def once_each(paths, option: str, processes: Processes) -> list[str]:
    """The files given, resolved, each once (a file named twice would count each caption twice), said."""
    resolved = [str(Path(p).resolve()) for p in paths]
    if twice := sorted({p for p in resolved if resolved.count(p) > 1}):
        processes.say(f"note: {option} names {printable(twice[0])}" + (f" (and {len(twice) - 1} more)" if len(twice) > 1 else "")
                      + " more than once: read once")
    return list(dict.fromkeys(resolved))


def _check_before_loading(options: PretrainOptions, train_config: TrainConfig, processes: Processes) -> None:
    """Refuse what would fail once the data is loaded and the run's files written (minutes into a large
    caption set, leaving a run without a checkpoint that --resume would pick)."""
    autocast_for(processes.device, train_config.precision)  # bf16 where there is none
    if options.text_model is not None and not options.text_model.strip():
        raise UserError("--text-model '': give a model's folder or a Hugging Face name, or leave it out for the default")
    if options.text_model and not options.resume and not options.init:  # --init: the init run's, checked there
        check_text_model_findable(options.text_model)
    heads = ModelConfig.heads
    if options.width is not None and options.width % heads:
        raise UserError(f"--width {options.width}: the region transformer's width must be a multiple of its {heads} "
                        f"attention heads (e.g. {max(heads, options.width // heads * heads)})")
    if train_config.batch_size * processes.world < 2:
        raise UserError(f"--batch-size {train_config.batch_size}: a contrastive step needs at least 2 videos, each the "
                        "other's negative (the loss of one is 0 and trains nothing)")


def _latest_started_run(workspace: Workspace) -> Path:
    """The run --resume continues without -o: the newest with stored settings. Where a newer one was stopped (kill
    -9) before its settings were saved, it says so rather than continue an older run the user did not mean."""
    started = [p for p in workspace.runs_dir.glob("*") if p.is_dir() and not p.name.startswith(".")]
    runs = [p for p in started if (p / ckpt.CONFIG_NAME).exists()]
    newer = lambda p: (p.stat().st_mtime, p.name)  # noqa: E731  (run-NNN: of one clock tick, the later number)
    latest = max(runs, key=newer, default=None)
    unsaved = [p for p in started if p not in runs and not not_of_a_run(p) and trainer_of(p) is None  # not starting now
               and (latest is None or newer(p) > newer(latest))]
    if unsaved:
        newest = max(unsaved, key=newer)
        other = f" (`--resume -o {latest}` continues {latest.name})" if latest is not None else ""
        raise UserError(f"--resume: {newest}, the newest run, was stopped before its settings were saved, so there is "
                        f"nothing of it to resume: run its first command again, without --resume{other}")
    if latest is None:
        raise UserError(f"--resume: no run in {workspace.runs_dir} to resume; pass -o RUN_DIR or start without --resume")
    return latest


def _new_model_config(options: PretrainOptions, data: PretrainData) -> tuple[ModelConfig, list[str]]:
    """A new run's model settings, and lines on the defaults it resolved."""
    chosen = {field: getattr(options, option) for option, field in MODEL_OPTIONS.items() if getattr(options, option) is not None}
    config = ModelConfig(
        feature_dim=data.caches[0].settings.feature_dim,
        max_frames=max(64, max(c.settings.frames for c in data.caches)),
        **chosen,
    )
    config.rwa = not options.no_rwa
    if config.text_model and Path(config.text_model).is_dir():  # a folder: found again from wherever it is resumed
        config.text_model = str(Path(config.text_model).resolve())
    notes = []
    if options.text_pooling is None:  # the text model's own, where it says (sentence-transformers models do)
        from vlpcache.model.model import default_text_model, sentence_pooling

        pooling, said = sentence_pooling(config.text_model or default_text_model())
        config.text_pooling = pooling or config.text_pooling
        notes.append(f"text pooling: {config.text_pooling} ({said}{'' if pooling else '; --text-pooling mean|cls'})")
    return config, notes


def _stored_settings(options: PretrainOptions, stored: dict, run_dir: Path, processes: Processes):
    """The run's stored configs; options that would change them are refused (only RESUMABLE_OPTIONS may)."""
    train_config = TrainConfig.from_json(run_locations(run_dir, stored["train"]))
    model_config = ModelConfig.from_json(stored["model"])
    conflicts = []
    for option in TRAIN_OPTIONS:
        value = getattr(options, option)
        if value is not None and option not in RESUMABLE_OPTIONS and value != getattr(train_config, option):
            conflicts.append(f"--{option.replace('_', '-')} {value} (the run has {getattr(train_config, option)})")
    conflicts += [f"{given} (the run has {had})" for _, _, given, had in differing_model_options(options, model_config)]
    if options.no_rwa and model_config.rwa:
        conflicts.append("--no-rwa (the run trains with region-word alignment)")
    began = stored.get("init") or {}
    if options.init and str(Path(options.init).resolve()) not in (began.get("run"), began.get("checkpoint")):
        conflicts.append(f"--init {printable(options.init)} (the run began "
                         f"{'from ' + printable(began['checkpoint']) if began else 'without --init'})")
    # a location is given anew where the stored one is gone (the project moved, the run made before it
    # recorded where it was made); one that is still there may not change
    given = {"caches": options.cache_dirs, "captions": options.captions,
             "val_captions": [options.val_captions] if options.val_captions else []}
    for key, name in LOCATION_OPTIONS:
        kept = location_list(getattr(train_config, key))
        paths = [str(Path(p).resolve()) for p in given[key]]
        if not paths or sorted(paths) == sorted(kept):
            continue
        if kept and not all(os.path.exists(p) for p in kept):
            setattr(train_config, key, paths if key != "val_captions" else paths[0])
        else:
            conflicts.append(f"{name} {' '.join(map(str, given[key]))} (the run reads {' '.join(kept) or 'none'})")
    if conflicts:
        raise UserError(f"--resume continues {run_dir} with its stored settings; these options differ: "
                        f"{'; '.join(conflicts)}. Leave them out, or start a new run with -o")
    for option in RESUMABLE_OPTIONS:
        if getattr(options, option) is not None:
            setattr(train_config, option, getattr(options, option))
    processes.say(f"resuming {run_dir} with its stored settings: {train_config.epochs} epochs, batch "
                  f"{train_config.batch_size}, {train_config.captions_per_video} caption(s) per video, lr {train_config.lr:g}, "
                  f"text layers trained {model_config.text_trainable_layers}, RWA {'on' if model_config.rwa else 'off'}")
    return train_config, model_config


# ---------------------------------------------------------------- step 2: the trainer and the loader


@dataclass
class Trainer:
    model: AlignmentModel
    tokenizer: object
    optimizer: torch.optim.Optimizer
    criterion: PretrainLoss
    autocast: object
    scaler: object
    trainable: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    text_features: TextFeatures | None  # a frozen text encoder's outputs, else None
    start_epoch: int = 1
    step: int = 0
    best_score: float | None = None
    arithmetic: str = "fp32"  # what the run's precision resolved to here: bf16, fp16 or fp32
    within: "Within | None" = None  # where a run resumed from a place within an epoch goes on
    resumed: dict | None = None  # where a resume went on from, for the log line of its first epoch (LOG_FIELDS)


@dataclass
class Within:
    """A place within an epoch (saved by save_place): its steps done, their loss sums and training seconds,
    and the random state after its last step, which the uninterrupted run's next draws come from."""
    epoch: int
    steps_done: int
    sums: dict
    seconds: float
    rng: dict | None = None
    started: float = 0.0  # time.monotonic() when its training seconds were last counted
    saved: bool = True  # whether these steps are saved (where it was resumed from, or saved since)


def parameter_groups(model: AlignmentModel, config: TrainConfig) -> list[dict]:
    text, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("text_encoder."):
            text.append(p)
        elif p.ndim < 2:  # biases, norms, temperatures
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": no_decay, "lr": config.lr, "weight_decay": 0.0},
        {"params": text, "lr": config.text_lr, "weight_decay": config.weight_decay},
    ]
    for g in groups:
        g["base_lr"] = g["lr"]
    return [g for g in groups if g["params"]]


def make_trainer(run: Run, processes: Processes, workspace: Workspace) -> Trainer:
    """Model, optimizer and loss; on resume their state from the last checkpoint; the run's files."""
    last = ckpt.checkpoints(run.dir)
    source = (resumable_place(run, processes, max(last, default=0)) or last.get(max(last, default=0))) if run.resumed else None
    if source is not None:
        backbone, tokenizer = load_text_backbone(str(run.dir / ckpt.TEXT_DIR), weights=False)
        model = AlignmentModel(run.model, backbone)
        try:
            ckpt.load_weights(model, source)
        except UserError as err:  # damaged (a disk's fault): the way on, as for its training state
            raise UserError(f"{err}; remove {source} to resume from the checkpoint before it, or start a new run") from None
    else:  # a new run, or one stopped before its first checkpoint
        model, tokenizer = initial_model(run.init, run.model, run.dir) if run.init else build_model(run.model)
    if processes.main:
        ckpt.remove_temporaries(run.dir)
        if run.resumed and source is None:  # killed (or out of disk) before the first checkpoint: epoch 1 again
            keep_log_until(run.dir / LOG_NAME, 0)
        if not run.resumed:  # a folder a run left without a checkpoint or place (refused otherwise): none of its lines stay
            if (run.dir / LOG_NAME).is_file():  # a named pipe (a reader following the log) would wait for a writer
                keep_log_until(run.dir / LOG_NAME, 0)
            (run.dir / BEST_NAME).unlink(missing_ok=True)
            config = {
                "model": run.model.to_json(),
                "train": dataclasses.asdict(run.train),
                "cache_settings": run.data.caches[0].settings.to_json(),  # what load_run checks a cache against
                "cache_settings_each": [cache.settings.to_json() for cache in run.data.caches],  # for inspect
                "vlpcache_version": __version__,
                **({"init": run.init} if run.init else {}),
            }
            ckpt.save_run_files(run.dir, config, tokenizer, model.text_encoder.backbone.config)
            if run.init:
                processes.say(f"starting from {printable(run.init['checkpoint'])} (epoch {run.init['epoch']} of "
                              f"{printable(run.init['run'])}): its model, this run's training settings")
            if (asked := run.model.text_trainable_layers) > (has := len(model.text_encoder.layers)):
                processes.say(f"note: --trainable-layers {asked}: the text model has {has} layers; all of them train, "
                              "and its word embeddings too (a checkpoint holds them: twice the size)")
            for line in _captions_lines(run, tokenizer, text_positions(model.text_encoder.backbone)):
                processes.say(line)
        # a fresh start rewrites it (a run folder left without a checkpoint may be started again on other
        # captions); a run resumed from before the record was kept gets it too
        if not run.resumed or not (run.dir / VIDEOS_NAME).exists():
            save_run_videos(run.dir, run.data.train_ids(), run.data.validation_ids(),
                            inherited_videos(run.init) if run.init else None, run.data.train_stamps(),
                            inherited_content(run.init) if run.init else None)
        elif last and (change := add_run_videos(run.dir, run.data.train_ids(), run.data.validation_ids(),
                                                run.data.train_stamps())):
            before, now, gone, new = change
            processes.say(f"note: the training videos changed since {run.dir} began ({before:,} then, {now:,} now: "
                          f"{gone:,} no longer, {new:,} new; a caption file or a cache changed): it goes on with "
                          f"these, its learning rate where epoch {max(last) + 1} of {run.train.epochs} puts it; "
                          "eval counts all of them as trained on")
    processes.barrier()
    model.to(processes.device)
    text_features = _frozen_text_features(run, model, tokenizer, processes, workspace)
    precision = autocast_for(processes.device, run.train.precision)
    processes.say(f"training arithmetic: {precision.label} ({precision.reason})")
    autocast, scaler = precision.autocast, precision.scaler
    optimizer = torch.optim.AdamW(parameter_groups(model, run.train), betas=(0.9, 0.98), eps=1e-6)
    trainer = Trainer(model, tokenizer, optimizer, PretrainLoss(run.model), autocast, scaler, model, text_features,
                      arithmetic=precision.label)
    if source is not None:
        state = ckpt.load_training_state(source)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rng = state["rng"][min(processes.rank, len(state["rng"]) - 1)]
        ckpt.set_rng_state(rng)
        trainer.start_epoch, trainer.step, trainer.best_score = state["epoch"] + 1, state["step"], state.get("best_score")
        if processes.main:
            keep_log_until(run.dir / LOG_NAME, state["epoch"])
        if (line := validation_changed(run, state["epoch"])) is not None:
            processes.say(line)
            trainer.best_score = None  # scores of other queries are no measure of these epochs against those
        if "within" in state:
            trainer.within = Within(**state["within"], rng=rng)
            processes.say(f"resuming {run.dir} within epoch {trainer.within.epoch}, after {trainer.within.steps_done:,} of "
                          f"its steps (step {trainer.step})", always=True)
        else:
            processes.say(f"resuming {run.dir} after epoch {state['epoch']} (step {trainer.step})", always=True)
    if run.resumed:
        trainer.resumed = {"after_epoch": trainer.start_epoch - 1, "time": time.time(),
                           "steps_done": trainer.within.steps_done if trainer.within is not None else 0}
    # recorded once the checkpoint has loaded: a resume that fails changes nothing of the run
    record_new_epochs(run, processes, max(last, default=0))
    record_new_locations(run, processes)
    if processes.world > 1:
        trainer.trainable = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[processes.device.index] if processes.device.type == "cuda" else None
        )
    return trainer


def training_items_key(run: Run) -> str:
    """What a place within an epoch holds to: the training items in their order (the epoch's permutation
    is of their positions)."""
    return hashlib.blake2b("\n".join(run.data.train_ids()).encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def resumable_place(run: Run, processes: Processes, done: int) -> Path | None:
    """The place saved within epoch `done` + 1 that a resume goes on from, if it can: the same training items
    and processes (their shards of the epoch's order) as when it was saved; else None, and said."""
    if (place := saved_place(run.dir, done)) is None:
        return None
    path = Path(place["path"])
    try:
        meta = read_checkpoint_meta(path)
    except UserError:
        meta = {}
    if not meta:
        why = f"its {ckpt.META_NAME} is unreadable"
    elif meta.get("training_items") != training_items_key(run):
        why = "the training items changed since it was saved"
    elif meta.get("processes") != processes.world:
        why = f"it was saved by a run of {meta.get('processes')} process(es), this one has {processes.world}"
    else:
        return path
    processes.say(f"note: {place_text(place)} is passed over ({why}: which of the epoch's items are left is not "
                  f"known); epoch {place['epoch']} is trained from its start")
    return None


CAPTIONS_COUNTED = 200_000  # beyond this many training captions, how many are cut is estimated on a sample


def _captions_lines(run: Run, tokenizer, positions: int | None) -> list[str]:
    """What a new run says of its training captions: how many are longer than the tokens the model reads
    (`positions`: the most its text model can read), and how many are mostly words its text model does not
    know (another language than its vocabulary's)."""
    captions = run.data.train.all_captions()
    counted = captions if len(captions) <= CAPTIONS_COUNTED else random.Random(0).sample(captions, CAPTIONS_COUNTED)
    lines = []
    read = read_texts(tokenizer, counted, run.model.max_words)  # tokenized once for both counts
    if cut := read.longer:
        how_many = (f"{cut:,} of the {len(captions):,}" if counted is captions
                    else f"about {cut / len(counted):.1%} (counted on {len(counted):,}) of the {len(captions):,}")
        more = ("--max-words N reads more" if positions is None or run.model.max_words < positions
                else "the text model reads no more")
        lines.append(f"pretrain: {how_many} training captions are longer than the {run.model.max_words} tokens the "
                     f"model reads ([CLS] and [SEP] included) and are cut there; {more}")
    what = "training captions" if counted is captions else f"training captions counted (a sample of the {len(captions):,})"
    if line := unknown_texts_line(read, len(counted), run.model.text_model or DEFAULT_TEXT_MODEL, what,
                                  "and the model learns little from them"):
        lines.append(line)
    if line := _shared_caption_line(run.data.train.samples):
        lines.append(line)
    return lines


SHARED_CAPTION_SAID = 0.2  # a caption this share of the training videos have is said (MSR-VTT's commonest: 3.4%)


def _shared_caption_line(samples: list[tuple[int, int, list[str]]]) -> str | None:
    """A line when one caption is a caption of SHARED_CAPTION_SAID or more of the training videos (a
    category or title column read as the captions, a placeholder): it tells none of them apart."""
    if sampled := len(samples) > CAPTIONS_COUNTED:
        samples = random.Random(0).sample(samples, CAPTIONS_COUNTED)
    videos_of = collections.Counter(text for _, _, texts in samples for text in set(texts))
    if not videos_of or (found := videos_of.most_common(1)[0])[1] < max(2, SHARED_CAPTION_SAID * len(samples)):
        return None
    text, count = found
    shown = printable(text if len(text) <= 60 else text[:60] + "...")
    return (f"note: {count / len(samples):.0%} of the training videos ({count:,} of {len(samples):,}"
            f"{' counted' if sampled else ''}) have the caption \"{shown}\": a caption so "
            "many share tells none of them apart (in a batch they are each other's negatives); where it describes "
            "no video (a category, a title, a placeholder), the file or its caption column is not the one meant "
            "(the first lines say how each file was read)")


def _frozen_text_features(run: Run, model, tokenizer, processes: Processes, workspace: Workspace) -> TextFeatures | None:
    """What the text encoder's frozen layers make of every training and validation caption, encoded
    once (rank 0 computes, the others wait for it and read the same file); None when every layer trains."""
    if cache_kind(model) is None:
        return None
    captions = run.data.train.all_captions()
    if run.data.validation is not None:
        captions += [c for caps in run.data.validation.captions for c in caps]
    features = None
    if processes.main:
        features = cached_text_features(model, tokenizer, captions, workspace.root, with_words=run.model.rwa,
                                        device=processes.device, progress=not processes.quiet,
                                        say=lambda line: processes.say(line, always=True), fallback_root=run.dir,
                                        go_on=f"{ckpt.resume_said(run.dir)} (the same command would begin another run)")
    processes.wait_for_main()  # however long the encoding takes
    if features is None:
        features = cached_text_features(model, tokenizer, captions, workspace.root, with_words=run.model.rwa,
                                        device=processes.device, progress=False, fallback_root=run.dir)
    return features


@dataclass
class Loader:
    loader: DataLoader
    sampler: DistributedSampler
    batch: int  # videos per step and process
    steps_per_epoch: int
    total_steps: int
    warmup: int


def validation_changed(run: Run, epoch: int) -> str | None:
    """A note where the resumed run's validation has other queries than its last epoch was measured on (a
    validation file edited, or a run of a vlpcache that validated on first captions only); None else."""
    from vlpcache.model.inspect_run import epoch_log

    if run.data is None or run.data.validation is None:
        return None
    logged = next((r.get("val", {}).get("queries") for r in epoch_log(run.dir) if r.get("epoch") == epoch), None)
    now = sum(len(captions) for captions in run.data.validation.captions)
    if not logged or logged == now:
        return None
    return (f"note: validation now has {now:,} queries, where epoch {epoch} was measured on {logged:,} (a validation "
            "file changed, or a vlpcache that validated on first captions): the figures of the two do not compare, so "
            f"the best epoch is chosen anew from epoch {epoch + 1} on; `inspect` shows both")


class ResumableSampler(DistributedSampler):
    """A DistributedSampler whose next pass can begin past its first `skip` indices: a run resumed within an
    epoch reads the rest of that epoch's order, no item twice and none left out."""

    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return max(0, super().__len__() - self.skip)


def make_loader(run: Run, trainer: Trainer, processes: Processes) -> Loader:
    """Each process a disjoint shard of a per-epoch permutation of the captioned items."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers run inside forked workers
    # On CPU the batch is read in the training process: a cached batch reads in milliseconds, while a worker
    # costs a core the model's threads could use and a pickled copy of every batch (1.7x slower on 2 cores).
    workers = run.train.workers if run.train.workers is not None else (4 if processes.device.type == "cuda" else 0)
    if processes.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # one core per loader worker, the rest for the model: oversubscribed cores slow torch down many times
        torch.set_num_threads(max(1, usable_cores() // processes.world - workers))
    dataset = run.data.train
    sampler = ResumableSampler(dataset, num_replicas=processes.world, rank=processes.rank, shuffle=True,
                               seed=run.train.seed, drop_last=processes.world > 1)
    batch = min(run.train.batch_size, len(sampler))
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=CollateCaptionedRegions(trainer.tokenizer, run.model.max_words, trainer.text_features),
        pin_memory=processes.device.type == "cuda",
        drop_last=True,  # equal batches: all-gather needs them, and a tiny last batch has no negatives
        prefetch_factor=4 if workers else None,
        worker_init_fn=leave_stops_to_the_parent if workers else None,
        multiprocessing_context=LOADER_START if workers else None,
    )
    steps = len(sampler) // batch  # sampler.skip is 0 here: a whole epoch
    total = steps * run.train.epochs
    return Loader(loader, sampler, batch, steps, total, max(1, int(run.train.warmup_fraction * total)))


def keep_log_until(log_path: Path, epoch: int) -> None:
    """Drop the log lines of epochs after `epoch` (written before a kill -9 took their checkpoint)."""
    if not log_path.exists():
        return
    lines = json_lines(log_path.read_text(encoding="utf-8"), keepends=True)
    kept = [line for line in lines if _logged_epoch(line) <= epoch]
    if len(kept) != len(lines):
        replace_atomically(log_path, lambda tmp: tmp.write_text("".join(kept), encoding="utf-8"))


def _logged_epoch(line: str) -> float:
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a partial line from a kill: dropped


# ---------------------------------------------------------------- step 3: one epoch


def full_precision(embedding):
    """The embedding (a NamedTuple of tensors) with its floating tensors in fp32."""
    return type(embedding)(*(t.float() if t.is_floating_point() else t for t in embedding))


def train_step(trainable, criterion, optimizer, inputs: dict, autocast, scaler, grad_clip: float):
    """One optimisation step on a batch already on the device; returns (loss values, logit scale)."""
    with autocast():
        text, video, logit_scale, rwa_scale = trainable(inputs)
    # the losses in fp32: in bf16 a cosine similarity is off by up to ~0.004, which the learned logit
    # scale (up to 100) turns into logit noise of ~0.4
    losses = criterion(full_precision(text), full_precision(video), logit_scale, rwa_scale)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(losses["loss"]).backward()
        scaler.unscale_(optimizer)
    else:
        losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}, logit_scale.detach()


def close_batches(batches) -> None:
    """End a loader iterator's worker processes now. An error raised in a worker comes back through the
    iterator's frames, so its traceback keeps the iterator (and the workers, which outlive a SIGTERM while
    their loader is open: interrupts.leave_stops_to_the_parent) alive until the interpreter's exit,
    where multiprocessing waits for them for ever; the command's one line came, and it never ended."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own, what its __del__ calls
    if not callable(shutdown):
        return
    try:
        shutdown()  # it ends every worker, also where it raises
    except RuntimeError as err:  # a worker ended by a job's SIGTERM as the loader closed, taken for its terminate()
        if not (stop_requested() and loader_worker_lost(err)):
            raise


def loader_worker_lost(err: RuntimeError) -> bool:
    """Whether `err` is torch's word that a loading worker died or left (its SIGCHLD handler raises it in
    the training process, wherever that is)."""
    return str(err).startswith("DataLoader worker (pid")


def say_damaged(found: list[tuple[int, str]], dataset: CaptionedRegions) -> None:
    """Say once each training item a batch found damaged (cache/reader.py recorded it: extract redoes it),
    and keep it in the dataset, whose next epoch's workers then pass it over unread."""
    for sample, line in found:
        dataset.damaged.add(sample)
        if sample not in dataset.reported:
            dataset.reported.add(sample)
            say_damage(f"{line}; training takes another item in its place", len(dataset.reported))  # each process its own


def diverged(loss: float, epoch: int, step: int, run: Run) -> str:
    """The line that ends a run whose loss is no longer a number (weights of NaN would be saved, and scored
    as if they ranked every video first)."""
    kept = f"epoch {epoch - 1}'s checkpoint is kept" if epoch > 1 else "no checkpoint was saved"
    return (f"the loss is {loss} at step {step} (epoch {epoch}): training diverged, and this epoch is not saved "
            f"({kept}); train a new run with a lower learning rate (--lr {run.train.lr:g}, --text-lr "
            f"{run.train.text_lr:g} now) or --precision fp32")


def train_one_epoch(epoch: int, run: Run, trainer: Trainer, loader: Loader, processes: Processes, tensorboard) -> dict:
    """One pass over the training items (the rest of it, resumed within it); returns the epoch's log record
    (mean losses, speed)."""
    loader.sampler.set_epoch(epoch)
    run.data.train.set_epoch(epoch)
    within, trainer.within = trainer.within if trainer.within and trainer.within.epoch == epoch else None, None
    place = within or Within(epoch, 0, {}, 0.0)
    loader.sampler.skip = place.steps_done * loader.batch
    trainer.model.train()
    place.saved = True  # a stop before the next step has nothing more to save
    samples = loader.steps_per_epoch * loader.batch * processes.world
    bar = progress_bar(total=samples, initial=place.steps_done * loader.batch * processes.world, unit="video", unit_scale=True,
                       desc=f"epoch {epoch}/{run.train.epochs}", disable=processes.quiet or not processes.main, leave=False)
    # under torchrun a stop waits for the processes to agree on the step they stop after (agree_at)
    agreeing = processes.world > 1 and bool(run.train.save_every)
    batches = None
    try:
        with stops_deferred(), stop_signals_held():  # the workers start with the job's stop signals held
            batches = iter(loader.loader)
        if within is not None and within.rng is not None:  # after the loader drew its seed: the next draws are the
            ckpt.set_rng_state(within.rng)                  # uninterrupted run's
        if not agreeing:
            stop_if_interrupted()  # one that came while the workers started
        with stops_deferred() if agreeing else nullcontext():
            _epoch_steps(epoch, run, trainer, loader, processes, tensorboard, bar, batches, place, agreeing)
    except KeyboardInterrupt:
        if stop_requested() and run.train.save_every and processes.world == 1 and not place.saved:
            save_place(run, trainer, processes, place, loader, stopping=True)
        raise
    except RuntimeError as err:
        if not (stop_requested() and loader_worker_lost(err)):
            raise
        # the stop asked for, not the loss of a worker the same signal reached (one of another program, or
        # killed otherwise); no place saved: torch raises it wherever the training process is, a step included
        raise KeyboardInterrupt from None
    finally:
        close_batches(batches)
    bar.close()
    place.seconds += time.monotonic() - place.started
    trainer.within = place  # every step done: what a stop in the epoch's validation keeps (_train)
    return {  # the log line's fields: run_layout.LOG_FIELDS, where each is described
        "epoch": epoch,
        "step": trainer.step,
        **{k: v / max(1, loader.steps_per_epoch) for k, v in place.sums.items()},
        "samples_per_s": samples / max(place.seconds, 1e-9),
        "epoch_seconds": place.seconds,
        "precision": trainer.arithmetic,
        "temperature": float(1 / trainer.model.logit_scale.detach().exp()),
        "batch": loader.batch,  # --batch-size, or fewer where a process has fewer training videos
    }


def _epoch_steps(epoch: int, run: Run, trainer: Trainer, loader: Loader, processes: Processes, tensorboard, bar,
                 batches, place: Within, agreeing: bool) -> None:
    """The steps of train_one_epoch: each whole, the place saved when due; a stop raised after a step (under
    torchrun after the step the processes agreed on, the place saved first)."""
    sums, saved = place.sums, time.monotonic()
    place.started = saved
    for done, batch_cpu in enumerate(batches, start=place.steps_done):
        say_damaged(batch_cpu.pop("damaged"), run.data.train)
        # by the epoch's place, not trainer.step: the run's steps so far, which a training set changed
        # since it began (resume) puts elsewhere in the schedule (past its end: a learning rate of 0)
        factor = learning_rate_factor((epoch - 1) * loader.steps_per_epoch + done, loader.total_steps, loader.warmup)
        for group in trainer.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        inputs = {k: v.to(processes.device, non_blocking=True) for k, v in batch_cpu.items()}
        with stops_deferred():  # a step ends whole: the place a stop saves is a step's end
            values, logit_scale = train_step(trainer.trainable, trainer.criterion, trainer.optimizer, inputs,
                                             trainer.autocast, trainer.scaler, run.train.grad_clip)
            if not math.isfinite(values["loss"]):
                raise UserError(diverged(values["loss"], epoch, trainer.step + 1, run))
            trainer.model.clamp_logit_scales()
            trainer.step += 1
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            place.steps_done, place.seconds = done + 1, place.seconds + time.monotonic() - place.started
            place.started, place.saved = time.monotonic(), False
        due, stop = agree_at(run, processes, place, loader, saved) if agreeing else (
            save_is_due(run, place, loader, saved), False)
        if due or stop:
            save_place(run, trainer, processes, place, loader, stopping=stop)
            saved, place.saved = time.monotonic(), True
        if stop:
            raise KeyboardInterrupt
        if not agreeing:
            stop_if_interrupted()
        bar.update(loader.batch * processes.world)
        bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
        if tensorboard is not None:
            for k, v in values.items():
                tensorboard.add_scalar(f"train/{k}", v, trainer.step)
            tensorboard.add_scalar("train/lr", trainer.optimizer.param_groups[0]["lr"], trainer.step)
            tensorboard.add_scalar("train/temperature", 1 / float(logit_scale), trainer.step)


SAVE_CHECKED_EVERY = 5  # steps between the processes' agreeing whether to save or stop (one collective)


def save_is_due(run: Run, place: Within, loader: Loader, saved: float) -> bool:
    """Whether --save-every minutes have passed since the last save of the run's place (not at an epoch's end,
    whose checkpoint follows)."""
    return (bool(run.train.save_every) and place.steps_done < loader.steps_per_epoch
            and time.monotonic() - saved >= run.train.save_every * 60)


def agree_at(run: Run, processes: Processes, place: Within, loader: Loader, saved: float) -> tuple[bool, bool]:
    """Under torchrun, every SAVE_CHECKED_EVERY steps and after an epoch's last: (whether to save the place now,
    whether to stop after it), the same on every process. A save is due by rank 0's clock; a stop where any
    process was asked to (Ctrl-C and a Slurm time limit signal them all, at slightly different steps; a
    `kill` may signal one), so all save one place and stop after the same step, within torchrun's 30 s."""
    if place.steps_done % SAVE_CHECKED_EVERY and place.steps_done < loader.steps_per_epoch:
        return False, False
    due, signum = processes.max_of(int(processes.main and save_is_due(run, place, loader, saved)), requested_signal())
    if signum:
        take_request(signum)  # this process's too, where another was signalled alone: its exit status and line
    return bool(due or signum), bool(signum)


def save_place(run: Run, trainer: Trainer, processes: Processes, place: Within, loader: Loader,
               stopping: bool = False, alone: bool = False) -> None:
    """Save the run's place within an epoch (rank 0; the others wait), which --resume goes on from. Where it
    cannot be written (a full disk) that is said and training goes on: the epoch's checkpoint is what counts.
    Every process calls it, but `alone` (rank 0 in an epoch's validation, the others waiting for it)."""
    random_states = [ckpt.rng_state()] if alone else processes.random_states()
    if processes.main:
        state = {
            "optimizer": trainer.optimizer.state_dict(),
            "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
            "rng": random_states,
            "epoch": place.epoch - 1,  # the epochs done: what a resume from the epoch's start would read
            "step": trainer.step,
            "best_score": trainer.best_score,
            "within": {"epoch": place.epoch, "steps_done": place.steps_done, "sums": dict(place.sums),
                       "seconds": place.seconds},
        }
        meta = {"steps_done": place.steps_done, "steps_per_epoch": loader.steps_per_epoch, "step": trainer.step,
                "processes": processes.world, "training_items": training_items_key(run), "vlpcache_version": __version__}
        with stops_deferred():  # a second Ctrl-C waits for the save (a second or two)
            try:
                ckpt.save_partial(run.dir, place.epoch, place.steps_done, trainer.model, state, meta)
            except UserError as err:
                processes.say(f"note: {err}{'' if stopping else '; training goes on'}", always=True)
    if not alone:
        processes.barrier()


def save_place_stopped_in_validation(run: Run, trainer: Trainer, processes: Processes, loader: Loader) -> None:
    """A Ctrl-C or SIGTERM in an epoch's validation: the epoch's steps, all done (trainer.within), saved as its
    place, unless its checkpoint or that place is saved already; else the place saved last (up to --save-every
    minutes of training before) would be all that is kept."""
    place = trainer.within
    if not (stop_requested() and run.train.save_every and processes.main and place is not None):
        return  # under torchrun rank 0 alone validates: the others, waiting for it, have nothing to save
    saved = ckpt.partial_checkpoints(run.dir)
    if place.epoch not in ckpt.checkpoints(run.dir) and (place.epoch, place.steps_done) not in saved:
        save_place(run, trainer, processes, place, loader, stopping=True, alone=processes.world > 1)


# ---------------------------------------------------------------- step 4: end of an epoch


def best_rerank_weight(similarity: np.ndarray, top: np.ndarray, local: np.ndarray, owners) -> tuple[float, dict]:
    """The weight of RERANK_WEIGHTS whose re-ranked validation scores best (the smallest among equals),
    and the metrics of every weight. similarity (Q, C); top, local (Q, P) as candidate_local_scores gives."""
    scored = {w: retrieval_metrics(reranked(similarity, top, local, w), owners) for w in RERANK_WEIGHTS}
    return max(RERANK_WEIGHTS, key=lambda w: (selection_score(scored[w]), -w)), scored


@torch.no_grad()
def validate(model: AlignmentModel, tokenizer, validation: ValidationSet, device, batch_size: int,
             text_features: TextFeatures | None = None, progress: bool = False) -> dict:
    """Text→video R@1/5/10, MdR, MnR on the validation set (every caption a query) by global cosine;
    with RWA also re-ranked as search and eval re-rank (the top RERANK_CANDIDATES by global + w·S_loc)
    for each w in RERANK_WEIGHTS, and the best w."""
    model.eval()
    queries, owners = validation.queries()
    video = encode_videos(model, validation, list(range(len(validation))), device, batch_size, regions=model.config.rwa,
                          progress=progress, desc="validation: encoding videos")
    text = encode_texts(model, tokenizer, queries, device, batch_size, text_features=text_features, progress=progress)
    model.train()
    similarity = (text.global_ @ video.global_.T).numpy()  # (Q, C)
    metrics = retrieval_metrics(similarity, owners)
    if model.config.rwa:
        top, local = candidate_local_scores(text, video, similarity, model.config.rwa_lambda, RERANK_CANDIDATES)
        metrics["rerank_weight"], scored = best_rerank_weight(similarity, top, local, owners)
        metrics["rerank"] = {str(w): {k: scored[w][k] for k in ("R@1", "R@5", "R@10", "MdR")} for w in RERANK_WEIGHTS}
    return metrics


def end_of_epoch(record: dict, run: Run, trainer: Trainer, processes: Processes, tensorboard) -> None:
    """Validation, the checkpoint (best by validation kept), the log line and file (main process)."""
    random_states = processes.random_states()  # each process's: a resume draws what a run never stopped would
    if not processes.main:
        return
    if run.data.validation is not None:
        started = time.monotonic()
        record["val"] = validate(trainer.model, trainer.tokenizer, run.data.validation, processes.device,
                                 run.train.val_batch_size, trainer.text_features, progress=not processes.quiet)
        record["val_seconds"] = time.monotonic() - started
    is_best = "val" in record and (trainer.best_score is None or selection_score(record["val"]) > trainer.best_score)
    if is_best:
        trainer.best_score = selection_score(record["val"])
    training_state = {
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "rng": random_states,
        "epoch": record["epoch"],
        "step": trainer.step,
        "best_score": trainer.best_score,
    }
    val = record.get("val", {})
    record["time"] = time.time()
    # the log line first, then the checkpoint: a kill between the two leaves a line that resume drops
    # (keep_log_until), never a checkpoint without its line
    ckpt.append_log_line(run.dir, record)
    ckpt.save_checkpoint(
        run.dir, record["epoch"], trainer.model, training_state,
        {"metrics": val, "loss": record.get("loss"), "vlpcache_version": __version__,
         "rerank_weight": val.get("rerank_weight", run.model.rerank_weight)},
        is_best=is_best,
    )
    for k, v in val.items():
        if isinstance(v, (int, float)):
            tensorboard.add_scalar(f"val/{k}", v, trainer.step)
    tensorboard.flush()
    line = (f"epoch {record['epoch']}/{run.train.epochs}: loss {record.get('loss', float('nan')):.4f}, "
            f"{record['samples_per_s']:.1f} {run.data.items}/s, {record['epoch_seconds']:.0f} s")
    if val:
        line += f"; val ({val['queries']} captions) R@1 {val['R@1']:.1f} R@5 {val['R@5']:.1f} R@10 {val['R@10']:.1f} MdR {val['MdR']:g}"
    if "rerank" in val:
        line += f" (re-ranked, weight {val['rerank_weight']}: R@1 {val['rerank'][str(val['rerank_weight'])]['R@1']:.1f})"
    processes.say(line)


# ---------------------------------------------------------------- the command


def settle_before_destroy(processes: Processes) -> None:
    """Before the process groups are destroyed: every process's last collective done, and (torch < 2.8) a
    moment for gloo's worker threads to free what those works held. There torch's ProcessGroupGloo destructor
    joins its worker threads holding the GIL, and a worker freeing a finished work's tensors waits for the GIL:
    both hang (torch 2.4, the gloo test under load: 16 of 25 runs hung; with a barrier alone 4 of 25 under more
    load; with the barrier and the wait 0 of 50: BENCHMARKS.md)."""
    if processes.world == 1:
        return
    processes.barrier()
    processes.wait_for_main()
    if torch_before(2, 8):
        time.sleep(GLOO_SETTLE_SECONDS)  # the GIL released: the workers free the works' tensors


def torch_before(major: int, minor: int) -> bool:
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) < (major, minor)


def run_pretrain(**options) -> dict:
    """Pretrain (or resume) a run; returns a summary dict. Keyword options are PretrainOptions fields."""
    options = PretrainOptions(**options)
    processes = start_processes(options.device, options.quiet)
    try:
        summary = _pretrain(options, processes)
        settle_before_destroy(processes)
        return summary
    finally:
        if processes.world > 1:
            dist.destroy_process_group()


def _pretrain(options: PretrainOptions, processes: Processes) -> dict:
    workspace = Workspace()
    claimed = not (options.resume or options.run_dir)  # a new runs/run-NNN (-o RUN_DIR: removed if it stays empty)
    for cache_dir in (options.cache_dirs or [workspace.cache_dir]) if claimed else []:  # looked for before it is made
        if not Path(cache_dir).exists():  # (RegionCache says the same, later, of a cache that goes)
            raise UserError(f"{cache_dir}: no such cache directory; run `vlpcache extract` first")
    run_dir, fresh = choose_run_dir(options, processes, workspace)
    options = begun_if_nothing_saved(options, run_dir, fresh, processes)
    with training_lock(run_dir, fresh, processes):
        try:
            run = resolve_run(options, run_dir, processes, workspace)
            if run.data is None:
                return _already_trained(run, processes)
            return _train(run, processes, workspace)
        except KeyboardInterrupt:  # under torchrun rank 0 alone says it
            raise Interrupted(interrupted_line(run_dir) if processes.main else "") from None


def interrupted_line(run_dir: Path) -> str:
    """What a Ctrl-C during pretraining leaves, and the command that continues it."""
    done = ckpt.checkpoints(run_dir)
    if not (run_dir / ckpt.CONFIG_NAME).exists():  # before make_trainer saved them: nothing to resume
        return f"{stopped()} before the settings of {run_dir} were saved: run the same command again"
    if (place := saved_place(run_dir, max(done, default=0))) is not None:
        kept = f"its checkpoints up to epoch {max(done)} and " if done else ""
        return (f"{stopped()}; {run_dir} keeps {kept}{place_text(place)}: `vlpcache pretrain --resume -o {run_dir}` "
                "continues from there")
    if not done:
        return (f"{stopped()} before the first checkpoint of {run_dir}: `vlpcache pretrain --resume -o {run_dir}` "
                "starts it again with its settings")
    return (f"{stopped()}; {run_dir} keeps its checkpoints up to epoch {max(done)}: "
            f"`vlpcache pretrain --resume -o {run_dir}` continues it")


def _train(run: Run, processes: Processes, workspace: Workspace) -> dict:
    torch.manual_seed(run.train.seed + processes.rank)
    np.random.seed(run.train.seed + processes.rank)
    trainer = make_trainer(run, processes, workspace)
    loader = make_loader(run, trainer, processes)
    tensorboard = None
    if processes.main:
        from torch.utils.tensorboard import SummaryWriter

        tensorboard = SummaryWriter(run.dir / TENSORBOARD_DIR, purge_step=trainer.step or None)
    per_epoch = loader.steps_per_epoch * loader.batch * processes.world
    items = run.data.items
    left = (f" ({per_epoch:,} of the {len(run.data.train):,} {items} an epoch, another draw each: a last part-batch "
            "is left out)") if per_epoch < len(run.data.train) else ""
    processes.say(
        f"run {run.dir}: {len(run.data.train)} {items} x {run.train.captions_per_video} caption(s), {processes.world} "
        f"process(es) on {processes.device}, batch {loader.batch}x{processes.world}, {loader.steps_per_epoch} steps/epoch{left}, "
        f"epochs {trainer.start_epoch}..{run.train.epochs}{_from_step(trainer, loader)}, text layers trained {run.model.text_trainable_layers}"
        f"{'' if trainer.text_features is None else ' (frozen layers: cached ' + trainer.text_features.kind + ')'}, RWA {'on' if run.model.rwa else 'off'}"
    )
    started = time.monotonic()
    history = []
    for epoch in range(trainer.start_epoch, run.train.epochs + 1):
        record = train_one_epoch(epoch, run, trainer, loader, processes, tensorboard)
        if trainer.resumed is not None:  # the first epoch after a resume says where it went on from
            record["resumed"], trainer.resumed = trainer.resumed, None
        try:
            end_of_epoch(record, run, trainer, processes, tensorboard)
        except KeyboardInterrupt:
            save_place_stopped_in_validation(run, trainer, processes, loader)
            raise
        history.append(record)
        wait_for_validation(processes)
    if tensorboard is not None:
        tensorboard.close()
    best = ckpt.read_best(run.dir)
    summary = {
        "run_dir": str(run.dir),
        "epochs": run.train.epochs,
        "trained_epochs": len(history),
        "seconds": time.monotonic() - started,
        "best": best,
        "last": history[-1] if history else None,
    }
    if not history:  # a run from before the videos' record, now written
        return _already_trained(run, processes)
    processes.say(f"done: {len(history)} epoch(s) in {human_duration(summary['seconds'])}; checkpoints in "
                  f"{run.dir / ckpt.CHECKPOINT_DIR}" + (f"; best val epoch {best['epoch']}" if best else "")
                  + f"; `vlpcache inspect {printable(str(run.dir))}` shows every epoch")
    if processes.main and (added := run.data.extracted_since()):
        processes.say(f"note: {added:,} item(s) were extracted into the cache while this run trained; it did not "
                      f"read them (`vlpcache pretrain --resume -o {printable(str(run.dir))} --epochs N` with more "
                      "epochs, or a new run, trains on those with captions)")
    return summary


def wait_for_validation(processes: Processes) -> None:
    """Under torchrun the other processes wait for rank 0's validation and checkpoint; where rank 0 is gone,
    stopped in it (a Ctrl-C or SIGTERM, which stopped them too), they stop without a traceback."""
    try:
        processes.barrier()
    except RuntimeError:  # torch.distributed's errors (DistBackendError...) are RuntimeErrors
        if stop_requested():
            raise KeyboardInterrupt from None
        raise


def _from_step(trainer: Trainer, loader: Loader) -> str:
    within = trainer.within
    if within is None:
        return ""
    if within.steps_done >= loader.steps_per_epoch:  # stopped in its validation
        return f" (epoch {within.epoch}'s steps all done: its validation and checkpoint first)"
    return f" (epoch {within.epoch} from its step {within.steps_done + 1:,})"


def record_new_epochs(run: Run, processes: Processes, done: int) -> None:
    """A resumed run's --epochs, where it differs from the stored one: recorded and said."""
    if processes.main and run.resumed and (before := ckpt.save_run_epochs(run.dir, run.train.epochs)) is not None:
        if done == run.train.epochs:  # its learning rate was planned to decay over `before` epochs: it never reached 0
            processes.say(f"--epochs {run.train.epochs}: the run now ends after epoch {run.train.epochs} (it was to end "
                          f"after {before}); {done} epochs are done already, so none is trained, and it is finished "
                          f"with the learning rate of epoch {done} of {before}")
        else:
            processes.say(f"--epochs {run.train.epochs}: the run now ends after epoch {run.train.epochs} (it was to end "
                          f"after {before}), and its learning rate decays to 0 there")


def record_new_locations(run: Run, processes: Processes) -> None:
    """A resumed run's caches and caption files, where they are not where it recorded them (found
    beside the moved run, or given anew): recorded, with the run's place, and said."""
    if not (processes.main and run.resumed):
        return
    config = ckpt.read_run_config(run.dir)
    stored = config["train"]
    now = {key: getattr(run.train, key) for key in LOCATED}
    here = str(run.dir.resolve())
    if all(stored.get(key) == now[key] for key in LOCATED) and stored.get("made_in") in (None, here):
        return
    moved = [p for key in LOCATED for p in location_list(now[key]) if p not in location_list(stored.get(key))]
    config["train"] = {**stored, **now, "made_in": here}
    write_json(run.dir / ckpt.CONFIG_NAME, config)
    if moved:
        processes.say(f"{run.dir}: reads {', '.join(map(printable, moved))} where it recorded other paths (moved "
                      "since); recorded in its config.json")


def _already_trained(run: Run, processes: Processes) -> dict:
    """A resumed run with every epoch of its --epochs trained: said, nothing trained."""
    record_new_epochs(run, processes, run.train.epochs)
    record_new_locations(run, processes)
    if processes.main:
        ckpt.remove_partials(run.dir)  # a place within an epoch that --epochs now leaves out
    processes.say(f"{run.dir}: already trained for {run.train.epochs} epochs; pass a larger --epochs to continue")
    return {"run_dir": str(run.dir), "epochs": run.train.epochs, "trained_epochs": 0, "seconds": 0.0,
            "best": ckpt.read_best(run.dir), "last": None}
