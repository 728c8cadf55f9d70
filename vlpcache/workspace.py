"""Where caches, runs and indexes live by default, so that the short command forms work.

The workspace is `.vlpcache/` in the current directory, or $VLPCACHE_WORKSPACE:

    .vlpcache/cache/           the region cache written by `extract`
    .vlpcache/runs/<name>/     pretraining runs (checkpoints, logs)
    .vlpcache/index/           the FAISS index of the latest run
    .vlpcache/roots.json       the roots `extract` was given (to find caption files beside them)
    .vlpcache/weights.json     {sha256: path} of the files `extract --weights FILE` was given (to extract a clip
                               outside the cache as its items were: `search --like FILE`, the page's uploads)
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from vlpcache.errors import UserError
from vlpcache.files import not_allowed
from vlpcache.locks import WriterLock
from vlpcache.records import read_optional_json, write_json

ROOTS_NAME = "roots.json"
ROOTS_LOCK = "roots.json.lock"  # held while roots.json is read and written again
WEIGHTS_NAME = "weights.json"
WEIGHTS_LOCK = "weights.json.lock"
MODEL_FILES_HINT = "pass --models DIR or set VLPCACHE_MODELS to the folder that holds it"
FETCH_COMMAND = "vlpcache models fetch"


class Workspace:
    def __init__(self, root: str | os.PathLike | None = None):
        root = root or os.environ.get("VLPCACHE_WORKSPACE") or Path.cwd() / ".vlpcache"
        self.root = Path(root)

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    def new_run_dir(self) -> Path:
        """A fresh run directory runs/run-NNN, the number after the highest, claimed by creating it (two
        `pretrain` started together never share one)."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        taken = [int(p.name[4:]) for p in self.runs_dir.glob("run-*") if p.name[4:].isdigit()]
        number = max(taken, default=0) + 1
        while True:
            path = self.runs_dir / f"run-{number:03d}"
            try:
                path.mkdir()
                return path
            except FileExistsError:
                number += 1

    def remember_roots(self, roots: list[Path]) -> None:
        """Record extract's roots (where pretrain looks for caption files by default); nothing is written
        when they are known already, and a workspace this user cannot write (another's, shared
        read-only) keeps its record as it is: the cache, maybe elsewhere (-o), says for itself."""
        known = self.extracted_roots()
        new = [str(root.resolve()) for root in roots if str(root.resolve()) not in known]
        if not new:
            return

        def with_new() -> list[str]:
            known = self.extracted_roots()  # again, under the lock: another may have added its own since
            return known + [root for root in dict.fromkeys(new) if root not in known]

        self._write_record(ROOTS_NAME, ROOTS_LOCK, with_new)

    def remember_weights(self, sha256: str, path: Path) -> None:
        """Record the weights file `extract --weights` was given, by its sha256 (as a cache records it); a
        workspace this user cannot write keeps its record as it is, as for roots."""
        path = str(path.expanduser().resolve())
        if self.weights_files().get(sha256) != path:
            self._write_record(WEIGHTS_NAME, WEIGHTS_LOCK, lambda: {**self.weights_files(), sha256: path})

    def _write_record(self, name: str, lock: str, content) -> None:
        """Write the record `name` as content() gives it, under `lock` (extracts started together: each one's part
        kept); a workspace this user cannot write (another's, shared read-only) keeps it as it is."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with WriterLock.take(self.root / lock, wait=True):
                write_json(self.root / name, content())
        except OSError as err:
            if not not_allowed(err):
                raise

    def weights_files(self) -> dict[str, str]:
        """{sha256: path} of the weights files extract was given (remember_weights)."""
        files = read_optional_json(self.root / WEIGHTS_NAME)
        return files if isinstance(files, dict) else {}

    def extracted_roots(self) -> list[str]:
        roots = read_optional_json(self.root / ROOTS_NAME)
        return roots if isinstance(roots, list) else []


def user_cache_dir() -> Path:
    """vlpcache's folder in the user's cache: $XDG_CACHE_HOME/vlpcache, else ~/.cache/vlpcache. A cluster
    whose home is small or read-only points XDG_CACHE_HOME at scratch, as torch and Hugging Face follow it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlpcache"


def models_dir(option: str | os.PathLike | None = None) -> Path:
    """The folder holding offline weights: --models, else $VLPCACHE_MODELS, else user_cache_dir()/models, with
    ~ expanded (a Docker ENV or systemd unit passes it as written); a file there (a weights file named for its
    folder) or a link to a place not there (a scratch disk not mounted) is one line."""
    if option:
        folder, given = Path(option).expanduser(), "--models"
    elif os.environ.get("VLPCACHE_MODELS"):
        folder, given = Path(os.environ["VLPCACHE_MODELS"]).expanduser(), "VLPCACHE_MODELS"
    else:
        folder, given = user_cache_dir() / "models", "the models folder"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{given} {folder}: a file, not a folder; give the folder that holds the weights"
                        f"{f' ({folder.parent})' if folder.parent != Path('.') else ''}")
    for link in (folder, *folder.parents):  # the folder or one above it: fetching would fail to make it (EEXIST)
        if link.is_symlink() and not link.exists():
            where = "" if link == folder else f"{link} is "
            raise UserError(f"{given} {folder}: {where}a link to {os.readlink(link)}, which does not exist; "
                            f"mount or make it, or choose another folder with --models DIR or VLPCACHE_MODELS")
    return folder


def replace_command(path: Path) -> str:
    """What to do about a weights file of the models folder at `path` that does not load."""
    return f"damaged: `{FETCH_COMMAND} {path.name} --models {shlex.quote(str(path.parent))}` replaces it"
