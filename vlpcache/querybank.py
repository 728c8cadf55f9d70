"""Query-bank normalisation (QB-Norm, Bogolin et al., CVPR 2022), dynamic inverted softmax variant.

Some videos ("hubs") come out near the top for many unrelated queries. QB-Norm measures that with a
bank of typical queries (training captions): for each video j, how strongly the whole bank matches it,

    Z_j = Σ_b exp(β · s(b, j))                      over the bank's queries b

and, for a query whose best video is a hub (among the top-k of some bank query), ranks by the
inverted softmax exp(β · s(q, j)) / Z_j instead of s(q, j). Queries whose best video is no hub keep
their similarities (the "dynamic" part: normalising them too hurts, per the paper).

Everything here is numpy (search runs without torch). The state kept per video is log Z_j and, per
bank query, its k best videos with their scores, so that videos added to an index later update both
exactly without re-scoring the old ones against the bank.
"""

from __future__ import annotations

import hashlib
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vlpcache.files import replace_atomically

BANK_SIZE = 5000  # training captions in a bank (a seeded sample when there are more)
BETA = 10.0  # inverse temperature of the inverted softmax (chosen on MSR-VTT val: bench/qbnorm_sweep.py, BENCHMARKS.md)
TOP_K = 1  # a video is a hub when it is among the top-k of some bank query (1, 3, 10 tie on val)


def _rows(n: int, chunk: int = 4096):
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


@dataclass
class QueryBank:
    bank: np.ndarray  # (Nb, E) float32 bank query embeddings
    beta: float
    k: int
    log_norm: np.ndarray  # (C,) log Σ_b exp(β s(b, j)) per video j
    top_scores: np.ndarray  # (Nb, k) each bank query's k best similarities, best first
    top_videos: np.ndarray  # (Nb, k) and the videos that have them
    rows: str = ""  # rows_digest of the index ids it was made for, in order ("": a bank made before it was kept)

    @classmethod
    def build(cls, bank: np.ndarray, videos: np.ndarray, beta: float = BETA, k: int = TOP_K) -> "QueryBank":
        """bank (Nb, E), videos (C, E): L2-normalised embeddings."""
        bank = np.ascontiguousarray(bank, np.float32)
        empty = cls(bank, beta, k, np.zeros(0, np.float32), np.full((len(bank), k), -np.inf, np.float32),
                    np.full((len(bank), k), -1, np.int64))
        return empty.extended(videos)

    def extended(self, videos: np.ndarray) -> "QueryBank":
        """The bank state after appending videos (C_new, E) to the gallery (they get indices C..C+C_new-1)."""
        videos = np.ascontiguousarray(videos, np.float32)
        offset = len(self.log_norm)
        log_norm = np.zeros(len(videos), np.float32)
        scores, owners = self.top_scores.copy(), self.top_videos.copy()
        for part in _rows(len(videos)):
            similarity = self.bank @ videos[part].T  # (Nb, c)
            log_norm[part] = _logsumexp(self.beta * similarity, axis=0)  # (c,)
            k = min(self.k, similarity.shape[1])
            best = np.argpartition(-similarity, k - 1, axis=1)[:, :k]  # (Nb, k) unordered
            scores = np.concatenate([scores, np.take_along_axis(similarity, best, 1)], 1)
            owners = np.concatenate([owners, best + offset + part.start], 1)
            keep = np.argsort(-scores, axis=1, kind="stable")[:, : self.k]
            scores, owners = np.take_along_axis(scores, keep, 1), np.take_along_axis(owners, keep, 1)
        return QueryBank(self.bank, self.beta, self.k, np.concatenate([self.log_norm, log_norm]), scores, owners, "")

    def of_rows(self, ids: list[str]) -> "QueryBank":
        """This bank, said to be made for the index rows `ids` (which its log_norm follows, in order)."""
        return replace(self, rows=rows_digest(ids))

    @property
    def hubs(self) -> np.ndarray:
        """(C,) bool: videos among the top-k of some bank query."""
        hub = np.zeros(len(self.log_norm), bool)
        hub[self.top_videos[self.top_videos >= 0]] = True
        return hub

    def normalise(self, similarity: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """Scores to rank by: similarity (Q, P) of queries against videos `columns` (all C when None).
        Rows whose best video is a hub get β·s − log Z (the log of the inverted softmax); others keep s.
        For a subset of columns (an index's candidates), the row's best among them decides."""
        similarity = np.asarray(similarity, np.float64)
        columns = np.arange(similarity.shape[1]) if columns is None else np.asarray(columns)
        columns = np.broadcast_to(columns, similarity.shape)
        best = np.take_along_axis(columns, similarity.argmax(1)[:, None], 1)[:, 0]  # (Q,)
        normalised = self.beta * similarity - self.log_norm[columns]
        return np.where(self.hubs[best][:, None], normalised, similarity)

    def save(self, path: Path) -> None:
        replace_atomically(Path(path), lambda tmp: self._write(tmp), suffix=".npz")

    def _write(self, tmp: Path) -> None:
        np.savez(tmp, bank=self.bank, beta=self.beta, k=self.k, log_norm=self.log_norm,
                 top_scores=self.top_scores, top_videos=self.top_videos, rows=np.array(self.rows))

    @classmethod
    def load(cls, path: Path) -> "QueryBank":
        with np.load(path) as data:
            return cls(data["bank"].astype(np.float32), float(data["beta"]), int(data["k"]), data["log_norm"],
                       data["top_scores"], data["top_videos"], str(data["rows"]) if "rows" in data else "")


def rows_digest(ids: list[str]) -> str:
    """Which items, in which order, an index's rows hold: a bank made for other rows (an item indexed anew moves
    to the end, one dropped shifts the rest) normalises the wrong videos, however many there are."""
    digest = hashlib.blake2b(digest_size=16)
    for item_id in ids:
        digest.update(item_id.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)  # a bank cut short or damaged: made again


def bank_for(path: Path, ids: list[str]) -> QueryBank | None:
    """The query bank in `path` where it was made for the index rows `ids`; None where there is none, it does
    not read, or it was made for other rows."""
    try:
        bank = QueryBank.load(path) if Path(path).exists() else None
    except UNREADABLE:
        return None
    return bank if bank is not None and made_for(len(bank.log_norm), bank.rows, ids) else None


def bank_fits(path: Path, ids: list[str]) -> bool:
    """Whether `path` holds a query bank made for the index rows `ids`, read without its embeddings (those are
    read once, by the search that uses it)."""
    try:
        with np.load(path) if Path(path).exists() else nullcontext() as data:
            return data is not None and made_for(len(data["log_norm"]), str(data["rows"]) if "rows" in data else "", ids)
    except UNREADABLE:
        return False


def made_for(videos: int, rows: str, ids: list[str]) -> bool:
    """Whether a bank of `videos` columns made for the rows `rows` (rows_digest; "": a bank made before it kept its
    rows, taken for as many) normalises the index rows `ids`."""
    return videos == len(ids) and (not rows or rows == rows_digest(ids))


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    peak = x.max(axis=axis, keepdims=True)
    return (np.log(np.exp(x - peak).sum(axis=axis, keepdims=True)) + peak).squeeze(axis)


def bank_captions(captions: list[str], size: int = BANK_SIZE, seed: int = 0) -> list[str]:
    """The bank: distinct training captions, a seeded sample of `size` when there are more."""
    distinct = sorted(set(captions))
    if len(distinct) <= size:
        return distinct
    chosen = np.random.default_rng(seed).choice(len(distinct), size, replace=False)
    return [distinct[i] for i in sorted(chosen)]


DUAL_TEMPERATURE = 10.0  # dual softmax's temperature (chosen on MSR-VTT val with QB-Norm's β, same sweep)


def dual_softmax(similarity: np.ndarray, temperature: float = DUAL_TEMPERATURE) -> np.ndarray:
    """Dual softmax (CAMoE): each score times the softmax over all *queries* of its column. It needs
    every test query at once, so it is an eval-only figure, never what search can do."""
    dual = DualSoftmax(temperature)
    dual.add_maxima(similarity)
    dual.add_sums(similarity)
    return dual.scores(similarity)


@dataclass
class DualSoftmax:
    """dual_softmax of (Q, C) scores that come a block of query rows at a time, in three passes over the same
    blocks: every block's column maxima (add_maxima), then column sums (add_sums), then each block's scores
    (scores); (1, C) kept between blocks, the figures those of the whole matrix to the last bit (the sums add
    row after row, as numpy sums a matrix's column)."""
    temperature: float = DUAL_TEMPERATURE
    peak: np.ndarray | None = None  # (1, C) the largest logit of each column
    total: np.ndarray | None = None  # (1, C) the sum of each column's exp(logit - peak)

    def add_maxima(self, block: np.ndarray) -> None:
        peak = self._logits(block).max(0, keepdims=True)
        self.peak = peak if self.peak is None else np.maximum(self.peak, peak)

    def add_sums(self, block: np.ndarray) -> None:
        prior = self._prior(block)  # (b, C)
        self.total = (prior.sum(0, keepdims=True) if self.total is None
                      else np.concatenate([self.total, prior]).sum(0, keepdims=True))

    def scores(self, block: np.ndarray) -> np.ndarray:
        return block * self._prior(block) / self.total

    def _logits(self, block: np.ndarray) -> np.ndarray:
        return self.temperature * np.asarray(block, np.float64)

    def _prior(self, block: np.ndarray) -> np.ndarray:
        return np.exp(self._logits(block) - self.peak)
