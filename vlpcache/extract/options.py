"""What `vlpcache extract` can be told, with its defaults: the command line shows them from here and
run_extract takes them as an ExtractOptions record. No torch, no h5py."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from vlpcache.cache.schema import SHARD_ITEMS
from vlpcache.devices import DEFAULT_DEVICE, usable_cores
from vlpcache.errors import UserError
from vlpcache.extract.detectors.spec import default_regions, default_score_threshold

CPU_BATCH_SIZE = 8  # frames per detector batch on CPU: bigger batches only add memory traffic
CUDA_BATCH_SIZE = 128
DECODE_TIMEOUT_S = 600  # one item's decoding may take this long: a hostile file can send a decoder into a loop
ENGINES = ("local", "ray")  # where the stages run: this machine's processes, or a Ray cluster (ray_engine.py)


@dataclass
class ExtractOptions:
    frames: int = 8  # T: frames sampled per item, at the centres of T equal segments
    regions: int | None = None  # detections kept per frame (None: spec.default_regions); N = regions + 1 (whole frame)
    detector: str = "yolox"  # spec.DETECTORS
    backbone: str | None = None  # None: the detector's default (spec.DEFAULT_YOLOX_BACKBONE, DEFAULT_FRCNN_ARCH)
    weights: str | None = None  # frcnn: a state dict file instead of torchvision's COCO weights; vg: the checkpoint
    models: str | None = None  # folder of offline weights (None: workspace.models_dir's rule)
    scale: str | None = None  # frcnn, vg: "SHORT/LONG" input size (None: the detector's, 600/1000)
    proposals: int | None = None  # frcnn, vg: RPN proposals per frame (None: the detector's, 300)
    device: str = DEFAULT_DEVICE
    batch_size: int | None = None  # frames per detector batch (None: CPU_BATCH_SIZE or CUDA_BATCH_SIZE)
    autotune: bool = True  # CUDA: cuDNN times each convolution's algorithms once per new input shape
    workers: int | None = None  # decoding processes (None: CPU cores - 1, at least 1)
    decode_timeout: float = DECODE_TIMEOUT_S  # seconds one item's decoding may take (0: no limit)
    frame_folders: bool = True  # a folder of images only is one item, a video's frames (else each image is one)
    shard: str = "0/1"  # i/n: process only the i-th of n parts of the items
    retry_failed: bool = False  # retry items recorded as failed in an earlier run
    prune: bool = False  # drop the cached items under the roots that are no longer there (and their failures)
    items_per_shard: int = SHARD_ITEMS
    score_threshold: float | None = None  # None: spec.default_score_threshold
    engine: str = "local"  # ENGINES
    ray_address: str | None = None  # --engine ray: the cluster to join (None: $RAY_ADDRESS, else a local instance)
    quiet: bool = False  # no progress bar or per-item lines; the summary only

    def with_detector_defaults(self) -> "ExtractOptions":
        """These options with the detector's defaults for what the command line left out."""
        regions = self.regions if self.regions is not None else default_regions(self.detector)
        threshold = self.score_threshold if self.score_threshold is not None else default_score_threshold(self.detector)
        return replace(self, regions=regions, score_threshold=threshold)

    def input_scale(self) -> tuple[int, int] | None:
        """(shorter side, longest side) of --scale SHORT/LONG, or one clear error."""
        if self.scale is None:
            return None
        try:
            short, long = (int(x) for x in self.scale.split("/"))
        except ValueError:
            raise UserError(f"--scale {self.scale!r}: expected SHORT/LONG in pixels, e.g. 600/1000") from None
        if not 32 <= short <= long:
            raise UserError(f"--scale {self.scale!r}: need 32 <= SHORT <= LONG")
        return short, long

    def detector_batch_size(self, device_type: str) -> int:
        return self.batch_size or (CUDA_BATCH_SIZE if device_type == "cuda" else CPU_BATCH_SIZE)

    def worker_count(self) -> int:
        return max(1, usable_cores() - 1) if self.workers is None else self.workers

    def decode_time_limit(self) -> float | None:
        """--decode-timeout in seconds, None for no limit (0 or inf), or one clear error."""
        if not self.decode_timeout >= 0:  # click's range lets nan through
            raise UserError(f"--decode-timeout {self.decode_timeout}: give the seconds one item's decoding may take, "
                            "or 0 for no limit")
        return self.decode_timeout if 0 < self.decode_timeout < math.inf else None

    def shard_set(self) -> str:
        """The writer identity of --shard i/n, `s{i}of{n}`: its shard and failure files start with it."""
        return "s{}of{}".format(*self.shard_part())

    def description(self) -> str:
        """The progress bar's label."""
        index, count = self.shard_part()
        return f"extract {index}/{count}" if count > 1 else "extract"

    def shard_part(self) -> tuple[int, int]:
        """(i, n) of --shard i/n, or one clear error."""
        try:
            index, count = (int(x) for x in self.shard.split("/"))
        except ValueError:
            raise UserError(f"--shard {self.shard!r}: expected i/n, e.g. 0/4") from None
        if not (count >= 1 and 0 <= index < count):
            raise UserError(f"--shard {self.shard!r}: need 0 <= i < n")
        return index, count
