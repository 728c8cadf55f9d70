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
                                    every token of each caption; caption after caption; contiguous,
                                    read through a memory map (the largest by far: ~9 kB a caption)
        token_ids  (W,) int32       prefix: the tokens' ids
        offsets    (C+1,) int64     caption c owns tokens[offsets[c]:offsets[c+1]]
        captions   (C,) UTF-8       the caption texts, in row order
    attrs: key (what the features depend on, as JSON), vlpcache version

The key hashes the kind, the text model's identity (its name, or its directory's weight files), the
number of frozen layers, the pooling, the caption length limit and the caption texts; a file is
written under a temporary name and renamed when complete (files.replace_atomically), so a kill -9
never leaves a file that is taken for whole.

Millions of captions take hours to encode, so the work is kept as it goes: the captions are encoded
PART_CAPTIONS at a time (in a fixed order, shortest first) and each part is written whole to
<key>.parts/part-NNNNNN.npz (N: the part's place in that order) before the next starts. A Ctrl-C, a
kill -9 or a full disk loses only the part in progress; the next run encodes the parts that are
missing, then joins them into the .h5 one part at a time (memory: one part) and removes the folder.
One process encodes a key at a time (<key>.lock); another waits for it and reads its file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch

from vlpcache import __version__
from vlpcache.cache.schema import HDF5_FORMAT
from vlpcache.files import (file_sha256, folder_bytes, is_write_failure, not_allowed, remove_temporaries,
                            replace_atomically, system_reason, write_failure)
from vlpcache.interrupts import stop_if_interrupted
from vlpcache.locks import LOCK_SUFFIX, WriterLock, holder_description
from vlpcache.model.batch import tokenize
from vlpcache.report import human_size, progress_bar

FEATURES_DIR = "text-features"
ENCODE_BATCH = 256
PART_CAPTIONS = 16384  # captions encoded and kept together: half a minute of MiniLM on a CPU core


def text_model_identity(name_or_dir: str) -> str:
    """A Hugging Face name as given, or a local directory by the sha256 of its weight files; "" (a run's record of
    the default model) the default model's directory, never the current one's files, which Path("") names."""
    if not name_or_dir:
        from vlpcache.model.model import default_text_model

        name_or_dir = default_text_model()
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
            self.tokens = _mapped(self.path, f["tokens"]) if "tokens" in f else None  # (W, H) float16
            self.token_ids = f["token_ids"][:] if "token_ids" in f else None  # (W,)
            self.offsets = f["offsets"][:]  # (C+1,)
            captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in f["captions"][:]]
        self.width = (self.pooled if self.pooled is not None else self.tokens).shape[1]
        self.row_of = {caption: row for row, caption in enumerate(captions)}

    def __getstate__(self) -> dict:  # to a loader worker: the path, not a copy of the mapped tokens
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

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


def _mapped(path: Path, dataset: h5py.Dataset) -> np.ndarray:
    """A contiguous, unfiltered dataset as a read-only memory map of its file: the system reads the pages
    that batches touch and may drop them again, so the token states of millions of captions (tens of GB)
    need not fit in memory. Any other layout is read whole."""
    offset = dataset.id.get_offset()
    if dataset.chunks is None and dataset.compression is None and offset is not None:
        return np.memmap(path, dataset.dtype, "r", offset, dataset.shape)
    return dataset[:]


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
        # as JSON: joined by newlines, ["a\nb"] and ["a", "b"] (captions may hold newlines) were one set
        "captions_sha256": hashlib.sha256(json.dumps(captions, ensure_ascii=False).encode()).hexdigest(),
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
                         device: torch.device, progress: bool = True,
                         say: Callable[[str], None] | None = None, fallback_root: Path | None = None,
                         go_on: str = "run the same command again to go on") -> TextFeatures:
    """TextFeatures of `captions` under the model's frozen text layers: read from the workspace when
    they were computed before, else computed now (resuming the parts a stopped run kept) and stored
    there, or in `fallback_root` (the run's folder) where this user may not write the workspace (another
    user's, shared read-only). `say` gets a line when this resumes, waits for another process or falls back;
    `go_on`, the end of the line of a write that fails: how to go on once there is room."""
    if not captions:
        raise ValueError("cached_text_features: no captions to encode")
    captions = sorted(set(captions))
    key = model_features_key(model, with_words, captions)
    captions.sort(key=len)  # batches of similar length: little padding to encode
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(workspace_root) / FEATURES_DIR / f"{digest}.h5"
    if isinstance(features := _open(path), TextFeatures):
        _remove_joined_parts(path)
        return features
    say = say or (lambda line: None)
    lock_path = path.with_suffix(LOCK_SUFFIX)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = WriterLock.take(lock_path)
    except OSError as err:
        if fallback_root is None or not not_allowed(err):
            raise
        say(f"note: cannot write the caption features in {path.parent} ({system_reason(err)}): they are kept in "
            f"{Path(fallback_root) / FEATURES_DIR} instead")
        return cached_text_features(model, tokenizer, captions, fallback_root, with_words, device, progress, say,
                                    go_on=go_on)
    if lock is None:
        say(f"waiting for {holder_description(lock_path)}, which is encoding the same captions")
        lock = WriterLock.take(lock_path, wait=True)
    with lock:
        features = _open(path)  # the process waited for may have written it
        if isinstance(features, str):
            say(f"{path}: unreadable ({features}); encoding the captions again")
            path.unlink()
        if not isinstance(features, TextFeatures):
            _encode(model, tokenizer, captions, path, key, device, progress, say, go_on)
    return TextFeatures(path)


def _remove_joined_parts(path: Path) -> None:
    """The parts of a file joined already, which a kill between the join and their removal left (as
    large as the file; no later run would enter _encode to remove them). Under the lock, unless a writer
    holds it."""
    parts = path.with_suffix(".parts")
    if not parts.is_dir():
        return
    lock = WriterLock.take(path.with_suffix(LOCK_SUFFIX))
    if lock is not None:
        with lock:
            if isinstance(_open(path), TextFeatures):
                shutil.rmtree(parts, ignore_errors=True)


def _open(path: Path) -> TextFeatures | str | None:
    """The features stored at `path`; None when there is no file; why it cannot be read when it is damaged."""
    if not path.is_file():
        return None
    try:
        return TextFeatures(path)
    except (OSError, KeyError, ValueError) as err:
        return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _encode(model, tokenizer, captions: list[str], path: Path, key: dict, device, progress: bool,
            say: Callable[[str], None], go_on: str) -> None:
    """Encode the parts of `captions` that no earlier run kept, then join every part into `path`."""
    parts = path.with_suffix(".parts")
    if others := _others_text(path):
        say(others)
    parts.mkdir(exist_ok=True)
    remove_temporaries(parts)
    spans = [(start, min(start + PART_CAPTIONS, len(captions))) for start in range(0, len(captions), PART_CAPTIONS)]
    files = [parts / f"part-{number:06d}.npz" for number in range(len(spans))]
    for leftover in path.parent.glob(f".{path.name}.*tmp*"):  # of a join that a kill stopped
        leftover.unlink(missing_ok=True)
    done = [_part_span(f) == span for f, span in zip(files, spans)]
    kept = sum(stop - start for (start, stop), d in zip(spans, done) if d)
    if kept:
        rest = f"encoding the other {len(captions) - kept}" if kept < len(captions) else "joining them"
        say(f"resuming: {kept} of the {len(captions)} captions were encoded by a run that did not finish "
            f"(kept in {parts}); {rest}")
    label = "frozen text encoder" if key["kind"] == "outputs" else f"{key['frozen_layers']} frozen text layers"
    room_checked = kept > 0 and _say_if_short_of_room(path, files, spans, say)
    try:
        with progress_bar(total=len(captions), unit="caption", desc=f"encoding captions ({label}, once)",
                          disable=not progress, leave=False) as bar:
            bar.update(kept)
            for file, (start, stop), finished in zip(files, spans, done):
                if not finished:
                    arrays = _encode_part(model, tokenizer, captions[start:stop], key, device, bar)
                    arrays["start"] = np.array(start, np.int64)
                    replace_atomically(file, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")
                    room_checked = room_checked or _say_if_short_of_room(path, files, spans, say)
        replace_atomically(path, lambda tmp: _join(files, captions, tmp, key), suffix=".h5")
    except Exception as err:
        if not is_write_failure(err):
            raise
        kept = sum(stop - start for file, (start, stop) in zip(files, spans) if _part_span(file) == (start, stop))
        raise write_failure(path.parent, err, f"the {kept} of {len(captions)} captions encoded so far are kept; "
                                              f"make room and {go_on}") from None
    shutil.rmtree(parts, ignore_errors=True)


def _say_if_short_of_room(path: Path, files: list[Path], spans: list[tuple[int, int]],
                          say: Callable[[str], None]) -> bool:
    """Once some parts are whole: say so in a line if what is still to be written (the other parts, then
    the joined file, as large as all of them, while they are still there) will not fit in the free space.
    Millions of captions take tens of GB and hours: better said now than at the join. True once checked."""
    whole = [(file.stat().st_size, stop - start) for file, (start, stop) in zip(files, spans)
             if _part_span(file) == (start, stop)]
    encoded = sum(count for _, count in whole)
    if not encoded:
        return False
    per_caption = sum(size for size, _ in whole) / encoded
    total = spans[-1][1]
    parts_left, joined = per_caption * (total - encoded), per_caption * total
    free = shutil.disk_usage(path.parent).free
    if parts_left + joined > free:
        say(f"{path.parent}: the encoded captions need about {human_size(parts_left + joined)} more "
            f"({human_size(parts_left)} for the parts still to encode, then {human_size(joined)} while they are "
            f"joined into one file), and {human_size(free)} is free there: make room before then, or the encoding "
            "stops at the first write that does not fit (what is encoded is kept, and a re-run goes on)")
    return True


def _others_text(path: Path) -> str | None:
    """What the folder holds besides `path` and its parts: the files (and kept parts) of other caption
    sets or text models, with their size; None when nothing. Said before a new encoding adds a file,
    since nothing else ever removes them."""
    others = [p for p in path.parent.iterdir()
              if p.suffix in (".h5", ".parts") and p.stem != path.stem and not p.name.startswith(".")]
    if not others:
        return None
    size = sum(folder_bytes(p) for p in others)
    sets = len({p.stem for p in others})  # a set being joined has its file and its parts
    return (f"{path.parent} also holds the caption features of {sets} other caption set(s) or text "
            f"model(s), {human_size(size)}: any that no run is encoding can be deleted (a run that needs it "
            "encodes it again)")


def _part_span(file: Path) -> tuple[int, int] | None:
    """Which captions a kept part holds (start, stop) in the encoding order; None when it is missing or
    unreadable."""
    try:
        with np.load(file) as data:
            start = int(data["start"])
            return start, start + len(data["counts"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


@torch.inference_mode()
def _encode_part(model, tokenizer, captions: list[str], key: dict, device, bar) -> dict[str, np.ndarray]:
    """The frozen layers' results for `captions`: tokens (their kept tokens, caption after caption),
    counts (tokens of each caption), pooled (outputs) or token_ids (prefix)."""
    was_training = model.training
    model.eval()
    pooled, tokens, token_ids, counts = [], [], [], []
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
        stop_if_interrupted()
    model.train(was_training)
    arrays = {"tokens": np.concatenate(tokens), "counts": np.array(counts, np.int64)}
    if pooled:
        arrays["pooled"] = np.concatenate(pooled)
    if token_ids:
        arrays["token_ids"] = np.concatenate(token_ids)
    return arrays


def _npz_shape(file: Path, name: str) -> tuple[int, ...]:
    """The shape of the array `name` in an .npz, read from its header (np.load reads the whole array)."""
    with zipfile.ZipFile(file) as archive, archive.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        return read_header[version](member)[0]


def _join(files: list[Path], captions: list[str], tmp: Path, key: dict) -> None:
    """The .h5 of every part, written one part at a time."""
    counts = []
    for file in files:
        with np.load(file) as data:
            counts.append(data["counts"])  # only the counts: reading a part's tokens loads them whole
            names = set(data.files)  # every part holds the same arrays
    width = _npz_shape(files[0], "tokens")[1]
    with_pooled, with_ids = "pooled" in names, "token_ids" in names
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts), dtype=np.int64)])
    with h5py.File(tmp, "w", libver=HDF5_FORMAT) as f:  # as the cache's shards: older h5py reads it
        tokens = f.create_dataset("tokens", (int(offsets[-1]), width), np.float16)
        pooled = f.create_dataset("pooled", (len(captions), width), np.float16) if with_pooled else None
        token_ids = f.create_dataset("token_ids", (int(offsets[-1]),), np.int32) if with_ids else None
        row = 0
        for file in files:
            with np.load(file) as data:
                n = len(data["counts"])
                span = slice(int(offsets[row]), int(offsets[row + n]))
                tokens[span] = data["tokens"]
                if pooled is not None:
                    pooled[row : row + n] = data["pooled"]
                if token_ids is not None:
                    token_ids[span] = data["token_ids"]
            row += n
        f.create_dataset("offsets", data=offsets)
        f.create_dataset("captions", data=np.array(captions, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.attrs["key"] = json.dumps(key, sort_keys=True)
        f.attrs["vlpcache_version"] = __version__
