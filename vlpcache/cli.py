"""The command table: each command parses its options and calls one function, nothing more.

Stage modules are imported inside the commands so that `vlpcache --help` and `vlpcache search`
start without loading what they do not use; defaults come from the light modules that define them
(ExtractOptions, IndexConfig, RERANK_CANDIDATES, DEVICES), never restated here.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import math
import os
import sys
from pathlib import Path

import click

from vlpcache import __version__
from vlpcache.cache.schema import SCORE_THRESHOLD, SHARD_SECONDS
from vlpcache.devices import DEFAULT_DEVICE, DEVICES
from vlpcache.errors import Interrupted, UserError, user_message
from vlpcache.files import not_allowed, system_reason
from vlpcache.interrupts import exit_status, stopped, stops_remembered
from vlpcache.extract.detectors.spec import (
    DEFAULT_FRCNN_ARCH,
    DEFAULT_YOLOX_BACKBONE,
    DETECTORS,
    FRCNN_ARCHITECTURES,
    FRCNN_FEATURE_DIM,
    FRCNN_SCALES,
    REGIONS,
    VG_PROPOSALS,
    VG_SCALES,
    VG_MIN_REGIONS,
    VG_REGIONS,
    VG_SCORE_THRESHOLD,
    YOLOX_BACKBONES,
)
from vlpcache.extract.detectors.weights import VG_HUB_REPO
from vlpcache.extract.options import CPU_BATCH_SIZE, CUDA_BATCH_SIZE, ENGINES, ExtractOptions
from vlpcache.index.compare import RANKINGS, RESAMPLES
from vlpcache.index.layout import EXACT_LIMIT, IndexConfig
from vlpcache.metrics import RERANK_CANDIDATES
from vlpcache.model.config import ModelConfig as M  # defaults shown in `pretrain --help`
from vlpcache.model.config import MAX_CAPTIONS_PER_VIDEO, MAX_CAPTIONS_PER_VIDEO_TEXT_TRAINING, PRECISIONS
from vlpcache.model.config import TrainConfig as T
from vlpcache.report import bars_locked_in_this_process, close_bars, escape_what_stdout_cannot_encode


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange without nan and infinity: every comparison with nan is false, so a range lets
    `--lr nan` through (a model of NaN weights that validation then scored R@1 100)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class OutputClosed(Exception):
    """The reader of stdout stopped early (`vlpcache search ... | head -1`)."""


class CommandTable(click.Group):
    """The commands. A command whose reader closes stdout early (`| head -1`, `| grep -m1`) ends with
    exit status 0: click turned that BrokenPipeError into exit status 1, and only when the reader won
    the race with the last write, so a script under `set -o pipefail` failed now and then. The same
    for `vlpcache --help` and `--version`, which click writes while it reads the options."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except BrokenPipeError as err:
            raise OutputClosed() from err

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError as err:
            raise OutputClosed() from err

    def resolve_command(self, ctx, args):
        """A command name that is none: "Did you mean 'search'?" for `serach`, where click offered 'extract' too."""
        name = args[0] if args else ""
        if not name or ctx.resilient_parsing or self.get_command(ctx, name) is not None or name.startswith("-"):
            return super().resolve_command(ctx, args)
        close = closest(name, difflib.get_close_matches(name, self.list_commands(ctx)))
        ctx.fail(f"No such command {name!r}." + (f" Did you mean {' or '.join(map(repr, close))}?" if close else ""))


def closest(word: str, candidates: list[str]) -> list[str]:
    """The candidates most like `word` (a typed command or option), best first: the best alone where it is clearly
    the best (difflib's ratio 0.1 above the next: `serch` is `search`, not `serve`), else all of them."""
    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in candidates), key=lambda s: s[0],
                    reverse=True)
    if len(scored) > 1 and scored[0][0] - scored[1][0] >= 0.1:
        return [scored[0][1]]
    return [c for _, c in scored]


@click.group(cls=CommandTable, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vlpcache")
def cli() -> None:
    """Affordable video-language pretraining on cached region features.

    \b
    vlpcache extract videos/                 sparse frames -> detector -> region cache
    vlpcache pretrain                        cache + captions -> model checkpoint
    vlpcache search "person cuts onion"      ranked videos with times and matching regions
    vlpcache serve                           the same search as a page in the browser
    vlpcache index / eval / inspect          build the index; R@K on a caption file; a cache or a run
    vlpcache compare A.jsonl B.jsonl         two models on the same queries (eval --per-query), with intervals
    vlpcache merge cache-0 cache-1 -o cache  caches extracted apart (a cache per array task) as one
    vlpcache models list|fetch|verify        the detector weights (fetched on first use)
    """


# ---------------------------------------------------------------- options several commands share

device_option = click.option("--device", default=DEFAULT_DEVICE, show_default=True, type=click.Choice(DEVICES),
                             help="auto: CUDA when torch sees a GPU, else CPU.")
run_option = click.option("--run", "run_dir", type=click.Path(), help="Run directory [default: the workspace's latest run].")
cache_option = click.option("--cache", "cache_dir", type=click.Path(), help="Region cache [default: .vlpcache/cache].")
index_option = click.option("--index", "index_dir", type=click.Path(),
                            help="Index directory [default: .vlpcache/index; built on first use].")
models_option = click.option("--models", "models", type=click.Path(),
                             help="Folder of detector weights [env VLPCACHE_MODELS, else "
                                  "~/.cache/vlpcache/models, or under $XDG_CACHE_HOME where set].")
checkpoint_option = click.option("--checkpoint", default=None,
                                 help="best, last or an epoch [default: best by validation, else last].")


def quiet_option(help: str):
    return click.option("--quiet", is_flag=True, help=help)


def json_option(help: str):
    return click.option("--json", "as_json", is_flag=True, help=help)


def backbone_help() -> str:
    yolox = ", ".join(f"{name} ({dim}-d)" for name, dim in YOLOX_BACKBONES.items())
    return (f"Region features. yolox: {yolox} [default: {DEFAULT_YOLOX_BACKBONE}]. frcnn: the architecture, whose "
            f"{FRCNN_FEATURE_DIM}-d box head gives the features: {', '.join(FRCNN_ARCHITECTURES)} "
            f"[default: {DEFAULT_FRCNN_ARCH}].")


def scale_defaults(proposals: bool = False) -> str:
    """--scale's (or --proposals') default: bottom-up attention's, and the architectures' own where other."""
    def shown(short: int, long: int, count: int) -> str:
        return str(count) if proposals else f"{short}/{long}"

    usual = shown(*VG_SCALES, VG_PROPOSALS)
    other = {arch: shown(*scales) for arch, scales in FRCNN_SCALES.items() if shown(*scales) != usual}
    return "; ".join([usual, *(f"{arch}: {value}" for arch, value in other.items())])


# ---------------------------------------------------------------- the commands

@cli.command()
@click.argument("roots", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--output", "cache_dir", type=click.Path(), help="Cache directory [default: .vlpcache/cache].")
@click.option("--frames", default=ExtractOptions.frames, show_default=True, type=click.IntRange(1, 512),
              help="Frames sampled per item (T).")
@click.option("--regions", default=None, type=click.IntRange(1, 1000),
              help=f"Detected regions kept per frame; one whole-frame region is added (N = regions + 1) "
                   f"[default: {REGIONS}; vg: {VG_REGIONS}, keeping at least {VG_MIN_REGIONS} (all of a smaller "
                   f"--regions) even below --score-threshold].")
@click.option("--detector", default=ExtractOptions.detector, show_default=True, type=click.Choice(DETECTORS),
              help="yolox: YOLOX-Nano, COCO; frcnn: torchvision Faster R-CNN, COCO; vg: bottom-up attention's "
                   "Visual Genome Faster R-CNN (DemoVLP's features, with attributes).")
@click.option("--backbone", default=None, help=backbone_help())
@click.option("--weights", type=click.Path(),
              help=f"frcnn: a state dict file (.pth or .safetensors) instead of torchvision's COCO weights; vg: the "
                   f"checkpoint instead of {VG_HUB_REPO}'s, fetched into the models folder.")
@click.option("--scale", metavar="SHORT/LONG",
              help=f"frcnn, vg: input size, shorter side SHORT, longest at most LONG [default: {scale_defaults()}].")
@click.option("--proposals", type=click.IntRange(1),
              help=f"frcnn, vg: region proposals per frame [default: {scale_defaults(proposals=True)}].")
@models_option
@device_option
@click.option("--batch-size", default=None, type=click.IntRange(1),
              help=f"Frames per detector batch [default: {CPU_BATCH_SIZE} on CPU, {CUDA_BATCH_SIZE} on CUDA].")
@click.option("--autotune/--no-autotune", default=ExtractOptions.autotune, show_default=True,
              help="CUDA: let cuDNN time its convolution algorithms for each new input shape: faster once tuned, "
                   "seconds per new shape (an H200: 5-7 s). --no-autotune: none of that cost, for short jobs.")
@click.option("--workers", default=None, type=click.IntRange(0), help="Decoding worker processes [default: the CPU cores this process may use (taskset, a SLURM job's, docker --cpus) - 1, at least 1].")
@click.option("--decode-timeout", default=ExtractOptions.decode_timeout, show_default=True, type=FiniteFloatRange(0),
              metavar="SECONDS", help="Time one item's decoding may take before its worker is stopped and the item "
                                      "recorded as failed (a hostile file can send a decoder into a loop); 0: no limit.")
@click.option("--frame-folders/--no-frame-folders", default=ExtractOptions.frame_folders, show_default=True,
              help="A folder below a root that holds images only is one item, a video's frames; with "
                   "--no-frame-folders each image is an item (photo collections in subfolders: coco/train2014/).")
@click.option("--shard", default=ExtractOptions.shard, show_default=True,
              help="Process only part i of n of the items (i/n), for many machines.")
@click.option("--retry-failed", is_flag=True, help="Retry items recorded as failed in an earlier run.")
@click.option("--prune", is_flag=True, help="Drop from the cache the items under ROOTS that are no longer there "
                                             "(files deleted, renamed, no longer items), and their failure records.")
@click.option("--items-per-shard", default=ExtractOptions.items_per_shard, show_default=True, type=click.IntRange(1),
              help=f"Items per shard file; a crash loses at most the shard in progress (also committed every "
                   f"{SHARD_SECONDS / 60:g} min).")
@click.option("--score-threshold", default=None, type=FiniteFloatRange(0, 1),
              help=f"Minimum detection score [default: {SCORE_THRESHOLD}; vg: {VG_SCORE_THRESHOLD}].")
@click.option("--engine", default=ExtractOptions.engine, show_default=True, type=click.Choice(ENGINES),
              help='Where the stages run: local processes, or a Ray cluster (pip install "vlpcache[ray]").')
@click.option("--ray-address", metavar="ADDR",
              help="--engine ray: the cluster to join (auto, or HOST:6379) [default: $RAY_ADDRESS, else a local instance].")
@quiet_option("No progress bar or per-item lines; the summary only.")
def extract(**options) -> None:
    """Sample frames of every video/image/frame folder under ROOTS and cache their region features."""
    from vlpcache.extract.runner import run_extract

    summary = run_extract(**options)
    # Everything is committed by now (shards renamed and fsynced, failure log closed): the command's own
    # process skips the interpreter's teardown of torch, torchvision and onnxruntime, about 1 s of every run.
    exit_now(0 if summary.ok else 1, teardown_needless=True)


@cli.group(name="models")
def models_group() -> None:
    """The detectors' weight files: fetched into the models folder on first use, verified; offline with
    VLPCACHE_OFFLINE=1 (copy a folder made by `vlpcache models fetch` on a machine with network)."""


@models_group.command(name="list")
@models_option
@json_option("Print the list as JSON.")
def models_list(models, as_json) -> None:
    """Each weights file: present or missing, size, sha256, sources, licence."""
    from vlpcache.extract.detectors.models_folder import list_weights

    list_weights(models, as_json=as_json)


@models_group.command(name="fetch")
@click.argument("names", nargs=-1)
@models_option
def models_fetch(names, models) -> None:
    """Fetch the missing weights files NAMES (default: all but the vg checkpoint, fetched by name) into the models
    folder, verified."""
    from vlpcache.extract.detectors.models_folder import fetch_weights

    fetch_weights(names, models)


@models_group.command(name="verify")
@models_option
def models_verify(models) -> None:
    """Check every weights file: sha256 against the known files, structure (inputs, outputs, shapes)."""
    from vlpcache.extract.detectors.models_folder import verify_weights

    sys.exit(0 if verify_weights(models) else 1)


@cli.command()
@click.argument("sources", metavar="CACHE...", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "target", type=click.Path(),
              help="The cache to merge into, created where it is none [default: .vlpcache/cache].")
@quiet_option("No progress bar.")
def merge(sources, target, quiet) -> None:
    """Merge caches of the same settings into one (a cache per array task, then one collection to index,
    search, serve and evaluate). Shards are hard-linked where on one filesystem, else copied; the sources
    are left as they are; run it again to finish one that was stopped.

    \b
    vlpcache merge /shared/cache-0 /shared/cache-1 /shared/cache-2 -o /shared/cache
    """
    from vlpcache.cache.merge import merge_caches
    from vlpcache.workspace import Workspace

    merge_caches([Path(s) for s in sources], Path(target) if target else Workspace().cache_dir, progress=not quiet)


@cli.command()
@click.argument("cache_dir", metavar="[CACHE|RUN]", required=False, type=click.Path())
@click.option("--runs", "list_runs", is_flag=True, help="List the workspace's pretraining runs (or those in the folder "
              "given): state, epochs, best validation, and the one index, search and eval use by default.")
@click.option("--render", "render_id", metavar="ID", help="Draw the sampled frames of item ID with its boxes.")
@click.option("-o", "--output", type=click.Path(),
              help="Image file for --render [default: ID.png, with _ for what is not a letter, a digit, - or .: "
                   "clips_a.png for clips/a].")
@json_option("Print the summary as JSON.")
@click.option("--failures", is_flag=True, help="List every failed item with its reason, and every item kept with a "
              "note (damaged, or photos in a frames folder), and every path extraction passed over (a broken link, an "
              "unreadable folder, a duplicate id...).")
def inspect(cache_dir, list_runs, render_id, output, as_json, failures) -> None:
    """Summarise a cache (items, failures, T/N/D, provenance, size), or render one item; or a pretraining
    run (its settings and each epoch's validation), or list the runs."""
    from vlpcache.model.inspect_run import holds_runs, inspect_run, is_run_dir, no_such_run_or_cache
    from vlpcache.model.inspect_run import list_runs as print_runs

    if cache_dir is not None and not list_runs and not os.path.lexists(cache_dir):
        raise no_such_run_or_cache(Path(cache_dir))
    run = cache_dir is not None and is_run_dir(Path(cache_dir))
    runs = list_runs or (cache_dir is not None and holds_runs(Path(cache_dir)))
    if run or runs:
        if render_id is not None or failures:
            raise UserError("--render and --failures look at a cache, not at pretraining runs")
        if runs:
            print_runs(cache_dir, as_json)
        else:
            inspect_run(cache_dir, as_json)
        return
    if render_id is not None:  # re-decodes the item's sources: extraction's business
        from vlpcache.extract.render import render_cache_item

        render_cache_item(cache_dir, render_id, output)
        return
    from vlpcache.cache.inspect import inspect_cache

    inspect_cache(cache_dir, as_json=as_json, list_failures=failures)


@cli.command()
@click.option("--cache", "cache_dirs", multiple=True, type=click.Path(), help="Region cache(s) to train on, repeatable [default: .vlpcache/cache].")
@click.option("--captions", multiple=True, type=click.Path(),
              help="Caption file(s), repeatable: .jsonl, .csv, a dataset's own JSON (MSR-VTT, Karpathy's "
                   "splits, COCO, ActivityNet, DiDeMo), id-and-caption lines (.txt), or a folder with a .txt beside "
                   "each image (img2dataset) [default: .jsonl/.csv found in the workspace or beside the extracted "
                   "roots].")
@click.option("--val-captions", type=click.Path(), help="Held-out caption file: text->video R@K every epoch [default: val.jsonl beside "
                   "the captions found by default, else a training file's own validation split].")
@click.option("-o", "--output", "run_dir", type=click.Path(), help="Run directory [default: .vlpcache/runs/run-NNN; with --resume the latest].")
@click.option("--epochs", default=None, type=click.IntRange(1), help=f"Epochs [default: {T.epochs}; on --resume the run's: more extend it, fewer (not below those done) end it sooner].")
@click.option("--batch-size", default=None, type=click.IntRange(1), help=f"Videos per step and process [default: {T.batch_size}].")
@click.option("--captions-per-video", default=None, type=click.IntRange(1),
              help="Captions of each video per step, all positives of it (multi-positive InfoNCE) [default: the median "
                   f"number of captions of a training video, at most {MAX_CAPTIONS_PER_VIDEO} with a frozen text encoder, "
                   f"{MAX_CAPTIONS_PER_VIDEO_TEXT_TRAINING} when it trains].")
@click.option("--text-model", default=None, metavar="NAME|DIR", help="Hugging Face name or directory [default: offline all-MiniLM-L6-v2].")
@click.option("--trainable-layers", default=None, type=click.IntRange(0),
              help=f"Top text-encoder layers that train; 0 freezes it and encodes every caption once; more than it has trains them all and its word embeddings [default: {M.text_trainable_layers}].")
@click.option("--max-words", default=None, type=click.IntRange(4, 512),
              help=f"Tokens of a caption the model reads, [CLS] and [SEP] included; longer captions are cut there, "
                   f"and so are search queries [default: {M.max_words}].")
@click.option("--no-rwa", is_flag=True, help="Train with the video-text contrastive loss only (no region-word alignment).")
@click.option("--rwa-weight", default=None, type=FiniteFloatRange(0), help=f"Weight of the region-word alignment loss [default: {M.rwa_weight}].")
@click.option("--lr", default=None, type=FiniteFloatRange(0, min_open=True), help=f"Learning rate of the region encoder [default: {T.lr:g}].")
@click.option("--text-lr", default=None, type=FiniteFloatRange(0, min_open=True), help=f"Learning rate of the text layers [default: {T.text_lr:g}].")
@click.option("--width", default=None, type=click.IntRange(8, 4096), help=f"Region transformer width [default: {M.width}].")
@click.option("--layers", default=None, type=click.IntRange(1, 48), help=f"Region transformer layers [default: {M.layers}].")
@click.option("--frame-time", default=None, type=click.Choice(["relative", "none"]),
              help=f"Frame position embedding: each frame's place among the item's frames, or none [default: {M.frame_time}].")
@click.option("--global-path/--no-global-path", default=None,
              help=f"Add the whole-frame features' mean over frames to the video embedding [default: {'on' if M.global_path else 'off'}].")
@click.option("--frame-dropout", default=None, type=FiniteFloatRange(0, 1, max_open=True), help=f"Training: chance to hide a frame [default: {M.frame_dropout:g}].")
@click.option("--region-dropout", default=None, type=FiniteFloatRange(0, 1, max_open=True), help=f"Training: chance to hide a region [default: {M.region_dropout:g}].")
@click.option("--text-pooling", default=None, type=click.Choice(["mean", "cls"]),
              help="Caption embedding from the text encoder's tokens: their mean, or the first ([CLS]) "
                   "[default: the text model's own sentence-transformers pooling, else mean].")
@click.option("--text-head", default=None, type=click.Choice(["linear", "mlp"]),
              help=f"Text encoder -> joint space: linear, or linear plus a residual MLP [default: {M.text_head}].")
@click.option("--resume", is_flag=True,
              help="Continue the run (-o, or the latest) from its last checkpoint; -o RUN that holds nothing to "
                   "resume yet is begun with the options given (one command for a job that is requeued).")
@click.option("--init", default=None, type=click.Path(), metavar="RUN|CHECKPOINT",
              help="Start from another run's trained weights (its best checkpoint, or the checkpoint folder given) and "
                   "fine-tune them on these caches and captions: a new run with that run's model (options that would "
                   "change it are refused) and its own training settings.")
@click.option("--workers", default=None, type=click.IntRange(0), help="Data-loading worker processes [default: 0 on CPU (read in the training process), 4 on CUDA].")
@click.option("--precision", default=None, type=click.Choice(PRECISIONS),
              help="Training arithmetic: auto is bf16 autocast on CUDA (fp16 where the GPU lacks bf16) and on CPUs "
                   "with native bf16 (AVX512-BF16, AMX; about 1.5x faster there), fp32 on other CPUs; weights, "
                   "validation and search stay fp32; bf16 is refused where it would be emulated; --resume may "
                   "change it [default: auto].")
@click.option("--save-every", default=None, type=FiniteFloatRange(0), metavar="MINUTES",
              help="Save the run's place within an epoch every MINUTES of training and when Ctrl-C or SIGTERM stops "
                   "it: --resume continues from there (0: never; a stopped epoch is redone); --resume may change it "
                   f"[default: {T.save_every:g}].")
@device_option
@click.option("--seed", default=None, type=click.IntRange(0, 2**32 - 1), help=f"Random seed [default: {T.seed}].")
@quiet_option("No progress bar or per-epoch lines.")
def pretrain(**options) -> None:
    """Pretrain the region-word alignment model on cached regions and captions (torchrun for several processes)."""
    from vlpcache.model.train import run_pretrain

    run_pretrain(**options)


@cli.command()
@run_option
@cache_option
@click.option("-o", "--output", "index_dir", type=click.Path(), help="Index directory [default: .vlpcache/index].")
@click.option("--factory", default=None, metavar="STRING",
              help='FAISS factory string instead of the automatic choice, e.g. "Flat", "HNSW32,Flat", "IVF1024,PQ32np,Refine(SQ8)".')
@click.option("--memory-budget", "memory_budget_mb", default=IndexConfig.memory_budget_mb, show_default=True,
              type=FiniteFloatRange(1), metavar="MB",
              help=f"RAM the index may use; decides HNSW vs IVF-PQ beyond {EXACT_LIMIT:,} videos.")
@click.option("--rebuild", is_flag=True, help="Discard an existing index (another checkpoint, cache or type) and build anew.")
@click.option("--qbnorm", is_flag=True, help="Also make the query bank that search --qbnorm ranks with (QB-Norm).")
@click.option("--prune", is_flag=True,
              help="Also remove the indexes in the index directory of checkpoints that no run holds any more "
                   "(re-training leaves one per old best checkpoint).")
@checkpoint_option
@device_option
@click.option("--batch-size", default=None, type=click.IntRange(1), help="Videos per encoding batch [default: 64 on CPU, 256 on CUDA].")
@quiet_option("No progress bar; errors only.")
@click.option("--export", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write the embeddings and ids for other tools: FILE.npy (+ FILE.ids.json) or FILE.parquet.")
def index(**options) -> None:
    """Encode every cached video with a run's checkpoint into a FAISS index (new videos only, when it exists)."""
    from vlpcache.index.build import run_index

    run_index(**options)


@cli.command()
@click.argument("text", required=False)
@click.option("--queries", "queries_file", type=click.Path(allow_dash=True),
              help="File with one query per line (- for stdin; '# ' starts a comment line); with TEXT too, TEXT is "
                   "the first query.")
@click.option("-k", default=10, show_default=True, type=click.IntRange(1), help="Results per query.")
@json_option("One JSON object per query.")
@click.option("--no-rerank", is_flag=True, help="Rank by global similarity only (no region-word re-rank).")
@click.option("--qbnorm", is_flag=True,
              help="Rank by query-bank normalised global similarity (QB-Norm; no re-rank); the bank is made on first use.")
@click.option("--like", "like", multiple=True, metavar="ID|FILE",
              help="Instead of words: the items most like an indexed one (its id as search prints it, or a file name "
                   "or path that ends in it), by its own embedding; or like a video, photo or frames folder the cache "
                   "does not hold (extracted on its own, with the cache's settings; not added); may be given several "
                   "times.")
@run_option
@cache_option
@index_option
@device_option
def search(**options) -> None:
    """Videos that match TEXT (or are like an indexed one, or a clip of yours), best first, with the best-matching
    time and the regions that matched the words."""
    from vlpcache.extract import extract_outside
    from vlpcache.extract.stamps import source_changed
    from vlpcache.index.search import run_search

    run_search(**options, outside=extract_outside, changed=source_changed)


@cli.command()
@run_option
@cache_option
@index_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@click.option("--uploads/--no-uploads", default=None,
              help="Whether the page takes clips and photos to compare (Like a clip...): by default only where it "
                   "listens on this machine alone; --uploads takes them from anyone who can reach it.")
@click.option("--allow-host", "allow_host", multiple=True, metavar="NAME",
              help="Answer requests for this host name too: a proxy of yours the page is opened through (JupyterHub's "
                   "jupyter-server-proxy, nginx), e.g. --allow-host hub.example.org; repeatable. Its users may search; "
                   "uploads need --uploads.")
@click.option("--thumbnails-max", "thumbnails_max", default=None, type=FiniteFloatRange(0.01), metavar="GB",
              help="Space the thumbnails kept in the index's folder may take; over it, those least recently shown are "
                   "removed [default: 2].")
@device_option
def serve(**options) -> None:
    """A search page and JSON API in the browser: thumbnails with the matched regions, the query in the URL."""
    from vlpcache.serve.command import run_serve

    run_serve(**options)


@cli.command(name="eval")
@click.option("--captions", "captions_file", required=True, type=click.Path(), help="Caption file of cached videos, in any form pretrain reads (.jsonl, .csv, "
                   "a dataset's own JSON, .txt lines, a folder).")
@run_option
@cache_option
@click.option("--split", default=None, metavar="NAME",
              help="Only the videos of this split of the caption file (its \"split\" key, MSR-VTT's or Karpathy's "
                   "splits: test, val...) [default: every video it captions].")
@click.option("--all-captions", is_flag=True, help="Every caption is a query (default: the first caption of each video).")
@click.option("--paragraphs", is_flag=True,
              help="One query per video, its captions joined in file order: the paragraph-to-video protocol of "
                   "DiDeMo and ActivityNet Captions.")
@click.option("--max-words", type=click.IntRange(4, 512), default=None,
              help="Tokens per query, special tokens included [default: the run's (32); --paragraphs: 128, or the text model's positions where fewer].")
@click.option("--qbnorm", is_flag=True, help="Also rank by query-bank normalisation (bank: the run's training captions).")
@click.option("--dual-softmax", is_flag=True, help="Also report dual softmax (needs all test queries at once: eval only).")
@click.option("--rerank-candidates", default=RERANK_CANDIDATES, show_default=True, type=click.IntRange(0),
              help="Top candidates per query re-ranked by region-word score (0: no re-rank).")
@json_option("Print the metrics as JSON.")
@click.option("--per-query", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also write each text->video query's record to this JSON Lines file: its text, its video, that "
                   "video's rank under each ranking, the best candidates.")
@checkpoint_option
@device_option
@click.option("--batch-size", default=None, type=click.IntRange(1), help="Videos or captions per encoding batch [default: 64 on CPU, 256 on CUDA].")
@quiet_option("No progress bar.")
def eval_(**options) -> None:
    """Text->video and video->text R@1/5/10, median and mean rank on a caption file, with and without re-rank."""
    from vlpcache.index.evaluate import run_eval

    try:
        run_eval(**options)
    except KeyboardInterrupt:
        raise Interrupted(f"{stopped()}; eval writes nothing, so nothing is lost: run it again for the figures") from None


@cli.command()
@click.argument("files", nargs=-1, required=True, metavar="A.jsonl B.jsonl | A1.jsonl A2.jsonl... vs B1.jsonl...")
@click.option("--ranking", type=click.Choice(list(RANKINGS)), default="global", show_default=True,
              help="Which of eval's rankings to compare (reranked, qbnorm, dual-softmax: where eval computed them).")
@click.option("--resamples", type=click.IntRange(100), default=RESAMPLES, show_default=True,
              help="Bootstrap resamples (of the videos, each with all its queries).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True, help="Seed of the bootstrap's resampling.")
@json_option("Print the comparison as JSON.")
def compare(files, **options) -> None:
    """Two models on the same queries: R@1/5/10 and median rank of each, B - A, and its 95% interval by a
    paired bootstrap over the videos; from `vlpcache eval --per-query` files of one caption file.

    \b
    vlpcache compare runs/a.jsonl runs/b.jsonl
    vlpcache compare a-seed0.jsonl a-seed1.jsonl a-seed2.jsonl vs b-seed0.jsonl b-seed1.jsonl b-seed2.jsonl
    """
    from vlpcache.index.compare import run_compare

    run_compare(files, **options)


# what the operating system says when the disk, a path or the permissions fail us: the user's to fix
ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                      errno.EISDIR, errno.ENAMETOOLONG, errno.EFBIG, errno.ENOENT, errno.EEXIST}


# how numpy, torch, onnxruntime and the dynamic loader say that an allocation or a library's mapping failed
OUT_OF_MEMORY = ("can't allocate memory", "cannot allocate memory", "failed to map segment", "bad_alloc",
                 "bfc_arena")


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` is the process running out of memory (a `ulimit -v` cap, as some clusters set), which
    each library reports as its own exception: a traceback of torch's allocator said nothing of the cap."""
    return isinstance(err, MemoryError) or any(words in str(err).lower() for words in OUT_OF_MEMORY)


def out_of_memory_line() -> str:
    """The one line for out_of_memory, with the address-space cap where one is set."""
    import resource

    cap = resource.getrlimit(resource.RLIMIT_AS)[0]
    limit = (f"this process may use {cap / 2**30:.1f} GiB of address space (ulimit -v {cap // 1024}); importing torch "
             "alone takes more than 2 GiB of it: raise the limit (ulimit -v unlimited, or your scheduler's memory request)"
             if cap != resource.RLIM_INFINITY else "free memory or use a smaller --batch-size")
    return f"out of memory: {limit}; nothing committed before is lost"


def stopped_line() -> str:
    """The last line of a command that Ctrl-C or SIGTERM stopped, where the command says nothing more."""
    return f"{stopped()}; what was committed is kept, re-run the same command to resume"


def last_line(text: str) -> None:
    """The line a stopped command ends with, on stderr; where that is a terminal gone (SIGHUP: EIO), none."""
    try:
        click.echo(text, err=True)
    except OSError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())  # nor at the interpreter's teardown


# whether main() runs in the vlpcache command's own process (the console script, python -m vlpcache), not in
# a notebook or another program that called it: only there may a command end the process at once
_own_process = False


def exit_now(code: int, teardown_needless: bool = False) -> None:
    """Exit with `code`. In the command's own process, skip the interpreter's teardown where it is needless
    (`teardown_needless`) and after a write error: h5py would flush the abandoned shard once more and crash
    on the full disk (everything worth keeping is committed). Called by another program, raise SystemExit:
    its code after the call, finally blocks and atexit still run."""
    writer = sys.modules.get("vlpcache.cache.writer")
    if _own_process and (teardown_needless or (writer is not None and writer.ABANDONED)):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(own_process: bool = False) -> None:
    """The command line: `own_process` where the process is the vlpcache command's (vlpcache.__main__)."""
    global _own_process
    _own_process = own_process
    escape_what_stdout_cannot_encode()
    bars_locked_in_this_process()
    with stops_remembered():  # a Ctrl-C or SIGTERM that lands where Python drops it still stops the long loops
        try:
            try:
                cli.main(prog_name="vlpcache", standalone_mode=False)
                # what a pipe's buffer still holds (stdout to a pipe is block-buffered unless PYTHONUNBUFFERED):
                # its write fails here, where a closed reader is caught, not in the interpreter's teardown
                sys.stdout.flush()
            except BaseException:
                close_bars()
                raise
        except click.exceptions.Abort as err:  # click turns Ctrl-C (KeyboardInterrupt) into Abort
            last_line(stopped_line() if isinstance(err.__context__, KeyboardInterrupt) else "aborted")
            exit_now(exit_status())
        except click.UsageError as err:  # a bad option or command: one line, as every other error
            command = err.ctx.command_path if err.ctx is not None else "vlpcache"
            if isinstance(err, click.NoSuchOption) and err.possibilities:  # `--hots`: --host, not --port too
                err.possibilities = closest(err.option_name, list(err.possibilities))
            paths = [arg for arg in sys.argv[1:] if arg.startswith("-") and len(arg) > 1 and os.path.exists(arg)]
            path = (f"; {paths[0]} is a file or folder here: pass it as ./{paths[0]}, or after --"
                    if isinstance(err, click.NoSuchOption) and paths else "")
            click.echo(f"error: {err.format_message().rstrip('.')}{path} ({command} --help)", err=True)
            exit_now(err.exit_code)
        except click.ClickException as err:
            err.show()
            exit_now(err.exit_code)
        except UserError as err:
            click.echo(f"error: {user_message(err)}", err=True)
            exit_now(2)
        except (BrokenPipeError, OutputClosed):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the last flush at exit must not fail too
            exit_now(0)
        except OSError as err:
            if err.errno not in ENVIRONMENT_ERRORS:
                raise
            where = f"{err.filename}: " if err.filename else ""
            if not_allowed(err):  # a shared, read-only workspace
                way = ("another user's file or folder, or a read-only one? ask its owner for access, or keep what this "
                       "command writes in a folder of your own (-o, or VLPCACHE_WORKSPACE=DIR for the workspace); "
                       "nothing was lost")
            else:
                way = "nothing committed before is lost: fix this and run the command again"
            click.echo(f"error: {where}{system_reason(err)}; {way}", err=True)
            exit_now(2)
        except Interrupted as err:
            if str(err):  # else said by another process (torchrun's rank 0)
                last_line(str(err))
            exit_now(exit_status())
        except KeyboardInterrupt:
            last_line(stopped_line())
            exit_now(exit_status())
        except Exception as err:
            if not out_of_memory(err):
                raise
            click.echo(f"error: {out_of_memory_line()}", err=True)
            exit_now(2)


if __name__ == "__main__":
    main(own_process=True)
