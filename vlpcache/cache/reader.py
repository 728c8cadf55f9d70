"""Random access to a region cache by index or id, safe in DataLoader workers.

The reader lists the finished shards and their ids once, closes every file, and opens shards lazily
per process on first read: h5py handles do not survive fork, so a handle opened in the parent is
never used in a worker. refresh() lists again only the shards committed (or replaced) since.

Every shard is checked against the manifest by its own attributes and array shapes: a shard made with
other settings (copied in from another cache, or a manifest edited by hand) is left out, as is one
that cannot be read or whose arrays disagree in rows or dtypes (schema.layout_damage); each is reported
once per process and listed in `ignored_shards` and `unreadable_shards`, so that no reader (inspect, pretrain, index, eval) mixes shapes or features.

Shards carry a checksum per chunk (fletcher32; shards of earlier versions have none): a chunk damaged
on disk or in a copy fails to read, and the read raises DamagedShard, one line that names the shard
and the way out, instead of handing other numbers to training or search; so does a row holding a value that
extract never writes: a NaN or an infinity (schema.not_finite), one out of its array's range (schema.out_of_range:
a box of 3e38 is finite, and made an index's embedding NaN). An item's read that fails so
is recorded in the cache (`damaged/`, where the cache can be written): from then on every reader leaves
that row out, as if the item had not been extracted (a reader that found it leaves it out even where
the record could not be written), so the next `vlpcache extract` extracts it again. The commands go on without it:
training takes another item in its place, validation and eval read it as a blank (BlankWhenDamaged),
`index` leaves it out, search shows the hit without boxes (model/data.py, index/).
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import unicodedata
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from vlpcache.cache.labels import value_bounds
from vlpcache.cache.manifest import (UNREADABLE, first_line, lock_refused, newer_hdf5, open_shard, read_damaged,
                                     read_failures, read_manifest, read_moves, read_removed, shard_file_differences)
from vlpcache.cache.schema import (COMMITTED_ATTR, DAMAGED_DIR, SHARD_DIR, SHARD_SUFFIX, TIMES_ATTR, TIMES_FROM_VIDEO,
                                   CacheSettings, not_finite, out_of_range)
from vlpcache.cache.writer import RecordLog
from vlpcache.captions import item_named
from vlpcache.errors import UserError
from vlpcache.files import folder_bytes, open_files_limit
from vlpcache.report import Say, date_text, printable, say


_reported: set[tuple[Path, str]] = set()  # shard problems already reported in this process
DAMAGE_LINES = 5  # items found damaged said in a line each, by one reader (a damaged chunk of 256 rows is 256 items)


def say_damage(line: str, count: int, say: Say = say) -> None:
    """Say that an item was found damaged, the `count`-th a reader found: the first DAMAGE_LINES in a line
    each, then one line that the rest are recorded without one."""
    if count <= DAMAGE_LINES:
        say(line)
    if count == DAMAGE_LINES:
        say(f"(items found damaged after these {DAMAGE_LINES} are recorded without a line each; `vlpcache inspect "
            "--failures` lists them all)")


class DamagedShard(UserError):
    """A finished shard whose data no longer reads (a checksum or decompression failure); `reason` is
    h5py's first line."""

    def __init__(self, message: str, reason: str = "", unrecorded: str = ""):
        super().__init__(message)
        self.reason = reason
        self.unrecorded = unrecorded  # why the cache could not record it (not this user's to write), "" where it did


def _damage(shard: Path, what: str, reason: str) -> str:
    return f"{shard}: {what} cannot be read ({reason}): the shard is damaged (a disk fault or a bad copy)"


@contextlib.contextmanager
def reading(shard: Path, what: str):
    """Within: an OSError of h5py reading `what` of `shard` (a checksum or decompression failure) is
    DamagedShard, one line with the way out."""
    try:
        yield
    except OSError as err:
        reason = first_line(err)
        raise DamagedShard(f"{_damage(shard, what, reason)}; move it out of {shard.parent} and run `vlpcache extract` "
                           "again to redo its items", reason) from None


def _decode(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


class _Row(NamedTuple):
    id: str
    path: str
    kind: str
    source: str  # the stamp of what it was extracted from
    replaces: str  # the stamp of the row it replaces (its source changed and extract redid it), or ""
    committed: float  # its shard's commit time, 0 for shards before it was kept
    times_from: str  # where its timestamps count from (schema.TIMES_ATTR): its shard's
    location: tuple[int, int]  # (shard, row)


def _current(rows: list[_Row], sound) -> _Row | None:
    """Of the rows of one id, the one extract wrote last: the one no other row replaces (by stamps, not
    clocks: a writer on a node whose clock is behind still replaces), else the one committed last (two
    writers given overlapping work), else the first; of those, one that `sound(row)` (not found damaged),
    else None: a damaged row leaves its item out, the rows it replaced stay replaced."""
    replaced = {row.replaces for row in rows if row.replaces}
    live = [row for row in rows if row.source not in replaced] or rows
    live = [row for row in live if sound(row)]
    return max(live, key=lambda row: row.committed) if live else None


def _moved(path: str, moves: list[dict]) -> str:
    """Where the file at `path` is now, following its item's move records (oldest first) from there (the
    records of an older row of the item start elsewhere, and are passed over)."""
    for move in moves:
        if move.get("from") == path and isinstance(move.get("to"), str):
            path = move["to"]
    return path


class _Flat:
    """The rows of the shards a cache reads, shard after shard: a column each (positions in them are
    `start[s] + row`), and for each shard s its commit time and where its times count from."""

    def __init__(self, ids, paths, kinds, sources, replaces, start, size, committed, times_from, shard_of_key, shard,
                 row):
        self.ids, self.paths, self.kinds, self.sources, self.replaces = ids, paths, kinds, sources, replaces
        self.start: dict[int, int] = start  # shard -> the position of its first row
        self.size: dict[int, int] = size  # shard -> how many rows it holds
        self.committed, self.times_from = committed, times_from  # by shard
        self.shard_of_key: dict[str, int] = shard_of_key  # "<name>@<commit time>" -> shard
        self.shard, self.row = shard, row  # (P,) int64 each: the shard and row of each position


# an open shard holds about 0.8 MB of HDF5's own structures whatever its size, and a training epoch reads every
# shard in random order (WebVid's 2.5M videos are 5,000 shards: 4 GB in each loading process): a reader keeps at
# most this many open (about 0.8 GB; 524k items in shards of 512), and opens again one it let go (about 5 ms a
# read here against 1 ms); VLPCACHE_OPEN_SHARDS sets another bound
MAX_OPEN_SHARDS = 1024


def open_shards_bound() -> int:
    """MAX_OPEN_SHARDS, or VLPCACHE_OPEN_SHARDS where it is set; at most half the files this process may hold
    open (its soft limit raised to its hard one first: open_files_limit), so that `ulimit -n 1024` leaves room
    for the rest (a DataLoader's pipes and shared memory): 1,024 shards kept open there was "Too many open files"
    in inspect, index and pretrain of a cache of more than about 1,000 shards."""
    text = os.environ.get("VLPCACHE_OPEN_SHARDS", "").strip()
    if text and (not text.isdigit() or int(text) < 1):
        raise UserError(f"VLPCACHE_OPEN_SHARDS={text!r}: give how many shard files a cache reader may keep open, "
                        f"a whole number of at least 1 (each holds about 0.8 MB; unset: {MAX_OPEN_SHARDS})")
    return min(int(text) if text else MAX_OPEN_SHARDS, max(8, open_files_limit() // 2))


class RegionCache:
    """A read-only view of every finished shard in a cache directory.

    `cache[i]`, `cache[id]` and `cache.get(id)` return one video's arrays (the names of settings.arrays())
    plus "id", "path", "kind", "source" and "times_from"; `cache[i:j]` a list of them. `with RegionCache(...)
    as cache:` closes its shard files at the end.
    """

    def __init__(self, cache_dir: str | os.PathLike, say: Say = say, say_damaged: bool = True):
        self.cache_dir = Path(cache_dir).absolute()  # a notebook's %cd later changes nothing
        self._say = say  # where left-out shards are reported (inspect lists them itself)
        self._say_damaged = say_damaged  # and items left out as found damaged (extract says what it does about them)
        if not self.cache_dir.is_dir():
            raise UserError(f"{self.cache_dir}: no such cache directory; run `vlpcache extract` first")
        self.settings: CacheSettings = read_manifest(self.cache_dir)
        self._array_names = tuple(spec.name for spec in self.settings.arrays())
        self._bounds = value_bounds(self.settings.detector)  # what a read takes for damage beyond: schema.out_of_range
        self._handles: dict[int, h5py.File] = {}  # the open shards, the one used longest ago first
        self._open_bound = open_shards_bound()
        self._pid = os.getpid()
        self._found_damaged: dict[tuple[str, int], dict] = {}  # (shard key, row) -> record: found by this reader
        self._damage_lines: dict[tuple[str, int], str] = {}  # and the line that said it
        # (shard key, array) whose whole read failed: read row by row from then on (a failing read of a damaged
        # string's heap reference can take seconds)
        self._row_by_row: set[tuple[str, str]] = set()
        # shard name -> ((inode, size, mtime), _list_shard's listing): a committed shard is never written again, so
        # a refresh lists only the shards new or changed since (a server's, at each commit of a running extract)
        self._listings: dict[str, tuple[tuple[int, int, int], tuple]] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-list the shards (other processes may have committed more since): the shards listed before are
        not read again (_listed), and the rows are put together a column at a time, not row by row."""
        self.close()
        self.shard_paths: list[Path] = sorted((self.cache_dir / SHARD_DIR).glob(f"*{SHARD_SUFFIX}"))
        self.unreadable_shards: dict[Path, str] = {}  # shard -> why it cannot be read
        self.ignored_shards: dict[Path, list[str]] = {}  # shard -> how its settings differ from the manifest's
        # the keys of the shards whose items are read, "<name>@<commit time>": a name that comes back
        # (a shard moved out, and extract writing its items again) is another shard
        self.read_shards: list[str] = []
        self._shard_keys: dict[int, str] = {}
        flat = self._flat_listing()
        kept = self._current_rows(flat)  # the position in `flat` of each item's row, in order of its first row
        if kept is None:  # each id once, none left out: the columns as they are
            kept = np.arange(len(flat.ids), dtype=np.int64)
            pick = lambda column: column  # noqa: E731
        else:
            pick = lambda column: [column[p] for p in kept.tolist()]  # noqa: E731
        self.ids: list[str] = pick(flat.ids)
        self.paths: list[str] = pick(flat.paths)
        self.kinds: list[str] = pick(flat.kinds)
        self.sources: list[str] = pick(flat.sources)  # stamps (extract/stamps.py), "" in older shards
        self._index_of = seen = dict(zip(self.ids, range(len(self.ids))))
        self.moved: set[str] = set()  # cached items read from the paths extract found them at since
        for item_id, moves in read_moves(self.cache_dir).items():  # found at other paths since: the latest
            if (i := seen.get(item_id)) is not None:
                self.paths[i] = _moved(self.paths[i], moves)
                self.moved.add(item_id)
        if self.damaged and self._say_damaged:
            example = next(iter(self.damaged.values()))
            self._report_once(self.cache_dir, f"{self.cache_dir}: {len(self.damaged)} item(s) found damaged by an earlier "
                              f"read (e.g. {example['id']!r}, row {example['row']} of {example['shard'].split('@')[0]}) "
                              "are left out until `vlpcache extract` extracts them again")
        shards = flat.shard[kept]
        self.committed: list[float] = np.asarray(flat.committed, np.float64)[shards].tolist()  # its shard's commit
        # time, 0 in older shards; where its timestamps count from: schema.TIMES_FROM_FILE, or _VIDEO in older shards
        self.times_from: list[str] = np.asarray(flat.times_from, dtype=object)[shards].tolist()
        self._locations = np.stack([shards, flat.row[kept]], axis=1).reshape(-1, 2)

    def _flat_listing(self) -> "_Flat":
        """Every row of the shards that agree with the manifest, shard after shard, a column each; sets
        read_shards and _shard_keys."""
        flat = _Flat([], [], [], [], [], {}, {}, {}, {}, {}, np.zeros(0, np.int64), np.zeros(0, np.int64))
        shard_of, row_of = [], []
        for s, shard in enumerate(self.shard_paths):
            listing = self._listed(shard)
            if listing is None:
                continue
            ids, paths, kinds, sources, replaces, when, times_from = listing
            self._shard_keys[s] = f"{shard.name}@{when!r}"
            self.read_shards.append(self._shard_keys[s])
            flat.start[s], flat.size[s], flat.committed[s], flat.times_from[s] = len(flat.ids), len(ids), when, times_from
            flat.shard_of_key[self._shard_keys[s]] = s
            for column, values in zip((flat.ids, flat.paths, flat.kinds, flat.sources, flat.replaces),
                                      (ids, paths, kinds, sources, replaces)):
                column.extend(values)
            shard_of.append(np.full(len(ids), s, np.int64))
            row_of.append(np.arange(len(ids), dtype=np.int64))
        listed = {shard.name for shard in self.shard_paths}
        self._listings = {name: kept for name, kept in self._listings.items() if name in listed}  # moved out: let go
        flat.committed = [flat.committed.get(s, 0.0) for s in range(len(self.shard_paths))]
        flat.times_from = [flat.times_from.get(s, TIMES_FROM_VIDEO) for s in range(len(self.shard_paths))]
        if shard_of:
            flat.shard, flat.row = np.concatenate(shard_of), np.concatenate(row_of)
        return flat

    def _current_rows(self, flat: "_Flat") -> np.ndarray | None:
        """The position in `flat` of the row read for each item (_current), in order of its first row, None
        where that is every row (each id stored once, none left out); sets `damaged` and `removed`, the items
        whose rows are all left out."""
        n = len(flat.ids)
        first = dict(zip(reversed(flat.ids), range(n - 1, -1, -1)))  # id -> the position of its first row
        others: dict[int, list[int]] = {}  # first position -> the other rows of an id stored more than once
        if len(first) < n:
            for p, item_id in enumerate(flat.ids):
                if (f := first[item_id]) != p:
                    others.setdefault(f, []).append(p)
        damaged = {**read_damaged(self.cache_dir), **self._found_damaged}  # (shard key, row) -> record
        removed = read_removed(self.cache_dir)  # rows of files no longer there, dropped by extract --prune
        left_out = {**damaged, **removed}  # a damaged row whose file is gone since, pruned: dropped
        groups = set(others)
        for key, row in left_out:
            s = flat.shard_of_key.get(key)
            if s is not None and 0 <= row < flat.size[s]:
                groups.add(first[flat.ids[flat.start[s] + row]])

        def as_row(p: int) -> _Row:
            s, row = int(flat.shard[p]), int(flat.row[p])
            return _Row(flat.ids[p], flat.paths[p], flat.kinds[p], flat.sources[p], flat.replaces[p],
                        flat.committed[s], flat.times_from[s], (s, row))

        def key(row: _Row) -> tuple[str, int]:
            return self._shard_keys[row.location[0]], row.location[1]

        # items whose current row was found damaged (left out until extract redoes them), or dropped: id -> record
        self.damaged: dict[str, dict] = {}
        self.removed: dict[str, dict] = {}
        chosen: dict[int, int | None] = {}
        for f in sorted(groups):
            rows = [as_row(p) for p in (f, *others.get(f, []))]
            now = _current(rows, lambda r: key(r) not in left_out)
            chosen[f] = None if now is None else flat.start[now.location[0]] + now.location[1]
            if now is None:
                at = next(r for r in rows if key(r) in left_out)
                if key(at) in removed:
                    self.removed[flat.ids[f]] = left_out[key(at)]
                else:  # with the path it was cached from: `extract --prune` drops it once that is gone
                    self.damaged[flat.ids[f]] = {"path": at.path, **left_out[key(at)]}
        if not chosen:
            return None
        firsts = sorted(first.values()) if others else range(n)
        return np.array([p for p in (chosen.get(f, f) for f in firsts) if p is not None], dtype=np.int64)

    def _listed(self, shard: Path) -> tuple | None:
        """_list_shard's listing, the one kept where the shard's file is the one listed before (the same inode,
        size and modification time: a name that comes back, or a shard damaged on disk, is listed again); one
        left out is listed again at each refresh (it may be readable since)."""
        try:
            stat = shard.stat()
            file = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except OSError:  # gone meanwhile: _list_shard says so
            file = None
        kept = self._listings.get(shard.name)
        if file is not None and kept is not None and kept[0] == file:
            return kept[1]
        self._listings.pop(shard.name, None)
        listing = self._list_shard(shard)
        if listing is not None and file is not None:
            self._listings[shard.name] = (file, listing)
        return listing

    def _list_shard(self, shard: Path) -> tuple[list[str], list[str], list[str], list[str], list[str], float, str] | None:
        """(ids, paths, kinds, source stamps, the stamps they replace, commit time, where its times count from) of a
        shard that agrees with the manifest; None, reported once, otherwise."""
        try:
            with open_shard(shard) as f:
                diffs = shard_file_differences(f, self.settings)
                if not diffs:
                    ids = _decode(f["ids"][:])
                    sources, replaces = (_decode(f[name][:]) if name in f else [""] * len(ids)
                                         for name in ("sources", "replaces"))
                    return (ids, _decode(f["paths"][:]), _decode(f["kinds"][:]), sources, replaces,
                            float(f.attrs.get(COMMITTED_ATTR, 0.0)), str(f.attrs.get(TIMES_ATTR, TIMES_FROM_VIDEO)))
        except UNREADABLE as err:
            if not os.access(shard, os.R_OK):  # not damaged: another user's file (a umask of 077)
                self.unreadable_shards[shard] = "Permission denied (EACCES)"
                self._report_once(shard, f"{shard}: this user may not read it (Permission denied (EACCES)); its items "
                                  "are left out: another user's file? its owner can make it readable (chmod a+r)")
                return None
            self.unreadable_shards[shard] = first_line(err)
            way = (lock_refused(err) or newer_hdf5(self.unreadable_shards[shard])
                   or "move it out of the cache and run extract again to redo them")
            self._report_once(shard, f"{shard}: unreadable shard ({self.unreadable_shards[shard]}); its items are left out: "
                                f"{way}")
            return None
        self.ignored_shards[shard] = diffs
        self._report_once(shard, f"{shard}: made with other settings than the cache ({'; '.join(diffs[:3])}); its items "
                            "are left out: move it out of the cache, or into a cache of its own")
        return None

    def _report_once(self, shard: Path, line: str) -> None:
        if (shard, line) not in _reported:
            _reported.add((shard, line))
            self._say(line)

    @property
    def notes(self) -> dict[str, str]:
        """Items kept despite problems (a truncated video, unreadable frames in a folder): id -> what went
        wrong, as extract reported it. Shards written before notes were kept have none."""
        by_shard, notes = {}, {}
        for s in np.unique(self._locations[:, 0]):
            if "notes" not in self._shard(int(s)):
                by_shard[int(s)] = None
            elif (whole := self._whole_or_none(int(s), "notes")) is not None:
                by_shard[int(s)] = _decode(whole)
            else:  # a row of them does not read (strings carry no checksum of their own): one by one
                by_shard[int(s)] = None
                for index in np.flatnonzero(self._locations[:, 0] == s):
                    with contextlib.suppress(DamagedShard):
                        if note := self.note_of(self.ids[index]):
                            notes[self.ids[index]] = note
        for item_id, (s, row) in zip(self.ids, self._locations.tolist()):
            if by_shard[s] is not None and (note := by_shard[s][row]):
                notes[item_id] = note
        return notes

    def note_of(self, item_id: str) -> str:
        """What went wrong with an item kept anyway; "" for most."""
        s, row = self._locations[self.index_of(item_id)]
        notes = self._shard_datasets(int(s)).get("notes")
        if notes is None:
            return ""
        try:
            with reading(self.shard_paths[int(s)], f"the note of {item_id!r}"):
                return _decode([notes[row]])[0]
        except DamagedShard as err:
            raise self._damaged_row(self.index_of(item_id), err.reason) from None

    def left_out_line(self, key: str) -> str | None:
        """Why `key` names no item where it names one this cache leaves out (as `captions.item_named` names
        items): dropped by `extract --prune` because its file was gone, its row found damaged, or it failed to
        extract; None where it names none of them."""
        failed = {item_id: record for item_id, record in self.failures.items() if item_id not in self._index_of}
        for records in (self.removed, self.damaged, failed):
            item_id = key if key in records else item_named(key, list(records))[0]
            if item_id is None:
                continue
            record = records[item_id]
            when = date_text(record.get("time", 0))
            if records is failed:
                return (f"{item_id!r} did not extract: {printable(str(record.get('reason', 'it failed')))} "
                        f"({printable(str(record.get('path', '')))}, on {when}); mend or replace the file and extract its "
                        "folder again (`inspect --failures` lists every failure)")
            if records is self.removed:
                return (f"{item_id!r} was dropped from the cache {self.cache_dir} by `vlpcache extract --prune` on {when}: "
                        f"{printable(str(record.get('path', 'its file')))} was gone; once it is back, extract its "
                        "folder again to cache it")
            return (f"{item_id!r} is left out of the cache {self.cache_dir}: its row {record['row']} of "
                    f"{record['shard'].split('@')[0]} was found damaged on {when} "
                    f"({printable(str(record.get('reason', '')))}); the next `vlpcache extract` of its folder "
                    "extracts it again")
        return None

    @property
    def failures(self) -> dict[str, dict]:
        """Failed items not since extracted successfully: id -> {"id", "path", "reason", "time"}. That
        includes a cached item whose source changed and then failed to extract (the cache reads its old row)."""
        def since(item_id: str, record: dict) -> bool:
            i = self._index_of.get(item_id)
            return i is None or 0 < self.committed[i] < record.get("time", 0)

        return {k: v for k, v in read_failures(self.cache_dir).items() if since(k, v)}

    def __len__(self) -> int:
        return len(self.ids)

    def check_not_empty(self) -> None:
        """One line when there is no item to read: none extracted yet, or every shard left out."""
        if len(self):
            return
        left_out = len(self.unreadable_shards) + len(self.ignored_shards)
        newer = any(map(newer_hdf5, self.unreadable_shards.values()))  # not damaged: moved out, they would be lost
        if left_out:
            raise UserError(f"{self.cache_dir}: none of its {left_out} shard(s) can be read as its manifest describes "
                            f"(reported above); {'upgrade h5py for those a newer HDF5 wrote, ' if newer else ''}"
                            f"move {'the others' if newer else 'them'} out and extract again, or pass another cache")
        raise UserError(f"cache {self.cache_dir} holds no items yet; run `vlpcache extract` first")

    def ids_in_shards(self, keys: set[str]) -> list[str]:
        """The items the cache reads from the shards of these keys (read_shards)."""
        wanted = [s for s, key in self._shard_keys.items() if key in keys]
        return [self.ids[r] for r in np.flatnonzero(np.isin(self._locations[:, 0], wanted))]

    def shard_key_of(self, item_id: str) -> str:
        """The key (read_shards) of the shard the cache reads an item from."""
        return self._shard_keys[int(self._locations[self.index_of(item_id)][0])]

    def found_damage_since_listed(self) -> bool:
        """Whether a read found a row of an item the listing holds damaged (refresh() leaves it out)."""
        return any(record["id"] in self._index_of and self.row_of(record["id"]) == key
                   for key, record in self._found_damaged.items())

    def row_of(self, item_id: str) -> tuple[str, int]:
        """(shard key, row) of the row the cache reads an item from: what a damaged or removed record names."""
        s, row = (int(x) for x in self._locations[self.index_of(item_id)])
        return self._shard_keys[s], row

    def shard_of(self, item_id: str) -> str:
        """The name of the shard the cache reads an item from."""
        return self.shard_paths[int(self._locations[self.index_of(item_id)][0])].name

    def __contains__(self, item_id: str) -> bool:
        return self._held_id(item_id) is not None

    def index_of(self, item_id: str) -> int:
        if (held := self._held_id(item_id)) is None:
            raise KeyError(f"{item_id!r} is not in cache {self.cache_dir}")
        return self._index_of[held]

    def _held_id(self, item_id: str) -> str | None:
        """The id the cache holds `item_id` by: itself, or the same in the other Unicode normal form where the cache
        holds one item so (an id typed composed, NFC, where the file's name was decomposed, NFD: macOS, some zips;
        as Searcher.indexed_item takes it); None where it holds none."""
        if item_id in self._index_of:
            return item_id
        if not isinstance(item_id, str):
            return None
        forms = {unicodedata.normalize(form, item_id) for form in ("NFC", "NFD")} & self._index_of.keys()
        return next(iter(forms)) if len(forms) == 1 else None

    def _shard(self, s: int) -> h5py.File:
        if os.getpid() != self._pid:  # forked into a worker: the parent's handles are not ours to use
            self.close()
            self._pid = os.getpid()
        f = self._handles.pop(s, None)
        if f is None:
            if len(self._handles) >= self._open_bound:
                self._close_shard(next(iter(self._handles)))  # the one used longest ago
            f = self._open_shard_file(s)
        self._handles[s] = f  # last: the most recently used
        return f

    def _open_shard_file(self, s: int) -> h5py.File:
        """Shard s's file. Where the process has no file left to open (the rest of a program's, or a limit lowered
        since), half of those this reader keeps go and it keeps fewer from then on; where that frees none, one line."""
        try:
            return open_shard(self.shard_paths[s])
        except OSError as err:
            if err.errno != errno.EMFILE:
                raise
        for kept in list(self._handles)[: (len(self._handles) + 1) // 2]:
            self._close_shard(kept)
        self._open_bound = max(1, len(self._handles))
        try:
            return open_shard(self.shard_paths[s])
        except OSError as err:
            if err.errno != errno.EMFILE:
                raise
            raise UserError(f"{self.cache_dir}: this process may open no more files (`ulimit -n` "
                            f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]}) to read shard {self.shard_paths[s].name}"
                            "; raise `ulimit -n`, or set VLPCACHE_OPEN_SHARDS lower") from None

    def _close_shard(self, s: int) -> None:
        """Let shard s go: its file closes with the last reference to it and its datasets. Not with h5py's
        File.close(), which walks every h5py object alive in the process (each open shard's file and datasets):
        a reader that had read 1,200 shards took 108 s to close them one by one."""
        self._datasets.pop(s, None)
        del self._handles[s]

    def _shard_datasets(self, s: int) -> dict:
        """Shard s's datasets by name: the arrays, and "notes" where the shard has them (looking a dataset
        up by name costs more than reading one video's row, so each is looked up once)."""
        f = self._shard(s)
        datasets = self._datasets.get(s)
        if datasets is None:
            datasets = self._datasets[s] = {name: f[name] for name in (*self._array_names, "notes") if name in f}
        return datasets

    def __getitem__(self, key: int | str | slice) -> dict | list[dict]:
        if isinstance(key, str):
            return self.get(key)
        if isinstance(key, slice):
            return [self.read(i) for i in range(*key.indices(len(self)))]
        return self.read(key)

    def __repr__(self) -> str:
        return f"RegionCache({str(self.cache_dir)!r}: {len(self)} items, {self.settings.frames} frames x {self.settings.regions} regions)"

    def __enter__(self) -> "RegionCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, index: int, names: tuple[str, ...] | str | None = None) -> dict:
        """One video's arrays, all of settings.arrays() or only `names` (search shows boxes without reading
        features, the bulk of a video), plus "id", "path", "kind", "source" (its stamp) and "times_from" (where its
        timestamps count from: schema.TIMES_ATTR)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"a cache is read by position (int), id (str) or slice, not {type(index).__name__}")
        if isinstance(names, str):
            names = (names,)
        if names is not None and (unknown := [n for n in names if n not in self._array_names]):
            raise KeyError(f"{unknown[0]!r} is no array of cache {self.cache_dir} (its arrays: "
                           f"{', '.join(self._array_names)})")
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)} items")
        s, row = self._locations[index]
        if (line := self._damage_lines.get((self._shard_keys[int(s)], int(row)))) is not None:
            found = self._found_damaged[self._shard_keys[int(s)], int(row)]
            raise DamagedShard(line, found["reason"], found.get("unrecorded", ""))
        datasets = self._shard_datasets(int(s))
        try:
            with reading(self.shard_paths[int(s)], f"item {self.ids[index]!r}"):
                item = {name: datasets[name][row] for name in (names or self._array_names)}
        except DamagedShard as err:
            raise self._damaged_row(index, err.reason) from None
        if name := not_finite(item):
            raise self._damaged_row(index, f"its {name!r} hold values that are not numbers") from None
        if beyond := out_of_range(item, self._bounds):
            raise self._damaged_row(index, beyond) from None
        item["id"], item["path"], item["kind"] = self.ids[index], self.paths[index], self.kinds[index]
        item["source"], item["times_from"] = self.sources[index], self.times_from[index]
        return item

    def get(self, item_id: str, names: tuple[str, ...] | str | None = None) -> dict:
        return self.read(self.index_of(item_id), names)

    def blank(self, item: int | str) -> dict:
        """An item as read (by index, or by id: one the cache holds or left out as damaged), with no frame
        and no region: zeros, every mask False (for an item whose row is damaged, where its place must be
        kept)."""
        blank = {spec.name: np.zeros(self.settings.shape_of(spec), dtype=spec.dtype) for spec in self.settings.arrays()}
        if isinstance(item, str) and item in self.damaged:
            return {**blank, "id": item, "path": "", "kind": "", "source": "", "times_from": TIMES_FROM_VIDEO}
        index = self.index_of(item) if isinstance(item, str) else item
        return {**blank, "id": self.ids[index], "path": self.paths[index], "kind": self.kinds[index],
                "source": self.sources[index], "times_from": self.times_from[index]}

    def _damaged_row(self, index: int, reason: str) -> DamagedShard:
        """Record that item `index`'s row does not read, in this reader and in the cache's log (where it can
        be written); the DamagedShard that says so and what happens next."""
        s, row = (int(x) for x in self._locations[index])
        shard, item_id = self.shard_paths[s], self.ids[index]
        record = {"id": item_id, "shard": self._shard_keys[s], "row": row, "reason": reason}
        self._found_damaged[record["shard"], row] = record
        unwritten = ""
        try:
            log = RecordLog(self.cache_dir / DAMAGED_DIR / f"{socket.gethostname()}-{os.getpid()}.jsonl")
            try:
                log.append(record)
            finally:
                log.close()
        except OSError as err:
            unwritten = err.strerror or type(err).__name__
            record["unrecorded"] = unwritten  # in this reader only
        line = _damage(shard, f"item {item_id!r}", reason)
        if unwritten:
            line += (f"; it could not be recorded in the cache ({unwritten}): move the shard out of {shard.parent} and run "
                     "`vlpcache extract` again to redo its items")
        else:
            line += f"; recorded in {self.cache_dir / DAMAGED_DIR}: the next `vlpcache extract` extracts it again"
        self._damage_lines[record["shard"], row] = line  # a read of it again says so without reading or recording
        return DamagedShard(line, reason, unwritten)

    def shard_columns(self, names: tuple[str, ...]):
        """For each shard the cache reads, {name: array of its videos' rows}, one shard at a time: for
        totals over a cache of millions of videos in the memory of one shard (a row that another shard
        holds too is counted where the cache takes it from, as everywhere else)."""
        order = np.argsort(self._locations[:, 0], kind="stable")  # the items, shard by shard
        by_shard = self._locations[order]  # (V, 2) shard, row
        shards, starts = np.unique(by_shard[:, 0], return_index=True)
        for s, rows, items in zip(shards, np.split(by_shard[:, 1], starts[1:]), np.split(order, starts[1:])):
            wholes = [self._whole_or_none(int(s), name) for name in names]
            if all(whole is not None for whole in wholes):
                yield {name: whole[rows] for name, whole in zip(names, wholes)}
            else:  # a row of the shard does not read (one the cache reads, or one it left out)
                yield self._sound_rows(items, names)

    def _sound_rows(self, items, names: tuple[str, ...]) -> dict:
        """{name: array} of these items read one by one, those that do not read left out (and recorded, as any
        read of a damaged row is)."""
        kept = []
        for index in items:
            with contextlib.suppress(DamagedShard):
                kept.append(self.read(int(index), names))
        specs = {spec.name: spec for spec in self.settings.arrays()}
        return {name: np.stack([item[name] for item in kept]) if kept else
                np.zeros((0, *self.settings.shape_of(specs[name])), dtype=specs[name].dtype) for name in names}

    def column(self, name: str) -> np.ndarray:
        """One array for every video in cache order, read a shard at a time (e.g. "frame_mask")."""
        parts = {}
        for s in np.unique(self._locations[:, 0]):
            parts[int(s)] = self._whole(int(s), name)
        if not parts:
            spec = next(a for a in self.settings.arrays() if a.name == name)
            return np.zeros((0, *self.settings.shape_of(spec)), dtype=spec.dtype)
        return np.stack([parts[int(s)][row] for s, row in self._locations])

    def _whole_or_none(self, s: int, name: str) -> np.ndarray | None:
        """Every row of one array of shard s, or None where a row of it does not read (remembered: the
        array is read row by row from then on, in this reader)."""
        key = (self._shard_keys[s], name)
        if key in self._row_by_row:
            return None
        try:
            return self._whole(s, name)
        except DamagedShard:
            self._row_by_row.add(key)
            return None

    def _whole(self, s: int, name: str) -> np.ndarray:
        """Every row of one array of shard s."""
        with reading(self.shard_paths[s], f"its {name!r}"):
            return self._shard(s)[name][:]

    def size_on_disk(self) -> int:
        return folder_bytes(self.cache_dir)

    def close(self) -> None:
        """Let every shard go (_close_shard: its file closes with the last reference to it)."""
        self._datasets = {}
        self._handles = {}

    def __getstate__(self):  # picklable for spawn-started workers: handles are reopened there
        state = self.__dict__.copy()
        state["_handles"] = {}
        state["_datasets"] = {}
        state["_listings"] = {}  # a worker reads; it lists again only where it refreshes
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class BlankWhenDamaged:
    """cache[r] (an index, or an id, which may be one the cache left out as damaged), where an item whose
    row is found damaged reads as a blank (RegionCache.blank): its row kept in `damaged`, its line said once
    with `then`, what the command does about it, at its end."""

    def __init__(self, cache: RegionCache, then: str, say: Say = say):
        self.cache = cache
        self.then = then
        self.say = say
        self.damaged: set[int] = set()

    def __getitem__(self, r: int | str) -> dict:
        if isinstance(r, str):
            if r in self.cache.damaged:  # found so before (its line said when the cache was listed)
                return self.cache.blank(r)
            r = self.cache.index_of(r)
        if r not in self.damaged:
            try:
                return self.cache[r]
            except DamagedShard as err:
                self.damaged.add(r)
                say_damage(f"{err}; {self.then}", len(self.damaged), self.say)
        return self.cache.blank(r)
