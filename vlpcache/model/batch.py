"""Batches of cached videos and captions as model inputs, shared by training, indexing and search."""

from __future__ import annotations

import numpy as np
import torch

from vlpcache.captions import unknown_tokens
from vlpcache.report import printable

VIDEO_KEYS = ("features", "boxes", "region_mask", "frame_mask", "timestamps")


def video_batch(items: list[dict], device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Stack RegionCache items into the arguments of `AlignmentModel.encode_video`.

    Items from caches with fewer frames (T) or regions (N) — images next to videos — are padded to
    the largest in the batch with masked zeros. Features stay float16 (half the copy); the model
    casts them.
    """
    T = max(item["features"].shape[0] for item in items)
    N = max(item["features"].shape[1] for item in items)
    D = items[0]["features"].shape[2]
    B = len(items)
    features = np.zeros((B, T, N, D), dtype=np.float16)
    boxes = np.zeros((B, T, N, 4), dtype=np.float32)
    region_mask = np.zeros((B, T, N), dtype=bool)
    frame_mask = np.zeros((B, T), dtype=bool)
    timestamps = np.zeros((B, T), dtype=np.float32)
    for b, item in enumerate(items):
        t, n = item["features"].shape[:2]
        features[b, :t, :n] = item["features"]
        boxes[b, :t, :n] = item["boxes"]
        region_mask[b, :t, :n] = item["region_mask"]
        frame_mask[b, :t] = item["frame_mask"]
        timestamps[b, :t] = item["timestamps"]
    batch = {
        "features": torch.from_numpy(features),  # (B, T, N, D) float16
        "boxes": torch.from_numpy(boxes),  # (B, T, N, 4)
        "region_mask": torch.from_numpy(region_mask),  # (B, T, N)
        "frame_mask": torch.from_numpy(frame_mask),  # (B, T)
        "timestamps": torch.from_numpy(timestamps),  # (B, T) seconds
    }
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def longer_than(tokenizer, texts: list[str], max_len: int) -> int:
    """How many of the texts are longer than max_len tokens (special tokens included): tokenize() cuts
    each of those there."""
    encoded = tokenizer(list(texts), verbose=False, return_attention_mask=False, return_token_type_ids=False)
    return sum(len(ids) > max_len for ids in encoded["input_ids"])


def mostly_unknown(tokenizer, texts: list[str]) -> tuple[int, str]:
    """How many of the texts are more than half tokens the text model knows nothing of (unknown_tokens),
    and the first such text ("" for none). A slow tokenizer, without word ids, counts [UNK] only."""
    encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast,
                        return_attention_mask=False, return_token_type_ids=False, verbose=False)
    count, first = 0, ""
    for n, ids in enumerate(encoded["input_ids"]):
        if tokenizer.is_fast:
            flags = unknown_tokens(ids, encoded.word_ids(n), encoded["offset_mapping"][n], tokenizer.unk_token_id)
        else:
            flags = [i == tokenizer.unk_token_id for i in ids]
        if flags and 2 * sum(flags) > len(flags):
            count, first = count + 1, first or texts[n]
    return count, first


UNKNOWN_SHARE_SAID = 0.05  # from this share of a set's texts mostly unknown to the text model on, a line says so
MULTILINGUAL_EXAMPLE = "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"


def unknown_texts_line(tokenizer, texts: list[str], text_model: str, what: str, consequence: str) -> str | None:
    """A line when UNKNOWN_SHARE_SAID or more of `texts` (`what`: "training captions", "queries") are mostly
    tokens the text model knows nothing of (a Chinese caption file, an English model), with the way forward."""
    count, example = mostly_unknown(tokenizer, texts)
    if not texts or count < UNKNOWN_SHARE_SAID * len(texts):
        return None
    shown = printable(example if len(example) <= 40 else example[:40] + "...")
    return (f"note: {count:,} of the {len(texts):,} {what} ({count / len(texts):.0%}) are mostly words the text model "
            f"({text_model}) does not know, e.g. \"{shown}\": it reads them as unknown tokens or single letters, "
            f"{consequence}; for another language, a multilingual text model reads them: pretrain --text-model "
            f"NAME|DIR (e.g. {MULTILINGUAL_EXAMPLE})")


def tokenize(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, L), attention_mask (B, L)), padded to the longest text, truncated at max_len."""
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]
