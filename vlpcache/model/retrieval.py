"""A model over cached videos and query texts: the embeddings that validation, index, search and eval
work on, and the region-word scores of the candidates a re-rank re-orders.

Everything here runs under torch.inference_mode and returns CPU tensors, so that callers can keep
many batches without holding device memory. `model` is an AlignmentModel; `tokenizer` its tokenizer.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch

from vlpcache.devices import release_freed_memory
from vlpcache.interrupts import stop_if_interrupted
from vlpcache.metrics import top_candidates
from vlpcache.model.batch import tokenize, video_batch
from vlpcache.model.losses import pair_scores, token_sets
from vlpcache.model.model import TextEmbedding, VideoEmbedding
from vlpcache.report import progress_bar


def default_batch_size(device: torch.device) -> int:
    return 256 if device.type == "cuda" else 64


def _batches(rows: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


@torch.inference_mode()
def encode_videos(model, items, rows: list[int], device, batch_size: int, regions: bool = False,
                  progress: bool = True, desc: str = "encoding videos", bar=None) -> VideoEmbedding:
    """Embeddings of items[r] for r in rows, in that order (items: a RegionCache, or anything indexed
    the same way): global_ (V, E) float32, and with regions=True also regions (V, T*N, E) float16
    and region_mask (V, T*N) (else empty tensors). bar: a caller's progress bar to advance (one over
    several calls), instead of one of its own."""
    globals_, region_parts, mask_parts = [], [], []
    own_bar = progress_bar(total=len(rows), unit="video", desc=desc, disable=not progress, leave=False) if bar is None else None
    with own_bar if own_bar is not None else contextlib.nullcontext(bar) as bar:
        for part in _batches(rows, batch_size):
            video = model.encode_video(**video_batch([items[r] for r in part], device))
            globals_.append(video.global_.float().cpu())  # (B, E)
            if regions:
                region_parts.append(video.regions.half().cpu())  # (B, T*N, E)
                mask_parts.append(video.region_mask.cpu())  # (B, T*N)
            bar.update(len(part))
            stop_if_interrupted()
    release_freed_memory()  # the batches' tensors: without it, each call's stayed on the heap (index calls it per chunk)
    dim = model.config.embed_dim
    global_ = torch.cat(globals_) if globals_ else torch.zeros((0, dim))
    if not regions:
        return VideoEmbedding(global_, torch.zeros((0, 0, dim)), torch.zeros((0, 0), dtype=torch.bool))
    return VideoEmbedding(global_, _cat_padded(region_parts, 1), _cat_padded(mask_parts, 1))


def _cat_padded(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Concatenate batches whose region axis differs (items of caches with other T or N) by zero-padding it."""
    longest = max(p.shape[dim] for p in parts)
    padded = []
    for p in parts:
        if p.shape[dim] < longest:
            pad = list(p.shape)
            pad[dim] = longest - p.shape[dim]
            p = torch.cat([p, p.new_zeros(pad)], dim)
        padded.append(p)
    return torch.cat(padded)


@torch.inference_mode()
def encode_texts(model, tokenizer, texts: list[str], device, batch_size: int = 256, progress: bool = False,
                 text_features=None, max_words: int | None = None) -> TextEmbedding:
    """Global (Q, E) float32 and word (Q, L, E) float16 embeddings of texts, padded to the longest over
    all batches, each text cut at max_words tokens (None: the model's). With text_features (a frozen
    encoder's TextFeatures holding every text) the encoder is not run."""
    globals_, words, masks = [], [], []
    for start in progress_bar(range(0, len(texts), batch_size), desc="encoding captions", unit="batch",
                              disable=not progress, leave=False):
        part = texts[start : start + batch_size]
        if text_features is not None and text_features.kind == "prefix":
            cached = {k: v.to(device) for k, v in text_features.model_inputs(part, part).items()}
            text = model.encode_text(cached["input_ids"], cached["attention_mask"], cached["text_prefix"])
        elif text_features is not None:
            cached = text_features.model_inputs(part, part)
            text = model.project_text(*(cached[k].to(device) for k in ("text_hidden", "text_pooled", "word_mask")))
        else:
            input_ids, attention_mask = tokenize(tokenizer, part, max_words or model.config.max_words)
            text = model.encode_text(input_ids.to(device), attention_mask.to(device))
        globals_.append(text.global_.float().cpu())  # (B, E)
        words.append(text.words.half().cpu())  # (B, L, E)
        masks.append(text.word_mask.cpu())  # (B, L)
    return TextEmbedding(torch.cat(globals_), _cat_padded(words, 1), _cat_padded(masks, 1))


def as_numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.float().numpy())


@torch.inference_mode()
def candidate_local_scores(text: TextEmbedding, video: VideoEmbedding, similarity: np.ndarray, lam: float,
                           candidates: int, texts_are_queries: bool = True, chunk: int = 16,
                           progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """S_loc of each query's top `candidates` by global similarity: (top (Q, P), local (Q, P)).

    texts_are_queries: similarity is (texts, videos) and each text's candidates are videos; else
    similarity is (videos, texts) and each video's candidates are texts.
    """
    top = top_candidates(similarity, candidates)  # (Q, P)
    return top, local_scores(text, video, top, lam, texts_are_queries, chunk, progress)


@torch.inference_mode()
def local_scores(text: TextEmbedding, video: VideoEmbedding, top: np.ndarray, lam: float,
                 texts_are_queries: bool = True, chunk: int = 16, progress: bool = False) -> np.ndarray:
    """(Q, P) float32: S_loc of each query and its candidates `top` (Q, P), as candidate_local_scores gives them
    (eval finds the top block by block, so never holds the similarity whole)."""
    sets = token_sets(text.words, text.word_mask, video.regions, video.region_mask)  # Gram matrices once
    local = np.zeros(top.shape, np.float32)
    # queries of similar length together, so that each chunk's pairs carry little padding
    query_mask = sets.word_mask if texts_are_queries else sets.region_mask
    by_length = torch.argsort(query_mask.sum(-1), stable=True)  # (Q,)
    for start in progress_bar(range(0, len(top), chunk), desc="re-ranking", unit="chunk", leave=False,
                              disable=not progress):
        rows = by_length[start : start + chunk]  # (c,)
        columns = torch.from_numpy(top[rows.numpy()])  # (c, P)
        pairs = (rows[:, None], columns) if texts_are_queries else (columns, rows[:, None])
        local[rows.numpy()] = pair_scores(sets, *pairs, lam).float().numpy()  # (c, P)
    return local
