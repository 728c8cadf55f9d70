"""What a text encoder's frozen layers make of every caption, computed once and read by every epoch.

Frozen layers give a caption the same output every time, so pretraining encodes every training and
validation caption once, stores the result in the workspace, and an epoch runs only what trains.
Runs on the same captions with the same text model share the file. Two kinds:

- "outputs" (`--trainable-layers 0`, nothing of the text encoder trains): its pooled output, and the
  hidden states of the real words where region-word alignment needs them; an epoch costs only the
  region encoder.
- "prefix" (the top K layers train): the output of the frozen layers below them for every token;
  an epoch runs only the K top layers on it (TextEncoder.forward(prefix=...)).

    <workspace>/text-features/<key>.h5
        pooled     (C, H) float16   outputs: the pooled output of each caption
        tokens     (W, H) float16   outputs: hidden states of each caption's real words (special tokens
                                    left out; only with words); prefix: the frozen layers' output for
                                    every token of each caption; caption after caption
        token_ids  (W,) int32       prefix: the tokens' ids
        offsets    (C+1,) int64     caption c owns tokens[offsets[c]:offsets[c+1]]
        captions   (C,) UTF-8       the caption texts, in row order
    attrs: key (what the features depend on, as JSON), vlpcache version

The key hashes the kind, the text model's identity (its name, or its directory's weight files), the
number of frozen layers, the pooling, the caption length limit and the caption texts; a file is
written under a temporary name and renamed when complete, so a kill -9 never leaves a file that is
taken for whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from vlpcache import __version__
from vlpcache.files import file_sha256, fsync_path
from vlpcache.model.batch import tokenize

FEATURES_DIR = "text-features"
ENCODE_BATCH = 256


def text_model_identity(name_or_dir: str) -> str:
    """A Hugging Face name as given, or a local directory by the sha256 of its weight files."""
    folder = Path(name_or_dir)
    if not folder.is_dir():
        return name_or_dir
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    return "sha256:" + hashlib.sha256("".join(file_sha256(p) for p in weights).encode()).hexdigest()


class TextFeatures:
    """Cached frozen-layer results of a list of captions, looked up by caption text."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with h5py.File(self.path, "r") as f:
            self.kind = json.loads(f.attrs["key"])["kind"]
            self.pooled = f["pooled"][:] if "pooled" in f else None  # (C, H) float16
            self.tokens = f["tokens"][:] if "tokens" in f else None  # (W, H) float16
            self.token_ids = f["token_ids"][:] if "token_ids" in f else None  # (W,)
            self.offsets = f["offsets"][:]  # (C+1,)
            captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in f["captions"][:]]
        self.width = (self.pooled if self.pooled is not None else self.tokens).shape[1]
        self.row_of = {caption: row for row, caption in enumerate(captions)}

    def __len__(self) -> int:
        return len(self.row_of)

    def _tokens_of(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (B, L, H) of captions `rows`, padded; their mask (B, L); their ids (B, L) (prefix)."""
        counts = [int(self.offsets[r + 1] - self.offsets[r]) for r in rows] if self.tokens is not None else [0] * len(rows)
        tokens = np.zeros((len(rows), max(counts + [1]), self.width), np.float32)
        mask = np.zeros(tokens.shape[:2], bool)
        ids = np.zeros(tokens.shape[:2], np.int64)
        for b, (row, count) in enumerate(zip(rows, counts)):
            span = slice(self.offsets[row], self.offsets[row] + count)
            tokens[b, :count] = self.tokens[span] if count else 0
            mask[b, :count] = True
            if self.token_ids is not None:
                ids[b, :count] = self.token_ids[span]
        return torch.from_numpy(tokens), torch.from_numpy(mask), torch.from_numpy(ids)

    def model_inputs(self, captions: list[str], word_captions: list[str]) -> dict[str, torch.Tensor]:
        """AlignmentModel inputs for `captions`. outputs: text_pooled of `captions`, text_hidden and
        word_mask of `word_captions`; prefix: text_prefix, input_ids, attention_mask of `captions`."""
        rows = [self.row_of[c] for c in captions]
        if self.kind == "prefix":
            prefix, mask, ids = self._tokens_of(rows)
            return {"text_prefix": prefix, "input_ids": ids, "attention_mask": mask.long()}
        hidden, word_mask, _ = self._tokens_of([self.row_of[c] for c in word_captions])
        return {"text_pooled": torch.from_numpy(self.pooled[rows].astype(np.float32)), "text_hidden": hidden,
                "word_mask": word_mask}


def features_key(text_model: str, pooling: str, max_words: int, with_words: bool, captions: list[str],
                 kind: str = "outputs", frozen_layers: int = 0) -> dict:
    """Everything cached text features depend on."""
    return {
        "kind": kind,
        "text_model": text_model_identity(text_model),
        "frozen_layers": frozen_layers,
        "pooling": pooling,
        "max_words": max_words,
        "words": with_words,
        "captions_sha256": hashlib.sha256("\n".join(captions).encode()).hexdigest(),
    }


def cache_kind(model) -> str | None:
    """What of the model's text encoder can be cached: "outputs" when nothing of it trains, "prefix"
    when frozen layers lie below the trainable ones, None when every layer trains."""
    if model.config.text_trainable_layers == 0:
        return "outputs"
    return "prefix" if model.text_encoder.frozen_layers > 0 else None


def model_features_key(model, with_words: bool, captions: list[str]) -> dict:
    config = model.config
    return features_key(config.text_model, config.text_pooling, config.max_words, with_words, captions,
                        cache_kind(model), model.text_encoder.frozen_layers)


def cached_text_features(model, tokenizer, captions: list[str], workspace_root: Path, with_words: bool,
                         device: torch.device, progress: bool = True) -> TextFeatures:
    """TextFeatures of `captions` under the model's frozen text layers: read from the workspace when
    they were computed before, else computed now and stored there."""
    captions = sorted(set(captions))
    key = model_features_key(model, with_words, captions)
    captions.sort(key=len)  # batches of similar length: little padding to encode
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(workspace_root) / FEATURES_DIR / f"{digest}.h5"
    if path.is_file():
        return TextFeatures(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _encode_to_file(model, tokenizer, captions, tmp, key, device, progress)
    os.replace(tmp, path)
    fsync_path(path.parent)
    return TextFeatures(path)


@torch.inference_mode()
def _encode_to_file(model, tokenizer, captions, tmp: Path, key: dict, device, progress: bool) -> None:
    was_training = model.training
    model.eval()
    pooled, tokens, token_ids, counts = [], [], [], []
    label = "frozen text encoder" if key["kind"] == "outputs" else f"{key['frozen_layers']} frozen text layers"
    with tqdm(total=len(captions), unit="caption", desc=f"encoding captions ({label}, once)",
              disable=not progress, dynamic_ncols=True, leave=False) as bar:
        for start in range(0, len(captions), ENCODE_BATCH):
            part = captions[start : start + ENCODE_BATCH]
            input_ids, attention_mask = (t.to(device) for t in tokenize(tokenizer, part, model.config.max_words))
            if key["kind"] == "prefix":
                hidden, kept = model.text_encoder.prefix(input_ids, attention_mask), attention_mask.bool()  # (B, L, H)
                token_ids.append(input_ids[kept].int().cpu().numpy())
            else:
                hidden, pooled_part = model.text_encoder(input_ids, attention_mask)  # (B, L, H), (B, H)
                pooled.append(pooled_part.float().cpu().numpy().astype(np.float16))
                kept = model.word_mask(input_ids, attention_mask) if key["words"] else torch.zeros_like(attention_mask, dtype=torch.bool)
            tokens.append(hidden[kept].float().cpu().numpy().astype(np.float16))  # (tokens kept in part, H)
            counts += kept.sum(1).tolist()
            bar.update(len(part))
    model.train(was_training)
    with h5py.File(tmp, "w") as f:
        if pooled:
            f.create_dataset("pooled", data=np.concatenate(pooled))
        f.create_dataset("tokens", data=np.concatenate(tokens))
        if token_ids:
            f.create_dataset("token_ids", data=np.concatenate(token_ids))
        f.create_dataset("offsets", data=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]))
        f.create_dataset("captions", data=np.array(captions, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.attrs["key"] = json.dumps(key, sort_keys=True)
        f.attrs["vlpcache_version"] = __version__
    fsync_path(tmp)
