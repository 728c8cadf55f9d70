"""The YOLOX ONNX graph converted to torch gives onnxruntime's outputs on a real frame."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from vlpcache.extract.detectors.spec import YOLOX_FILE
from vlpcache.extract.detectors.yolox import letterbox
from vlpcache.extract.detectors.yolox_graph import batched_onnx

from vlpcache.extract.detectors.yolox_torch import yolox_torch_module


@pytest.fixture(scope="module")
def yolox_path(models_dir):
    return models_dir / YOLOX_FILE


@pytest.fixture(scope="module")
def images(msrvtt_dir) -> torch.Tensor:
    paths = sorted((msrvtt_dir / "frames" / "val").glob("*/*.jpg"))[:2]
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    return torch.stack([letterbox(f)[0] for f in frames])  # (2, 3, Hc, Wc) BGR 0-255, a 4:3 canvas


def test_torch_module_matches_onnxruntime_with_neck_maps_on_real_frames(yolox_path, images):
    session = ort.InferenceSession(batched_onnx(yolox_path, with_neck=True), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"images": images.numpy()})
    with torch.inference_mode():
        outputs = yolox_torch_module(yolox_path, with_neck=True)(images)
    assert [tuple(o.shape) for o in outputs] == [e.shape for e in expected]
    for output, reference in zip(outputs, expected):
        np.testing.assert_allclose(output.numpy(), reference, rtol=1e-3, atol=1e-3)
