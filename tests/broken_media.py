"""A folder of deliberately awkward inputs, for the sampling tests and the end-to-end extract test.

`make_broken_media(folder)` writes the files and returns {name: expected}, where name is the path
relative to `folder` (a frames folder: its folder name) and expected is one of
- "ok"       the item decodes (it may come back with fewer than T frames, e.g. `short_5_frames.mp4`),
- "ignored"  discover_items() skips it (hidden file, empty folder: silently; non-media file: counted in one line),
- anything else: the item fails with an ItemError whose reason contains that text.
Everything is generated with PyAV, Pillow and numpy in well under a second, except the truncated
copy of a real video, taken from the shared data when it is there.
"""

from __future__ import annotations

import os
import struct
import zlib
from fractions import Fraction
from pathlib import Path

import av
import h5py
import numpy as np
from PIL import Image

SHARED = Path(os.environ.get("VLPCACHE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REAL_VIDEO_FOR_TRUNCATION = "cup.mp4"  # its index (moov) sits at the start, so the first 30% still opens

SHORT_VIDEO_FRAMES = 5
# PyAV 18 writes a display rotation; vlpcache reads one with the PyAV 15 it admits, which cannot write it
CAN_WRITE_ROTATION = hasattr(av.video.stream.VideoStream, "set_display_rotation")


def make_video(path: Path, frames: int, fps: int = 10, size: tuple[int, int] = (48, 64), gop: int = 12,
               codec: str = "libx264", rotation: int = 0, pix_fmt: str = "yuv420p", faststart: bool = False,
               sample_aspect: Fraction | None = None) -> Path:
    """A small real video whose frame i shows the number i as its brightness: pixel value (i * 7) % 256
    in the top-left quarter, a gradient elsewhere. size is (height, width) as stored; sample_aspect, the
    shape of its pixels (anamorphic video: 2 shows it twice as wide)."""
    height, width = size
    options = {"movflags": "faststart"} if faststart else {}  # MP4 index at the start, as streaming sites do
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec in ("libx264", "libx265", "mpeg4", "libvpx", "libvpx-vp9"):
            stream.codec_context.gop_size = gop
        if codec == "libx264":
            # fixed GOP (no scene-cut keyframes) and no B-frames, so keyframe positions are known to tests
            stream.options = {"preset": "ultrafast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0"}
        if rotation:
            stream.set_display_rotation(rotation)
        if sample_aspect:
            stream.codec_context.sample_aspect_ratio = sample_aspect
        for i in range(frames):
            image = frame_pattern(i, height, width)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_pattern(i: int, height: int, width: int) -> np.ndarray:
    image = np.tile(np.linspace(0, 255, width, dtype=np.uint8)[None, :, None], (height, 1, 3))
    image[: height // 2, : width // 2] = (i * 7) % 256
    return image


def frame_number(frame: np.ndarray) -> int:
    """Inverse of frame_pattern for frames with fewer than 37 indices: the brightness of the marked quarter / 7."""
    h, w = frame.shape[:2]
    return int(round(float(frame[h // 8: h * 3 // 8, w // 8: w * 3 // 8].mean()) / 7))


def make_video_after_audio(path: Path, lead_ms: int = 2000, frames: int = 20, fps: int = 10) -> Path:
    """Silence from 0 and frame i (frame_pattern) from lead_ms + i / fps: a video stream that starts after the
    file's audio (ffmpeg -itsoffset, a recording cut), so the video's first frame is lead_ms into the file."""
    with av.open(str(path), "w") as container:
        sound = container.add_stream("aac", rate=8000)
        sound.layout = "mono"
        picture = container.add_stream("libx264", rate=fps)
        picture.width, picture.height, picture.pix_fmt = 64, 48, "yuv420p"
        picture.time_base = picture.codec_context.time_base = Fraction(1, 1000)
        picture.options = {"preset": "ultrafast", "x264-params": "keyint=12:min-keyint=12:scenecut=0:bframes=0"}
        for start in range(0, 8 * (lead_ms + frames * 1000 // fps), 1024):  # 8 samples a millisecond
            chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 8000, start
            container.mux(sound.encode(chunk))
        container.mux(sound.encode())
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i, 48, 64), format="rgb24")
            frame.pts, frame.time_base = lead_ms + i * 1000 // fps, Fraction(1, 1000)
            container.mux(picture.encode(frame))
        container.mux(picture.encode())
    return path


def make_audio_only(path: Path, seconds: float = 0.5) -> Path:
    """AAC audio in an MP4 container, no video stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        samples = 1024
        t = 0
        while t < seconds * 16000:
            wave = (0.2 * np.sin(2 * np.pi * 440 * (np.arange(samples) + t) / 16000)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(wave[None, :], format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 16000, t, Fraction(1, 16000)
            for packet in stream.encode(frame):
                container.mux(packet)
            t += samples
        for packet in stream.encode():
            container.mux(packet)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height pixels, with one tiny (wrong) data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def gif_of_a_large_canvas(path: Path, width: int, height: int, frames: int) -> Path:
    """An animated GIF of `frames` 1x1 pixel frames (1/50 s each) on a width x height canvas: a few bytes a frame,
    and FFmpeg decodes each to the whole canvas (4 bytes a pixel)."""
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff")
    out += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"  # loop forever
    for i in range(frames):
        out += b"\x21\xf9\x04\x04\x02\x00\x00\x00"  # graphic control: keep the canvas, shown 2/100 s
        out += b"\x2c" + struct.pack("<HHHHB", i % width, 0, 1, 1, 0)  # a 1x1 image at (i, 0)
        out += b"\x02\x02\x4c\x01\x00"  # its LZW data (minimum code size 2): clear, pixel 1, end
    path.write_bytes(bytes(out + b"\x3b"))
    return path


SLOW_IMAGE_SIDE = 14_000  # 196 million pixels, just under the pixel limit: seconds to decode and scale down


def make_slow_image(path: Path) -> Path:
    """A real, valid PNG that takes a decoder seconds (a 14,000 x 14,000 white page, 51 kB on disk), for
    --decode-timeout: a file that is slow without being broken, unlike a stand-in decoder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("1", (SLOW_IMAGE_SIDE, SLOW_IMAGE_SIDE), 1).save(path)
    return path


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.zeros((height, width, 3), np.uint8)
    base[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    base[..., 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    base[..., 2] = rng.integers(0, 255, (height, width), dtype=np.uint8)
    return base


def make_broken_media(folder: Path, source_video: Path | None = None) -> dict[str, str]:
    """Write the awkward inputs into `folder` (created) and return {relative name: expected outcome}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    # --- files that are not what their extension says
    (folder / "empty_video.mp4").write_bytes(b"")
    expected["empty_video.mp4"] = "empty file (0 bytes)"
    (folder / "empty_image.jpg").write_bytes(b"")
    expected["empty_image.jpg"] = "empty file (0 bytes)"
    (folder / "text_as_video.mp4").write_text("this is not a video\n" * 20)
    expected["text_as_video.mp4"] = "cannot open video"
    (folder / "text_as_image.jpg").write_text("this is not an image\n")
    expected["text_as_image.jpg"] = "not a readable image"
    make_audio_only(folder / "audio_only.mp4")
    expected["audio_only.mp4"] = "no video stream (audio only)"

    # --- damaged videos
    source = source_video or SHARED / "data" / "videos" / REAL_VIDEO_FOR_TRUNCATION
    if not source.exists():  # no shared data: truncate a generated video instead
        source = make_video(folder / ".source.mp4", 60, gop=10, faststart=True)
    data = source.read_bytes()
    (folder / "truncated_real.mp4").write_bytes(data[: int(len(data) * 0.3)])
    expected["truncated_real.mp4"] = "ok"  # the index survives; frames past the cut are simply missing
    good = make_video(folder / "tmp_good.mp4", 40, gop=10).read_bytes()
    (folder / "tmp_good.mp4").unlink()
    (folder / "truncated_no_index.mp4").write_bytes(good[: len(good) // 2])  # moov index at the end: lost
    expected["truncated_no_index.mp4"] = "cannot open video"
    middle = bytearray(make_video(folder / "garbage_in_middle.mp4", 40, gop=10).read_bytes())
    third = len(middle) // 3
    middle[third: third + len(middle) // 6] = np.random.default_rng(1).integers(0, 256, len(middle) // 6, np.uint8).tobytes()
    (folder / "garbage_in_middle.mp4").write_bytes(bytes(middle))
    expected["garbage_in_middle.mp4"] = "ok"

    # --- valid but unusual videos
    make_video(folder / f"short_{SHORT_VIDEO_FRAMES}_frames.mp4", SHORT_VIDEO_FRAMES)
    expected[f"short_{SHORT_VIDEO_FRAMES}_frames.mp4"] = "ok"
    make_video(folder / "one_frame.mp4", 1)
    expected["one_frame.mp4"] = "ok"
    make_video(folder / "vp9.webm", 12, codec="libvpx-vp9")
    expected["vp9.webm"] = "ok"
    make_video(folder / "animated.gif", 6, codec="gif", pix_fmt="rgb8")
    expected["animated.gif"] = "ok"
    make_video(folder / "odd size 33x17 é.mkv", 9, size=(17, 33), codec="mpeg4", pix_fmt="yuv420p")
    expected["odd size 33x17 é.mkv"] = "ok"
    make_video(folder / "rotated_90.mp4", 4, size=(32, 64), rotation=90 if CAN_WRITE_ROTATION else 0)
    expected["rotated_90.mp4"] = "ok"

    # --- images of every kind
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "tiny_1x1.png")
    expected["tiny_1x1.png"] = "ok"
    # 12000 x 9000 (108 Mpx, past Pillow's decompression-bomb warning); flat colour keeps encoding fast
    Image.new("RGB", (12000, 9000), (90, 120, 200)).save(folder / "large_12000x9000.jpg", quality=50)
    expected["large_12000x9000.jpg"] = "ok"
    png_header_only(folder / "gigantic_header.png", 100_000, 100_000)
    expected["gigantic_header.png"] = "image too large"
    photo = Image.fromarray(_photo(48, 64))
    photo.convert("L").save(folder / "gray.png")
    expected["gray.png"] = "ok"
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    expected["cmyk.jpg"] = "ok"
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    rgba.save(folder / "alpha.png")
    expected["alpha.png"] = "ok"
    photo.convert("LA").save(folder / "gray_alpha.png")
    expected["gray_alpha.png"] = "ok"
    photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.png", transparency=0)
    expected["palette.png"] = "ok"
    photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette_still.gif")
    expected["palette_still.gif"] = "ok"
    Image.fromarray((np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16)).save(folder / "gray16.png")
    expected["gray16.png"] = "ok"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    photo.save(folder / "exif_rotated.jpg", exif=exif)
    expected["exif_rotated.jpg"] = "ok"
    photo.save(folder / "photo_webp.webp")
    expected["photo_webp.webp"] = "ok"
    photo.save(folder / "photo_bmp.bmp")
    expected["photo_bmp.bmp"] = "ok"
    photo.save(folder / "photo_tiff.tiff")
    expected["photo_tiff.tiff"] = "ok"
    photo.save(folder / "ünïcödé and spaces 日本.jpg")
    expected["ünïcödé and spaces 日本.jpg"] = "ok"
    truncated = (folder / "photo_tmp.jpg")
    photo.resize((640, 480)).save(truncated, quality=95)
    (folder / "truncated_image.jpg").write_bytes(truncated.read_bytes()[:2000])
    truncated.unlink()
    expected["truncated_image.jpg"] = "cannot decode image"

    # --- frames folders
    frames = folder / "frames_one_bad"
    frames.mkdir(exist_ok=True)
    for i in range(1, 13):
        Image.fromarray(frame_pattern(i, 48, 64)).save(frames / f"{i}.jpg", quality=95)
    (frames / "4.jpg").write_bytes(b"not a jpeg")
    (frames / "notes.txt").write_text("ignored")
    expected["frames_one_bad"] = "ok"
    all_bad = folder / "frames_all_bad"
    all_bad.mkdir(exist_ok=True)
    for i in range(3):
        (all_bad / f"{i}.png").write_bytes(b"broken")
    expected["frames_all_bad"] = "no readable frame"

    # --- what discovery skips
    (folder / "empty_folder").mkdir(exist_ok=True)
    expected["empty_folder"] = "ignored"
    (folder / "readme.txt").write_text("not media")
    expected["readme.txt"] = "ignored"
    (folder / "._photo.jpg").write_bytes(b"\0\5\26\7 AppleDouble resource fork")
    expected["._photo.jpg"] = "ignored"
    return expected


def damage_chunk(shard: Path, name: str, row: int, xor: int = 0xFF) -> None:
    """Invert two bytes (or the bits of `xor` in them) of one video's chunk of array `name` on disk, as a disk
    fault or a bad copy would."""
    with h5py.File(shard, "r") as f:
        info = f[name].id.get_chunk_info_by_coord((row,) + (0,) * (f[name].ndim - 1))
    with open(shard, "r+b") as f:  # inside the chunk: the smallest are 28 bytes
        f.seek(info.byte_offset + 2)
        flipped = bytes(b ^ xor for b in f.read(2))
        f.seek(info.byte_offset + 2)
        f.write(flipped)
