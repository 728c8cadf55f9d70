"""Pretraining data: cached region features paired with captions.

Several caches (videos, images) and several caption files mix into one dataset; every item with at
least one caption is one sample per epoch, with K of its captions (`captions_per_video`): each item
walks through a fixed shuffle of its captions, K per epoch, so that every caption is used (the walk
depends only on seed, epoch and item, so a resumed run sees the same data). Caches are read lazily
inside each DataLoader worker (RegionCache opens its HDF5 files per process); captions are tokenized
in the workers too, a batch at a time, or looked up in a frozen text encoder's cached outputs.

An item whose cached row is found damaged (cache/reader.py records it, and extract redoes it) does not
stop a run: training takes the next readable item in its place (every batch keeps its size, which
all-gather needs) and says so once; validation counts it as a video without frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from vlpcache.cache.reader import BlankWhenDamaged, DamagedShard, RegionCache
from vlpcache.cache.schema import outdated_schema
from vlpcache.captions import HELD_OUT_STEMS, VALIDATION_SPLITS, Captions, KeyMatches, caption_queries, read_captions
from vlpcache.errors import UserError
from vlpcache.files import IMAGE_EXTENSIONS, PLUGIN_IMAGE_EXTENSIONS
from vlpcache.model.batch import tokenize, video_batch
from vlpcache.model.config import MAX_CAPTIONS_PER_VIDEO
from vlpcache.model.text_features import TextFeatures
from vlpcache.report import items_word, printable
from vlpcache.workspace import Workspace

CAPTION_SUFFIXES = (".jsonl", ".csv")
TRAINING_SPLITS = {"train", "training", "restval", "trainval"}  # split names that say "train on these"


# ---------------------------------------------------------------- finding and reading captions


def find_caption_files(workspace: Workspace) -> list[Path]:
    """Default training caption files: in the workspace, or next to the roots `extract` was given.

    For a root such as frames/train, a caption file named after it (train.jsonl) in the root, its
    parent or grandparent is preferred; otherwise every caption file of the nearest of those levels that
    has any (the workspace and the roots, then their parents, then grandparents: not an unrelated file
    two folders up beside the dataset's own) except held-out splits (val.jsonl, test.csv...), which must
    never be trained on by default.
    """
    named, others = [], [[], [], []]  # others by level: the roots and the workspace, parents, grandparents
    folders: list[tuple[Path, str | None, int]] = [(workspace.root, None, 0)]
    for root in map(Path, workspace.extracted_roots()):
        folders += [(root, root.name, 0), (root.parent, root.name, 1), (root.parent.parent, root.name, 2)]
    for folder, root_name, level in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in CAPTION_SUFFIXES or not path.is_file():
                continue
            if path.stem.lower() in HELD_OUT_STEMS:
                continue
            (named if path.stem == root_name else others[level]).append(path)
    found = named or next((level for level in others if level), [])
    return list(dict.fromkeys(p.resolve() for p in found))


def find_validation_file(training_files: list[Path]) -> Path | None:
    """val.jsonl (or .csv) beside the first training caption file, if there is one."""
    for folder in dict.fromkeys(p.parent for p in training_files):
        for stem in ("val", "valid", "validation"):
            for suffix in CAPTION_SUFFIXES:
                if (folder / f"{stem}{suffix}").is_file():
                    return folder / f"{stem}{suffix}"
    return None


def merged(files: list[Captions]) -> Captions:
    """The captions of several files as one."""
    captions = Captions()
    for file in files:
        captions.merge(file)
    return captions


def has_validation_split(captions: Captions) -> bool:
    return any(split.lower() in VALIDATION_SPLITS for split in captions.splits.values())


def open_caches(cache_dirs: list[Path]) -> list[RegionCache]:
    """Open every cache and refuse to mix caches whose features are not comparable."""
    caches = [RegionCache(d) for d in cache_dirs]
    for cache in caches:
        cache.check_not_empty()
    for cache in caches[1:]:
        diffs = caches[0].settings.feature_differences(cache.settings)
        if diffs:
            raise UserError(
                f"{cache.cache_dir}: its features are not comparable with {caches[0].cache_dir} ({'; '.join(diffs)}); "
                "extract both with the same --detector/--backbone"
            )
    return caches


# ---------------------------------------------------------------- the dataset


@dataclass
class CaptionReport:
    """What matched between caches and caption files, reported before training."""

    items_with_captions: int = 0
    items_without_captions: int = 0
    captions_without_items: int = 0
    example_without_item: str = ""  # one captioned id no cached item has
    empty_captions: int = 0
    bad_lines_text: str = ""  # Captions.bad_lines_text(): ", N unreadable caption lines (the first: ...)"
    duplicate_ids: int = 0
    validation_items: int = 0  # of the items without (training) captions: the validation videos
    per_cache: dict[str, int] = field(default_factory=dict)
    key_matches: KeyMatches = field(default_factory=KeyMatches)  # caption keys that are not ids, and what they matched

    def line(self) -> str:
        validating = f" ({self.validation_items} of them the validation videos)" if self.validation_items else ""
        text = (
            f"{self.items_with_captions} items with captions; {self.items_without_captions} items without captions"
            f"{validating}, "
            f"{self.captions_without_items} captioned ids not in the cache(s)"
            + (f" (e.g. {printable(self.example_without_item)!r})" if self.example_without_item else "")
            + f", {self.empty_captions} empty or non-text captions"
        )
        text += self.bad_lines_text
        text += self.key_matches.text()
        if self.duplicate_ids:
            text += f", {self.duplicate_ids} ids in more than one cache (first kept)"
        return text


def training_side(captions: Captions, caches: list[RegionCache]) -> tuple[Captions, int, KeyMatches]:
    """The training side of captions (held_out), their keys matched to the caches' items first: two keys of one
    item (`v1`, `v1.mp4`) held out by one of them are held out whole. Also how many were left out, how keys matched."""
    captions, key_matches = captions.matched_to(item_id for cache in caches for item_id in cache.ids)
    captions, skipped = held_out(captions, keep_held_out=False)
    return captions, skipped, key_matches


def match_captions(caches: list[RegionCache], captions: Captions, damaged: bool = False,
                   key_matches: KeyMatches | None = None) -> tuple[list[tuple[int, int | str, list[str]]], CaptionReport]:
    """(cache index, item index, captions) of every cached item that has captions, and the counts. A
    caption key may name its item by file name or path, or the end of its id (Captions.matched_to).
    `damaged`: also (cache index, item id, captions) of the items each cache leaves out as found damaged
    (validation keeps them as videos without frames: the same candidates every epoch, resumed or not).
    `key_matches`: how the keys were matched where the caller matched them already (training_side)."""
    left_out = [[item_id for item_id in cache.damaged if damaged] for cache in caches]
    captions, matched_here = captions.matched_to(item_id for c, cache in enumerate(caches)
                                                 for item_id in [*cache.ids, *left_out[c]])
    key_matches = key_matches or matched_here
    samples, seen = [], set()
    report = CaptionReport(empty_captions=captions.empty_captions, bad_lines_text=captions.bad_lines_text(),
                           key_matches=key_matches)
    for c, cache in enumerate(caches):
        kept = 0
        for i, item_id in enumerate(cache.ids):
            if item_id in seen:
                report.duplicate_ids += 1
                continue
            seen.add(item_id)
            texts = captions.by_id.get(item_id)
            if texts:
                samples.append((c, i, texts))
                kept += 1
            else:
                report.items_without_captions += 1
        for item_id in left_out[c]:
            if item_id not in seen and (texts := captions.by_id.get(item_id)):
                seen.add(item_id)
                samples.append((c, item_id, texts))
                kept += 1
        report.per_cache[str(cache.cache_dir)] = kept
    report.items_with_captions = len(samples)
    without = [item_id for item_id in captions.by_id if item_id not in seen]
    report.captions_without_items, report.example_without_item = len(without), next(iter(without), "")
    return samples, report


class CaptionedRegions(Dataset):
    """One sample per captioned item: its cached arrays and `captions_per_video` of its captions."""

    def __init__(self, caches: list[RegionCache], samples: list[tuple[int, int, list[str]]], seed: int = 0,
                 captions_per_video: int = 1):
        self.caches = caches
        self.samples = samples
        self.seed = seed
        self.captions_per_video = captions_per_video
        self.epoch = 0
        # samples whose row was found damaged: in the process that found it, and in the training process,
        # which adds what its workers report (batch["damaged"]) so that the next epoch's workers pass them over
        self.damaged: set[int] = set()
        self.reported: set[int] = set()  # of those, the ones the training process has said

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # workers are re-created each epoch and see the new value

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        """Sample `index`, or where its row is damaged the next readable sample; "damaged": the (sample,
        line) of each found damaged on the way."""
        found = []
        for k in range(len(self.samples)):
            sample = (index + k) % len(self.samples)
            if sample in self.damaged:
                continue
            c, i, _ = self.samples[sample]
            try:
                item = self.caches[c][i]
            except DamagedShard as err:
                self.damaged.add(sample)
                found.append((sample, str(err)))
                continue
            item["captions"] = self.captions_of(sample)
            item["damaged"] = found
            return item
        raise UserError(f"none of the {len(self.samples)} training items can be read: their cached rows are damaged "
                        f"({found[0][1] if found else 'found so before'})")

    def captions_of(self, index: int) -> list[str]:
        """This epoch's K captions of sample `index`: the next K of its fixed caption shuffle (repeating
        when it has fewer than K)."""
        texts = self.samples[index][2]
        shuffle = np.random.default_rng([self.seed, index]).permutation(len(texts))
        start = max(0, self.epoch - 1) * self.captions_per_video
        return [texts[shuffle[(start + k) % len(texts)]] for k in range(self.captions_per_video)]

    def median_captions(self) -> int:
        """The median number of captions of a training item."""
        return int(np.median([len(texts) for _, _, texts in self.samples]))

    def all_captions(self) -> list[str]:
        return [text for _, _, texts in self.samples for text in texts]


class CollateCaptionedRegions:
    """Worker-side batching: pad videos to a common T/N; tokenize the batch's captions (K per video,
    grouped by video), or look them up in a frozen text encoder's TextFeatures."""

    def __init__(self, tokenizer, max_words: int, text_features: TextFeatures | None = None):
        self.tokenizer = tokenizer
        self.max_words = max_words
        self.text_features = text_features

    def __call__(self, items: list[dict]) -> dict:
        """The model's inputs, and "damaged": what the items found damaged on the way ([] mostly)."""
        batch = video_batch(items)
        captions = [caption for item in items for caption in item["captions"]]  # (B*K,)
        if self.text_features is not None:  # the words of the first caption of each video: what RWA reads
            batch.update(self.text_features.model_inputs(captions, [item["captions"][0] for item in items]))
        else:
            batch["input_ids"], batch["attention_mask"] = tokenize(self.tokenizer, captions, self.max_words)
        batch["damaged"] = [found for item in items for found in item.get("damaged", [])]
        return batch


@dataclass
class ValidationSet:
    """Text→video retrieval over every cached video that has a validation caption (all of them are
    the candidates), with every caption as a query: ~20 per MSR-VTT video, so that one query is a
    twentieth of what it is under the first-caption protocol."""

    caches: list[RegionCache]
    locations: list[tuple[int, int | str]]  # (cache index, item index, or the id of one left out as damaged) of each video
    captions: list[list[str]]  # each video's captions

    def __post_init__(self):
        then = "validation counts it as a video without frames (its captions' queries rank it by nothing it shows)"
        self.readers = [BlankWhenDamaged(cache, then) for cache in self.caches]

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, video: int) -> dict:
        c, i = self.locations[video]
        return self.readers[c][i]

    def queries(self) -> tuple[list[str], list[int]]:
        """Every caption, and the index of its video."""
        return caption_queries(self.captions, all_captions=True)


def _id_at(caches: list[RegionCache], c: int, i: int | str) -> str:
    """The id of the item at a location (cache index, item index or the id of an item left out as damaged)."""
    return i if isinstance(i, str) else caches[c].ids[i]


def frames_folder_hint(caches: list[RegionCache], captions: Captions) -> str:
    """Where captions name images and a cache holds frames folders (a folder of images only is one item,
    a video's frames): that the images were cached as frames of one item, and how to cache each; "" else."""
    keys = list(captions.by_id)[:100]
    folders = [(item_id, path) for cache in caches for item_id, path, kind in zip(cache.ids, cache.paths, cache.kinds)
               if kind == "frames"][:5]
    if not folders:
        return ""
    names_images = any(Path(key).suffix.lower() in IMAGE_EXTENSIONS | PLUGIN_IMAGE_EXTENSIONS for key in keys)
    # or the captions name the folders' images without their extension (a dataset's own ids: Flickr's)
    folder = next((item_id for item_id, path in folders if _names_a_file_in(path, keys)), None) or folders[0][0]
    if not (names_images or _names_a_file_in(dict(folders)[folder], keys)):
        return ""
    return (f"the captions name images, and {folder!r} is a frames folder, cached as one item (a video's frames): "
            "to cache each image as an item, extract it again into a new cache with --no-frame-folders")


def prefix_hint(caches: list[RegionCache], captions: Captions) -> str:
    """Where caption ids and cached names differ by a prefix of one side only (ActivityNet's ids are
    `v_` + a YouTube id; a video saved under the bare id, or the other way round): which, and what to do;
    "" else."""
    keys = [Path(key.replace("\\", "/")).stem for key in list(captions.by_id)[:200]]
    names = {Path(item_id).name for cache in caches for item_id in cache.ids}
    for longer, shorter, side in ((keys, names, "caption ids"), (sorted(names)[:200], set(keys), "cached names")):
        common = os.path.commonprefix(longer)[:8] if len(longer) > 1 else ""
        # the longest start they all share that, taken off, gives the other side's names (video1 -> 1, not video -> 1)
        prefix = next((common[:size] for size in range(len(common), 0, -1)
                       if sum(key[size:] in shorter for key in longer) >= len(longer) / 2), "")
        if prefix:
            other = "cached names" if side == "caption ids" else "caption ids"
            return (f"the {side} are the {other} with {prefix!r} in front (as ActivityNet's `v_` ids): name the "
                    f"files as the captions do and extract them again, or write the caption file's ids as the cache's")
    return ""


def _names_a_file_in(folder: str, keys: list[str]) -> bool:
    """Whether one of the caption keys is the name, or the name without its extension, of a file in folder."""
    try:
        with os.scandir(folder) as entries:
            names = {name for entry in entries for name in (entry.name, os.path.splitext(entry.name)[0])}
    except OSError:
        return False
    return any(key in names for key in keys)


def validation_set(caches: list[RegionCache], captions: Captions) -> tuple[ValidationSet, CaptionReport]:
    samples, report = match_captions(caches, captions, damaged=True)
    return ValidationSet(caches, [(c, i) for c, i, _ in samples], [texts for _, _, texts in samples]), report


def trained_splits_line(splits: dict[str, int]) -> str:
    """Which splits of the caption files' "split" key pretraining trains on; a name that does not say
    training (`testing2`, `eval_b`) is pointed out: a held-out set under a name vlpcache does not know."""
    named = ", ".join(f"{printable(name) if name else 'none'} ({count:,} id{'s' if count != 1 else ''})"
                      for name, count in splits.items())
    odd = [name for name in splits if name and name.lower() not in TRAINING_SPLITS]
    one = len(odd) == 1
    return f"training: the caption files' splits {named}" + (
        f"; {', '.join(map(repr, odd))} {'is' if one else 'are'} trained on: if held out, give a file without "
        f"{'it' if one else 'them'}" if odd else "")


def held_out(captions: Captions, keep_held_out: bool) -> tuple[Captions, int]:
    """Captions of one side of a caption file's "split" key: training drops val/test items,
    validation keeps only val items (files without splits are taken whole)."""
    if not captions.splits:
        return captions, 0
    if keep_held_out:
        wanted = {i for i, s in captions.splits.items() if s.lower() in VALIDATION_SPLITS}
        if not wanted:
            return captions, 0
    else:
        wanted = {i for i in captions.by_id if captions.splits.get(i, "").lower() not in HELD_OUT_STEMS}
    kept = {i: t for i, t in captions.by_id.items() if i in wanted}
    dropped = len(captions.by_id) - len(kept)
    return replace(captions, by_id=kept), dropped


@dataclass
class PretrainData:
    caches: list[RegionCache]
    train: CaptionedRegions
    train_report: CaptionReport
    caption_files: list[Path]
    caption_layouts: list[str]  # how each file was read, as Captions.layout
    validation: ValidationSet | None = None
    validation_report: CaptionReport | None = None
    validation_file: Path | None = None
    held_out_skipped: int = 0  # training captions of val/test items (by their "split" key) left out
    not_captions: list[str] = field(default_factory=list)  # why each file found by default was not read
    repeated_captions: int = 0  # captions that two of the files give the same id (read once)
    trained_splits: dict[str, int] = field(default_factory=dict)  # split name -> its ids in the training files (with splits)
    split_conflicts: str = ""  # a note on items the training files give two splits (Captions.split_conflicts_line)

    def train_ids(self) -> list[str]:
        return [self.caches[c].ids[i] for c, i, _ in self.train.samples]

    def train_stamps(self) -> list[str]:
        """The source stamps of the training items (what they were extracted from: extract/stamps.py)."""
        return [self.caches[c].sources[i] for c, i, _ in self.train.samples]

    @cached_property
    def items(self) -> str:
        """What a person calls the caches' items: videos, photos or items (report.items_word)."""
        return items_word(kind for cache in self.caches for kind in cache.kinds)

    def extracted_since(self) -> int:
        """How many items the caches hold now that they did not when they were read for this run (an extract
        adding to them while it trains): the run never reads those."""
        added = 0
        for cache in self.caches:
            try:
                with RegionCache(cache.cache_dir, say=lambda line: None, say_damaged=False) as now:
                    added += len(set(now.ids) - set(cache.ids))
            except (UserError, OSError):  # a cache gone or unreadable since: nothing to say of it here
                continue
        return added

    def validation_ids(self) -> list[str]:
        return [_id_at(self.caches, c, i) for c, i in self.validation.locations] if self.validation is not None else []

    def summary(self) -> list[str]:
        files = [f"{path} ({layout})" for path, layout in zip(self.caption_files, self.caption_layouts)]
        lines = [f"note: {why}" for why in self.not_captions]
        repeated = (f"; {self.repeated_captions:,} captions are in more than one of them, each read once"
                    if self.repeated_captions else "")
        lines += [f"training captions: {', '.join(files)}{repeated}", f"training: {self.train_report.line()}"]
        for cache in self.caches:
            outdated = outdated_schema(cache.settings)
            if outdated:
                lines.append(f"note: {cache.cache_dir}: {outdated}; re-extract it for the features this vlpcache computes")
        if self.held_out_skipped:
            lines.append(f"training: {self.held_out_skipped} captioned items of val/test splits left out")
        if self.trained_splits:
            lines.append(trained_splits_line(self.trained_splits))
        if self.split_conflicts:
            lines.append(self.split_conflicts)
        if self.validation is not None:
            queries = sum(len(c) for c in self.validation.captions)
            lines.append(f"validation ({self.validation_file}): {len(self.validation)} {self.items}, {queries} captions as queries"
                         f"{self.validation_report.key_matches.text()}")
        else:
            lines.append("validation: none (pass --val-captions FILE of held-out cached videos to get R@K each epoch)")
        return lines


def _training_notes(captions: Captions) -> dict:
    """What PretrainData says of its training captions: those repeated, the splits trained on, items given two splits."""
    return {"repeated_captions": captions.repeated, "trained_splits": captions.split_counts(unsplit=""),
            "split_conflicts": captions.split_conflicts_line()}


def load_pretrain_data(
    cache_dirs: list[Path],
    caption_files: list[Path] | None,
    validation_file: Path | None,
    seed: int = 0,
    workspace: Workspace | None = None,
    captions_per_video: int | None = 1,
    max_captions_per_video: int = MAX_CAPTIONS_PER_VIDEO,
    progress: bool = False,
) -> PretrainData:
    """Open the caches and match them with the training (and validation) captions (progress: a bar while a
    caption folder of many files is read)."""
    workspace = workspace or Workspace()
    caches = open_caches(cache_dirs)
    found_validation = None
    by_default = not caption_files
    if by_default:
        caption_files = find_caption_files(workspace)
        if not caption_files:
            looked = [str(workspace.root)] + [f"{r} (and its parent folders)" for r in workspace.extracted_roots()]
            raise UserError(f"no caption file (.jsonl or .csv) found in {', '.join(looked)}; pass --captions FILE "
                            "(JSON Lines, CSV, or a dataset's own JSON such as MSR-VTT's train_val_videodatainfo.json)")
        if validation_file is None:
            validation_file = found_validation = find_validation_file(caption_files)
    caption_files = [Path(p) for p in caption_files]
    per_file, not_captions = [], []
    for path in list(caption_files):
        try:
            per_file.append(read_captions(path, progress))
        except UserError as err:
            if not by_default:  # a file the user named: its error stands
                raise
            caption_files.remove(path)  # found by default (eval's --per-query records, a table of one's own...)
            not_captions.append(f"{err}; it was found by default, as a .jsonl or .csv file beside the extracted "
                                f"roots or in the workspace: left out (pass --captions FILE to say which to train on)")
    if not caption_files:
        raise UserError(f"none of the caption files found by default can be read: {'; '.join(not_captions)}")
    if validation_file is None:  # a training file's own validation split (MSR-VTT's "validate", Karpathy's "val")
        validation_file = found_validation = next(
            (path for path, captions in zip(caption_files, per_file) if has_validation_split(captions)), None)
    training_captions, skipped, key_matches = training_side(merged(per_file), caches)
    samples, report = match_captions(caches, training_captions, key_matches=key_matches)
    if not samples:
        example_item = next((c.ids[0] for c in caches if len(c)), None)
        example_caption = next(iter(training_captions.by_id), None)
        raise UserError(
            f"no cached item has a caption in {', '.join(map(str, caption_files))} "
            f"(cache ids look like {example_item!r}, caption ids like {example_caption!r}{report.key_matches.text()}); "
            + (frames_folder_hint(caches, training_captions) or prefix_hint(caches, training_captions) or
               "pass the caption file of the extracted items with --captions")
        )
    train = CaptionedRegions(caches, samples, seed, captions_per_video or 1)
    if captions_per_video is None:  # every caption of a typical item in each step, at most max_captions_per_video
        train.captions_per_video = max(1, min(max_captions_per_video, train.median_captions()))
    data = PretrainData(caches, train, report, caption_files, [captions.layout for captions in per_file],
                        held_out_skipped=skipped, not_captions=not_captions, **_training_notes(training_captions))
    if validation_file is not None:
        read = dict(zip(caption_files, per_file)).get(Path(validation_file))  # a training file's split: read already
        if read is None:
            read = read_captions(validation_file, progress)
        validation_captions, _ = held_out(read, keep_held_out=True)
        data.validation, data.validation_report = validation_set(caches, validation_captions)
        data.validation_file = Path(validation_file)
        if not len(data.validation) and found_validation is not None:  # a default that does not apply
            data.validation = data.validation_file = None
        elif not len(data.validation):
            raise UserError(
                f"{validation_file}: none of its videos is in the cache(s); extract them into the same cache "
                "(or pass --cache for their cache too), or leave out --val-captions"
            )
    if data.validation is not None:
        overlap = {_id_at(caches, c, i) for c, i in data.validation.locations} & {caches[c].ids[i] for c, i, _ in samples}
        report.validation_items = len(data.validation) - len(overlap)
        if overlap:
            raise UserError(
                f"{validation_file}: {len(overlap)} validation videos also have training captions "
                f"(e.g. {sorted(overlap)[0]!r}); validate on held-out videos"
            )
    return data
