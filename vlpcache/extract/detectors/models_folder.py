"""`vlpcache models list | fetch | verify`: the registered weights files as the models folder holds them."""

from __future__ import annotations

import json
from pathlib import Path

from vlpcache.errors import GraphTooNew, UserError
from vlpcache.extract.detectors.weights import (
    REGISTRY,
    WeightsFile,
    damage,
    fetch_problems,
    not_fetched,
)
from vlpcache.files import file_sha256
from vlpcache.report import say
from vlpcache.workspace import models_dir, replace_command


def registered(names: tuple[str, ...] | list[str]) -> list[WeightsFile]:
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise UserError(f"unknown weights file {', '.join(unknown)}; registered: {', '.join(REGISTRY)}")
    return [REGISTRY[n] for n in names] if names else [entry for entry in REGISTRY.values() if not entry.on_request]


def file_state(entry: WeightsFile, folder: Path) -> dict:
    """What `models list` says of one file."""
    path = folder / entry.name
    state = {"name": entry.name, "path": str(path), "present": path.is_file(), "what": entry.what,
             "licence": entry.licence, "sources": [s.describe() for s in entry.sources],
             "known": [{"sha256": k.sha256, "size": k.size, "origin": k.origin} for k in entry.known]}
    if state["present"]:
        sha256 = file_sha256(path)
        known = entry.known_as(sha256)
        state |= {"size": path.stat().st_size, "sha256": sha256, "origin": known.origin if known else None}
    return state


def list_weights(models: str | None = None, as_json: bool = False) -> None:
    """`vlpcache models list`: each registered file, present or missing, size, sha256, source, licence."""
    folder = models_dir(models)
    states = [file_state(entry, folder) for entry in REGISTRY.values()]
    if as_json:
        print(json.dumps({"folder": str(folder), "files": states}, indent=2))
        return
    print(f"models folder: {folder}")
    for state in states:
        if state["present"]:
            origin = state["origin"] or "sha256 not among the known files"
            print(f"{state['name']}  present  {state['size'] / 1e6:.1f} MB  sha256 {state['sha256']}  ({origin})")
        else:
            sizes = " or ".join(dict.fromkeys(f"{k['size'] / 1e6:.1f} MB" for k in state["known"]))
            size = f"about {sizes}" if sizes else "size not pinned"
            print(f"{state['name']}  missing  ({size}; `{REGISTRY[state['name']].fetch_command()}` gets it)")
        print(f"    {state['what']}; licence {state['licence']}")
        print(f"    sources: {'; '.join(state['sources'])}")


def fetch_weights(names: tuple[str, ...] = (), models: str | None = None) -> None:
    """`vlpcache models fetch [NAME...]`: fetch the missing and the damaged files (by default all but those
    fetched on request), each tried whatever became of the others; one line for each that could not be."""
    folder = models_dir(models)
    failures = []
    for entry in registered(names):
        path = folder / entry.name
        if path.is_file():
            try:
                wrong = damage(entry, path)
            except GraphTooNew as err:  # not damaged: another copy would not help, a newer onnxruntime does
                failures.append(f"{err} (kept: not damaged)")
                continue
            if wrong is None:
                say(f"{path}: present")
                continue
            say(f"{path}: damaged ({wrong}); fetching it again")
        problems = fetch_problems(entry, folder)
        if problems:
            failures.append(not_fetched(entry, folder, problems))
    for entry in REGISTRY.values() if not names else ():  # fetched on its detector's first use, or by name: said
        if entry.on_request and not (folder / entry.name).is_file():
            say(f"{entry.name}: not fetched without its name (its detector fetches it on first use); "
                f"`{entry.fetch_command()}` gets it now")
    for failure in failures[:-1]:
        say(f"error: {failure}")
    if failures:
        raise UserError(failures[-1])


def verify_weights(models: str | None = None) -> bool:
    """`vlpcache models verify`: each file's sha256 against the known ones and its structure; True if all are right."""
    folder = models_dir(models)
    right = True
    for entry in REGISTRY.values():
        path = folder / entry.name
        if not path.is_file():
            print(f"{entry.name}: missing (`{entry.fetch_command()}` gets it)")
            right = right and entry.on_request  # fetched on its detector's first use
            continue
        known = entry.known_as(file_sha256(path))
        try:
            entry.check(path)
        except ValueError as err:
            print(f"{entry.name}: WRONG: {err}; {replace_command(path)}")
            right = False
            continue
        except GraphTooNew as err:
            print(f"{entry.name}: not damaged, but this install cannot run it: {err.why}")  # the file named once
            right = False
            continue
        print(f"{entry.name}: ok, " + (f"sha256 matches {known.origin}" if known else "structure checked (sha256 not among the known files)"))
    return right
