"""A frozen text encoder's outputs, computed once per (text model, captions) and read by every epoch.

With `--trainable-layers 0` nothing of the text encoder trains, so its output for a caption never
changes: pretraining encodes every training and validation caption once, stores the result in the
workspace, and an epoch costs only the region encoder. Runs on the same captions with the same text
model share the file.

    <workspace>/text-features/<key>.h5
        pooled     (C, H) float16   the encoder's pooled output of each caption
        words      (W, H) float16   hidden states of each caption's real words (special tokens left
                                    out), caption after caption; only when region-word alignment needs them
        offsets    (C+1,) int64     caption c owns words[offsets[c]:offsets[c+1]]
        captions   (C,) UTF-8       the caption texts, in row order
    attrs: key (what the features depend on, as JSON), vlpcache version

The key hashes the text model's identity (its name, or its directory's weight files), the pooling,
the caption length limit and the caption texts; a file is written under a temporary name and
renamed when complete, so a kill -9 never leaves a file that is taken for whole.
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
    """Cached encoder outputs of a list of captions, looked up by caption text."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with h5py.File(self.path, "r") as f:
            self.pooled = f["pooled"][:]  # (C, H) float16
            self.words = f["words"][:] if "words" in f else None  # (W, H) float16
            self.offsets = f["offsets"][:]  # (C+1,)
            captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in f["captions"][:]]
        self.row_of = {caption: row for row, caption in enumerate(captions)}

    def __len__(self) -> int:
        return len(self.row_of)

    def pooled_of(self, rows: list[int]) -> torch.Tensor:
        """(B, H) the pooled outputs of captions `rows`."""
        return torch.from_numpy(self.pooled[rows].astype(np.float32))

    def words_of(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, L, H) of captions `rows`' real words, padded, and word_mask (B, L); an empty word
        axis when the file holds no words."""
        counts = [int(self.offsets[r + 1] - self.offsets[r]) for r in rows] if self.words is not None else [0] * len(rows)
        hidden = np.zeros((len(rows), max(counts + [1]), self.pooled.shape[1]), np.float32)
        word_mask = np.zeros(hidden.shape[:2], bool)
        for b, (row, count) in enumerate(zip(rows, counts)):
            hidden[b, :count] = self.words[self.offsets[row] : self.offsets[row] + count] if count else 0
            word_mask[b, :count] = True
        return torch.from_numpy(hidden), torch.from_numpy(word_mask)

    def model_inputs(self, captions: list[str], word_captions: list[str]) -> dict[str, torch.Tensor]:
        """AlignmentModel inputs for cached text: text_pooled of `captions`, text_hidden and word_mask of
        `word_captions`."""
        hidden, word_mask = self.words_of([self.row_of[c] for c in word_captions])
        return {"text_pooled": self.pooled_of([self.row_of[c] for c in captions]), "text_hidden": hidden, "word_mask": word_mask}


def features_key(text_model: str, pooling: str, max_words: int, with_words: bool, captions: list[str]) -> dict:
    return {
        "text_model": text_model_identity(text_model),
        "pooling": pooling,
        "max_words": max_words,
        "words": with_words,
        "captions_sha256": hashlib.sha256("\n".join(captions).encode()).hexdigest(),
    }


def cached_text_features(model, tokenizer, captions: list[str], workspace_root: Path, with_words: bool,
                         device: torch.device, progress: bool = True) -> TextFeatures:
    """TextFeatures of `captions` under the model's (frozen) text encoder: read from the workspace when
    they were computed before, else computed now and stored there."""
    captions = sorted(set(captions))
    config = model.config
    key = features_key(config.text_model, config.text_pooling, config.max_words, with_words, captions)
    captions.sort(key=len)  # batches of similar length: little padding to encode
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(workspace_root) / FEATURES_DIR / f"{digest}.h5"
    if path.is_file():
        return TextFeatures(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _encode_to_file(model, tokenizer, captions, tmp, key, with_words, device, progress)
    os.replace(tmp, path)
    fsync_path(path.parent)
    return TextFeatures(path)


@torch.inference_mode()
def _encode_to_file(model, tokenizer, captions, tmp: Path, key: dict, with_words: bool, device, progress: bool) -> None:
    was_training = model.training
    model.eval()
    width = model.text_encoder.width
    pooled = np.zeros((len(captions), width), np.float16)
    words, counts = [], []
    with tqdm(total=len(captions), unit="caption", desc="encoding captions (frozen text encoder, once)",
              disable=not progress, dynamic_ncols=True, leave=False) as bar:
        for start in range(0, len(captions), ENCODE_BATCH):
            part = captions[start : start + ENCODE_BATCH]
            input_ids, attention_mask = tokenize(tokenizer, part, model.config.max_words)
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            hidden, pooled_part = model.text_encoder(input_ids, attention_mask)  # (B, L, H), (B, H)
            pooled[start : start + len(part)] = pooled_part.float().cpu().numpy()
            if with_words:
                mask = model.word_mask(input_ids, attention_mask)  # (B, L)
                words.append(hidden[mask].float().cpu().numpy().astype(np.float16))  # (words in part, H)
                counts += mask.sum(1).tolist()
            bar.update(len(part))
    model.train(was_training)
    with h5py.File(tmp, "w") as f:
        f.create_dataset("pooled", data=pooled)
        if with_words:
            f.create_dataset("words", data=np.concatenate(words) if words else np.zeros((0, width), np.float16))
        f.create_dataset("offsets", data=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]) if with_words
                         else np.zeros(len(captions) + 1, np.int64))
        f.create_dataset("captions", data=np.array(captions, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.attrs["key"] = json.dumps(key, sort_keys=True)
        f.attrs["vlpcache_version"] = __version__
    fsync_path(tmp)
