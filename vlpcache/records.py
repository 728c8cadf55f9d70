"""Settings stored as JSON (cache manifest, run config, index metadata), read back by one rule.

Keys the dataclass does not know are dropped on reading, so a file written by a newer vlpcache
with extra settings still loads; a missing key takes the field's default.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

R = TypeVar("R", bound="JsonRecord")


class JsonRecord:
    """Mixin for dataclasses: `to_json()` and `from_json(data)`."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls: type[R], data: dict) -> R:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
