"""The pretraining loop: AdamW, warmup + cosine, autocast on GPU, gradient clipping, a checkpoint and
validation every epoch, resume after kill -9, DistributedDataParallel under torchrun.

The loop knows the model only through `model(batch) -> (text, video, scales)` and `PretrainLoss`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from vlpcache import __version__
from vlpcache.devices import resolve_device
from vlpcache.errors import UserError
from vlpcache.metrics import retrieval_metrics
from vlpcache.model import checkpoint as ckpt
from vlpcache.model.batch import tokenize, video_batch
from vlpcache.model.losses import region_word_score, rerank_score
from vlpcache.model.data import CollateCaptionedRegions, PretrainData, ValidationSet, load_pretrain_data
from vlpcache.model.model import AlignmentModel, ModelConfig, PretrainLoss, build_model, load_text_backbone
from vlpcache.records import JsonRecord
from vlpcache.workspace import Workspace

LOG_NAME = "log.jsonl"


@dataclass
class TrainConfig(JsonRecord):
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4  # region encoder, projections, temperatures
    text_lr: float = 5e-5  # the pretrained text layers that train
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05  # of all steps
    grad_clip: float = 1.0
    seed: int = 0
    workers: int | None = None  # DataLoader workers per process (None: 1 on CPU, 4 on CUDA)
    val_batch_size: int = 128
    caches: list[str] = dataclasses.field(default_factory=list)
    captions: list[str] = dataclasses.field(default_factory=list)
    val_captions: str | None = None


def learning_rate_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------- processes and devices


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, value):
        """rank 0's value on every process."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def start_processes(device: str) -> Processes:
    """One process, or one of torchrun's (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    device = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return Processes(dist.get_rank(), world, torch.device("cuda", local_rank))
    dist.init_process_group("gloo")
    return Processes(dist.get_rank(), world, torch.device("cpu"))


def autocast_for(device: torch.device):
    """bf16 (or fp16 with a gradient scaler) autocast on CUDA; full precision on CPU."""
    if device.type != "cuda":
        return nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


# ---------------------------------------------------------------- validation


RERANK_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)  # candidates for global + w·S_loc, chosen on validation


@torch.no_grad()
def validate(model: AlignmentModel, tokenizer, validation: ValidationSet, device, batch_size: int) -> dict:
    """Text→video R@1/5/10, MdR, MnR on the validation set by global cosine; with RWA also by the
    re-rank score for each weight in RERANK_WEIGHTS (every candidate re-ranked) and the best weight."""
    model.eval()
    texts, videos = [], []
    for start in range(0, len(validation), batch_size):
        stop = min(start + batch_size, len(validation))
        input_ids, attention_mask = tokenize(tokenizer, validation.queries[start:stop], model.config.max_words)
        texts.append(model.encode_text(input_ids.to(device), attention_mask.to(device)))
        videos.append(model.encode_video(**video_batch(validation.items(start, stop), device)))
    model.train()
    text_global = torch.cat([t.global_.float() for t in texts])
    video_global = torch.cat([v.global_.float() for v in videos])
    similarity = text_global @ video_global.T  # (Q, C): query q's video is candidate q
    targets = np.arange(len(validation))
    metrics = retrieval_metrics(similarity.cpu().numpy(), targets)
    if model.config.rwa:
        local = torch.cat([
            region_word_score(t.words, t.word_mask, torch.cat([v.regions for v in videos]),
                              torch.cat([v.region_mask for v in videos]), model.config.rwa_lambda)
            for t in texts
        ])  # (Q, C)
        reranked = {
            w: retrieval_metrics(rerank_score(similarity, local, w).cpu().numpy(), targets) for w in RERANK_WEIGHTS
        }
        best = max(RERANK_WEIGHTS, key=lambda w: (selection_score(reranked[w]), -w))
        metrics["rerank"] = {str(w): {k: reranked[w][k] for k in ("R@1", "R@5", "R@10", "MdR")} for w in RERANK_WEIGHTS}
        metrics["rerank_weight"] = best
    return metrics


def train_step(trainable, criterion, optimizer, inputs: dict, autocast, scaler, grad_clip: float):
    """One optimisation step on a batch already on the device; returns (loss values, logit scale)."""
    with autocast():
        text, video, logit_scale, rwa_scale = trainable(inputs)
        losses = criterion(text, video, logit_scale, rwa_scale)
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


def selection_score(metrics: dict) -> float:
    return metrics["R@1"] + metrics["R@5"] + metrics["R@10"]


# ---------------------------------------------------------------- the run


def _latest_started_run(workspace: Workspace) -> Path:
    runs = [p.parent for p in workspace.runs_dir.glob(f"*/{ckpt.CONFIG_NAME}")]
    if not runs:
        raise UserError(f"--resume: no run in {workspace.runs_dir} to resume; pass -o RUN_DIR or start without --resume")
    return max(runs, key=lambda p: p.stat().st_mtime)


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


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _say(processes: Processes, quiet: bool, message: str) -> None:
    if processes.main and not quiet:
        print(message, file=sys.stderr, flush=True)


def run_pretrain(
    cache_dirs=(),
    captions=(),
    val_captions=None,
    run_dir=None,
    epochs=None,
    batch_size=None,
    text_model=None,
    no_rwa=False,
    resume=False,
    lr=None,
    text_lr=None,
    rwa_weight=None,
    trainable_layers=None,
    width=None,
    layers=None,
    workers=None,
    device="auto",
    seed=None,
    quiet=False,
) -> dict:
    """Pretrain (or resume) a run; returns a summary dict. Options left None take defaults (or, on
    --resume, the run's stored values)."""
    processes = start_processes(device)
    try:
        return _run(processes, **{k: v for k, v in locals().items() if k != "processes"})
    finally:
        if processes.world > 1:
            dist.destroy_process_group()


def _run(processes: Processes, **o) -> dict:
    workspace = Workspace()
    quiet = o["quiet"]
    # which run directory: every process must agree, so rank 0 decides
    run_dir = Path(o["run_dir"]) if o["run_dir"] else None
    if run_dir is None:
        run_dir = processes.broadcast(_latest_started_run(workspace) if o["resume"] else workspace.new_run_dir())
    stored = ckpt.read_run_config(run_dir) if (o["resume"] and (run_dir / ckpt.CONFIG_NAME).exists()) else None
    if o["resume"] and stored is None and not run_dir.exists():
        raise UserError(f"--resume: {run_dir} does not exist; start the run without --resume")
    if not o["resume"] and ckpt.checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints; pass --resume to continue it, or another -o RUN_DIR")

    # configs: stored ones on resume (only --epochs may change), else from the options
    if stored:
        train_config = TrainConfig.from_json(stored["train"])
        model_config = ModelConfig.from_json(stored["model"])
        if o["epochs"]:
            train_config.epochs = o["epochs"]
    else:
        train_config = TrainConfig(
            **{k: o[k] for k in ("epochs", "batch_size", "lr", "text_lr", "seed", "workers") if o[k] is not None},
            caches=[str(Path(c).resolve()) for c in (o["cache_dirs"] or [workspace.cache_dir])],
            captions=[str(Path(c).resolve()) for c in o["captions"]],
            val_captions=str(Path(o["val_captions"]).resolve()) if o["val_captions"] else None,
        )
    torch.manual_seed(train_config.seed + processes.rank)
    np.random.seed(train_config.seed + processes.rank)

    data: PretrainData = load_pretrain_data(
        [Path(c) for c in train_config.caches],
        [Path(c) for c in train_config.captions],
        Path(train_config.val_captions) if train_config.val_captions else None,
        seed=train_config.seed,
        workspace=workspace,
    )
    if not stored:  # record what the defaults resolved to, so that resume reads the same data
        train_config.captions = [str(p) for p in data.caption_files]
        train_config.val_captions = str(data.validation_file) if data.validation_file else None
        settings = data.caches[0].settings
        model_config = ModelConfig(
            feature_dim=settings.feature_dim,
            max_frames=max(64, max(c.settings.frames for c in data.caches)),
            **{k: v for k, v in {
                "text_model": o["text_model"],
                "text_trainable_layers": o["trainable_layers"],
                "rwa_weight": o["rwa_weight"],
                "width": o["width"],
                "layers": o["layers"],
            }.items() if v is not None},
        )
        model_config.rwa = not o["no_rwa"]
    for line in data.summary():
        _say(processes, quiet, line)

    # model, optimizer and, on resume, their state
    last = ckpt.checkpoints(run_dir)
    start_epoch, step, best_score = 1, 0, None
    if stored and last:
        backbone, tokenizer = load_text_backbone(str(run_dir / ckpt.TEXT_DIR), weights=False)
        model = AlignmentModel(model_config, backbone)
        resume_dir = last[max(last)]
        ckpt.load_weights(model, resume_dir)
    else:
        model, tokenizer = build_model(model_config)
        resume_dir = None
    if processes.main:
        ckpt.remove_temporaries(run_dir)
        if not stored:
            config = {
                "model": model_config.to_json(),
                "train": dataclasses.asdict(train_config),
                "cache_settings": data.caches[0].settings.to_json(),
                "vlpcache_version": __version__,
            }
            ckpt.save_run_files(run_dir, config, tokenizer, model.text_encoder.backbone.config)
    processes.barrier()
    model.to(processes.device)
    optimizer = torch.optim.AdamW(parameter_groups(model, train_config), betas=(0.9, 0.98), eps=1e-6)
    criterion = PretrainLoss(model_config)
    autocast, scaler = autocast_for(processes.device)
    if resume_dir is not None:
        state = ckpt.load_training_state(resume_dir)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"][min(processes.rank, len(state["rng"]) - 1)])
        start_epoch, step, best_score = state["epoch"] + 1, state["step"], state.get("best_score")
        _say(processes, False, f"resuming {run_dir} after epoch {state['epoch']} (step {step})")
    trainable = model
    if processes.world > 1:
        trainable = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[processes.device.index] if processes.device.type == "cuda" else None
        )

    # data loader: each process a disjoint shard of a per-epoch permutation
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers run inside forked workers
    workers = train_config.workers if train_config.workers is not None else (4 if processes.device.type == "cuda" else 1)
    if processes.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # one core per loader worker, the rest for the model: oversubscribed cores slow torch down many times
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // processes.world - workers))
    dataset = data.train
    sampler = DistributedSampler(
        dataset, num_replicas=processes.world, rank=processes.rank, shuffle=True, seed=train_config.seed,
        drop_last=processes.world > 1,
    )
    per_process = len(sampler)
    batch = min(train_config.batch_size, per_process)
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=CollateCaptionedRegions(tokenizer, model_config.max_words),
        pin_memory=processes.device.type == "cuda",
        drop_last=True,  # equal batches: all-gather needs them, and a tiny last batch has no negatives
        prefetch_factor=4 if workers else None,
    )
    steps_per_epoch = per_process // batch
    total_steps = steps_per_epoch * train_config.epochs
    warmup = max(1, int(train_config.warmup_fraction * total_steps))

    log_path = run_dir / LOG_NAME
    tensorboard = None
    if processes.main:
        from torch.utils.tensorboard import SummaryWriter

        tensorboard = SummaryWriter(run_dir / "tensorboard", purge_step=step if step else None)
        _say(processes, quiet, (
            f"run {run_dir}: {len(dataset)} samples, {processes.world} process(es) on {processes.device}, "
            f"batch {batch}×{processes.world}, {steps_per_epoch} steps/epoch, epochs {start_epoch}..{train_config.epochs}, "
            f"RWA {'on' if model_config.rwa else 'off'}"
        ))

    started = time.monotonic()
    history = []
    for epoch in range(start_epoch, train_config.epochs + 1):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        model.train()
        sums: dict[str, float] = {}
        epoch_started = time.monotonic()
        bar = tqdm(
            total=steps_per_epoch * batch * processes.world, unit="sample", unit_scale=True,
            desc=f"epoch {epoch}/{train_config.epochs}", disable=quiet or not processes.main, leave=False,
            dynamic_ncols=True,
        )
        for batch_cpu in loader:
            factor = learning_rate_factor(step, total_steps, warmup)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            values, logit_scale = train_step(
                trainable, criterion, optimizer, _to_device(batch_cpu, processes.device), autocast, scaler,
                train_config.grad_clip,
            )
            model.clamp_logit_scales()
            step += 1
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(batch * processes.world)
            bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
            if tensorboard is not None:
                for k, v in values.items():
                    tensorboard.add_scalar(f"train/{k}", v, step)
                tensorboard.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                tensorboard.add_scalar("train/temperature", 1 / float(logit_scale.detach()), step)
        bar.close()
        seconds = time.monotonic() - epoch_started
        record = {
            "epoch": epoch,
            "step": step,
            **{k: v / max(1, steps_per_epoch) for k, v in sums.items()},
            "samples_per_s": steps_per_epoch * batch * processes.world / max(seconds, 1e-9),
            "epoch_seconds": seconds,
            "temperature": float(1 / model.logit_scale.detach().exp()),
        }
        if processes.main:
            if data.validation is not None:
                record["val"] = validate(model, tokenizer, data.validation, processes.device, train_config.val_batch_size)
            is_best = "val" in record and (best_score is None or selection_score(record["val"]) > best_score)
            if is_best:
                best_score = selection_score(record["val"])
            # every process's RNG would be equal to save only with gather; rank 0's serves all on resume
            training_state = {
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": [ckpt.rng_state()],
                "epoch": epoch,
                "step": step,
                "best_score": best_score,
            }
            ckpt.save_checkpoint(
                run_dir, epoch, model, training_state,
                {"metrics": record.get("val", {}), "loss": record.get("loss"), "vlpcache_version": __version__,
                 "rerank_weight": record.get("val", {}).get("rerank_weight", model_config.rerank_weight)},
                is_best=is_best,
            )
            record["time"] = time.time()
            with open(log_path, "a") as log:
                log.write(json.dumps(record) + "\n")
            for k, v in record.get("val", {}).items():
                if isinstance(v, (int, float)):
                    tensorboard.add_scalar(f"val/{k}", v, step)
            tensorboard.flush()
            val = record.get("val")
            _say(processes, quiet, (
                f"epoch {epoch}/{train_config.epochs}: loss {record.get('loss', float('nan')):.4f}, "
                f"{record['samples_per_s']:.1f} samples/s, {seconds:.0f} s"
                + (f"; val R@1 {val['R@1']:.1f} R@5 {val['R@5']:.1f} R@10 {val['R@10']:.1f} MdR {val['MdR']:.0f}" if val else "")
                + (f" (re-ranked, weight {val['rerank_weight']}: R@1 {val['rerank'][str(val['rerank_weight'])]['R@1']:.1f})"
                   if val and "rerank" in val else "")
            ))
        history.append(record)
        processes.barrier()

    if tensorboard is not None:
        tensorboard.close()
    best = ckpt.read_best(run_dir)
    summary = {
        "run_dir": str(run_dir),
        "epochs": train_config.epochs,
        "trained_epochs": len(history),
        "seconds": time.monotonic() - started,
        "best": best,
        "last": history[-1] if history else None,
    }
    if not history:
        _say(processes, quiet, f"{run_dir}: already trained for {train_config.epochs} epochs; pass a larger --epochs to continue")
    else:
        _say(processes, quiet, (
            f"done: {len(history)} epoch(s) in {summary['seconds']:.0f} s; checkpoints in {run_dir / ckpt.CHECKPOINT_DIR}"
            + (f"; best val epoch {best['epoch']}" if best else "")
        ))
    return summary
