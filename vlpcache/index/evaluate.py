"""`vlpcache eval --captions FILE`: text->video and video->text retrieval metrics of a run, with and
without region-word re-ranking.

Standard protocol: every cached video that has captions is a candidate; each contributes its first
caption as a query (all of them with --all-captions). Video->text counts a video as found at the
best rank of any of its captions. Metrics come from vlpcache.metrics.retrieval_metrics, the function
pretraining validation uses. Embeddings are computed exactly here (no approximate index), so the
figures describe the model, not the FAISS settings.

Re-ranking follows search (and pretraining validation: vlpcache.metrics.reranked): the top
`rerank_candidates` of each query by global cosine are re-ordered by global + weight * S_loc and stay
above every other candidate, whose global order is kept.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vlpcache.cache.reader import BlankWhenDamaged
from vlpcache.captions import caption_queries, read_captions
from vlpcache.devices import DEFAULT_DEVICE, resolve_device
from vlpcache.errors import UserError
from vlpcache.files import is_write_failure, may_write, replace_atomically, write_failure
from vlpcache.index.build import check_run_reads_cache, open_cache, resolve_sources, run_query_bank
from vlpcache.metrics import RERANK_CANDIDATES, block_ranks, rank_metrics, reranked, top_candidates
from vlpcache.model.run_layout import being_trained_note
from vlpcache.querybank import DualSoftmax
from vlpcache.report import Say, items_word, printable, sayer, silent
from vlpcache.report import say as say_always  # under --quiet too

if TYPE_CHECKING:
    import torch


def evaluate(run, cache, captions_by_id: dict[str, list[str]], all_captions: bool, device, batch_size: int,
             rerank_candidates: int = RERANK_CANDIDATES, progress: bool = True, qbnorm: bool = False,
             dual: bool = False, max_words: int | None = None, per_query: bool = False, read=None) -> dict:
    """Retrieval metrics over the cached videos in captions_by_id (insertion order = candidate order).

    qbnorm adds text->video ranked by query-bank normalisation (the run's training captions as bank),
    dual the dual-softmax figure, which needs every test query at once (no search can do it).
    per_query adds "per_query": a record of each text->video query (per_query_records). read: how the text
    model reads the queries (queries_read), where the caller has it already. The similarities are made
    and ranked a block of rows at a time (GlobalScores): memory grows with the videos, not their square."""
    from vlpcache.model.retrieval import encode_texts, encode_videos, local_scores

    ids = list(captions_by_id)
    texts, text_video = caption_queries(list(captions_by_id.values()), all_captions)
    video_texts = [[] for _ in ids]
    for q, c in enumerate(text_video):
        video_texts[c].append(q)

    rerank = rerank_candidates > 0 and run.config.rwa
    started = time.monotonic()
    readable = BlankWhenDamaged(cache, "eval counts it as a video without frames (its captions' queries rank it by "
                                       "nothing it shows)")
    video = encode_videos(run.model, readable, ids, device, batch_size, regions=rerank, progress=progress)
    text = encode_texts(run.model, run.tokenizer, texts, device, batch_size, progress=progress, max_words=max_words)
    t2v = GlobalScores.of(text.global_, video.global_)  # (Q, C)
    bank = run_query_bank(run, video.global_.numpy(), device, batch_size, progress=progress) if qbnorm else None
    rankings = {"global": Ranks(text_video, keep_best=per_query)}  # text->video, by name
    if rerank:
        lam, weight = run.config.rwa_lambda, run.config.rerank_weight

        def rerank_scores(scores: GlobalScores, texts_are_queries: bool):
            """(rows, block) -> the re-ranked scores of those rows (reranked), S_loc of each row's top candidates."""
            top = top_candidates_of(scores, rerank_candidates)  # (rows, P)
            local = local_scores(text, video, top, lam, texts_are_queries, progress=progress)
            return lambda rows, block: reranked(block, top[rows], local[rows], weight)

        rankings["reranked"] = Ranks(text_video, rerank_scores(t2v, True), keep_best=per_query)
    if bank is not None:
        rankings["qbnorm"] = Ranks(text_video, lambda rows, block: bank.normalise(block))
    if dual:
        rankings["dual_softmax"] = Ranks(text_video, dual_softmax_of(t2v))
    over_blocks(t2v, *rankings.values())
    v2t = t2v.transposed()  # (C, Q)
    video_ranks = Ranks(video_texts)
    video_reranks = Ranks(video_texts, rerank_scores(v2t, False)) if rerank else None
    over_blocks(v2t, video_ranks, *([video_reranks] if rerank else []))
    results = {"text_to_video": rankings["global"].metrics(len(ids)), "video_to_text": video_ranks.metrics(len(texts))}
    if rerank:
        results["text_to_video_rerank"] = rankings["reranked"].metrics(len(ids))
        results["video_to_text_rerank"] = video_reranks.metrics(len(texts))
    if bank is not None:
        results["text_to_video_qbnorm"] = rankings["qbnorm"].metrics(len(ids))
        results["protocol"] = {"qbnorm": {"bank": len(bank.bank), "beta": bank.beta, "k": bank.k}}
    if dual:
        results["text_to_video_dual_softmax"] = rankings["dual_softmax"].metrics(len(ids))
    if per_query:
        results["per_query"] = per_query_records(texts, text_video, ids, rankings)
    results["protocol"] = {**results.get("protocol", {}),
        "videos": len(ids),
        "queries": len(texts),
        "captions_per_video": "all" if all_captions else "first",
        "max_words": max_words or run.config.max_words,
        "queries_cut": (read or queries_read(run, captions_by_id, all_captions, max_words)).longer,
        "rerank_candidates": rerank_candidates if rerank else 0,
        "rerank_weight": run.config.rerank_weight if rerank else None,
        "seconds": round(time.monotonic() - started, 1),
    }
    return results


DENSE_SCORES = 1 << 24  # Q x C up to this (64 MB of float32): the similarity made whole, in one product
BLOCK_SCORES = 1 << 24  # else made and ranked in blocks of rows of about this many scores,
MIN_BLOCK_ROWS = 256  # of this many rows at least: a product of a few rows may take another BLAS path (other last bits)


@dataclass(frozen=True)
class GlobalScores:
    """The global cosines of queries (rows) against candidates, given a block of rows at a time (blocks): each
    row to the last bit that of the whole product (queries @ candidates.T), which is made only where small."""
    queries: torch.Tensor  # (Q, D)
    candidates: torch.Tensor  # (C, D)
    whole: np.ndarray | None = None  # (Q, C) float32, where Q x C <= DENSE_SCORES

    @classmethod
    def of(cls, queries: torch.Tensor, candidates: torch.Tensor) -> "GlobalScores":
        small = len(queries) * len(candidates) <= DENSE_SCORES
        return cls(queries, candidates, (queries @ candidates.T).numpy() if small else None)

    def transposed(self) -> "GlobalScores":
        """The candidates as queries: (C, Q)."""
        return GlobalScores(self.candidates, self.queries, None if self.whole is None else self.whole.T)

    def blocks(self):
        """(rows, (b, C) float32 scores of those rows): consecutive slices that cover every row once."""
        if self.whole is not None:
            yield slice(0, len(self.queries)), self.whole
            return
        count = max(1, len(self.queries) // max(MIN_BLOCK_ROWS, BLOCK_SCORES // max(1, len(self.candidates))))
        edges = [len(self.queries) * i // count for i in range(count + 1)]  # blocks of as many rows, give or take one
        for start, end in zip(edges, edges[1:]):
            yield slice(start, end), (self.queries[start:end] @ self.candidates.T).numpy()


def over_blocks(scores: GlobalScores, *steps) -> None:
    """Each step(rows, block) on every block of scores: one product of each block for all the steps."""
    for rows, block in scores.blocks():
        for step in steps:
            step(rows, block)


def top_candidates_of(scores: GlobalScores, candidates: int) -> np.ndarray:
    """(Q, P): top_candidates of each row of scores."""
    return np.concatenate([top_candidates(block, candidates) for _, block in scores.blocks()])


def dual_softmax_of(scores: GlobalScores):
    """(rows, block) -> dual_softmax's scores of those rows; its column maxima and sums found first (two passes)."""
    dual = DualSoftmax()
    over_blocks(scores, lambda rows, block: dual.add_maxima(block))
    over_blocks(scores, lambda rows, block: dual.add_sums(block))
    return lambda rows, block: dual.scores(block)


PER_QUERY_TOP = 5  # candidates named in each per-query record


class Ranks:
    """The ranks of one ranking's queries (targets as query_ranks takes them), found a block of rows at a time (a
    step of over_blocks). score(rows, block): the ranking's scores of those rows from their global ones (None: the
    global ones). keep_best: also each row's PER_QUERY_TOP best candidates and their scores (per_query_records)."""

    def __init__(self, targets, score=None, keep_best: bool = False):
        self.targets, self.score, self.keep_best = targets, score, keep_best
        self.ranks = np.zeros(len(targets), np.int64)  # (Q,)
        self._best: list[tuple[np.ndarray, np.ndarray]] = []  # (b, top) columns and scores of each block

    def __call__(self, rows: slice, block: np.ndarray) -> None:
        scores = block if self.score is None else self.score(rows, block)
        self.ranks[rows] = block_ranks(scores, self.targets[rows])
        if self.keep_best:
            best = _best(scores)
            self._best.append((best, np.take_along_axis(scores, best, 1)))

    def metrics(self, candidates: int) -> dict:
        return rank_metrics(self.ranks, candidates)

    @property
    def best(self) -> tuple[np.ndarray, np.ndarray]:
        """(Q, top) columns, best first, and (Q, top) their scores."""
        return np.concatenate([b for b, _ in self._best]), np.concatenate([s for _, s in self._best])


def per_query_records(texts: list[str], targets: list[int], ids: list[str], rankings: dict[str, Ranks]) -> list[dict]:
    """A record of each text->video query (targets: the column of its video in `ids`, as the metrics
    take it): its text, its video, the rank of that video under each ranking eval computed (rank: global
    similarity; rank_reranked, rank_qbnorm, rank_dual_softmax where computed), and the PER_QUERY_TOP best
    candidates by global similarity with their scores (and by the re-ranked
    order where there is one): what error analysis, or a paired comparison of two runs, needs."""
    ranks = {name: ranking.ranks for name, ranking in rankings.items()}
    best = {name: rankings[name].best for name in ("global", "reranked") if name in rankings}  # (Q, top) twice
    records = []
    for q, (text, target) in enumerate(zip(texts, targets)):
        record = {"query": text, "video": ids[target]}
        record.update({("rank" if name == "global" else f"rank_{name}"): int(r[q]) for name, r in ranks.items()})
        columns, scores = best["global"]
        record["top"] = [[ids[c], round(float(score), 4)] for c, score in zip(columns[q], scores[q])]
        if "reranked" in best:
            record["top_reranked"] = [ids[c] for c in best["reranked"][0][q]]
        records.append(record)
    return records


def _best(scores: np.ndarray) -> np.ndarray:
    """(Q, C) -> (Q, min(PER_QUERY_TOP, C)): each row's best columns, best first."""
    top = np.argpartition(-scores, min(PER_QUERY_TOP, scores.shape[1]) - 1, axis=1)[:, :PER_QUERY_TOP]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable"), 1)


def write_per_query(path: Path, records: list[dict]) -> None:
    """The records as JSON Lines, written whole or not at all; a failed write is one line."""
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    try:
        replace_atomically(path, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    except Exception as err:
        if not is_write_failure(err):
            raise
        raise write_failure(path, err, "the figures above stand; make room, or write elsewhere, and run eval "
                                       "again for the records") from None


def format_results(results: dict) -> str:
    names = {
        "text_to_video": "text->video",
        "text_to_video_rerank": "text->video re-ranked",
        "text_to_video_qbnorm": "text->video QB-Norm",
        "text_to_video_dual_softmax": "text->video dual softmax (eval only: needs all queries at once)",
        "video_to_text": "video->text",
        "video_to_text_rerank": "video->text re-ranked",
    }
    rows = [(name, results[key]) for key, name in names.items() if key in results]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{'':{width}s}{'R@1':>7s}{'R@5':>7s}{'R@10':>7s}{'MdR':>7s}{'MnR':>8s}"]
    for name, m in rows:
        lines.append(f"{name:{width}s}{m['R@1']:7.1f}{m['R@5']:7.1f}{m['R@10']:7.1f}{m['MdR']:7.1f}{m['MnR']:8.1f}")
    return "\n".join(lines)


PARAGRAPH_WORDS = 128  # tokens of a paragraph query by default (DiDeMo's and ActivityNet's are several sentences)


@dataclass(frozen=True)
class Seen:
    """What a run has seen of the videos evaluated: how many it trained on, how many it chose its best
    epoch on, and whether that was with this very caption file (else with other captions of theirs)."""
    trained: int = 0
    validated: int = 0
    same_file: bool = True
    training_files: tuple[str, ...] = ()
    validation_file: str | None = None
    same_content: int = 0  # videos the run trained on by their content, in another cache or under other ids
    init_run: str | None = None  # the counts are those of the run this one started from (--init), which saw them
    init_chose_rerank: bool = False  # this run re-ranks at the weight init_run's validation chose (none of its own)

    def line(self, captions_file, videos: int) -> str | None:
        """What eval says about the figures, or None when the run saw none of these videos."""
        name = printable(str(captions_file))
        by, whose = ((f" by the run this one started from (--init: {printable(self.init_run)})", "its")
                     if self.init_run else ("", "the run's"))
        if self.trained:
            if self.same_file:
                how = f" with these captions ({name} is one of {whose} training caption files)"
                advice = "held-out captions (a val or test file, or --split test)"
            else:
                files = ", ".join(map(printable, self.training_files[:2])) + (", ..." if len(self.training_files) > 2 else "")
                how, advice = f", with the captions of {whose} training files ({files})", "videos held out from training"
            also = (f" ({self.validated} more are its validation videos, on which its best epoch was chosen)"
                    if self.validated else "")
            return (f"eval: {self.trained} of these {videos} videos were trained on{by}{how}{also}: the figures say how "
                    f"well it fits them, not how it finds videos it has not seen; evaluate on {advice}")
        if self.same_content:
            return (f"eval: {self.same_content} of these {videos} videos are files the run trained on (the same content, "
                    "in another cache or under other ids): the figures say how well it fits them, not how it finds "
                    "videos it has not seen; evaluate on videos held out from training")
        if self.validated:
            source, chosen_on = ((f"({name})", "these captions") if self.same_file
                                 else (f"(of {printable(self.validation_file or '')})", "them"))
            if self.init_run:
                chosen = ("the checkpoint it started from and its re-rank weight were" if self.init_chose_rerank
                          else "the checkpoint it started from was")
                return (f"eval: {self.validated} of these {videos} videos are the validation videos {source} of the run "
                        f"this one started from (--init: {printable(self.init_run)}): {chosen} chosen on {chosen_on}, so "
                        "the figures lean optimistic; report them on a test file")
            return (f"eval: {self.validated} of these {videos} videos are the run's validation videos {source}: its best "
                    f"epoch and re-rank weight were chosen on {chosen_on}, so the figures lean optimistic; report them "
                    "on a test file")
        return None


def seen_by_run(run_dir: Path, cache, captions_file, captions, file_has_validation_split: bool) -> Seen:
    """What the run has seen of the videos of `captions` (ids of `cache`), by id (_seen_by_id) and, where it
    trained on none of them by id, by their content (the sources it trained on, videos.npz's trained_content)."""
    from vlpcache.model.run_layout import content_key_each, read_trained_content

    seen = _seen_by_id_or_init(run_dir, cache.cache_dir, captions_file, captions, file_has_validation_split)
    if seen.trained or seen.init_run or not len(content := read_trained_content(run_dir)):
        return seen
    stamps = [cache.sources[cache.index_of(item_id)] for item_id in captions.by_id if item_id in cache]
    same = int(np.isin(content_key_each(stamps), content).sum())
    return replace(seen, same_content=same) if same else seen


def _seen_by_id_or_init(run_dir: Path, cache_dir: Path, captions_file, captions, file_has_validation_split: bool) -> Seen:
    """_seen_by_id of the run, else of the runs it started from (--init), whose weights it began with: those one
    trained on (its cache and ids, which the run's own record need not cover), or else chose its checkpoint on."""
    from vlpcache.model.run_layout import init_runs, read_run_locations

    own = _seen_by_id(run_dir, cache_dir, captions_file, captions, file_has_validation_split)
    if own.trained or not (chain := init_runs(run_dir)):
        return own
    seen = [_seen_by_id(init, cache_dir, captions_file, captions, file_has_validation_split) for init in chain]
    trained = next(((init, s) for init, s in zip(chain, seen) if s.trained), None)
    validated = None if own.validated else next(((init, s) for init, s in zip(chain, seen) if s.validated), None)
    if not (found := trained or validated):
        return own
    try:  # without validation of its own, the run re-ranks at the weight its init checkpoint chose
        rerank = not read_run_locations(run_dir).get("val_captions")
    except (UserError, AttributeError, TypeError, OSError):
        rerank = False
    return replace(found[1], init_run=str(found[0]), init_chose_rerank=rerank)


def _seen_by_id(run_dir: Path, cache_dir: Path, captions_file, captions, file_has_validation_split: bool) -> Seen:
    """What the run has seen of the videos of `captions` (read from `captions_file`; ids of `cache_dir`).

    Where the run recorded the videos it trained and validated on (videos.npz) and the evaluated cache is
    one it trained on, those decide, whatever file the captions come from. Otherwise (a run made before
    the record was kept, another cache) pretraining's rules for a file's splits do, for the same file
    only: how many it trained on with that file (all of a file without splits, those of its training
    splits), and how many of them its best epoch was chosen on (those of the validation split of its
    validation file; all of it where the whole file, before any --split, has no validation split)."""
    from vlpcache.model.data import HELD_OUT_STEMS, VALIDATION_SPLITS
    from vlpcache.model.run_layout import read_run_locations, read_run_videos, video_keys

    try:
        train = read_run_locations(run_dir)  # a run moved with its data: where they are now
        trained_files = [str(Path(f).resolve()) for f in train.get("captions") or []]
        validation = str(Path(train["val_captions"]).resolve()) if train.get("val_captions") else None
        caches = {Path(c).resolve() for c in train.get("caches") or []}
    except (UserError, AttributeError, TypeError, OSError):  # a run config of another shape: nothing to say
        return Seen()
    path = str(Path(captions_file).resolve())
    recorded = read_run_videos(run_dir) if Path(cache_dir).resolve() in caches else None
    if recorded is not None:
        keys = video_keys(captions.by_id)
        trained, validated = (int(np.isin(keys, stored).sum()) for stored in recorded)
        return Seen(trained, validated, path in trained_files if trained else path == validation,
                    tuple(trained_files), validation)
    splits = {i: captions.splits.get(i, "").lower() for i in captions.by_id}
    trained = sum(split not in HELD_OUT_STEMS for split in splits.values()) if path in trained_files else 0
    validated = (sum(not file_has_validation_split or split in VALIDATION_SPLITS for split in splits.values())
                 if path == validation else 0)
    return Seen(trained, validated, True, tuple(trained_files), validation)


def rerank_said(candidates: int, videos: int | None = None, weight: float | None = None) -> str:
    """The re-rank of a table's footer; videos: how many candidates there are (a top larger re-ranks them all);
    weight: the run's re-rank weight, where known (0: the re-ranked rows are the global ones)."""
    if not candidates:
        return "no re-rank (--rerank-candidates 0)"
    which = f"re-rank of all {videos}" if videos is not None and candidates >= videos else f"re-rank of the top {candidates}"
    if weight == 0:
        return f"{which} at weight 0 (the run's validation chose none: its rows are the global ones)"
    return which if weight is None else f"{which} at weight {weight:g}"


def what_is_evaluated(sources, run, cache, kept, report: dict, captions, key_matches, device) -> str:
    """eval's line on the run, the videos evaluated and the caption entries left out."""
    unreadable = sum(1 for item_id in cache.damaged if item_id in kept.by_id)
    said_unreadable = f"; {unreadable} of them found damaged, counted as videos without frames" if unreadable else ""
    example = f" (e.g. {printable(report['example_without_item'])!r})" if report["example_without_item"] else ""
    items = items_word(cache.kinds[cache.index_of(i)] for i in kept.by_id if i in cache)
    return (f"eval: run {sources.run_dir} (epoch {run.epoch}), {len(kept.by_id)} captioned {items} of {len(cache)} cached "
            f"({report['captions_without_items']} caption entries without a cached video{example}"
            f"{captions.bad_lines_text()}{key_matches.text()}{said_unreadable}), device {device}")


def say_protocol_notes(say, captions_file, captions, kept, split, paragraphs) -> None:
    """What eval's queries are where a file could be meant otherwise: several splits evaluated together,
    segment sentences asked of whole videos."""
    if split is None and (splits := kept.split_counts()) and len(splits) > 1:
        say(f"eval: {captions_file} has videos of several splits ({', '.join(f'{n} {s}' for s, n in splits.items())}), "
            "all evaluated together: --split NAME evaluates one")
    if captions.segments and not paragraphs:  # a segment's sentence as a query for its whole video
        say(f"note: {captions_file} ({captions.layout})")


def queries_read(run, queries: dict[str, list[str]], all_captions: bool, max_words: int | None,
                 say: Say = silent):
    """How the run's text model reads eval's queries, tokenized once for both counts (read_texts): those longer
    than the tokens it reads (max_words, else the run's), and those mostly words it does not know (Chinese
    captions, an English model), said in a line (`say`) when many are: their ranks then measure nothing it reads."""
    from vlpcache.model.batch import read_texts, unknown_texts_line
    from vlpcache.model.model import DEFAULT_TEXT_MODEL

    texts = caption_queries(list(queries.values()), all_captions)[0]
    read = read_texts(run.tokenizer, texts, max_words or run.config.max_words)
    if line := unknown_texts_line(read, len(texts), run.config.text_model or DEFAULT_TEXT_MODEL, "queries",
                                  "and their ranks say little about the model"):
        say(line)
    return read


def run_eval(captions_file, run_dir=None, cache_dir=None, split=None, all_captions=False, paragraphs=False,
             max_words=None, as_json=False, rerank_candidates=RERANK_CANDIDATES, device=DEFAULT_DEVICE,
             batch_size=None, checkpoint=None, quiet=False, qbnorm=False, dual_softmax=False, per_query=None) -> dict:
    """The `vlpcache eval` command. per_query: a JSON Lines file to write a record of each query to."""
    from vlpcache.model.checkpoint import load_run
    from vlpcache.model.data import has_validation_split
    from vlpcache.model.retrieval import default_batch_size

    if per_query is not None and not Path(per_query).parent.is_dir():  # said now, not after the encoding
        raise UserError(f"{per_query}: no such folder {Path(per_query).parent}; create it first")
    if per_query is not None and not may_write(Path(per_query).parent):  # another user's folder
        raise UserError(f"--per-query {per_query}: this user may not write in {Path(per_query).parent}; pass a file "
                        "in a folder of your own")
    sources = resolve_sources(run_dir, cache_dir)
    cache = open_cache(sources.cache_dir)
    captions = read_captions(captions_file, progress=not quiet)
    file_has_validation_split = has_validation_split(captions)
    if split is not None:
        captions = captions.of_split(split)
    # an item found damaged before stays a candidate, a video without frames: the same candidates every run
    candidates = [*cache.ids, *cache.damaged]
    captions, key_matches = captions.matched_to(candidates)
    kept, report = captions.restrict(candidates)
    if not kept.by_id:
        raise UserError(
            f"{captions_file}: none of its {len(captions)} videos is in cache {sources.cache_dir} (caption ids "
            f"look like {next(iter(captions.by_id), '')!r}, cache ids like {(cache.ids or [''])[0]!r}{key_matches.text()}: a "
            "caption id is an item id, a file name or path that ends in one, or the end of one); pass the matching --cache"
        )
    device = resolve_device(device)
    run = load_run(sources.run_dir, device=device, checkpoint=checkpoint)
    check_run_reads_cache(run, cache)
    if max_words:
        from vlpcache.model.model import check_max_words

        check_max_words(max_words, run.model.text_encoder.backbone, run.config.text_model or "of the run")
    say = sayer(quiet)
    say_protocol_notes(say, captions_file, captions, kept, split, paragraphs)
    seen = seen_by_run(sources.run_dir, cache, captions_file, kept, file_has_validation_split)
    if line := seen.line(captions_file, len(kept.by_id)):  # said under --quiet too: it is about what the figures mean
        say_always(line)
    say(what_is_evaluated(sources, run, cache, kept, report, captions, key_matches, device))
    if line := being_trained_note(sources.run_dir, run.epoch, chosen=checkpoint is None):
        say(line)
    queries = kept.by_id
    if paragraphs and all_captions:
        say("note: --all-captions changes nothing with --paragraphs: each video is one query, all its captions joined")
    if paragraphs:  # one query per video: its captions in file order, as one text
        queries = {item_id: [" ".join(texts)] for item_id, texts in queries.items()}
        if not max_words:  # the default, within what the text model reads (a small model may read fewer)
            from vlpcache.model.model import text_positions

            max_words = min(PARAGRAPH_WORDS, text_positions(run.model.text_encoder.backbone) or PARAGRAPH_WORDS)
    read = queries_read(run, queries, all_captions, max_words, say_always)  # its note under --quiet too: about the figures
    results = evaluate(run, cache, queries, all_captions, device, batch_size or default_batch_size(device),
                       rerank_candidates, progress=not quiet, qbnorm=qbnorm, dual=dual_softmax, max_words=max_words,
                       per_query=per_query is not None, read=read)
    records = results.pop("per_query", None)
    if paragraphs:
        results["protocol"]["captions_per_video"] = "paragraph"
    results["run"] = {"run_dir": str(sources.run_dir), "epoch": run.epoch, "checkpoint_sha256": run.checkpoint_sha256,
                      "captions": str(Path(captions_file)), "split": split, "cache": str(sources.cache_dir),
                      "videos_trained_on": seen.trained or seen.same_content, "validation_videos": seen.validated}
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        print(format_results(results))
        p = results["protocol"]
        per_video = ("one paragraph per video, its captions joined" if paragraphs
                     else "every caption of each video" if p["captions_per_video"] == "all"
                     else f"{p['captions_per_video']} caption per video")
        cut = f"; {p['queries_cut']} longer, cut there" if p["queries_cut"] else ""
        print(f"text->video: {p['queries']} queries ({per_video}, up to {p['max_words']} tokens{cut}), {p['videos']} "
              f"candidate videos; video->text: {p['videos']} queries, their {p['queries']} captions the candidates; "
              f"{rerank_said(p['rerank_candidates'], p['videos'], p['rerank_weight'])}, {p['seconds']} s")
    if records is not None:  # after the figures: a write that fails loses only the records
        write_per_query(Path(per_query), records)
        say(f"eval: each query's rank and best candidates in {printable(str(per_query))}")
    return results
