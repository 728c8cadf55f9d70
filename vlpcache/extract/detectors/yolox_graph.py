"""The YOLOX-Nano ONNX graph as both runtimes read it (onnxruntime on CPU, onnx2torch on CUDA); no torch."""

from __future__ import annotations

from pathlib import Path

NECK_OUTPUTS = (  # inputs of the head's stem convolutions: the neck maps at strides 8, 16, 32
    "/backbone/C3_p3/conv3/act/Mul_output_0",
    "/backbone/C3_n3/conv3/act/Mul_output_0",
    "/backbone/C3_n4/conv3/act/Mul_output_0",
)


def batched_onnx(path: Path, with_neck: bool) -> bytes:
    """The exported graph declares (1, 3, 416, 416); its reshapes follow the input's shape, so symbolic
    batch, height and width give batched inference on canvases that fit the frame (less padding to
    compute), and the neck maps become extra outputs for RoI pooling."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    for value, names in ((graph.input[0], ("batch", None, "height", "width")), (graph.output[0], ("batch", "anchors"))):
        for dim, name in zip(value.type.tensor_type.shape.dim, names):
            if name:
                dim.dim_param = name
    if with_neck:
        for name in NECK_OUTPUTS:
            graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()
