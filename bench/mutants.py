"""Mutation check: does the test suite fail when a promise breaks?

    nice -n 10 python bench/mutants.py                  # every mutant; one line each, then "killed N of M"
    python bench/mutants.py --list                      # the mutants and the tests each is run against
    python bench/mutants.py --only resume-no-rng ...    # some of them (names, or prefixes such as "index-")

Each mutant is one small bug planted in the project's own code: a piece of text that must occur
exactly once in one file, replaced by another. The working tree (tracked and untracked files, not
the ignored ones) is copied once to a temporary folder; each mutant is applied to the copy, the
tests that should catch it are run there (`python -m pytest -x` with PYTHONPATH pointing at the
copy, so that the commands the tests start run the mutated code too), and the file is restored. A
mutant is killed when those tests fail; it survives when they pass. A mutant whose text no longer
occurs is "stale": the code changed and the mutant must be updated, which counts as a failure of
this check too. Before the mutants, the tests of every mutant are run once on the unmutated copy:
they must pass, or no verdict means anything.

Not part of the default test suite (it runs the tests once per mutant: about 10-20 minutes on 2
cores). Exit status 0 when every mutant is killed. The figure goes into BENCHMARKS.md (Testing).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    breaks: str  # the promise it breaks, in a few words


def mutant(name, file, old, new, tests, breaks) -> Mutant:
    return Mutant(name, file, old, new, tuple(shlex.split(tests)), breaks)


MUTANTS = [
    # ------------------------------------------------ the bugs of issue 15 (most of them survived then)
    mutant("extract-shard-ignored", "vlpcache/extract/runner.py",
           "if shard_of(item.id, shard_count) != shard_index:", "if False:",
           "tests/test_extract.py::test_two_shard_processes_fill_one_cache_together",
           "--shard i/n: every process takes every item"),
    mutant("resume-no-weights", "vlpcache/model/train.py",
           "        ckpt.load_weights(model, last[max(last)])\n", "        pass\n",
           "tests/test_pretrain.py -k kill_9", "--resume restores the weights"),
    mutant("resume-no-optimizer", "vlpcache/model/train.py",
           '        optimizer.load_state_dict(state["optimizer"])\n', "        pass\n",
           "tests/test_pretrain.py -k kill_9", "--resume restores the optimizer state"),
    mutant("resume-no-rng", "vlpcache/model/train.py",
           '        ckpt.set_rng_state(state["rng"][min(processes.rank, len(state["rng"]) - 1)])\n', "        pass\n",
           "tests/test_pretrain.py -k kill_9", "--resume restores the random state"),
    mutant("bf16-losses", "vlpcache/model/train.py",
           "losses = criterion(full_precision(text), full_precision(video), logit_scale, rwa_scale)",
           "losses = criterion(text, video, logit_scale, rwa_scale)",
           "tests/test_pretrain.py -k bf16_training_step", "the losses of a bf16 step are computed in fp32"),
    mutant("bf16-auto-emulated", "vlpcache/model/train.py",
           '    if not native:\n        return Precision(nullcontext', '    if native is None:\n        return Precision(nullcontext',
           "tests/test_pretrain.py -k training_arithmetic_follows", "auto keeps fp32 on CPUs without native bf16"),
    mutant("prefix-runs-every-layer", "vlpcache/model/model.py",
           "with self._passing_through(self.layers[self.frozen_layers :]):",
           "with self._passing_through([]):",
           "tests/test_model.py -k groups_of_similar_length", "the frozen layers' prefix does not run the layers above"),
    mutant("layer-outputs-one", "vlpcache/model/model.py",
           "lambda hidden, *args, **kwargs: (hidden,) + (None,) * (outputs - 1))",
           "lambda hidden, *args, **kwargs: (hidden,))",
           "tests/test_model.py -k every_supported_architecture", "a skipped layer returns as many outputs as a real one"),
    mutant("prefix-path-unchecked", "vlpcache/model/model.py",
           "                if 0 < self.frozen_layers < len(self.layers):\n                    real =",
           "                if False:\n                    real =",
           "tests/test_model.py -k cannot_skip_the_frozen", "a text model whose top layers cannot run on the prefix is refused"),
    mutant("clip-whole-model", "vlpcache/model/model.py",
           'tower = getattr(config, "text_config", None)', "tower = None",
           "tests/test_model.py -k clip_checkpoint", "a CLIP checkpoint gives its text model"),
    mutant("onnx-export-unchecked", "vlpcache/index/query_graphs.py",
           "        _check_text_graph(run, tmp)\n", "",
           "tests/test_search.py -k embeds_other_lengths", "an ONNX text graph that embeds queries otherwise is dropped"),
    mutant("positions-from-padding-ignored", "vlpcache/model/model.py",
           "return module.num_embeddings - module.padding_idx - 1", "return module.num_embeddings",
           "tests/test_model.py -k max_words_may_be", "--max-words stops at the tokens a RoBERTa-style model reads"),
    mutant("text-pooling-own-ignored", "vlpcache/model/train.py",
           "config.text_pooling = pooling or config.text_pooling", "config.text_pooling = config.text_pooling",
           "tests/test_pretrain.py -k pools_captions", "a new run pools as its text model's sentence-transformers config says"),
    mutant("text-groups-order", "vlpcache/model/model.py",
           "hidden = torch.cat(parts)[torch.argsort(order)]", "hidden = torch.cat(parts)[order]",
           "tests/test_model.py -k groups_of_similar_length", "texts run in length groups come back in their order"),
    mutant("text-groups-uncut", "vlpcache/model/model.py",
           "            or bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any())):",
           "            or False):",
           "tests/test_model.py -k groups_of_similar_length", "left-padded texts are not cut to their groups' lengths"),
    mutant("bf16-emulated-asked", "vlpcache/model/train.py",
           'if precision == "bf16" and not native:', 'if precision == "bf16" and native is None:',
           "tests/test_pretrain.py -k training_arithmetic_follows", "an explicit bf16 is refused on CPUs without native bf16"),
    mutant("precision-not-resumable", "vlpcache/model/config.py",
           'RESUMABLE_OPTIONS = ("epochs", "workers", "precision")', 'RESUMABLE_OPTIONS = ("epochs", "workers")',
           "tests/test_pretrain.py -k resume_may_change_it", "--resume may change the training arithmetic"),
    mutant("search-rerank-other-regions", "vlpcache/index/search.py",
           "self.index.regions.gather(rows)", "self.index.regions.gather(rows[1:] + rows[:1])",
           "tests/test_search.py -k own_regions", "a candidate is re-ranked on its own regions"),
    mutant("index-region-offsets-after-add", "vlpcache/index/region_store.py",
           "self.offsets[-1] + other.offsets[1:]", "other.offsets[1:]",
           "tests/test_index_faiss.py -k region_store", "region offsets after an incremental add"),
    mutant("metrics-ties-for-the-query", "vlpcache/metrics.py",
           "ranks = (similarity >= best[:, None]).sum(1)", "ranks = (similarity > best[:, None]).sum(1) + 1",
           "tests/test_metrics.py", "ties count against the query"),
    mutant("metrics-ties-for-the-query-of-several-targets", "vlpcache/metrics.py",
           "np.count_nonzero(row[others] >= best)", "np.count_nonzero(row[others] > best)",
           "tests/test_metrics.py", "ties count against a query with several correct candidates"),
    mutant("metrics-r5-counts-rank-4", "vlpcache/metrics.py",
           '"R@5": 100.0 * float(np.mean(ranks <= 5))', '"R@5": 100.0 * float(np.mean(ranks <= 4))',
           "tests/test_metrics.py", "R@5 counts ranks 1 to 5"),
    mutant("rerank-weight-fixed", "vlpcache/model/train.py",
           "return max(RERANK_WEIGHTS, key=lambda w: (selection_score(scored[w]), -w)), scored",
           "return 2.0, scored",
           "tests/test_pretrain.py -k rerank_weight", "the re-rank weight is chosen on validation"),
    mutant("rerank-weight-not-stored", "vlpcache/model/train.py",
           '"rerank_weight": val.get("rerank_weight", run.model.rerank_weight)', '"rerank_weight": run.model.rerank_weight',
           "tests/test_pretrain.py -k every_weight", "the chosen weight is stored with the checkpoint"),
    mutant("captions-csv-dropped", "vlpcache/captions.py",
           "    for row in reader:\n", "    for row in []:\n",
           "tests/test_captions.py", "CSV caption files are read"),
    mutant("captions-json-documents-read-as-lines", "vlpcache/captions.py",
           "    elif (document := _json_document(text)) is not None:", "    elif (document := None) is not None:",
           "tests/test_captions.py", "the datasets' own JSON caption files are read"),
    mutant("captions-msrvtt-validate-trained", "vlpcache/model/data.py",
           'VALIDATION_SPLITS = {"val", "valid", "validate", "validation"}',
           'VALIDATION_SPLITS = {"val", "valid", "validation"}',
           "tests/test_captions.py -k msrvtt", "MSR-VTT's validate split validates, never trains"),
    mutant("captions-own-validation-split-unused", "vlpcache/model/data.py",
           "    if validation_file is None:  # a training file's own", "    if False:  # a training file's own",
           "tests/test_captions.py -k split", "without --val-captions, a training file's val split validates"),
    mutant("eval-split-ignored", "vlpcache/index/evaluate.py",
           "        captions = captions.of_split(split)\n", "        pass\n",
           "tests/test_eval.py -k split", "eval --split evaluates the videos of that split only"),
    mutant("captions-readme-beside-taken-as-caption", "vlpcache/captions.py",
           "            if suffix.lower() != SIDECAR_SUFFIX or stem not in media:",
           "            if suffix.lower() != SIDECAR_SUFFIX:",
           "tests/test_captions.py -k folder_of_text", "only a text file beside media of its name is a caption"),
    mutant("eval-max-words-ignored", "vlpcache/model/retrieval.py",
           "tokenize(tokenizer, part, max_words or model.config.max_words)",
           "tokenize(tokenizer, part, model.config.max_words)",
           "tests/test_eval.py -k paragraphs", "eval --paragraphs and --max-words cut each query where asked"),
    mutant("eval-paragraphs-not-joined", "vlpcache/index/evaluate.py",
           'queries = {item_id: [" ".join(texts)] for item_id, texts in queries.items()}',
           "queries = dict(queries)",
           "tests/test_eval.py -k paragraphs", "eval --paragraphs makes one query of each video's captions"),
    mutant("captions-split-ignored", "vlpcache/model/data.py",
           "    if not captions.splits:\n        return captions, 0\n", "    if True:\n        return captions, 0\n",
           "tests/test_captions.py", "the split key keeps val/test items out of training"),
    mutant("captions-tail-matches-an-ambiguous-id", "vlpcache/captions.py",
           "            if len(owners) == 1:\n                return owners[0], []\n",
           "            if owners:\n                return owners[0], []\n",
           "tests/test_captions.py -k end_of", "a caption key ending several item ids matches none of them"),
    mutant("captions-tail-never-matched", "vlpcache/captions.py",
           "tails = tails or ItemTails(ids)", "tails = tails or ItemTails([])",
           "tests/test_captions.py -k end_of", "a caption key that is the end of one item's id names it"),
    mutant("captions-no-default-val", "vlpcache/model/data.py",
           "validation_file = found_validation = find_validation_file(caption_files)",
           "validation_file = found_validation = None",
           "tests/test_captions.py", "val.jsonl beside the training captions validates"),
    mutant("ddp-gather-no-all-reduce", "vlpcache/model/losses.py",
           "        dist.all_reduce(grad)\n", "        pass\n",
           "tests/test_losses.py -k gloo", "gradients of all-gathered negatives reach every process"),
]

MUTANTS += [
    # ------------------------------------------------ extract
    mutant("extract-segment-starts", "vlpcache/extract/sampling.py",
           "return [(k + 0.5) * step for k in range(num_frames)]", "return [k * step for k in range(num_frames)]",
           "tests/test_sampling.py", "frames at the centres of equal segments"),
    mutant("extract-no-nms", "vlpcache/extract/detectors/regions.py",
           "kept = nms(boxes[keep].float(), scores[keep].float(), nms_iou)",
           "kept = torch.argsort(scores[keep], descending=True)",
           "tests/test_yolox.py tests/test_frcnn.py", "class-agnostic NMS"),
    mutant("extract-plain-name-order", "vlpcache/extract/sources.py",
           "return tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)), name", "return (), name",
           "tests/test_sources.py", "frames in natural name order (2.jpg before 10.jpg)"),
    mutant("extract-cached-not-skipped", "vlpcache/extract/runner.py",
           "        if item.id in cache:\n", "        if False:\n",
           "tests/test_extract.py -k rerun_skips", "items already cached are skipped"),
    mutant("extract-failed-retried-always", "vlpcache/extract/runner.py",
           "elif item.id in failed_before and not options.retry_failed:", "elif False:",
           "tests/test_extract.py -k broken_files", "failed items are retried only with --retry-failed"),
    # ------------------------------------------------ cache
    mutant("cache-no-timed-commit", "vlpcache/cache/writer.py",
           "if self._count >= self.max_items or time.monotonic() - self._opened_at >= self.max_seconds:",
           "if self._count >= self.max_items:",
           "tests/test_cache.py -k time_is_up", "a shard is also committed every 2 minutes"),
    mutant("cache-partial-failure-line-kept", "vlpcache/cache/writer.py",
           '            if self._file.read(1) != b"\\n":\n', "            if False:\n",
           "tests/test_cache.py -k partial_last_line", "a failure log survives a kill mid-line"),
    mutant("cache-settings-compare-nothing", "vlpcache/cache/schema.py",
           "for k in mine if mine[k] != theirs.get(k)]", "for k in mine if False]",
           "tests/test_cache.py -k different_settings", "a cache of other settings is refused"),
    mutant("cache-second-writer-not-refused", "vlpcache/cache/writer.py",
           "    if lock is None:\n        raise UserError(f\"{cache_dir}: shards",
           "    if False:\n        raise UserError(f\"{cache_dir}: shards",
           "tests/test_cache.py -k second_writer", "one writer per shard set"),
    # ------------------------------------------------ model
    mutant("model-no-focal-filter", "vlpcache/model/losses.py",
           "keep = (attention > 1.0 / count) | (attention >= attention.amax(dim, keepdim=True))", "keep = valid",
           "tests/test_losses.py -k focal", "region-word attention is focal"),
    mutant("model-padding-in-word-mean", "vlpcache/model/losses.py",
           "return (values * valid).sum(-1) / valid.sum(-1).clamp_min(1)", "return values.mean(-1)",
           "tests/test_losses.py -k no_mean", "padding enters no mean"),
    mutant("model-contrastive-one-direction", "vlpcache/model/losses.py",
           "        return (t2v + v2t) / 2\n", "        return t2v\n",
           "tests/test_losses.py -k contrastive", "video-text InfoNCE in both directions"),
    mutant("model-rwa-loss-one-direction", "vlpcache/model/losses.py",
           "return (F.cross_entropy(logits_t2v, labels) + F.cross_entropy(logits_v2t, labels)) / 2",
           "return F.cross_entropy(logits_t2v, labels)",
           "tests/test_losses.py -k region_word_loss", "the region-word loss in both directions"),
    mutant("model-warmup-starts-at-zero", "vlpcache/model/train.py",
           "        return (step + 1) / warmup\n", "        return step / warmup\n",
           "tests/test_pretrain.py -k learning_rate", "warmup reaches its rate from the first step"),
    mutant("model-resume-keeps-lost-log-lines", "vlpcache/model/train.py",
           "kept = [line for line in lines if _logged_epoch(line) <= epoch]", "kept = lines",
           "tests/test_pretrain.py -k kill_9", "resume drops the log lines of epochs it redoes"),
    mutant("model-captions-never-advance", "vlpcache/model/data.py",
           "start = max(0, self.epoch - 1) * self.captions_per_video", "start = 0",
           "tests/test_pretrain.py -k walks", "every caption is used over the epochs"),
    mutant("model-held-out-files-trained", "vlpcache/model/data.py",
           "            if path.stem.lower() in HELD_OUT_STEMS:\n                continue\n", "",
           "tests/test_captions.py", "val/test caption files are never trained on by default"),
    # ------------------------------------------------ index
    mutant("index-never-exact", "vlpcache/index/faiss_index.py",
           "    if n <= config.exact_limit:\n", "    if False:\n",
           "tests/test_index_faiss.py", "small collections get exact search"),
    mutant("index-foreign-checkpoint-accepted", "vlpcache/index/layout.py",
           "    diffs = source_differences(meta.to_json(), checkpoint_sha256, cache_settings)\n    if diffs:\n",
           "    diffs = source_differences(meta.to_json(), checkpoint_sha256, cache_settings)\n    if False:\n",
           "tests/test_index_faiss.py -k refused", "an index of another checkpoint is refused"),
    mutant("index-rerank-ascending", "vlpcache/index/search.py",
           "order = np.argsort(-score[0], kind=\"stable\")[:k]", "order = np.argsort(score[0], kind=\"stable\")[:k]",
           "tests/test_search.py -k rerank_orders", "re-ranked results best first"),
    mutant("index-querybank-grows-wrong", "vlpcache/index/build.py",
           "bank.extended(index.embeddings[len(index) - added :])", "bank.extended(index.embeddings[:added])",
           "tests/test_search.py -k qbnorm_ranks", "the query bank grows exactly with the index"),
    # ------------------------------------------------ command line error paths
    mutant("cli-user-error-exit-1", "vlpcache/cli.py",
           '            click.echo(f"error: {err}", err=True)\n            exit_now(2)\n',
           '            click.echo(f"error: {err}", err=True)\n            exit_now(1)\n',
           "tests/test_user_errors.py", "a user error exits with status 2"),
    mutant("cli-empty-query-accepted", "vlpcache/index/search.py",
           "        if not text.strip():\n            raise UserError('empty query",
           "        if False:\n            raise UserError('empty query",
           "tests/test_search.py -k empty_query", "an empty query is one line"),
    mutant("cli-utf8-line-off-by-one", "vlpcache/files.py",
           "line = data.count(b\"\\n\", 0, start) + 1", "line = data.count(b\"\\n\", 0, start)",
           "tests/test_user_errors.py", "a non-UTF-8 file names its line"),
    mutant("cli-os-error-traceback", "vlpcache/cli.py",
           "            if err.errno not in ENVIRONMENT_ERRORS:\n                raise\n",
           "            raise\n",
           "tests/test_user_errors.py tests/test_faults.py -k 'read_only or full_disk or user_error'",
           "what the system says about disks and paths is one line"),
    mutant("cli-cuda-without-gpu-accepted", "vlpcache/devices.py",
           '    if device == "cuda" and not torch.cuda.is_available():\n', "    if False:\n",
           "tests/test_extract.py -k device_cuda", "--device cuda without a GPU is one line"),
]


MUTANTS += [
    # ------------------------------------------------ more of every stage
    mutant("extract-mapper-first-items-regions", "vlpcache/extract/mapper.py",
           "            start += count\n", "",
           "tests/test_extract.py -k own_frames", "each item gets its own frames' regions"),
    mutant("extract-boxes-normalised-by-height-width-swapped", "vlpcache/extract/detectors/yolox.py",
           "torch.tensor([w, h, w, h])", "torch.tensor([h, w, h, w])",
           "tests/test_yolox.py -k mirrored", "boxes normalised x by width, y by height"),
    mutant("extract-padding-regions-unmasked", "vlpcache/extract/detectors/regions.py",
           '    out["region_mask"][:n] = True\n', '    out["region_mask"][:] = True\n',
           "tests/test_yolox.py -k packing", "padding regions are masked"),
    mutant("cache-temporary-shards-read", "vlpcache/cache/reader.py",
           'sorted((self.cache_dir / SHARD_DIR).glob(f"*{SHARD_SUFFIX}"))',
           'sorted((self.cache_dir / SHARD_DIR).glob(f"*{SHARD_SUFFIX}*"))',
           "tests/test_cache.py -k temporary_name", "a shard being written is invisible to readers"),
    mutant("cache-duplicate-id-kept-twice", "vlpcache/cache/reader.py",
           "                if item_id in seen:  # only if two writers", "                if False:  # only if two writers",
           "tests/test_cache.py -k two_writers", "every id once in the reader"),
    mutant("model-best-checkpoint-removed", "vlpcache/model/checkpoint.py",
           "if old_epoch < epoch and old_epoch != (best or {}).get(\"epoch\"):", "if old_epoch < epoch:",
           "tests/test_pretrain.py -k every_weight", "the best checkpoint is kept"),
    mutant("model-load-run-takes-last-not-best", "vlpcache/model/run_layout.py",
           '        if best and best.get("epoch") in found:\n            return found[best["epoch"]]\n', "",
           "tests/test_pretrain.py -k every_weight", "a run loads its best checkpoint by validation"),
    mutant("model-frame-place-by-slot", "vlpcache/model/model.py",
           "    rank = real.cumsum(1) - real  # (B, T) k for the k-th real frame\n",
           "    rank = torch.arange(real.shape[1], dtype=real.dtype).expand_as(real)\n",
           "tests/test_model.py", "frame places among the real frames, not slots"),
    mutant("index-querybank-hubs-ignored", "vlpcache/querybank.py",
           "return np.where(self.hubs[best][:, None], normalised, similarity)", "return normalised",
           "tests/test_querybank.py", "QB-Norm normalises only rows whose best video is a hub"),
    mutant("index-tuning-ignores-the-target", "vlpcache/index/faiss_index.py",
           "        if (recall := recall_with(params)) >= goal:\n", "        if (recall := recall_with(params)) >= 0:\n",
           "tests/test_index_faiss.py", "search parameters tuned to the target recall"),
    mutant("serve-k-unbounded", "vlpcache/serve/app.py",
           'k = _int_param(request, "k", DEFAULT_K, 1, MAX_K)', 'k = _int_param(request, "k", DEFAULT_K, 1, 10**9)',
           "tests/test_serve.py -k 'limit or k_ or bad'", "the API answers at most 100 results"),
    mutant("cli-names-not-escaped", "vlpcache/report.py",
           '    return "".join(c if c.isprintable() else\n', "    return str(text) or \"\".join(c if c.isprintable() else\n",
           "tests/test_search.py -k control_characters", "ids with control characters are escaped for people"),
    mutant("cli-nothing-processable-exits-0", "vlpcache/extract/progress.py",
           "return self.done > 0 or self.skipped_cached > 0 or self.failed == 0", "return True",
           "tests/test_extract.py -k nothing_processable", "an extract that processed nothing exits non-zero"),
]


MUTANTS += [
    mutant("extract-folder-frame-not-centred", "vlpcache/extract/sampling.py",
           "        primary = math.floor(centre)\n", "        primary = math.floor(centre - 0.5)\n",
           "tests/test_sampling.py", "a frames folder's frames at the centres of equal segments"),
    mutant("extract-score-threshold-ignored", "vlpcache/extract/detectors/regions.py",
           "keep = torch.nonzero(scores >= score_threshold).flatten()", "keep = torch.nonzero(scores >= 0).flatten()",
           "tests/test_yolox.py", "detections below the score threshold are dropped"),
    mutant("extract-one-detection-too-many", "vlpcache/extract/detectors/regions.py",
           "return keep[kept[:max_detections]]", "return keep[kept[: max_detections + 1]]",
           "tests/test_yolox.py", "at most --regions detections per frame"),
    mutant("extract-id-keeps-extension", "vlpcache/extract/sources.py",
           "own = [Item(_relative_id(root, p.with_suffix(\"\")), p, kind) for p, kind in files.items()]",
           "own = [Item(_relative_id(root, p), p, kind) for p, kind in files.items()]",
           "tests/test_sources.py", "an item's id is its path without extension"),
    mutant("model-validation-overlap-allowed", "vlpcache/model/data.py",
           "        if overlap:\n", "        if False:\n",
           "tests/test_captions.py", "validation videos are never trained on"),
    mutant("model-incomparable-caches-mixed", "vlpcache/model/data.py",
           "        diffs = caches[0].settings.feature_differences(cache.settings)\n        if diffs:\n",
           "        diffs = caches[0].settings.feature_differences(cache.settings)\n        if False:\n",
           "tests/test_captions.py", "caches of other features never mix"),
    mutant("model-id-of-two-caches-trained-twice", "vlpcache/model/data.py",
           "            if item_id in seen:\n                report.duplicate_ids += 1\n",
           "            if False:\n                report.duplicate_ids += 1\n",
           "tests/test_captions.py", "an id in two caches is trained once"),
    mutant("model-training-state-unpickled", "vlpcache/model/checkpoint.py",
           'return torch.load(path, map_location="cpu", weights_only=True)',
           'return torch.load(path, map_location="cpu", weights_only=False)',
           "tests/test_pretrain.py -k never_unpickled", "untrusted files are never unpickled"),
    mutant("model-text-features-shared-across-models", "vlpcache/model/text_features.py",
           '"text_model": text_model_identity(text_model),', '"text_model": "",',
           "tests/test_pretrain.py -k keyed", "frozen text features belong to their text model"),
    mutant("eval-video-found-by-its-last-caption-only", "vlpcache/index/evaluate.py",
           "        video_texts[c].append(q)\n", "        video_texts[c][:] = [q]\n",
           "tests/test_eval.py -k all_captions", "video->text: the best rank of any of its captions"),
    mutant("cache-inspect-failures-empty", "vlpcache/cache/inspect.py",
           'summary["failed_items"] = list(cache.failures.values())', 'summary["failed_items"] = []',
           "tests/test_extract.py -k broken_files", "inspect --failures lists every failed item"),
    mutant("cli-os-error-names-no-file", "vlpcache/cli.py",
           'where = f"{err.filename}: " if err.filename else ""', 'where = ""',
           "tests/test_user_errors.py", "an operating-system error names its file"),
    mutant("model-captions-grouped-by-rank", "vlpcache/model/data.py",
           'captions = [caption for item in items for caption in item["captions"]]  # (B*K,)',
           'captions = [item["captions"][k] for k in range(len(items[0]["captions"])) for item in items]',
           "tests/test_pretrain.py -k video_order", "a video's K captions are its rows of the batch"),
    mutant("extract-weights-of-unknown-hash-accepted", "vlpcache/extract/detectors/weights.py",
           "    if source.verbatim and entry.known and entry.known_as(sha256) is None:\n",
           "    if False:\n",
           "tests/test_weights.py -k corrupted", "a download must be one of the published files"),
    mutant("serve-query-length-unbounded", "vlpcache/serve/app.py",
           "    if len(query) > MAX_QUERY_CHARS:\n", "    if False:\n",
           "tests/test_serve.py", "queries of at most 200 characters"),
    # ------------------------------------------------ one trainer per run, the tuner, prune
    mutant("model-run-lock-never-taken", "vlpcache/model/train.py",
           "    if not processes.main:\n        yield\n        return\n    run_dir.mkdir",
           "    if True:\n        yield\n        return\n    run_dir.mkdir",
           "tests/test_pretrain.py -k being_trained", "a second pretrain into a run being trained is refused"),
    mutant("model-new-runs-share-a-directory", "vlpcache/workspace.py",
           "                path.mkdir()\n                return path\n",
           "                return path\n",
           "tests/test_pretrain.py -k never_share", "two pretrain started together get runs of their own"),
    mutant("index-tuner-stops-at-a-flat-step", "vlpcache/index/faiss_index.py",
           "    ceiling = recall_with(ladder[-1])\n",
           "    ceiling = recall_with(ladder[1])\n",
           "tests/test_index_faiss.py -k tuner", "the search parameters reach the target recall"),
    mutant("index-prune-removes-held-indexes", "vlpcache/index/prune.py",
           "        if sha in held or (meta.get(\"run_dir\") and sha in held_by(Path(meta[\"run_dir\"]))):\n",
           "        if sha in held:\n",
           "tests/test_search.py -k prune", "prune keeps the index of a run it records"),
    mutant("extract-notes-dropped", "vlpcache/extract/mapper.py",
           "writer.add(item.id, str(item.path), item.kind, self.arrays, note=self.note)",
           "writer.add(item.id, str(item.path), item.kind, self.arrays)",
           "tests/test_extract.py -k broken_files", "an item kept despite problems keeps its note"),
    mutant("index-chunks-not-kept", "vlpcache/index/build.py",
           "            kept.add(parts[-1])\n", "            pass\n",
           "tests/test_search.py -k stopped_midway", "a stopped index resumes from its kept chunks"),
    mutant("caption-parts-not-resumed", "vlpcache/model/text_features.py",
           "done = [_part_span(f) == span for f, span in zip(files, spans)]", "done = [False] * len(spans)",
           "tests/test_model.py -k caption_encoding_stopped", "a stopped caption encoding resumes from its parts"),
    mutant("caption-part-span-unchecked", "vlpcache/model/text_features.py",
           "            return start, start + len(data[\"counts\"])", "            return None",
           "tests/test_faults.py -k caption_encoding", "a full disk keeps the encoded parts for the re-run"),
    mutant("index-kept-part-not-cut", "vlpcache/index/parts.py",
           "keep = np.array([i in wanted and i not in seen for i in part.ids], bool)",
           "keep = np.ones(len(part.ids), bool)",
           "tests/test_index_faiss.py -k kept_parts", "a kept part adds only the videos still wanted, once"),
    mutant("prune-stopped-builds-kept", "vlpcache/index/prune.py",
           'index_dir.name.split("-")[0] not in held_prefixes)', "False)",
           "tests/test_search.py -k prune", "prune removes what a stopped first build kept"),
    mutant("captions-paths-not-matched", "vlpcache/captions.py",
           "item = key if key in known else item_named_by(key, known)\n", "item = key if key in known else None\n",
           "tests/test_captions.py tests/test_eval.py -k file", "a caption may name its video by file path"),
    mutant("search-damage-note-dropped", "vlpcache/index/search.py",
           "note=self.cache.note_of(item_id),", "note=\"\",",
           "tests/test_search.py -k damage", "a search hit of a damaged item says so"),
    mutant("extract-truncation-note-on-a-still", "vlpcache/extract/sampling.py",
           "-math.inf < end < 0.9 * duration - 1.0", "end < 0.9 * duration - 1.0",
           "tests/test_sampling.py -k still_shown", "no false 'truncated' note"),
    mutant("extract-first-video-stream", "vlpcache/extract/sampling.py",
           "self.stream = main_video_stream(container)", "self.stream = container.streams.video[0]",
           "tests/test_sampling.py -k still_track", "a thumbnail track before the video is passed over"),
    mutant("captions-any-value-taken-as-a-list", "vlpcache/captions.py",
           "    if not isinstance(texts, list):\n", "    if False:\n",
           "tests/test_captions.py -k malformed", "a malformed caption line is counted, never a traceback"),
    mutant("extract-workers-take-ctrl-c", "vlpcache/extract/reader.py",
           "    signal.signal(signal.SIGINT, signal.SIG_IGN)\n", "",
           "tests/test_faults.py -k leave_ctrl_c", "Ctrl-C is the parent's: no traceback from every worker"),
    mutant("cli-ctrl-c-just-aborted", "vlpcache/cli.py",
           "        if isinstance(err.__context__, KeyboardInterrupt):", "        if False:",
           "tests/test_faults.py -k ctrl_c_stops", "Ctrl-C says what was kept and how to go on"),
    mutant("pretrain-ctrl-c-traceback", "vlpcache/model/train.py",
           "            raise Interrupted(interrupted_line(run_dir)) from None", "            raise",
           "tests/test_pretrain.py -k ctrl_c", "Ctrl-C in pretrain names the checkpoint and the resume"),
    mutant("extract-dropped-ctrl-c-forgotten", "vlpcache/extract/runner.py",
           "                stop_if_interrupted()\n", "",
           "tests/test_faults.py -k finalizer", "a Ctrl-C that Python drops in a finalizer still stops extract"),
    mutant("pretrain-dropped-ctrl-c-forgotten", "vlpcache/model/train.py",
           "        trainer.step += 1\n        stop_if_interrupted()\n", "        trainer.step += 1\n",
           "tests/test_pretrain.py -k finalizer", "a Ctrl-C that Python drops in a finalizer still stops pretrain"),
    mutant("interrupts-dropped-ctrl-c-printed", "vlpcache/interrupts.py",
           "            return  # raised again", "            pass  # raised again",
           "tests/test_faults.py -k dropped", "a dropped Ctrl-C prints no \"Exception ignored\" traceback"),
    mutant("interrupts-sigterm-left-to-kill", "vlpcache/interrupts.py",
           "STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)", "STOP_SIGNALS = (signal.SIGINT,)",
           "tests/test_faults.py -k sigterm", "SIGTERM commits the shard in progress and says so"),
    mutant("extract-dead-worker-item-failed-at-once", "vlpcache/extract/reader.py",
           "        if death.item is self.alone:", "        if True:",
           "tests/test_reader.py -k halfway", "an item whose worker was killed is decoded again, not failed"),
    mutant("extract-dead-worker-queue-lost", "vlpcache/extract/reader.py",
           "            else:\n                self.pending.appendleft(item)\n", "            else:\n                pass\n",
           "tests/test_reader.py -k halfway", "the items queued behind a killed worker's are decoded too"),
    mutant("extract-decode-timeout-not-passed", "vlpcache/extract/runner.py",
           "timeout=options.decode_time_limit())", "timeout=None)",
           "tests/test_faults.py -k decode_timeout", "--decode-timeout reaches the local engine's decoding workers"),
    mutant("extract-non-utf8-path-kept", "vlpcache/extract/sources.py",
           "        if not is_utf8(str(item.path)):", "        if False:",
           "tests/test_sources.py -k utf8", "a path that is not UTF-8 is one line and skipped, not a traceback"),
    mutant("extract-no-frame-folders-ignored", "vlpcache/extract/runner.py",
           "discover_items(roots, options.frame_folders, others)", "discover_items(roots, others=others)",
           "tests/test_extract.py -k no_frame_folders", "--no-frame-folders makes each photo of a subfolder an item"),
    mutant("extract-decode-time-limit-never-checked", "vlpcache/extract/reader.py",
           "            elif worker.items and self._time_left(worker) == 0:", "            elif False:",
           "tests/test_faults.py -k decode_timeout", "a file that decodes longer than --decode-timeout is failed"),
    mutant("ray-decode-timeout-not-passed", "vlpcache/extract/ray_engine.py",
           '"timeout": options.decode_time_limit()}', '"timeout": None}',
           "tests/test_ray_engine.py -k decode_timeout", "--decode-timeout reaches the ray engine's decoders"),
    mutant("pretrain-loader-workers-die-of-sigterm", "vlpcache/model/train.py",
           "        worker_init_fn=leave_sigterm_to_the_parent if workers else None,\n", "",
           "tests/test_pretrain.py -k sigterm", "a SIGTERM to the whole job stops pretrain with one line"),
    mutant("pretrain-stuck-loader-worker-outlives-its-loader", "vlpcache/interrupts.py",
           '    closing = sys._getframe(1).f_locals.get("done_event")\n', "    closing = None\n",
           "tests/test_pretrain.py -k stuck_in_a_read", "a loading worker stuck in a read ends when the loader closes"),
    mutant("pretrain-loader-worker-dies-of-sigterm-while-open", "vlpcache/interrupts.py",
           "        if closing.is_set():\n", "        if True:\n",
           "tests/test_pretrain.py -k 'stuck_in_a_read or sigterm'", "a loading worker outlives the job's SIGTERM"),
    mutant("pretrain-short-of-room-unsaid", "vlpcache/model/text_features.py",
           "    if parts_left + joined > free:\n", "    if False:\n",
           "tests/test_faults.py -k caption_encoding_on_a_full_disk",
           "a caption encoding that will not fit in the free space says so after its first part"),
    mutant("extract-passed-over-uncounted", "vlpcache/extract/runner.py",
           '    passed_over = [(path, reason) for path, reason in problems if f"; {SKIPPED}" in reason]\n',
           "    passed_over = []\n",
           "tests/test_extract.py -k broken_files", "the summary line counts the paths discovery passed over"),
    mutant("extract-passed-over-unrecorded", "vlpcache/extract/runner.py",
           "        writer.record_passed_over(roots, passed_over)\n", "",
           "tests/test_extract.py -k broken_files", "the cache keeps the paths discovery passed over, for inspect"),
    mutant("cache-passed-over-never-mended", "vlpcache/cache/writer.py",
           "                if not any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in below)]\n",
           "                ]\n",
           "tests/test_cache.py -k passed_over", "a later run over a folder replaces its list of passed-over paths"),
    mutant("search-unread-unsaid", "vlpcache/index/search.py",
           "                say(unread_line(searcher, query, unread))\n", "                pass\n",
           "tests/test_search.py -k left_out", "search says what of a long query the model left unread"),
    mutant("search-unread-queries-uncounted", "vlpcache/index/search.py",
           "    if cut > UNREAD_LINES:\n", "    if False:\n",
           "tests/test_search.py -k left_out", "a file of many long queries: the ones past the first three are counted"),
    mutant("onnx-query-unread-never", "vlpcache/index/query_model.py",
           " if encoding.overflowing else \"\"\n", " if False else \"\"\n",
           "tests/test_search.py -k onnx_query_model_that", "the ONNX query model says what of a query it leaves unread"),
    mutant("torch-query-unread-one-token-late", "vlpcache/index/query_graphs.py",
           '        if len(self.run.tokenizer(text, verbose=False)["input_ids"]) <= self.max_words:\n',
           '        if len(self.run.tokenizer(text, verbose=False)["input_ids"]) <= self.max_words + 1:\n',
           "tests/test_search.py -k onnx_query_model_that", "the torch query model says what of a query it leaves unread"),
    mutant("page-unread-not-struck", "vlpcache/serve/page/page.js",
           '  if (unread) line.append(el("s", { class: "unread", title: "not read: past the tokens the model reads" }, unread));\n',
           "",
           "tests/test_serve.py -k headless", "the page strikes out the end of a query the model does not read"),
    mutant("eval-queries-cut-uncounted", "vlpcache/index/evaluate.py",
           '        "queries_cut": longer_than(run.tokenizer, texts, max_words or run.config.max_words),\n',
           '        "queries_cut": 0,\n',
           "tests/test_eval.py -k paragraphs", "eval counts the queries longer than the tokens it reads"),
    mutant("eval-paragraphs-past-positions", "vlpcache/index/evaluate.py",
           "            max_words = min(PARAGRAPH_WORDS, text_positions(run.model.text_encoder.backbone) or PARAGRAPH_WORDS)\n",
           "            max_words = PARAGRAPH_WORDS\n",
           "tests/test_eval.py -k paragraphs", "eval --paragraphs cuts at most at the text model's positions"),
    mutant("pretrain-captions-cut-unsaid", "vlpcache/model/train.py",
           "            if line := _captions_cut_line(run, tokenizer):\n", "            if line := None:\n",
           "tests/test_pretrain.py -k longer_than_max_words", "a new run says how many training captions it cuts"),
    mutant("pretrain-max-words-ignored", "vlpcache/model/config.py",
           '                 "max_words": "max_words", "text_pooling"', '                 "text_pooling"',
           "tests/test_pretrain.py -k longer_than_max_words", "pretrain --max-words sets the tokens the model reads"),
    mutant("pretrain-max-words-past-positions", "vlpcache/model/model.py",
           "    if positions is not None and max_words > positions:\n", "    if False:\n",
           "tests/test_pretrain.py tests/test_eval.py -k 'longer_than_max_words or past_positions'",
           "--max-words beyond the text model's positions is one line (pretrain: before anything is written)"),
    mutant("extract-short-of-room-unsaid", "vlpcache/extract/progress.py",
           "        if need <= free:\n", "        if True:\n",
           "tests/test_faults.py -k extract_on_a_full_disk",
           "an extract whose items will not fit in the free space says so after its first shard"),
    mutant("ray-driver-sigterm-left-to-ray", "vlpcache/extract/ray_engine.py",
           "    take_sigterm_back()\n", "",
           "tests/test_ray_engine.py -k sigterm", "SIGTERM stops the ray engine's driver with one line"),
    mutant("pretrain-quiet-loading-bar", "vlpcache/model/model.py",
           "    hf_logging.disable_progress_bar()\n", "",
           "tests/test_pretrain.py -k quiet_pretraining", "pretrain --quiet prints nothing"),
    mutant("report-unsized-terminal-taken-at-its-word", "vlpcache/report.py",
           "    unsized = size is not None and (size.columns == 0 or size.lines == 0)\n", "    unsized = False\n",
           "tests/test_extract.py -k no_size", "a terminal that reports 0 x 0 still shows the bar"),
    mutant("lock-on-a-removed-file", "vlpcache/locks.py",
           "            if _same_file(path, fd):\n", "            if True:\n",
           "tests/test_cache.py -k lock", "a writer waiting on a lock its holder removes takes the new file's"),
    mutant("lock-file-left-behind", "vlpcache/locks.py",
           "            self.path.unlink()  # while still held, so nobody takes the lock of a file about to go\n",
           "            pass\n",
           "tests/test_cache.py -k 'lock or killed_writer'", "a released lock removes its file"),
    mutant("record-newer-keys-refused", "vlpcache/records.py",
           "        return cls(**{k: v for k, v in data.items() if k in known})\n", "        return cls(**data)\n",
           "tests/test_search.py -k newer_vlpcache",
           "a run or cache written by a newer vlpcache, with settings it does not know, still loads"),
    mutant("search-wordpiece-split", "vlpcache/index/rerank.py",
           '        if token.startswith("##") and words:\n', "        if False:\n",
           "tests/test_search.py -k 'word or align'", "a word split into WordPieces is one matched word"),
    mutant("search-function-words-matched", "vlpcache/index/rerank.py",
           "    content = [(w, p) for w, p in words_of_query if w.lower() not in FUNCTION_WORDS] or words_of_query\n",
           "    content = words_of_query\n",
           "tests/test_search.py -k 'word or align or frame'", "function words are not shown as matched regions"),
    mutant("download-cut-short-kept", "vlpcache/downloads.py",
           "    if expected is not None and received != expected:\n", "    if False:\n",
           "tests/test_weights.py -k truncated", "a download cut short is not taken for the file"),
    mutant("download-offline-ignored", "vlpcache/downloads.py",
           "            return name\n", "            continue\n",
           "tests/test_weights.py -k offline", "VLPCACHE_OFFLINE=1 never touches the network"),
    mutant("thumbnail-key-ignores-time", "vlpcache/serve/thumbnails.py",
           '        fields = [item["id"], item["path"], item["kind"], when, str(self.side)]\n',
           '        fields = [item["id"], item["path"], item["kind"], str(self.side)]\n',
           "tests/test_serve.py -k thumbnail", "each sampled frame has its own thumbnail"),
    mutant("thumbnail-old-store-kept", "vlpcache/serve/thumbnails.py",
           '        if stored == {"format": STORE_FORMAT}:\n', '        if stored is not None:\n',
           "tests/test_serve.py -k thumbnail", "a thumbnail store of another format is emptied and begun again"),
    mutant("render-box-width-for-height", "vlpcache/extract/render.py",
           '        x1, y1, x2, y2 = cached["boxes"][t, n] * np.array(size * 2)  # normalised -> picture pixels\n',
           '        x1, y1, x2, y2 = cached["boxes"][t, n] * np.array(size[::-1] * 2)\n',
           "tests/test_search.py -k rendered_box", "inspect --render draws each box where the detector saw it"),
    mutant("render-whole-frame-boxed", "vlpcache/extract/render.py",
           "        if label == FRAME_REGION_LABEL:\n", "        if False:\n",
           "tests/test_search.py -k rendered_box", "inspect --render draws detections, not the whole-frame region"),
    mutant("serve-open-address-unsaid", "vlpcache/serve/command.py",
           "    if allowed_hosts_for(host) is None:\n", "    if False:\n",
           "tests/test_serve.py -k every_address", "serve --host 0.0.0.0 says that anyone who can reach it can search"),
    mutant("serve-open-address-refuses-names", "vlpcache/serve/app.py",
           '    if bind_host in LOOPBACK_HOSTS or bind_host.startswith("127."):\n', "    if True:\n",
           "tests/test_serve.py -k every_address", "serve --host 0.0.0.0 answers the names other machines reach it by"),
    mutant("frcnn-scores-of-another-frame", "vlpcache/extract/detectors/frcnn.py",
           "            kept_rows = slice(start - b, start - b + n - 1)", "            kept_rows = slice(start, start + n - 1)",
           "tests/test_frcnn.py", "frcnn: each frame's boxes keep their own scores and labels in a batch"),
    mutant("frcnn-non-coco-classes-kept", "vlpcache/extract/detectors/frcnn.py",
           "                coco = torch.nonzero(labels != NOT_COCO).flatten()\n",
           "                coco = torch.arange(len(labels), device=labels.device)\n",
           "tests/test_frcnn.py", "frcnn: only COCO's 80 classes are kept, in vlpcache's label index"),
    mutant("frcnn-boxes-normalised-by-height-for-width", "vlpcache/extract/detectors/frcnn.py",
           "        sizes = torch.tensor([[w, h, w, h] for", "        sizes = torch.tensor([[h, w, h, w] for",
           "tests/test_frcnn.py", "frcnn: boxes are normalised by the frame's width and height"),
    mutant("vg-min-regions-ignored", "vlpcache/extract/detectors/vg.py",
           "    count = min(max(above, min_regions), max_regions, len(confidence))\n",
           "    count = min(above, max_regions, len(confidence))\n",
           "tests/test_vg.py", "vg keeps at least 10 regions per frame, as bottom-up attention does"),
    mutant("vg-attributes-of-other-regions", "vlpcache/extract/detectors/vg.py",
           '            attributes = torch.cat((rows.new_tensor([NO_ATTRIBUTE]), out["attributes"][b][rows]))\n',
           '            attributes = torch.cat((rows.new_tensor([NO_ATTRIBUTE]), out["attributes"][b][: len(rows)]))\n',
           "tests/test_vg.py", "vg: each region's attribute is its own"),
    mutant("vg-boxes-normalised-by-height-for-width", "vlpcache/extract/detectors/vg.py",
           "            normalised = (boxes / boxes.new_tensor([w, h, w, h])).clamp_(0, 1)\n",
           "            normalised = (boxes / boxes.new_tensor([h, w, h, w])).clamp_(0, 1)\n",
           "tests/test_vg.py", "vg: boxes are normalised by the frame's width and height"),
    mutant("failures-torn-line-breaks-the-log", "vlpcache/cache/manifest.py",
           "            except (json.JSONDecodeError, KeyError, TypeError):\n", "            except (KeyError, TypeError):\n",
           "tests/test_cache.py tests/test_faults.py", "a failure log's line torn by a crash is passed over, not fatal"),
    mutant("labels-attribute-unsaid", "vlpcache/cache/labels.py",
           '        return f"{self.attributes[attribute]} {name}" if 0 <= attribute < len(self.attributes) else name\n',
           "        return name\n",
           "tests/test_vg.py -k reads_as", "vg regions read with their attribute (\"red car\")"),
    mutant("models-verify-wrong-passes", "vlpcache/extract/detectors/models_folder.py",
           '            print(f"{entry.name}: WRONG: {err}")\n            right = False\n',
           '            print(f"{entry.name}: WRONG: {err}")\n',
           "tests/test_weights.py -k verify", "models verify fails on a file that is wrong"),
    mutant("models-fetch-present-fetched-again", "vlpcache/extract/detectors/models_folder.py",
           "        if (folder / entry.name).is_file():\n", "        if False:\n",
           "tests/test_weights.py -k models_fetch", "models fetch leaves a file that is present alone"),
    mutant("model-frame-time-over-slots", "vlpcache/model/model.py",
           "    return (rank + 0.5) / real.sum(1, keepdim=True).clamp_min(1) * real\n",
           "    return (rank + 0.5) / real.shape[1] * real\n",
           "tests/test_model.py", "a frame's time is its place among the item's real frames, whatever T"),
    mutant("model-padding-features-unzeroed", "vlpcache/model/model.py",
           "        feats = feats.to(weight.dtype).masked_fill(~packed[..., None], 0)  # (B, K, D)\n",
           "        feats = feats.to(weight.dtype)  # (B, K, D)\n",
           "tests/test_model.py", "whatever padded regions hold never reaches the embedding"),
    mutant("model-global-path-over-slots", "vlpcache/model/model.py",
           "    return summed / real.sum(1, keepdim=True).clamp_min(1)\n", "    return summed / real.shape[1]\n",
           "tests/test_model.py", "the global path averages the real frames only"),
    mutant("model-text-mean-over-padding", "vlpcache/model/model.py",
           "            weights = attention_mask[..., None].to(hidden.dtype)\n",
           "            weights = torch.ones_like(attention_mask[..., None]).to(hidden.dtype)\n",
           "tests/test_model.py", "a caption's embedding does not depend on the padding of its batch"),
    mutant("model-dropout-may-empty-an-item", "vlpcache/model/model.py",
           "        kept[emptied, frame_mask.float().argmax(1)[emptied]] = True\n", "",
           "tests/test_model.py", "frame dropout leaves every item at least one frame"),
    mutant("model-dropout-hides-whole-frames", "vlpcache/model/model.py",
           "        kept[..., 0] = True\n", "",
           "tests/test_model.py", "region dropout never hides the whole-frame region"),
    mutant("model-dropout-at-search", "vlpcache/model/model.py",
           "        if self.training:\n            region_mask, frame_mask = hide_at_random(",
           "        if True:\n            region_mask, frame_mask = hide_at_random(",
           "tests/test_model.py", "frames and regions are hidden in training only"),
    mutant("extract-anamorphic-squeezed", "vlpcache/extract/sampling.py",
           "    if sar and sar > 0 and sar != 1:\n", "    if False:\n",
           "tests/test_sampling.py", "anamorphic video is read at its display width"),
    mutant("extract-display-rotation-ignored", "vlpcache/extract/sampling.py",
           "    return round((frame.rotation or 0) / 90) % 4\n", "    return 0\n",
           "tests/test_sampling.py", "a phone video with a display rotation is read upright"),
    mutant("extract-exif-orientation-ignored", "vlpcache/extract/sampling.py",
           "                image = ImageOps.exif_transpose(image)\n", "",
           "tests/test_sampling.py", "a photo is read as its EXIF orientation shows it"),
    mutant("extract-alpha-on-black", "vlpcache/extract/sampling.py",
           "    if has_alpha:\n", "    if False:\n",
           "tests/test_sampling.py", "transparent images are composited on white"),
    mutant("extract-16-bit-clipped", "vlpcache/extract/sampling.py",
           "            values = values / 257.0  # 16-bit range to 8-bit\n", "            pass\n",
           "tests/test_sampling.py", "16-bit images are scaled to 8 bits, not clipped"),
    mutant("inspect-run-first-record-of-a-redone-epoch", "vlpcache/model/inspect_run.py",
           '            records[int(record["epoch"])] = record\n', '            records.setdefault(int(record["epoch"]), record)\n',
           "tests/test_inspect_run.py -k log", "inspect RUN shows an epoch redone after a resume as last written"),
    mutant("inspect-run-dead-holder-training", "vlpcache/model/inspect_run.py",
           "    if holder is not None and holder_active(lock, holder):\n",
           "    if holder is not None:\n",
           "tests/test_inspect_run.py -k stopped", "inspect RUN: a run whose trainer was killed is stopped, not training"),
    mutant("inspect-run-reused-pid-training", "vlpcache/locks.py",
           "    return process_alive(holder.pid) if held is None else held\n",
           "    return process_alive(holder.pid)\n",
           "tests/test_inspect_run.py -k stopped",
           "inspect RUN: a live process given a dead trainer's pid does not make the run read as training"),
    mutant("inspect-runs-marks-the-oldest", "vlpcache/model/inspect_run.py",
           '        latest = latest_run(runs_dir)  # the rule index, search and eval follow\n',
           '        latest = runs[0]\n',
           "tests/test_inspect_run.py -k runs_lists", "inspect --runs marks the run search uses by default"),
    mutant("serve-model-epoch-unsaid", "vlpcache/index/search.py",
           '        return ", ".join(part for part in (name, f"epoch {number}" if number is not None else "") if part)',
           '        return name',
           "tests/test_serve.py -k another_host", "serve says which run and epoch answer"),
    mutant("eval-trained-on-ignores-splits", "vlpcache/index/evaluate.py",
           "    trained = sum(split not in HELD_OUT_STEMS for split in splits.values()) if path in trained_files else 0\n",
           "    trained = len(splits) if path in trained_files else 0\n",
           "tests/test_eval.py -k training_captions", "eval counts only the videos of the training splits as trained on"),
    mutant("eval-validation-ignores-splits", "vlpcache/index/evaluate.py",
           "    validated = (sum(not file_has_validation_split or split in VALIDATION_SPLITS for split in splits.values())\n",
           "    validated = (len(splits)\n",
           "tests/test_eval.py -k training_captions", "eval counts only the validation split's videos as validated on"),
    mutant("extract-strict-metadata", "vlpcache/extract/sampling.py",
           'OPEN_OPTIONS = {"metadata_errors": "ignore"} if int(av.__version__.split(".")[0]) < 19 else {}\n',
           "OPEN_OPTIONS = {}\n",
           "tests/test_sampling.py -k title", "a video whose title is not UTF-8 is read (PyAV up to 18)"),
    mutant("captions-csv-commas-only", "vlpcache/captions.py",
           "    for delimiter in delimiters:\n", "    for delimiter in delimiters[:1]:\n",
           "tests/test_captions.py -k separated", "a CSV file separated by semicolons or tabs is read by its header"),
    mutant("captions-utf16-unread", "vlpcache/files.py",
           "        if data.startswith(bom):\n", "        if False:\n",
           "tests/test_captions.py -k unicode", "caption files saved as UTF-16 with a byte-order mark are read"),
    mutant("readme-index-export-only-in-the-api-section", "README.md",
           "eval) prints no progress bar. `vlpcache index --export FILE` also writes",
           "eval) prints no progress bar. The index command also writes",
           "tests/test_readme.py", "index's own README section says what --export does, not only the Python API's"),
    mutant("batch-padded-frames-real", "vlpcache/model/batch.py",
           '        frame_mask[b, :t] = item["frame_mask"]\n', "        frame_mask[b, :] = True\n",
           "tests/test_model.py tests/test_pretrain.py -k 'pad or mixed or image or frames'",
           "an item with fewer frames than its batch is masked beyond them"),
    mutant("extract-cuda-batches-exact", "vlpcache/extract/detectors/yolox.py",
           "    return 1 << max(0, frames - 1).bit_length()\n", "    return frames\n",
           "tests/test_yolox.py -k rounded", "CUDA batches are rounded up to a few shapes for cuDNN's autotuning"),
    mutant("extract-autotune-always-on", "vlpcache/extract/detectors/inference.py",
           "        torch.backends.cudnn.benchmark = autotune\n", "        torch.backends.cudnn.benchmark = True\n",
           "tests/test_extract.py -k autotune", "--no-autotune turns cuDNN's autotuning off, not only ever on"),
    mutant("extract-autotune-not-passed", "vlpcache/extract/runner.py",
           "load_detector(spec, device, options.score_threshold, options.autotune)",
           "load_detector(spec, device, options.score_threshold)",
           "tests/test_extract.py -k autotune", "extract --no-autotune reaches the detector it loads"),
    mutant("extract-yolox-autotune-ignored", "vlpcache/extract/detectors/yolox.py",
           "        set_autotune(self.device, self.config.autotune)\n", "        set_autotune(self.device, True)\n",
           "tests/test_yolox.py -k autotune", "yolox's torch runtime passes --no-autotune on to cuDNN"),
    mutant("extract-onnxruntime-autotune-ignored", "vlpcache/extract/detectors/yolox.py",
           'search = "EXHAUSTIVE" if autotune else "HEURISTIC"', 'search = "EXHAUSTIVE"',
           "tests/test_yolox.py -k onnxruntimes_cuda", "onnxruntime's CUDA provider is told --no-autotune"),
    mutant("extract-ts-sniffed-by-one-sync-byte", "vlpcache/extract/sources.py",
           "TS_PACKETS = 5  #", "TS_PACKETS = 1  #",
           "tests/test_sources.py -k first_bytes", "a text file starting with 'G' is not taken for a transport stream"),
    mutant("extract-extensionless-media-ignored", "vlpcache/extract/sources.py",
           "    if sniff and suffix in SNIFFED_SUFFIXES:\n", "    if False:\n",
           "tests/test_sources.py -k first_bytes", "a video or image without extension is known by its first bytes"),
    mutant("extract-disguised-media-unnamed", "vlpcache/extract/sources.py",
           "for path in self.examples[suffix] if (kind := sniffed_kind(path))), None)",
           "for path in self.examples[suffix] if (kind := None)), None)",
           "tests/test_sources.py -k another_extension",
           "a run that finds no media names a file that is media under another extension (clip.bin)"),
    mutant("eval-per-query-ranks-all-global", "vlpcache/index/evaluate.py",
           "ranks = {name: query_ranks(scores, targets) for name, scores in rankings.items()}",
           "ranks = {name: query_ranks(rankings[\"global\"], targets) for name, scores in rankings.items()}",
           "tests/test_eval.py -k per_query", "eval --per-query gives each ranking's own rank of the query's video"),
    mutant("inspect-labels-count-the-whole-frame", "vlpcache/cache/inspect.py",
           "& part[\"frame_mask\"][..., None] & (part[\"labels\"] >= 0)  # (V, T, N)",
           "& part[\"frame_mask\"][..., None]  # (V, T, N)",
           "tests/test_extract.py -k inspect_summarises", "inspect's detections leave the whole-frame regions out"),
    mutant("extract-audio-called-disguised-video", "vlpcache/extract/sources.py",
           "suffix not in SNIFFED_SUFFIXES | AUDIO_EXTENSIONS", "suffix not in SNIFFED_SUFFIXES",
           "tests/test_sources.py -k another_extension", "an .m4a or .mka song is not said to be a video to rename"),
    mutant("extract-sniffing-opens-pipes", "vlpcache/extract/sources.py",
           "        if not stat.S_ISREG(os.stat(path).st_mode):\n", "        if False:\n",
           "tests/test_sources.py -k another_extension", "sniffing never opens a named pipe, which would block"),
    mutant("eval-validation-file-without-val-split-unseen", "vlpcache/index/evaluate.py",
           "sum(not file_has_validation_split or split", "sum(False or split",
           "tests/test_eval.py -k training_captions",
           "a validation file with splits but no val split was validated on whole, and eval says so"),
    mutant("eval-run-video-record-ignored", "vlpcache/index/evaluate.py",
           "    recorded = read_run_videos(run_dir) if", "    recorded = None if",
           "tests/test_eval.py -k training_captions",
           "eval tells the run's training videos by its record, whatever file their captions come from"),
    mutant("extract-other-files-line-unsaid", "vlpcache/extract/runner.py",
           "    if items and (line := passed_over_line(others)):", "    if False and (line := passed_over_line(others)):",
           "tests/test_extract.py -k broken_files", "a run that finds media says in one line which other files it passed over"),
    mutant("extract-other-files-uncounted", "vlpcache/extract/sources.py",
           "                self.others.add(path)\n", "",
           "tests/test_sources.py -k beside_media", "the walk counts the files beside media that are not media"),
    mutant("compare-bootstrap-unpaired", "vlpcache/index/compare.py",
           "100.0 * (weights @ hit_rate[k]) / weights.sum(1)",
           "100.0 * (weights[rng.permutation(n)] @ (b <= k).mean(0) - weights @ (a <= k).mean(0)) / weights.sum(1)",
           "tests/test_compare.py -k paired", "compare scores both sides on the same resampled queries"),
    mutant("compare-queries-resampled-alone", "vlpcache/index/compare.py",
           "result = compare(a, b, [video for _, video in pairs], resamples, seed)",
           "result = compare(a, b, None, resamples, seed)",
           "tests/test_compare.py -k own_figures", "compare resamples videos with all their captions, not captions alone"),
    mutant("compare-median-lower-middle", "vlpcache/index/compare.py",
           "return (levels[low] + levels[high]) / 2", "return levels[low] * 1.0",
           "tests/test_compare.py -k weighted_medians", "a resample's median of an even count is the mean of the middle two"),
    mutant("compare-other-queries-accepted", "vlpcache/index/compare.py",
           "elif pairs != first_pairs:", "elif len(pairs) != len(first_pairs):",
           "tests/test_compare.py -k other_queries", "compare refuses files of other queries, even as many"),
    mutant("compare-first-run-only", "vlpcache/index/compare.py",
           "Side(tuple(files), np.stack(rows))", "Side(tuple(files), np.stack(rows[:1]))",
           "tests/test_compare.py -k several_runs", "several runs a side are averaged, with their spread"),
]


def repository_files(repo: Path) -> list[str]:
    """The working tree's files: tracked and untracked, not ignored ones (no venv, no caches)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=repo,
                            capture_output=True, check=True).stdout.decode()
    return sorted({name for name in listed.split("\0") if name and (repo / name).is_file()})


def copy_tree(repo: Path, to: Path) -> None:
    for name in repository_files(repo):
        (to / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, to / name)


def environment(copy: Path) -> dict:
    shared = os.environ.get("VLPCACHE_SHARED") or str((REPO.parent / "shared").resolve())
    return {**os.environ, "PYTHONPATH": str(copy), "VLPCACHE_SHARED": shared, "PYTHONDONTWRITEBYTECODE": "1"}


def run_tests(copy: Path, tests: tuple[str, ...], stop_at_first: bool = True) -> tuple[int, str, float]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *(["-x"] if stop_at_first else []),
               *tests]
    started = time.monotonic()
    result = subprocess.run(command, cwd=copy, env=environment(copy), capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


def check_copy_is_imported(copy: Path) -> None:
    probe = subprocess.run([sys.executable, "-c", "import vlpcache; print(vlpcache.__file__)"], cwd=copy / "tests",
                           env=environment(copy), capture_output=True, text=True, check=True)
    if not Path(probe.stdout.strip()).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"the copy's vlpcache is not the one imported ({probe.stdout.strip()}); check PYTHONPATH")


def last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def apply(copy: Path, m: Mutant) -> str | None:
    """Write the mutated file into the copy; returns its original text, or None when the mutant is stale."""
    path = copy / m.file
    original = path.read_text()
    if original.count(m.old) != 1:
        return None
    path.write_text(original.replace(m.old, m.new))
    return original


def selected(names: list[str] | None) -> list[Mutant]:
    if not names:
        return MUTANTS
    chosen = [m for m in MUTANTS if any(m.name == n or m.name.startswith(n) for n in names)]
    if not chosen:
        raise SystemExit(f"no mutant named {', '.join(names)}; see --list")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="mutants by name or name prefix")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on unmutated code")
    args = parser.parse_args()
    mutants = selected(args.only)
    names = [m.name for m in MUTANTS]
    assert len(set(names)) == len(names), "mutant names must be unique"
    if args.list:
        for m in mutants:
            print(f"{m.name:36s} {m.file}: {m.breaks}\n{'':36s} tests: {' '.join(m.tests)}")
        return

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vlpcache-mutants-") as folder:
        copy = Path(folder) / "repo"
        copy_tree(REPO, copy)
        check_copy_is_imported(copy)
        print(f"{len(mutants)} mutants of {REPO} (copied to {copy})", flush=True)
        stale = [m for m in mutants if (copy / m.file).read_text().count(m.old) != 1]
        if not args.no_baseline:
            for tests in dict.fromkeys(m.tests for m in mutants if m not in stale):
                code, output, seconds = run_tests(copy, tests, stop_at_first=False)
                if code != 0:
                    raise SystemExit(f"the tests fail without any mutant ({' '.join(tests)}): {last_line(output)}\n"
                                     f"{output[-3000:]}")
            print(f"baseline: the tests of every mutant pass on the unmutated code ({time.monotonic() - started:.0f} s)",
                  flush=True)
        killed = 0
        for m in mutants:
            original = apply(copy, m)
            if original is None:
                print(f"STALE     {m.name}: its text no longer occurs once in {m.file}; update the mutant", flush=True)
                continue
            try:
                code, output, seconds = run_tests(copy, m.tests)
            finally:
                (copy / m.file).write_text(original)
            if code == 1:  # a test failed
                killed += 1
                print(f"killed    {m.name} ({seconds:.0f} s): {m.breaks}", flush=True)
            else:  # 0: all passed; 2-5: interrupted, internal or usage error, no tests collected
                print(f"SURVIVED  {m.name} ({seconds:.0f} s, pytest exit {code}): {m.breaks}\n"
                      f"          {' '.join(m.tests)}: {last_line(output)}", flush=True)
    print(f"killed {killed} of {len(mutants)} ({time.monotonic() - started:.0f} s)")
    sys.exit(0 if killed == len(mutants) else 1)


if __name__ == "__main__":
    main()
