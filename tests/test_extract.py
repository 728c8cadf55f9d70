"""`vlpcache extract` and `vlpcache inspect` end to end, as a user runs them, on real files."""

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from broken_media import damage_chunk
from hdf5_format import set_layout_message_versions

from vlpcache.cache.labels import COCO
from vlpcache.cache.reader import RegionCache
from vlpcache.errors import UserError
from vlpcache.cache.schema import SHARD_DIR
from vlpcache.extract.stamps import source_stamp
from vlpcache.extract.sources import discover_items
from vlpcache.files import file_sha256
from vlpcache.workspace import Workspace
from waiting import HANG_GUARD_S, wait_until

SMALL_VIDEOS = ("tests_data_test.mp4", "bikes.mp4", "tree.avi", "cup.mp4")


def vlpcache(*args, cwd, check=True, timeout=HANG_GUARD_S):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "vlpcache", *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def media(tmp_path_factory, videos_dir, msrvtt_dir, flickr_dir):
    """A small mixed root: real videos, real photos, real frame folders, under awkward names."""
    root = tmp_path_factory.mktemp("media")
    (root / "clips").mkdir()
    for name in SMALL_VIDEOS:
        shutil.copy(videos_dir / name, root / "clips" / name)
    shutil.copy(videos_dir / "tests_data_test.mp4", root / "clips" / "ünïcode name.mp4")
    # no extension, as a download by id leaves files: known by their first bytes
    shutil.copy(videos_dir / "carphone_distorted.mp4", root / "clips" / "abc123")
    (root / "clips" / "README").write_text("clips downloaded by id\n")
    photos = sorted((flickr_dir / "images").iterdir())
    for photo in photos[:3]:
        shutil.copy(photo, root / photo.name)
    shutil.copy(photos[3], root / "photo-without-extension")
    for folder in sorted((msrvtt_dir / "frames" / "val").iterdir())[:3]:
        shutil.copytree(folder, root / "frames" / folder.name)
    return root


@pytest.fixture(scope="module")
def extracted(media, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    result = vlpcache("extract", media, "-o", work / "cache", "--frames", 4, cwd=work)
    return work / "cache", result


def test_extract_caches_every_item_once_with_masks_and_timestamps(extracted, media):
    cache_dir, result = extracted
    cache = RegionCache(cache_dir)
    assert sorted(cache.ids) == sorted(
        [f"clips/{Path(n).stem}" for n in SMALL_VIDEOS] + ["clips/ünïcode name", "clips/abc123", "photo-without-extension"]
        + [p.stem for p in media.glob("*.jpg")] + [f"frames/{p.name}" for p in (media / "frames").iterdir()])
    assert cache.settings.frames == 4 and cache.settings.regions == 31 and cache.settings.feature_dim == 1280
    video = cache.get("clips/bikes")
    assert video["frame_mask"].all() and np.all(np.diff(video["timestamps"]) > 0)
    assert video["duration"] > video["timestamps"][-1]
    photo = cache.get(next(media.glob("*.jpg")).stem)
    assert photo["frame_mask"].tolist() == [True, False, False, False] and photo["kind"] == "image"
    frames = cache.get(f"frames/{next((media / 'frames').iterdir()).name}")
    assert frames["frame_mask"].sum() == 2 and frames["kind"] == "frames"  # 2 frames on disk, 4 asked
    for item_id in cache.ids:
        item = cache.get(item_id)
        valid = item["frame_mask"]
        assert np.all(item["region_mask"][valid, 0]) and np.all(item["labels"][valid, 0] == -1)
        assert not item["region_mask"][~valid].any()
    assert cache.get("clips/abc123")["frame_mask"].all() and cache.get("photo-without-extension")["kind"] == "image"
    assert "extract: 13 done" in result.stderr


def test_each_cached_item_holds_the_detectors_regions_of_its_own_frames(extracted, media):
    """Items share detector batches (8 frames on CPU: two 4-frame videos, or a video and photos): what each
    item stores must be what the detector finds on that item's frames alone."""
    from vlpcache.extract.detectors.choice import choose_detector, load_detector
    from vlpcache.extract.detectors.regions import pack_frame_regions
    from vlpcache.extract.sampling import read_item

    cache_dir, _ = extracted
    cache = RegionCache(cache_dir)
    spec = choose_detector("yolox", None, None, os.environ["VLPCACHE_MODELS"])
    detector = load_detector(spec, "cpu", cache.settings.score_threshold)
    items, _ = discover_items([media])
    for item in items[:6]:  # photos, videos and frame folders: discovery order, as extract batches them
        sampled = read_item(item, cache.settings.frames, spec.max_side)
        cached = cache.get(item.id)
        for t, regions in enumerate(detector.detect(sampled.frames, cache.settings.regions - 1)):
            own = pack_frame_regions(regions, cache.settings.regions)
            assert cached["labels"][t].tolist() == own["labels"].tolist(), (item.id, t)
            assert cached["region_mask"][t].tolist() == own["region_mask"].tolist(), (item.id, t)
            np.testing.assert_allclose(cached["boxes"][t], own["boxes"], atol=1e-3, err_msg=f"{item.id} {t}")
            np.testing.assert_allclose(cached["features"][t].astype(np.float32), own["features"], rtol=5e-3, atol=5e-3,
                                       err_msg=f"{item.id} {t}")
        assert cached["timestamps"][: len(sampled.frames)].tolist() == pytest.approx(sampled.timestamps)


def test_an_item_whose_frames_the_detector_cannot_take_fails_alone_and_the_batch_goes_on(models_dir, msrvtt_dir, tmp_path):
    # a detector's error on one item's odd frames (vg's on a 20 x 10000 photo) ended the whole extract with its traceback
    from vlpcache.extract.detectors.choice import choose_detector, load_detector
    from vlpcache.extract.mapper import RegionMapper
    from vlpcache.extract.reader import decode_item
    from vlpcache.extract.sources import Item

    spec = choose_detector("yolox", None, None, models_dir)
    real = load_detector(spec, "cpu", 0.25)

    class Picky:  # the real detector, but for frames 7 px wide
        def __init__(self, works: bool):
            self.works = works

        def detect(self, frames, max_detections):
            if not self.works or any(frame.shape[1] == 7 for frame in frames):
                raise RuntimeError("Given input size: (64x500x1). Calculated output size: (64x250x0).\nOutput size is too small")
            return real.detect(frames, max_detections)

    folders = sorted((msrvtt_dir / "frames" / "val").iterdir())[:2]
    decoded = [decode_item(Item(f.name, f, "frames"), 2, spec.max_side) for f in folders]
    Image.fromarray(np.full((300, 7, 3), 90, np.uint8)).save(tmp_path / "thin.png")
    thin = decode_item(Item("thin", tmp_path / "thin.png", "image"), 2, spec.max_side)
    settings = spec.cache_settings(2, 5, 0.25)
    results = list(RegionMapper(Picky(True), settings, batch_size=64)([decoded[0], thin, decoded[1]]))
    assert [r.decoded.item.id for r in results] == [folders[0].name, "thin", folders[1].name]
    assert results[1].arrays is None and results[1].error == (
        "the detector failed on its frames (RuntimeError: Given input size: (64x500x1). Calculated output size: "
        "(64x250x0). Output size is too small)")
    for result in (results[0], results[2]):  # as detected in a batch of their own
        [alone] = list(RegionMapper(real, settings, batch_size=64)([result.decoded]))
        np.testing.assert_allclose(result.arrays["features"], alone.arrays["features"], atol=1e-3)
    with pytest.raises(RuntimeError, match="Output size is too small"):  # every item: the detector's trouble
        list(RegionMapper(Picky(False), settings, batch_size=64)(decoded))


def test_rerun_skips_everything_already_cached(extracted, media):
    cache_dir, _ = extracted
    before = sorted(p.name for p in (cache_dir / SHARD_DIR).iterdir())
    again = vlpcache("extract", media, "-o", cache_dir, "--frames", 4, cwd=cache_dir.parent)
    assert "0 done, 13 already cached" in again.stderr and again.stderr.rstrip().endswith("s; nothing left to extract")
    assert sorted(p.name for p in (cache_dir / SHARD_DIR).iterdir()) == before


def test_a_rerun_with_nothing_left_to_do_loads_no_network(extracted, media):
    cache_dir, _ = extracted
    probe = ("import sys; from vlpcache.extract.runner import run_extract\n"
             f"summary = run_extract([{str(media)!r}], cache_dir={str(cache_dir)!r}, frames=4, quiet=True)\n"
             "print(summary.skipped_cached, 'torch' in sys.modules, 'onnxruntime' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=HANG_GUARD_S, check=True)
    assert result.stdout.split() == ["13", "False", "False"]


def test_a_later_extract_neither_puts_another_file_under_a_cached_id_nor_caches_a_file_twice(tmp_path, msrvtt_dir,
                                                                                             capsys):
    folders = sorted((msrvtt_dir / "frames" / "val").iterdir())[:3]
    shutil.copytree(folders[0], tmp_path / "batch1" / "clip")
    shutil.copytree(folders[1], tmp_path / "batch2" / "clip")  # another video under the same id
    shutil.copytree(folders[2], tmp_path / "data" / "train" / "video9")
    cache = tmp_path / "cache"
    vlpcache("extract", tmp_path / "batch1", tmp_path / "data" / "train", "-o", cache, cwd=tmp_path)

    second = vlpcache("extract", tmp_path / "batch2", "-o", cache, cwd=tmp_path)
    assert (f"{tmp_path / 'batch2' / 'clip'}: id 'clip' is already cached, extracted from "
            f"{tmp_path / 'batch1' / 'clip'} by an earlier extract; skipped") in second.stderr
    assert "0 done, 0 already cached" in second.stderr and "1 path(s) passed over" in second.stderr
    third = vlpcache("extract", tmp_path / "data", "-o", cache, cwd=tmp_path)  # the parent of a root given before
    assert (f"{tmp_path / 'data' / 'train' / 'video9'}: already cached as 'video9' by an earlier extract from "
            f"another root; skipped") in third.stderr
    assert sorted(zip(RegionCache(cache).ids, RegionCache(cache).paths)) == [
        ("clip", str(tmp_path / "batch1" / "clip")), ("video9", str(tmp_path / "data" / "train" / "video9"))]
    failures = vlpcache("inspect", cache, "--failures", cwd=tmp_path).stdout
    assert f"passed over {tmp_path / 'batch2' / 'clip'}: id 'clip' is already cached" in failures
    assert f"passed over {tmp_path / 'data' / 'train' / 'video9'}: already cached as 'video9'" in failures

    (tmp_path / "batch1").rename(tmp_path / "moved")  # the same files elsewhere: cached, said once
    moved = vlpcache("extract", tmp_path / "moved", "-o", cache, cwd=tmp_path)
    assert "extract: 1 cached item(s) were extracted from files that are no longer there" in moved.stderr
    assert "0 done, 1 already cached" in moved.stderr and len(RegionCache(cache)) == 2
    assert RegionCache(cache).get("clip")["path"] == str(tmp_path / "moved" / "clip")  # its frames are found there
    # a copy of the data (a project copied whole), its first still there: the same content, read from the copy
    from vlpcache.extract.runner import run_extract

    shutil.copytree(tmp_path / "moved", tmp_path / "copy")
    capsys.readouterr()
    assert run_extract([tmp_path / "copy"], cache_dir=cache, quiet=True).skipped_cached == 1
    assert (f"extract: 1 cached item(s) found here hold the content they were extracted from elsewhere, which is still "
            f"there (a copy of the data; e.g. 'clip', from {tmp_path / 'moved' / 'clip'}): read from here from now on, "
            "not extracted again") in capsys.readouterr().err
    assert RegionCache(cache).get("clip")["path"] == str(tmp_path / "copy" / "clip") and len(RegionCache(cache)) == 2


def test_a_source_replaced_at_its_path_is_extracted_again_and_one_only_touched_is_not(tmp_path, msrvtt_dir, capsys):
    from vlpcache.extract.runner import run_extract  # in this process: the detector loads faster than a command starts

    folders = sorted((msrvtt_dir / "frames" / "val").iterdir())[:2]
    for name, folder in zip("ab", folders):
        shutil.copytree(folder, tmp_path / "data" / name)
    cache = tmp_path / "cache"
    run_extract([tmp_path / "data"], cache_dir=cache, quiet=True)
    first_stamp = RegionCache(cache).get("a")["source"]
    shutil.rmtree(tmp_path / "data" / "a")
    shutil.copytree(folders[1], tmp_path / "data" / "a")  # b's frames under a's name: a re-downloaded video
    for frame in (tmp_path / "data" / "b").iterdir():
        os.utime(frame, ns=(10**18, 10**18))  # b's files copied again without their times
    render = vlpcache("inspect", cache, "--render", "a", "-o", tmp_path / "a.png", cwd=tmp_path)
    assert "changed since it was extracted (run `vlpcache extract` again to redo it); drawing its boxes on blank " \
           "frames" in render.stderr  # not the old boxes on the new frames
    capsys.readouterr()
    run_extract([tmp_path / "data"], cache_dir=cache, quiet=True)
    said = capsys.readouterr().err
    assert "extract: 1 cached item(s) changed on disk since they were extracted" in said
    assert "1 done, 1 already cached" in said
    cached = RegionCache(cache)
    assert sorted(cached.ids) == ["a", "b"] and len(list((cache / SHARD_DIR).glob("*.h5"))) == 2
    a, b = cached.get("a"), cached.get("b")
    for name in ("features", "boxes", "labels", "timestamps"):
        np.testing.assert_array_equal(a[name], b[name])  # a's regions are of its new frames
    assert a["source"] == source_stamp(tmp_path / "data" / "a") != first_stamp
    with h5py.File(cache / SHARD_DIR / cached.shard_of("a"), "r") as f:  # the new row names the one it replaces
        assert [v.decode() for v in f["replaces"][:]] == [first_stamp]


def test_items_done_while_a_decode_stalls_are_committed_when_due_not_after_it(tmp_path, msrvtt_dir, monkeypatch):
    # the shard's time was looked at only when an item was added: a decode stalled on one file (up to
    # --decode-timeout, 10 min) held the regions of the items before it in the detector's batch, uncommitted
    from vlpcache.extract import runner
    from vlpcache.extract.reader import FrameReader

    for name, folder in zip("abc", sorted((msrvtt_dir / "frames" / "val").iterdir())[:3]):
        shutil.copytree(folder, tmp_path / "data" / name)
    cache, committed_during_stall = tmp_path / "cache", []

    class StallingReader(FrameReader):  # the third item's decode stalls until the two before it are committed
        def __call__(self, items):
            for n, decoded in enumerate(super().__call__(items)):
                if n == 2:
                    shards = lambda: sorted((cache / SHARD_DIR).glob("*.h5"))  # noqa: E731  committed ones
                    committed_during_stall.append(len(RegionCache(cache)) if wait_until(shards, guard_s=120) else 0)
                yield decoded

    monkeypatch.setattr(runner, "FrameReader", StallingReader)
    monkeypatch.setattr(runner, "IDLE_AFTER_S", 0.05)
    monkeypatch.setattr("vlpcache.cache.writer.SHARD_SECONDS", 0.2)  # 2 min, as a test waits
    summary = runner.run_extract([tmp_path / "data"], cache_dir=cache, quiet=True, workers=1)
    assert committed_during_stall == [2] and summary.done == 3 and len(RegionCache(cache)) == 3


def test_an_item_found_damaged_is_listed_by_inspect_and_extracted_again_by_the_next_extract(tmp_path, msrvtt_dir, capsys):
    from vlpcache.cache.reader import DamagedShard
    from vlpcache.extract.runner import run_extract

    for name, folder in zip("ab", sorted((msrvtt_dir / "frames" / "val").iterdir())[:2]):
        shutil.copytree(folder, tmp_path / "data" / name)
    cache = tmp_path / "cache"
    run_extract([tmp_path / "data"], cache_dir=cache, quiet=True)
    clean = RegionCache(cache).get("a")
    (shard,) = (cache / SHARD_DIR).glob("*.h5")
    with h5py.File(shard, "r") as f:
        damage_chunk(shard, "features", [v.decode() for v in f["ids"][:]].index("a"))
    with pytest.raises(DamagedShard):
        RegionCache(cache).get("a")  # as training, index or search would find it: recorded
    listed = vlpcache("inspect", cache, "--failures", cwd=tmp_path).stdout
    assert f"unreadable  a: row 0 of {shard.name} does not read (" in listed and "extract redoes it" in listed
    capsys.readouterr()
    run_extract([tmp_path / "data"], cache_dir=cache, quiet=True)
    said = capsys.readouterr().err
    assert "extract: 1 cached item(s) were found damaged by a read" in said and "1 done, 1 already cached" in said
    assert "left out until" not in said  # the reader's line, which extract says its own way
    cached = RegionCache(cache)
    assert sorted(cached.ids) == ["a", "b"] and cached.damaged == {}
    for name in ("features", "boxes", "labels", "timestamps"):
        np.testing.assert_array_equal(cached.get("a")[name], clean[name])
    capsys.readouterr()
    run_extract([tmp_path / "data"], cache_dir=cache, quiet=True)
    assert "found damaged" not in capsys.readouterr().err
    # found damaged again, then its folder deleted: --prune drops it (it stayed "unreadable" forever, extract silent)
    with h5py.File(shard := cache / SHARD_DIR / RegionCache(cache).shard_of("b"), "r") as f:
        damage_chunk(shard, "features", [v.decode() for v in f["ids"][:]].index("b"))
    with pytest.raises(DamagedShard):
        RegionCache(cache).get("b")
    shutil.rmtree(tmp_path / "data" / "b")
    run_extract([tmp_path / "data"], cache_dir=cache, quiet=True)
    assert "1 cached item(s) under these roots are no longer there (e.g. 'b': " in capsys.readouterr().err
    run_extract([tmp_path / "data"], cache_dir=cache, quiet=True, prune=True)
    cached = RegionCache(cache)
    assert cached.ids == ["a"] and list(cached.removed) == ["b"] and cached.damaged == {}
    assert cached.left_out_line("b").startswith(f"'b' was dropped from the cache {cache} by `vlpcache extract --prune`")
    assert f": {tmp_path / 'data' / 'b'} was gone; once it is back" in cached.left_out_line("b")


def test_a_shard_a_newer_hdf5_wrote_stops_extract_instead_of_extracting_its_items_again(tmp_path, msrvtt_dir):
    # h5py 3.9 (HDF5 1.12) under a cache of HDF5 2.0's shards: extract cached every item again (the cache doubled),
    # and --prune could not drop the items it could not see
    from vlpcache.extract.runner import run_extract

    for name, folder in zip("ab", sorted((msrvtt_dir / "frames" / "val").iterdir())[:2]):
        shutil.copytree(folder, tmp_path / "data" / name)
    cache = tmp_path / "cache"
    run_extract([tmp_path / "data"], cache_dir=cache, quiet=True)
    (shard,) = (cache / SHARD_DIR).glob("*.h5")
    set_layout_message_versions(shard, 9)  # a layout message of a format newer than this HDF5's
    shutil.rmtree(tmp_path / "data" / "b")
    for prune in (False, True):
        with pytest.raises(UserError, match=rf"^{re.escape(str(shard))}: unreadable \(.*\): written by a newer HDF5 "):
            run_extract([tmp_path / "data"], cache_dir=cache, quiet=True, prune=prune)
    assert list((cache / SHARD_DIR).iterdir()) == [shard]
    listed = vlpcache("inspect", cache, cwd=tmp_path).stdout
    assert f"unreadable  {shard.name}: " in listed and ": written by a newer HDF5 than this h5py" in listed


def test_a_link_to_a_file_is_that_file_once_in_the_cache(tmp_path, videos_dir, capsys):
    """A cache holds each file once: a symbolic link to a file found in the same run, or to one cached
    before, is passed over with a line naming the id it is cached as (the file itself wins over links)."""
    from vlpcache.extract.runner import run_extract

    (tmp_path / "data" / "videos").mkdir(parents=True)
    (tmp_path / "data" / "links").mkdir()
    shutil.copy(videos_dir / "tests_data_test.mp4", tmp_path / "data" / "videos" / "clip.mp4")
    (tmp_path / "data" / "links" / "again.mp4").symlink_to("../videos/clip.mp4")  # found first: "links" < "videos"
    cache = tmp_path / "cache"
    run_extract([tmp_path / "data"], cache_dir=cache, quiet=True)
    said = capsys.readouterr().err
    real = tmp_path / "data" / "videos" / "clip.mp4"
    assert (f"{tmp_path / 'data' / 'links' / 'again.mp4'}: the same file as 'videos/clip' ({real}), which this run "
            "extracts; ") in said
    assert RegionCache(cache).ids == ["videos/clip"]
    (tmp_path / "data" / "links" / "more.mp4").symlink_to(real)
    run_extract([tmp_path / "data"], cache_dir=cache, quiet=True)
    said = capsys.readouterr().err
    assert f"{tmp_path / 'data' / 'links' / 'more.mp4'}: a link to {real}, already cached as 'videos/clip'; " in said
    assert RegionCache(cache).ids == ["videos/clip"]


def test_items_no_longer_under_the_roots_are_said_and_dropped_with_prune(tmp_path, msrvtt_dir, capsys):
    """A file deleted, a folder renamed (its items under new ids: the old ids' files are gone), a failed
    file deleted: extract says so, and search would still find them until `--prune` drops them (and
    clears the failure). Items of another root, of a root that is not there, are never touched."""
    from vlpcache.extract.runner import run_extract

    folders = sorted((msrvtt_dir / "frames" / "val").iterdir())[:4]
    for name, folder in zip(("a", "b", "old/c"), folders):
        shutil.copytree(folder, tmp_path / "data" / name)
    shutil.copytree(folders[3], tmp_path / "other" / "o")
    (tmp_path / "data" / "broken.mp4").write_text("not a video")
    cache = tmp_path / "cache"
    run_extract([tmp_path / "data", tmp_path / "data" / ".." / "other"], cache_dir=cache, quiet=True)
    assert sorted(RegionCache(cache).ids) == ["a", "b", "o", "old/c"] and list(RegionCache(cache).failures) == ["broken"]
    assert RegionCache(cache).get("o")["path"] == str(tmp_path / "other" / "o")  # a root's `..` is not kept
    shutil.rmtree(tmp_path / "data" / "a")
    (tmp_path / "data" / "old").rename(tmp_path / "data" / "new")  # c's id is now new/c
    (tmp_path / "data" / "broken.mp4").unlink()
    capsys.readouterr()
    run_extract([tmp_path / "data", tmp_path / "nowhere"], cache_dir=cache, quiet=True)
    said = capsys.readouterr().err
    assert (f"extract: 2 cached item(s) under these roots are no longer there (e.g. 'a': {tmp_path / 'data' / 'a'} is "
            "gone) and 1 recorded failure(s) of files that are gone; search still finds them: add --prune to drop them "
            "from the cache") in said
    assert sorted(RegionCache(cache).ids) == ["a", "b", "new/c", "o", "old/c"]
    run_extract([tmp_path / "data"], cache_dir=cache, quiet=True, prune=True)
    said = capsys.readouterr().err
    assert ("extract: dropped 2 cached item(s) that are no longer there under these roots (e.g. 'a': "
            f"{tmp_path / 'data' / 'a'} is gone) and 1 recorded failure(s) of files that are gone (--prune); "
            "`vlpcache index` drops them from the index") in said
    cached = RegionCache(cache)
    assert sorted(cached.ids) == ["b", "new/c", "o"] and sorted(cached.removed) == ["a", "old/c"] and cached.failures == {}
    # a dropped item named as inspect --render names items: why it is not there, not "names no item"
    from vlpcache.extract.render import named_item

    for key in ("a", str(tmp_path / "data" / "a")):
        with pytest.raises(UserError) as err:
            named_item(cached, key)
        assert str(err.value).startswith(f"'a' was dropped from the cache {cache} by `vlpcache extract --prune` on ")
        assert str(err.value).endswith(f": {tmp_path / 'data' / 'a'} was gone; once it is back, extract its folder again "
                                       "to cache it")
    assert cached.left_out_line("b") is None and cached.left_out_line("zz") is None
    run_extract([tmp_path / "data"], cache_dir=cache, quiet=True, prune=True)
    assert "no longer there" not in capsys.readouterr().err
    shutil.rmtree(tmp_path / "other")  # a root emptied: "it is empty" alone, not a word of its cached item, nor --prune
    with pytest.raises(UserError) as err:
        run_extract([tmp_path / "other"], cache_dir=cache, quiet=True)
    assert str(err.value) == (f"no videos, images or frame folders found under {tmp_path / 'other'}: it does not exist; "
                              "the cache holds 1 item(s) extracted from there, no longer there (search still finds "
                              "them): add --prune to drop them from the cache")
    # the root through a symbolic link to it: its cached items are under the root all the same
    (tmp_path / "link").symlink_to(tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "b")
    run_extract([tmp_path / "link"], cache_dir=cache, quiet=True, prune=True)
    assert (f"extract: dropped 1 cached item(s) that are no longer there under these roots (e.g. 'b': {tmp_path / 'data' / 'b'} "
            "is gone) (--prune)") in capsys.readouterr().err
    assert sorted(RegionCache(cache).ids) == ["new/c", "o"]
    shutil.copytree(folders[1], tmp_path / "data" / "b")
    run_extract([tmp_path / "data" / "new"], cache_dir=cache, quiet=True, prune=True)  # a root within: 'c' here
    said = capsys.readouterr().err
    assert "already cached as 'new/c'" in said and "no longer there" not in said and "new/c" in RegionCache(cache).ids
    shutil.copytree(folders[0], tmp_path / "data" / "a")  # back: extracted again, as new
    run_extract([tmp_path / "data"], cache_dir=cache, quiet=True)
    assert "2 done" in capsys.readouterr().err and sorted(RegionCache(cache).ids) == ["a", "b", "new/c", "o"]


def test_prune_of_a_file_that_failed_then_was_mended_leaves_no_failure_behind(tmp_path, msrvtt_dir, capsys):
    """The record of a failure that the file's later content mended is hidden while the item is cached:
    --prune of the item, its file deleted, dropped the item and showed the failure again."""
    from vlpcache.extract.runner import run_extract

    frames = sorted(next((msrvtt_dir / "frames" / "val").iterdir()).iterdir())
    (tmp_path / "data").mkdir()
    shutil.copy(frames[0], tmp_path / "data" / "y.jpg")
    (tmp_path / "data" / "x.jpg").write_bytes(b"not a picture")
    cache = tmp_path / "cache"
    run_extract([tmp_path / "data"], cache_dir=cache, quiet=True)
    assert list(RegionCache(cache).failures) == ["x"]
    shutil.copy(frames[1], tmp_path / "data" / "x.jpg")
    run_extract([tmp_path / "data"], cache_dir=cache, quiet=True)
    assert sorted(RegionCache(cache).ids) == ["x", "y"] and RegionCache(cache).failures == {}
    (tmp_path / "data" / "x.jpg").unlink()
    run_extract([tmp_path / "data"], cache_dir=cache, quiet=True, prune=True)
    assert RegionCache(cache).ids == ["y"] and RegionCache(cache).failures == {}
    # inspect says what was dropped, and a shard an extract stopped while writing
    from vlpcache.cache.inspect import inspect_cache

    (cache / "shards" / "s0of1-00009.h5.tmp").write_bytes(b"")
    capsys.readouterr()
    inspect_cache(cache, list_failures=True)
    out = capsys.readouterr().out.splitlines()
    assert "dropped     1 item(s) whose files were gone (extract --prune); --failures lists them" in out
    assert f"dropped     x: {tmp_path / 'data' / 'x.jpg'} (gone; extract --prune)" in out
    assert ("unfinished  s0of1-00009.h5.tmp: a shard being written, or left by an extract that was stopped (the next "
            "extract into this cache removes it and extracts its items)") in out
    assert [line for line in out if line.startswith("failures")] == ["failures    0"]


def test_the_summary_gives_the_rate_the_bar_showed_beside_the_whole_commands():
    # the bar counts from the detector's load, the summary from the command's start: 4.7 and 2.2 frames/s
    # for one run, unexplained (the long-video walk)
    from vlpcache.extract.progress import ExtractSummary

    line = ExtractSummary(done=10, frames=80, seconds=6.0, load_seconds=4.0, detect_seconds=1.5).line()
    assert "6.0 s, 1.67 items/s, 13.3 frames/s; detector loaded after 4.0 s (40.0 frames/s from then, as the bar " \
           "counts), busy 1.5 s" in line


def test_a_step_that_runs_long_says_what_it_does_and_a_quick_one_adds_no_line():
    # a re-run over 100k cached items listed and checked its files for 15 s without a word (minutes at a
    # million, or from a cold disk); each of those steps is said once it has run SLOW_STEP_S
    import time

    from vlpcache.report import said_if_slow

    lines = []
    with said_if_slow("extract: looking for videos...", lines.append, after=0.05):
        assert wait_until(lambda: lines, guard_s=60.0)  # a step that runs until its line is said (0.05 s, or never)
    with said_if_slow("extract: checking...", lines.append, after=30.0):
        pass  # a step that ends at once
    time.sleep(0.1)
    assert lines == ["extract: looking for videos..."]


def test_a_shard_job_says_how_many_items_under_its_roots_it_leaves_to_the_other_shards(tmp_path):
    # a Slurm array whose jobs each get their own folder and --shard i/n extracts 1/n of each folder: its
    # summary said only "17 done", as if the folder were done
    from vlpcache.cache.schema import CacheSettings, empty_item
    from vlpcache.cache.writer import ShardWriter
    from vlpcache.extract.options import ExtractOptions
    from vlpcache.extract.progress import ExtractSummary
    from vlpcache.extract.runner import items_to_extract
    from vlpcache.extract.sources import Item

    settings = CacheSettings(frames=2, regions=2, feature_dim=4, detector="test", detector_weights_sha256="0",
                             backbone="test", backbone_weights_sha256="0")
    with ShardWriter(tmp_path / "cache", settings) as writer:
        writer.add("other", str(tmp_path / "other.mp4"), "video", empty_item(settings))
    items = [Item(f"v{i}", tmp_path / f"v{i}.mp4", "video") for i in range(20)]
    summary = ExtractSummary()
    plan = items_to_extract(items, RegionCache(tmp_path / "cache"), ExtractOptions(shard="1/4"), summary)
    assert 0 < len(plan.todo) < 20 and summary.other_shards == 20 - len(plan.todo)
    assert (f"{20 - len(plan.todo)} left to the other --shard jobs (each takes its share of the items under the "
            "same ROOTs)") in summary.line()
    summary = ExtractSummary()
    items_to_extract(items, RegionCache(tmp_path / "cache"), ExtractOptions(), summary)
    assert summary.other_shards == 0 and "other --shard" not in summary.line()


def test_an_item_an_earlier_extract_cached_through_a_folder_link_now_passed_over_is_not_extracted_again(tmp_path):
    # before, `a_link -> z_real` (sorting first) took z_real's items as a_link/x; now discovery passes the link
    # over for z_real itself, and z_real/x would have been extracted again beside a_link/x: the same file twice
    from vlpcache.cache.schema import CacheSettings, empty_item
    from vlpcache.cache.writer import ShardWriter
    from vlpcache.extract.options import ExtractOptions
    from vlpcache.extract.progress import ExtractSummary
    from vlpcache.extract.runner import items_to_extract, no_longer_there
    from vlpcache.extract.sources import discover_items

    root = tmp_path / "r"
    (root / "z_real").mkdir(parents=True)
    (root / "z_real" / "x.mp4").write_bytes(b"video" * 100)
    (root / "z_real" / "y.mp4").write_bytes(b"other" * 100)
    os.symlink("z_real", root / "a_link")
    settings = CacheSettings(frames=2, regions=2, feature_dim=4, detector="test", detector_weights_sha256="0",
                             backbone="test", backbone_weights_sha256="0")
    with ShardWriter(tmp_path / "cache", settings) as writer:  # as the extract before this version cached it
        writer.add("a_link/x", str(root / "a_link" / "x.mp4"), "video", empty_item(settings))
    linked = {}
    items, problems = discover_items([root], linked=linked)
    assert [i.id for i in items] == ["z_real/x", "z_real/y"] and linked == {str(root / "a_link"): str(root / "z_real")}
    cache = RegionCache(tmp_path / "cache")
    plan = items_to_extract(items, cache, ExtractOptions(), ExtractSummary(), [root], linked)
    assert [i.id for i in plan.todo] == ["z_real/y"]  # new: never cached by any path
    assert plan.clashes == [(str(root / "z_real" / "x.mp4"),
                             f"already cached as 'a_link/x' from {root / 'a_link' / 'x.mp4'}, a link to it that is now "
                             "passed over; skipped (captions name it 'a_link/x')")]
    assert plan.gone == [] and no_longer_there(items, cache, {}, [root], 0, 1) == ([], [])  # --prune keeps it


def test_the_frames_folders_a_cache_holds_of_one_size_are_not_looked_into_again(tmp_path):
    # re-running extract over 100k cached frames folders would read 2-3 image headers of each again; a folder an
    # extract before this version kept as one item with the note that its images differ is looked into (photos)
    from vlpcache.cache.schema import CacheSettings, empty_item
    from vlpcache.cache.writer import ShardWriter
    from vlpcache.extract.runner import frames_cached

    settings = CacheSettings(frames=2, regions=2, feature_dim=4, detector="test", detector_weights_sha256="0",
                             backbone="test", backbone_weights_sha256="0")
    assert frames_cached(tmp_path / "cache") == frozenset()  # no cache yet
    with ShardWriter(tmp_path / "cache", settings) as writer:
        writer.add("video1", "/data/video1", "frames", empty_item(settings))
        writer.add("photos", "/data/photos", "frames", empty_item(settings),
                   note="its images differ in size (500x375, 375x500): photos rather than a video's frames? ...")
        writer.add("clip", "/data/clip.mp4", "video", empty_item(settings))
    assert frames_cached(tmp_path / "cache") == frozenset({"/data/video1"})


def test_what_extract_redoes_follows_the_stamps_of_cached_failed_and_moved_files(tmp_path):
    from vlpcache.cache.schema import CacheSettings, empty_item
    from vlpcache.cache.writer import ShardWriter
    from vlpcache.extract.options import ExtractOptions
    from vlpcache.extract.progress import ExtractSummary
    from vlpcache.extract.runner import items_to_extract
    from vlpcache.extract.sources import Item

    video, other, cache_dir = tmp_path / "a.mp4", tmp_path / "b.mp4", tmp_path / "cache"
    video.write_bytes(b"old" * 1000)
    other.write_bytes(b"bad" * 1000)
    settings = CacheSettings(frames=2, regions=2, feature_dim=4, detector="test", detector_weights_sha256="0",
                             backbone="test", backbone_weights_sha256="0")
    with ShardWriter(cache_dir, settings) as writer:
        writer.add("a", str(video), "video", empty_item(settings), source=source_stamp(video))
        writer.record_failure("b", str(other), "unreadable", source=source_stamp(other))
    cached_stamp = source_stamp(video)

    def plan(*items, **options):
        summary = ExtractSummary()
        return items_to_extract(list(items), RegionCache(cache_dir), ExtractOptions(**options), summary), summary

    a, b = Item("a", video, "video"), Item("b", other, "video")
    unchanged, summary = plan(a, b)
    assert unchanged.todo == [] and (summary.skipped_cached, summary.skipped_failed) == (1, 1)
    video.write_bytes(b"new" * 1000)
    changed, _ = plan(a)
    assert [(i.id, i.replaces) for i in changed.todo] == [("a", cached_stamp)] and changed.changed == 1
    with ShardWriter(cache_dir, settings) as writer:  # what the run extracting it again met
        writer.record_failure("a", str(video), "unreadable", source=source_stamp(video))
    failed, summary = plan(a)
    assert failed.todo == [] and summary.skipped_failed == 1 and summary.skipped_cached == 0
    assert sorted(RegionCache(cache_dir).failures) == ["a", "b"]  # inspect --failures lists it; its old row is read
    assert [i.id for i in plan(a, retry_failed=True)[0].todo] == ["a"]

    video.write_bytes(b"NEW" * 1000)  # replaced again since it failed, as the other one
    other.write_bytes(b"god" * 1000)
    retried, _ = plan(a, b)
    assert [i.id for i in retried.todo] == ["a", "b"] and (retried.changed, retried.retried) == (1, 1)
    video.write_bytes(b"old" * 1000)  # the file the cache holds again (a new time: a copy)
    mended, summary = plan(a)
    assert mended.todo == [] and summary.skipped_cached == 1 and mended.mended == [("a", str(video))]
    with ShardWriter(cache_dir, settings, writer_name="s0of1-ray-0") as writer:  # a log read before the failure's
        writer.clear_failure("a", str(video))  # what extract does with it
    assert list(RegionCache(cache_dir).failures) == ["b"]

    path = video  # the same file elsewhere, twice: moved, not redone, and read from where it is now
    for folder in ("moved", "again"):
        moved = tmp_path / folder / "a.mp4"
        moved.parent.mkdir()
        path.rename(moved)
        assert plan(Item("a", moved, "video"))[0].moved == [("a", str(path), str(moved))]
        with ShardWriter(cache_dir, settings) as writer:
            writer.record_move("a", str(path), str(moved))  # what extract does with it
        assert RegionCache(cache_dir).get("a")["path"] == str(moved) and plan(Item("a", moved, "video"))[0].moved == []
        path = moved
    moved.write_bytes(b"mov" * 1000)  # then other content there: redone
    assert [i.replaces for i in plan(Item("a", moved, "video"))[0].todo] == [cached_stamp]
    third = tmp_path / "third.mp4"
    moved.rename(third)  # moved and other content: redone, not taken as moved
    elsewhere, _ = plan(Item("a", third, "video"))
    assert [i.replaces for i in elsewhere.todo] == [cached_stamp] and elsewhere.moved == []


def test_a_sources_stamp_notices_new_content_not_a_new_time_and_reads_the_file_only_when_the_time_moved(tmp_path,
                                                                                                       monkeypatch):
    from vlpcache.extract import stamps

    video, folder = tmp_path / "a.mp4", tmp_path / "frames"
    video.write_bytes(bytes(range(256)) * 1024)  # 256 KiB: both ends are hashed
    folder.mkdir()
    for name in ("1.jpg", "2.jpg"):
        (folder / name).write_bytes(name.encode() * 100)
    video_stamp, folder_stamp = stamps.source_stamp(video), stamps.source_stamp(folder)
    reads = []
    monkeypatch.setattr(stamps, "_digest", lambda files, digest=stamps._digest: reads.append(files) or digest(files))
    assert not stamps.source_changed(video_stamp, video) and not stamps.source_changed(folder_stamp, folder)
    assert reads == []  # size and time agree: a stat, no read
    os.utime(video, ns=(1, 1))  # a copy that did not keep times
    assert not stamps.source_changed(video_stamp, video) and len(reads) == 1
    data = bytearray(video.read_bytes())
    data[-5] ^= 1  # the same size, another last chunk (a video re-encoded to the same length)
    video.write_bytes(bytes(data))
    assert stamps.source_changed(video_stamp, video)
    (folder / ".DS_Store").write_bytes(b"x")  # what a file browser leaves: not a frame
    (folder / "notes.txt").write_bytes(b"x")
    assert not stamps.source_changed(folder_stamp, folder)
    (folder / "3.jpg").write_bytes(b"x")  # a frame more
    assert stamps.source_changed(folder_stamp, folder)
    (folder / "3.jpg").unlink()
    (folder / "2.jpg").rename(folder / "9.jpg")  # the same bytes under other names
    assert stamps.source_changed(folder_stamp, folder)
    video.unlink()
    assert stamps.source_changed(video_stamp, video) and stamps.source_stamp(video) == ""
    assert not stamps.source_changed("", video) and not stamps.source_changed("0:1:2:3", video)  # unknown: kept


def test_frames_that_swap_names_keeping_their_times_are_a_change_but_not_under_an_older_stamp(tmp_path):
    from vlpcache.extract import stamps
    from vlpcache.model.run_layout import content_key_each

    folder = tmp_path / "frames"
    folder.mkdir()
    for name, content in (("1.jpg", b"first" * 50), ("2.jpg", b"second" * 40), ("3.jpg", b"third" * 60)):
        (folder / name).write_bytes(content)
        os.utime(folder / name, ns=(10**18, 10**18 + len(content)))  # each its own time; 3.jpg the newest
    stamp = stamps.source_stamp(folder)
    older = stamp.rsplit(":", 1)[0]  # as vlpcache wrote it before stamps held each frame's name, size and time
    assert not stamps.source_changed(stamp, folder) and not stamps.source_changed(older, folder)
    assert content_key_each([stamp]).tolist() == content_key_each([older]).tolist() != [0]  # the same content
    (folder / "1.jpg").rename(folder / "t.jpg")  # `mv` keeps each file's time: the newest time and the names stay
    (folder / "2.jpg").rename(folder / "1.jpg")
    (folder / "t.jpg").rename(folder / "2.jpg")
    assert stamps.source_changed(stamp, folder)
    assert not stamps.source_changed(older, folder)  # an existing cache's stamps: compared as they were, not all "changed"
    (folder / "1.jpg").rename(folder / "t.jpg")  # back, then copied without their times: the same content, kept
    (folder / "2.jpg").rename(folder / "1.jpg")
    (folder / "t.jpg").rename(folder / "2.jpg")
    for frame in folder.iterdir():
        os.utime(frame, ns=(10**18, 10**18))
    assert not stamps.source_changed(stamp, folder)


def test_other_settings_are_refused_for_an_existing_cache(extracted, media):
    cache_dir, _ = extracted
    result = vlpcache("extract", media, "-o", cache_dir, "--frames", 8, cwd=cache_dir.parent, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "frames: 4 != 8" in result.stderr
    assert "Traceback" not in result.stderr
    result = vlpcache("extract", media, "-o", cache_dir, "--frames", 4, "--regions", 10, cwd=cache_dir.parent, check=False)
    assert "regions: 31 (30 + the whole frame) != 11 (10 + the whole frame)" in result.stderr  # as --regions counts
    other = cache_dir.parent / "other"  # a root of its own, refused: pretrain looked for captions beside it
    other.mkdir(exist_ok=True)
    shutil.copy(next(media.glob("*.jpg")), other)
    assert vlpcache("extract", other, "-o", cache_dir, "--frames", 8, cwd=cache_dir.parent, check=False).returncode == 2
    assert str(other.resolve()) not in Workspace().extracted_roots()


# the progress bar's rate as tqdm writes it: items a second, or seconds an item once one takes longer than a second
# (3 items on a machine under load: `3/3 [00:03<00:00,  1.31s/item`), which "item/s" alone failed
BAR_RATE = r"(?:[\d.]+|\?)item/s|[\d.]+s/item"


def _run_on_an_unsized_terminal(args: list[str], cwd: Path, ctrl_c_at: str | None = None) -> tuple[int, str]:
    """Run `python -m vlpcache ARGS` on a new pseudo-terminal that reports 0 x 0, as `script` run
    from cron gives one; (exit status, everything it wrote there). ctrl_c_at: once what it wrote matches
    this pattern, press Ctrl-C (SIGINT to its process group, as a terminal sends it)."""
    import pty
    import select
    import signal
    import time

    pid, terminal = pty.fork()
    if pid == 0:  # the child: a session of its own, whose stdin, stdout and stderr are the terminal, never sized
        os.chdir(cwd)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a terminal's job has it, even under a runner that ignores it
        os.execv(sys.executable, [sys.executable, "-m", "vlpcache", *args])
    written, deadline = b"", time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        if select.select([terminal], [], [], 1.0)[0]:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # EIO: the child is gone and the terminal closed
                break
            if not chunk:
                break
            written += chunk
            if ctrl_c_at is not None and re.search(ctrl_c_at, written.decode(errors="replace")):
                os.killpg(pid, signal.SIGINT)
                ctrl_c_at = None
    else:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(terminal)
    return os.waitstatus_to_exitcode(status), written.decode(errors="replace")


def test_a_terminal_that_reports_no_size_still_shows_the_progress_bar(msrvtt_dir, tmp_path):
    # tqdm took the 0 x 0 at its word and drew nothing at all: a long extract showed no sign of life
    root = tmp_path / "frames"
    for folder in sorted((msrvtt_dir / "frames" / "val").iterdir())[:3]:
        shutil.copytree(folder, root / folder.name)
    code, written = _run_on_an_unsized_terminal(["extract", str(root), "-o", str(tmp_path / "cache"), "--frames", "2",
                                                 "--workers", "1"], tmp_path)
    assert code == 0, written
    assert re.search(rf"3/3 \[[^\]]*(?:{BAR_RATE})", written), written


def test_a_progress_bar_written_to_a_file_is_lines_not_carriage_returns(msrvtt_dir, tmp_path, start_method):
    # `extract ... > job.out 2>&1` (a Slurm job's log): tqdm redrew its bar with a carriage return ten
    # times a second, one line growing by up to 50 KB a minute that `less` shows as one; under forkserver
    # (Python 3.14's), tqdm's multiprocessing lock was said leaked after the summary (the command ends by os._exit)
    root = tmp_path / "frames"
    for folder in sorted((msrvtt_dir / "frames" / "val").iterdir())[:3]:
        shutil.copytree(folder, root / folder.name)
    (root / "notes.bin").write_bytes(b"not media")  # a line said while the bar is open
    with open(tmp_path / "job.out", "w") as log:
        subprocess.run([sys.executable, "-m", "vlpcache", "extract", str(root), "-o", str(tmp_path / "cache"),
                        "--frames", "2", "--workers", "1"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                       check=True, timeout=HANG_GUARD_S)
    written = (tmp_path / "job.out").read_bytes().decode()  # read_text would make each \r a newline
    assert "\r" not in written, written
    lines = written.splitlines()
    bar = [n for n, line in enumerate(lines) if re.search(BAR_RATE, line)]
    assert bar and "3/3 [" in lines[bar[-1]], written  # the bar's last state, a line of its own
    assert lines[-1].startswith("extract: 3 done"), written


def test_a_rendered_pictures_words_draw_the_accented_letters_of_file_names():
    # Pillow's own font has ASCII only: `my holiday – café été.mp4` was drawn `my holiday▯caf▯▯▯mp4`
    from vlpcache.extract.render import TEXT_FONTS, text_font

    def on_this_system(name: str) -> bool:
        try:
            return bool(ImageFont.truetype(name, 11))
        except OSError:
            return False

    if not any(map(on_this_system, ("DejaVuSans.ttf", "LiberationSans-Regular.ttf"))):
        pytest.skip(f"none of {', '.join(TEXT_FONTS)} is on this system (Debian: fonts-dejavu-core)")
    font = text_font()
    def drawn(letter: str) -> bytes:
        picture = Image.new("L", (24, 24))
        ImageDraw.Draw(picture).text((4, 4), letter, fill=255, font=font)
        return picture.tobytes()

    missing = drawn("\U0010fffd")  # a letter no font has: what a missing one looks like
    assert all(drawn(letter) != missing for letter in "éüß–çñ")


def test_a_default_picture_name_fits_a_file_name_whatever_the_ids_length():
    # an id under a 200-character folder with a 200-character name: "File name too long", after decoding its frames,
    # saying to "pass -o a writable file" to a user who passed no -o
    from vlpcache.extract.render import default_picture_name

    long_id = "d" * 200 + "/clip é " + "n" * 200
    name = default_picture_name(long_id).name
    assert len(name.encode()) <= 255 and name.endswith(".png") and name.startswith("n")
    assert name != default_picture_name(long_id[1:]).name  # two ids, two pictures
    assert default_picture_name("clips/bikes").name == "clips_bikes.png"


def test_a_small_picture_is_rendered_large_enough_for_its_labels():
    from PIL import Image

    from vlpcache.extract.render import at_least

    assert at_least(Image.new("RGB", (150, 110))).size == (320, 235)  # a thumbnail-sized photo: its labels fit
    assert at_least(Image.new("RGB", (8, 8))).size == (320, 320)
    assert at_least(Image.new("RGB", (480, 270))).size == (480, 270)
    # a thin one (1 x 300, scaled to 1 x 320) keeps a cell wide enough for its title and captions: they were cut to 1 px
    from vlpcache.extract.render import CAPTION_HEIGHT, cell_size

    assert cell_size([at_least(Image.new("RGB", (1, 300)))]) == (320, 320 + CAPTION_HEIGHT)
    assert cell_size([Image.new("RGB", (480, 270)), Image.new("RGB", (320, 240))]) == (480, 270 + CAPTION_HEIGHT)


def test_a_box_past_the_frame_is_drawn_at_its_edge():
    # a box of 3e38 (a shard made by hand: a read leaves such a row out, but allows rounding past the frame) was a
    # SystemError of Pillow's draw_bitmap in `inspect --render`
    from PIL import Image, ImageDraw

    from vlpcache.cache.labels import COCO
    from vlpcache.extract.render import PALETTE, draw_regions

    picture = Image.new("RGB", (100, 80), (96, 96, 96))
    cached = {"region_mask": np.array([[True, True, True]]), "labels": np.array([[2, 3, 4]], np.int16),
              "scores": np.array([[0.5, 0.5, 0.5]], np.float16),
              "boxes": np.array([[[0.5, 0.5, 3e38, 3e38], [-0.0005, 0.25, 1.0005, 0.75], [0.1, 3e38, 0.2, 3e38]]],
                                np.float32)}
    draw_regions(ImageDraw.Draw(picture), cached, 0, (0, 0), picture.size, COCO)
    pixels = np.asarray(picture)
    assert tuple(pixels[79, 75]) == tuple(pixels[70, 99]) == PALETTE[2]  # the first's bottom and right: the frame's
    assert tuple(pixels[30, 0]) == tuple(pixels[30, 99]) == PALETTE[3]  # the second's sides: the frame's too


def test_inspect_summarises_and_renders_an_item(extracted, tmp_path):
    cache_dir, _ = extracted
    summary = json.loads(vlpcache("inspect", cache_dir, "--json", cwd=tmp_path).stdout)
    assert summary["items"] == 13 and summary["T"] == 4 and summary["N"] == 31 and summary["D"] == 1280
    models = Path(os.environ["VLPCACHE_MODELS"])  # the weights the extract read (conftest sets it), hashed here
    assert summary["provenance"]["detector_weights_sha256"] == file_sha256(models / "yolox_nano_coco.onnx")
    assert summary["provenance"]["backbone_weights_sha256"] == file_sha256(models / "mobilenet_v2_imagenet_features.pth")
    # what the detector found: every real region but the whole frame's, counted item by item here
    cache = RegionCache(cache_dir)
    found = collections.Counter(int(item["labels"][t, n]) for item in (cache[i] for i in range(len(cache)))
                                for t, n in zip(*np.nonzero(item["region_mask"] & item["frame_mask"][:, None]))
                                if item["labels"][t, n] >= 0)
    assert summary["detections"] == found.total() > 0
    commonest = sorted(found.items(), key=lambda kv: (-kv[1], kv[0]))[:8]  # ties in class order
    assert [(t["label"], t["count"]) for t in summary["top_labels"]] == [(COCO.label(c), n) for c, n in commonest]
    assert summary["top_labels"][0]["share"] == round(found.most_common(1)[0][1] / found.total(), 4)
    text = vlpcache("inspect", cache_dir, cwd=tmp_path).stdout
    assert "T=4 frames, N=31 regions" in text and "on disk" in text
    empty = sum(int(item["frame_mask"][t]) and not ((item["labels"][t] >= 0) & item["region_mask"][t]).any()
                for item in (cache[i] for i in range(len(cache))) for t in range(cache.settings.frames))
    assert summary["frames_without_detections"] == empty
    top = summary["top_labels"][0]
    assert (f"found       {found.total():,} detections (none in {empty / summary['frames']:.0%} of the frames): "
            f"{top['label']} {top['share']:.0%}, ") in text
    out = tmp_path / "bikes.png"
    vlpcache("inspect", cache_dir, "--render", "clips/bikes", "-o", out, cwd=tmp_path)
    picture = Image.open(out)
    assert picture.width >= 4 * 200 and picture.height > 100
    missing = vlpcache("inspect", cache_dir, "--render", "nope", cwd=tmp_path, check=False)
    assert missing.returncode == 2 and "'nope' names no item of " in missing.stderr
    # named as captions name their video: a file name, the end of the id; a typo gets ids like it
    by_name = vlpcache("inspect", cache_dir, "--render", "bikes.mp4", cwd=tmp_path)
    assert by_name.stdout == "wrote clips_bikes.png\n" and Image.open(tmp_path / "clips_bikes.png").size == picture.size
    typo = vlpcache("inspect", cache_dir, "--render", "clips/bike", cwd=tmp_path, check=False)
    assert typo.returncode == 2 and "'clips/bike' names no item of " in typo.stderr and "did you mean 'clips/bikes'" \
        in typo.stderr


def test_ids_like_a_name_that_names_none_are_found_letter_case_aside():
    from vlpcache.captions import ids_like

    assert ids_like("CASE", ["--help", "Case", "case", "other"]) == ["Case", "case"]  # was: ids look like '--help'


def test_broken_files_get_one_line_each_and_the_run_goes_on(tmp_path, videos_dir):
    from broken_media import make_broken_media

    root = tmp_path / "broken"
    expected = make_broken_media(root, videos_dir / "cup.mp4")
    shutil.copy(videos_dir / "tests_data_test.mp4", root / "good.mp4")
    latin1 = root / os.fsdecode(b"caf\xe9.mp4")  # a name in Latin-1 bytes, as an unzipped Windows archive leaves it
    shutil.copy(videos_dir / "tests_data_test.mp4", latin1)
    result = vlpcache("extract", root, "-o", tmp_path / "cache", "--frames", 2, cwd=tmp_path)
    assert "Traceback" not in result.stderr
    cache = RegionCache(tmp_path / "cache")
    failures = cache.failures
    assert "good" in cache
    assert "extract: passed over 2 file(s) that are not videos or images (.txt 2)" in result.stderr.splitlines()
    assert f"{root}/caf\\xe9.mp4: path is not valid UTF-8, which the cache stores ids and paths in; skipped (rename " \
           "it, e.g. with convmv)" in result.stderr.splitlines()
    assert not [item_id for item_id in [*cache.ids, *failures] if item_id.startswith("caf")]
    for name, outcome in expected.items():
        item_id = Path(name).with_suffix("").as_posix()
        if outcome == "ok":
            assert item_id in cache, f"{name} should have been extracted: {failures.get(item_id)}"
        elif outcome == "ignored":
            assert item_id not in cache and item_id not in failures
        else:
            assert outcome in failures[item_id]["reason"], f"{name}: {failures.get(item_id)}"
            if (root / name).is_file():  # the failed file's stamp: a replacement is tried again without asking
                assert failures[item_id]["source"] == source_stamp(root / name), name
            lines = [line for line in result.stderr.splitlines() if line.startswith(f"{root / name}: ")]
            assert len(lines) == 1 and outcome in lines[0], result.stderr
    # inspect --failures lists each of them once with its reason, as text and as JSON
    failed = {str(root / name): outcome for name, outcome in expected.items() if outcome not in ("ok", "ignored")}
    listed = [line for line in vlpcache("inspect", tmp_path / "cache", "--failures", cwd=tmp_path).stdout.splitlines()
              if line.startswith("failed ")]
    assert len(listed) == len(failed) and all(
        sum(line.split(maxsplit=1)[1].startswith(f"{path}: ") and outcome in line for line in listed) == 1
        for path, outcome in failed.items())
    as_json = json.loads(vlpcache("inspect", tmp_path / "cache", "--failures", "--json", cwd=tmp_path).stdout)
    assert sorted(record["path"] for record in as_json["failed_items"]) == sorted(failed)
    # items kept despite problems: one line each while extracting, their notes in the cache, listed by inspect
    damaged = {"truncated_real": "truncated file?", "frames_one_bad": "1 of 12 frames unreadable, e.g. 4.jpg",
               "garbage_in_middle": "packets failed to decode"}  # (met where a target's next frame is decoded)
    assert cache.notes.keys() == damaged.keys(), cache.notes
    for item_id, words in damaged.items():
        frames = int(cache.get(item_id)["frame_mask"].sum())
        lines = [line for line in result.stderr.splitlines() if line.startswith(f"{root / item_id}")]
        assert len(lines) == 1 and words in lines[0] and lines[0].endswith(f"; kept with {frames} frame"
                                                                            + ("s" if frames != 1 else "")), lines
        assert words in cache.notes[item_id] and cache.note_of(item_id) == cache.notes[item_id]
    assert (f"failed, {len(damaged)} kept with a note (inspect --failures lists them), 1 path(s) passed over when "
            "looking for media (said above; inspect --failures lists them)") in result.stderr.splitlines()[-1]
    # the non-UTF-8 name, passed over: counted in the summary, kept in the cache, listed by inspect
    assert as_json["passed_over"] == 1 and [(r["path"], r["reason"]) for r in as_json["passed_over_paths"]] == [
        (f"{root}/caf\\xe9.mp4", "path is not valid UTF-8, which the cache stores ids and paths in; skipped (rename it, "
                                  "e.g. with convmv)")]
    assert as_json["kept_with_problems"] == len(damaged)
    assert {r["id"]: r["note"] for r in as_json["damaged_items"]} == cache.notes
    text = vlpcache("inspect", tmp_path / "cache", "--failures", cwd=tmp_path).stdout
    assert f"noted       {len(damaged)} item(s) kept with a note" in text
    assert sum(line.startswith("noted       /") for line in text.splitlines()) == len(damaged)
    assert "passed over 1 path(s) left out when looking for media" in text
    assert f"passed over {root}/caf\\xe9.mp4: path is not valid UTF-8" in text
    rendered = vlpcache("inspect", tmp_path / "cache", "--render", "frames_one_bad", "-o", tmp_path / "bad.png", cwd=tmp_path)
    assert rendered.stdout.strip().endswith(f"(the item was kept with a note: {cache.notes['frames_one_bad']})")
    # failed items are skipped on a re-run, retried with --retry-failed
    again = vlpcache("extract", root, "-o", tmp_path / "cache", "--frames", 2, cwd=tmp_path)
    assert f"{len(failures)} skipped (failed before" in again.stderr
    assert "kept with a note" not in again.stderr and RegionCache(tmp_path / "cache").notes == cache.notes
    retry = vlpcache("extract", root, "-o", tmp_path / "cache", "--frames", 2, "--retry-failed", cwd=tmp_path)
    assert f"{len(failures)} failed" in retry.stderr
    # the name mended, the next run over the folder takes the file and drops it from the passed-over list
    latin1.rename(root / "cafe.mp4")
    vlpcache("extract", root, "-o", tmp_path / "cache", "--frames", 2, cwd=tmp_path)
    assert "cafe" in RegionCache(tmp_path / "cache")
    mended = json.loads(vlpcache("inspect", tmp_path / "cache", "--failures", "--json", cwd=tmp_path).stdout)
    assert mended["passed_over"] == 0 and mended["passed_over_paths"] == []


def test_no_frame_folders_caches_each_photo_of_a_subfolder_as_an_item(tmp_path, flickr_dir):
    photos = sorted((flickr_dir / "images").iterdir())[:3]
    folder = tmp_path / "coco" / "train2014"  # photos in a subfolder of the root, as COCO's are
    folder.mkdir(parents=True)
    for photo in photos:  # all of one size (as a resized dataset's): without the option, one video's frames
        Image.open(photo).resize((320, 240)).save(folder / photo.name)
    vlpcache("extract", tmp_path / "coco", "-o", tmp_path / "cache", "--no-frame-folders", "--backbone", "neck",
             cwd=tmp_path)
    cache = RegionCache(tmp_path / "cache")
    assert sorted(cache.ids) == [f"train2014/{photo.stem}" for photo in photos]
    assert {cache.get(i)["kind"] for i in cache.ids} == {"image"}


def test_nothing_processable_exits_non_zero_and_no_media_is_one_error(models_dir, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.mp4").write_bytes(b"")
    result = vlpcache("extract", tmp_path / "bad", "-o", tmp_path / "cache", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "x.mp4: " in result.stderr and "0 done" in result.stderr
    again = vlpcache("extract", tmp_path / "bad", "-o", tmp_path / "cache", cwd=tmp_path, check=False)
    assert again.returncode == 1 and "1 skipped" in again.stderr  # the same command again (a requeue, `&& pretrain`):
    # still nothing processed, though nothing failed this time
    (tmp_path / "empty").mkdir()
    result = vlpcache("extract", tmp_path / "empty", "-o", tmp_path / "c2", cwd=tmp_path, check=False)
    assert result.returncode == 2 and result.stderr.endswith(f"no videos, images or frame folders found under "
                                                             f"{tmp_path / 'empty'}: it is empty\n")


def test_two_shard_processes_fill_one_cache_together(media, tmp_path):
    cache_dir = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-m", "vlpcache", "extract", str(media), "-o", str(cache_dir),
                               "--frames", "2", "--shard", f"{i}/2", "--quiet", "--workers", "1"],
                              cwd=tmp_path, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=HANG_GUARD_S)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    # rows counted in the shard files themselves (the reader would hide an item stored twice): each
    # process stored exactly the items whose id hashes to its shard, and nothing else
    items, _ = discover_items([media])
    stored = {"s0of2": [], "s1of2": []}
    for shard in (cache_dir / SHARD_DIR).glob("*.h5"):
        with h5py.File(shard, "r") as f:
            stored[shard.name.split("-")[0]] += [i.decode() for i in f["ids"][:]]
    for i in range(2):
        expected = sorted(item.id for item in items if zlib.crc32(item.id.encode()) % 2 == i)
        assert sorted(stored[f"s{i}of2"]) == expected
    assert 0 < len(stored["s0of2"]) < 13 and len(stored["s0of2"]) + len(stored["s1of2"]) == 13


def _assert_same_content(a: RegionCache, b: RegionCache):
    assert sorted(a.ids) == sorted(b.ids) and len(a.ids) == len(set(a.ids))
    for item_id in a.ids:
        x, y = a.get(item_id), b.get(item_id)
        for spec in a.settings.arrays():
            np.testing.assert_array_equal(x[spec.name], y[spec.name], err_msg=f"{item_id} {spec.name}")


def test_frcnn_extracts_with_a_saved_state_dict_and_fails_offline_without_one(tmp_path, msrvtt_dir):
    import torch
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    root = tmp_path / "frames"
    for folder in sorted((msrvtt_dir / "frames" / "val").iterdir())[:2]:
        shutil.copytree(folder, root / folder.name)
    weights = tmp_path / "frcnn.pth"
    torch.save(fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None).state_dict(), weights)
    arch = ["--detector", "frcnn", "--backbone", "fasterrcnn_mobilenet_v3_large_320_fpn", "--frames", 2]
    vlpcache("extract", root, "-o", tmp_path / "cache", *arch, "--weights", weights, cwd=tmp_path)
    cache = RegionCache(tmp_path / "cache")
    assert len(cache) == 2 and cache.settings.feature_dim == 1024
    assert cache.settings.detector == "frcnn:fasterrcnn_mobilenet_v3_large_320_fpn"
    assert cache[0]["frame_mask"].all() and cache[0]["region_mask"][:, 0].all()

    offline = subprocess.run([sys.executable, "-m", "vlpcache", "extract", str(root), "-o", str(tmp_path / "c2"),
                              *map(str, arch)], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S,
                             env={**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "HTTPS_PROXY": "http://127.0.0.1:9"})
    assert offline.returncode == 2 and "Traceback" not in offline.stderr
    assert "--weights FILE" in offline.stderr.strip().splitlines()[-1]


def test_device_cuda_without_a_gpu_is_one_error_before_anything_is_written(tmp_path, msrvtt_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --device cuda is valid here")
    folder = next((msrvtt_dir / "frames" / "val").iterdir())
    result = vlpcache("extract", folder.parent, "-o", tmp_path / "cache", "--device", "cuda", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --device cuda: no CUDA device")
    assert not (tmp_path / "cache").exists()


def test_no_autotune_reaches_the_detector_and_is_cudnns_setting_on_cuda(tmp_path, msrvtt_dir, monkeypatch):
    """--no-autotune goes from the command line to the loaded detector, and on CUDA it is what cuDNN is told
    (torch.backends.cudnn.benchmark is process-wide: a detector sets it either way, never only to on)."""
    import torch

    from vlpcache import cli
    from vlpcache.extract import runner
    from vlpcache.extract.detectors.inference import prepare_device

    assert cli.extract.make_context("extract", [str(tmp_path), "--no-autotune"]).params["autotune"] is False
    assert cli.extract.make_context("extract", [str(tmp_path)]).params["autotune"] is True

    loaded = []
    load = runner.load_detector

    def spy(*args):
        loaded.append(load(*args))
        return loaded[-1]

    monkeypatch.setattr(runner, "load_detector", spy)
    for folder in sorted((msrvtt_dir / "frames" / "val").iterdir())[:2]:
        shutil.copytree(folder, tmp_path / "frames" / folder.name)
    summary = runner.run_extract([tmp_path / "frames"], cache_dir=tmp_path / "cache", frames=2, device="cpu",
                                 autotune=False, workers=1, quiet=True)
    assert summary.done == 2 and [d.config.autotune for d in loaded] == [False]

    before = torch.backends.cudnn.benchmark
    try:
        for autotune in (True, False, True):
            assert prepare_device(torch.device("cuda"), "auto", autotune) == torch.float16
            assert torch.backends.cudnn.benchmark is autotune
        torch.backends.cudnn.benchmark = False
        prepare_device(torch.device("cpu"), "auto", True)  # the CPU leaves cuDNN alone
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


def test_default_workers_follow_the_cores_this_process_may_use_not_the_machines():
    """A SLURM job given 8 cores of a 128-core node runs on those 8 (its cpuset): 127 decoding processes were
    started there, os.cpu_count() counting the node's. Here: taskset gives this process one core."""
    if not shutil.which("taskset") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs taskset and at least 2 cores to give a process fewer than the machine has")
    code = ("from vlpcache.devices import usable_cores; from vlpcache.extract.options import ExtractOptions; "
            "print(usable_cores(), ExtractOptions().worker_count())")
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=HANG_GUARD_S)
    assert pinned.stdout.split() == ["1", "1"], pinned.stderr
    from vlpcache.devices import usable_cores

    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S)
    cores = usable_cores()  # (this machine's: a CPU quota, where one binds, counts too)
    assert free.stdout.split() == [str(cores), str(max(1, cores - 1))], free.stderr


@pytest.mark.parametrize("proc, files, cores", [
    ("0::/\n", {"cpu.max": "50000 100000\n"}, 1),  # docker --cpus 0.5 (cgroup v2): one core, rounded up
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),  # no quota: the cores it may run on
    ("0::/\n", {"cpu.max": "garbage\n"}, None),
    ("0::/job/step\n", {"job/cpu.max": "100000 100000\n", "job/step/cpu.max": "max 100000\n"}, 1),  # a parent's
    ("0::/docker/abc\n", {"cpu.max": "100000 100000\n"}, 1),  # its own cgroup mounted as the root
    ("1:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "100000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 1),
    ("1:cpu:/\n0::/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1 beside v2
    ("4:memory:/x\n", {"cpu.max": "100000 100000\n"}, None),  # no cpu controller named
    ("", {}, None),  # no cgroups at all
], ids=["v2-half", "v2-max", "v2-unreadable", "v2-parent", "v2-own-root", "v1-one", "v1-none", "no-cpu", "none"])
def test_a_cgroup_cpu_quota_bounds_the_cores_used(tmp_path, proc, files, cores):
    from vlpcache.devices import usable_cores

    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text)
    (tmp_path / "cgroup").write_text(proc)
    assert usable_cores(tmp_path / "fs", tmp_path / "cgroup") == (cores or len(os.sched_getaffinity(0)))


def test_extract_in_a_cgroup_given_half_a_core_starts_one_decoding_worker_and_one_torch_thread(tmp_path):
    """A real cgroup (v1's cpu controller, or v2's), its quota half a core, as `docker --cpus 0.5` makes one."""
    code = ("import torch; from vlpcache.devices import "
            "quota_threads, resolve_device, usable_cores; from vlpcache.extract.options import ExtractOptions; "
            "resolve_device('cpu'); print(usable_cores(), ExtractOptions().worker_count(), quota_threads(), "
            "torch.get_num_threads())")  # (every command's torch work starts at resolve_device)
    for base in (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")):
        folder = base / f"vlpcache-test-{os.getpid()}"
        try:
            folder.mkdir()
        except OSError:
            continue
        try:
            if (folder / "cpu.cfs_quota_us").exists():
                (folder / "cpu.cfs_quota_us").write_text("50000")
            elif (folder / "cpu.max").exists():
                (folder / "cpu.max").write_text("50000 100000")
            else:
                continue
            inside = subprocess.run(["sh", "-c", f'echo $$ > {folder / "cgroup.procs"} || exit 97; exec "$0" -c "$1"',
                                     sys.executable, code], capture_output=True, text=True, timeout=HANG_GUARD_S,
                                    env={k: v for k, v in os.environ.items()  # as users run it: torch's own count
                                         if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
            if inside.returncode == 97:  # (cgroup v2's rules, or a container's, keep a process out of it)
                pytest.skip(f"cannot move a process into the cgroup made here: {inside.stderr.strip()}")
            quota = "1" if len(os.sched_getaffinity(0)) > 1 else "0"  # (0: the cores it may run on are no more)
            assert inside.stdout.split() == ["1", "1", quota, "1"], inside.stderr  # one worker, torch one thread
            return
        finally:
            folder.rmdir()
    pytest.skip("no cgroup to make here (needs root and a writable cgroup filesystem with the cpu controller)")
