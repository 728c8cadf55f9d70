"""JSON files (cache manifest, run config, checkpoint meta, index metadata), read and written by one rule.

Writes are atomic (files.replace_atomically). Reads of a file the command needs end in one UserError
line naming the file: `missing` says what to do when it is absent, a damaged file is "unreadable".
Optional files (best.json, roots.json, the query export's config) read as None when absent or damaged.

`JsonRecord` dataclasses drop keys they do not know on reading, so a file written by a newer vlpcache
with extra settings still loads; a missing key takes the field's default.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from vlpcache.errors import UserError
from vlpcache.files import FileWrite, create_atomically, replace_atomically

R = TypeVar("R", bound="JsonRecord")


def write_json(path: Path, data: Any, keep_existing: bool = False) -> bool:
    """`data` as UTF-8 JSON in `path`, replaced atomically; with keep_existing, only created: a file
    already there (another process's) stays, and the result is False."""
    path, write, _ = json_file(path, data)
    if keep_existing:
        return create_atomically(path, write)
    replace_atomically(path, write)
    return True


def json_file(path: Path, data: Any) -> FileWrite:
    """`data` as the UTF-8 JSON file `path`, to be written with others by files.replace_together."""
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return Path(path), write, ""


def read_json(path: Path, missing: str, what: str = "", fix: str = "") -> Any:
    """The JSON value in `path`. Absent: UserError(missing). Damaged: UserError("<path>: unreadable <what>
    (<error>); <fix>")."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(_unreadable(path, what, err, fix)) from None


def read_optional_json(path: Path) -> Any | None:
    """The JSON value in `path`, or None when the file is absent or damaged."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def json_lines(text: str, keepends: bool = False) -> list[str]:
    """The lines of a JSON Lines file: split at "\n" only. str.splitlines also ends a line at U+0085, U+2028 and
    U+2029, which json.dumps(ensure_ascii=False) leaves as they are inside a string (a file name, a caption): such
    a record would be two torn halves, passed over as a crash's torn line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":  # after the last line's newline
        lines.pop()
        return [line + "\n" for line in lines] if keepends else lines
    return [line + "\n" for line in lines[:-1]] + lines[-1:] if keepends else lines


def _unreadable(path: Path, what: str, err: Exception, fix: str) -> str:
    return f"{path}: unreadable{' ' + what if what else ''} ({err})" + (f"; {fix}" if fix else "")


class JsonRecord:
    """Mixin for dataclasses: `to_json()`, `from_json(data)` and `read(path, ...)`."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls: type[R], data: dict) -> R:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def read(cls: type[R], path: Path, missing: str, what: str = "", fix: str = "") -> R:
        """The record stored in `path` (see read_json); a value of the wrong shape is unreadable too."""
        data = read_json(path, missing, what, fix)
        try:
            return cls.from_json(data)
        except (TypeError, AttributeError) as err:
            raise UserError(_unreadable(Path(path), what, err, fix)) from None
