"""The `yolox` detector: YOLOX-Nano (ONNX, onnxruntime) boxes with RoIAlign region features.

Features come from an ImageNet MobileNetV2 trunk (1280-d, stride 32) and/or the detector's own neck
maps (64 + 128 + 256 = 448-d at strides 8/16/32), both pooled with torchvision's roi_align (its
compiled kernel, vision_ops.py) on the final boxes. Both networks read one batch of letterboxed BGR
0-255 canvases (YOLOX's own input convention); the trunk turns it into ImageNet-normalised RGB inside
its graph.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlpcache.cache.schema import NMS_IOU, SCORE_THRESHOLD
from vlpcache.devices import quota_threads
from vlpcache.extract.detectors.inference import set_autotune
from vlpcache.extract.detectors.mobilenet import mobilenet_trunk
from vlpcache.extract.detectors.regions import FrameRegions, select_detections, with_frame_region
from vlpcache.extract.detectors.spec import DEFAULT_YOLOX_BACKBONE, DetectorSpec, yolox_spec
from vlpcache.extract.detectors.spec import YOLOX_INPUT_SIZE as INPUT_SIZE
from vlpcache.extract.detectors.vision_ops import roi_align
from vlpcache.extract.detectors.yolox_graph import EXPORT_OLDER, batched_onnx
from vlpcache.files import replace_atomically
from vlpcache.onnx_versions import too_new_said, unreadable_version
from vlpcache.report import say
from vlpcache.workspace import user_cache_dir

STRIDES = (8, 16, 32)
PAD_VALUE = 114.0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ROI_OUTPUT = 2  # 2x2 RoIAlign bins, averaged: a 13x13 stride-32 map has little more to give
# (detected boxes only: the whole-frame region is the exact mean of the map over the visible frame)


@dataclass
class YoloxConfig:
    backbone: str = DEFAULT_YOLOX_BACKBONE
    score_threshold: float = SCORE_THRESHOLD
    nms_iou: float = NMS_IOU
    device: str = "cpu"  # "cpu" or "cuda"
    threads: int = 0  # 0: onnxruntime and torch defaults
    # "onnxruntime" or "torch" (the ONNX graphs converted with onnx2torch / the torchvision trunk);
    # "auto": torch on CUDA (frames, head and RoIAlign stay on the GPU), onnxruntime on CPU, where
    # its fused kernels are several times faster than torch's for these two small networks
    runtime: str = "auto"
    autocast: str | None = "float16"  # CUDA only: float16, bfloat16 or None
    autotune: bool = True  # CUDA only: cuDNN's autotuning (torch.backends.cudnn.benchmark)


def _onnx_session(model_bytes: bytes, device: str, threads: int, autotune: bool = True):
    """An onnxruntime session on the CPU, or on CUDA where onnxruntime-gpu is installed; `autotune` is cuDNN's
    exhaustive search of convolution algorithms there (onnxruntime's default), else its heuristic choice."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle threads that spin between runs starve torch's glue ops and the decoding workers on the same
    # cores (one frame at a time: 73 -> 26 ms per frame on 2 cores)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    providers: list = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            search = "EXHAUSTIVE" if autotune else "HEURISTIC"
            providers.insert(0, ("CUDAExecutionProvider", {"cudnn_conv_algo_search": search}))
        else:
            say("note: onnxruntime has no CUDA provider (pip install onnxruntime-gpu); "
                "YOLOX runs on the CPU, features on the GPU")
    return ort.InferenceSession(model_bytes, sess_options=options, providers=providers)


class NormalisedTrunk(torch.nn.Module):
    """MobileNetV2 trunk reading YOLOX's input: (B, 3, H, W) BGR 0-255 -> (B, 1280, H/32, W/32).

    The channel flip and ImageNet normalisation run inside the network (and its ONNX graph), so both
    networks share one batch and no normalised copy is made outside."""

    def __init__(self, trunk: torch.nn.Module):
        super().__init__()
        self.trunk = trunk
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)

    def forward(self, bgr: torch.Tensor) -> torch.Tensor:
        return self.trunk((bgr.flip(1) - self.mean) / self.std)


def _cached_onnx(name: str, make, load, what: str, otherwise: str):
    """`load(graph)` of an ONNX graph vlpcache derives from a weights file (`what`), made once by `make()` and
    kept in user_cache_dir()/onnx under `name` (which holds the weights' sha256): later runs read the bytes.
    A kept graph that does not load (a crash cut its write short) is removed and made again; so is one stamped
    newer than this onnxruntime reads (a newer install's, in a shared home). A graph made here that this
    onnxruntime cannot read for its stamp is one line naming `what`: a newer onnxruntime, or `otherwise`."""
    cached = user_cache_dir() / "onnx" / name
    if cached.is_file():
        try:
            return load(cached.read_bytes())
        except Exception as err:
            stamped_newer = unreadable_version(err) is not None
            if not stamped_newer and not _graph_damaged(err):  # an ImportError of a Ctrl-C during onnxruntime's
                raise  # import: the graph is good
            if not stamped_newer:
                say(f"note: {cached}: damaged ({type(err).__name__}); made again")
            cached.unlink(missing_ok=True)
    data = make()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(cached, lambda tmp: tmp.write_bytes(data))
    except OSError:
        pass  # a read-only home only costs making it again next time
    with too_new_said(what, otherwise):
        return load(data)


def _graph_damaged(err: Exception) -> bool:
    """Whether `err`, raised by onnxruntime loading a graph, says that its bytes are bad: onnxruntime's own
    errors (InvalidProtobuf, InvalidArgument, InvalidGraph, Fail, ...; not EPFail, a provider that failed) and
    the UnicodeDecodeError of its error message about some damaged bytes."""
    ours = type(err).__module__.startswith("onnxruntime") and type(err).__name__ != "EPFail"
    return ours or isinstance(err, UnicodeDecodeError)


def _mobilenet_onnx(path: Path, sha256: str, load):
    """NormalisedTrunk as ONNX, exported once per weights file.

    On CPU, onnxruntime runs MobileNetV2's depthwise convolutions about 5-10x faster than torch."""
    import io
    import warnings

    def export() -> bytes:
        trunk = NormalisedTrunk(mobilenet_trunk(path)).eval()
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(trunk, torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE), buffer, input_names=["images"],
                              output_names=["features"],
                              dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                            "features": {0: "batch", 2: "rows", 3: "columns"}},
                              opset_version=17, dynamo=False)
        return buffer.getvalue()

    return _cached_onnx(f"mobilenet_v2_features-{sha256[:16]}-v3.onnx", export, load,
                        f"{path} as torch {torch.__version__} exports it", "a torch as old as this onnxruntime")


def _yolox_onnx(path: Path, sha256: str, with_neck: bool, load):
    """The YOLOX graph made batched (with its neck maps as outputs), rewritten once per weights file:
    later runs skip importing onnx and parsing the graph (about 0.8 s of each extract's start)."""
    outputs = "neck" if with_neck else "head"
    return _cached_onnx(f"yolox-{sha256[:16]}-{outputs}-v1.onnx", lambda: batched_onnx(path, with_neck), load,
                        str(path), EXPORT_OLDER)


def _fit(height: int, width: int, size: int) -> tuple[int, int, float]:
    """Resized height and width with the longer side `size`, and the scale."""
    scale = min(size / height, size / width)
    return max(1, round(height * scale)), max(1, round(width * scale)), scale


def canvas_shape(height: int, width: int, size: int = INPUT_SIZE) -> tuple[int, int]:
    """The letterbox canvas of a frame: the resized frame's sides rounded up to the largest stride."""
    nh, nw, _ = _fit(height, width, size)
    stride = STRIDES[-1]
    return -(-nh // stride) * stride, -(-nw // stride) * stride


def letterbox(frame: np.ndarray, size: int = INPUT_SIZE, out: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Resize keeping aspect so the longer side is `size`, pad bottom/right with 114 up to the next
    multiple of the largest stride (a 4:3 frame gets a 416x320 canvas, not 416x416).

    frame: (H, W, 3) uint8 RGB. Returns (3, Hc, Wc) float32 BGR 0-255, written into `out` when given
    (a slot of a batch), and the scale used.
    """
    h, w = frame.shape[:2]
    nh, nw, scale = _fit(h, w, size)
    bgr = np.asarray(frame[..., ::-1], dtype=np.float32)  # the flip comes free with the float copy
    image = torch.from_numpy(bgr).permute(2, 0, 1)[None]  # (1, 3, H, W)
    if (nh, nw) != (h, w):
        image = F.interpolate(image, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)  # (1, 3, nh, nw)
    if out is None:
        out = torch.empty((3, *canvas_shape(h, w, size)))  # (3, Hc, Wc)
    out[:, nh:] = PAD_VALUE
    out[:, :nh, nw:] = PAD_VALUE
    out[:, :nh, :nw] = image[0].clamp_(0, 255)
    return out, scale


def _grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell offsets (A, 2) and strides (A, 1) in the order of YOLOX's concatenated head outputs."""
    grids, strides = [], []
    for stride in STRIDES:
        ny, nx = height // stride, width // stride
        ys, xs = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")  # (ny, nx) each
        grids.append(torch.stack((xs, ys), -1).reshape(-1, 2))  # (ny*nx, 2) cell x, y
        strides.append(torch.full((ny * nx, 1), stride))  # (ny*nx, 1)
    return torch.cat(grids).float(), torch.cat(strides).float()


def decode_yolox(raw: torch.Tensor, grid: torch.Tensor, strides: torch.Tensor):
    """raw (A, 85) head output -> boxes (A, 4) xyxy in letterbox pixels, scores (A,), labels (A,)."""
    xy = (raw[:, :2] + grid) * strides  # (A, 2) box centres
    wh = torch.exp(raw[:, 2:4].clamp(max=10.0)) * strides  # (A, 2) widths, heights
    boxes = torch.cat((xy - wh / 2, xy + wh / 2), dim=1)  # (A, 4)
    class_scores, labels = raw[:, 5:].max(dim=1)  # (A,) best of the 80 classes
    return boxes, raw[:, 4] * class_scores, labels  # score = objectness x class probability


@contextlib.contextmanager
def _torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class YoloxDetector:
    """Detector protocol implementation for the offline YOLOX-Nano + MobileNetV2 pair."""

    name = "yolox"
    max_side = INPUT_SIZE

    def __init__(self, config: YoloxConfig | None = None, models: str | None = None, spec: DetectorSpec | None = None):
        """The networks of `spec` (choice.load_detector), or of the files found in `models` for config.backbone."""
        self.config = config or YoloxConfig()
        self.spec = spec or yolox_spec(self.config.backbone, models)
        self.feature_dim = self.spec.feature_dim
        self.use_mobilenet = self.spec.backbone_file is not None
        self.use_neck = "neck" in self.spec.backbone
        self.device = torch.device(self.config.device)
        runtime = self.config.runtime
        self.runtime = runtime if runtime != "auto" else ("torch" if self.device.type == "cuda" else "onnxruntime")
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.session = self.trunk_session = self.graph = self.trunk = None
        if self.runtime == "torch":
            self._load_torch()
        else:
            self._load_onnxruntime()
        self.grids: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # see autotuned_rows; without autotuning a new shape costs nothing and rounding only adds rows
        self.round_batches = self.graph is not None and self.device.type == "cuda" and self.config.autotune

    def _load_torch(self) -> None:
        from vlpcache.extract.detectors.yolox_torch import yolox_torch_module

        self.graph = yolox_torch_module(self.spec.detector_file, with_neck=self.use_neck).to(self.device)
        if self.use_mobilenet:
            self.trunk = NormalisedTrunk(mobilenet_trunk(self.spec.backbone_file)).eval().to(self.device)
        set_autotune(self.device, self.config.autotune)

    def _load_onnxruntime(self) -> None:
        device, threads = self.config.device, self.config.threads or quota_threads()
        autotune = self.config.autotune
        def session(graph: bytes):
            return _onnx_session(graph, device, threads, autotune)

        self.session = _yolox_onnx(self.spec.detector_file, self.spec.provenance["detector_weights_sha256"],
                                   self.use_neck, session)
        if self.use_mobilenet:
            self.trunk_session = _mobilenet_onnx(self.spec.backbone_file, self.spec.provenance["backbone_weights_sha256"],
                                                 session)

    def _autocast(self):
        if self.device.type != "cuda" or not self.config.autocast:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=getattr(torch, self.config.autocast))

    def _run_yolox(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """images (B, 3, Hc, Wc) BGR 0-255 on self.device -> head output (B, A, 85), neck maps."""
        if self.graph is not None:
            with self._autocast():
                outputs = self.graph(images)
            return outputs[0].float(), [o.float() for o in outputs[1:]]
        outputs = self.session.run(None, {"images": images.cpu().numpy()})
        return torch.from_numpy(outputs[0]).to(self.device), [torch.from_numpy(o).to(self.device) for o in outputs[1:]]

    def _run_trunk(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, Hc, Wc) BGR 0-255 -> MobileNetV2 map (B, 1280, Hc/32, Wc/32)."""
        if self.trunk is not None:
            with self._autocast():
                return self.trunk(images).float()
        return torch.from_numpy(self.trunk_session.run(None, {"images": images.cpu().numpy()})[0]).to(self.device)

    @torch.inference_mode()
    def detect(self, frames: list[np.ndarray], max_detections: int) -> list[FrameRegions]:
        canvases: dict[tuple[int, int], list[int]] = {}  # frames of one canvas shape run as one batch
        for i, frame in enumerate(frames):
            canvases.setdefault(canvas_shape(*frame.shape[:2]), []).append(i)
        results: list[FrameRegions | None] = [None] * len(frames)
        with self._glue_threads():
            for canvas, indices in canvases.items():
                for i, regions in zip(indices, self._detect_canvas(canvas, [frames[i] for i in indices], max_detections)):
                    results[i] = regions
        return results

    def _glue_threads(self):
        """With onnxruntime doing the heavy work, torch's small glue ops run on one thread: a second
        torch thread pool only fights onnxruntime's for the same cores (32 frames: 29.5 -> 23.6 ms each)."""
        if self.session is None or self.config.threads:
            return contextlib.nullcontext()
        return _torch_threads(1)

    def _detect_canvas(self, canvas, frames, max_detections: int) -> list[FrameRegions]:
        # pinned host memory lets the copy to the GPU overlap with queued GPU work
        rows = autotuned_rows(len(frames)) if self.round_batches else len(frames)
        images = torch.empty((rows, 3, *canvas), pin_memory=self.device.type == "cuda")  # (B', 3, Hc, Wc) BGR 0-255
        images[len(frames):] = 0
        scales = [letterbox(frame, out=slot)[1] for frame, slot in zip(frames, images)]
        images = images.to(self.device, non_blocking=True)
        raw, neck_maps = self._run_yolox(images)  # (B, A, 85), [(B, C_l, Hc/s_l, Wc/s_l) per stride s_l]
        if canvas not in self.grids:
            self.grids[canvas] = tuple(t.to(self.device) for t in _grid(*canvas))
        grid, strides = self.grids[canvas]

        rois, kept = [], []
        for b, frame in enumerate(frames):
            h, w = frame.shape[:2]
            boxes, scores, labels = decode_yolox(raw[b], grid, strides)  # (A, 4), (A,), (A,)
            keep = select_detections(boxes, scores, labels, self.config.score_threshold, self.config.nms_iou, max_detections)
            visible = torch.tensor([0.0, 0.0, w * scales[b], h * scales[b]], device=self.device)  # frame in the letterbox
            boxes = torch.minimum(boxes[keep].clamp_min(0), visible[[2, 3, 2, 3]])  # (n, 4) clipped to the frame
            boxes = torch.cat((visible[None], boxes))  # whole frame first, (1 + n, 4) letterbox pixels
            rois.append(torch.cat((torch.full((len(boxes), 1), float(b), device=self.device), boxes), dim=1))  # (1 + n, 5)
            kept.append((boxes.cpu(), scores[keep].cpu(), labels[keep].cpu(), scales[b], (h, w)))
        rois = torch.cat(rois)  # (R, 5): batch index, x1, y1, x2, y2
        frame_rows = torch.cumsum(torch.tensor([0] + [len(k[0]) for k in kept[:-1]]), 0)  # whole-frame roi of each frame
        frame_sizes = [(h * scale, w * scale) for (_, _, _, scale, (h, w)) in kept]  # frame size in letterbox pixels

        features = []
        if self.use_mobilenet:
            features.append(self._pool(self._run_trunk(images), rois, 32, frame_rows, frame_sizes))
        if self.use_neck:
            for level, stride in zip(neck_maps, STRIDES):
                features.append(self._pool(level, rois, stride, frame_rows, frame_sizes))
        features = torch.cat(features, dim=1).float().cpu().numpy()  # (R, D)

        results, start = [], 0
        for boxes, scores, labels, scale, (h, w) in kept:
            n = len(boxes)
            normalised = (boxes[1:] / scale / torch.tensor([w, h, w, h])).clamp_(0, 1).numpy()  # (n, 4) in [0, 1]
            all_boxes, all_scores, all_labels = with_frame_region(normalised, scores.numpy(), labels.numpy())
            results.append(FrameRegions(all_boxes, all_scores, all_labels, features[start : start + n]))
            start += n
        return results

    def _pool(self, feature_map: torch.Tensor, rois: torch.Tensor, stride: int, frame_rows: torch.Tensor,
              frame_sizes: list[tuple[float, float]]) -> torch.Tensor:
        """Region features (R, C): detected boxes by RoIAlign, each frame's whole-frame region by
        frame_average (what a global-feature model reads, not a 2x2 sampling of it)."""
        feature_map = feature_map.float()  # (B, C, Hc/stride, Wc/stride)
        pooled = roi_align(feature_map, rois.to(feature_map.device), ROI_OUTPUT, spatial_scale=1 / stride,
                           sampling_ratio=2, aligned=True).mean(dim=(2, 3))  # (R, C)
        pooled[frame_rows.to(pooled.device)] = torch.stack(
            [frame_average(feature_map[b], height, width, stride) for b, (height, width) in enumerate(frame_sizes)])  # (B, C)
        return pooled


def autotuned_rows(frames: int) -> int:
    """Rows of a CUDA batch of `frames` frames of one canvas: the next power of two, the rows past the
    frames left black and never read.

    cuDNN's autotuning (on for CUDA unless extract --no-autotune) times every algorithm of every
    convolution once per new input shape, in each process: 5-7 s per shape on an H200. A batch of mixed
    aspect ratios splits into one call per canvas, so at the CUDA default of 128 frames any count from 1
    to 128 could come up per canvas: up to 128 shapes each, and each new one paid for again. Rounded up,
    there are at most 8 per canvas for a wasted share of under half of a partial call, on a device where
    a batch twice as large costs far less than twice."""
    return 1 << max(0, frames - 1).bit_length()


def frame_average(feature_map: torch.Tensor, height: float, width: float, stride: int) -> torch.Tensor:
    """(C, Hm, Wm) map of a letterbox canvas -> (C,) mean over the cells that show the frame
    (height x width letterbox pixels at the top left; the padding's cells are left out)."""
    rows = max(1, min(feature_map.shape[1], math.ceil(height / stride - 1e-3)))
    columns = max(1, min(feature_map.shape[2], math.ceil(width / stride - 1e-3)))
    return feature_map[:, :rows, :columns].mean(dim=(1, 2))
