"""Indexed video embeddings and their ids, written for other tools (`vlpcache index --export FILE`,
`Searcher.export(FILE)`).

    FILE.npy        (V, E) float32 L2-normalised global video embeddings, in index order
    FILE.ids.json   the V item ids in the same order (a JSON list: ids are paths and may hold any character)

or, for a name ending in .parquet (needs pyarrow), one table of V rows:

    id          string
    path        string                     the item's source as the cache records it (source_path)
    embedding   fixed_size_list<float32>[E]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlpcache.errors import UserError
from vlpcache.files import FileWrite, is_write_failure, replace_together, write_failure

IDS_SUFFIX = ".ids.json"


def export_embeddings(index, cache, path) -> list[Path]:
    """Write `index`'s embeddings and ids to path (.npy or .parquet; `~` is the home folder, as in a
    shell); returns the files written."""
    path = Path(path).expanduser()
    check_export_path(path)
    embeddings = np.ascontiguousarray(index.embeddings, dtype=np.float32)  # (V, E)
    if path.suffix == ".parquet":
        paths = [source_path(cache, i) for i in index.ids]
        _write_together([(path, _parquet_writer(path, index.ids, paths, embeddings), "")])
        return [path]
    ids_path = path.with_name(path.name[: -len(".npy")] + IDS_SUFFIX)
    _write_together([
        (ids_path, lambda tmp: tmp.write_text(json.dumps(index.ids, ensure_ascii=False), encoding="utf-8"), ""),
        (path, lambda tmp: np.save(tmp, embeddings), ".npy"),
    ])
    return [path, ids_path]


def source_path(cache, item_id: str) -> str:
    """The file an indexed item was extracted from: as the cache records it, or as the record of its row found
    damaged since (its embedding, indexed before, is still of that file); "" where the cache has neither."""
    if item_id in cache:
        return cache.paths[cache.index_of(item_id)]
    return str(cache.damaged.get(item_id, {}).get("path", ""))


def _write_together(files: list[FileWrite]) -> None:
    """The files all or none (the embeddings never beside the ids of another export); a failed write is one line."""
    try:
        replace_together(files)
    except Exception as err:
        if not is_write_failure(err):
            raise
        raise write_failure(files[-1][0], err, "nothing was exported; make room, or export elsewhere") from None


def _parquet_writer(path: Path, ids: list[str], paths: list[str], embeddings: np.ndarray):
    """A function that writes the table to the file it is given."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: Parquet needs pyarrow (pip install pyarrow), or export to a .npy file") from None
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), embeddings.shape[1])  # (V, E)
    table = pa.table({"id": ids, "path": paths, "embedding": vectors})
    return lambda tmp: pq.write_table(table, tmp)


def check_export_path(path) -> None:
    """Refuse, before any work, an export the command could not write at the end."""
    path = Path(path)
    if path.suffix not in (".npy", ".parquet"):
        raise UserError(f"{path}: export to a .npy file (with its ids beside it) or a .parquet file")
    if not path.parent.is_dir():
        raise UserError(f"{path}: no such folder {path.parent}; create it first")
