"""discover_items: which items a set of roots holds, their ids and kinds, and the problems on the way."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path

import pytest
from PIL import Image


from vlpcache.extract.sources import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    Item,
    OtherFiles,
    discover_items,
    frame_files,
    natural_key,
    other_files,
    passed_over_line,
    shard_of,
    sniffed_kind,
)


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def kinds_by_id(items: list[Item]) -> dict[str, str]:
    return {item.id: item.kind for item in items}


def test_videos_images_and_frame_folders_get_relative_ids_without_extension(tmp_path):
    touch(tmp_path / "a.mp4")
    touch(tmp_path / "sub" / "b.JPG")
    touch(tmp_path / "sub" / "clip with space é.mkv")
    for name in ("1.jpg", "2.jpg", "10.jpg"):
        touch(tmp_path / "frames" / "video7" / name)
    touch(tmp_path / "notes.txt")

    items, problems = discover_items([tmp_path])

    assert problems == []
    assert kinds_by_id(items) == {
        "a": "video", "sub/b": "image", "sub/clip with space é": "video", "frames/video7": "frames",
    }
    assert all(item.path.is_absolute() and item.path.exists() for item in items)
    assert next(i for i in items if i.kind == "frames").path == tmp_path.absolute() / "frames" / "video7"


def test_images_directly_in_a_root_are_image_items_not_one_frames_item(tmp_path):
    for name in ("dog.jpg", "cat.png"):
        touch(tmp_path / name)
    items, _ = discover_items([tmp_path])
    assert kinds_by_id(items) == {"cat": "image", "dog": "image"}


def test_folder_with_images_and_a_video_is_not_a_frames_folder(tmp_path):
    touch(tmp_path / "mixed" / "1.jpg")
    touch(tmp_path / "mixed" / "clip.mp4")
    touch(tmp_path / "nested" / "inner" / "1.jpg")
    touch(tmp_path / "nested" / "top.jpg")
    items, _ = discover_items([tmp_path])
    assert kinds_by_id(items) == {
        "mixed/1": "image", "mixed/clip": "video", "nested/top": "image", "nested/inner": "frames",
    }


def test_frames_of_a_folder_are_in_natural_order(tmp_path):
    for name in ("10.jpg", "2.jpg", "1.png", "frame_0003.jpg", "notes.txt", ".hidden.jpg"):
        touch(tmp_path / name)
    assert [p.name for p in frame_files(tmp_path)] == ["1.png", "2.jpg", "10.jpg", "frame_0003.jpg"]
    assert sorted(["b10", "b9", "a"], key=natural_key) == ["a", "b9", "b10"]


def test_items_come_in_the_same_order_every_time(tmp_path):
    for name in ("b.mp4", "a10.mp4", "a9.mp4", "c/x.jpg", "c/y.avi"):
        touch(tmp_path / name)
    first, _ = discover_items([tmp_path])
    assert [i.id for i in first] == ["a9", "a10", "b", "c/x", "c/y"]
    assert discover_items([tmp_path])[0] == first


def test_duplicate_id_keeps_the_first_and_reports_the_second(tmp_path):
    touch(tmp_path / "one" / "clip.avi")
    touch(tmp_path / "one" / "clip.mp4")
    touch(tmp_path / "two" / "clip.mp4")
    items, problems = discover_items([tmp_path / "one", tmp_path / "two"])
    assert [(i.id, i.path.name) for i in items] == [("clip", "clip.avi")]
    assert len(problems) == 2
    assert all("duplicate id 'clip'" in reason for _, reason in problems)
    assert {Path(path).parent.name for path, _ in problems} == {"one", "two"}


def test_a_picture_beside_a_video_of_its_name_is_passed_over_for_the_video(tmp_path):
    """yt-dlp's --write-thumbnail and a phone's Live Photos put a picture beside each video under its name:
    natural order reaches the picture first, and it took the id, the video passed over."""
    touch(tmp_path / "yt" / "Bikes in town [abc123].jpg")
    touch(tmp_path / "yt" / "Bikes in town [abc123].mp4")
    touch(tmp_path / "yt" / "Cup [def456].mp4")
    touch(tmp_path / "yt" / "poster.jpg")
    items, problems = discover_items([tmp_path / "yt"])
    assert sorted((i.id, i.path.name) for i in items) == [("Bikes in town [abc123]", "Bikes in town [abc123].mp4"),
                                                          ("Cup [def456]", "Cup [def456].mp4"), ("poster", "poster.jpg")]
    [(path, reason)] = problems
    assert path.endswith(".jpg") and "a picture beside a video of the same name (its thumbnail, a Live Photo's " \
                                     "still), passed over for the video" in reason


def test_missing_root_is_a_problem_and_the_other_roots_still_count(tmp_path):
    touch(tmp_path / "a.mp4")
    items, problems = discover_items([tmp_path / "nope", tmp_path])
    assert [i.id for i in items] == ["a"]
    assert problems == [(str(tmp_path / "nope"), "does not exist; skipped")]


def test_a_root_may_be_a_single_file(tmp_path):
    video = touch(tmp_path / "deep" / "clip.webm")
    items, problems = discover_items([video])
    assert items == [Item("clip", video.absolute(), "video")] and problems == []


def test_a_root_file_that_is_not_media_is_a_problem(tmp_path):
    items, problems = discover_items([touch(tmp_path / "captions.jsonl")])
    assert items == [] and "not a video or image" in problems[0][1]


def test_hidden_and_non_media_files_and_empty_folders_are_ignored_silently(tmp_path):
    touch(tmp_path / "._clip.mp4")
    touch(tmp_path / ".cache" / "x.mp4")
    touch(tmp_path / "readme.md")
    (tmp_path / "empty").mkdir()
    touch(tmp_path / "only_text" / "a.txt")
    assert discover_items([tmp_path]) == ([], [])


@pytest.fixture
def without_photo_libraries(monkeypatch):
    """As where neither pillow-heif nor Pillow's AVIF plugin is installed (Pillow before 11.3)."""
    from vlpcache.extract import sources

    monkeypatch.setattr(sources, "photo_extensions", lambda: frozenset())


def test_files_without_extension_are_known_by_their_first_bytes(without_photo_libraries, tmp_path):
    heads = {
        "mp4": b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00", "mov": b"\x00\x00\x00\x14ftypqt  ",
        "old_mov": b"\x00\x00\x00\x08wide", "mkv": b"\x1aE\xdf\xa3\x01", "avi": b"RIFF\x00\x00\x00\x00AVI LIST",
        "mpeg": b"\x00\x00\x01\xba\x44", "flv": b"FLV\x01\x05", "wmv": b"\x30\x26\xb2\x75\x8e\x66\xcf\x11\xa6",
        "ogv": b"OggS\x00\x02", "gif": b"GIF89a\x01\x00",
        "jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF", "png": b"\x89PNG\r\n\x1a\n\x00", "webp": b"RIFF\x10\x00\x00\x00WEBPVP8 ",
        "tiff": b"II*\x00\x08\x00", "tiff_be": b"MM\x00*\x00\x00",
        "heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "avif": b"\x00\x00\x00\x1cftypavif",
        "wav": b"RIFF\x24\x00\x00\x00WAVEfmt ", "README": b"# notes\n", "empty": b"",
        "bmp": b"BM\x36\x00\x0c\x00\x00\x00\x00\x00\x36\x00\x00\x00\x28\x00\x00\x00",
        "ts": (b"\x47\x40\x00\x10" + bytes(184)) * 5, "m2ts": (bytes(4) + b"\x47\x40\x00\x10" + bytes(184)) * 5,
        # what only looks like them: text that starts with "BM", a "G" every 188 bytes but not five times
        "notes": b"BMW service notes\n" + bytes(20), "GNU": (b"G" + b"x" * 187) * 4 + b"y" * 200,
    }
    for name, head in heads.items():
        touch(tmp_path / "dl" / name, head)
    items, problems = discover_items([tmp_path / "dl"])
    assert problems == [] and kinds_by_id(items) == {
        "avi": "video", "flv": "video", "gif": "video", "jpeg": "image", "mkv": "video", "mov": "video", "mp4": "video",
        "mpeg": "video", "ogv": "video", "old_mov": "video", "png": "image", "tiff": "image", "tiff_be": "image",
        "webp": "image", "wmv": "video", "bmp": "image", "ts": "video", "m2ts": "video",
    }  # HEIF/AVIF photos, audio, text and empty files are not media
    assert sniffed_kind(tmp_path / "nope") is None
    # a file with another extension is never sniffed: its extension decides; yt-dlp's .unknown_video and
    # a Video CD's .DAT are
    assert discover_items([touch(tmp_path / "x" / "clip.bin", heads["mp4"]).parent]) == ([], [])
    touch(tmp_path / "y" / "talk [abc].unknown_video", heads["mp4"])
    touch(tmp_path / "y" / "MPEGAV" / "AVSEQ01.DAT", heads["mpeg"])
    touch(tmp_path / "y" / "index.dat", b"\x00\x01 not media")
    assert kinds_by_id(discover_items([tmp_path / "y"])[0]) == {"talk [abc]": "video", "MPEGAV/AVSEQ01": "video"}
    assert discover_items([tmp_path / "y" / "index.dat"])[1] == [
        (str(tmp_path / "y" / "index.dat"), "not a video or image file (.dat, and its first bytes are of no known "
                                            "format); skipped")]
    # a folder of extension-less frames is a frames item, and its frames are those files
    for k in range(3):
        touch(tmp_path / "root" / "video1" / f"{k:04d}", heads["jpeg"])
    touch(tmp_path / "root" / "video1" / "LICENSE", b"MIT")
    items, _ = discover_items([tmp_path / "root"])
    assert items == [Item("video1", (tmp_path / "root" / "video1").absolute(), "frames")]
    assert [p.name for p in frame_files(tmp_path / "root" / "video1")] == ["0000", "0001", "0002"]
    # a root that is one such file
    assert discover_items([tmp_path / "dl" / "mp4"])[0] == [Item("mp4", tmp_path / "dl" / "mp4", "video")]
    assert discover_items([tmp_path / "dl" / "README"])[1] == [
        (str(tmp_path / "dl" / "README"), "not a video or image file (no extension, and its first bytes are of no "
                                          "known format); skipped")]


def test_symlink_loop_does_not_hang_and_each_folder_is_walked_once(tmp_path):
    touch(tmp_path / "a" / "clip.mp4")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    os.symlink(tmp_path / "a", tmp_path / "again")
    items, _ = discover_items([tmp_path])
    assert [i.id for i in items] == ["a/clip"]


def test_a_link_to_a_folder_the_walk_meets_by_its_own_path_is_passed_over_for_it_whatever_their_names(tmp_path):
    # `a_link -> z_real` sorts first: its walk took z_real's items as a_link/x, and z_real was passed over unsaid
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    for folder in ("z_real", ".store/hidden", "sub"):
        touch(root / folder / "x.mp4")
    touch(elsewhere / "y.mp4")
    os.symlink(root / "z_real", root / "a_link")
    os.symlink(root / "z_real", root / "sub" / "b_link")
    os.symlink(root / ".store" / "hidden", root / "from_hidden")  # a folder the walk passes over: walked by the link
    os.symlink(elsewhere, root / "data")  # outside the root: walked by the link, as a folder of its own
    items, problems = discover_items([root])
    assert sorted(i.id for i in items) == ["data/y", "from_hidden/x", "sub/x", "z_real/x"]
    assert next(i for i in items if i.id == "z_real/x").path == root / "z_real" / "x.mp4"
    assert problems == [(str(root / "a_link"), f"a symbolic link to the folder {root / 'z_real'}, which is extracted "
                                              "by its own path; skipped"),
                        (str(root / "data"), f"a symbolic link to the folder {elsewhere}, outside the folders given: its "
                                            "1 item(s) are extracted under the link's name"),  # said: a downloaded
                        # folder's `photos -> /home/me/private` (or `-> /`) took files the user did not mean to give
                        (str(root / "sub" / "b_link"), f"a symbolic link to the folder {root / 'z_real'}, which is "
                                                      "extracted by its own path; skipped")]
    # a link under one root to a folder of another root of the run: that root's walk takes it
    items, problems = discover_items([root / "sub", root / "z_real"])
    assert [str(i.path) for i in items] == [str(root / "sub" / "x.mp4")]  # z_real/x.mp4: the id `x` is sub's
    assert [path for path, why in problems if "symbolic link" in why] == [str(root / "sub" / "b_link")]


def test_broken_symlink_with_media_extension_is_reported(tmp_path):
    os.symlink(tmp_path / "gone.mp4", tmp_path / "link.mp4")
    items, problems = discover_items([tmp_path])
    assert items == [] and problems == [(str(tmp_path / "link.mp4"), "broken symbolic link; skipped")]


def test_a_symlink_with_a_media_extension_to_a_device_is_reported_as_such_not_as_broken(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero.mp4")
    items, problems = discover_items([tmp_path])
    assert items == [] and problems == [
        (str(tmp_path / "zero.mp4"), "symbolic link to something that is not a file (a device, a pipe or a socket); skipped")]


def test_a_named_pipe_or_socket_with_a_media_extension_is_reported_and_never_opened(tmp_path):
    # a pipe was passed over without a word in a folder, and as a root it was an item whose decoding blocked for good
    os.mkfifo(tmp_path / "clip.mp4")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "photo.jpg"))
        items, problems = discover_items([tmp_path, tmp_path / "clip.mp4"])
    special = "not a file (a device, a pipe or a socket); skipped"
    assert items == [] and problems == [(str(tmp_path / "clip.mp4"), special), (str(tmp_path / "photo.jpg"), special),
                                        (str(tmp_path / "clip.mp4"), special)]
    # and the error of a run that found nothing else: ".mp4 1" was "another extension", .mp4 listed as known
    assert other_files([tmp_path]) == other_files([tmp_path / "clip.mp4"]) == "it holds no regular file (said above)"


def test_without_frame_folders_every_image_in_a_subfolder_is_an_item_of_its_own(tmp_path):
    touch(tmp_path / "coco" / "train2014" / "COCO_1.jpg")
    touch(tmp_path / "coco" / "train2014" / "COCO_2.jpg")
    touch(tmp_path / "coco" / "clips" / "a.mp4")
    assert kinds_by_id(discover_items([tmp_path / "coco"])[0]) == {"clips/a": "video", "train2014": "frames"}
    items, problems = discover_items([tmp_path / "coco"], frame_folders=False)
    assert kinds_by_id(items) == {"clips/a": "video", "train2014/COCO_1": "image", "train2014/COCO_2": "image"}
    assert problems == []


def test_a_subfolder_of_photos_of_several_sizes_is_photos_and_one_of_frames_of_one_size_is_a_video(tmp_path):
    """A root of frame folders beside a folder of photos: the photos became one 8-frame "video" (with a note
    naming --no-frame-folders, which would have split every frames folder too). Frames of one video are one
    size; photos are not: each image of such a folder is an item, said in one line for all such folders."""
    def image(path: Path, size: tuple[int, int]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (90, 120, 30)).save(path)

    for i in range(5):
        image(tmp_path / "mine" / "frames" / "video1" / f"{i:06d}.jpg", (320, 240))
        image(tmp_path / "mine" / "photos" / f"p{i}.jpg", (500, 375) if i != 4 else (375, 500))  # the last stands up
        image(tmp_path / "mine" / "more" / f"q{i}.png", (64, 48) if i != 2 else (48, 64))  # the middle one
    touch(tmp_path / "mine" / "broken" / "a.jpg")  # does not open: one image, nothing to compare it with
    touch(tmp_path / "mine" / "broken" / "b.jpg")
    items, problems = discover_items([tmp_path / "mine"])
    assert kinds_by_id(items) == {"broken": "frames", "frames/video1": "frames", **{f"more/q{i}": "image" for i in range(5)},
                                  **{f"photos/p{i}": "image" for i in range(5)}}
    assert problems == [(str(tmp_path / "mine" / "more"), "its images differ in size (64x48, 48x64): photos, not one "
                         "video's frames, so each image is an item, as in 1 more such folder(s) (a folder of frames of "
                         "one size is one item)")]
    # a folder a cache holds as frames (its sampled frames one size) is not looked into again
    items, problems = discover_items([tmp_path / "mine"], known_frames=frozenset({str(tmp_path / "mine" / "photos")}))
    assert kinds_by_id(items)["photos"] == "frames" and "photos/p0" not in kinds_by_id(items)


def test_a_frames_folder_of_images_with_captions_beside_them_is_said_in_one_line(tmp_path):
    # img2dataset's "files" output: 00000/000000000.jpg, .txt (its caption) and .json
    shard = tmp_path / "cc3m" / "00000"
    for i in range(3):
        touch(shard / f"00000000{i}.jpg")
        touch(shard / f"00000000{i}.txt", b"a caption")
        touch(shard / f"00000000{i}.json", b"{}")
    touch(tmp_path / "cc3m" / "video7" / "1.jpg")  # a frames folder without text files: nothing said
    items, problems = discover_items([tmp_path / "cc3m"])
    assert kinds_by_id(items) == {"00000": "frames", "video7": "frames"}
    assert problems == [(str(shard), "its images have text files of the same name beside them (e.g. 000000000.txt), "
                                     "as an image-caption download has; taken as one video's 3 frames: "
                                     "--no-frame-folders takes each image as an item")]
    items, problems = discover_items([tmp_path / "cc3m"], frame_folders=False)
    assert len(items) == 4 and problems == []


def test_a_path_that_is_not_utf8_is_reported_and_skipped_and_printed_as_its_bytes(tmp_path):
    from vlpcache.report import printable

    touch(tmp_path / "ok.mp4")
    video = touch(tmp_path / os.fsdecode(b"caf\xe9.mp4"))  # Latin-1 bytes: Python sees a lone surrogate
    touch(tmp_path / os.fsdecode(b"r\xe9sum\xe9") / "1.jpg")  # a frame folder
    items, problems = discover_items([tmp_path])
    assert [i.id for i in items] == ["ok"]
    reason = "path is not valid UTF-8, which the cache stores ids and paths in; skipped (rename it, e.g. with convmv)"
    assert sorted(problems) == [(str(video), reason), (str(tmp_path / os.fsdecode(b"r\xe9sum\xe9")), reason)]
    assert printable(str(video)) == f"{tmp_path}/caf\\xe9.mp4"


def test_unreadable_folder_is_reported_and_the_rest_is_walked(tmp_path, unreadable):
    touch(tmp_path / "ok.mp4")
    locked = tmp_path / "locked"
    touch(locked / "x.mp4")
    assert sorted(i.id for i in discover_items([tmp_path])[0]) == ["locked/x", "ok"]
    unreadable(locked)
    items, problems = discover_items([tmp_path])
    assert [i.id for i in items] == ["ok"]
    assert problems == [(str(locked), "cannot read folder: permission denied; skipped")]


def test_extensions_are_lowercase_with_a_dot():
    assert {".mp4", ".avi", ".mkv", ".webm", ".mov", ".gif"} <= VIDEO_EXTENSIONS
    assert {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff"} == IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in VIDEO_EXTENSIONS | IMAGE_EXTENSIONS)
    assert not VIDEO_EXTENSIONS & IMAGE_EXTENSIONS


def test_shard_of_is_stable_across_runs_and_spreads_items():
    # crc32 values are fixed by the algorithm, so these hold on every machine and Python version
    assert shard_of("video1", 1) == 0
    assert shard_of("video1", 7) == 2977449102 % 7 == 5  # zlib.crc32(b"video1")
    counts = [0] * 4
    for i in range(400):
        counts[shard_of(f"train/video{i}", 4)] += 1
    assert min(counts) > 60


def test_real_videos_folder_has_18_files_and_one_duplicate_stem(videos_dir):
    items, problems = discover_items([videos_dir])
    assert len(items) == 17 and all(i.kind == "video" for i in items)
    # tests_data_test.avi and tests_data_test.mp4 share an id: the first in name order keeps it
    assert problems == [(str(videos_dir.absolute() / "tests_data_test.mp4"),
                         f"duplicate id 'tests_data_test' (already used by {videos_dir.absolute() / 'tests_data_test.avi'}); skipped")]


def test_msrvtt_split_gives_one_frames_item_per_video(msrvtt_dir):
    items, problems = discover_items([msrvtt_dir / "frames" / "val"])
    assert problems == [] and len(items) == 244
    assert all(i.kind == "frames" and i.id.startswith("video") and "/" not in i.id for i in items)


def test_roots_without_media_say_what_they_hold_instead(without_photo_libraries, tmp_path):
    phone = tmp_path / "phone"
    (phone / "2024").mkdir(parents=True)
    for name in ("IMG_0001.HEIC", "IMG_0002.heic", "2024/IMG_0003.HEIC", "notes.txt", "README", ".DS_Store"):
        (phone / name).write_bytes(b"x")
    assert discover_items([phone]) == ([], [])
    said = other_files([phone])
    assert said.startswith("its 5 file(s) have other extensions (.heic 3, .txt 1, no extension 1) (HEIC photos: `pip "
                           "install pillow-heif` (the heif extra) reads them, or convert them to JPEG); ")
    assert said.endswith("; media are known by extension (videos: .mp4, .mov, .avi, .mkv, .webm and 24 more; "
                         "images: .bmp, .jfif, .jpe, .jpeg, .jpg, .png, .tif, .tiff, .webp; a file without one, or named .dat or "
                         ".unknown_video, by its first bytes)")
    from vlpcache.extract.sources import photos_hint

    assert photos_hint({".avif", ".txt"}) == " (AVIF photos: Pillow 11.3 or newer reads them (`pip install -U pillow`))"
    # hidden files are not counted
    (tmp_path / "empty").mkdir()
    assert other_files([tmp_path / "empty"]) == "it is empty"
    assert other_files([tmp_path / "nope"]) == "it does not exist"
    assert other_files([tmp_path / "nope", tmp_path / "gone"]) == "none of them exists"
    assert other_files([phone / "notes.txt", tmp_path / "empty"]).startswith("their 1 file(s) have other extensions (.txt 1);")


def test_files_beside_media_that_are_not_media_are_counted_in_one_line(without_photo_libraries, tmp_path, videos_dir):
    """A phone folder of videos and HEIC photos, a clip saved as .bin, notes: the run takes the video and
    says in one line what it passed over, naming the .bin that is a video by its first bytes."""
    phone = tmp_path / "phone"
    (phone / "frames" / "v1").mkdir(parents=True)
    shutil.copy(videos_dir / "cup.mp4", phone / "IMG_0001.MOV")
    (phone / "clip.bin").write_bytes((videos_dir / "cup.mp4").read_bytes())
    for name in ("IMG_0002.HEIC", "IMG_0003.heic", "notes.json", ".DS_Store", "frames/v1/README.txt"):
        (phone / name).write_bytes(b"x")
    Image.new("RGB", (32, 24)).save(phone / "frames" / "v1" / "0.jpg")
    others = OtherFiles()
    items, problems = discover_items([phone], others=others)
    assert [(i.id, i.kind) for i in items] == [("IMG_0001", "video"), ("frames/v1", "frames")] and problems == []
    assert passed_over_line(others) == (
        "extract: passed over 5 file(s) that are not videos or images (.heic 2, .bin 1, .json 1, .txt 1) (HEIC photos: "
        f"`pip install pillow-heif` (the heif extra) reads them, or convert them to JPEG); {phone / 'clip.bin'} is a "
        "video by its first bytes: such "
        "files need their format's extension (e.g. .mp4; ffprobe names the format)")
    for name in ("clip.bin", "IMG_0002.HEIC", "IMG_0003.heic", "notes.json", "frames/v1/README.txt"):
        (phone / name).unlink()
    others = OtherFiles()
    assert len(discover_items([phone], others=others)[0]) == 2 and passed_over_line(others) is None


def test_roots_without_media_name_a_file_that_is_media_under_another_extension(tmp_path, videos_dir):
    """A folder of videos saved as .bin (or photos as .img) finds no media: the line says which file is
    one by its first bytes and what to do, instead of only listing extensions."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "clip.bin").write_bytes((videos_dir / "cup.mp4").read_bytes())
    (downloads / "clip2.bin").write_bytes(b"\x00" * 64)
    (downloads / "notes.txt").write_text("not media")
    assert discover_items([downloads]) == ([], [])
    # a file named as a root of its own (`search --like clip.bin`, an upload named IMG.JPG.txt) is what its bytes are
    assert [(item.id, item.kind) for item in discover_items([downloads / "clip.bin"])[0]] == [("clip", "video")]
    assert discover_items([downloads / "notes.txt"]) == ([], [(str(downloads / "notes.txt"), "not a video or image file "
                                                              "(unknown extension, and its first bytes are of no known "
                                                              "format); skipped")])
    said = other_files([downloads])
    assert said.startswith("its 3 file(s) have other extensions (.bin 2, .txt 1);")
    assert said.endswith(f"; {downloads / 'clip.bin'} is a video by its first bytes: such files need their "
                         "format's extension (e.g. .mp4; ffprobe names the format)")
    # photos too; a text file with an unknown extension is no media, and nothing is said of it
    (downloads / "clip.bin").unlink()
    (downloads / "scan.img").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(64))
    assert other_files([downloads]).endswith(f"; {downloads / 'scan.img'} is an image by its first bytes: such files "
                                             "need their format's extension (e.g. .jpg; ffprobe names the format)")
    (downloads / "scan.img").unlink()
    assert other_files([downloads]).endswith("by its first bytes)")
    # audio in a container that video uses too (MP4's M4A, Matroska's MKA) is not called video
    (downloads / "song.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00" + bytes(64))
    (downloads / "talk.mka").write_bytes(b"\x1aE\xdf\xa3\x01" + bytes(64))
    assert other_files([downloads]).endswith("by its first bytes)")
    # a named pipe is never opened (it would block until someone writes to it), as a root neither
    os.mkfifo(downloads / "a.bin")
    os.mkfifo(tmp_path / "pipe")
    assert without_blocking(lambda: other_files([downloads]), downloads / "a.bin").endswith("by its first bytes)")
    assert without_blocking(lambda: discover_items([tmp_path / "pipe"])[1], tmp_path / "pipe") == [
        (str(tmp_path / "pipe"), "not a file (a device, a pipe or a socket); skipped")]


def without_blocking(call, pipe: Path, seconds: float = 10.0):
    """call()'s result; the test fails, instead of hanging, when it is still blocked after `seconds`
    (opening `pipe` for reading): the pipe is then opened for writing, which releases it."""
    result = []
    worker = threading.Thread(target=lambda: result.append(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        with open(pipe, "wb"):
            pass
        worker.join()
        raise AssertionError(f"still blocked after {seconds} s: {pipe} was opened")
    return result[0]
