"""read_item: T frames at segment centres, by seeking, from real and generated videos, images and frame
folders; every bad input becomes an ItemError with a short reason."""

from __future__ import annotations

import io
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from vlpcache.errors import ItemError
from vlpcache.extract.sampling import SampledFrames, read_frames_at, read_item, segment_centres
from vlpcache.extract.sources import Item, discover_items

sys.path.insert(0, str(Path(__file__).parent))
from broken_media import (  # noqa: E402
    CAN_WRITE_ROTATION, SHARED, SHORT_VIDEO_FRAMES, frame_number, frame_pattern, gif_of_a_large_canvas,
    make_broken_media, make_video, make_video_after_audio,
)

T, MAX_SIDE = 8, 416
REAL_VIDEOS = sorted(p.name for p in (SHARED / "data" / "videos").glob("*"))


def video(path: Path) -> Item:
    return Item(path.stem, path, "video")


def check_frames(out: SampledFrames, max_side: int = MAX_SIDE) -> None:
    assert out.frames and len(out.frames) == len(out.timestamps) <= T
    shapes = {f.shape for f in out.frames}
    assert len(shapes) == 1, "one frame size per item"
    (h, w, c), = shapes
    assert c == 3 and max(h, w) <= max_side
    assert all(f.dtype == np.uint8 and f.flags.c_contiguous for f in out.frames)
    assert all(b > a for a, b in zip(out.timestamps, out.timestamps[1:]))
    assert all(0.0 <= t <= out.duration for t in out.timestamps)
    # aspect kept to within rounding (videos with a display rotation swap height and width)
    assert abs(h / w - out.size[0] / out.size[1]) < 0.02 or abs(w / h - out.size[0] / out.size[1]) < 0.02


def test_segment_centres_are_the_middles_of_equal_segments():
    assert segment_centres(8.0, 4) == [1.0, 3.0, 5.0, 7.0]
    assert segment_centres(2, 8)[0] == 0.125 and segment_centres(2, 8)[-1] == 1.875


# ----------------------------------------------------------------------------------------- real videos


@pytest.mark.parametrize("name", REAL_VIDEOS or ["(no shared videos)"])
def test_every_real_video_gives_8_frames_in_order_within_its_duration(videos_dir, name):
    out = read_item(video(videos_dir / name), T, MAX_SIDE)
    check_frames(out)
    assert len(out.frames) == T
    assert out.notes == []  # Megamind_bugy.avi included: its keyframe flags are odd, decoding is fine


@pytest.mark.parametrize("name", ["tree.avi", "vtest.avi", "cup.mp4"])
def test_each_real_video_target_takes_the_last_frame_starting_at_or_before_it(videos_dir, name):
    # tree.avi says 15 fps and has a frame every 0.33-0.47 s: a target 0.2 s after a frame's start took the next
    # frame, which starts after the target, because the frame's duration was taken to be the nominal 1/15 s
    out = read_item(video(videos_dir / name), T, MAX_SIDE)
    with av.open(str(videos_dir / name)) as container:
        stream = container.streams.video[0]
        starts = sorted(float(f.pts * stream.time_base) for f in container.decode(stream))
    first = starts[0]
    shown = [max(t for t in starts if t <= first + centre + 1e-6) - first for centre in segment_centres(out.duration, T)]
    assert out.timestamps == pytest.approx(sorted(set(shown)), abs=1e-3)


@pytest.mark.parametrize("name", ["box.mp4", "Megamind_bugy.avi", "vtest.avi", "cup.mp4", "tree.avi"])
def test_seeking_gives_the_same_frames_as_decoding_straight_through(videos_dir, name):
    # box.mp4 and the AVIs carry decode-order pts; vtest.avi and cup.mp4 have several GOPs
    by_seeking = read_item(video(videos_dir / name), 12, 96)
    straight = read_item(video(videos_dir / name), 12, 96, seek=False)
    assert by_seeking.timestamps == straight.timestamps
    assert all(np.array_equal(a, b) for a, b in zip(by_seeking.frames, straight.frames))
    assert by_seeking.decoded_frames < straight.decoded_frames


def test_large_real_video_is_downscaled_keeping_its_aspect(videos_dir):
    out = read_item(video(videos_dir / "demo_demo_skeleton.mp4"), 2, 384)
    assert out.size == (1080, 1920) and out.frames[0].shape == (216, 384, 3)


def test_truncated_real_video_keeps_the_frames_before_the_cut(videos_dir, tmp_path):
    data = (videos_dir / "cup.mp4").read_bytes()
    cut = tmp_path / "cup.mp4"
    cut.write_bytes(data[: len(data) * 3 // 10])
    out = read_item(video(cut), T, MAX_SIDE)
    check_frames(out)
    assert 1 <= len(out.frames) < T
    assert any("truncated" in note for note in out.notes)


def test_a_still_shown_for_the_whole_video_is_not_called_truncated(tmp_path):
    # one GIF frame shown for 2 s: every target finds it, fewer than T frames, and nothing is missing
    Image.new("RGB", (64, 48), (200, 30, 10)).save(tmp_path / "still.gif", save_all=True, duration=2000)
    out = read_item(video(tmp_path / "still.gif"), T, MAX_SIDE)
    assert len(out.frames) == 1 and out.duration == pytest.approx(2.0)
    assert out.notes == []


# ------------------------------------------------------------------------------------ generated videos


def test_sampled_frame_is_the_one_shown_at_each_segment_centre(tmp_path):
    out = read_item(video(make_video(tmp_path / "v.mp4", 36, fps=10, gop=12)), T, MAX_SIDE)
    # 36 frames, 8 segments of 4.5 frames: centres at 2.25, 6.75, ... -> frames 2, 6, 11, 15, 20, 24, 29, 33
    assert [frame_number(f) for f in out.frames] == [2, 6, 11, 15, 20, 24, 29, 33]
    assert out.timestamps == pytest.approx([0.2, 0.6, 1.1, 1.5, 2.0, 2.4, 2.9, 3.3])
    assert out.duration == pytest.approx(3.6)


@pytest.mark.parametrize("ext", ["mov", "mkv"])
def test_a_one_frame_still_track_before_the_video_is_passed_over(tmp_path, ext):
    # some cameras and tools write a thumbnail as the first video stream; sampling it gave one frame
    path = tmp_path / f"v.{ext}"
    with av.open(str(path), "w") as container:
        still = container.add_stream("mjpeg", rate=1)
        still.width, still.height, still.pix_fmt = 64, 48, "yuvj420p"
        moving = container.add_stream("libx264", rate=10)
        moving.width, moving.height, moving.pix_fmt = 64, 48, "yuv420p"
        moving.options = {"preset": "ultrafast", "x264-params": "keyint=12:scenecut=0:bframes=0"}
        thumbnail = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 250, np.uint8), format="rgb24")
        container.mux(still.encode(thumbnail.reformat(format="yuvj420p")))
        container.mux(still.encode())
        for i in range(36):
            container.mux(moving.encode(av.VideoFrame.from_ndarray(frame_pattern(i, 48, 64), format="rgb24")))
        container.mux(moving.encode())
    assert av.open(str(path)).streams.video[0].codec_context.name == "mjpeg"
    out = read_item(video(path), T, MAX_SIDE)
    assert [frame_number(f) for f in out.frames] == [2, 6, 11, 15, 20, 24, 29, 33] and out.notes == []


def test_seeking_decodes_a_small_part_of_a_long_video(tmp_path):
    out = read_item(video(make_video(tmp_path / "long.mp4", 900, fps=30, size=(16, 16), gop=30)), T, MAX_SIDE)
    assert len(out.frames) == T
    # one GOP (30 frames) at most per target, instead of 900
    assert out.decoded_frames <= T * 30
    assert out.decoded_frames < 900 / 3


def test_targets_within_one_gop_are_decoded_in_one_pass(tmp_path):
    # a single keyframe: seeking back to it for each target would decode ~4.5x the frames
    out = read_item(video(make_video(tmp_path / "one_gop.mp4", 200, fps=25, size=(16, 16), gop=250)), T, MAX_SIDE)
    last_target = int(segment_centres(200, T)[-1])
    assert len(out.frames) == T
    assert out.decoded_frames <= last_target + 2


def test_video_shorter_than_T_gives_each_frame_once(tmp_path):
    out = read_item(video(make_video(tmp_path / "short.mp4", SHORT_VIDEO_FRAMES)), T, MAX_SIDE)
    check_frames(out)
    assert [frame_number(f) for f in out.frames] == list(range(SHORT_VIDEO_FRAMES))


def test_a_video_whose_title_is_not_utf8_is_read(tmp_path):
    # a title written by a tool of another encoding: PyAV up to 18 fails the file unless told to ignore it,
    # PyAV 19 refuses the option that tells it so (every video failed with it)
    plain = make_video(tmp_path / "plain.mp4", SHORT_VIDEO_FRAMES)
    titled = tmp_path / "titled.mp4"
    with av.open(str(plain)) as source, av.open(str(titled), "w") as target:
        target.metadata["title"] = "TITLEPLACEHOLDER"
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                target.mux(packet)
    data = titled.read_bytes()
    assert data.count(b"TITLEPLACEHOLDER") == 1
    titled.write_bytes(data.replace(b"TITLEPLACEHOLDER", b"caf\xe9 \xff\xfe latin-1 "))  # as long: atoms intact
    out = read_item(video(titled), T, MAX_SIDE)
    assert [frame_number(f) for f in out.frames] == list(range(SHORT_VIDEO_FRAMES))


@pytest.mark.skipif(not CAN_WRITE_ROTATION, reason="writing a rotated video needs PyAV >= 18 (set_display_rotation)")
def test_rotated_phone_video_is_returned_upright(tmp_path):
    out = read_item(video(make_video(tmp_path / "r.mp4", 2, size=(32, 64), rotation=90)), T, MAX_SIDE)
    frame = out.frames[0]  # frame 0: its top-left quarter (value 0) is dark, the rest a bright gradient
    assert frame.shape == (64, 32, 3) and out.size == (64, 32)
    # displayed turned a quarter counterclockwise: the dark quarter is now bottom-left
    assert frame[56, 4].mean() < 20 and frame[4, 4].mean() > 100


# a picture that a display matrix of a counterclockwise rotation by these degrees, then a left-right mirror, shows as `p`
STORED_UNDER_MIRROR = {0: lambda p: p[:, ::-1], 90: lambda p: np.rot90(p[:, ::-1], k=-1)}


@pytest.mark.skipif(not CAN_WRITE_ROTATION, reason="writing a display matrix needs PyAV >= 18 (set_display_rotation)")
@pytest.mark.parametrize("degrees", [0, 90])
def test_a_mirrored_video_is_returned_as_players_show_it_not_upside_down(tmp_path, degrees):
    # a front camera's or an editor's display matrix mirrors the picture: PyAV's frame.rotation reads a mirror as a
    # half turn (-180), and the picture came out upside down (players and ffmpeg show it upright)
    path = tmp_path / "selfie.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stored = [STORED_UNDER_MIRROR[degrees](frame_pattern(i, 48, 64)) for i in range(4)]
        (stream.height, stream.width), stream.pix_fmt = stored[0].shape[:2], "yuv420p"
        try:
            stream.set_display_rotation(degrees, hflip=True)
        except TypeError:
            pytest.skip("this PyAV writes no mirror (set_display_rotation without hflip)")
        for picture in stored:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")))
        container.mux(stream.encode())
    item = video(path)
    out = read_item(item, 4, MAX_SIDE)
    assert out.size == (48, 64) and [frame_number(f) for f in out.frames] == [0, 1, 2, 3]
    assert all(np.abs(f.astype(int) - frame_pattern(i, 48, 64)).mean() < 8 for i, f in enumerate(out.frames))
    [thumbnail] = read_frames_at(item, [float(np.float32(out.timestamps[2]))], MAX_SIDE).frames
    assert np.array_equal(thumbnail, out.frames[2])


def test_anamorphic_video_is_stretched_to_its_display_width(tmp_path):
    from fractions import Fraction

    path = make_video(tmp_path / "wide.mp4", 4, size=(48, 64), sample_aspect=Fraction(2, 1))  # pixels twice as wide
    out = read_item(video(path), 2, MAX_SIDE)
    frame = out.frames[0]
    assert frame.shape == (48, 128, 3) and out.size == (48, 128)
    # the marked top-left quarter (frame 1: value 7) now ends halfway across the displayed width
    assert frame[8, 56].mean() < 40 and frame[8, 72].mean() > 100


class _Pipe(io.RawIOBase):
    """A write-only, unseekable output: muxers cannot go back to write the duration."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.data += bytes(b)
        return len(b)


def streamed_video(path: Path, fmt: str, frames: int = 36, fps: int = 10, gop: int = 12) -> Path:
    pipe = _Pipe()
    with av.open(pipe, "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"preset": "ultrafast", "x264-params": f"keyint={gop}:scenecut=0:bframes=0"}
        for i in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame_pattern(i, 48, 64), format="rgb24")))
        container.mux(stream.encode())
    path.write_bytes(pipe.data)
    return path


@pytest.mark.parametrize("fmt, ext", [("matroska", "mkv"), ("mpegts", "ts"), ("h264", "h264")])
def test_streams_without_duration_or_exact_seeking_still_give_the_centre_frames(tmp_path, fmt, ext):
    # mkv written to a pipe has no duration; MPEG-TS seeks to any packet, not to a keyframe;
    # a raw .h264 stream has no timestamps at all (25 fps assumed by FFmpeg, so its own times differ)
    out = read_item(video(streamed_video(tmp_path / f"s.{ext}", fmt)), T, MAX_SIDE)
    check_frames(out)
    assert [frame_number(f) for f in out.frames] == [2, 6, 11, 15, 20, 24, 29, 33]


def timed_video(path: Path, fmt: str | None, times_ms: list[int], gop: int = 12, bframes: int = 0) -> Path:
    """Frame i (frame_pattern) shown from times_ms[i], in a container of `fmt` (None: by the file's extension)."""
    codec = "libvpx-vp9" if path.suffix == ".webm" else "libx264"
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}"}
        for i, ms in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i, 48, 64), format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_the_first_gop_of_an_mpeg_ts_with_b_frames_is_sampled(tmp_path):
    # a camcorder's .MTS or a broadcast .ts: the first keyframe's decode time precedes the stream's start, so a
    # seek to the start landed on the second keyframe, and the targets of the first GOP took its first frame
    path = timed_video(tmp_path / "b.ts", "mpegts", [i * 100 for i in range(36)], gop=12, bframes=3)
    seeking, straight = read_item(video(path), T, MAX_SIDE), read_item(video(path), T, MAX_SIDE, seek=False)
    assert [frame_number(f) for f in seeking.frames] == [2, 6, 11, 15, 20, 24, 29, 33]
    assert [frame_number(f) for f in straight.frames] == [2, 6, 11, 15, 20, 24, 29, 33]
    assert seeking.timestamps == pytest.approx(straight.timestamps) and seeking.notes == []


@pytest.mark.parametrize("ext", ["mkv", "webm"])
def test_a_matroska_video_that_starts_later_than_zero_is_sampled_over_its_own_length(tmp_path, ext):
    # a recording whose timestamps start at 10 s (a stream saved as it came): Matroska's Duration counts from 0,
    # so 3.6 s of video were read as 13.6 s, three targets found frames and the rest were "truncated"
    path = timed_video(tmp_path / f"late.{ext}", None, [10_000 + i * 100 for i in range(36)])
    out = read_item(video(path), T, MAX_SIDE)
    assert out.duration == pytest.approx(3.6, abs=0.11) and out.notes == []
    assert [frame_number(f) for f in out.frames] == [2, 6, 11, 15, 20, 24, 29, 33]
    assert out.timestamps == pytest.approx([0.2, 0.6, 1.1, 1.5, 2.0, 2.4, 2.9, 3.3])


@pytest.mark.parametrize("ext", ["mp4", "mkv", "webm"])
def test_a_target_in_a_pause_of_a_variable_rate_video_takes_the_frame_shown_then(tmp_path, ext):
    # a screen recording: 10 frames in the first second, nothing new until 5 s, 10 frames more. Matroska gives
    # each frame the nominal duration (0.1 s), and targets in the pause took the frame after it, not the one shown
    times = [i * 100 for i in range(10)] + [5000 + i * 100 for i in range(10)]
    out = read_item(video(timed_video(tmp_path / f"pause.{ext}", None, times)), T, MAX_SIDE)
    # centres of 8 segments of 6 s: 0.375 (frame 3), 1.125 ... 4.875 (frame 9, shown from 0.9 s to 5 s), 5.625 (frame 16)
    assert [frame_number(f) for f in out.frames] == [3, 9, 16]
    assert out.timestamps == pytest.approx([0.3, 0.9, 5.6])


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_a_variable_rate_video_with_b_frames_gives_the_frame_shown_at_each_centre_and_again_at_its_time(tmp_path, ext):
    # 10 fps for 1 s, the last frame held to 3 s, then 40 fps, one GOP decoded on through the targets: with B-frames an
    # MP4 frame's duration is a decode-order delta, Matroska's the nominal 0.1 s; trusting it took another frame than
    # the one shown, and a frame read again at its stored time (the page's thumbnail) was yet another
    times = [i * 100 for i in range(10)] + [3000 + i * 25 for i in range(20)]
    item = video(timed_video(tmp_path / f"vfr.{ext}", None, times, gop=30, bframes=3))
    out = read_item(item, 12, MAX_SIDE)
    shown = sorted({max(i for i, ms in enumerate(times) if ms <= centre * 1000) for centre in segment_centres(out.duration, 12)})
    assert shown == [1, 4, 7, 9, 15, 27]
    assert [frame_number(f) for f in out.frames] == shown
    assert out.timestamps == pytest.approx([times[i] / 1000 for i in shown])
    again = read_frames_at(item, [float(np.float32(ms / 1000)) for ms in times], MAX_SIDE)
    assert [frame_number(f) for f in again.frames] == list(range(len(times)))


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_times_of_a_video_that_starts_after_its_audio_count_from_the_files_start(tmp_path, ext):
    # the video 2 s into the file (ffmpeg -itsoffset 2): its times counted from its own first frame, and `ffmpeg -ss`
    # at a printed time (a player's clock) landed 2 s before the frame
    item = video(make_video_after_audio(tmp_path / f"late.{ext}", lead_ms=2000, frames=20))
    with av.open(str(item.path)) as container:  # the file's start: 0, or the audio encoder's priming before it
        start = container.start_time / av.time_base  # (-0.128 s in a Matroska file of FFmpeg 7's, PyAV 15)
    out = read_item(item, T, MAX_SIDE)
    assert [frame_number(f) for f in out.frames] == [1, 3, 6, 8, 11, 13, 16, 18]  # over the video's own 2 s
    assert out.timestamps == pytest.approx([t - start for t in [2.1, 2.3, 2.6, 2.8, 3.1, 3.3, 3.6, 3.8]])
    assert out.duration == pytest.approx(4.0 - start)
    again = read_frames_at(item, [float(np.float32(t)) for t in out.timestamps], MAX_SIDE)
    assert [frame_number(f) for f in again.frames] == [1, 3, 6, 8, 11, 13, 16, 18]
    # a cache written before counted from the video's start: read back by that count (schema.TIMES_ATTR)
    older = read_frames_at(item, [float(np.float32(t - 2.0 + start)) for t in out.timestamps], MAX_SIDE,
                           from_video_start=True)
    assert [frame_number(f) for f in older.frames] == [1, 3, 6, 8, 11, 13, 16, 18]


@pytest.mark.parametrize("fmt, ext", [("matroska", "mkv"), ("mpegts", "ts")])
def test_a_long_recording_without_duration_or_index_is_measured_from_its_end_not_refused(tmp_path, monkeypatch, fmt, ext):
    # an hour-long mkv cut off before its Duration and Cues were written (OBS after a crash) is over the size
    # of a demux pass: it failed with "video length unknown" though its last packets carry the time
    from vlpcache.extract import sampling

    monkeypatch.setattr(sampling, "DEMUX_PASS_MAX_BYTES", 0)  # this small file stands in for a 500 MB one
    out = read_item(video(streamed_video(tmp_path / f"s.{ext}", fmt)), T, MAX_SIDE)
    check_frames(out)
    assert out.duration == pytest.approx(3.6, abs=0.11)
    assert [frame_number(f) for f in out.frames] == [2, 6, 11, 15, 20, 24, 29, 33]


@pytest.mark.parametrize("name", ["box.mp4", "Megamind.avi", "bigbuckbunny.mp4", "tools_data_skeleton_S001C001P001R001A001_rgb.avi"])
def test_frames_read_again_at_their_stored_times_are_the_sampled_frames(videos_dir, name):
    item = video(videos_dir / name)
    sampled = read_item(item, T, MAX_SIDE)
    stored = [float(np.float32(t)) for t in sampled.timestamps]  # as the cache keeps them
    for t, frame in zip(stored[::3], sampled.frames[::3]):  # one at a time, as a thumbnail is made
        [again] = read_frames_at(item, [t], MAX_SIDE).frames
        assert np.array_equal(again, frame)
    together = read_frames_at(item, stored, MAX_SIDE)
    assert together.timestamps == pytest.approx(sampled.timestamps, abs=1e-3)
    assert all(np.array_equal(a, b) for a, b in zip(together.frames, sampled.frames))


# --------------------------------------------------------------------------------- images and folders


def test_image_is_one_frame_at_time_zero(tmp_path):
    Image.new("RGB", (640, 480), (10, 200, 30)).save(tmp_path / "p.png")
    out = read_item(Item("p", tmp_path / "p.png", "image"), T, 320)
    assert out.timestamps == [0.0] and out.duration == 0.0 and out.size == (480, 640)
    assert out.frames[0].shape == (240, 320, 3) and tuple(out.frames[0][5, 5]) == (10, 200, 30)


def test_frames_folder_is_sampled_by_position_and_timestamped_by_position(tmp_path):
    for i in range(20):
        Image.fromarray(np.full((24, 32, 3), i * 10, np.uint8)).save(tmp_path / f"{i * 5}.png")
    out = read_item(Item("f", tmp_path, "frames"), 4, MAX_SIDE)
    assert out.timestamps == [2.0, 7.0, 12.0, 17.0] and out.duration == 20.0
    assert [int(f[0, 0, 0]) for f in out.frames] == [20, 70, 120, 170]


def test_frames_folder_frame_read_again_by_its_stored_time_is_the_one_at_that_position(tmp_path):
    for i in range(20):
        Image.fromarray(np.full((24, 32, 3), i * 10, np.uint8)).save(tmp_path / f"{i * 5}.png")
    item = Item("f", tmp_path, "frames")
    out = read_frames_at(item, [7.0, 17.0], MAX_SIDE)
    assert out.timestamps == [7.0, 17.0] and [int(f[0, 0, 0]) for f in out.frames] == [70, 170]
    with pytest.raises(ItemError, match="no frame at position 20: the folder holds 20 images"):
        read_frames_at(item, [20.0], MAX_SIDE)


def test_msrvtt_frames_folder_gives_its_two_frames(msrvtt_dir):
    folder = sorted((msrvtt_dir / "frames" / "val").iterdir())[0]
    out = read_item(Item(folder.name, folder, "frames"), T, MAX_SIDE)
    check_frames(out)
    assert out.timestamps == [0.0, 1.0] and out.size == (240, 320) and out.notes == []


def test_a_frames_folder_of_photos_of_several_sizes_is_kept_with_a_note_naming_the_option(tmp_path, flickr_dir):
    photos = sorted((flickr_dir / "images").iterdir())[:4]  # Flickr8k photos: 500x375, 500x333, ...
    sizes = {Image.open(p).size for p in photos}
    assert len(sizes) > 1
    for photo in photos:
        (tmp_path / photo.name).write_bytes(photo.read_bytes())
    out = read_item(Item("photos", tmp_path, "frames"), T, MAX_SIDE)
    assert len(out.frames) == 4 and len({f.shape for f in out.frames}) == 1  # one size per item, as always
    (note,) = out.notes
    assert note.startswith("its images differ in size (") and note.endswith(
        "): photos rather than a video's frames? --no-frame-folders takes each image as an item")


# -------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("broken")
    return folder, make_broken_media(folder)


def test_discovery_finds_every_broken_input_except_the_ignored(broken):
    folder, expected = broken
    items, problems = discover_items([folder])
    assert problems == []
    assert {i.path.name for i in items} == {name for name, want in expected.items() if want != "ignored"}


def test_each_broken_input_decodes_or_fails_with_its_reason(broken):
    folder, expected = broken
    items, _ = discover_items([folder])
    outcomes = {}
    for item in items:
        try:
            out = read_item(item, T, MAX_SIDE)
            check_frames(out)
            outcomes[item.path.name] = "ok"
        except ItemError as err:
            outcomes[item.path.name] = str(err)
    for name, outcome in outcomes.items():
        want = expected[name]
        assert (outcome == "ok") if want == "ok" else (want in outcome), f"{name}: {outcome!r}, expected {want!r}"


def read_broken(broken, name: str) -> SampledFrames:
    folder, _ = broken
    kind = "frames" if (folder / name).is_dir() else ("image" if name.rsplit(".", 1)[-1] in
                                                      ("png", "jpg", "webp", "bmp", "tiff") else "video")
    return read_item(Item(name, folder / name, kind), T, MAX_SIDE)


def test_alpha_is_composited_on_white(broken):
    frame = read_broken(broken, "alpha.png").frames[0]
    assert frame[0, 0].min() >= 250  # alpha 0 in the top rows of the gradient


def test_16_bit_image_is_scaled_not_clipped(broken):
    frame = read_broken(broken, "gray16.png").frames[0]
    assert frame[0, 0, 0] < 10 and frame[-1, -1, 0] > 245 and 100 < frame.mean() < 155


def test_exif_orientation_is_applied(broken):
    out = read_broken(broken, "exif_rotated.jpg")
    assert out.size == (64, 48) and out.frames[0].shape == (64, 48, 3)


@pytest.mark.parametrize("ext", [".heic", ".avif"])
def test_phone_and_web_photos_are_images_where_their_library_is_there(tmp_path, ext):
    """HEIC (iPhones' photos, read by pillow-heif, the `heif` extra) and AVIF (Pillow 11.3's own plugin):
    found by extension and by first bytes, decoded as a JPEG of the same picture is, EXIF rotation too;
    were passed over as "not videos or images" with advice to convert them."""
    from PIL import features

    from vlpcache.extract.sources import photo_extensions

    if ext == ".heic":
        pytest.importorskip("pillow_heif", reason="pillow-heif is not installed (the `heif` or `test` extra)")
    elif not ("avif" in features.modules and features.check_module("avif")):
        pytest.skip(f"Pillow {Image.__version__} has no AVIF plugin (its wheels do since 11.3)")
    assert ext in photo_extensions()
    rng = np.random.default_rng(0)
    picture = Image.fromarray(np.repeat(np.repeat(rng.integers(0, 256, (12, 16, 3), np.uint8), 20, 0), 20, 1))
    exif = Image.Exif()  # not picture.getexif(): pillow-heif saves that with every copy of the picture
    exif[0x0112] = 6  # shown turned a quarter clockwise, as a phone held upright saves it
    (tmp_path / "photos").mkdir()
    picture.save(tmp_path / "photos" / f"IMG_0001{ext.upper()}", quality=95)
    picture.save(tmp_path / "photos" / f"turned{ext}", quality=95, exif=exif.tobytes())
    picture.save(tmp_path / "photos" / "downloaded", format="HEIF" if ext == ".heic" else "AVIF", quality=95)
    picture.save(tmp_path / "reference.png")
    items, problems = discover_items([tmp_path / "photos"])
    assert problems == [] and sorted((i.id, i.kind) for i in items) == [
        ("IMG_0001", "image"), ("downloaded", "image"), ("turned", "image")]
    reference = read_item(Item("r", tmp_path / "reference.png", "image"), T, 416)
    for item in items:
        out = read_item(item, T, 416)
        assert len(out.frames) == 1 and out.notes == []
        if item.id == "turned":
            assert out.size == (320, 240) and out.frames[0].shape == (320, 240, 3)
            expected = np.rot90(reference.frames[0], k=-1)  # a quarter turn clockwise
        else:
            assert out.size == (240, 320) and out.frames[0].shape == (240, 320, 3)
            expected = reference.frames[0]
        difference = np.abs(out.frames[0].astype(int) - expected.astype(int))
        assert difference.mean() < 6, (item.id, difference.mean())  # lossy at quality 95: a few levels
    # a decoding process of its own (a Ray worker, a spawned one) reads it without a discovery first
    np.save(tmp_path / "here.npy", read_item(items[0], T, 416).frames[0])
    fresh = subprocess.run([sys.executable, "-c", "import sys, numpy as np; from pathlib import Path; "
                            "from vlpcache.extract.sampling import read_item; from vlpcache.extract.sources import Item; "
                            "np.save(sys.argv[2], read_item(Item('x', Path(sys.argv[1]), 'image'), 8, 416).frames[0])",
                            str(items[0].path), str(tmp_path / "there.npy")], capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "there.npy"), np.load(tmp_path / "here.npy"))
    (tmp_path / f"noise{ext}").write_bytes(rng.integers(0, 256, 5000, np.uint8).tobytes())
    with pytest.raises(ItemError, match="not a readable image"):
        read_item(Item("noise", tmp_path / f"noise{ext}", "image"), T, 416)


def test_very_large_jpeg_is_decoded_reduced(broken):
    out = read_broken(broken, "large_12000x9000.jpg")
    assert out.size == (9000, 12000) and out.frames[0].shape == (312, 416, 3)


# the growth of a process's peak memory while it reads one item (MB): its own process, so that nothing before counts
PEAK_GROWTH = """import resource, sys
from pathlib import Path
from vlpcache.extract.sampling import read_item
from vlpcache.extract.sources import Item
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = read_item(Item("x", Path(sys.argv[1]), sys.argv[2]), int(sys.argv[3]), 416)
print(len(out.frames), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def peak_growth_mb(path: Path, kind: str, frames: int = T) -> tuple[int, float]:
    """(frames read, MB the peak memory grew by) of read_item on `path` in a process of its own."""
    done = subprocess.run([sys.executable, "-c", PEAK_GROWTH, str(path), kind, str(frames)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    count, mb = done.stdout.split()
    return int(count), float(mb)


@pytest.mark.parametrize("mode, bytes_per_pixel", [("I;16", 2), ("F", 4), ("RGBA", 4)])
def test_a_large_16_bit_float_or_transparent_image_is_converted_without_full_size_temporaries(tmp_path, mode,
                                                                                               bytes_per_pixel):
    """A 381 KB PNG of 14000x14000 16-bit pixels took extract to 5.3 GB (a float32 TIFF 6 GB, RGBA 4.6 GB): full-size
    float64 copies, a white canvas and a composite, all before resizing. Now the decoded image and one 8-bit copy."""
    side = 4000
    zeros = np.zeros((side, side, 4) if mode == "RGBA" else (side, side), {"F": np.float32}.get(mode, np.uint8))
    picture = Image.fromarray(zeros.astype(np.uint16)) if mode == "I;16" else Image.fromarray(zeros, mode)
    path = tmp_path / ("big.tiff" if mode == "F" else "big.png")
    picture.save(path, compress_level=1) if path.suffix == ".png" else picture.save(path)
    assert Image.open(path).mode == mode
    _, grown = peak_growth_mb(path, "image")
    allowed = side * side * (bytes_per_pixel + 3) / 2**20 + 48  # decoded, its 8-bit copy (RGB at most), some rows
    assert grown < allowed, f"{mode}: {grown:.0f} MB, at most {allowed:.0f}"


def test_a_video_holds_a_few_full_size_frames_at_once_not_each_frame_taken(tmp_path):
    """A 14 KB GIF of 600 1x1 frames on a 16000x16000 canvas took extract to 9 GB: every frame taken (1 GB each,
    decoded to the canvas) was kept to the end, and kept even once converted, by a reference cycle through its side
    data that only the garbage collector breaks. Now each is made small as it is taken, and freed."""
    side, frames = 3000, 16
    gif = gif_of_a_large_canvas(tmp_path / "canvas.gif", side, side, 200)
    count, grown = peak_growth_mb(gif, "video", frames)
    frame_mb = side * side * 4 / 2**20
    assert count == frames and grown < 4 * frame_mb + 48, f"{grown:.0f} MB for {frames} frames of {frame_mb:.0f} MB"


def test_video_frames_over_the_pixel_limit_fail_with_one_line(tmp_path):
    gif = gif_of_a_large_canvas(tmp_path / "canvas.gif", 9000, 8000, 3)
    with pytest.raises(ItemError, match=r"video frames too large \(9000x8000 pixels; the limit is 67,108,864 pixels\)"):
        read_item(video(gif), T, MAX_SIDE)


def test_frames_folder_replaces_a_corrupt_frame_and_notes_it(broken):
    out = read_broken(broken, "frames_one_bad")
    assert len(out.frames) == T and 3.0 not in out.timestamps  # 4.jpg, at position 3, is corrupt
    assert out.notes and "4.jpg" in out.notes[0]


def test_video_with_garbage_in_the_middle_keeps_what_decodes(broken):
    out = read_broken(broken, "garbage_in_middle.mp4")
    assert 1 <= len(out.frames) <= T and any("failed to decode" in n for n in out.notes)


@pytest.mark.parametrize("ext", [".mp4", ".avi", ".mkv", ".webm", ".gif", ".jpg", ".png", ".webp", ".tiff"])
def test_random_bytes_with_a_media_extension_give_an_item_error(tmp_path, ext):
    path = tmp_path / f"noise{ext}"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    kind = "image" if ext in (".jpg", ".png", ".webp", ".tiff") else "video"
    with pytest.raises(ItemError):
        read_item(Item("noise", path, kind), T, MAX_SIDE)


def test_file_removed_before_reading_gives_an_item_error(tmp_path):
    with pytest.raises(ItemError, match="file not found"):
        read_item(Item("gone", tmp_path / "gone.mp4", "video"), T, MAX_SIDE)


@pytest.mark.parametrize("kind", ["video", "image", "frames"])
def test_an_unreadable_file_or_frames_folder_gives_permission_denied(tmp_path, unreadable, kind):
    if kind == "video":
        path = make_video(tmp_path / "locked.mp4", 3)
    else:
        folder = tmp_path / "frames"
        folder.mkdir()
        for n in range(2):
            Image.new("RGB", (32, 24), (n * 90, 0, 0)).save(folder / f"{n}.png")
        path = folder if kind == "frames" else folder / "0.png"
    read_item(Item("locked", path, kind), T, MAX_SIDE)  # readable before
    unreadable(path)
    reason = "cannot read folder: permission denied" if kind == "frames" else "permission denied"
    with pytest.raises(ItemError, match=f"^{reason}$"):
        read_item(Item("locked", path, kind), T, MAX_SIDE)


@pytest.mark.parametrize("name, seconds", [("vtest.avi", 79.5), ("tree.avi", 29.6)])
def test_a_cut_avi_is_sampled_over_what_is_left_and_noted_as_truncated(videos_dir, tmp_path, name, seconds):
    # an AVI's index is at its end: cut off, FFmpeg scans the frames there are, and only its header still
    # counts the frames there were (an MP4 keeps its index at the start: the test above)
    data = (videos_dir / name).read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) * 4 // 10])
    out = read_item(video(cut), T, MAX_SIDE)
    check_frames(out)
    assert len(out.frames) == T and out.duration < 0.5 * seconds  # spread over the frames that are there
    [note] = out.notes
    assert note.startswith("video data ends at ") and note.endswith(f" s of {seconds:.1f} s (truncated file?)")
    assert read_item(video(videos_dir / name), T, MAX_SIDE).notes == []  # the whole file: nothing to say


@pytest.mark.parametrize("older", [False, True])
def test_inspect_render_draws_the_boxes_on_the_frames_at_their_stored_times(tmp_path, older):
    # the frames the boxes were found on are the ones at the stored times: a sampling another vlpcache does (the
    # variable-rate fix moved some targets) or a count of times an older shard kept (from the video's start) must
    # not put the boxes on other frames
    import h5py
    from vlpcache.cache.reader import RegionCache
    from vlpcache.cache.schema import SHARD_DIR, TIMES_ATTR, CacheSettings, empty_item
    from vlpcache.cache.writer import ShardWriter
    from vlpcache.extract.render import source_pictures
    from vlpcache.extract.stamps import source_stamp

    path = make_video_after_audio(tmp_path / "late.mp4", lead_ms=2000, frames=20)  # frame i from 2 + i / 10 s
    chosen = [2, 3, 11, 17]  # not the frames today's sampling takes
    settings = CacheSettings(frames=4, regions=2, feature_dim=8, detector="synthetic", detector_weights_sha256="0",
                             backbone="synthetic", backbone_weights_sha256="0")
    item = empty_item(settings)
    item["frame_mask"][:] = True
    with av.open(str(path)) as container:  # the file's start: 0, or its audio encoder's priming before it
        start = container.start_time / av.time_base
    item["timestamps"][:] = [np.float32(i / 10 + (0 if older else 2 - start)) for i in chosen]
    item["frame_size"][:] = (48, 64)
    with ShardWriter(tmp_path / "cache", settings) as writer:
        writer.add("late", str(path), "video", item, "", source=source_stamp(path))
    if older:  # a shard written before times counted from the file's start
        [shard] = (tmp_path / "cache" / SHARD_DIR).glob("*.h5")
        with h5py.File(shard, "a") as f:
            del f.attrs[TIMES_ATTR]
    cache = RegionCache(tmp_path / "cache")
    pictures = source_pictures(cache, cache.get("late"))
    assert [frame_number(np.asarray(p.resize((64, 48)))) for p in pictures] == chosen


# A fresh Python: a thread scales a frame as extract and the page's thumbnails do and keeps it (here in its thread-local
# storage) while the main thread forks, as a DataLoader starts its workers; the forked child frees that thread's
# objects and exits at once. Up to 60 s for it: far beyond the milliseconds it takes, only against a hang.
FRAME_KEPT_BY_ANOTHER_THREAD_AT_A_FORK = """
import os, sys, threading, time
import av
from vlpcache.extract.sampling import _to_rgb

kept, ready, done = threading.local(), threading.Event(), threading.Event()

def scale_and_keep():
    with av.open(sys.argv[1]) as container:
        frame = next(container.decode(video=0))
    _to_rgb(frame, frame.height // 2, frame.width // 2)
    kept.frame = frame
    del frame
    ready.set()
    done.wait()

threading.Thread(target=scale_and_keep, daemon=True).start()
ready.wait()
child = os.fork()
if child == 0:
    os._exit(0)
started = time.monotonic()
while time.monotonic() - started < 60:
    if os.waitpid(child, os.WNOHANG)[0]:
        print("the child exited")
        break
    time.sleep(0.05)
else:
    os.kill(child, 9)
    print("the child hung")
"""


def test_a_frame_another_thread_keeps_does_not_hang_a_forked_child(videos_dir):
    # PyAV 17 and later scale a frame with a thread per core; a child forked while another thread kept such a frame
    # freed it and waited for ever for scaling threads the child does not have: CI's suite hung in os.fork, twice
    done = subprocess.run([sys.executable, "-c", FRAME_KEPT_BY_ANOTHER_THREAD_AT_A_FORK, str(videos_dir / "bikes.mp4")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "the child exited", done.stdout + done.stderr
