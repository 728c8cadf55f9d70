"""Caption files, read by pretraining and evaluation alike.

JSON Lines: one object per video, {"video": id, "captions": [...]} (a "split" key is kept aside, other
keys are ignored), or per caption, {"video_id": id, "caption": text} (RECORD_ID_KEYS, RECORD_TEXT_KEYS).
CSV (.csv, .tsv): a header with a video column (`video`, `video_id` or `videoid`) and a caption column
(`caption`, `sentence`, or WebVid's `name`), one row per caption, several rows per video allowed; columns
separated by commas, semicolons, tabs or pipes (CSV_DELIMITERS). A whole JSON
document in a layout a dataset ships (JSON_LAYOUTS): a list of the JSON Lines objects (DiDeMo's
{"video", "description"} and VATEX's {"videoID", "enCap"} among them); MSR-VTT's annotations ({"videos": [{"video_id", "split"}],
"sentences": [{"video_id", "caption"}]}, also CLIP4Clip's MSRVTT_data.json); Karpathy's split files of
Flickr8k, Flickr30k and COCO ({"images": [{"filename", "split", "sentences": [{"raw"}]}]}); COCO's
caption annotations ({"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]});
ActivityNet Captions ({video id: {"sentences": [...]}}); YouCook2's ({"database": {video id: {"subset",
"annotations": [{"sentence"}]}}}). A .txt or .token file: lines of an id and a
caption (MSVD's, Flickr's token files). A folder: a text file beside each image or video, of the same
name (img2dataset's output, CC3M's usual form).

A video is named by its item id (its path below the extracted root, without extension: `clips/a`), or
by a file name or path that ends in it: `a.mp4`, `clips/a.mp4`, `/data/clips/a.mp4` or `clips\\a.mp4`
name the item `clips/a` when no item is called that key itself; or by the end of its id, when one item
only ends that way: `a` or `a.mp4` names `clips/a` when no item is called `a` and no other ends in `/a`
(a folder of splits extracted as one root: ids `train/v1`, captions keyed `v1`). Captions.matched_to.
"""

from __future__ import annotations

import csv
import difflib
import html
import io
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field, replace
from html.entities import html5
from pathlib import Path

from vlpcache.errors import UserError
from vlpcache.files import decode_text, read_utf8_text
from vlpcache.report import printable, progress_bar

VALIDATION_SPLITS = {"val", "valid", "validate", "validation"}  # "validate": MSR-VTT's own annotations
HELD_OUT_STEMS = VALIDATION_SPLITS | {"test", "testing", "devtest", "dev", "eval", "evaluation", "heldout", "holdout"}


@dataclass
class Captions:
    """Captions per item id, in file order, plus what was dropped while reading."""

    by_id: dict[str, list[str]] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)
    empty_captions: int = 0
    bad_lines: int = 0
    sources: list[str] = field(default_factory=list)
    first_bad_line: str = ""  # "FILE line N: why", for the report
    repeated: int = 0  # captions of an id that another file merged in gave it already (read once)
    layout: str = ""  # how the file was read: "JSON Lines", "CSV", a JSON_LAYOUTS name...
    segments: bool = False  # its sentences each describe a segment of their video (ActivityNet Captions, YouCook2)
    cut: int = 0  # captions longer than CAPTION_MAX_CHARS, cut to it
    split_conflicts: int = 0  # items given two splits (set_split)
    first_split_conflict: str = ""  # "'v1': test, then train", for the report

    def set_split(self, item_id: str, split: str) -> None:
        """An item's split. Where rows (or files) give it two, a held-out one (val, test...) wins over one that is
        not, else the last: no caption of an item held out anywhere is trained on. The conflict is counted."""
        before = self.splits.get(item_id)
        if before is not None and before != split:
            self.split_conflicts += 1
            self.first_split_conflict = self.first_split_conflict or f"{item_id!r}: {before}, then {split}"
            if before.lower() in HELD_OUT_STEMS and split.lower() not in HELD_OUT_STEMS:
                return
        self.splits[item_id] = split

    def split_conflicts_line(self) -> str:
        """A note on the items given two splits; "" where none is."""
        if not self.split_conflicts:
            return ""
        return (f"note: {self.split_conflicts} caption rows give an item another split than an earlier one (the first: "
                f"{self.first_split_conflict}): such an item takes its held-out split (val, test...) where it has one, "
                "else the last, and is never trained on once held out")

    def bad_lines_text(self) -> str:
        """", 3 unreadable caption lines (the first: FILE line N: why)", and the captions cut (", 1 caption over
        10,000 characters cut to its first 10,000"), or "" when all were read whole."""
        cut = (f", {self.cut} caption{'s' if self.cut != 1 else ''} over {CAPTION_MAX_CHARS:,} characters cut to "
               f"{'their' if self.cut != 1 else 'its'} first {CAPTION_MAX_CHARS:,}" if self.cut else "")
        if not self.bad_lines:
            return cut
        return (f", {self.bad_lines} unreadable caption line{'s' if self.bad_lines != 1 else ''} (the first: "
                f"{self.first_bad_line}){cut}")

    def __len__(self) -> int:
        return len(self.by_id)

    def merge(self, other: "Captions") -> "Captions":
        for item_id, caps in other.by_id.items():  # a caption another file gave the same id already: once
            mine = self.by_id.setdefault(item_id, [])
            known = set(mine)
            new = [c for c in caps if c not in known]
            self.repeated += len(caps) - len(new)
            mine.extend(new)
        self.repeated += other.repeated
        self.split_conflicts += other.split_conflicts
        self.first_split_conflict = self.first_split_conflict or other.first_split_conflict
        for item_id, split in other.splits.items():
            self.set_split(item_id, split)
        self.empty_captions += other.empty_captions
        self.bad_lines += other.bad_lines
        self.cut += other.cut
        self.first_bad_line = self.first_bad_line or other.first_bad_line
        self.sources += other.sources
        return self

    def matched_to(self, ids) -> tuple["Captions", "KeyMatches"]:
        """These captions keyed by item id where a key names an item by file name or path (`a.mp4` for the
        item `a`, see item_named_by), or is the end of exactly one item's id (`v1` for the item
        `train/v1`, see ItemTails); keys that are ids, or name none, stay as they are. Also what was
        matched those ways, and the keys that end several ids (left unmatched). A caption that two keys of one
        item give it (two files, `v1` in one, `v1.mp4` in the other) is kept once and counted as repeated."""
        ids = list(ids)
        known = set(ids)
        by_id, matches, tails, forms, form_tails = {}, KeyMatches(), None, None, None
        matched = replace(self, splits={})  # splits by item, given again: two keys of one item (`v1`, `v1.mp4`) may differ
        for key, texts in self.by_id.items():
            item, how = (key, None) if key in known else (item_named_by(key, known), matches.by_path)
            if item is None:  # in another Unicode form (macOS writes file names decomposed), or with spaces around
                forms = forms or {_normal(item_id): item_id for item_id in ids}
                named = forms.get(_normal(key)) or item_named_by(_normal(key), forms.keys())
                item, how = forms.get(named, named), matches.by_form
            if item is None:
                tails = tails or ItemTails(ids)  # in the caches' order, not a set's: the same example every run
                item, several = tails.item_ending_in(key)
                if item is None and not several:  # in another Unicode form, or with spaces: `café` of `train/café`
                    form_tails = form_tails or ItemTails(forms)
                    named, several = form_tails.item_ending_in(_normal(key))
                    item, several = forms.get(named), [forms[s] for s in several]
                how = matches.by_tail
                if several:
                    matches.ambiguous.append((key, several))
            if item is not None and how is not None:
                how.append((key, item))
            item = item or key
            if (mine := by_id.setdefault(item, [])) and texts:  # two keys of one item (`v1`, `v1.mp4`): a caption once
                given = set(mine)
                texts = [text for text in texts if text not in given]
                matched.repeated += len(self.by_id[key]) - len(texts)
            mine.extend(texts)
            if key in self.splits:
                matched.set_split(item, self.splits[key])
        if not (matches.by_path or matches.by_tail or matches.by_form):
            return self, matches
        return replace(matched, by_id=by_id), matches

    def of_split(self, split: str) -> "Captions":
        """The captions of the items whose split is `split` (in any case); one error naming the splits
        there are when none is."""
        wanted = {key for key, name in self.splits.items() if name.lower() == split.lower()}
        if not wanted:
            there = ", ".join(sorted(set(self.splits.values()))) or "none: no item has a split"
            raise UserError(f"{', '.join(self.sources)}: no video of split {split!r} (its splits: {there})")
        return replace(self, by_id={key: texts for key, texts in self.by_id.items() if key in wanted},
                       splits={key: name for key, name in self.splits.items() if key in wanted})

    def split_counts(self, unsplit: str | None = None) -> dict[str, int]:
        """How many of these items each split has, by name in file order; items without one are not counted,
        or, given `unsplit`, counted under that name (where the file has splits at all)."""
        counts: dict[str, int] = {}
        for key in self.by_id:
            split = self.splits.get(key, unsplit if self.splits else None)
            if split is not None:
                counts[split] = counts.get(split, 0) + 1
        return counts

    def restrict(self, ids) -> tuple["Captions", dict[str, int | str]]:
        """Captions of the given item ids only, and counts of what did not match either way (with an
        example of a captioned id no item has, "" where there is none)."""
        ids = list(ids)
        present = set(ids)
        kept = Captions({i: self.by_id[i] for i in ids if i in self.by_id}, self.splits, sources=self.sources,
                        first_bad_line=self.first_bad_line)
        report = {
            "items_with_captions": len(kept.by_id),
            "items_without_captions": sum(1 for i in ids if i not in self.by_id),
            "captions_without_items": sum(1 for i in self.by_id if i not in present),
            "example_without_item": next((i for i in self.by_id if i not in present), ""),
            "empty_captions": self.empty_captions,
            "bad_lines": self.bad_lines,
        }
        return kept, report


@dataclass
class KeyMatches:
    """Caption keys that are not item ids, and the items they were matched to (Captions.matched_to)."""

    by_path: list[tuple[str, str]] = field(default_factory=list)  # (key, item id): a file name or path ending in the id
    by_tail: list[tuple[str, str]] = field(default_factory=list)  # (key, item id): the end of exactly one id
    ambiguous: list[tuple[str, list[str]]] = field(default_factory=list)  # (key, ids it ends): left unmatched
    by_form: list[tuple[str, str]] = field(default_factory=list)  # (key, item id): the same in Unicode NFC, stripped

    def text(self) -> str:
        """", N caption ids name their video by ... (e.g. 'a.mp4' for 'a')" for each kind, or ""."""
        text = ""
        for pairs, how in ((self.by_path, "by file name or path"), (self.by_tail, "by the end of its id"),
                           (self.by_form, "in another Unicode form or with spaces around it")):
            if pairs:
                key, item = pairs[0]
                one = len(pairs) == 1
                text += (f", {len(pairs)} caption id{'' if one else 's'} name{'s its' if one else ' their'} video {how} "
                         f"(e.g. {key!r} for {item!r})")
        if self.ambiguous:
            (key, items), one = self.ambiguous[0], len(self.ambiguous) == 1
            text += (f", {len(self.ambiguous)} caption id{' ends' if one else 's end'} several item ids and "
                     f"match{'es' if one else ''} none (e.g. {key!r}: {items[0]!r}, {items[1]!r}): name "
                     f"{'that video' if one else 'those videos'} by {'its' if one else 'their'} whole id")
        return text


class ItemTails:
    """The ids that end in each proper tail of the ids' paths (`b/c` and `c` of `a/b/c`), at most two
    per tail: one is a match, two is ambiguous. Built only when some caption key is neither an id
    nor names one by its own tail."""

    def __init__(self, ids):
        self.owners: dict[str, list[str]] = {}
        for item_id in ids:
            parts = item_id.split("/")
            for start in range(1, len(parts)):
                owners = self.owners.setdefault("/".join(parts[start:]), [])
                if len(owners) < 2:
                    owners.append(item_id)

    def item_ending_in(self, key: str) -> tuple[str | None, list[str]]:
        """(the one item whose id ends in the whole key, with or without its extension, []), or (None,
        two of the ids that end in it), or (None, [])."""
        parts = key_parts(key)
        for last in last_names(parts):
            owners = self.owners.get("/".join([*parts[:-1], last]), [])
            if len(owners) == 1:
                return owners[0], []
            if owners:
                return None, owners
        return None, []


def key_parts(key: str) -> list[str]:
    """A caption key's path components (`/` or `\\` separated, empty and `.` left out)."""
    return [p for p in key.replace("\\", "/").split("/") if p not in ("", ".")]


def last_names(parts: list[str]) -> tuple[str, ...]:
    """The last component as it is, then without its extension if it has one; () for no components."""
    if not parts:
        return ()
    stem, extension = os.path.splitext(parts[-1])
    return (parts[-1], stem) if _EXTENSION.fullmatch(extension) else (parts[-1],)


_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,5}")  # what a file name ends in; not ".jpg,A" of a line misread


def item_named(key: str, ids: list[str]) -> tuple[str | None, list[str]]:
    """The item id that `key` names, as a caption names its video (the id itself; a file name or path that
    ends in it; the same in another Unicode form or with spaces around; the end of exactly one id): (id,
    []); else (None, some of the ids it ends, where it ends several)."""
    matched, matches = Captions({key: ["-"]}).matched_to(ids)
    (item,) = matched.by_id
    if item in set(ids):
        return item, []
    return None, next((several for _, several in matches.ambiguous), [])


def _normal(text: str) -> str:
    """A key or id as NFC (composed: `é` one character, as most keyboards type it) without the spaces around it."""
    return unicodedata.normalize("NFC", text.strip())


IDS_LIKE_LOOKED_AT = 100_000  # more ids than this are not looked through for ones like a key (difflib reads each)


def ids_like(key: str, ids: list[str], cutoff: float = 0.5) -> list[str]:
    """Up to 3 ids like `key` (difflib's ratio at least `cutoff`), letter case aside (`CASE` is like `Case` and
    `case`), for the hint of a key that names no item; none where there are more than IDS_LIKE_LOOKED_AT ids."""
    if len(ids) > IDS_LIKE_LOOKED_AT:
        return []
    lowered: dict[str, list[str]] = {}
    for item_id in ids:
        lowered.setdefault(item_id.casefold(), []).append(item_id)
    close = difflib.get_close_matches(key.casefold(), lowered.keys(), n=3, cutoff=cutoff)
    return [item_id for name in close for item_id in lowered[name]][:3]


def item_named_by(key: str, ids) -> str | None:
    """The item id among `ids` that a caption key names as a file name or path: the longest tail of its
    path (`/` or `\\` separated), with or without the file's extension, that is an id; None if none is."""
    parts = key_parts(key)
    for start in range(len(parts)):
        for last in last_names(parts):
            candidate = "/".join([*parts[start:-1], last])
            if candidate in ids:
                return candidate
    return None


def text_lines(text: str) -> list[str]:
    """A text file's lines, ended by \\n, \\r\\n or \\r only: a U+2028, a U+0085 (cp1252's "…" read as
    Latin-1), a form feed or a vertical tab inside a caption, where str.splitlines also ends lines, is no end.
    A byte-order mark that starts a line (files joined with cat, each saved with one) is no part of it."""
    return [line.removeprefix("\ufeff") for line in re.split(r"\r\n|\r|\n", text)]


# characters BERT's tokenizer drops, joining the words either side ("view\x85of": "viewof"), that part words:
# those Python takes for spaces, a zero-width space (U+200B, a break where a line may wrap: web text, Thai) and a
# U+FEFF inside a text (a byte-order mark of files joined, its joining use long given to U+2060): a space
# instead. The joiners stay dropped, inside the word they join: U+200C and U+200D (Persian, Indic scripts,
# emoji sequences), U+2060 (word joiner)
WORD_BREAKS = re.compile("[\x0b\x0c\x1c-\x1f\x85\u200b\ufeff]")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair, which JSON's "\\ud83d" escape can give alone


# HTML's character references that scraped captions keep ("Tom &amp; Jerry", "it&#39;s", "&#x27;", "&quot;"),
# which the tokenizer reads as words ("amp"): each the character it stands for. Only with the ";" that ends
# one, so "R&B", "AT&T" or "&copy 2020" stay as typed
CHARACTER_REFERENCE = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
# HTML's tags of text and line formatting that scraped captions keep ("<b>dog</b> runs", "&lt;br&gt;" once
# decoded), read as words "b", "br": none. By their names only, so "a < b", "x<y>z" or "tlc>" stay; a line break,
# paragraph or list item reads as a space, a tag inside text as nothing, as a browser shows them
HTML_TAG = re.compile(r"<(/?)(a|b|big|br|div|em|font|i|li|p|s|small|span|strong|sub|sup|u)(\s[^<>]*)?/?>", re.IGNORECASE)
HTML_BREAK_TAGS = {"br", "div", "li", "p"}


def model_text(text: str) -> str:
    """A caption or a query as the text model is given it: CHARACTER_REFERENCE decoded, HTML_TAG left out,
    WORD_BREAKS a space, the spaces around it left out."""
    for pattern, replacement in MODEL_TEXT_STEPS:
        text = pattern.sub(replacement, text)
    return text.strip()


def model_text_origins(text: str) -> tuple[str, list[tuple[int, int]]]:
    """model_text(text), and for each of its characters the (start, end) of the characters of `text` it comes
    from: what the model read told as the query was typed ("&amp;" for "&"). Kept apart from model_text,
    which reads every caption of a training set, for the cost of a pair per character."""
    origins = [(i, i + 1) for i in range(len(text))]
    for pattern, replacement in MODEL_TEXT_STEPS:
        parts, moved, at = [], [], 0
        for match in pattern.finditer(text):  # the matches pattern.sub replaces
            written, (start, end) = replacement(match), match.span()
            parts += [text[at:start], written]
            whole = [(origins[start][0], origins[end - 1][1])] * len(written)
            moved += origins[at:start] + (origins[start:end] if written == match[0] else whole)  # (a name HTML lacks)
            at = end
        text, origins = "".join(parts) + text[at:], moved + origins[at:]
    start, end = len(text) - len(text.lstrip()), len(text.rstrip())
    return text[start:end], origins[start:end]


def left_out_kinds(text: str) -> str:
    """What a text the model reads no token of holds, in words: model_text leaves out HTML's formatting tags (those
    its character references make too) and decodes the references, the tokenizer drops zero-width and control
    characters."""
    decoded = CHARACTER_REFERENCE.sub(_character, text)
    kinds = [kind for found, kind in ((HTML_TAG.search(decoded), "HTML formatting tags"),
                                      (CHARACTER_REFERENCE.search(text), "HTML character references"),
                                      (HTML_TAG.sub("", decoded).strip(), "zero-width or control characters")) if found]
    return ", ".join(kinds[:-1]) + " and " + kinds[-1] if len(kinds) > 1 else "".join(kinds)


def _character(reference: re.Match) -> str:
    """The character a reference stands for; a name HTML does not know stays as it is. Names are looked up
    whole: html.unescape would read "&ampfoo;" as "&" and "foo;"."""
    if reference[0][1] == "#":
        return html.unescape(reference[0])
    return html5.get(reference[0][1:], reference[0])


def _tag_text(tag: re.Match) -> str:
    return " " if tag[2].lower() in HTML_BREAK_TAGS else ""


# model_text's steps, in this order: a reference decoded may make a tag ("&lt;br&gt;")
MODEL_TEXT_STEPS = ((CHARACTER_REFERENCE, _character), (HTML_TAG, _tag_text), (WORD_BREAKS, lambda _: " "))


CAPTION_MAX_CHARS = 10_000  # a caption past this is cut to it: the model reads 32 tokens (--max-words at most 512),
# and tokenizing a whole 100 MB line (a file of one JSON string, a log mistaken for captions) took 22 GB


def _add(captions: Captions, item_id, texts) -> None:
    for text in texts:
        text = str(text).strip() if isinstance(text, (str, int, float)) and not isinstance(text, bool) else ""
        if len(text) > CAPTION_MAX_CHARS:  # cut before the steps below, which read all of it
            text, captions.cut = text[:CAPTION_MAX_CHARS], captions.cut + 1
        # half an emoji (a caption a scraper cut between the two halves of "\ud83d\udc36") is no text a
        # tokenizer takes (a traceback): U+FFFD, as a decoder writes for a broken byte
        text = model_text(LONE_SURROGATE.sub("\ufffd", text))
        # a NUL, which the tokenizer drops as it drops every control character, is no text HDF5 stores (the caption
        # features' strings): one in 1,200 captions stopped pretraining with a traceback
        text = text.replace("\0", "").strip()
        if text:
            captions.by_id.setdefault(str(item_id), []).append(text)
        else:  # empty, or not a text (null, a list, an object)
            captions.empty_captions += 1


def _bad_line(captions: Captions, path: Path, line: int | None, why: str, unit: str = "line") -> None:
    captions.bad_lines += 1
    if not captions.first_bad_line:
        captions.first_bad_line = f"{path} {unit} {line}: {why}" if line is not None else f"{path}: {why}"


def _json_record(line: str) -> tuple[str, list, str | None] | str:
    """(item id, captions, split or None) of one JSON Lines record, or why it cannot be read."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return f"not JSON ({err.msg})"
    return _record(record)


def _is_id(value) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool) and value != ""


RECORD_ID_KEYS = ("video", "video_id", "videoID")  # a record's video, in the order looked for; VATEX's: "videoID"
# DiDeMo's: "description"; VATEX's English captions: "enCap" (its "chCap", Chinese, left aside)
RECORD_TEXT_KEYS = ("captions", "caption", "sentences", "sentence", "description", "enCap")


def _record(record) -> tuple[str, list, str | None] | str:
    """(item id, captions, split or None) of one {"video", "captions"} object (or another of the keys
    above: {"video": "a.mp4", "caption": "..."}, DiDeMo's {"video", "description"}, VATEX's {"videoID",
    "enCap"}), or why it cannot be read."""
    if not isinstance(record, dict):
        return "not a JSON object"
    id_key = next((key for key in RECORD_ID_KEYS if key in record), None)
    text_key = next((key for key in RECORD_TEXT_KEYS if key in record), None)
    if id_key is None:
        return 'no "video" key'
    if text_key is None:
        return 'no "captions" key'
    item_id, texts = record[id_key], record[text_key]
    if not _is_id(item_id):
        return f'"{id_key}" is not an id (a text)'
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list):
        return f'"{text_key}" is not a list of texts'
    split = record.get("split")
    return str(item_id), texts, None if split is None else str(split)


# ours, MSR-VTT's and CLIP4Clip's, WebVid's; image datasets' (Kaggle's Flickr8k captions.txt `image,caption`,
# Flickr30k's results.csv `image_name| comment_number| comment`, file_name and filename columns); Charades' `id`, last
CSV_VIDEO_COLUMNS = ("video", "video_id", "videoid", "image", "image_name", "image_id", "file_name", "filename", "id")
# ours and COCO's, CLIP4Clip's, WebVid's; Flickr30k's; Charades_v1_train.csv's (its "script", what the actors were
# asked to do, left aside for what annotators saw)
CSV_CAPTION_COLUMNS = ("caption", "sentence", "name", "comment", "descriptions")
CSV_SEVERAL_CAPTIONS = {"descriptions": ";"}  # a column holding several captions, and what separates them (Charades')
CSV_SPLIT_COLUMN = "split"  # optional: train, val, test... as JSON Lines' "split" key
# what separates a CSV file's columns: commas; semicolons, as Excel saves CSV where the comma is the decimal
# mark; tabs (.tsv, and Excel's "Text (Tab delimited)" saved as .csv); pipes. The one whose header has a
# video and a caption column is the file's.
CSV_DELIMITERS = {",": "", ";": "semicolon-separated", "\t": "tab-separated", "|": "pipe-separated"}
CSV_SUFFIXES = (".csv", ".tsv")


def read_captions(path: str | Path, progress: bool = False) -> Captions:
    """Read a caption file (.csv, JSON Lines, or a JSON document of a known layout) or folder; malformed
    lines or records are counted, not fatal. progress: a bar while a folder's files are read (shown once
    it takes more than 2 s: CC3M's 3.3 million take minutes)."""
    path = Path(path)
    captions = Captions(sources=[str(path)])
    if path.is_dir():
        _read_text_files_beside_media(captions, path, progress)
        captions.layout = "a .txt beside each image or video"
        return captions
    if not path.is_file():
        raise UserError(f"{path}: caption file not found")
    text = read_utf8_text(path)
    if path.suffix.lower() in CSV_SUFFIXES and not _csv_header(text) and "\t" in text.lstrip().partition("\n")[0]:
        captions.layout = _read_id_and_caption_lines(captions, path, text)  # LSMDC's .csv, TGIF's .tsv: no header
    elif path.suffix.lower() in CSV_SUFFIXES and _msvd_corpus_header(text):
        captions.layout = _read_msvd_corpus(captions, path, text)
    elif path.suffix.lower() in CSV_SUFFIXES:
        captions.layout = _read_csv(captions, path, text)
    elif path.suffix.lower() in TEXT_SUFFIXES and _csv_header(text):  # Kaggle's Flickr8k captions.txt: CSV
        captions.layout = _read_csv(captions, path, text)
    elif path.suffix.lower() in TEXT_SUFFIXES and not text.lstrip().startswith(("{", "[")):  # not JSON named .txt
        captions.layout = _read_id_and_caption_lines(captions, path, text)
        if not captions.by_id and _only_file_names(text):
            raise UserError(f"{path}: a list of file names without captions (a split's list, as Flickr_8k.devImages.txt "
                            "is), not a caption file; to train or validate on those files only, pass their lines of the "
                            f"captions file, e.g. `grep -F -f {path.name} Flickr8k.token.txt > {path.stem}.token.txt`")
    elif (document := _json_document(text)) is not None:
        captions.layout = _read_document(captions, path, document)
    else:
        _read_json_lines(captions, path, text)
        captions.layout = "JSON Lines"
    if not captions.by_id and captions.bad_lines:
        raise UserError(f"{path}: no caption could be read ({captions.bad_lines} unreadable, the first: "
                        f"{captions.first_bad_line.removeprefix(f'{path} ')}); {_caption_forms()}")
    return captions


def _caption_forms() -> str:
    """The end of an error about a caption file of no form read here: the forms there are."""
    return ('caption files are JSON Lines of {"video": id, "captions": [...]}, CSV with video and caption columns, '
            f"a JSON document in the layout of {', '.join(JSON_LAYOUTS)}, lines of an id and a caption (.txt), or a "
            "folder with a .txt beside each image")


TEXT_SUFFIXES = (".txt", ".token")  # MSVD's AllVideoDescriptions.txt, Flickr8k.token.txt, Flickr30k's .token
_CAPTION_NUMBER = re.compile(r"#\d+$")  # Flickr's "1000268201_693b08cb0e.jpg#0": the image's caption 0


def _csv_header(text: str) -> bool:
    """Whether the first line of a text file is a CSV header with a video and a caption column."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    for delimiter in CSV_DELIMITERS:
        names = {name.strip().lower() for name in next(csv.reader([first], delimiter=delimiter), [])}  # "video","caption" too
        if names & set(CSV_VIDEO_COLUMNS) and names & set(CSV_CAPTION_COLUMNS):
            return True
    return False


def _only_file_names(text: str) -> bool:
    """Whether every line of a text is one file name (with an extension) and nothing else."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return bool(lines) and all(len(line.split()) == 1 and _EXTENSION.fullmatch(os.path.splitext(line)[1]) for line in lines)


_FILE_THEN_COMMA = re.compile(r"[^\s,]+\.[A-Za-z0-9]{2,5}(#\d+)?,")  # `1000268201_693b08cb0e.jpg,A child ...`


_LSMDC_TIME = re.compile(r"\d+\.\d+\.\d+\.\d+")  # LSMDC's `00.00.45.321`: hours, minutes, seconds, milliseconds


def _read_id_and_caption_lines(captions: Captions, path: Path, text: str) -> str:
    """Lines of an id and a caption, split at the first tab, or else at the comma after a file name
    (`1000268201_693b08cb0e.jpg,A child ...`), or else at the first space (MSVD's `-4wsuPCjDBc_5_15 a
    squirrel is eating`, Flickr's `1000268201_693b08cb0e.jpg#0<TAB>A child ...`, TGIF's `https://...gif<TAB>a
    cat ...`); LSMDC's six tab-separated fields, a clip id, four times and the sentence, give the id and the
    sentence. A caption number after `#` is dropped from the id; `#` comment lines and blank lines are
    skipped. Returns the layout read."""
    lsmdc = 0
    for number, line in enumerate(text_lines(text), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) == 6 and all(_LSMDC_TIME.fullmatch(f.strip()) for f in fields[1:5]):
            item_id, caption = fields[0], fields[5]
            lsmdc += 1
        elif "\t" in line:
            item_id, _, caption = line.partition("\t")
        elif _FILE_THEN_COMMA.match(line.strip()):
            item_id, _, caption = line.strip().partition(",")
        else:
            item_id, _, caption = line.strip().partition(" ")
        item_id = _CAPTION_NUMBER.sub("", item_id.strip())
        if not item_id or not caption.strip():
            _bad_line(captions, path, number, "not an id and a caption")
            continue
        _add(captions, item_id, [caption])
    return "LSMDC's clip id, times and sentence" if lsmdc else "lines of an id and a caption"


def _read_csv(captions: Captions, path: Path, text: str) -> str:
    """A CSV or TSV file's rows, its columns separated by whichever of CSV_DELIMITERS gives a header with a
    video and a caption column; returns the layout read ("CSV", "CSV, semicolon-separated"...). A `split`
    column is honoured as JSON Lines' "split" key is. A row with more fields than the header is taken to
    hold a caption with the separator in it, not quoted (`a dog runs, then sits`, as people write CSV
    by hand): its caption is read whole, and the layout counts such rows."""
    delimiters = sorted(CSV_DELIMITERS, key=lambda d: d != ("\t" if path.suffix.lower() == ".tsv" else ","))
    for delimiter in delimiters:
        rows = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        header = next((row for row in rows if row), [])  # blank lines before it passed over
        lowered = [name.strip().lower() for name in header]  # `Video`, `Caption` too
        video = next((name for name in CSV_VIDEO_COLUMNS if name in lowered), None)
        caption = next((name for name in CSV_CAPTION_COLUMNS if name in lowered), None)
        if video is not None and caption is not None:
            break
    else:
        first_row = next((row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiters[0]) if row), [])
        raise UserError(f"{path}: a CSV caption file needs a video column ({', '.join(CSV_VIDEO_COLUMNS)}) and a "
                        f"caption column ({', '.join(CSV_CAPTION_COLUMNS)}), separated by commas, semicolons, tabs or "
                        f"pipes; its header has {printable(', '.join(c.strip() for c in first_row)) or 'no columns'}")
    at = {name: lowered.index(name) for name in (video, caption, CSV_SPLIT_COLUMN) if name in lowered}
    joined = 0
    for fields in rows:
        if not fields:  # a blank line
            continue
        while len(fields) > len(lowered) and at[caption] == len(lowered) - 1 and not fields[-1].strip():
            fields.pop()  # separators a row ends in, after the caption, the last column: no more of its words
        if (extra := len(fields) - len(lowered)) > 0:  # the caption's own separators, not quoted
            c = at[caption]
            fields = [*fields[:c], delimiter.join(fields[c : c + extra + 1]), *fields[c + extra + 1 :]]
            joined += 1
        row = {name: fields[i] if i < len(fields) else "" for name, i in at.items()}
        if not row[video].strip():
            _bad_line(captions, path, rows.line_num, "no video id")
            continue
        texts = [row[caption]]
        if several := CSV_SEVERAL_CAPTIONS.get(caption):  # Charades' "A person cooks.;The person eats."
            texts = [text for text in row[caption].split(several) if text.strip()] or [""]
        _add(captions, row[video], texts)
        if row.get(CSV_SPLIT_COLUMN, "").strip():
            captions.set_split(row[video], row[CSV_SPLIT_COLUMN].strip())
    separator = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}[delimiter]
    note = f"{joined} caption(s) with an unquoted {separator} read whole" if joined else ""
    return ", ".join(filter(None, ("CSV", CSV_DELIMITERS[delimiter], note)))


# MSVD's video_corpus.csv (VideoID,Start,End,WorkerID,Source,AnnotationTime,Language,Description): one row per
# sentence, in many languages; its clips are named VideoID_Start_End (-4wsuPCjDBc_5_15.avi), as its
# AllVideoDescriptions.txt names them.
MSVD_CORPUS_COLUMNS = ("videoid", "start", "end", "language", "description")
MSVD_LANGUAGE = "english"  # the language of the default text model's vocabulary


def _msvd_corpus_header(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    return set(MSVD_CORPUS_COLUMNS) <= {name.strip().lower() for name in next(csv.reader([first]), [])}


def _read_msvd_corpus(captions: Captions, path: Path, text: str) -> str:
    """MSVD's video_corpus.csv: each English row's Description is a caption of clip VideoID_Start_End; rows
    in other languages are counted in the layout returned, not read."""
    rows = csv.reader(io.StringIO(text, newline=""))
    lowered = next(([name.strip().lower() for name in header] for header in rows if header), [])  # blank lines first
    at = {name: lowered.index(name) for name in MSVD_CORPUS_COLUMNS}
    other_languages = joined = 0
    for fields in rows:  # one sentence a row
        if not fields:  # a blank line
            continue
        if len(fields) < len(lowered):
            _bad_line(captions, path, rows.line_num, f"{len(fields)} fields where the header has {len(lowered)}")
            continue
        row = {name: fields[i].strip() for name, i in at.items()}
        if len(fields) > len(lowered) and at["description"] == len(lowered) - 1:  # its last column: a comma unquoted
            row["description"] = ",".join(fields[at["description"]:]).strip()
            joined += 1
        if row["language"].lower() != MSVD_LANGUAGE:
            other_languages += 1
            continue
        if not (row["videoid"] and row["start"] and row["end"]):
            _bad_line(captions, path, rows.line_num, "no VideoID, Start or End")
            continue
        _add(captions, f"{row['videoid']}_{row['start']}_{row['end']}", [row["description"]])
    skipped = f", {other_languages} sentence(s) in other languages left aside" if other_languages else ""
    whole = f", {joined} caption(s) with an unquoted comma read whole" if joined else ""
    return f"MSVD's video_corpus.csv (clips VideoID_Start_End, English){skipped}{whole}"


SIDECAR_SUFFIX = ".txt"
NOT_MEDIA_SUFFIXES = {".txt", ".json"}  # what else an image-caption download keeps beside each image


def _read_text_files_beside_media(captions: Captions, folder: Path, progress: bool = False) -> None:
    """A folder's captions kept one text file per image or video, beside it under the same name
    (img2dataset's "files" output: 00000/000000000.jpg, .txt, .json): the key is the text file's path
    below the folder without its extension (00000/000000000), each non-empty line a caption. A text file
    with nothing of its name beside it (a README.txt) is not a caption."""
    with progress_bar(desc=f"reading captions in {folder}", unit=" files", disable=not progress, delay=2,
                      leave=False) as bar:
        found = _walk_text_files(captions, folder, bar)
    if not found:
        raise UserError(f"{folder}: a folder of captions holds a .txt file beside each image or video, of the same "
                        "name (img2dataset's files output); none was found there")


def _walk_text_files(captions: Captions, folder: Path, bar) -> int:
    """_read_text_files_beside_media's walk: how many caption files it found."""
    found = 0
    for parent, folders, names in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        media = {os.path.splitext(name)[0] for name in names
                 if os.path.splitext(name)[1].lower() not in NOT_MEDIA_SUFFIXES and not name.startswith(".")}
        for name in sorted(names):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() != SIDECAR_SUFFIX or stem not in media:
                continue
            found += 1
            bar.update(1)
            path = Path(parent) / name
            try:
                text = decode_text(path.read_bytes())
            except UnicodeDecodeError:
                _bad_line(captions, path, None, "not UTF-8 text")
                continue
            except OSError as err:
                _bad_line(captions, path, None, f"cannot read: {err.strerror or err}")
                continue
            key = path.relative_to(folder).with_suffix("").as_posix()
            _add(captions, key, [line for line in text_lines(text) if line.strip()] or [""])
    return found


def _read_json_lines(captions: Captions, path: Path, text: str) -> None:
    _take_records(captions, path, ((number, _json_record(line)) for number, line in enumerate(text_lines(text), 1)
                                   if line.strip()))


def _take_records(captions: Captions, path: Path, numbered, unit: str = "line") -> None:
    """Each (number, what _record made of it) into `captions`, a record that cannot be read counted."""
    for number, parsed in numbered:
        if isinstance(parsed, str):
            _bad_line(captions, path, number, parsed, unit)
            continue
        item_id, texts, split = parsed
        _add(captions, item_id, texts)
        if split is not None:
            captions.set_split(item_id, split)


def _json_document(text: str):
    """The file as one JSON document when it is one in a known layout (a JSON Lines file of one line
    is read as lines: the same result); None otherwise."""
    if text.lstrip()[:1] not in ("[", "{"):
        return None
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return None  # JSON Lines (its second object is "extra data"), or broken: read line by line
    if isinstance(document, dict) and any(key in document for key in RECORD_ID_KEYS):
        return None  # one record
    return document


def _read_document(captions: Captions, path: Path, document) -> str:
    """A whole JSON document: a list of {"video", "captions"} records, or a dataset's own layout (its name
    is returned)."""
    if isinstance(document, list):
        _take_records(captions, path, enumerate(map(_record, document), 1), unit="record")
        return "a JSON list of records"
    layout = next((name for name, (recognise, _) in JSON_LAYOUTS.items()
                   if isinstance(document, dict) and recognise(document)), None)
    if layout is None:
        keys = ", ".join(map(repr, list(document)[:6])) if isinstance(document, dict) else type(document).__name__
        raise UserError(f"{path}: a JSON document of a layout vlpcache does not know (top level: {keys}); "
                        f"{_caption_forms()}")
    JSON_LAYOUTS[layout][1](captions, path, document)
    return f"{layout}, {SEGMENTS_NOTE}" if captions.segments else layout


# said where a file's sentences describe segments (start and end times) but train and query whole videos
SEGMENTS_NOTE = ("each segment's sentence taken as a caption of its whole video; eval --paragraphs joins them into "
                 "one query per video, the paragraph-to-video protocol")


def _list_of(document: dict, key: str) -> list:
    value = document.get(key)
    return value if isinstance(value, list) else []


def _read_msrvtt(captions: Captions, path: Path, document: dict) -> None:
    """MSR-VTT's train_val_videodatainfo.json / test_videodatainfo.json: sentences, and each video's split."""
    for number, sentence in enumerate(_list_of(document, "sentences"), 1):
        if not isinstance(sentence, dict) or not _is_id(sentence.get("video_id")):
            _bad_line(captions, path, number, 'no "video_id"', unit="sentence")
            continue
        _add(captions, sentence["video_id"], [sentence.get("caption")])
    for video in _list_of(document, "videos"):
        if isinstance(video, dict) and _is_id(video.get("video_id")) and isinstance(video.get("split"), str):
            captions.set_split(str(video["video_id"]), video["split"])


def _read_karpathy(captions: Captions, path: Path, document: dict) -> None:
    """Karpathy's dataset_flickr8k.json, dataset_flickr30k.json, dataset_coco.json: an image's file name
    (below its filepath, for COCO), its split (train, restval, val, test) and its sentences."""
    for number, image in enumerate(_list_of(document, "images"), 1):
        if not isinstance(image, dict) or not _is_id(image.get("filename")):
            _bad_line(captions, path, number, 'no "filename"', unit="image")
            continue
        key = "/".join(str(part) for part in (image.get("filepath"), image["filename"]) if part)
        sentences = image.get("sentences") if isinstance(image.get("sentences"), list) else []
        _add(captions, key, [s.get("raw") if isinstance(s, dict) else None for s in sentences])
        if isinstance(image.get("split"), str):
            captions.set_split(key, image["split"])


def _read_coco(captions: Captions, path: Path, document: dict) -> None:
    """COCO's captions_train2017.json: annotations by image id, the image named by its file name."""
    names = {image["id"]: image["file_name"] for image in _list_of(document, "images")
             if isinstance(image, dict) and "id" in image and _is_id(image.get("file_name"))}
    for number, annotation in enumerate(_list_of(document, "annotations"), 1):
        if not isinstance(annotation, dict) or annotation.get("image_id") not in names:
            _bad_line(captions, path, number, "no image with its image_id", unit="annotation")
            continue
        _add(captions, names[annotation["image_id"]], [annotation.get("caption")])


def _read_activitynet(captions: Captions, path: Path, document: dict) -> None:
    """ActivityNet Captions' train.json / val_1.json: each video id's sentences (and their times, unused)."""
    for number, (video, entry) in enumerate(document.items(), 1):
        sentences = entry.get("sentences") if isinstance(entry, dict) else None
        sentences = [sentences] if isinstance(sentences, str) else sentences
        if not isinstance(sentences, list):
            _bad_line(captions, path, number, 'no "sentences" list', unit="video")
            continue
        _add(captions, video, sentences)
    captions.segments = True


def _read_youcook2(captions: Captions, path: Path, document: dict) -> None:
    """YouCook2's youcook2_annotations_trainval.json: {"database": {YouTube id: {"subset": "training" or
    "validation", "annotations": [{"segment": [start, end], "sentence"}]}}}; the id names the video
    (raw_videos/training/113/GLd3aX16zBg.mp4 is the item `training/113/GLd3aX16zBg`, matched by its end)."""
    for number, (video, entry) in enumerate(document["database"].items(), 1):
        annotations = entry.get("annotations") if isinstance(entry, dict) else None
        if not isinstance(annotations, list):
            _bad_line(captions, path, number, 'no "annotations" list', unit="video")
            continue
        _add(captions, video, [a.get("sentence") if isinstance(a, dict) else None for a in annotations])
        if isinstance(entry.get("subset"), str):
            captions.set_split(str(video), entry["subset"])
    captions.segments = True


def _records_of(key: str, *fields: str):
    """Whether a document's `key` is a list whose first element is an object with all of `fields`."""
    def test(document: dict) -> bool:
        value = document.get(key)
        return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and set(fields) <= value[0].keys()
    return test


def _activitynet(document: dict) -> bool:
    """Whether a document is ActivityNet Captions': objects by video id, with "sentences"."""
    first = list(document.values())[:10]
    return bool(first) and all(isinstance(v, dict) for v in first) and any("sentences" in v for v in first)


def _youcook2(document: dict) -> bool:
    """Whether a document is YouCook2's: {"database": {id: {"annotations": [{"sentence"}]}}} (ActivityNet
    1.3's "database" has action labels, not sentences: not captions)."""
    database = document.get("database")
    first = list(database.values())[:10] if isinstance(database, dict) else []
    return any(isinstance(v, dict) and isinstance(v.get("annotations"), list) and v["annotations"]
               and isinstance(v["annotations"][0], dict) and "sentence" in v["annotations"][0] for v in first)


JSON_LAYOUTS = {  # name: (how to recognise it, how to read it), tried in this order
    "MSR-VTT's annotations": (_records_of("sentences", "video_id", "caption"), _read_msrvtt),
    "Karpathy's splits (Flickr8k, Flickr30k, COCO)": (_records_of("images", "filename", "sentences"), _read_karpathy),
    "COCO's captions": (_records_of("annotations", "image_id", "caption"), _read_coco),
    "ActivityNet Captions": (_activitynet, _read_activitynet),
    "YouCook2's annotations": (_youcook2, _read_youcook2),
}


def unknown_tokens(ids, words, spans, unk_id: int | None) -> list[bool]:
    """Whether the text model knows nothing of each token of one text (ids, word index and (start, end)
    characters of each, special tokens left out): its unknown token ([UNK]: "猫", "🐶"), or a piece of a
    word it spells out, most of its pieces one character, as an English WordPiece vocabulary reads another
    script ("человек": ч ##е ##л ##ов ##е ##к; English words it splits, "gravy": gr ##av ##y, are not)."""
    pieces: dict[int, list[int]] = {}
    for k, word in enumerate(words):
        pieces.setdefault(word, []).append(k)
    spelled = set()
    for ks in pieces.values():
        if len(ks) >= 2 and 2 * sum(spans[k][1] - spans[k][0] == 1 for k in ks) > len(ks):
            spelled.update(ks)
    return [i == unk_id or k in spelled for k, i in enumerate(ids)]


def caption_queries(captions: list[list[str]], all_captions: bool) -> tuple[list[str], list[int]]:
    """Retrieval queries from the captions of each item: the first caption of each (the standard
    protocol) or all of them, and for each query the index of its item."""
    texts, owners = [], []
    for item, item_captions in enumerate(captions):
        for caption in item_captions if all_captions else item_captions[:1]:
            texts.append(caption)
            owners.append(item)
    return texts, owners
