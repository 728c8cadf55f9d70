"""Sparse frame sampling: T frames per item at the centres of T equal segments (docs/design.md section 1).

Videos (PyAV) are decoded by seeking: before decoding, one cheap demux-only seek per target finds the
keyframe that decoding would have to start from; then for each target the decoder either seeks to
that keyframe (when it lies ahead of the frames already decoded) or decodes on from where it is (when
the target is in the GOP being decoded). So targets that share a GOP cost one seek, and a video with a
single keyframe is decoded once, up to its last target, never from its start T times.

A target takes the frame shown at that time (the last frame starting at or before it). A video with
fewer frames than T gives each frame once: fewer than T frames come back and the caller masks the rest.

Still images are a 1-frame item at time 0. A frames folder is a video at 1 frame per second: its
frames (natural name order) are sampled by position, and a frame's timestamp is its position in the
folder (not the number in its file name).

Every problem with the input becomes `ItemError(reason)` with a short reason; the caller adds the path.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlpcache.errors import DecodingTooLong, ItemError
from vlpcache.extract.sources import SIZES_DIFFER, Item, frame_files, photo_extensions

# Largest image decoded at full size (~600 MB as RGB); JPEGs count after DCT-domain reduction.
MAX_IMAGE_PIXELS = 200_000_000
# Largest video frame decoded (coded pixels): every codec level's largest picture is 8192x4352, and 8192x8192 (a
# stereo 360-degree video) passes; a 14 KB GIF of a 16000x16000 canvas decodes to 1 GB a frame.
MAX_VIDEO_PIXELS = 8192 * 8192
# pixels of an image converted to 8 bits at a time where the conversion needs temporaries (_image_to_8bit)
CONVERT_PIXELS = 1 << 21
# how a video file is opened: PyAV up to 18 decodes a file's metadata as strict UTF-8 unless told to ignore
# errors (a title in another encoding would fail the file); PyAV 19 (what pip installs on Python 3.12 and
# later) refuses that option, which failed every video, and reads such a title without it (checked on an H200
# machine's Python 3.12 with PyAV 19.0.2: tests/test_sampling.py passes)
OPEN_OPTIONS = {"metadata_errors": "ignore"} if int(av.__version__.split(".")[0]) < 19 else {}
# how a frame is scaled: PyAV 17 and later scale with a thread per core by default, a pool started and joined for
# every frame (slower, one decoding process per core already: a 640x272 frame 0.36 against 0.14 ms here), and a
# frame kept by another thread and freed in a forked child of the process (a DataLoader worker) waited there for
# ever for the pool's threads, which the child does not have
SCALE_OPTIONS = {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}
# Give up on a stretch of video after this many packets in a row that fail to decode.
MAX_CONSECUTIVE_DECODE_ERRORS = 100
# Packets read after a seek in search of the keyframe where decoding will start.
PROBE_MAX_PACKETS = 2000
PROBE_MAX_STEPS_BACK = 10
# A file whose length is unknown from its metadata is measured from its last packets, found by seeking
# this far (seconds; a week) past its start; a small one without timestamps there by a demux pass (no decoding).
SEEK_PAST_END_S = 7 * 24 * 3600
DEMUX_PASS_MAX_BYTES = 256 << 20
# a video whose data ends before this share of its length (less a second) is noted as truncated
TRUNCATED_BELOW = 0.9


@dataclass
class SampledFrames:
    frames: list[np.ndarray]  # each (H, W, 3) uint8 RGB, C-contiguous, max(H, W) <= max_side; same size within an item
    timestamps: list[float]  # seconds from the file's start (as players and `ffmpeg -ss` count), strictly increasing
    duration: float  # seconds from the file's start to the video's end (0 for an image; a frames folder: 1 s a frame)
    size: tuple[int, int]  # original (height, width), as displayed
    decoded_frames: int = 0  # frames the decoder produced to get these (shows that seeking works)
    notes: list[str] = field(default_factory=list)  # problems survived, e.g. "2 of 40 frames unreadable"


def segment_centres(duration_or_count: float, num_frames: int) -> list[float]:
    """Centres of `num_frames` equal segments of [0, duration_or_count)."""
    step = duration_or_count / num_frames
    return [(k + 0.5) * step for k in range(num_frames)]


def read_item(item: Item, num_frames: int, max_side: int, *, seek: bool = True, threads: str = "NONE") -> SampledFrames:
    """Decode the sampled frames of one item; raises ItemError(reason) for any bad input.

    `seek=False` decodes videos straight through from the start (the reference for benchmarks).
    `threads` is PyAV's thread_type for video decoding. "NONE" by default: `extract` runs one decoding
    process per core, and on 2 busy cores "AUTO" gained 0-7% on short clips and lost 10% on a long one.
    """
    with _item_errors():
        if item.kind == "video":
            return _VideoSampler(item.path, num_frames, max_side, seek=seek, threads=threads).sample()
        if item.kind == "image":
            return _read_image_item(item.path, max_side)
        if item.kind == "frames":
            return _read_frames_folder(item.path, num_frames, max_side)
        raise ItemError(f"unknown item kind {item.kind!r}")


def read_frames_at(item: Item, times: list[float], max_side: int, *, from_video_start: bool = False,
                   time_limit: float | None = None) -> SampledFrames:
    """Decode the frames shown at `times` (seconds, increasing, as read_item returned and the cache stores
    them), seeking as read_item does; e.g. one sampled frame again, for a thumbnail. A frames folder's
    time is the frame's position in it; an image has one frame at 0. `from_video_start`: a video's times count
    from its video stream's first frame, not from the file's start (caches written before: schema.TIMES_ATTR).
    `time_limit`: seconds a video's decoding may take (None: no limit), told between packets; past it,
    DecodingTooLong. Raises ItemError(reason).
    """
    with _item_errors():
        if item.kind == "video":
            return _VideoSampler(item.path, len(times), max_side, seek=True, threads="NONE", times=times,
                                 from_video_start=from_video_start, time_limit=time_limit).sample()
        if item.kind == "image":
            return _read_image_item(item.path, max_side)
        if item.kind == "frames":
            return _read_folder_positions(item.path, [round(t) for t in times], max_side)
        raise ItemError(f"unknown item kind {item.kind!r}")


@contextlib.contextmanager
def _item_errors():
    """Every failure while decoding one item as ItemError(short reason)."""
    try:
        yield
    except ItemError:
        raise
    except MemoryError:
        raise ItemError("out of memory while decoding") from None
    except av.error.FFmpegError as err:  # before OSError: PyAV's errors subclass both
        raise ItemError(f"cannot decode video: {_ffmpeg_reason(err)}") from None
    except PermissionError:
        raise ItemError("permission denied") from None
    except FileNotFoundError:
        raise ItemError("file not found (removed during the run?)") from None
    except Exception as err:  # a decoder library failing on odd input must not stop the run
        raise ItemError(f"cannot decode: {type(err).__name__}: {err}") from None


# ----------------------------------------------------------------------------------------------- videos


class _VideoSampler:
    def __init__(self, path: Path, num_frames: int, max_side: int, seek: bool, threads: str,
                 times: list[float] | None = None, from_video_start: bool = False,
                 time_limit: float | None = None) -> None:
        self.path, self.num_frames, self.max_side = path, num_frames, max_side
        self.use_seek, self.threads = seek, threads
        self.times = times  # seconds to decode instead of the segment centres
        self.from_video_start = from_video_start  # whether those count from the video stream's start, not the file's
        self.decoded = 0  # frames out of the decoder
        self.decode_errors = 0  # packets the decoder rejected
        self.demuxed = False  # whether the demuxer has moved from the first packet
        self.notes: list[str] = []
        self.time_limit = time_limit  # seconds the decoding may take, None: no limit
        self.deadline = time.monotonic() + time_limit if time_limit is not None else math.inf

    def sample(self) -> SampledFrames:
        _check_file(self.path)
        self.container = self._open()
        try:
            if not self.container.streams.video:
                audio = bool(self.container.streams.audio)
                raise ItemError("no video stream (audio only)" if audio else "no video stream")
            stream = self.stream
            if stream.codec_context is None:
                raise ItemError("no decoder for its video codec in this FFmpeg build")
            _check_frame_size(stream.codec_context.width, stream.codec_context.height)
            self.time_base = stream.time_base or Fraction(1, 1_000_000)
            self.start = stream.start_time if stream.start_time is not None else 0  # in time_base units
            rate = stream.guessed_rate or stream.average_rate or stream.base_rate
            self.frame_step = float(1 / (rate * self.time_base)) if rate else 1.0  # nominal, in time_base units
            self.clock = _FrameClock(self.frame_step)
            duration = self._duration()
            # self.stream, not `stream`: measuring the duration may have opened the file again (the old one is closed)
            if duration < TRUNCATED_BELOW * (length := header_length(self.stream)) - 1.0:
                # an AVI cut off loses its index, at the end: FFmpeg's scan finds the frames there are, and the
                # header still counts the frames there were (a cut MP4's index survives: _sample tells that one)
                self.notes.append(f"video data ends at {duration:.1f} s of {length:.1f} s (truncated file?)")
            return self._sample(duration)
        finally:
            self.container.close()

    def _open(self) -> av.container.InputContainer:
        try:
            container = av.open(str(self.path), **OPEN_OPTIONS)
        except av.error.FFmpegError as err:
            raise ItemError(f"cannot open video: {_ffmpeg_reason(err)}") from None
        if container.streams.video:
            self.stream = main_video_stream(container)
            self.stream.thread_type = self.threads
        return container

    # -- how long is it

    def _duration(self) -> float:
        """Seconds from the start of the stream to its end, from the best metadata there is."""
        stream, tb = self.stream, float(self.time_base)
        if stream.duration and stream.duration > 0:
            return stream.duration * tb
        if self.container.duration and self.container.duration > 0:
            if self.start > 0 and "matroska" in self.container.format.name and (end := self._end_by_seeking()):
                # Matroska's Duration counts from 0, not from the first frame: 4 s of video from 10 s is 14 s
                return (end - self.start) * tb if end > self.start else self.container.duration / av.time_base
            return self.container.duration / av.time_base
        if length := header_length(stream):
            return length
        if (end := self._end_by_seeking()) is not None and end > self.start:
            return (end - self.start) * tb
        # last resort: read (not decode) every packet of a small file for its last timestamp
        if self.path.stat().st_size <= DEMUX_PASS_MAX_BYTES:
            end, length = None, 0.0
            for packet in self.container.demux(self.stream):  # the one of the container opened again
                step = packet.duration or self.frame_step
                length += step if packet.size else 0
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is not None:
                    end = max(end or ts, ts + step)
            if end is None and length:  # no timestamps at all (raw streams): add up packet durations
                self.start, end = 0, length
            self._rewind()
            if end is not None and end > self.start:
                return (end - self.start) * tb
        raise ItemError("video length unknown (no duration, frame count or timestamps in the file)")

    def _end_by_seeking(self) -> int | None:
        """The end of the last packet (time_base units), read after a seek far past the end, which lands
        on the last keyframe: a recording cut off before its header was finished (Matroska without
        Duration or Cues: OBS after a crash, a stream saved from a pipe) has timestamps but no length,
        and a demux pass over a long one reads gigabytes. None where the input cannot seek or has no
        timestamps after the seek (a raw stream: the demux pass below measures it)."""
        seeking, end = self.use_seek, None
        if self._seek_to(self.start + math.ceil(SEEK_PAST_END_S / float(self.time_base))):
            for packet in self.container.demux(self.stream):
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is not None and packet.size:
                    end = max(end if end is not None else ts, ts + (packet.duration or self.frame_step))
        self.use_seek = seeking  # the sampling plan tries again, and copes where seeking fails
        self._reopen()  # a failed seek, or one back to the start, can leave a raw H.264 stream at its end
        return end

    # -- sampling plan

    def _sample(self, duration: float) -> SampledFrames:
        tb = float(self.time_base)
        zero = self.start if self.from_video_start else self._file_start()  # time 0 of the times, in time_base units
        lead = (self.start - zero) * tb  # seconds from the file's start to the video's
        if self.times is None:  # the segments are of the video's own length
            targets = [self.start + t / tb for t in segment_centres(duration, self.num_frames)]  # time_base units
        else:  # a frame's stored start time (float32 in the cache), a float32 step on so that its rounding cannot
            # give the frame before; not a share of the nominal frame: a variable-rate video's frames follow closer
            targets = [zero + (t + float(np.spacing(np.float32(abs(t))))) / tb for t in self.times]
        plan = [self._probe(t) for t in targets] if self.use_seek else [(None, None)] * len(targets)

        frames, times = [], []  # frames: (H, W, 3) RGB arrays of out_size
        size = out_size = None  # (height, width) as displayed, and as returned
        run = None  # the generator of decoded (frame, time) since the last seek
        run_keyframe = None  # where that run started decoding
        last: tuple[av.VideoFrame, float] | None = None  # latest frame decoded, and its time
        ahead = None  # the frame decoded after `last` (the next one shown), not yet taken: it starts past the target
        ended_at = -math.inf  # time of the last frame before the data ran out, if it did
        for target, (seek_ts, keyframe) in zip(targets, plan):
            # the keyframe the target needs lies ahead of what was decoded: jump there for free;
            # otherwise a seek would restart before our position, so decode on instead
            position = last[1] if last is not None else run_keyframe
            if run is None or (keyframe is not None and (position is None or keyframe > position)):
                run, run_keyframe, last, ahead = self._decode_from(seek_ts), keyframe, None, None
            # the frame shown at the target is the last one starting at or before it: told by where the next
            # frame starts, not by a frame's duration (a decode-order delta in MP4 with B-frames, the nominal
            # one in Matroska: both wrong in a pause or a faster stretch of a variable-rate video)
            while True:  # (the first frame decoded is taken even past the target: nothing earlier decodes)
                ahead = ahead or next(run, None)
                if ahead is None or (last is not None and ahead[1] > target):
                    break
                last, ahead = ahead, None
            chosen = last
            if ahead is None and (last is None or target >= last[1] + (last[0].duration or self.frame_step)):
                ended_at = max(ended_at, last[1] if last else self.start)  # the data ran out before the target
            if chosen is None or (times and chosen[1] <= times[-1]):
                continue  # nothing decoded, or the same frame as the previous target: keep each frame once
            if size is None:  # the first frame taken sets the item's sizes
                size, out_size = self._sizes(chosen[0])
            frames.append(_to_rgb(chosen[0], *out_size))  # at once: a full-size frame can be a GB (a GIF's canvas)
            times.append(chosen[1])

        if not frames:
            reason = "no frame could be decoded"
            if self.decode_errors:
                reason += f" ({self.decode_errors} packets failed to decode)"
            raise ItemError(reason)
        if self.decode_errors:
            self.notes.append(f"{self.decode_errors} packet{'s' if self.decode_errors != 1 else ''} failed to decode")
        end = (ended_at - self.start) * tb  # -inf when every target found its frame before the data ended
        if len(frames) < self.num_frames and -math.inf < end < TRUNCATED_BELOW * duration - 1.0:
            self.notes.append(f"video data ends at {end:.1f} s of {duration:.1f} s (truncated file?)")
        seconds = [min(max((t - zero) * tb, lead), lead + duration) for t in times]
        return SampledFrames(frames, seconds, lead + duration, size, decoded_frames=self.decoded, notes=self.notes)

    def _sizes(self, frame: av.VideoFrame) -> tuple[tuple[int, int], tuple[int, int]]:
        """(height, width) of the video as displayed, and (height, width) of the frames returned, before rotation:
        the first frame taken sets them, and a later frame of another size is scaled to them."""
        coded = (frame.height, _display_width(frame, self.stream))  # before rotation
        return (coded[::-1] if _orientation(frame)[1] % 2 else coded), _fit(coded, self.max_side)

    def _file_start(self) -> float:
        """The timestamp (time_base units) of the file's start, time 0 as players and `ffmpeg -ss` count: the
        earliest start of its streams, before the video's where the video starts after its audio (-itsoffset, a
        recording cut); the video's own where the video starts first (to the microsecond the file's is kept in)."""
        first = self.container.start_time  # AV_TIME_BASE units
        if first is None:
            return self.start
        lead = self.start * float(self.time_base) * av.time_base - first  # microseconds the video starts after it
        return self.start - lead / av.time_base / float(self.time_base) if lead > 1.5 else self.start

    def _probe(self, target: float) -> tuple[int | None, int | None]:
        """(seek timestamp, keyframe timestamp) such that seeking there starts decoding at that keyframe,
        at or before `target`; found by demuxing, not decoding. Demuxers whose index is keyed on decode
        time (MP4 with B-frames) or that seek inexactly (MPEG-TS) can land past the target: then step
        back, twice as far each time. (None, None): the input cannot seek. (None, start): even a seek to the
        start lands past the target, so decoding starts from the first packet (MPEG-TS with B-frames: its first
        keyframe's decode time precedes the stream's start, and a seek there lands on the second keyframe).
        """
        ts, back = math.floor(target), max(4 * self.frame_step, 1.0)
        for _ in range(PROBE_MAX_STEPS_BACK):
            if not self._seek_to(ts):
                return None, None
            keyframe = self._next_keyframe_time()
            if keyframe is not None and keyframe <= target:
                return ts, keyframe
            if ts <= self.start:
                return None, self.start
            ts, back = max(self.start, math.floor(ts - back)), back * 2
        return self.start, None  # unknown: decode on from wherever decoding is

    def _rewind(self) -> None:
        """Back to the first packet, by opening the file again: a seek to the stream's start can land a GOP
        later (MPEG-TS with B-frames), or fail (an input that cannot seek)."""
        self._reopen()

    def _reopen(self) -> None:
        self.container.close()
        self.container = self._open()
        self.demuxed = False

    def _seek_to(self, ts: int) -> bool:
        self.demuxed = True
        try:
            self.container.seek(int(ts), stream=self.stream, backward=True, any_frame=False)
            return True
        except av.error.FFmpegError:
            self.use_seek = False  # unseekable input: decode straight through
            return False

    def _next_keyframe_time(self) -> int | None:
        """Timestamp of the next keyframe packet: where decoding really starts after a seek, also when
        the demuxer seeks to any packet (MPEG-TS) and the decoder drops what precedes a keyframe.
        None at the end of the stream; the first packet's time if no keyframe flag shows up."""
        first = None
        for count, packet in enumerate(self.container.demux(self.stream)):
            ts = packet.pts if packet.pts is not None else packet.dts
            if packet.is_keyframe and ts is not None:
                return ts
            first = ts if first is None else first
            if count >= PROBE_MAX_PACKETS:
                return first
        return None

    # -- decoding

    def _decode_from(self, seek_ts: int | None):
        """Yield (frame, time in time_base units) from the keyframe at or before seek_ts."""
        if self.use_seek and seek_ts is not None:
            self._seek_to(seek_ts)
        elif self.decoded or self.demuxed:
            self._rewind()  # back to the start after probing or a failed seek
        self.clock.restart()
        errors_in_a_row = 0
        for packet in self.container.demux(self.stream):
            if time.monotonic() > self.deadline:
                raise DecodingTooLong(f"decoding took more than {self.time_limit:g} s")
            try:
                decoded = packet.decode()
            except av.error.FFmpegError:
                self.decode_errors += 1
                errors_in_a_row += 1
                if errors_in_a_row >= MAX_CONSECUTIVE_DECODE_ERRORS:
                    self.notes.append(f"gave up after {errors_in_a_row} undecodable packets in a row")
                    return
                continue
            errors_in_a_row = 0
            for frame in decoded:
                self.decoded += 1
                _check_frame_size(frame.width, frame.height)  # a stream can change its size midway
                yield frame, self.clock.time(frame)


class _FrameClock:
    """Presentation time of decoded frames, choosing pts or dts as FFmpeg's best_effort_timestamp does.

    Some files carry decode-order timestamps as pts (old AVIs with packed B-frames, badly muxed MP4):
    their frames come out of the decoder with pts that go backwards, while dts keep increasing.
    One clock serves a whole file, so what it learnt about pts before a seek still holds after it.
    """

    def __init__(self, frame_step: float) -> None:
        self.frame_step = frame_step
        self.faulty_pts = self.faulty_dts = 0
        self.last_pts = self.last_dts = self.last_time = None

    def restart(self) -> None:
        """After a seek: timestamps jump, which is no evidence of faulty pts or dts."""
        self.last_pts = self.last_dts = self.last_time = None

    def time(self, frame: av.VideoFrame) -> float:
        pts, dts = frame.pts, frame.dts
        if dts is not None:
            self.faulty_dts += self.last_dts is not None and dts <= self.last_dts
            self.last_dts = dts
        if pts is not None:
            self.faulty_pts += self.last_pts is not None and pts <= self.last_pts
            self.last_pts = pts
        if pts is not None and (self.faulty_pts <= self.faulty_dts or dts is None):
            t = float(pts)
        elif dts is not None:
            t = float(dts)
        else:  # no timestamps at all: add up frame durations
            t = 0.0 if self.last_time is None else self.last_time + self.last_duration
        self.last_time, self.last_duration = t, frame.duration or self.frame_step
        return t


def _check_frame_size(width: int, height: int) -> None:
    if width * height > MAX_VIDEO_PIXELS:
        raise ItemError(f"video frames too large ({width}x{height} pixels; the limit is {MAX_VIDEO_PIXELS:,} pixels)")


def _display_width(frame: av.VideoFrame, stream) -> int:
    """Width as displayed: anamorphic video (sample aspect ratio != 1) is stretched."""
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    if sar and sar > 0 and sar != 1:
        return max(1, round(frame.width * sar))
    return frame.width


def _to_rgb(frame: av.VideoFrame, height: int, width: int) -> np.ndarray:
    # swscale converts and downscales in one pass, much cheaper than resizing the full-size RGB array
    array = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="AREA", **SCALE_OPTIONS)
    mirrored, turns = _orientation(frame)
    if mirrored:
        array = array[:, ::-1]
    if turns:
        array = np.rot90(array, k=turns)
    return np.ascontiguousarray(array)


def _orientation(frame: av.VideoFrame) -> tuple[bool, int]:
    """(whether to mirror it left to right, then how many counterclockwise quarter turns) that show the frame as
    players do, by its display matrix (phone videos carry one; a front camera's or an editor's can mirror it).
    PyAV's frame.rotation reads a mirror as a half turn: a mirrored video came out upside down."""
    matrix = _display_matrix(frame)
    if matrix is None:
        return False, round((frame.rotation or 0) / 90) % 4
    a, b, c, d = (float(v) for v in matrix[[0, 1, 3, 4]])  # x' = a x + c y, y' = b x + d y (FFmpeg's display.h)
    mirrored = a * d - b * c < 0
    if mirrored:  # the matrix is a mirror of the source's x, then a rotation: the rotation's is the matrix's without it
        a, b = -a, -b
    if not math.hypot(a, c) or not math.hypot(b, d):
        return mirrored, 0
    degrees = -math.degrees(math.atan2(b / math.hypot(b, d), a / math.hypot(a, c)))  # as av_display_rotation_get
    return mirrored, round(degrees / 90) % 4


def _display_matrix(frame: av.VideoFrame) -> np.ndarray | None:
    """The frame's display matrix, FFmpeg's 9 int32 (16.16 fixed point); None where it has none."""
    try:  # a container of its own: frame.side_data's is kept by the frame and keeps it, a cycle that only the garbage
        # collector frees, so each frame taken stayed in memory until it ran (a GIF's 16000x16000 canvas: 1 GB each)
        data = av.sidedata.sidedata.SideDataContainer(frame).get("DISPLAYMATRIX")
    except (KeyError, ValueError, AttributeError):  # a PyAV that names side data otherwise: frame.rotation
        return None
    if data is None or len(raw := bytes(data)) < 36:
        return None
    return np.frombuffer(raw[:36], dtype=np.int32)


def _ffmpeg_reason(err: av.error.FFmpegError) -> str:
    text = (err.strerror or str(err)).strip().rstrip(".")
    if isinstance(err, av.error.InvalidDataError):
        return "invalid data (corrupt, truncated or not a video file)"
    return text[0].lower() + text[1:] if text else type(err).__name__


# ----------------------------------------------------------------------------------------------- images


def _read_image(path: Path, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """One image as (H, W, 3) uint8 RGB fitted into max_side, and its displayed (height, width)."""
    _check_file(path)
    photo_extensions()  # HEIC/HEIF's opener registered with Pillow in this process, where pillow-heif is there
    with _large_images_allowed():
        try:
            image = Image.open(path)
        except UnidentifiedImageError:
            raise ItemError("not a readable image (unknown format or corrupt)") from None
        except OSError as err:
            raise ItemError(f"cannot read image: {err.strerror or err}") from None
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise ItemError(f"image has no pixels ({width}x{height})")
        transposed = _exif_orientation(image) in (5, 6, 7, 8)
        size = (width, height) if transposed else (height, width)  # displayed (height, width)
        if image.format == "JPEG":
            # decode at 1/2, 1/4 or 1/8 scale in the DCT domain when the target is that much smaller
            scale = max_side / max(width, height)
            if scale < 1:
                image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
        if image.size[0] * image.size[1] > MAX_IMAGE_PIXELS:
            raise ItemError(f"image too large ({width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS:,} pixels)")
        try:
            with _large_images_allowed():
                image.load()
                ImageOps.exif_transpose(image, in_place=True)  # not a copy of the whole image where it is upright
            pixels = _image_to_8bit(image)
        except (OSError, SyntaxError, ValueError) as err:
            raise ItemError(f"cannot decode image: {err}") from None
        out_h, out_w = _fit((pixels.height, pixels.width), max_side)
        if (out_h, out_w) != (pixels.height, pixels.width):
            pixels = pixels.resize((out_w, out_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
        rgb = pixels if pixels.mode == "RGB" else pixels.convert("RGB")  # grey made RGB once small: the same pixels
        return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)), size


def _image_to_8bit(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit grey ("L") or RGB: alpha composited on white, 16-bit and float scaled to 0..255.
    Those two are converted a few rows at a time (_by_rows): at full size their temporaries (float64 values, a
    white canvas) took a 381 KB PNG of 14000x14000 16-bit pixels to 5 GB; the pixels are the same."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _by_rows(image, "L", _grey_scaling(image))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        return _by_rows(image, "RGB", _on_white)
    return image if mode in ("RGB", "L") else image.convert("RGB")


def _grey_scaling(image: Image.Image) -> Callable[[Image.Image], Image.Image]:
    """The conversion of rows of a 16-bit, 32-bit integer or float image to 8-bit grey: 16-bit (or any image with
    values above 255) divided by 257, float within 0..1 multiplied by 255, then rounded and clipped to 0..255."""
    mode = image.mode
    peak = None if mode.startswith("I;16") else np.max([np.asarray(rows).max(initial=0) for rows in _rows(image)],
                                                         initial=0)

    def scale(rows: Image.Image) -> Image.Image:
        values = np.asarray(rows).astype(np.float64)
        if mode.startswith("I;16") or peak > 255:
            values = values / 257.0  # 16-bit range to 8-bit
        elif mode == "F" and peak <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))

    return scale


def _on_white(rows: Image.Image) -> Image.Image:
    rgba = rows.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _rows(image: Image.Image) -> Iterator[Image.Image]:
    """The image cut across into pieces of about CONVERT_PIXELS pixels (whole rows, top to bottom)."""
    width, height = image.size
    step = max(1, CONVERT_PIXELS // width)
    for top in range(0, height, step):
        yield image.crop((0, top, width, min(height, top + step)))


def _by_rows(image: Image.Image, mode: str, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """`convert` (rows of the image to the same rows in `mode`), applied to a few rows at a time."""
    out = Image.new(mode, image.size)
    top = 0
    for rows in _rows(image):
        out.paste(convert(rows), (0, top))
        top += rows.height
    return out


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # malformed EXIF is common and harmless: show the image as stored
        return 1


@contextlib.contextmanager
def _large_images_allowed():
    """Pillow's decompression-bomb guard off: our own limit (MAX_IMAGE_PIXELS) applies after draft()."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _read_image_item(path: Path, max_side: int) -> SampledFrames:
    frame, size = _read_image(path, max_side)
    return SampledFrames([frame], [0.0], 0.0, size, decoded_frames=1)


def header_length(stream) -> float:
    """Seconds a video stream's header says it holds (its frame count at its frame rate); 0 where it does not say."""
    rate = stream.average_rate or stream.guessed_rate
    return float(stream.frames / rate) if stream.frames and rate else 0.0


def main_video_stream(container: av.container.InputContainer):
    """The video stream that is the video (a file's first may be a thumbnail or a one-frame still track
    before the real one): not a cover picture (attached_pic), then the longest by its stated duration,
    then the one FFmpeg ranks best, then the largest picture; the first of equals."""
    streams = container.streams.video
    moving = [s for s in streams if not s.disposition & av.stream.Disposition.attached_pic] or list(streams)
    if len(moving) == 1:
        return moving[0]
    best = container.streams.best("video")

    def rank(stream) -> tuple[float, bool, int]:
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        else:
            seconds = header_length(stream)
        area = stream.codec_context.width * stream.codec_context.height if stream.codec_context else 0
        return seconds, best is not None and stream.index == best.index, area

    return max(moving, key=rank)  # max keeps the first of equals


# ------------------------------------------------------------------------------------------ frame folders


def _folder_frames(folder: Path) -> list[Path]:
    try:
        files = frame_files(folder)
    except PermissionError:
        raise ItemError("cannot read folder: permission denied") from None
    except OSError as err:
        raise ItemError(f"cannot read folder: {err.strerror or err}") from None
    if not files:
        raise ItemError("frames folder has no images")
    return files


def _read_folder_positions(folder: Path, positions: list[int], max_side: int) -> SampledFrames:
    """The frames at these positions of the folder's image list (a frame's time is its position)."""
    files = _folder_frames(folder)
    missing = [p for p in positions if not 0 <= p < len(files)]
    if missing:
        raise ItemError(f"no frame at position {missing[0]}: the folder holds {len(files)} images")
    frames, size = [], None
    for position in positions:
        frame, frame_size = _read_image(files[position], max_side)
        frames.append(frame)
        size = size or frame_size
    return SampledFrames(frames, [float(p) for p in positions], float(len(files)), size, decoded_frames=len(frames))


def _read_frames_folder(folder: Path, num_frames: int, max_side: int) -> SampledFrames:
    """Frames at the segment centres of the folder's image list; an unreadable frame is replaced by the
    nearest readable one in its segment, or dropped when its whole segment is unreadable."""
    files = _folder_frames(folder)
    count = len(files)

    frames, timestamps, failed = [], [], {}
    size = out_size = None
    sizes = []  # each sampled frame's (height, width): a video's frames share one
    decoded = 0
    for k, centre in enumerate(segment_centres(count, num_frames)):
        primary = math.floor(centre)
        if timestamps and primary <= timestamps[-1]:
            continue  # fewer frames than T: this frame was taken by the previous segment
        # a bad frame is replaced by the nearest readable one that overlaps its segment
        lo, hi = math.floor(k * count / num_frames), math.ceil((k + 1) * count / num_frames)
        others = sorted(set(range(lo, min(hi, count))) - {primary}, key=lambda i: (abs(i + 0.5 - centre), i))
        for index in [primary, *others]:
            if (timestamps and index <= timestamps[-1]) or index in failed:
                continue
            try:
                frame, frame_size = _read_image(files[index], max_side)
            except ItemError as err:
                failed[index] = str(err)
                continue
            decoded += 1
            sizes.append(frame_size)
            if out_size is None:
                size, out_size = frame_size, frame.shape[:2]
            elif frame.shape[:2] != out_size:  # one frame size per item: boxes are normalised by it
                frame = np.asarray(Image.fromarray(frame).resize((out_size[1], out_size[0]), Image.Resampling.BILINEAR))
            frames.append(np.ascontiguousarray(frame))
            timestamps.append(float(index))
            break

    if not frames:
        first = next(iter(failed.items()), (0, "?"))
        raise ItemError(f"no readable frame among {count} images ({files[first[0]].name}: {first[1]})")
    notes = [f"{len(failed)} of {count} frames unreadable, e.g. {files[i].name}: {r}" for i, r in list(failed.items())[:1]]
    if len(set(sizes)) > 1:
        (h1, w1), (h2, w2) = sizes[0], next(s for s in sizes if s != sizes[0])
        notes.append(f"{SIZES_DIFFER} ({w1}x{h1}, {w2}x{h2}): photos rather than a video's frames? "
                     "--no-frame-folders takes each image as an item")
    return SampledFrames(frames, timestamps, float(count), size, decoded_frames=decoded, notes=notes)


# ----------------------------------------------------------------------------------------------- shared


def _check_file(path: Path) -> None:
    try:
        if path.stat().st_size == 0:
            raise ItemError("empty file (0 bytes)")
        if not os.access(path, os.R_OK):
            raise ItemError("permission denied")
    except FileNotFoundError:
        raise ItemError("file not found") from None


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(height, width) scaled down so that the longer side is at most max_side, aspect kept, never up."""
    height, width = size
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))
