"""A run's model over cached videos and query texts: the embeddings index, search and eval work on.

Everything here runs under torch.inference_mode and returns CPU tensors, so that callers can keep
many batches without holding device memory.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from vlpcache.model.batch import tokenize, video_batch
from vlpcache.model.model import TextEmbedding, VideoEmbedding


def default_batch_size(device: torch.device) -> int:
    return 256 if device.type == "cuda" else 64


def _batches(rows: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


@torch.inference_mode()
def encode_video_rows(run, cache, rows: list[int], device, batch_size: int, regions: bool = False,
                      progress: bool = True, desc: str = "encoding videos") -> VideoEmbedding:
    """Embeddings of cache items `rows`, in that order: global_ (V, E) float32, and with regions=True
    also regions (V, T*N, E) float16 and region_mask (V, T*N) (else empty tensors)."""
    model = run.model
    globals_, region_parts, mask_parts = [], [], []
    with tqdm(total=len(rows), unit="video", desc=desc, disable=not progress, dynamic_ncols=True, leave=False) as bar:
        for part in _batches(rows, batch_size):
            items = [cache[r] for r in part]
            video = model.encode_video(**video_batch(items, device))
            globals_.append(video.global_.float().cpu())  # (B, E)
            if regions:
                region_parts.append(video.regions.half().cpu())  # (B, T*N, E)
                mask_parts.append(video.region_mask.cpu())  # (B, T*N)
            bar.update(len(part))
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
def encode_texts(run, texts: list[str], device, batch_size: int = 256, progress: bool = False) -> TextEmbedding:
    """Global (Q, E) float32 and word (Q, L, E) float16 embeddings of texts, padded to the longest over all batches."""
    model = run.model
    globals_, words, masks = [], [], []
    for start in tqdm(range(0, len(texts), batch_size), desc="encoding captions", unit="batch",
                      disable=not progress, leave=False, dynamic_ncols=True):
        input_ids, attention_mask = tokenize(run.tokenizer, texts[start : start + batch_size], model.config.max_words)
        text = model.encode_text(input_ids.to(device), attention_mask.to(device))
        globals_.append(text.global_.float().cpu())  # (B, E)
        words.append(text.words.half().cpu())  # (B, L, E)
        masks.append(text.word_mask.cpu())  # (B, L)
    return TextEmbedding(torch.cat(globals_), _cat_padded(words, 1), _cat_padded(masks, 1))


def as_numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.float().numpy())
