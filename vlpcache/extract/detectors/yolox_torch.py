"""The YOLOX ONNX graph as a torch module (onnx2torch), for the GPU path of the `yolox` detector.

On CUDA this keeps the whole detector in torch: letterboxed frames stay on the device, the head runs
under autocast, and the neck maps feed RoIAlign without a host round trip; it needs no
onnxruntime-gpu build matched to the CUDA version. On CPU onnxruntime is several times faster (its
fused Conv+SiLU kernels), so the CPU path keeps onnxruntime.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from vlpcache.errors import UserError
from vlpcache.extract.detectors.yolox_graph import batched_onnx


class YoloxTorch(torch.nn.Module):
    """images (B, 3, 416, 416) float BGR 0-255 -> (head output (B, A, 85), *neck maps)."""

    def __init__(self, graph: torch.nn.Module):
        super().__init__()
        self.graph = graph

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with warnings.catch_warnings():  # onnx2torch's Slice indexes with a list: deprecated, still exact
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
            outputs = self.graph(images)
        return tuple(outputs) if isinstance(outputs, (list, tuple)) else (outputs,)


def yolox_torch_module(onnx_path: str | Path, with_neck: bool = False) -> YoloxTorch:
    """The batched YOLOX graph (plus the three neck maps when `with_neck`) converted to torch, eval mode."""
    try:
        from onnx2torch import convert
    except ImportError:
        raise UserError("the yolox detector on CUDA needs onnx2torch: pip install onnx2torch "
                        "(or use --device cpu)") from None
    import onnx

    model = onnx.load_from_string(batched_onnx(Path(onnx_path), with_neck))
    try:
        graph = convert(model)
    except Exception as err:  # an ONNX op onnx2torch cannot convert: name the file, not the converter internals
        raise UserError(f"{onnx_path}: cannot convert to torch with onnx2torch ({type(err).__name__}: {err}); "
                        "use --device cpu") from None
    return YoloxTorch(graph).eval()
