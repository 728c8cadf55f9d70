"""Retrieval quality: vlpcache's pretraining against a frozen-feature baseline, on the same cache and
captions, scored by the same metric function (vlpcache.metrics.retrieval_metrics).

The baseline (issue 9): mean over frames of the whole-frame region's feature (the MobileNetV2 global
average the extractor stores as region 0 of every frame), the frozen all-MiniLM-L6-v2 sentence
embedding, one linear head on each side, symmetric InfoNCE with a learnable temperature. Its features
are precomputed, so it trains for many epochs cheaply; it gets its own best settings (learning rate,
one caption per video per epoch or all of them) chosen on val, like ours, and its best epoch by val.

Protocol: settings are chosen on val with all captions as queries (about 4,880 on MSR-VTT val);
`--test` also reports devtest (first caption and all captions, 956 videos) and Flickr8k test (zero-shot:
trained on MSR-VTT only), to be run once. Every figure is text->video unless named otherwise; mean ±
std over seeds. A second table gives each model's difference from the baseline on each evaluation with
its 95% interval by `vlpcache compare`'s paired bootstrap (videos resampled with all their captions,
every seed's ranks on each side).

    python bench/quality.py --workspace /tmp/quality                    # baseline grid + defaults, seeds 0-2, val
    python bench/quality.py --workspace /tmp/quality --test             # and devtest / Flickr8k test, once
    python bench/quality.py --workspace /tmp/quality --only vlpcache --variant "no-rwa: no_rwa=true"

The caches come from `vlpcache extract` with defaults (made on first use in the workspace when not given).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlpcache.cache.reader import RegionCache
from vlpcache.captions import read_captions
from vlpcache.metrics import query_ranks, retrieval_metrics, selection_score
from vlpcache.model.model import ModelConfig, build_model, whole_frame_mean
from vlpcache.model.run_layout import CONFIG_NAME
from vlpcache.model.text_features import cached_text_features

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VLPCACHE_SHARED", REPO.parent / "shared"))
METRICS = ("R@1", "R@5", "R@10", "MdR")


# ---------------------------------------------------------------- data


@dataclass
class Split:
    """Captioned items of one cache: their rows in the cache and every caption of each."""

    name: str
    cache: RegionCache
    ids: list[str]
    captions: list[list[str]]

    def queries(self, all_captions: bool) -> tuple[list[str], list[int]]:
        """Query texts and, for each, the index of its item."""
        texts, owners = [], []
        for i, caps in enumerate(self.captions):
            for caption in caps if all_captions else caps[:1]:
                texts.append(caption)
                owners.append(i)
        return texts, owners


def load_split(name: str, cache: RegionCache, captions_file: Path, split: str | None = None) -> Split:
    captions = read_captions(captions_file)
    ids = [i for i in captions.by_id if i in cache and (split is None or captions.splits.get(i) == split)]
    return Split(name, cache, ids, [captions.by_id[i] for i in ids])


def ensure_cache(path: Path, roots: list[Path], workspace: Path) -> Path:
    if not (path / "manifest.json").exists():
        env = {**os.environ, "VLPCACHE_MODELS": str(SHARED / "models"), "VLPCACHE_WORKSPACE": str(workspace / "ws")}
        subprocess.run([sys.executable, "-m", "vlpcache", "extract", *map(str, roots), "-o", str(path), "--quiet"],
                       env=env, check=True)
    return path


# ---------------------------------------------------------------- frames moved, repeated or cut


REARRANGEMENTS = ("moved", "repeated", "first")


def rearrange(item: dict, how: str) -> dict:
    """The item with its real frames moved to other slots ("moved": spread over T, order kept),
    repeated to fill all T slots ("repeated"), or cut to the first ("first"). A model that reads
    frame positions, not slots, must score the first two like the original."""
    frame_mask = item["frame_mask"]
    real = np.flatnonzero(frame_mask)
    T, K = len(frame_mask), len(real)
    if how == "moved":
        source = {int(round((k + 1) * T / (K + 1))) % T: real[k] for k in range(K)}  # slot -> real frame
    elif how == "repeated":
        source = {t: real[t * K // T] for t in range(T)}
    elif how == "first":
        source = {int(real[0]): real[0]}
    else:
        raise ValueError(how)
    out = dict(item)
    for name in ("features", "boxes", "scores", "labels", "region_mask", "frame_mask", "timestamps"):
        value = np.zeros_like(item[name])
        for slot, frame in source.items():
            value[slot] = item[name][frame]
        out[name] = value
    return out


class RearrangedCache:
    """A RegionCache whose items come back rearranged (for evaluate())."""

    def __init__(self, cache: RegionCache, how: str):
        self.cache, self.how, self.settings, self.cache_dir = cache, how, cache.settings, cache.cache_dir

    def index_of(self, item_id: str) -> int:
        return self.cache.index_of(item_id)

    def __getitem__(self, row: int) -> dict:
        return rearrange(self.cache[row], self.how)


def video_features(split: Split, how: str | None = None) -> torch.Tensor:
    """(V, D) the baseline's video side: whole-frame features averaged over each item's real frames."""
    rows = []
    for item_id in split.ids:
        item = split.cache.get(item_id) if how is None else rearrange(split.cache.get(item_id), how)
        rows.append(whole_frame_mean(*(torch.from_numpy(item[k])[None] for k in ("features", "region_mask", "frame_mask"))))
    return torch.cat(rows)


# ---------------------------------------------------------------- the frozen-feature baseline


@dataclass
class BaselineConfig:
    lr: float = 1e-3
    epochs: int = 40
    batch_size: int = 64
    captions: str = "one"  # "one" random caption per video per epoch, or "all" (multi-positive InfoNCE)
    embed_dim: int = 256
    weight_decay: float = 0.05


class LinearHeads(torch.nn.Module):
    def __init__(self, video_dim: int, text_dim: int, embed_dim: int):
        super().__init__()
        self.video = torch.nn.Linear(video_dim, embed_dim)
        self.text = torch.nn.Linear(text_dim, embed_dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, video: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.video(video), dim=-1), F.normalize(self.text(text), dim=-1)


def score_heads(heads: LinearHeads, videos: torch.Tensor, texts: torch.Tensor, owners: list[int]) -> dict:
    """The metrics, and each query's rank and video (its column) under "ranks" and "owners", for the paired
    comparison (not printed)."""
    with torch.no_grad():
        v, t = heads(videos, texts)
    similarity = (t @ v.T).numpy()
    return {**retrieval_metrics(similarity, owners), "ranks": query_ranks(similarity, owners), "owners": owners}


def train_baseline(config: BaselineConfig, seed: int, train: dict, val: dict) -> tuple[LinearHeads, list[dict]]:
    """train: videos (V, D), caption_rows (per video, rows of texts), texts (C, H); val: videos, texts, owners.
    Returns the heads of the best epoch on val and the per-epoch val metrics."""
    from vlpcache.model.losses import ContrastiveLoss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    heads = LinearHeads(train["videos"].shape[1], train["texts"].shape[1], config.embed_dim)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = ContrastiveLoss()
    caption_rows = train["caption_rows"]
    per_video = 1 if config.captions == "one" else min(len(r) for r in caption_rows)
    steps = len(caption_rows) // config.batch_size
    total = steps * config.epochs
    best, history, step = (-1.0, None), [], 0
    for epoch in range(config.epochs):
        order = rng.permutation(len(caption_rows))
        for s in range(steps):
            batch = order[s * config.batch_size : (s + 1) * config.batch_size]
            rows = [r for v in batch for r in rng.choice(caption_rows[v], per_video, replace=False)]
            for group in optimizer.param_groups:
                group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            video, text = heads(train["videos"][batch], train["texts"][rows])
            loss = loss_fn(text, video, heads.logit_scale.exp())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                heads.logit_scale.clamp_(0, math.log(100))
            step += 1
        metrics = score_heads(heads, val["videos"], val["texts"], val["owners"])
        history.append(metrics)
        if selection_score(metrics) > best[0]:
            best = (selection_score(metrics), {k: v.clone() for k, v in heads.state_dict().items()})
    heads.load_state_dict(best[1])
    return heads, history


class BaselineData:
    """Frozen features of every split, computed once (text features are stored in the workspace)."""

    def __init__(self, splits: dict[str, Split], workspace: Path):
        model, tokenizer = build_model(ModelConfig(feature_dim=1, text_trainable_layers=0))
        captions = [c for split in splits.values() for caps in split.captions for c in caps]
        features = cached_text_features(model, tokenizer, captions, workspace, with_words=False, device=torch.device("cpu"))
        self.text = lambda texts: torch.from_numpy(features.pooled[[features.row_of[t] for t in texts]].astype(np.float32))
        self.row_of = features.row_of
        self.videos = {name: video_features(split) for name, split in splits.items()}
        self.splits = splits

    def train_inputs(self, name: str) -> dict:
        split = self.splits[name]
        texts = sorted({c for caps in split.captions for c in caps})
        local = {t: i for i, t in enumerate(texts)}
        return {"videos": self.videos[name], "texts": self.text(texts),
                "caption_rows": [[local[c] for c in caps] for caps in split.captions]}

    def caption_oracle(self, name: str) -> dict:
        """A ceiling of the text side: each video represented by the mean of its *other* captions'
        frozen sentence embeddings (leave-one-out), every caption a query. What a video encoder that
        predicted its captions perfectly in this text space would reach."""
        split = self.splits[name]
        texts, owners = split.queries(all_captions=True)
        embedded = F.normalize(self.text(texts), dim=-1).numpy()  # (Q, H)
        owners = np.asarray(owners)
        sums = np.zeros((len(split.ids), embedded.shape[1]))
        np.add.at(sums, owners, embedded)
        similarity = embedded @ (sums / np.linalg.norm(sums, axis=1, keepdims=True)).T  # (Q, V)
        own = sums[owners] - embedded  # (Q, H): each query's own video without the query
        similarity[np.arange(len(texts)), owners] = (own * embedded).sum(1) / np.linalg.norm(own, axis=1)
        return retrieval_metrics(similarity, owners.tolist())

    def eval_inputs(self, name: str, all_captions: bool, how: str | None = None) -> dict:
        texts, owners = self.splits[name].queries(all_captions)
        videos = self.videos[name] if how is None else video_features(self.splits[name], how)
        return {"videos": videos, "texts": self.text(texts), "owners": owners}


# ---------------------------------------------------------------- vlpcache's own pretraining


def train_vlpcache(options: dict, seed: int, splits: dict[str, Split], files: dict[str, Path], run_dir: Path,
                   workspace: Path) -> tuple[object, float]:
    """`vlpcache pretrain` with defaults (plus `options`) on the training captions, validated on val."""
    from vlpcache.model.checkpoint import load_run
    from vlpcache.model.train import run_pretrain

    os.environ["VLPCACHE_WORKSPACE"] = str(workspace / "ws")
    # a run an earlier call began (finished, or stopped by a kill) is resumed: trained to its epochs, or said
    # trained already; one of other settings than the variant's is refused in one line (it was reported as it)
    given = {key: value for key, value in options.items() if key != "resume"}
    run_pretrain(cache_dirs=[splits["select"].cache.cache_dir], captions=[files["train"]], val_captions=files["val"],
                 run_dir=run_dir, seed=seed, quiet=True, resume=(run_dir / CONFIG_NAME).is_file(), **given)
    return load_run(run_dir), training_minutes(run_dir)


def training_minutes(run_dir: Path) -> float:
    """Minutes the run's epochs took to train and validate, from its log (an epoch redone after a resume: its last
    line), not the time of this call, which for a run trained earlier is none."""
    from vlpcache.model.inspect_run import epoch_log

    return sum(line.get("epoch_seconds", 0) + line.get("val_seconds", 0) for line in epoch_log(run_dir)) / 60


def evaluate_run(run, split: Split, all_captions: bool, rerank: bool, how: str | None = None) -> dict:
    from vlpcache.index.evaluate import evaluate

    cache = RearrangedCache(split.cache, how) if how else split.cache
    results = evaluate(run, cache, dict(zip(split.ids, split.captions)), all_captions, torch.device("cpu"),
                       64, rerank_candidates=32 if rerank else 0, progress=False, per_query=True)
    reranked = rerank and "text_to_video_rerank" in results
    key = "text_to_video_rerank" if reranked else "text_to_video"
    rank = "rank_reranked" if reranked else "rank"
    columns = {item_id: c for c, item_id in enumerate(split.ids)}
    return {**results[key], "ranks": np.array([record[rank] for record in results["per_query"]]),
            "owners": [columns[record["video"]] for record in results["per_query"]]}


# ---------------------------------------------------------------- report


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def table(rows: dict[str, dict[str, list[dict]]], evaluations: list[str], baseline: str | None) -> str:
    """rows: model name -> evaluation -> per-seed metrics."""
    lines = [f"| model | {' | '.join(f'{e} R@1 / R@5 / R@10 / MdR' for e in evaluations)} |",
             "| --- |" + " --- |" * len(evaluations)]
    for name, per_eval in rows.items():
        cells = []
        for e in evaluations:
            seeds = per_eval.get(e, [])
            if not seeds:
                cells.append("-")
                continue
            cell = " / ".join(mean_std([m[k] for m in seeds]) for k in METRICS)
            if baseline and name != baseline and rows[baseline].get(e):
                ratio = np.mean([m["R@1"] for m in seeds]) / max(np.mean([m["R@1"] for m in rows[baseline][e]]), 1e-9)
                cell += f" (R@1 {ratio:.2f}x)"
            cells.append(cell)
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def paired_lines(rows: dict[str, dict[str, list[dict]]], evaluations: list[str], baseline: str) -> list[str]:
    """Each model against the baseline on each evaluation: the differences with their 95% intervals by
    vlpcache compare's paired bootstrap (videos resampled with all their queries), each side its seeds'
    per-query ranks."""
    from vlpcache.index.compare import Side, compare

    lines = []
    for name, per_eval in rows.items():
        if name == baseline or name.startswith("caption-space"):
            continue
        for e in evaluations:
            if not per_eval.get(e) or not rows[baseline].get(e):
                continue
            owners = {tuple(m["owners"]) for m in rows[baseline][e] + per_eval[e]}
            assert len(owners) == 1, f"{e}: the models' queries are not in the same order"
            sides = [Side((), np.stack([m["ranks"] for m in per_seed])) for per_seed in (rows[baseline][e], per_eval[e])]
            result = compare(*sides, videos=np.array(owners.pop()))
            cells = [f"{m['difference']:+.1f} ({m['interval'][0]:+.1f} to {m['interval'][1]:+.1f})"
                     for m in result["metrics"].values()]
            lines.append(f"| {name} − baseline | {e} | {result['queries']:,} of {result['videos']:,} videos | "
                         + " | ".join(cells) + " |")
    return ["| models | evaluation | queries | " + " | ".join(f"{k} B − A (95% interval)" for k in METRICS) + " |",
            "| --- | --- | ---: |" + " --- |" * len(METRICS)] + lines if lines else []


def parse_variant(text: str) -> tuple[str, dict]:
    """'name: key=value, key=value' -> (name, options); values are JSON (true, 4, 1e-3, "x")."""
    name, _, body = text.partition(":")
    options = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, _, value = part.partition("=")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return name.strip(), options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, required=True, help="runs, caches and feature files go here")
    parser.add_argument("--msrvtt-cache", type=Path, help="cache of MSR-VTT train+val+devtest frames [made in the workspace]")
    parser.add_argument("--flickr-cache", type=Path, help="cache of the Flickr8k images [made in the workspace]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", choices=["baseline", "vlpcache"])
    parser.add_argument("--variant", action="append", default=[],
                        help='vlpcache variant "name: key=value, ..." (run_pretrain options); default: "defaults:"')
    parser.add_argument("--baseline-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--baseline-epochs", type=int, default=40)
    parser.add_argument("--rerank", action="store_true", help="score vlpcache runs re-ranked (top 32 by global + w * S_loc)")
    parser.add_argument("--test", action="store_true", help="also report devtest and Flickr8k test (once: never tune on them)")
    parser.add_argument("--rearranged", action="store_true",
                        help="also score val with every item's frames moved to other slots, repeated to fill T, cut to one")
    parser.add_argument("--train-cache", type=Path,
                        help="train and choose epochs on this cache's train and val items instead (e.g. the first frame "
                             "of each only, to see whether models trained on fewer frames than they are scored on gain "
                             "from the extra frames); every evaluation still reads the MSR-VTT cache")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))

    data = SHARED / "data"
    args.workspace.mkdir(parents=True, exist_ok=True)
    msrvtt = RegionCache(args.msrvtt_cache or ensure_cache(
        args.workspace / "msrvtt-cache", [data / "msrvtt" / "frames" / s for s in ("train", "val", "devtest")], args.workspace))
    files = {s: data / "msrvtt" / f"{s}.jsonl" for s in ("train", "val", "devtest")}
    splits = {s: load_split(s, msrvtt, files[s]) for s in files}
    # "train" and "select" (the val items that choose the best epoch) come from the training cache
    train_cache = RegionCache(args.train_cache) if args.train_cache else msrvtt
    splits["train"] = load_split("train", train_cache, files["train"])
    splits["select"] = load_split("select", train_cache, files["val"])
    if args.test:
        flickr = RegionCache(args.flickr_cache or ensure_cache(
            args.workspace / "flickr-cache", [data / "flickr8k" / "images"], args.workspace))
        splits["flickr-test"] = load_split("flickr-test", flickr, data / "flickr8k" / "captions.jsonl", split="test")
    evaluations = [("val all", "val", True, None)]
    if args.rearranged:
        evaluations += [(f"val all, frames {how}", "val", True, how) for how in REARRANGEMENTS]
    if args.test:
        evaluations += [("devtest first", "devtest", False, None), ("devtest all", "devtest", True, None),
                        ("Flickr8k test first", "flickr-test", False, None), ("Flickr8k test all", "flickr-test", True, None)]
    rows: dict[str, dict[str, list[dict]]] = {}
    record: dict = {"seeds": args.seeds, "train_cache": str(train_cache.cache_dir), "baseline": {}, "vlpcache": {}}

    if args.only != "vlpcache":
        started = time.monotonic()
        frozen = BaselineData(splits, args.workspace)
        print(f"baseline features ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
        train, val = frozen.train_inputs("train"), frozen.eval_inputs("select", True)
        grid = {}
        for captions in ("one", "all"):
            for lr in args.baseline_lrs:
                config = BaselineConfig(lr=lr, captions=captions, epochs=args.baseline_epochs)
                results = [train_baseline(config, seed, train, val) for seed in args.seeds]
                scores = [selection_score(max(h, key=selection_score)) for _, h in results]
                grid[(captions, lr)] = (np.mean(scores), config, results)
                best_epochs = [int(np.argmax([selection_score(m) for m in h])) + 1 for _, h in results]
                print(f"baseline captions={captions} lr={lr:g}: val-all R@1+R@5+R@10 {np.mean(scores):.1f} "
                      f"± {np.std(scores):.1f}, best epochs {best_epochs}", file=sys.stderr)
                record["baseline"][f"{captions} lr={lr:g}"] = {"selection": scores, "best_epochs": best_epochs}
        _, config, results = max(grid.values(), key=lambda g: g[0])
        name = f"frozen baseline ({config.captions} caption{'s' if config.captions == 'all' else ''}/epoch, lr {config.lr:g})"
        rows[name] = {e: [score_heads(heads, **frozen.eval_inputs(split, all_caps, how)) for heads, _ in results]
                      for e, split, all_caps, how in evaluations}
        record["baseline"]["chosen"] = asdict(config)
        rows["caption-space oracle (text side's ceiling)"] = {"val all": [frozen.caption_oracle("val")]}

    for text in [] if args.only == "baseline" else args.variant or ["defaults:"]:
        variant, options = parse_variant(text)
        per_eval: dict[str, list[dict]] = {e: [] for e, _, _, _ in evaluations}
        minutes = []
        for seed in args.seeds:
            run, spent = train_vlpcache(options, seed, splits, files, args.workspace / "runs" / f"{variant}-seed{seed}",
                                        args.workspace)
            minutes.append(spent)
            for e, split, all_caps, how in evaluations:
                per_eval[e].append(evaluate_run(run, splits[split], all_caps, args.rerank, how))
            print(f"vlpcache {variant} seed {seed}: val-all R@1 {per_eval['val all'][-1]['R@1']:.1f} "
                  f"({spent:.1f} min)", file=sys.stderr)
        rows[f"vlpcache {variant}"] = per_eval
        record["vlpcache"][variant] = {"options": options, "minutes": minutes}

    baseline = next((n for n in rows if n.startswith("frozen baseline")), None)
    print(table(rows, [e for e, _, _, _ in evaluations], baseline))
    if baseline:
        print("\n".join(["", *paired_lines(rows, [e for e, _, _, _ in evaluations], baseline)]))
    for name, per_eval in rows.items():
        record.setdefault("rows", {})[name] = {e: [{k: v for k, v in m.items() if k not in ("ranks", "owners")} for m in seeds]
                                               for e, seeds in per_eval.items()}
    if args.json:
        args.json.write_text(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
