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
    """Which region each query word attends to (function words and punctuation left out), and the frame
    where those words find their regions: of the frames that hold the most of those regions (so that the
    frame a card shows has a matched box on it), the one whose best region per word weighs most, summed
    over the words. A one-word query's frame is the frame of its region (the frame with most attention
    in all favoured one with many weak regions), and function words, spread over every region, never
    choose it.

    attention (L, K): each word's attention over the video's K stored regions (rows of real words
    sum to 1); positions (K,): each region's place r = t*N + n in the T x N grid, -1 for padding.
    """
    matches = []
    words_of_query = query_words(tokens, word_mask)
    content = [(w, p) for w, p in words_of_query  # punctuation ("'", ",", "=") names nothing either
               if w.lower() not in FUNCTION_WORDS and any(c.isalnum() for c in w)] or words_of_query
    weights = np.stack([attention[places].mean(0) for _, places in content]) if content else np.zeros((0, len(positions)))
    for (text, _), word_weights in zip(content, weights):  # (K,) each
        k = int(word_weights.argmax())
        region = int(positions[k])
        matches.append(WordMatch(text, region, region // regions_per_frame, float(word_weights[k])))
    real = positions >= 0  # (K,)
    frames = positions[real] // regions_per_frame  # (K_real,) each real region's frame
    if not len(content) or not len(frames):
        return Alignment(0, matches)
    per_frame = np.full((len(content), int(frames.max()) + 1), -np.inf)  # (W, T) each word's best region per frame
    np.maximum.at(per_frame, (slice(None), frames), weights[:, real])
    score = np.where(np.isfinite(per_frame), per_frame, 0).sum(0)  # (T,)
    held = np.bincount([m.frame for m in matches if m.region >= 0], minlength=len(score))[: len(score)]  # (T,)
    score = np.where(held == held.max(), score, -np.inf)
    return Alignment(int(score.argmax()) if np.any(score > 0) else 0, matches)
