"""Reading a re-rank: which regions matched which query words, and the best-matching frame.

Torch-free (numpy only), so that `vlpcache search` answers without importing torch; the scores
themselves come from vlpcache.index.query_graphs (the model package's functions, run by torch or
as their ONNX export).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# words the model does read, but whose attended region tells a reader nothing ("a -> person")
FUNCTION_WORDS = frozenset(
    "a an the this that these those is are was were be been being am of in on at to into onto for with "
    "without by from as and or but while his her its their my your our it he she they them there here "
    "some very just".split()
)


@dataclass
class WordMatch:
    word: str
    region: int  # flattened frame-major index r = t*N + n
    frame: int  # t = r // N
    weight: float  # the word's attention on that region, in [0, 1]


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


def align(attention: np.ndarray, word_mask: np.ndarray, tokens: list[str], positions: np.ndarray,
          regions_per_frame: int) -> Alignment:
    """Which region each query word attends to (function words left out), and the frame that holds
    most of the attention of those same words (function words spread theirs over every region, so
    counting them favoured the frame with the most detections over the one the content words chose).

    attention (L, K): each word's attention over the video's K stored regions (rows of real words
    sum to 1); positions (K,): each region's place r = t*N + n in the T x N grid, -1 for padding.
    """
    matches = []
    words_of_query = query_words(tokens, word_mask)
    content = [(w, p) for w, p in words_of_query if w.lower() not in FUNCTION_WORDS] or words_of_query
    for text, places in content:
        weights = attention[places].mean(0)  # (K,)
        k = int(weights.argmax())
        region = int(positions[k])
        matches.append(WordMatch(text, region, region // regions_per_frame, float(weights[k])))
    real = positions >= 0  # (K,)
    chosen = [p for _, places in content for p in places]  # token rows of the matched words
    # attention of the matched words summed per region (K_real,), then per frame (T,)
    mass = np.bincount(positions[real] // regions_per_frame, weights=attention[chosen][:, real].sum(0))
    return Alignment(int(mass.argmax()) if len(mass) and mass.any() else 0, matches)
