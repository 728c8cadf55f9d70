"""Batches of cached videos and captions as model inputs, shared by training, indexing and search."""

from __future__ import annotations

import numpy as np
import torch

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


def tokenize(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, L), attention_mask (B, L)), padded to the longest text, truncated at max_len."""
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]
