"""Pretraining throughput: the data loader alone, the model step alone, and training end to end.

The data loader is also measured against a reference layout read in the same run: one `.npz` file
per frame (features, boxes, mask), as DemoVLP stores its region features, through the same batching.
Both layouts are built here from the same random arrays with MSR-VTT-like shapes (by default 2 frames
× 31 regions × 1280-d, as `vlpcache extract` writes for the shared MSR-VTT frames), and both are read
warm (a first pass fills the page cache), so the ratio compares file formats, not disks. The cached
caption states that pretraining reads when the top text layers train are read memory-mapped, as
TextFeatures does, against the same file loaded whole into memory.

    python bench/pretrain_throughput.py                       # CPU (and CUDA when present)
    python bench/pretrain_throughput.py --videos 256 --steps 3 --device cpu
    python bench/pretrain_throughput.py --device cuda --profile   # + where each step's time goes

The model step and training end to end get the inputs `vlpcache pretrain` gives each configuration:
its default captions per video (4 while text layers train, up to 20 with the text encoder frozen) and
the frozen text layers' results encoded once into a workspace (text_features.py) and looked up by the
collate, as pretraining does; one row runs the whole text encoder live instead, as every row did
before, for comparison with the earlier tables in BENCHMARKS.md. The synthetic videos take real
MSR-VTT captions in turn where the shared data has them (--captions): a batch's captions are padded to
its longest, so their lengths set the text layers' cost (the random 6-13-word captions of the tables
before 2026-12-04 made the text side cheaper than pretraining on MSR-VTT).

The model steps run in the arithmetic `vlpcache pretrain` would choose (--precision; auto is bf16
autocast on CUDA and on CPUs that multiply bf16 natively, e.g. AMD Zen 4 or Intel Sapphire Rapids, fp32
on other CPUs); where that is not fp32, the defaults' step is also timed in fp32 beside it, and the ratio
printed. On the CPU the text layers run each batch's captions in groups of similar length
(model.CPU_LENGTH_GROUPS); the defaults' step is also timed with them in one batch padded to its
longest, as before, and the ratio printed.

Model steps and training end to end are timed after a warm-up (--warmup-steps, --warmup-seconds) in
--repeats runs of --steps steps each, the configurations taking turns within each repeat (so that a
drift during the run, of clocks or other load, does not fall on whichever comes first); the median is
printed with the runs' range, so a spread between runs shows in the output instead of passing for a
difference between configurations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vlpcache.cache.reader import RegionCache
from vlpcache.cache.schema import CacheSettings, empty_item
from vlpcache.cache.writer import ShardWriter
from vlpcache.errors import UserError
from vlpcache.model.config import PRECISIONS, captions_per_video_cap
from vlpcache.model.data import CaptionedRegions, CollateCaptionedRegions
from vlpcache.model import model as text_model_module
from vlpcache.model.model import ModelConfig, PretrainLoss, build_model
from vlpcache.model.text_features import TextFeatures, cache_kind, cached_text_features
from vlpcache.model.train import autocast_for, parameter_groups, train_step, TrainConfig

WORDS = "a man woman dog cat is are cooking playing running in on the kitchen street field ball car red blue".split()


def make_corpus(folder: Path, videos: int, frames: int, regions: int, dim: int, seed: int = 0,
                caption_sets: list[list[str]] | None = None):
    """The same random items as an HDF5 cache and as one .npz per frame; returns (cache, npz root, samples).
    Video v gets caption_sets[v % len(caption_sets)] (real captions: their lengths set the text encoder's
    padded length, hence its cost), or 20 random captions of 6-13 words without them."""
    rng = np.random.default_rng(seed)
    settings = CacheSettings(frames=frames, regions=regions, feature_dim=dim, detector="bench",
                             detector_weights_sha256="0", backbone="bench", backbone_weights_sha256="0")
    npz_root = folder / "npz"
    samples = []
    with ShardWriter(folder / "cache", settings, max_items=512) as writer:
        for v in range(videos):
            item = empty_item(settings)
            item["features"][:] = rng.standard_normal((frames, regions, dim)).astype(np.float16)
            xy = rng.uniform(0, 0.6, (frames, regions, 2))
            item["boxes"][:] = np.concatenate([xy, xy + 0.3], -1)
            item["region_mask"][:, : regions - v % 5] = True
            item["frame_mask"][:] = True
            item["timestamps"][:] = np.arange(frames)
            item_id = f"video{v}"
            writer.add(item_id, f"{item_id}.mp4", "video", item)
            (npz_root / item_id).mkdir(parents=True, exist_ok=True)
            for t in range(frames):
                np.savez(npz_root / item_id / f"{t}.npz", features=item["features"][t], boxes=item["boxes"][t],
                         region_mask=item["region_mask"][t])
            captions = (caption_sets[v % len(caption_sets)] if caption_sets
                        else [" ".join(rng.choice(WORDS, size=rng.integers(6, 14))) for _ in range(20)])
            samples.append((0, v, captions))
    return RegionCache(folder / "cache"), npz_root, samples


def real_captions(path: Path | None) -> tuple[list[list[str]] | None, str]:
    """The caption sets of a caption file (the shared MSR-VTT's by default), and how the corpus line names
    them; (None, "of random words ...") where there is none."""
    from vlpcache.captions import read_captions

    if path is None:
        msrvtt = Path(os.environ.get("VLPCACHE_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data" / "msrvtt"
        path = next((f for f in (msrvtt / "train.jsonl", msrvtt / "val.jsonl") if f.exists()), None)
        if path is None:
            return None, "of random words (6-13; no MSR-VTT caption file found)"
    sets = [texts for texts in read_captions(path, progress=False).by_id.values() if texts]
    return sets, f"of {path} ({len(sets):,} videos' captions in turn)"


class NpzFrames(Dataset):
    """Reference reader: one .npz per frame (DemoVLP's layout), same item dict as RegionCache."""

    def __init__(self, root: Path, ids: list[str], frames: int, samples, seed: int = 0):
        self.root, self.ids, self.frames, self.samples, self.seed = root, ids, frames, samples, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        _, v, texts = self.samples[index]
        per_frame = [np.load(self.root / self.ids[v] / f"{t}.npz") for t in range(self.frames)]
        item = {key: np.stack([f[key] for f in per_frame]) for key in ("features", "boxes", "region_mask")}
        item["frame_mask"] = np.ones(self.frames, dtype=bool)
        item["timestamps"] = np.arange(self.frames, dtype=np.float32)
        item["captions"] = [texts[np.random.default_rng([self.seed, 0, index]).integers(len(texts))]]
        return item


def loader_rate(dataset, collate, batch_size: int, workers: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate,
                        prefetch_factor=4 if workers else None)
    for _ in loader:  # warm: page cache and worker start-up measured out
        pass
    started = time.perf_counter()
    count = sum(batch["features"].shape[0] for batch in loader)
    return count / (time.perf_counter() - started)


def caption_states_file(folder: Path, captions: int, tokens: int, width: int, seed: int = 0) -> Path:
    """A file of cached frozen-layer token states (text_features.py's "prefix" layout) for `captions` random
    captions of about `tokens` tokens each, as pretraining with the top text layers trainable reads it."""
    import h5py

    rng = np.random.default_rng(seed)
    counts = rng.integers(tokens // 2, tokens * 3 // 2 + 1, captions)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    path = folder / "caption-states.h5"
    with h5py.File(path, "w") as f:
        states = f.create_dataset("tokens", (int(offsets[-1]), width), np.float16)
        for start in range(0, int(offsets[-1]), 1 << 18):
            stop = min(start + (1 << 18), int(offsets[-1]))
            states[start:stop] = rng.standard_normal((stop - start, width), np.float32).astype(np.float16)
        f.create_dataset("token_ids", data=rng.integers(1000, 30000, int(offsets[-1])).astype(np.int32))
        f.create_dataset("offsets", data=offsets)
        f.create_dataset("captions", data=np.array([f"caption {i}" for i in range(captions)], dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
        f.attrs["key"] = json.dumps({"kind": "prefix"})
    return path


def caption_read_rate(features, captions: list[str], batch: int, batches: int, seed: int = 0) -> float:
    """Captions/s of TextFeatures.model_inputs for batches of random captions (after one warm pass)."""
    rng = np.random.default_rng(seed)
    drawn = [[captions[i] for i in rng.choice(len(captions), batch, replace=False)] for _ in range(batches)]
    for part in drawn:
        features.model_inputs(part, part)
    started = time.perf_counter()
    for part in drawn:
        features.model_inputs(part, part)
    return batch * batches / (time.perf_counter() - started)


DEFAULT_LABEL = "defaults: RWA, top 2 text layers on the frozen 4's cached states"
# (label, model settings, whether the frozen part of the text encoder is read from its cache as pretrain does)
CONFIGURATIONS = (
    (DEFAULT_LABEL, dict(rwa=True, text_trainable_layers=2), True),
    ("no RWA, top 2 text layers on cached states", dict(rwa=False, text_trainable_layers=2), True),
    ("RWA, text frozen: its cached outputs (--trainable-layers 0)", dict(rwa=True, text_trainable_layers=0), True),
    ("RWA, all 6 text layers trainable (nothing to cache)", dict(rwa=True, text_trainable_layers=6), False),
    ("RWA, top 2 text layers, all 6 run live (no cache)", dict(rwa=True, text_trainable_layers=2), False),
)


def pretrain_inputs(setup, cache: RegionCache, samples, workspace: Path, cached: bool, device: torch.device):
    """(dataset, collate) as `vlpcache pretrain` makes them for this model: the captions per video of its
    default (captions_per_video_cap), and, with `cached`, the frozen text layers' results encoded once into
    the workspace (cached_text_features) and looked up by the collate instead of tokenizing."""
    model, tokenizer = setup[0], setup[1]
    per_video = min(captions_per_video_cap(model.config.text_trainable_layers), min(len(c) for _, _, c in samples))
    dataset = CaptionedRegions([cache], samples, captions_per_video=per_video)
    features = None
    if cached and cache_kind(model) is not None:
        features = cached_text_features(model, tokenizer, dataset.all_captions(), workspace, with_words=model.config.rwa,
                                        device=device, progress=False)
    return dataset, CollateCaptionedRegions(tokenizer, model.config.max_words, features)


def model_setup(feature_dim: int, device: torch.device, precision: str = "auto", **config):
    model_config = ModelConfig(feature_dim=feature_dim, **config)
    model, tokenizer = build_model(model_config)
    model.to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, TrainConfig()))
    arithmetic = autocast_for(device, precision)
    return model, tokenizer, PretrainLoss(model_config), optimizer, arithmetic.autocast, arithmetic.scaler


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_rates(steps: dict[str, Callable[[], int]], device: torch.device, steps_per_run: int, repeats: int,
                      warmup_steps: int, warmup_seconds: float) -> dict[str, list[float]]:
    """Samples/s of `repeats` timed runs of `steps_per_run` calls of each configuration's step() (each
    call returns the samples it took), the configurations taking turns within each repeat.

    Every configuration warms up first: at least `warmup_steps` calls and until `warmup_seconds` have
    passed. On CUDA the first calls of a new shape select kernels and the clocks ramp up, so a single
    warm-up call left the first configuration of a run up to 10x slower than the same one measured
    later; and timing each configuration's runs one after the other still left whatever drifts during
    a run (clocks, other processes) on whichever came first. Taking turns spreads it over all of them."""
    for step in steps.values():
        started, calls = time.perf_counter(), 0
        while calls < warmup_steps or time.perf_counter() - started < warmup_seconds:
            step()
            calls += 1
    synchronize(device)
    rates: dict[str, list[float]] = {label: [] for label in steps}
    for repeat in range(repeats):
        for label, step in steps.items():
            started = time.perf_counter()
            count = sum(step() for _ in range(steps_per_run))
            synchronize(device)
            rates[label].append(count / (time.perf_counter() - started))
            # each run as it is taken: a run stopped by a time limit keeps what it measured
            print(f"  run {repeat + 1} of {repeats}: {label}: {rates[label][-1]:.1f} samples/s", flush=True)
    return rates


SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def step_profile(step: Callable[[], int], device: torch.device, steps: int = 3) -> dict:
    """Where one step's time goes, from torch.profiler over `steps` steps (after the timed runs): wall,
    CPU-side op time and GPU kernel time per step, kernel launches and host syncs per step, the ops of
    most self CPU time. A step whose GPU time is far below its wall time waits on the CPU to launch
    kernels (or on syncs), not on arithmetic: the question the H200's "RWA costs 3x" left open."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        wall = time.perf_counter() - started
    events = prof.key_averages()

    def count(*names: str) -> int:
        return sum(e.count for e in events if e.key in names)
    ops = [e for e in events if e.key.startswith("aten::")]
    top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    return {
        "wall_ms": 1e3 * wall / steps,
        "cpu_op_ms": 1e-3 * sum(e.self_cpu_time_total for e in ops) / steps,
        "gpu_kernel_ms": 1e-3 * sum(getattr(e, "self_device_time_total", 0) for e in events
                                    if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA) / steps,
        "aten_ops": sum(e.count for e in ops) / steps,
        "kernel_launches": count("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC") / steps,
        "host_syncs": count(*SYNC_EVENTS) / steps,
        "item_calls": count("aten::_local_scalar_dense") / steps,
        "top_cpu_ops": [(e.key, 1e-3 * e.self_cpu_time_total / steps, e.count / steps) for e in top],
    }


def model_step(setup, batch: dict, device: torch.device) -> Callable[[], int]:
    """One training step of `setup` on the same batch each time (the loader left out)."""
    model, _, criterion, optimizer, autocast, scaler = setup
    inputs = {k: v.to(device) for k, v in batch.items() if k != "damaged"}

    def step() -> int:
        train_step(model, criterion, optimizer, inputs, autocast, scaler, 1.0)
        return batch["features"].shape[0]
    return step


def with_length_groups(groups: int, step: Callable[[], int]) -> Callable[[], int]:
    """`step` with the text encoder's CPU length groups (model.CPU_LENGTH_GROUPS) set to `groups`."""
    def run() -> int:
        kept, text_model_module.CPU_LENGTH_GROUPS = text_model_module.CPU_LENGTH_GROUPS, groups
        try:
            return step()
        finally:
            text_model_module.CPU_LENGTH_GROUPS = kept
    return run


def end_to_end_step(setup, dataset, collate, batch_size: int, workers: int, device: torch.device) -> Callable[[], int]:
    """One training step of `setup` on the loader's next batch (a new epoch when one ends)."""
    model, _, criterion, optimizer, autocast, scaler = setup
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", drop_last=True, prefetch_factor=4 if workers else None,
                        persistent_workers=bool(workers))
    iterator = iter(loader)

    def step() -> int:
        nonlocal iterator
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        train_step(model, criterion, optimizer,
                   {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "damaged"}, autocast, scaler, 1.0)
        return batch["features"].shape[0]
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=512)
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--regions", type=int, default=31)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--caption-states", type=int, default=20000,
                        help="captions in the cached caption-state file (15 tokens x 384-d each on average)")
    parser.add_argument("--steps", type=int, default=5, help="timed model steps per run of a configuration")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per configuration: the median is reported, the range beside it")
    parser.add_argument("--warmup-steps", type=int, default=3,
                        help="untimed steps before each configuration's runs (at least; see --warmup-seconds)")
    parser.add_argument("--warmup-seconds", type=float, default=2.0,
                        help="warm-up lasts at least this long (CUDA picks kernels and raises clocks at first)")
    parser.add_argument("--device", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--profile", action="store_true",
                        help="after the timings, profile a few steps of each configuration: wall, CPU-side and GPU "
                             "kernel time per step, kernel launches, host syncs, the costliest ops")
    parser.add_argument("--text-model", default="", help="default: the offline all-MiniLM-L6-v2")
    parser.add_argument("--captions", type=Path, default=None,
                        help="caption file whose videos' captions the synthetic videos take in turn [default: MSR-VTT's "
                             "train.jsonl, else val.jsonl, under $VLPCACHE_SHARED/data/msrvtt; random words without "
                             "either]")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the model steps' arithmetic, as pretrain --precision (auto: bf16 on CUDA and on CPUs with "
                             "native bf16); where it is not fp32, the defaults' step is also timed in fp32 beside it")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    for device_name in args.device:  # bf16 where the hardware lacks it: one line now, not after the loader rows
        try:
            autocast_for(torch.device(device_name), args.precision)
        except UserError as error:
            parser.error(f"{device_name}: {error}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {"machine": {"cpus": torch.get_num_threads(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
                     "shape": {"videos": args.videos, "frames": args.frames, "regions": args.regions, "dim": args.dim,
                               "batch_size": args.batch_size}}

    def report(key: str, value: float, unit: str = "samples/s") -> None:
        results[key] = value
        print(f"{key:<84} {value:10.1f} {unit}", flush=True)

    def report_runs(key: str, rates: list[float]) -> None:
        results[key] = float(np.median(rates))
        results[f"{key} runs"] = rates
        print(f"{key:<84} {results[key]:10.1f} samples/s  (runs {min(rates):.1f}-{max(rates):.1f})", flush=True)

    timing = dict(steps_per_run=args.steps, repeats=args.repeats, warmup_steps=args.warmup_steps,
                  warmup_seconds=args.warmup_seconds)

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        caption_sets, source = real_captions(args.captions)
        cache, npz_root, samples = make_corpus(Path(tmp), args.videos, args.frames, args.regions, args.dim,
                                               caption_sets=caption_sets)
        print(f"corpus: {args.videos} videos × {args.frames} frames × {args.regions} regions × {args.dim}-d, "
              f"captions {source}, written in {time.perf_counter() - started:.1f} s", flush=True)
        results["captions"] = source
        _, tokenizer = build_model(ModelConfig(feature_dim=args.dim, text_model=args.text_model), weights=False)
        collate = CollateCaptionedRegions(tokenizer, 32)
        hdf5 = CaptionedRegions([cache], samples)
        npz = NpzFrames(npz_root, cache.ids, args.frames, samples)

        # 1. data loader alone, against the one-.npz-per-frame reference
        for workers in args.workers:
            ours = loader_rate(hdf5, collate, args.batch_size, workers)
            reference = loader_rate(npz, collate, args.batch_size, workers)
            report(f"loader hdf5 cache, {workers} workers", ours)
            report(f"loader npz per frame (DemoVLP layout), {workers} workers", reference)
            report(f"  ratio hdf5 / npz, {workers} workers", ours / reference, "x")

        # 1b. cached caption states (top text layers trainable): memory-mapped, against the same file loaded whole
        features = TextFeatures(caption_states_file(Path(tmp), args.caption_states, 15, 384))
        names = list(features.row_of)
        mapped = caption_read_rate(features, names, args.batch_size * 4, 40)
        features.tokens = np.asarray(features.tokens[:])  # the reference: every state in memory
        loaded = caption_read_rate(features, names, args.batch_size * 4, 40)
        report("caption states memory-mapped (4 per video)", mapped, "captions/s")
        report("caption states loaded whole", loaded, "captions/s")
        report("  ratio memory-mapped / loaded", mapped / loaded, "x")
        del features

        # 2. model step alone and 3. end to end, with the inputs `vlpcache pretrain` gives each configuration:
        # its captions per video, and the text encoder's frozen part read from the workspace's cache
        # (text_features.py) wherever one can be
        for device_name in args.device:
            device = torch.device(device_name)
            arithmetic = autocast_for(device, args.precision).label
            steps = {}
            for label, config, cached in CONFIGURATIONS:
                setup = model_setup(args.dim, device, args.precision, text_model=args.text_model, **config)
                dataset, collate = pretrain_inputs(setup, cache, samples, Path(tmp) / "workspace", cached, device)
                batch = collate([dataset[i] for i in range(args.batch_size)])
                steps[f"model step {device_name} {arithmetic}, {label}"] = model_step(setup, batch, device)
                if label == DEFAULT_LABEL:
                    default_batch = batch
                    workers = 0 if device.type == "cpu" else 4  # the defaults of `vlpcache pretrain` (make_loader)
                    end_to_end = f"end to end {device_name} {arithmetic} (defaults, {workers} workers)"
                    steps[end_to_end] = end_to_end_step(
                        model_setup(args.dim, device, args.precision, text_model=args.text_model, **config),
                        dataset, collate, args.batch_size, workers, device)
            reference = None
            if arithmetic != "fp32":  # the same defaults step in full precision: what the autocast is worth
                reference = f"model step {device_name} fp32, {DEFAULT_LABEL}"
                steps[reference] = model_step(model_setup(args.dim, device, "fp32", text_model=args.text_model,
                                                          **CONFIGURATIONS[0][1]), default_batch, device)
            one_batch = None
            if device.type == "cpu" and text_model_module.CPU_LENGTH_GROUPS > 1:  # the texts as they ran before
                one_batch = f"model step {device_name} {arithmetic}, {DEFAULT_LABEL}, texts in one padded batch"
                steps[one_batch] = with_length_groups(1, model_step(model_setup(
                    args.dim, device, args.precision, text_model=args.text_model, **CONFIGURATIONS[0][1]), default_batch, device))
            steps[end_to_end] = steps.pop(end_to_end)  # timed last, as before
            for key, rates in interleaved_rates(steps, device, **timing).items():
                report_runs(key, rates)
            if reference:
                report(f"  ratio {arithmetic} / fp32 model step {device_name}, defaults",
                       results[f"model step {device_name} {arithmetic}, {DEFAULT_LABEL}"] / results[reference], "x")
            if one_batch:
                report(f"  ratio {text_model_module.CPU_LENGTH_GROUPS} length groups / one padded batch, model step "
                       f"{device_name}, defaults",
                       results[f"model step {device_name} {arithmetic}, {DEFAULT_LABEL}"] / results[one_batch], "x")
            if args.profile:
                for key, step in steps.items():
                    try:
                        profile = results[f"{key} profile"] = step_profile(step, device)
                    except Exception as err:  # e.g. no CUPTI for the CUDA activity: the timings above stand
                        print(f"{key}: not profiled ({type(err).__name__}: {err})", flush=True)
                        continue
                    print(f"{key} profiled, per step: {profile['wall_ms']:.1f} ms wall, {profile['cpu_op_ms']:.1f} ms "
                          f"in CPU-side ops, {profile['gpu_kernel_ms']:.1f} ms of GPU kernels; {profile['aten_ops']:.0f} "
                          f"ops, {profile['kernel_launches']:.0f} kernel launches, {profile['host_syncs']:.0f} host "
                          f"syncs, {profile['item_calls']:.0f} .item(); most CPU: "
                          + ", ".join(f"{name} {ms:.1f} ms ({calls:.0f}x)" for name, ms, calls in profile["top_cpu_ops"]),
                          flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
