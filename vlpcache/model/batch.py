"""Batches of cached videos and captions as model inputs, shared by training, indexing and search."""

from __future__ import annotations

from typing import NamedTuple

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


class TextsRead(NamedTuple):
    """How the text model reads a set of texts (read_texts)."""

    longer: int  # longer than max_len tokens, special tokens included: tokenize() cuts each there
    unknown: int  # more than half tokens the text model knows nothing of (captions.unknown_tokens)
    first_unknown: str  # the first of those ("" for none)


def read_texts(tokenizer, texts: list[str], max_len: int) -> TextsRead:
    """The texts tokenized once, for what a run or eval says of them before using them. A slow tokenizer,
    without word ids, counts [UNK] only as unknown."""
    fast = tokenizer.is_fast
    encoded = tokenizer(list(texts), return_offsets_mapping=fast, return_special_tokens_mask=True,
                        return_attention_mask=False, return_token_type_ids=False, verbose=False)
    longer, unknown, first = 0, 0, ""
    for n, ids in enumerate(encoded["input_ids"]):
        longer += len(ids) > max_len
        read = [k for k, special in enumerate(encoded["special_tokens_mask"][n]) if not special]  # [CLS], [SEP] out
        if fast:
            words, spans = encoded.word_ids(n), encoded["offset_mapping"][n]
            flags = unknown_tokens([ids[k] for k in read], [words[k] for k in read], [spans[k] for k in read],
                                   tokenizer.unk_token_id)
        else:
            flags = [ids[k] == tokenizer.unk_token_id for k in read]
        if flags and 2 * sum(flags) > len(flags):
            unknown, first = unknown + 1, first or texts[n]
    return TextsRead(longer, unknown, first)


UNKNOWN_SHARE_SAID = 0.05  # from this share of a set's texts mostly unknown to the text model on, a line says so
MULTILINGUAL_EXAMPLE = "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"


def unknown_texts_line(read: TextsRead, texts: int, text_model: str, what: str, consequence: str) -> str | None:
    """A line when UNKNOWN_SHARE_SAID or more of the `texts` read (`what`: "training captions", "queries") are
    mostly tokens the text model knows nothing of (a Chinese caption file, an English model), with the way forward."""
    count, example = read.unknown, read.first_unknown
    if not texts or count < UNKNOWN_SHARE_SAID * texts:
        return None
    shown = printable(example if len(example) <= 40 else example[:40] + "...")
    return (f"note: {count:,} of the {texts:,} {what} ({count / texts:.0%}) are mostly words the text model "
            f"({text_model}) does not know, e.g. \"{shown}\": it reads them as unknown tokens or single letters, "
            f"{consequence}; for another language, a multilingual text model reads them: pretrain --text-model "
            f"NAME|DIR (e.g. {MULTILINGUAL_EXAMPLE})")


def tokenize(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, L), attention_mask (B, L)), padded to the longest text, truncated at max_len."""
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]
