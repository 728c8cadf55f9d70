"""The YOLOX-Nano ONNX graph as both runtimes read it (onnxruntime on CPU, onnx2torch on CUDA), and the
check that a file is such a graph; no torch."""

from __future__ import annotations

from pathlib import Path

from vlpcache.errors import UserError
from vlpcache.onnx_versions import graph_too_new
from vlpcache.workspace import replace_command

INPUT_NAME, OUTPUT_NAME = "images", "output"  # the names YOLOX's export gives them
PREDICTION_COLUMNS = 85  # x, y, w, h, objectness and 80 COCO class scores per anchor cell
NECK_CHANNELS = (64, 128, 256)  # YOLOX-Nano's neck maps at strides 8, 16, 32
# the other way out for a user's graph stamped newer than the installed onnxruntime reads (not `models fetch`:
# that would swap the user's model for YOLOX's release)
EXPORT_OLDER = "export it again with an older IR version and opset"


def neck_outputs(graph) -> list[str]:
    """The neck maps at strides 8, 16, 32: the inputs of the head's stem convolutions, found by the
    graph's shape, not by tensor names (which depend on the exporter: YOLOX's own release was made
    with PyTorch 1.7, whose names are numbers).

    Each level of the head ends in Concat(reg_pred, Sigmoid(obj_pred), Sigmoid(cls_pred)); the cls and
    reg branches part at the stem's output, and the stem convolution reads the neck map."""
    producer = {out: node for node in graph.node for out in node.output}

    def upstream(tensor: str) -> list[str]:  # the tensor and those it is computed from, through data inputs
        chain = [tensor]
        while chain[-1] in producer and producer[chain[-1]].input:
            chain.append(producer[chain[-1]].input[0])
        return chain

    def is_level(node) -> bool:
        kinds = [producer[t].op_type if t in producer else None for t in node.input]
        return node.op_type == "Concat" and kinds == ["Conv", "Sigmoid", "Sigmoid"]

    necks = []
    for level in filter(is_level, graph.node):  # nodes are in topological order: strides 8, 16, 32
        cls_branch = set(upstream(level.input[2]))
        stem = next((t for t in upstream(level.input[0]) if t in cls_branch), None)
        while stem in producer and producer[stem].op_type != "Conv":
            stem = producer[stem].input[0]
        if stem not in producer:
            break
        necks.append(producer[stem].input[0])
    if len(necks) != len(NECK_CHANNELS):
        raise ValueError(f"expected the {len(NECK_CHANNELS)} levels of a YOLOX head, found {len(necks)}")
    return necks


def check_inputs_outputs(graph) -> None:
    """ValueError unless the graph reads one input `images` and gives one output `output`, as YOLOX's export."""
    names = ([i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}], [o.name for o in graph.output])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise ValueError(f"inputs/outputs {names}, expected ([{INPUT_NAME!r}], [{OUTPUT_NAME!r}])")


def batched_onnx(path: Path, with_neck: bool) -> bytes:
    """The exported graph declares (1, 3, 416, 416); its reshapes follow the input's shape, so symbolic
    batch, height and width give batched inference on canvases that fit the frame (less padding to
    compute), and the neck maps become extra outputs for RoI pooling."""
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as err:  # truncated or not ONNX at all
        raise UserError(f"{path}: not an ONNX file ({type(err).__name__}); {replace_command(path)}") from None
    graph = model.graph
    try:
        check_inputs_outputs(graph)
        necks = neck_outputs(graph) if with_neck else []
    except ValueError as err:  # an empty file (a touch, a failed copy) parses as an empty graph; another model's
        raise UserError(f"{path}: not YOLOX-Nano's graph ({err}); {replace_command(path)}") from None
    for value, names in ((graph.input[0], ("batch", None, "height", "width")), (graph.output[0], ("batch", "anchors"))):
        for dim, name in zip(value.type.tensor_type.shape.dim, names):
            if name:
                dim.dim_param = name
    for name in necks:
        graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def check_yolox_graph(path: Path) -> None:
    """Raise ValueError unless `path` is a YOLOX-Nano graph as vlpcache runs it: input `images`, output
    `output` with 85 columns, batched on a canvas of another size with its three neck maps. GraphTooNew (no
    ValueError: the file is not damaged) when the installed onnxruntime cannot read its IR version or opset."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    try:
        graph = onnx.load(str(path)).graph
    except Exception as err:  # truncated or not ONNX at all
        raise ValueError(f"not an ONNX file ({type(err).__name__})") from None
    check_inputs_outputs(graph)
    canvas = np.zeros((2, 3, 64, 96), np.float32)  # batch 2, not square, not 416: what extraction feeds it
    try:
        session = ort.InferenceSession(batched_onnx(path, with_neck=True), providers=["CPUExecutionProvider"])
        outputs = session.run(None, {INPUT_NAME: canvas})
    except Exception as err:  # fixed reshapes, a head of another shape: not a graph extraction can batch
        if (too_new := graph_too_new(str(path), err, EXPORT_OLDER)) is not None:
            raise too_new from None
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(f"does not run on a batch of 2 canvases of 64x96 ({first})") from None
    cells = sum((64 // s) * (96 // s) for s in (8, 16, 32))
    expected = [(2, cells, PREDICTION_COLUMNS)] + [(2, c, 64 // s, 96 // s) for c, s in zip(NECK_CHANNELS, (8, 16, 32))]
    shapes = [tuple(o.shape) for o in outputs]
    if shapes != expected:
        raise ValueError(f"output shapes {shapes} on a (2, 3, 64, 96) canvas, expected {expected}")
