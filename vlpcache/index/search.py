"""`vlpcache search TEXT`: text -> embedding -> FAISS top candidates -> region-word re-rank -> results
with the best-matching time and the regions that matched the query words.

The query model is the ONNX export that `vlpcache index` leaves in the index directory
(query_model.py): a search then never imports torch or transformers, and starts in about a second.
An index without it falls back to the run loaded with torch. Candidate regions come from the index's
region store, so no video is encoded at query time. Several queries (--queries FILE, or - for stdin)
share one process. `--like ID` asks instead for the items most like an indexed one: its stored embedding
is the query (Searcher.like).

`Searcher` is the Python API (`from vlpcache import Searcher`); the command and `vlpcache serve` use it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from vlpcache import report
from vlpcache.cache.labels import region_names
from vlpcache.cache.reader import DamagedShard, RegionCache
from vlpcache.cache.schema import FAILURE_DIR, MOVES_DIR, REMOVED_DIR, SHARD_DIR, SHARD_SUFFIX, detector_name
from vlpcache.captions import ids_like, item_named, left_out_kinds, model_text, model_text_origins, text_lines
from vlpcache.devices import DEFAULT_DEVICE, DEVICES, resolve_device
from vlpcache.errors import GraphTooNew, NotComparable, UserError, WriteFailed, user_message
from vlpcache.files import may_write, read_utf8_text, utf8_text
from vlpcache.locks import own_temporary_folder
from vlpcache.index.build import (calibrated, check_run_reads_cache, coverage, extracted_again, failed_again,
                                  index_of_run, missing_from_cache, new_index_line, open_cache, resolve_sources,
                                  update_index)
from vlpcache.index.export import export_embeddings
from vlpcache.index.faiss_index import VideoIndex
from vlpcache.index.layout import CALIBRATION_FILE, META_FILE, QUERYBANK_FILE, IndexConfig, index_dir_for
from vlpcache.index.query_model import OnnxQueryModel, query_export_sha
from vlpcache.index.rerank import Alignment, align
from vlpcache.metrics import RERANK_CANDIDATES
from vlpcache.model.run_layout import being_trained_note, designated_checkpoint_sha256, epoch_of, resolve_checkpoint
from vlpcache.querybank import bank_fits, bank_for
from vlpcache.records import read_optional_json
from vlpcache.report import Say, frame_time, place_text, printable, say
from vlpcache.report import say as report_say
from vlpcache.workspace import Workspace


# what describing a hit reads of its cached item; features, most of an item's bytes, are left on disk
HIT_ARRAYS = ("labels", "boxes", "timestamps")
# extract's records of the cache, taken up without a new index when they change (not the damaged rows'
# records, which readers write: this one's own would drop the hit it is showing)
CACHE_RECORD_DIRS = (MOVES_DIR, REMOVED_DIR, FAILURE_DIR)
# shards extract commits (items added, or extracted again: their hits are told so) are looked for at most this
# often: the cache is listed again then, which reads every shard's ids (seconds for millions of items)
SHARDS_LOOKED_EVERY_S = 10.0
EXAMPLE_QUERY = "person cuts onion"  # serve's suggestion where the run's captions give none
EXAMPLE_WORDS = (3, 6)  # a suggested caption's words, at least and at most
EXAMPLE_VIDEOS = 2000  # the first videos of the run's first caption file looked at for one
EXAMPLE_FILE_BYTES = 64 << 20  # a larger caption file is not read for a suggestion (CC3M's take minutes)
# --qbnorm's candidates at most (unless -k asks for more): 64 MB of 256-d embeddings gathered, where a loose bound would
# take every item of a million
NORMALISED_CANDIDATES = 65_536
# a hit extracted again since it was indexed (shown without matched regions: the index's are the old rows')
EXTRACTED_AGAIN = ("extracted again since it was indexed (its source changed): found by its old content, its regions "
                   "not shown; run `vlpcache index` to index it anew")
# whether a cached source (a file or frames folder) is no longer what its stamp recorded: (stamp, path) -> bool
SourceChanged = Callable[[str, str], bool]
# a --like hit's frame: its frames' likeness to the example is compared to this many decimals (float32's rounding
# of equal regions, an exact copy's, would choose among them)
LIKENESS_DECIMALS = 4
# --like of an item extracted again since it was indexed: the index's vector, the query, is of its old content
LIKED_EXTRACTED_AGAIN = ("was extracted again since it was indexed (its source changed): these are the items most like "
                         "its old content; run `vlpcache index` to index it anew")
# a hit whose file is no longer where it was extracted from (nor where a move record says it went)
GONE_HIT = ("its source is no longer there: found by what was cached; moved, `vlpcache extract NEW_ROOT` records where "
            "it went; deleted, `vlpcache extract ROOT --prune` drops such items from the cache")
# a hit whose source changed since it was extracted, and whose new file then failed to extract (the cache reads the
# old row, which the index holds too: its regions are shown, of the old content); the failure's reason follows
FAILED_AGAIN_HIT = "its source changed since it was extracted and the new file did not extract"
# a hit whose cached row does not read (the reader recorded it: extract redoes it, and search then leaves it out)
UNREADABLE_HIT = ("its cached regions cannot be read (the cache's shard is damaged: a disk fault or a bad copy), so none "
                  "are shown; recorded in the cache: the next `vlpcache extract` extracts it again")


def failed_again_hit(failure: dict, answers: str = "found by its old content, whose regions are shown") -> str:
    """FAILED_AGAIN_HIT with the failure's reason, what `answers` for the item, and what to do."""
    path = printable(str(failure.get("path", "its file")))
    return (f"{FAILED_AGAIN_HIT} ({printable(str(failure.get('reason', 'it failed')))}): {answers}; mend or replace "
            f"{path} and run `vlpcache extract` again (deleted, `vlpcache extract --prune` drops the item)")


def shows_cached_regions(outdated: str) -> bool:
    """Whether a hit with this Hit.outdated shows its cached row's regions and times: those of the content the index
    holds (most hits; a source gone or changed and failed since), not of a row extracted again or unreadable."""
    return not outdated or outdated == GONE_HIT or outdated.startswith(FAILED_AGAIN_HIT)


def unreadable_hit(damage: DamagedShard) -> str:
    """UNREADABLE_HIT, or where the reader could not record it (a cache this user may not write) what
    the cache's owner can do."""
    if not damage.unrecorded:
        return UNREADABLE_HIT
    return UNREADABLE_HIT.split("; recorded")[0] + (f"; it could not be recorded in the cache ({damage.unrecorded}): "
                                                     "its owner can move the damaged shard out and run `vlpcache "
                                                     "extract` again")


@dataclass
class RegionHit:
    word: str  # the query word
    label: str  # detector class of the region it attends to ("frame" = the whole-frame region)
    box: list[float]  # normalised x1, y1, x2, y2
    time: float  # seconds: timestamp of the region's frame
    weight: float  # the word's attention on this region
    frame: int  # index of the region's frame among the item's sampled frames


@dataclass
class Hit:
    rank: int
    id: str
    path: str
    score: float  # what the ranking used: global + weight * S_loc after re-rank, QB-Norm's β·s − log Z, else global cosine
    global_score: float
    local_score: float | None  # S_loc; None without re-rank
    time: float | None  # the best-matching frame's time: seconds of a video, a frames folder's or photo's place 0, 1, ...
    regions: list[RegionHit] = field(default_factory=list)
    frame: int | None = None  # index of the best-matching frame among the item's sampled frames
    note: str = ""  # what went wrong decoding the item, kept anyway (e.g. a truncated video); "" for most
    # what is off with the hit: found by an older extraction of the item, or its cached row does not read
    # (UNREADABLE_HIT), both shown without regions; its source is gone (GONE_HIT), or changed and the new file did
    # not extract (FAILED_AGAIN_HIT); "" for most
    outdated: str = ""
    kind: str = "video"  # what the item was extracted from: "video", "frames" (a folder of a video's frames) or "image"


@dataclass
class EncodedQuery:
    global_: np.ndarray  # (1, E)
    words: np.ndarray  # (1, L, E)
    word_mask: np.ndarray  # (1, L) real words (no special or padding tokens)
    tokens: list[str]  # the L tokens


@dataclass
class Ranking:
    """The top of one query's candidates, best first."""

    rows: list[int]  # index rows
    score: np.ndarray  # (k,) what the order follows
    global_: np.ndarray  # (k,) cosine of the global embeddings
    local: np.ndarray | None  # (k,) S_loc; None without re-rank
    attention: np.ndarray  # (k, L, K) each word's attention over each candidate's stored regions
    positions: np.ndarray  # (k, K) each stored region's place t*N + n in its item, -1 for padding


class Searcher:
    """A run's query model, a region cache and its index, loaded once, for any number of queries.

        from vlpcache import Searcher
        s = Searcher(run=".vlpcache/runs/run-001", cache=".vlpcache/cache")  # index= optional
        hits = s.search("person cuts onion", k=10)  # list[Hit], best first
        hits[0].id, hits[0].score, hits[0].time, hits[0].regions[0].label

    Every location left out is the workspace's (.vlpcache/ or $VLPCACHE_WORKSPACE; the run is its
    latest). The index is built on first use. With the ONNX export `vlpcache index` leaves in the
    index, neither torch nor the run's weights are loaded. Safe to share between threads. When `vlpcache
    index` brings the index up to date meanwhile (videos extracted and indexed while a server runs), the
    next search takes it up (refresh).
    """

    def __init__(self, run=None, cache=None, index=None, *, device: str = DEFAULT_DEVICE, say: Say | None = say,
                 qbnorm: bool = False):
        self._attach(*open_parts(run, cache, index, device, say or report_say, qbnorm))  # None: stderr, as like_file

    @classmethod
    def from_parts(cls, query_model, cache: RegionCache, index: VideoIndex, index_dir: Path | None = None) -> "Searcher":
        """A Searcher over parts already loaded (a query model answering encode/rescore, see query_model.py)."""
        searcher = cls.__new__(cls)
        searcher._attach(query_model, cache, index, index_dir)
        return searcher

    def _attach(self, query_model, cache: RegionCache, index: VideoIndex, index_dir: Path | None,
                run_dir: Path | None = None) -> None:
        self.query_model, self.cache, self.index_dir = query_model, cache, index_dir
        self.run_dir = run_dir  # the run searched with (like_item finds the index's checkpoint in it), None: from_parts
        self.rerank_candidates = RERANK_CANDIDATES
        self._lock = threading.Lock()  # the cache's lazily opened HDF5 files and FAISS's thread setting are shared
        self._records = self._records_stamp()
        self._shards, self._shards_looked = self._shards_stamp(), time.monotonic()
        self._take(index, self._stamp())

    def _stamp(self) -> tuple | None:
        """Which index.json is in the index folder now (`vlpcache index` replaces it, a new inode, last of the index's
        files), and which of the files _take reads beside it, which `vlpcache index` writes after it: the query bank
        (`index --qbnorm` of an index up to date writes only the bank) and calibration.json (what a weak match is:
        a search between the two kept the old one until the next index change). The ONNX query model is not among
        them: it is the checkpoint's, which the index folder is of, and answers as the run loaded with torch does."""
        if self.index_dir is None:  # from_parts without a folder: nothing to take up
            return None
        try:
            found = (self.index_dir / META_FILE).stat()
        except OSError:
            return None
        return (found.st_ino, found.st_mtime_ns, *(file_stamp(self.index_dir / name)
                                                   for name in (QUERYBANK_FILE, CALIBRATION_FILE)))

    def _records_stamp(self) -> tuple:
        """The cache's records of moved, dropped and failed items as they are now: extract appends to them
        (a move recorded changes where an item's frames are, a failure whether its hits are outdated, and no
        index is written for either)."""
        found = []
        for name in CACHE_RECORD_DIRS:
            try:
                with os.scandir(self.cache.cache_dir / name) as entries:
                    for entry in entries:
                        stat = entry.stat()
                        found.append((name, entry.name, stat.st_size, stat.st_mtime_ns))
            except OSError:  # none recorded yet
                continue
        return tuple(sorted(found))

    def _shards_stamp(self) -> tuple:
        """The cache's committed shards as they are now (extract adds one as it commits it)."""
        try:
            with os.scandir(self.cache.cache_dir / SHARD_DIR) as entries:
                return tuple(sorted((entry.name, entry.stat().st_size) for entry in entries
                                    if entry.name.endswith(SHARD_SUFFIX)))
        except OSError:
            return ()

    def _take(self, index: VideoIndex, stamp) -> None:
        self.index, self._index_stamp = index, stamp
        bank = self.index_dir / QUERYBANK_FILE if self.index_dir is not None else None
        self.query_bank = bank_for(bank, index.ids) if bank is not None else None  # None: made for other rows, which
        # `vlpcache index` brings up to date
        self.__dict__.pop("unshown", None)
        self._kinds = None  # counted on first ask (kinds())
        calibration = read_optional_json(self.index_dir / CALIBRATION_FILE) if self.index_dir is not None else None
        weak_below = calibration.get("weak_below") if isinstance(calibration, dict) else None
        self.weak_below = float(weak_below) if isinstance(weak_below, (int, float)) else None
        # found by their old content: the regions the index holds are not the cached rows' any more
        self.extracted_again = set(extracted_again(index, self.cache))
        self.failed_again = failed_again(self.cache)  # found by their old content, whose rows the cache still reads
        # cached since it was built (a set difference: at each shard commit, in a request, over every cached id), and
        # extracted again since (the index's row is of the old content): what `vlpcache index` would encode
        self.unindexed = len(set(self.cache.ids).difference(index.ids)) + len(self.extracted_again)

    def refresh(self) -> bool:
        """Take up the index again if `vlpcache index` has written it since it was loaded (with the
        cache's shards, which the new rows come from); True when it did. An index caught halfway through
        being written is left for the next call; until then the one loaded answers."""
        stamp, records, shards = self._stamp(), self._records_stamp(), self._shards
        if time.monotonic() - self._shards_looked >= SHARDS_LOOKED_EVERY_S:  # a re-listing reads every shard's ids
            shards, self._shards_looked = self._shards_stamp(), time.monotonic()
        if (stamp is None or stamp == self._index_stamp) and records == self._records and shards == self._shards:
            return False
        with self._lock:
            if stamp is not None and self._index_stamp is not None and stamp[:2] == self._index_stamp[:2] \
                    and stamp != self._index_stamp:  # only the bank or calibration is new: the index loaded is the one
                index = self.index
            elif stamp is not None and stamp != self._index_stamp:
                try:
                    index = VideoIndex.load(self.index_dir)
                except (UserError, OSError, ValueError):
                    return False
            elif records != self._records or shards != self._shards:  # extract moved, dropped or added items
                index, stamp = self.index, self._index_stamp  # the same index: an item extracted again is told
            else:
                return False
            self.cache.refresh()
            self._records, self._shards = records, shards
            self._take(index, stamp)
        return True

    def __len__(self) -> int:
        return len(self.index)

    def kinds(self) -> dict[str, int]:
        """How many indexed items are videos, frames folders and photos (those the cache holds); counted once
        for each index and cache taken up, not on every page that asks."""
        with self._lock:
            if self._kinds is None:
                cache = self.cache
                self._kinds = dict(collections.Counter(cache.kinds[cache.index_of(i)] for i in self.index.ids if i in cache))
            return self._kinds

    @functools.cached_property
    def unshown(self) -> int:
        """How many indexed items the cache cannot show (counted once: the cache is read as it was opened)."""
        return missing_from_cache(self.index, self.cache)

    @property
    def epoch(self) -> int | None:
        """The epoch of the checkpoint that answers, as the index records it (None if it does not say)."""
        path = self.index.meta.checkpoint_path
        return epoch_of(Path(path).parent) if path else None  # .../epoch-0010/model.safetensors

    @property
    def model_label(self) -> str:
        """Which run and checkpoint answer, as the index records them: "run-001, epoch 10" ("" if it does not say)."""
        meta = self.index.meta
        name = Path(meta.run_dir).name if meta.run_dir else ""
        number = self.epoch
        return ", ".join(part for part in (name, f"epoch {number}" if number is not None else "") if part)

    def newer_checkpoint(self) -> str:
        """A note when the run's default checkpoint (the best by validation, else the last) is no longer
        the one answering: pretrain saved a better epoch since this index was built; "" for most."""
        run = Path(self.index.meta.run_dir) if self.index.meta.run_dir else None
        if run is None or designated_checkpoint_sha256(run) in (None, self.index.meta.checkpoint_sha256):
            return ""
        try:
            chosen = epoch_of(resolve_checkpoint(run))
        except UserError:  # its checkpoints removed meanwhile
            return ""
        return (f"{run.name}'s checkpoint is now epoch {chosen}, and epoch {self.epoch} answers here: restart "
                "`vlpcache serve` (or a new Searcher) to search with it")

    @functools.cached_property
    def example_query(self) -> str:
        """A short caption from the run's training captions, of a video in the index where one has such
        (what serve suggests, and the page's search box shows); EXAMPLE_QUERY where none can be read."""
        from vlpcache.captions import read_captions
        from vlpcache.model.run_layout import read_run_locations

        if not self.index.meta.run_dir:
            return EXAMPLE_QUERY
        try:
            files = read_run_locations(Path(self.index.meta.run_dir)).get("captions", [])
        except (UserError, OSError, AttributeError):  # gone, unreadable, or not a run's config
            return EXAMPLE_QUERY
        # the first file only, and not one that takes minutes to read for a hint
        if not files or not Path(files[0]).is_file() or Path(files[0]).stat().st_size > EXAMPLE_FILE_BYTES:
            return EXAMPLE_QUERY
        try:
            captions = read_captions(files[0])
        except (UserError, OSError):
            return EXAMPLE_QUERY
        short = []  # (not indexed, caption) of 3 to 6 words: an indexed video's first, else the first
        for item_id, texts in list(captions.by_id.items())[:EXAMPLE_VIDEOS]:
            for text in texts:
                words = " ".join(text.split()).rstrip(" .")  # Flickr's captions end in a tokenised " ."
                if EXAMPLE_WORDS[0] <= len(words.split()) <= EXAMPLE_WORDS[1] and len(words) <= 60:
                    short.append((item_id not in self.index, words))
        return min(short, key=lambda found: found[0])[1] if short else EXAMPLE_QUERY

    @property
    def can_rerank(self) -> bool:
        """Whether the run was trained with region-word alignment (re-ranking needs it)."""
        return bool(self.query_model.rwa)

    @property
    def max_words(self) -> int:
        """Tokens of a query the model reads ([CLS] and [SEP] included); the rest is left out."""
        return self.query_model.max_words

    def unread(self, query: str) -> str:
        """The end of `query` past the tokens the model reads, left out of the search ("" for most queries), as
        typed: the tags and character references in it too ("<b>run</b> fast", not "run fast")."""
        check_query(query)
        read, origins = model_text_origins(query)
        with self._lock:
            unread = self.query_model.unread(read)
        if not unread:
            return ""
        cut = len(read) - len(unread)  # the model's text ends with its unread part
        return query[origins[cut - 1][1] if cut else 0:].strip()  # from the end of the last character read

    def weak(self, hits: list[Hit]) -> bool:
        """Whether a query's best match is weaker than what 99 in 100 of the run's training captions find in
        this index (calibration.json, which `vlpcache index` writes): a collection that holds nothing like
        it, or words the model cannot read. False where the index has no calibration."""
        return self.weak_below is not None and bool(hits) and max(h.global_score for h in hits) < self.weak_below

    def unknown(self, query: str) -> list[str]:
        """The parts of `query` the text model does not know (read as its one unknown token, [UNK]: "猫",
        "🐶", or spelled out letter by letter: "человек"), each once; [] for most queries."""
        return self.unknown_and_known(query)[0]

    def unknown_and_known(self, query: str) -> tuple[list[str], int]:
        """unknown(query), and how many of its tokens the text model knows (0: its ranking says nothing); each part
        as typed, each way it was typed ("&#x732B;" and "猫" where the model read "猫" twice)."""
        check_query(query)
        read, origins = model_text_origins(query)
        with self._lock:
            unknown, known = self.query_model.unknown(read)
        typed = []
        for part in unknown:
            at = read.find(part)
            while at >= 0:
                typed.append(query[origins[at][0]:origins[at + len(part) - 1][1]])
                at = read.find(part, at + len(part))
        return list(dict.fromkeys(typed)), known

    def search(self, query: str, k: int = 10, rerank: bool = True, qbnorm: bool = False) -> list[Hit]:
        """The top k indexed items for one query, best first; re-ranked by region-word score when the
        run can (`rerank=False`: global similarity alone); `qbnorm`: every indexed item ranked by its
        query-bank normalisation instead, each hit's score the normalised one (the index's bank; no re-rank)."""
        check_query(query)
        check_k(k)
        typed, query = query.strip(), model_text(query)
        if not typed:
            raise UserError('empty query; give words to search for, e.g. "person cuts onion"')
        if (broken := next((c for c in typed if "\ud800" <= c <= "\udfff"), None)) is not None:
            # Python's stand-in for a byte of a command line that is not UTF-8 (or half of a UTF-16 pair)
            why = (f"the byte \\x{ord(broken) - 0xDC00:02x}: a terminal or file in another encoding, e.g. Latin-1"
                   if ord(broken) >= 0xDC80 else "half of a UTF-16 pair: half an emoji, cut from its other half")
            raise UserError(f'the query "{printable(typed)}" is not UTF-8 text ({why}); give it in UTF-8 (e.g. a '
                            "terminal with LANG=C.UTF-8)")
        # as typed: unknown_and_known reads it as the model does (model_text), once, not a second time over `query`
        if self.unknown_and_known(typed) == ([], 0):  # the model reads no token of it
            raise UserError(f'"{printable(typed)}" holds no words the text model reads (only {left_out_kinds(typed)}, '
                            'which it reads as nothing); give words to search for, e.g. "person cuts onion"')
        self.refresh()
        if qbnorm and self.query_bank is None:
            raise UserError("this index has no query bank for --qbnorm; run `vlpcache index --qbnorm` (or search --qbnorm) first")
        rerank = rerank and self.can_rerank and not qbnorm
        with self._lock:
            encoded = EncodedQuery(*self.query_model.encode(query))
            found = self._candidates(encoded.global_, max(k, self.rerank_candidates))  # the same candidates to
            # re-order whatever k: the same first hits
            if qbnorm and found:
                found = self._normalised_candidates(encoded, found, k)
            if not found:
                return []
            return self.describe(encoded, self.rank(encoded, found, k, rerank, qbnorm))

    def _candidates(self, vector: np.ndarray, wanted: int) -> list[int]:
        """The index rows of the `wanted` best items by FAISS's own scores with `vector` (1, E), best first, of those
        the cache can show: candidates no longer in it (an unreadable shard, or rebuilt without them) cannot be
        shown, so FAISS is asked for as many more, so that `wanted` are left."""
        pool = min(len(self.index), wanted + self.unshown)
        _, faiss_rows = self.index.search(vector, pool)  # (1, pool)
        return [int(r) for r in faiss_rows[0] if r >= 0 and self.index.ids[r] in self.cache][:wanted]

    def _normalised_candidates(self, query: EncodedQuery, rows: list[int], k: int) -> list[int]:
        """Candidates (`rows` and more, by global similarity) enough that QB-Norm's best k among them are its best k of
        every indexed item, as eval ranks them: the first hits whatever k, each scored on one scale. A hub query's
        score β·s − log Z of an item not among them is at most β·(the least s among them) − (the least log Z): more
        are taken until the k-th best score is above that, up to NORMALISED_CANDIDATES. (A query whose best item is no
        hub ranks by s itself.)"""
        bank, floor = self.query_bank, float(self.query_bank.log_norm.min())
        while True:
            found = np.asarray(rows, np.int64)
            exact = self._cosines(query.global_[0], found)  # (P,)
            if not bank.hubs[found[exact.argmax()]]:
                return rows
            scores = bank.beta * exact.astype(np.float64) - bank.log_norm[found]  # (P,) as normalise() gives them
            bound = bank.beta * float(exact.min()) - floor  # the most an item not taken can score
            if np.sort(scores)[-min(k, len(scores))] >= bound or len(rows) >= max(k, NORMALISED_CANDIDATES):
                return rows
            more = self._candidates(query.global_, min(4 * len(rows), max(k, NORMALISED_CANDIDATES)))
            if len(more) <= len(rows):  # every item the cache can show
                return rows
            rows = more

    def rank(self, query: EncodedQuery, rows: list[int], k: int, rerank: bool, qbnorm: bool = False) -> Ranking:
        """The best k of the candidate rows (FAISS's best first). Its first rerank_candidates are ordered by
        global + weight * S_loc when re-ranking, else by the global similarity; the candidates after them follow by
        global similarity, as eval ranks them: the first hits are the same whatever k. With `qbnorm` every candidate
        is ordered by the query bank's normalisation of the global similarity, whose scores (β·s − log Z, negative)
        are no cosines: a hit past the first rerank_candidates by cosine would show a higher score below them. The
        global similarity is the exact cosine of the stored embeddings (an approximate index's own scores only choose
        the candidates). The one place where a score is turned into an order."""
        rows = np.asarray(rows, np.int64)
        head = min(self.rerank_candidates, len(rows))
        exact = self._cosines(query.global_[0], rows)  # (P,)
        tail = head + np.argsort(-exact[head:], kind="stable")  # past the candidates re-ordered: global order
        if rerank:
            score, global_, local, attention, positions = self._rescored(query, rows)
            order = np.concatenate([np.argsort(-score[:head], kind="stable"), tail])[:k]
            final = np.where(order < head, score[order], global_[order]).astype(np.float32)
            return Ranking(rows[order].tolist(), final, global_[order], local[order], attention[order], positions[order])
        if qbnorm:  # a scale of its own (a log-softmax, not a cosine): every candidate ranks by it, one order
            by = self.query_bank.normalise(exact[None], rows[None])[0]  # (P,)
            order = np.argsort(-by, kind="stable")[:k]
        else:
            by, order = exact, np.concatenate([np.argsort(-exact[:head], kind="stable"), tail])[:k]
        final = by[order].astype(np.float32)
        _, global_, _, attention, positions = self._rescored(query, rows[order])  # what each hit shows: its regions
        return Ranking(rows[order].tolist(), final, global_, None, attention, positions)

    def _cosines(self, vector: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(P,) the exact cosine of `vector` (E,) with the stored embeddings of `rows` (P,): what a hit's global
        score is, whatever FAISS's own (an approximate index's quantised estimate) was."""
        return self.index.embeddings[rows] @ np.asarray(vector, np.float32)

    def _rescored(self, query: EncodedQuery, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """(score, global, S_loc, attention, positions) of candidate rows: (P,) x 3, (P, L, K), (P, K)."""
        regions, region_mask, positions = self.index.regions.gather(rows.tolist())  # (P, K, E), (P, K), (P, K)
        score, global_, local, attention = self.query_model.rescore(  # (1, P) x 3, (1, P, L, K)
            query.words, query.word_mask, query.global_, regions, region_mask, self.index.embeddings[rows])
        return score[0], global_[0], local[0], attention[0], positions

    def describe(self, query: EncodedQuery, ranking: Ranking) -> list[Hit]:
        """Hits for a ranking: the cached item of each row, its best frame and each word's region."""
        hits = []
        for rank, row in enumerate(ranking.rows, 1):
            j = rank - 1
            item_id = self.index.ids[row]
            item, note, outdated = self._shown(item_id)
            N = item["labels"].shape[1]
            alignment = align(ranking.attention[j], query.word_mask[0], query.tokens, ranking.positions[j], N)
            if not shows_cached_regions(outdated):
                alignment = Alignment(0, [])
            matched, names = [], region_names(self.cache.settings.detector)
            for match in alignment.words:
                t, n = divmod(match.region, N)
                matched.append(RegionHit(
                    match.word, names.of(item, t, n), [round(float(v), 3) for v in item["boxes"][t, n]],
                    frame_time(item["timestamps"][t]), round(match.weight, 3), t,
                ))
            hits.append(Hit(
                rank=rank, id=item_id, path=item["path"],
                score=float(ranking.score[j]),
                global_score=float(ranking.global_[j]),
                local_score=float(ranking.local[j]) if ranking.local is not None else None,
                time=frame_time(item["timestamps"][alignment.best_frame]),
                regions=matched,
                frame=alignment.best_frame,
                note=note,
                outdated=outdated,
                kind=item["kind"],
            ))
        return hits

    def _shown(self, item_id: str) -> tuple[dict, str, str]:
        """What a hit shows of an indexed item: its cached arrays (HIT_ARRAYS, path, kind), the note extract
        kept it with ("" for most), and what is off with it (Hit.outdated; "" for most)."""
        outdated = EXTRACTED_AGAIN if item_id in self.extracted_again else ""
        try:
            item, note = self.cache.get(item_id, HIT_ARRAYS), self.cache.note_of(item_id)
        except DamagedShard as damage:
            item, note, outdated = self.cache.blank(self.cache.index_of(item_id)), "", unreadable_hit(damage)
        if not outdated and item["path"] and not os.path.lexists(item["path"]):
            outdated = GONE_HIT  # its regions are shown: they are the cached ones, if on no picture
        if not outdated and (failure := self.failed_again.get(item_id)):
            outdated = failed_again_hit(failure)
        return item, note, outdated

    def indexed_item(self, key: str, on_disk: bool = False) -> str:
        """The id of the indexed item `key` names: its id, or as `inspect --render` takes one (a file name or
        path that ends in it, the end of exactly one id); else a UserError saying why (cached since the index
        was built, or the ids it comes close to; with `on_disk`, a file or folder of this machine the cache does
        not hold: the commands that add it. The command line's, for its user's own files; never the page's API,
        whose callers may not learn which files the server has)."""
        if not isinstance(key, str):
            raise UserError(f"an item id is text (str), not {type(key).__name__}")
        self.refresh()  # an item `vlpcache index` added since this Searcher last looked is named too
        item_id, several = (key, []) if key in self.index else item_named(key, self.index.ids)
        if item_id is not None and item_id not in self.cache and (gone := self.cache.left_out_line(item_id)):
            raise UserError(gone)  # dropped (extract --prune) since it was indexed: as text search leaves it out
        if item_id is not None:
            return item_id
        raise UserError(not_indexed_line(key, self.index.ids, self.cache, several, on_disk))

    def like(self, key: str, k: int = 10) -> list[Hit]:
        """The k indexed items most like an indexed one (`key` names it as indexed_item takes it), best first:
        its own video embedding is the query, ranked by cosine (global similarity; nothing to re-rank by: there
        are no query words), the item itself left out. Each hit's frame is the one whose regions are most like
        the item's regions."""
        check_k(k)
        item_id = self.indexed_item(key)  # up to date with the index on disk (refresh takes the lock itself)
        with self._lock:
            if item_id not in self.index:  # an index rebuilt without it in between
                raise UserError(not_indexed_line(key, self.index.ids, self.cache))
            row = self.index.row_of(item_id)
            example = None
            if self.index.regions is not None:
                regions, mask, _ = self.index.regions.gather([row])  # (1, K, E), (1, K)
                example = regions[0][mask[0]]  # (K_real, E)
            return self._ranked_like(self.index.embeddings[row], example, k, leave_out=row)

    def like_item(self, cache: RegionCache, item_id: str, k: int = 10, device: str = DEFAULT_DEVICE) -> list[Hit]:
        """The k indexed items most like item `item_id` of another cache of the same settings (a clip the
        collection does not hold, extracted on its own: `search --like FILE`), as like() ranks them. The item is
        encoded by the index's checkpoint (loaded on first use; torch)."""
        check_k(k)
        if item_id not in cache:
            raise UserError(f"\"{printable(str(item_id))}\" is not an item of the cache {cache.cache_dir}")
        from vlpcache.index.outside import encode_item

        global_, regions = encode_item(self.index.meta, cache, item_id, device, getattr(self.query_model, "run", None),
                                       self.run_dir)
        with self._lock:
            return self._ranked_like(global_, regions, k)

    def _ranked_like(self, vector: np.ndarray, example: np.ndarray | None, k: int, leave_out: int = -1) -> list[Hit]:
        """Hits of the indexed items by cosine with `vector` (E,), best first, but row `leave_out`; each hit's
        frame the one whose regions are most like `example` (K, E), the query item's real regions (None: 0).
        FAISS only chooses the candidates, as many as text search re-ranks or k (an approximate index's own scores
        and order are estimates: under IVF-PQ an exact copy scored 0.81, the others came in another order); their
        order and scores are the exact cosine of the stored embeddings, as rank() gives text search's."""
        wanted = max(k, self.rerank_candidates)
        pool = min(len(self.index), wanted + (leave_out >= 0) + self.unshown)  # the item itself, what the cache cannot show
        _, faiss_rows = self.index.search(np.asarray(vector, np.float32)[None], pool)  # (1, pool)
        rows = np.array([int(r) for r in faiss_rows[0] if r >= 0 and r != leave_out and self.index.ids[r] in self.cache],
                        np.int64)
        exact = self._cosines(vector, rows)  # (P,)
        order = np.argsort(-exact, kind="stable")[:k]
        found = [(float(exact[j]), int(rows[j])) for j in order]
        frames = self._frames_like(example, [r for _, r in found])
        hits = []
        for rank, ((score, r), frame) in enumerate(zip(found, frames), 1):
            item, note, outdated = self._shown(self.index.ids[r])
            frame = frame if shows_cached_regions(outdated) else 0  # an unreadable row's times are blank
            hits.append(Hit(rank=rank, id=self.index.ids[r], path=item["path"], score=score, global_score=score,
                            local_score=None, time=frame_time(item["timestamps"][frame]), frame=frame,
                            note=note, outdated=outdated, kind=item["kind"]))
        return hits

    def _frames_like(self, example: np.ndarray | None, rows: list[int]) -> list[int]:
        """For each of `rows`, the frame whose stored regions are most like the `example` regions (K, E): each
        region's best cosine with any of them, averaged over the frame (0 where the index keeps no regions)."""
        regions_per_frame = self.cache.settings.regions  # N: the detected regions and the whole-frame one
        if self.index.regions is None or example is None or not len(example) or not rows:
            return [0] * len(rows)
        example = example / np.maximum(np.linalg.norm(example, axis=-1, keepdims=True), 1e-12)
        regions, mask, positions = self.index.regions.gather(rows)  # (P, K, E), (P, K), (P, K)
        regions /= np.maximum(np.linalg.norm(regions, axis=-1, keepdims=True), 1e-12)
        best = (regions @ example.T).max(-1)  # (P, K) each candidate region's best cosine with the example's
        frames = []
        for likeness, real, places in zip(best, mask, positions):
            frame = places[real] // regions_per_frame  # (K_real,)
            if not len(frame):
                frames.append(0)
                continue
            totals = np.bincount(frame, weights=likeness[real])
            counts = np.bincount(frame)
            means = np.round(totals / np.maximum(counts, 1), LIKENESS_DECIMALS)  # an exact copy's frames tie: the first
            frames.append(int(np.argmax(np.where(counts > 0, means, -np.inf))))
        return frames

    def item(self, item_id: str) -> dict:
        """One indexed item's cached arrays but its features (settings.arrays() names, plus id, path, kind
        and note: what went wrong decoding it, "" for most). KeyError where the index holds no `item_id`;
        UserError, saying why, where the cache has dropped it since."""
        self.refresh()
        if item_id not in self.index:
            raise KeyError(f"{item_id!r} is not in the index")
        if item_id not in self.cache and (gone := self.cache.left_out_line(item_id)):
            raise UserError(gone)  # dropped (extract --prune) since it was indexed: as search and --like say
        with self._lock:
            shown = tuple(spec.name for spec in self.cache.settings.arrays() if spec.name != "features")
            try:
                return {**self.cache.get(item_id, shown), "note": self.cache.note_of(item_id)}
            except DamagedShard as damage:  # no frames to show
                blank = self.cache.blank(self.cache.index_of(item_id))
                return {**{k: v for k, v in blank.items() if k != "features"}, "note": "", "unreadable": unreadable_hit(damage)}

    def export(self, path) -> list[Path]:
        """Write the indexed embeddings and their ids for other tools (see index/export.py); the files written."""
        return export_embeddings(self.index, self.cache, path)


def file_stamp(path: Path) -> tuple | None:
    """Which file is at `path` now (its inode, time and size: a file replaced atomically is another inode), None where
    there is none."""
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_ino, found.st_mtime_ns, found.st_size


# ---------------------------------------------------------------- output


def check_query(query) -> None:
    """A query is text."""
    if not isinstance(query, str):
        raise UserError(f"a query is text (str), not {type(query).__name__}")


def check_k(k) -> None:
    """A number of results a search may ask for: a whole number, at least 1."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise UserError(f"k = {k!r}: give a whole number of results, e.g. 10")
    if k < 1:
        raise UserError(f"k = {k}: ask for at least one result")


def not_indexed_line(key: str, ids: list[str], cache: RegionCache, several: list[str] = (), on_disk: bool = False) -> str:
    """Why `key` names no indexed item: it names one cached since the index was built, or (`on_disk`) a file or
    folder the cache does not hold, or none of the index (with the ids it ends, `several`, or else those it comes
    close to: a typo)."""
    if key in cache or (cached := item_named(key, cache.ids)[0]) is not None:
        named = key if key in cache else cached
        return f'"{printable(named)}" is cached but not in the index yet; run `vlpcache index` to add it'
    if not several and (left_out := cache.left_out_line(key)) is not None:
        return left_out
    if on_disk and not several and os.path.exists(key):  # the user's own file or folder, never extracted into this cache
        return outside_line(key, cache)
    close = list(several[:3]) or ids_like(key, ids, cutoff=0.75)
    named = " or ".join(f'"{printable(i)}"' for i in close)
    if close:
        hint = f"; did you mean {named}?"
    elif ids:
        hint = (f'; give an id as search prints it (the path below the folder extracted, without its extension: '
                f'"{printable(ids[0])}")')
    else:
        hint = ""
    line = f'"{printable(key)}" names no item of the index{hint}'
    if on_disk and not several and names_a_file(key) and not os.path.exists(key):
        return f"{printable(key)}: no such file or folder, and {line}"
    return line


def names_a_file(key: str) -> bool:
    """Whether --like KEY reads as the path of a file or folder (a folder in it, an extension) rather than as an id
    alone, so that, named nowhere, it is said to be no file either."""
    return "/" in key or os.sep in key or bool(Path(key).suffix)


def outside_line(path: str, cache: RegionCache) -> str:
    """What to do to find the items like a video, photo or frame folder that is not in the cache: --like compares
    indexed items (their regions as the cache's detector found them), so it goes into the cache first, extracted
    as the cache's items were (extract refuses, naming the setting, where anything else differs)."""
    settings, media = cache.settings, Path(path)
    if (item_id := frames_item_holding(media, cache)) is not None:
        return f'"{printable(path)}" is one of the frames of the cached item "{printable(item_id)}": search `--like {printable(item_id)}`'
    resolved = media.resolve()
    root = next((r for r in extracted_roots(cache) if resolved.is_relative_to(r)), None)
    if root is not None:  # new in a folder the cache was extracted from: extracting that folder gives its usual id
        name = resolved.relative_to(root).as_posix()
        given, what = str(root), f"extract {printable(str(root))} again (new files only)"
    else:
        name, given, what = media.name, path, "add it"
    name = name if media.is_dir() else name[: len(name) - len(media.suffix)]  # a file's id: its name less its extension
    detector = detector_name(settings.detector)
    options = f"--frames {settings.frames} --regions {settings.regions - 1} --detector {printable(detector)}"
    return (f'"{printable(path)}" is not in the cache {printable(str(cache.cache_dir))}: --like compares the items of '
            f"its index; {what} with `vlpcache extract {printable(given)} -o {printable(str(cache.cache_dir))} "
            f"{options}`, index it (`vlpcache index`), then search `--like {printable(name)}`")


def liked_item(key: str, searcher: Searcher, outside: bool,
               changed: SourceChanged | None = None) -> tuple[str | None, str | None]:
    """(the indexed item --like KEY names: its id, a file name or path that ends in it, or its source file by
    another path, a symbolic link to it; None), or (None, None) for a file or folder the cache does not hold, to be
    extracted on its own (where `outside`), or (None, the id it was extracted as) for one it holds that has changed
    since (with `changed`: changed_source), to be compared as it is now; else a UserError saying why it names none.
    The cache's ids and sources are looked through once for each."""
    if not outside or not os.path.exists(key):  # no file: an id, or a file name or path that ends in one
        return searcher.indexed_item(key, on_disk=True), None
    source, named = cached_source(key, searcher.cache), ends_in(key, searcher)
    if changed is not None and (was := changed_source(key, searcher, changed, source, named)) is not None:
        return None, was
    if source is not None and source in searcher.index:
        return source, None
    return (None, None) if names_outside(key, searcher, named) else (searcher.indexed_item(key, on_disk=True), None)


def changed_source(path: str, searcher: Searcher, changed: SourceChanged, source: str | None,
                   named: list[str]) -> str | None:
    """The indexed item extracted from the file or folder `path` (by that path or a link to it: `source`, its
    cached_source; or an item whose id it ends in, among `named`: ends_in) that is no longer what it was extracted
    from (`changed(stamp, path)`: extract/stamps.py's source_changed, which the command line passes: the index does
    not import extract); None where none is."""
    cache = searcher.cache
    for item_id in [source, *(i for i in named if same_source(path, cache, i))]:
        if item_id in searcher.index and item_id in cache and changed(cache.sources[cache.index_of(item_id)], path):
            return item_id
    return None


def changed_line(path: str, item_id: str) -> str:
    """What --like says of a file the cache holds that has changed since it was extracted (changed_source)."""
    return (f"{printable(path)} changed since it was extracted as \"{printable(item_id)}\" (the cache and the index "
            "hold its old content): compared as it is now, extracted on its own (`vlpcache extract` of its folder, "
            "then `vlpcache index`, bring the collection up to date)")


def cached_source(path: str, cache: RegionCache) -> str | None:
    """The cached item extracted from the file or folder `path` (by the path the cache keeps, or where it leads:
    a symbolic link to it); None if none is."""
    if not os.path.exists(path) or path in cache:
        return None
    wanted = {os.path.abspath(path), os.path.realpath(path)}
    return next((item_id for item_id, source in zip(cache.ids, cache.paths) if source in wanted), None)


def names_outside(key: str, searcher: Searcher, named: list[str]) -> bool:
    """Whether `key` is a file or folder of this machine that the cache does not hold: not an id, not the source
    of an item whose id its name or path ends in (`~/new/clip.mp4` is another file than the cached `clip` from
    `/data/clip.mp4`), no item the cache dropped, and no frame of a cached frames folder. `named`: the ids it ends
    in (ends_in)."""
    if key in searcher.index or key in searcher.cache:
        return False
    if named:
        return os.path.exists(key) and not any(same_source(key, searcher.cache, item_id) for item_id in named)
    return (os.path.exists(key) and searcher.cache.left_out_line(key) is None
            and frames_item_holding(Path(key), searcher.cache) is None)


def ends_in(key: str, searcher: Searcher) -> list[str]:
    """The ids of the index (else of the cache) that `key`, a file name or path, ends in: one, several, or none."""
    item_id, several = item_named(key, searcher.index.ids)
    if item_id is None and not several:
        item_id = item_named(key, searcher.cache.ids)[0]
    return [item_id] if item_id is not None else several


def same_source(path: str, cache: RegionCache, item_id: str) -> bool:
    """Whether `path` is the file or folder the cached item `item_id` was extracted from."""
    if item_id not in cache:
        return False
    try:
        return os.path.samefile(path, cache.paths[cache.index_of(item_id)])
    except OSError:  # its source is gone (or unreadable): another file
        return False


def like_outside(searcher: Searcher, path: str, k: int, outside, device, say: Say = say,
                 changed_from: str | None = None) -> list[Hit]:
    """search --like FILE of a file or folder the cache does not hold (or, `changed_from`, the id of the item it
    was extracted as, one that changed since: changed_source): extracted on its own into a temporary cache with the
    collection's settings (nothing is added to the collection), then ranked as like() ranks."""
    import tempfile

    named = ends_in(path, searcher)
    held = (f"is not {', '.join(repr(printable(i)) for i in named[:3])} of the cache, whose id{'s' if len(named) > 1 else ''} "
            "it ends in (another file)" if named else "is not in the cache")
    say(f"note: {changed_line(path, changed_from)}" if changed_from is not None else
        f"{printable(path)} {held}: extracting it on its own to compare it (with the cache's settings; nothing is "
        "added to the cache)")
    with own_temporary_folder("vlpcache-like-") as folder:
        try:
            item_id = outside(path, searcher.cache.settings, Path(folder), device=device)
        except NotComparable as err:
            raise UserError(f"{outside_line(path, searcher.cache)} (--like cannot extract it on its own here: "
                            f"{user_message(err)})") from None
        except WriteFailed as err:  # its cache's shard, in the temporary folder
            raise WriteFailed(f"cannot extract {printable(path)} on its own to compare it: a write to the "
                              f"temporary folder {printable(tempfile.gettempdir())} failed ({err.reason}); make room "
                              "there, or set TMPDIR to another folder (nothing was added to the cache)", err.reason, err.full) from None
        with RegionCache(folder, say_damaged=False) as cache:
            if note := cache.note_of(item_id):
                say(f"note: {printable(path)}: {note}; compared as it was read")
            return searcher.like_item(cache, item_id, k, device)


def frames_item_holding(media: Path, cache: RegionCache) -> str | None:
    """The id of the cached frame folder (an item of kind "frames") that the image file `media` lies in; None
    if it lies in none."""
    if not media.is_file():
        return None
    folder = os.path.realpath(media.parent)
    return next((item_id for item_id, item_path, kind in zip(cache.ids, cache.paths, cache.kinds)
                 if kind == "frames" and os.path.basename(item_path) == media.parent.name
                 and os.path.realpath(item_path) == folder), None)


def extracted_roots(cache: RegionCache) -> list[Path]:
    """The folders given to `vlpcache extract` (the workspace's record) that this cache's items were found
    under (an item's path: its root, its id, a file's extension), deepest first."""
    given = {os.path.realpath(r) for r in Workspace().extracted_roots() if isinstance(r, str)}
    heads = set()  # a few folders for the many items under them
    for item_id, item_path, kind in zip(cache.ids, cache.paths, cache.kinds):
        tail = item_id if kind == "frames" else item_id + os.path.splitext(item_path)[1]
        if item_path.endswith(os.sep + tail):
            heads.add(item_path[: -len(tail) - 1])
    found = {os.path.realpath(head) for head in heads} & given
    return [Path(r) for r in sorted(found, key=len, reverse=True) if os.path.isdir(r)]


def hits_json(query: str, hits: list[Hit], unread: str = "", unknown: list[str] | None = None,
              weak: bool = False, known: int | None = None, model: str = "") -> dict:
    """`unread`: the end of the query past the tokens the model reads (Searcher.unread); `unknown`: its
    parts the text model does not know, `known`: how many of its tokens it knows (Searcher.unknown_and_known;
    "reads_nothing" where there are unknown parts and nothing else); `weak`: its best match is weak (Searcher.weak);
    `model`: the run that ranked them (Searcher.model_label)."""
    return {"query": query, "model": model, "unread": unread, "unknown": unknown or [], "reads_nothing": bool(unknown) and known == 0,
            "weak": weak, "results": [asdict(h) for h in hits]}


def weak_line(searcher: Searcher, query: str, hits: list[Hit]) -> str:
    best = max(h.global_score for h in hits)
    return (f"note: a weak match for \"{printable(query[:40])}{'...' if len(query) > 40 else ''}\": its best global score, "
            f"{best:.3f} (before re-rank), is below what 99 in 100 of the run's training captions find here ({searcher.weak_below:.3f}); "
            "the collection may hold nothing like it")


def unknown_line(query: str, unknown: list[str], known: int) -> str:
    """A note on a query with words its text model does not know (`known`: how many tokens it knows)."""
    shown = ", ".join(f'"{printable(part)}"' for part in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    if not known:
        return (f"note: the text model knows none of the words of \"{printable(query[:40])}\" ({shown}: each read as "
                "one unknown token, or spelled out letter by letter): this ranking says nothing about them; its "
                "vocabulary is English words")
    return (f"note: the text model does not know {shown} (read as one unknown token, the same for anything "
            "outside its vocabulary, or spelled out letter by letter): the results follow the rest of the query")


UNREAD_LINES = 3  # queries of a --queries file whose unread end (unknown words, weak match) is said in a line; the rest are counted


class FirstFew:
    """A note said for the first UNREAD_LINES queries it concerns; the rest are counted (said once after them)."""

    def __init__(self) -> None:
        self.count = 0

    def say(self, line) -> None:
        self.count += 1
        if self.count <= UNREAD_LINES:
            say(line())


def unread_line(searcher: Searcher, query: str, unread: str) -> str:
    shown = unread if len(unread) <= 60 else unread[:57] + "..."
    return (f"note: the model reads the first {searcher.max_words} tokens of a query; the end of "
            f"\"{printable(query[:40])}{'...' if len(query) > 40 else ''}\" was left out: \"{printable(shown)}\"")


def like_json(item_id: str, hits: list[Hit], outside: bool = False, note: str = "", model: str = "") -> dict:
    """`vlpcache search --like ID --json`'s object (and serve's /api/search?like=ID); `outside`: "like" is the
    path of a file or folder the cache does not hold, extracted on its own (`"outside": true`); `note`: what is
    off with the item asked about (liked_note), given where there is something; `model`: the run that ranked them."""
    return {"like": item_id, "model": model, **({"outside": True} if outside else {}), **({"note": note} if note else {}),
            "results": [asdict(h) for h in hits]}


def liked_note(searcher: Searcher, item_id: str | None) -> str:
    """What is off with the indexed item a --like asks about ("" for most): extracted again since it was indexed, or
    its source changed and the new file did not extract (its old content answers, as for its search hits)."""
    if item_id in searcher.extracted_again:
        return f"{item_id} {LIKED_EXTRACTED_AGAIN}"
    if item_id is not None and (failure := searcher.failed_again.get(item_id)):
        return f"{item_id}: {failed_again_hit(failure, 'these are the items most like its old content')}"
    return ""


def format_hits(query: str, hits: list[Hit], head: str = "query") -> str:
    lines = [f"{head}: {printable(query)}"]
    if not hits:
        lines.append("  (no results)")
    for h in hits:
        path = f"  {printable(h.path)}" if h.path and h.path != h.id else ""
        when = f"  @ {place}" if (place := place_text(h.kind, h.time)) else ""
        lines.append(f"{h.rank:3d}  {h.score:7.4f}  {printable(h.id)}{path}{when}")
        if h.regions:
            parts = [f"{r.word} -> {r.label} [{', '.join(f'{v:.2f}' for v in r.box)}]"
                     + (f" @ {place}" if (place := place_text(h.kind, r.time)) else "") for r in h.regions]
            lines.append("       " + "; ".join(parts))
        if h.note:
            lines.append(f"       kept with a note: {printable(h.note)}")
        if h.outdated:
            lines.append(f"       {h.outdated}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the command


QUERY_COMMENT = re.compile(r"#(\s|$)")  # "# a note" or "#": a comment line; "#cooking", a hashtag, is a query


def read_queries(text: str | None, queries_file: str | None) -> list[str]:
    queries = []
    if text is not None:
        if not text.strip():
            raise UserError('empty query; give words to search for, e.g. vlpcache search "person cuts onion"')
        queries.append(text.strip())
    if queries_file:
        if queries_file == "-":
            lines = text_lines(utf8_text(sys.stdin.buffer.read(), "stdin"))
        else:
            try:
                lines = text_lines(read_utf8_text(Path(queries_file)))
            except OSError as err:
                raise UserError(f"--queries {queries_file}: cannot read it ({err.strerror})") from None
        lines = [line.strip() for line in lines]  # a U+0085 or U+2028 inside a line: a space in its query
        queries += [line for line in lines if line and not QUERY_COMMENT.match(line)]
        if not queries:
            raise UserError(f"--queries {queries_file}: no queries in it (one query per line)")
    if not queries:
        raise UserError('no query; give TEXT (vlpcache search "person cuts onion") or --queries FILE')
    return queries


def open_parts(run_dir=None, cache_dir=None, index_dir=None, device=DEFAULT_DEVICE, say: Say = say, qbnorm: bool = False):
    """(query model, cache, index, index directory, run directory) for the options and workspace defaults; builds the
    run's index on first use (and its query bank, when `qbnorm` asks for one it lacks).

    With an up-to-date ONNX export in the index, neither torch nor the run's weights are loaded.
    """
    if str(device) not in DEVICES and not str(device).startswith("cuda:"):  # the ONNX path never resolves it
        raise UserError(f"device {device!r}: choose one of {', '.join(DEVICES)}")
    progress = say is report.say  # a quiet `say` (a notebook's) draws no bar either
    sources = resolve_sources(run_dir, cache_dir, index_dir)
    cache = open_cache(sources.cache_dir, say)
    index_dir, index = index_of_run(sources.index_dir, sources.run_dir, cache)
    if index is None and run_dir is None and not may_write(sources.index_dir):
        # the workspace's newest run (one being trained, one not indexed yet) in another user's workspace:
        # the newest run indexed over this cache answers, said, rather than no search at all
        if (older := _newest_indexed_run(sources, cache)) is not None:
            say(f"note: {sources.run_dir.name}, the newest run, has no index over this cache and this user may not "
                f"write one in {sources.index_dir}: searching with {older.name}, the newest run indexed (`vlpcache "
                f"index -o DIR` indexes {sources.run_dir.name} where you can write, then --index DIR)")
            sources = dataclasses.replace(sources, run_dir=older)
            index_dir, index = index_of_run(sources.index_dir, sources.run_dir, cache)
    bank_ready = not qbnorm or (index is not None and bank_fits(index_dir / QUERYBANK_FILE, index.ids))
    query_model = None
    # an index without calibration.json was stopped while being built (its query export written): built on here
    finished = index is not None and (calibrated(index_dir, index.meta.checkpoint_sha256) or not may_write(index_dir))
    if (finished and index.regions is not None and query_export_sha(index_dir) == index.meta.checkpoint_sha256
            and bank_ready):
        try:
            query_model = OnnxQueryModel(index_dir)
        except GraphTooNew as err:  # an export a newer install made: the run's own model answers alike
            say(f"note: {err}; searching with the run's model (torch) meanwhile")
    if query_model is None:
        from vlpcache.model.retrieval import default_batch_size
        from vlpcache.index.query_graphs import TorchQueryModel
        from vlpcache.model.checkpoint import load_run

        device = resolve_device(device)
        run = load_run(sources.run_dir, device=device)
        check_run_reads_cache(run, cache)  # before "building it": a cache it cannot read gets no index
        index_dir = index_dir_for(sources.index_dir, run.checkpoint_sha256, cache.settings.to_json(), cache.cache_dir)
        if index is None and not (index_dir / META_FILE).exists():  # (one a kill left half-written: update_index says)
            say(new_index_line(run, sources.index_dir, index_dir))
        if not finished or index.regions is None or not bank_ready:
            index = update_index(run, cache, index_dir, IndexConfig(), device=device,
                                 batch_size=default_batch_size(device), progress=progress, say=say, qbnorm=qbnorm)
        query_model = TorchQueryModel(run)
    unindexed = sum(1 for item_id in cache.ids if item_id not in index)
    if unindexed:
        say(unindexed_line(unindexed, len(extracted_again(index, cache)), index_dir))
    if note := coverage(index, cache, with_again=not unindexed):  # items extracted again: said above with new ones
        say(f"note: index {index_dir}: {note}")
    return query_model, cache, index, index_dir, sources.run_dir


def unindexed_line(unindexed: int, again: int, index_dir: Path) -> str:
    """The note of `unindexed` cached items the index lacks and (in the same line, as one `vlpcache index` mends
    both) of `again` indexed ones it holds by their old content: extracted again since (their sources changed)."""
    also = (f", and {again} indexed item(s) were extracted again since (their sources changed): found by their old "
            "content and shown without matched regions" if again else "")
    if may_write(index_dir):
        how = "run `vlpcache index` to add them" + (" and index those anew" if again else "")
    else:
        how = (f"this user may not write {index_dir}: its owner's `vlpcache index` adds them"
               + (" and indexes those anew" if again else "") +
               " (or `vlpcache index -o DIR` indexes them where you can write, then --index DIR)")
    return f"note: {unindexed} cached item(s) are not in the index yet{also}; {how}"


def say_model(searcher: Searcher, as_json: bool) -> None:
    """Which of the user's runs ranks the hits, said once, as the first are printed (after any error that stops
    the command first); --json says it in each object's "model"."""
    if not as_json and searcher.model_label:
        say(f"searching with {searcher.model_label}")


def _newest_indexed_run(sources, cache: RegionCache) -> Path | None:
    """The newest run of the workspace, other than sources.run_dir, with an index over `cache`."""
    from vlpcache.model.run_layout import runs_newest_first

    for run in runs_newest_first(Workspace().runs_dir):
        if run != sources.run_dir and index_of_run(sources.index_dir, run, cache)[1] is not None:
            return run
    return None


def run_search(text=None, queries_file=None, *, k: int, run_dir=None, cache_dir=None, index_dir=None,
               as_json=False, no_rerank=False, device=DEFAULT_DEVICE, qbnorm=False, like=(), outside=None,
               changed: SourceChanged | None = None) -> None:
    """The `vlpcache search` command. outside(path, settings, folder, device=) -> id: extracts a file or folder
    the cache does not hold into a cache of its own in `folder` (extract/outside.py; the command line's), so
    that --like FILE ranks the indexed items like it; without it, --like of such a file says how to add it.
    changed(stamp, path): whether a cached source changed since (extract/stamps.py): --like of such a file is
    compared as it is now, as one the cache does not hold, with a note."""
    if like and (text is not None or queries_file):
        raise UserError("give words to search for (TEXT, --queries) or --like ID, not both")
    if like and qbnorm:
        raise UserError("--qbnorm normalises text queries by the run's captions; --like ranks by an item's own "
                        "embedding: leave out one of them")
    queries = read_queries(text, queries_file) if not like else []
    searcher = Searcher(run_dir, cache_dir, index_dir, device=device, qbnorm=qbnorm)
    rerank = not no_rerank and not qbnorm
    if (run := searcher.index.meta.run_dir) and (line := being_trained_note(Path(run), searcher.epoch)):
        say(line)
    if rerank and not searcher.can_rerank and not like:
        say("note: the run was trained without region-word alignment; results are not re-ranked")
    liked = [(key, *liked_item(key, searcher, outside is not None, changed)) for key in like]  # each checked before any answer
    indexed_like = any(item_id is not None for _, item_id, _ in liked)
    shown = len(searcher) - searcher.unshown - indexed_like  # an item is not like itself
    if k > shown:
        say(f"note: -k {k} is more than the {shown} {'other ' if indexed_like else ''}indexed items in the cache; "
            "showing all of them")
    for _, item_id, _ in liked:
        if note := liked_note(searcher, item_id):  # its vector in the index is of what it was
            say(f"note: {printable(note)}")
    for n, (key, item_id, was) in enumerate(liked):
        hits = (searcher.like(item_id, k) if item_id is not None else
                like_outside(searcher, key, k, outside, device, changed_from=was))
        note = liked_note(searcher, item_id) if item_id is not None else changed_line(key, was) if was is not None else ""
        if n == 0:
            say_model(searcher, as_json)
        print(json.dumps(like_json(item_id or key, hits, outside=item_id is None, note=note, model=searcher.model_label),
                         ensure_ascii=False) if as_json
              else ("\n" if n else "") + format_hits(item_id or key, hits, head="like"), flush=True)
    cut, strange, weaker = FirstFew(), FirstFew(), FirstFew()
    for n, query in enumerate(queries):
        hits = searcher.search(query, k, rerank=rerank, qbnorm=qbnorm)
        if n == 0:
            say_model(searcher, as_json)
        if unread := searcher.unread(query):
            cut.say(lambda: unread_line(searcher, query, unread))
        unknown, known = searcher.unknown_and_known(query)
        if unknown:
            strange.say(lambda: unknown_line(query, unknown, known))
        if weak := searcher.weak(hits):
            weaker.say(lambda: weak_line(searcher, query, hits))
        if as_json:
            print(json.dumps(hits_json(query, hits, unread, unknown, weak, known, searcher.model_label), ensure_ascii=False),
                  flush=True)
        else:
            print(("\n" if n else "") + format_hits(query, hits), flush=True)
    for counted, what, key in ((cut, f"were longer than the {searcher.max_words} tokens the model reads and cut there",
                                "\"unread\" end"), (weaker, "found only weak matches", "\"weak\""),
                               (strange, "hold words the text model does not know", "\"unknown\" parts")):
        if counted.count > UNREAD_LINES:
            say(f"note: {counted.count} of the {len(queries)} queries {what} (the first {UNREAD_LINES} said so above; "
                f"--json gives each one's {key})")
