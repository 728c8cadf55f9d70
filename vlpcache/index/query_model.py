"""The query side of a run from its ONNX export in the index directory: no torch, no transformers.

    <index>/query/text_encoder.onnx   encode_text: (input_ids, attention_mask) -> global, words
    <index>/query/rerank.onnx         RerankGraph: global + weight * S_loc and word attention
    <index>/query/tokenizer.json      the run's fast tokenizer
    <index>/query/query.json          checkpoint sha256, max_words, special token ids

Written by `vlpcache index` (query_graphs.export_query_model). Both query models answer
`encode(text) -> (global (1, E), words (1, L, E), word_mask (1, L), tokens)`,
`rescore(words, word_mask, text_global, regions, region_mask, video_global) -> [score, global, local, word_attention]`
and `unread(text)`: the end of a text past the `max_words` tokens the model reads ("" when it reads it all);
`unknown(text)`: the parts of a text its tokenizer reads as the unknown token, and how many tokens it knows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlpcache.captions import unknown_tokens
from vlpcache.devices import quota_threads
from vlpcache.index.layout import QUERY_DIR
from vlpcache.onnx_versions import too_new_said
from vlpcache.records import read_json, read_optional_json

TEXT_GRAPH = "text_encoder.onnx"
RERANK_GRAPH = "rerank.onnx"
TOKENIZER_FILE = "tokenizer.json"
QUERY_CONFIG = "query.json"


def query_export_sha(index_dir: Path) -> str | None:
    """The checkpoint sha256 the index's ONNX export was made from, or None when there is none."""
    config = read_optional_json(Path(index_dir) / QUERY_DIR / QUERY_CONFIG)
    return config.get("checkpoint_sha256") if isinstance(config, dict) else None


def unread_tail(text: str, offsets, special_mask) -> str:
    """The end of `text` after the last token a truncated encoding kept: offsets are each token's
    (start, end) characters in `text`, special_mask 1 for the tokens the tokenizer added ([CLS], [SEP])."""
    ends = [end for (_, end), special in zip(offsets, special_mask) if not special]
    return text[max(ends, default=0):].strip()


def unknown_parts(text: str, ids, words, offsets, special_mask, unk_id: int | None) -> tuple[list[str], int]:
    """The parts of `text` the text model knows nothing of (captions.unknown_tokens: its unknown token,
    [UNK], for "猫" or "🐶", or a word it spells out letter by letter, "человек"), each once, and how
    many of its tokens it knows."""
    read = [(i, word, span) for i, word, span, special in zip(ids, words, offsets, special_mask) if not special]
    flags = unknown_tokens([i for i, _, _ in read], [word for _, word, _ in read], [span for _, _, span in read], unk_id)
    spans: dict[int, tuple[int, int]] = {}  # word -> the characters of its unknown tokens
    for (_, word, (start, end)), unknown in zip(read, flags):
        if unknown and end > start:
            spans[word] = (spans.get(word, (start, end))[0], end)
    return list(dict.fromkeys(text[start:end] for start, end in spans.values())), flags.count(False)


def query_session(graph: Path, options, providers: list[str], otherwise: str = ""):
    """An onnxruntime session of one graph of the index's export; GraphTooNew where this onnxruntime cannot read
    its IR version or opset (an export a newer install made in a shared index folder), `otherwise` its other way
    out."""
    import onnxruntime as ort

    with too_new_said(str(graph), otherwise):
        return ort.InferenceSession(str(graph), options, providers=providers)


class OnnxQueryModel:
    def __init__(self, index_dir: Path):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        folder = Path(index_dir) / QUERY_DIR
        config = read_json(folder / QUERY_CONFIG, missing=f"{folder}: no {QUERY_CONFIG}; run `vlpcache index` again")
        self.special = np.array(config["special_token_ids"], dtype=np.int64)
        self.rwa = config["rwa"]
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        self.tokenizer.no_padding()
        self.max_words = config["max_words"]
        self.tokenizer.enable_truncation(self.max_words)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # no warnings about unused initialisers on every start
        # idle threads that spin between runs take the cores from the rest of the query (and from a
        # server's other requests): 33 -> 15 ms per search on 2 busy cores (bench/serve_latency.py)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads := quota_threads():  # within a cgroup's CPU quota (docker --cpus): onnxruntime knows none
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self.text, self.rerank = (query_session(folder / name, options, providers) for name in (TEXT_GRAPH, RERANK_GRAPH))

    def encode(self, text: str):
        encoding = self.tokenizer.encode(text)
        input_ids = np.array([encoding.ids], dtype=np.int64)  # (1, L)
        attention_mask = np.array([encoding.attention_mask], dtype=np.int64)
        global_, words = self.text.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})  # (1, E), (1, L, E)
        word_mask = attention_mask.astype(bool) & ~np.isin(input_ids, self.special)  # (1, L) real words
        return global_, words, word_mask, list(encoding.tokens)

    def unread(self, text: str) -> str:
        encoding = self.tokenizer.encode(text)
        return unread_tail(text, encoding.offsets, encoding.special_tokens_mask) if encoding.overflowing else ""

    def unknown(self, text: str) -> tuple[list[str], int]:
        encoding = self.tokenizer.encode(text)
        unk = getattr(self.tokenizer.model, "unk_token", None)
        unk_id = self.tokenizer.token_to_id(unk) if unk else None
        return unknown_parts(text, encoding.ids, encoding.word_ids, encoding.offsets, encoding.special_tokens_mask,
                             unk_id)

    def rescore(self, words, word_mask, text_global, regions, region_mask, video_global):
        feeds = dict(zip(
            ["words", "word_mask", "text_global", "regions", "region_mask", "video_global"],
            [np.ascontiguousarray(words, np.float32), np.ascontiguousarray(word_mask, bool),
             np.ascontiguousarray(text_global, np.float32), np.ascontiguousarray(regions, np.float32),
             np.ascontiguousarray(region_mask, bool), np.ascontiguousarray(video_global, np.float32)],
        ))
        return self.rerank.run(None, feeds)
