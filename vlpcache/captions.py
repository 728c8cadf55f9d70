"""Caption files, read by pretraining and evaluation alike.

JSON Lines: one object per video, {"video": id, "captions": [...]} (extra keys such as "split" are
kept aside). CSV: a header with `video` and `caption` columns, one row per caption, several rows per
video allowed.

A video is named by its item id (its path below the extracted root, without extension: `clips/a`), or
by a file name or path that ends in it: `a.mp4`, `clips/a.mp4`, `/data/clips/a.mp4` or `clips\\a.mp4`
name the item `clips/a` when no item is called that key itself; or by the end of its id, when one item
only ends that way: `a` or `a.mp4` names `clips/a` when no item is called `a` and no other ends in `/a`
(a folder of splits extracted as one root: ids `train/v1`, captions keyed `v1`). Captions.matched_to.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from vlpcache.errors import UserError
from vlpcache.files import read_utf8_text


@dataclass
class Captions:
    """Captions per item id, in file order, plus what was dropped while reading."""

    by_id: dict[str, list[str]] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)
    empty_captions: int = 0
    bad_lines: int = 0
    sources: list[str] = field(default_factory=list)
    first_bad_line: str = ""  # "FILE line N: why", for the report

    def bad_lines_text(self) -> str:
        """", 3 unreadable caption lines (the first: FILE line N: why)", or "" when all were read."""
        if not self.bad_lines:
            return ""
        return f", {self.bad_lines} unreadable caption line{'s' if self.bad_lines != 1 else ''} (the first: {self.first_bad_line})"

    def __len__(self) -> int:
        return len(self.by_id)

    def merge(self, other: "Captions") -> "Captions":
        for item_id, caps in other.by_id.items():
            self.by_id.setdefault(item_id, []).extend(caps)
        self.splits.update(other.splits)
        self.empty_captions += other.empty_captions
        self.bad_lines += other.bad_lines
        self.first_bad_line = self.first_bad_line or other.first_bad_line
        self.sources += other.sources
        return self

    def matched_to(self, ids) -> tuple["Captions", "KeyMatches"]:
        """These captions keyed by item id where a key names an item by file name or path (`a.mp4` for the
        item `a`, see item_named_by), or is the end of exactly one item's id (`v1` for the item
        `train/v1`, see ItemTails); keys that are ids, or name none, stay as they are. Also what was
        matched those ways, and the keys that end several ids (left unmatched)."""
        ids = list(ids)
        known = set(ids)
        by_id, splits, matches, tails = {}, {}, KeyMatches(), None
        for key, texts in self.by_id.items():
            item = key if key in known else item_named_by(key, known)
            if item is None:
                tails = tails or ItemTails(ids)  # in the caches' order, not a set's: the same example every run
                item, several = tails.item_ending_in(key)
                if item is not None:
                    matches.by_tail.append((key, item))
                elif several:
                    matches.ambiguous.append((key, several))
            elif item != key:
                matches.by_path.append((key, item))
            item = item or key
            by_id.setdefault(item, []).extend(texts)
            if key in self.splits:
                splits[item] = self.splits[key]
        if not (matches.by_path or matches.by_tail):
            return self, matches
        return replace(self, by_id=by_id, splits=splits), matches

    def restrict(self, ids) -> tuple["Captions", dict[str, int]]:
        """Captions of the given item ids only, and counts of what did not match either way."""
        ids = list(ids)
        present = set(ids)
        kept = Captions({i: self.by_id[i] for i in ids if i in self.by_id}, self.splits, sources=self.sources,
                        first_bad_line=self.first_bad_line)
        report = {
            "items_with_captions": len(kept.by_id),
            "items_without_captions": sum(1 for i in ids if i not in self.by_id),
            "captions_without_items": sum(1 for i in self.by_id if i not in present),
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

    def text(self) -> str:
        """", N caption ids name their video by ... (e.g. 'a.mp4' for 'a')" for each kind, or ""."""
        text = ""
        for pairs, how in ((self.by_path, "by file name or path"), (self.by_tail, "by the end of its id")):
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
    return (parts[-1], stem) if extension else (parts[-1],)


def item_named_by(key: str, ids: set[str]) -> str | None:
    """The item id among `ids` that a caption key names as a file name or path: the longest tail of its
    path (`/` or `\\` separated), with or without the file's extension, that is an id; None if none is."""
    parts = key_parts(key)
    for start in range(len(parts)):
        for last in last_names(parts):
            candidate = "/".join([*parts[start:-1], last])
            if candidate in ids:
                return candidate
    return None


def _add(captions: Captions, item_id, texts) -> None:
    for text in texts:
        text = str(text).strip() if isinstance(text, (str, int, float)) and not isinstance(text, bool) else ""
        if text:
            captions.by_id.setdefault(str(item_id), []).append(text)
        else:  # empty, or not a text (null, a list, an object)
            captions.empty_captions += 1


def _bad_line(captions: Captions, path: Path, line: int, why: str) -> None:
    captions.bad_lines += 1
    if not captions.first_bad_line:
        captions.first_bad_line = f"{path} line {line}: {why}"


def _json_record(line: str) -> tuple[str, list, str | None] | str:
    """(item id, captions, split or None) of one JSON Lines record, or why it cannot be read."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return f"not JSON ({err.msg})"
    if not isinstance(record, dict):
        return "not a JSON object"
    for key in ("video", "captions"):
        if key not in record:
            return f'no "{key}" key'
    item_id, texts = record["video"], record["captions"]
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool) or item_id == "":
        return '"video" is not an id (a text)'
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list):
        return '"captions" is not a list of texts'
    split = record.get("split")
    return str(item_id), texts, None if split is None else str(split)


def read_captions(path: str | Path) -> Captions:
    """Read a .jsonl/.json-lines or .csv caption file; malformed lines are counted, not fatal."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: caption file not found")
    captions = Captions(sources=[str(path)])
    text = read_utf8_text(path)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or not {"video", "caption"} <= set(reader.fieldnames):
            raise UserError(f"{path}: a CSV caption file needs 'video' and 'caption' columns")
        for row in reader:
            if not row.get("video"):
                _bad_line(captions, path, reader.line_num, "no video id")
                continue
            _add(captions, row["video"], [row.get("caption")])
        return captions
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        parsed = _json_record(line)
        if isinstance(parsed, str):
            _bad_line(captions, path, number, parsed)
            continue
        item_id, texts, split = parsed
        _add(captions, item_id, texts)
        if split is not None:
            captions.splits[item_id] = split
    return captions


def caption_queries(captions: list[list[str]], all_captions: bool) -> tuple[list[str], list[int]]:
    """Retrieval queries from the captions of each item: the first caption of each (the standard
    protocol) or all of them, and for each query the index of its item."""
    texts, owners = [], []
    for item, item_captions in enumerate(captions):
        for caption in item_captions if all_captions else item_captions[:1]:
            texts.append(caption)
            owners.append(item)
    return texts, owners
