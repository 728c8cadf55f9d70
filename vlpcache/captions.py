"""Caption files, read by pretraining and evaluation alike.

JSON Lines: one object per video, {"video": id, "captions": [...]} (extra keys such as "split" are
kept aside). CSV: a header with `video` and `caption` columns, one row per caption, several rows per
video allowed.

A video is named by its item id (its path below the extracted root, without extension: `clips/a`), or
by a file name or path that ends in it: `a.mp4`, `clips/a.mp4`, `/data/clips/a.mp4` or `clips\\a.mp4`
name the item `clips/a` when no item is called that key itself (Captions.matched_to).
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

    def matched_to(self, ids) -> tuple["Captions", list[tuple[str, str]]]:
        """These captions keyed by item id where a key names an item by file name or path (`a.mp4` for the
        item `a`, see item_named_by); keys that are ids, or name none, stay as they are. Also the
        (key, item id) pairs that were matched that way, in file order."""
        known = set(ids)
        by_id, splits, renamed = {}, {}, []
        for key, texts in self.by_id.items():
            item = key if key in known else item_named_by(key, known) or key
            if item != key:
                renamed.append((key, item))
            by_id.setdefault(item, []).extend(texts)
            if key in self.splits:
                splits[item] = self.splits[key]
        if not renamed:
            return self, []
        return replace(self, by_id=by_id, splits=splits), renamed

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


def named_by_path_text(pairs: list[tuple[str, str]]) -> str:
    """", N caption ids name their video by file name or path (e.g. 'a.mp4' for 'a')", or ""."""
    if not pairs:
        return ""
    key, item = pairs[0]
    return f", {len(pairs)} caption id{'s' if len(pairs) != 1 else ''} name their video by file name or path (e.g. {key!r} for {item!r})"


def item_named_by(key: str, ids: set[str]) -> str | None:
    """The item id among `ids` that a caption key names as a file name or path: the longest tail of its
    path (`/` or `\\` separated), with or without the file's extension, that is an id; None if none is."""
    parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        return None
    stem, extension = os.path.splitext(parts[-1])
    for start in range(len(parts)):
        for last in (parts[-1], stem) if extension else (parts[-1],):
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
