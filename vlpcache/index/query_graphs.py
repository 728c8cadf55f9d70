"""The query side of a run as torch modules, and their ONNX export for a fast `vlpcache search`.

`TextGraph` and `RerankGraph` call the model package's own functions (encode_text, the region-word
alignment, rerank_score); search runs them either directly (TorchQueryModel) or as ONNX graphs
exported from them at index time (query_model.OnnxQueryModel), which starts in about a second
instead of the several that importing torch and transformers costs. One definition, two runtimes.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlpcache.devices import encoding_threads
from vlpcache.index.query_model import (
    QUERY_CONFIG,
    QUERY_DIR,
    RERANK_GRAPH,
    TEXT_GRAPH,
    TOKENIZER_FILE,
    query_session,
    unknown_parts,
    unread_tail,
)
from vlpcache.model.batch import tokenize
from vlpcache.model.losses import region_word_alignment, region_word_score, rerank_score
from vlpcache.records import write_json


class TextGraph(nn.Module):
    """(input_ids (B, L), attention_mask (B, L)) -> global (B, E), words (B, L, E)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        text = self.model.encode_text(input_ids, attention_mask)
        return text.global_, text.words


class RerankGraph(nn.Module):
    """One query against P candidates: global + weight * S_loc, its parts, and each word's attention.

    words (1, L, E), word_mask (1, L), text_global (1, E), regions (P, K, E), region_mask (P, K),
    video_global (P, E) -> score, global, local (1, P) and word_attention (1, P, L, K).
    """

    def __init__(self, lam: float, weight: float):
        super().__init__()
        self.lam, self.weight = lam, weight

    def forward(self, words, word_mask, text_global, regions, region_mask, video_global):
        # the query (1, 1, L, E) against every candidate (1, P, K, E): pairs.score (1, P), word_attention (1, P, L, K)
        pairs = region_word_alignment(words[:, None], word_mask[:, None], regions[None], region_mask[None], self.lam)
        global_ = text_global @ video_global.T  # (1, P)
        return rerank_score(global_, pairs.score, self.weight), global_, pairs.score, pairs.word_attention


@dataclass
class Rescored:
    score: torch.Tensor  # (Bt, Bv) global + weight * S_loc
    global_: torch.Tensor  # (Bt, Bv) cosine of the global embeddings
    local: torch.Tensor  # (Bt, Bv) S_loc


def rerank_scores(config, words, word_mask, text_global, regions, region_mask, video_global) -> Rescored:
    """Every text (Bt) against every video (Bv), for eval: words (Bt, L, E), regions (Bv, R, E), globals (B, E)."""
    global_ = text_global.float() @ video_global.float().T  # (Bt, Bv)
    local = region_word_score(words.float(), word_mask, regions.float(), region_mask, config.rwa_lambda)  # (Bt, Bv)
    return Rescored(rerank_score(global_, local, config.rerank_weight), global_, local)


def special_token_ids(run) -> list[int]:
    return [int(i) for i in run.model.special_token_ids.tolist()]


class TorchQueryModel:
    """The query side run by torch: the fallback when an index has no ONNX export."""

    def __init__(self, run):
        self.run = run
        self.device = next(run.model.parameters()).device
        self.rerank = RerankGraph(run.config.rwa_lambda, run.config.rerank_weight)
        self.special = special_token_ids(run)
        self.rwa = run.config.rwa
        self.max_words = run.config.max_words

    def unread(self, text: str) -> str:
        if len(self.run.tokenizer(text, verbose=False)["input_ids"]) <= self.max_words:
            return ""
        kept = self.run.tokenizer(text, truncation=True, max_length=self.max_words, return_offsets_mapping=True,
                                  return_special_tokens_mask=True)
        return unread_tail(text, kept["offset_mapping"], kept["special_tokens_mask"])

    def unknown(self, text: str) -> tuple[list[str], int]:
        read = self.run.tokenizer(text, truncation=True, max_length=self.max_words, return_offsets_mapping=True,
                                  return_special_tokens_mask=True)
        return unknown_parts(text, read["input_ids"], read.word_ids(), read["offset_mapping"], read["special_tokens_mask"],
                             self.run.tokenizer.unk_token_id)

    @torch.inference_mode()
    def encode(self, text: str):
        input_ids, attention_mask = tokenize(self.run.tokenizer, [text], self.run.config.max_words)  # (1, L) each
        with encoding_threads():
            global_, words = TextGraph(self.run.model)(input_ids.to(self.device), attention_mask.to(self.device))  # (1, E), (1, L, E)
        word_mask = attention_mask.bool().numpy() & ~np.isin(input_ids.numpy(), self.special)  # (1, L) real words
        tokens = self.run.tokenizer.convert_ids_to_tokens(input_ids[0].tolist())
        return global_.float().cpu().numpy(), words.float().cpu().numpy(), word_mask, tokens

    @torch.inference_mode()
    def rescore(self, words, word_mask, text_global, regions, region_mask, video_global):
        with encoding_threads():
            outputs = self.rerank(*(torch.from_numpy(np.ascontiguousarray(x)) for x in
                                    (words, word_mask, text_global, regions, region_mask, video_global)))
        return [o.numpy() for o in outputs]


def export_query_model(run, index_dir: Path) -> Path:
    """Write index_dir/query/: text encoder and re-rank graph as ONNX, the tokenizer, and query.json."""
    backend = getattr(run.tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"the tokenizer of {run.run_dir} is not a fast (tokenizers) one")
    out = Path(index_dir) / QUERY_DIR
    tmp = out.with_name(f".{QUERY_DIR}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:  # a failed export (disk full) leaves no half-written folder behind
        model = run.model.cpu()
        E = run.config.embed_dim
        ids, mask = tokenize(run.tokenizer, ["a person slicing"], run.config.max_words)  # (1, L): this model's tokens
        dims = {"input_ids": {0: "B", 1: "L"}, "attention_mask": {0: "B", 1: "L"}, "global": {0: "B"}, "words": {0: "B", 1: "L"}}
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # the legacy exporter's deprecation and tracer notes concern shapes held fixed here by design
            warnings.simplefilter("ignore")
            torch.onnx.export(TextGraph(model).eval(), (ids, mask), tmp / TEXT_GRAPH, dynamo=False,
                              input_names=["input_ids", "attention_mask"], output_names=["global", "words"],
                              dynamic_axes=dims, opset_version=17)
            example = (torch.randn(1, 4, E), torch.ones(1, 4, dtype=torch.bool), torch.randn(1, E),
                       torch.randn(3, 5, E), torch.ones(3, 5, dtype=torch.bool), torch.randn(3, E))
            names = ["words", "word_mask", "text_global", "regions", "region_mask", "video_global"]
            dims = {"words": {1: "L"}, "word_mask": {1: "L"}, "regions": {0: "P", 1: "K"}, "region_mask": {0: "P", 1: "K"},
                    "video_global": {0: "P"}, "score": {1: "P"}, "global": {1: "P"}, "local": {1: "P"},
                    "word_attention": {1: "P", 2: "L", 3: "K"}}
            torch.onnx.export(RerankGraph(run.config.rwa_lambda, run.config.rerank_weight), example, tmp / RERANK_GRAPH,
                              dynamo=False, input_names=names, output_names=["score", "global", "local", "word_attention"],
                              dynamic_axes=dims, opset_version=17)
        backend.save(str(tmp / TOKENIZER_FILE))
        write_json(tmp / QUERY_CONFIG, {
            "checkpoint_sha256": run.checkpoint_sha256,
            "max_words": run.config.max_words,
            "special_token_ids": special_token_ids(run),
            "rwa": run.config.rwa,
            "embed_dim": E,
        })
        _check_text_graph(run, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


CHECK_QUERIES = ("dog", "a person is slicing an onion in a small kitchen while a child watches")


def _check_text_graph(run, folder: Path) -> None:
    """Raise unless the exported text graph embeds queries of other lengths than the one it was traced
    with as the model does: a text model whose forward bakes a traced length into the graph would
    otherwise give search other embeddings than the index's model, silently."""
    # one line, not a traceback, where this torch exports a graph newer than this onnxruntime reads
    session = query_session(folder / TEXT_GRAPH, None, ["CPUExecutionProvider"], f"an older torch than {torch.__version__}")
    for query in CHECK_QUERIES:
        input_ids, attention_mask = tokenize(run.tokenizer, [query], run.config.max_words)  # (1, L) each
        with torch.no_grad():
            expected = run.model.encode_text(input_ids, attention_mask).global_.float().numpy()  # (1, E)
        got = session.run(["global"], {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})[0]
        if not np.allclose(got, expected, atol=1e-4):
            raise ValueError(f"the exported text graph embeds {query!r} otherwise than the model does "
                             f"(max difference {float(np.abs(got - expected).max()):.3g})")
