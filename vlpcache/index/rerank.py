"""Re-ranking FAISS candidates by global + region-word score, and reading which regions matched which words.

Search and eval both call `rerank_scores`, which calls the model package's `region_word_score` and
`rerank_score`: the score that orders results is defined once, next to the loss that trains it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlpcache.model.losses import region_word_details, region_word_score, rerank_score

RERANK_CANDIDATES = 32  # FAISS candidates per query that the region-word score re-orders

# words the model does read, but whose attended region tells a reader nothing ("a -> person")
FUNCTION_WORDS = frozenset(
    "a an the this that these those is are was were be been being am of in on at to into onto for with "
    "without by from as and or but while his her its their my your our it he she they them there here "
    "some very just".split()
)


@dataclass
class Rescored:
    score: torch.Tensor  # (Bt, Bv) global + weight * S_loc
    global_: torch.Tensor  # (Bt, Bv) cosine of the global embeddings
    local: torch.Tensor  # (Bt, Bv) S_loc


def rerank_scores(config, words, word_mask, text_global, regions, region_mask, video_global) -> Rescored:
    """Every text (Bt) against every video (Bv): words (Bt, L, E), regions (Bv, R, E), globals (B, E)."""
    global_ = text_global.float() @ video_global.float().T  # (Bt, Bv)
    local = region_word_score(words.float(), word_mask, regions.float(), region_mask, config.rwa_lambda)  # (Bt, Bv)
    return Rescored(rerank_score(global_, local, config.rerank_weight), global_, local)


@dataclass
class WordMatch:
    word: str
    region: int  # flattened frame-major index r = t*N + n
    frame: int  # t = r // N
    weight: float  # the word's attention on that region, in [0, 1]
    score: float  # cos(word, its attended context of regions)


@dataclass
class Alignment:
    best_frame: int
    words: list[WordMatch]


def query_words(tokens: list[str], word_mask: np.ndarray) -> list[tuple[str, list[int]]]:
    """Real words of a query and their token positions; WordPiece continuations ("##ion") join the word before."""
    words: list[tuple[str, list[int]]] = []
    for position, (token, real) in enumerate(zip(tokens, word_mask)):
        if not real:
            continue
        if token.startswith("##") and words:
            text, positions = words[-1]
            words[-1] = (text + token[2:], positions + [position])
        else:
            words.append((token.lstrip("Ġ▁"), [position]))  # BPE / SentencePiece word-start marks
    return words


def align(config, words, word_mask, regions, region_mask, tokens: list[str], regions_per_frame: int) -> Alignment:
    """Which region each query word attends to (function words left out), and the frame that holds
    most of the attention of all words.

    words (L, E), word_mask (L,), regions (R, E), region_mask (R,) for one text and one video.
    """
    details = region_word_details(words.float(), word_mask, regions.float(), region_mask, config.rwa_lambda)
    attention = details.word_attention  # (L, R): rows of real words sum to 1
    matches = []
    words_of_query = query_words(tokens, word_mask.numpy())
    content = [(w, p) for w, p in words_of_query if w.lower() not in FUNCTION_WORDS]
    for text, positions in content or words_of_query:
        weights = attention[positions].mean(0)  # (R,)
        region = int(weights.argmax())
        matches.append(WordMatch(text, region, region // regions_per_frame, float(weights[region]),
                                 float(details.word_scores[positions].mean())))
    frames = attention.sum(0).reshape(-1, regions_per_frame).sum(1)  # (T,) attention mass per frame
    return Alignment(int(frames.argmax()) if len(matches) else 0, matches)
