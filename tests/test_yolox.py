"""The offline `yolox` detector on real frames: decoding, letterbox inverse, regions and features."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vlpcache.errors import UserError
from vlpcache.extract.detectors.regions import pack_frame_regions
from vlpcache.extract.detectors.yolox import INPUT_SIZE, YoloxConfig, YoloxDetector, decode_yolox, letterbox
from waiting import HANG_GUARD_S


@pytest.fixture(scope="module")
def detector(models_dir):
    return YoloxDetector(YoloxConfig(backbone="mobilenet_v2+neck"), models=str(models_dir))


@pytest.fixture(scope="module")
def people_frame(msrvtt_dir):
    # a val frame with three clearly visible people (checked by eye with `vlpcache inspect --render`)
    folder = msrvtt_dir / "frames" / "val" / "video6513"
    return np.asarray(Image.open(sorted(folder.iterdir())[0]).convert("RGB"))


def test_letterbox_keeps_aspect_and_pads_bottom_right_with_114_to_a_stride_multiple():
    frame = np.full((100, 200, 3), 7, np.uint8)
    image, scale = letterbox(frame)
    assert image.shape == (3, 224, INPUT_SIZE) and scale == INPUT_SIZE / 200
    # the resized part within a float32 step of 7: on one thread torch's bilinear kernel rounds otherwise (7 +- 1e-6)
    torch.testing.assert_close(image[:, :208, :], torch.full((3, 208, INPUT_SIZE), 7.0), rtol=0, atol=1e-5)
    assert torch.all(image[:, 208:, :] == 114)


def test_decode_places_a_centred_cell_box_at_its_grid_position():
    raw = torch.zeros(52 * 52 + 26 * 26 + 13 * 13, 85)
    raw[:, 4] = 1.0
    raw[:, 5] = 0.5  # class 0 score
    from vlpcache.extract.detectors.yolox import _grid

    grid, strides = _grid(INPUT_SIZE, INPUT_SIZE)
    boxes, scores, labels = decode_yolox(raw, grid, strides)
    # cell (x=3, y=2) at stride 8: centre (3*8, 2*8), exp(0)*8 = 8 wide
    np.testing.assert_allclose(boxes[2 * 52 + 3].numpy(), [20, 12, 28, 20])
    assert scores[0] == 0.5 and labels[0] == 0


def test_people_are_found_with_the_whole_frame_region_first(detector, people_frame):
    (regions,) = detector.detect([people_frame], max_detections=30)
    assert regions.labels[0] == -1 and np.allclose(regions.boxes[0], [0, 0, 1, 1])
    assert list(regions.labels[1:4]) == [0, 0, 0]  # three people, best first
    assert np.all(regions.scores[1:4] > 0.5) and np.all(np.diff(regions.scores[1:]) <= 0)
    assert regions.features.shape == (len(regions.labels), 1280 + 448)
    assert np.all((regions.boxes >= 0) & (regions.boxes <= 1))


def test_whole_frame_feature_is_the_mean_of_each_map_over_the_visible_frame(detector, people_frame):
    (regions,) = detector.detect([people_frame], max_detections=30)
    image, scale = letterbox(people_frame)  # 240x320 -> 312x416 frame on a 320x416 canvas
    h, w = people_frame.shape[0] * scale, people_frame.shape[1] * scale
    with torch.inference_mode():
        trunk = detector._run_trunk(image[None])[0]  # (1280, 10, 13)
        _, necks = detector._run_yolox(image[None])
    # cells that show the frame: ceil(312 / stride) rows, every column; the padding's cells are left out
    # (at stride 8 the map has 40 rows, of which the 40th shows only padding)
    expected = [trunk[:, : -(-int(h) // 32), : -(-int(w) // 32)].mean((1, 2))]
    expected += [m[0, :, : -(-int(h) // s), : -(-int(w) // s)].mean((1, 2)) for m, s in zip(necks, (8, 16, 32))]
    np.testing.assert_allclose(regions.features[0], torch.cat(expected).numpy(), rtol=1e-4, atol=1e-5)
    assert necks[0].shape[2] == 40 and -(-int(h) // 8) == 39


def test_boxes_are_normalised_to_the_given_frame_whatever_its_resolution(detector, people_frame):
    small = detector.detect([people_frame], 30)[0]
    big = np.asarray(Image.fromarray(people_frame).resize((640, 480), Image.BILINEAR))
    large = detector.detect([big], 30)[0]
    np.testing.assert_allclose(small.boxes[1:4], large.boxes[1:4], atol=0.02)


def test_boxes_follow_the_people_when_the_frame_is_mirrored_or_placed_on_a_larger_canvas(detector, people_frame):
    h, w, _ = people_frame.shape
    people = detector.detect([people_frame], 30)[0].boxes[1:4]  # x1, y1, x2, y2 of the three people
    mirrored = people_frame[:, ::-1].copy()
    taller = np.zeros((2 * h, w, 3), np.uint8)  # the frame in the top half of a black canvas
    taller[:h] = people_frame
    wider = np.zeros((h, 2 * w, 3), np.uint8)  # the frame in the right half
    wider[:, w:] = people_frame
    found = [regions.boxes[1:] for regions in detector.detect([mirrored, taller, wider], 30)]
    for x1, y1, x2, y2 in people:
        expected = ([1 - x2, y1, 1 - x1, y2], [x1, y1 / 2, x2, y2 / 2], [0.5 + x1 / 2, y1, 0.5 + x2 / 2, y2])
        for boxes, box in zip(found, expected):
            assert np.abs(boxes - box).max(1).min() < 0.03, (box, boxes[:5])


def test_batched_detection_equals_one_frame_at_a_time(detector, people_frame):
    other = people_frame[::-1].copy()
    portrait = people_frame.transpose(1, 0, 2).copy()  # another canvas shape in the same batch
    batched = detector.detect([people_frame, portrait, other], 30)
    alone = [detector.detect([f], 30)[0] for f in (people_frame, portrait, other)]
    for b, a in zip(batched, alone):
        np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-4)
        np.testing.assert_allclose(b.features, a.features, atol=1e-3, rtol=1e-3)


def test_max_detections_bounds_regions_and_packing_pads_with_masked_zeros(detector, people_frame):
    (regions,) = detector.detect([people_frame], max_detections=2)
    assert len(regions.labels) == 3
    packed = pack_frame_regions(regions, 6)
    assert packed["region_mask"].tolist() == [True] * 3 + [False] * 3
    assert np.all(packed["features"][3:] == 0) and np.all(packed["boxes"][3:] == 0)


def test_tiny_and_blank_frames_give_only_the_whole_frame(detector):
    results = detector.detect([np.zeros((1, 1, 3), np.uint8), np.full((50, 900, 3), 255, np.uint8)], 30)
    for regions in results:
        assert regions.labels.tolist() == [-1] and regions.boxes.tolist() == [[0, 0, 1, 1]]  # the whole frame alone
        assert regions.features.shape == (1, 1280 + 448) and np.isfinite(regions.features).all()


def test_missing_weights_file_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(UserError, match="yolox_nano_coco.onnx not found in .*--models DIR or set VLPCACHE_MODELS"):
        YoloxDetector(YoloxConfig(), models=str(tmp_path))


def test_torch_runtime_of_the_gpu_path_matches_onnxruntime_on_cpu(detector, people_frame, models_dir):
    torch_detector = YoloxDetector(YoloxConfig(backbone="mobilenet_v2+neck", runtime="torch"), models=str(models_dir))
    assert torch_detector.runtime == "torch" and detector.runtime == "onnxruntime"
    for ours, reference in zip(torch_detector.detect([people_frame], 30), detector.detect([people_frame], 30)):
        np.testing.assert_array_equal(ours.labels, reference.labels)
        np.testing.assert_allclose(ours.boxes, reference.boxes, atol=1e-3)
        np.testing.assert_allclose(ours.features, reference.features, atol=2e-2, rtol=2e-2)


def test_cuda_batches_rounded_up_for_autotuning_give_the_same_regions(people_frame, models_dir):
    # on CUDA each canvas's call is rounded up to a power of two rows, so cuDNN autotunes a few shapes
    # instead of every count up to the batch size; the padding rows must change nothing
    detector = YoloxDetector(YoloxConfig(backbone="mobilenet_v2+neck", runtime="torch"), models=str(models_dir))
    frames = [people_frame, people_frame[:, ::-1].copy(), people_frame[::2].copy(), people_frame // 2 + 60]
    assert not detector.round_batches  # CPU: exact batch sizes
    exact = detector.detect(frames, 30)
    seen = []
    graph = detector.graph
    detector.graph = lambda images: (seen.append(images.shape[0]), graph(images))[1]
    detector.round_batches = True
    rounded = detector.detect(frames, 30)
    assert sorted(seen) == [1, 4]  # canvases of 3 frames and of 1 frame: 3 rows rounded up to 4
    for ours, reference in zip(rounded, exact):
        np.testing.assert_array_equal(ours.labels, reference.labels)
        np.testing.assert_allclose(ours.boxes, reference.boxes, atol=1e-5)
        np.testing.assert_allclose(ours.features, reference.features, atol=1e-4, rtol=1e-4)


def test_the_torch_runtime_tells_cudnn_its_autotune_setting(models_dir, monkeypatch):
    # extract --no-autotune: yolox's torch runtime (CUDA's) passes the setting on, not only ever 'on'
    from vlpcache.extract.detectors import yolox

    told, set_autotune = [], yolox.set_autotune
    monkeypatch.setattr(yolox, "set_autotune", lambda device, autotune: (told.append((device.type, autotune)),
                                                                         set_autotune(device, autotune)))
    YoloxDetector(YoloxConfig(runtime="torch", autotune=False), models=str(models_dir))
    assert told == [("cpu", False)]


def test_onnxruntimes_cuda_provider_is_told_the_autotune_setting(monkeypatch):
    # onnxruntime-gpu (not installed here): cuDNN's exhaustive search is its default, heuristic without autotuning
    import onnxruntime as ort

    from vlpcache.extract.detectors import yolox

    asked = []
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", lambda model, sess_options, providers: asked.append(providers))
    for autotune in (True, False):
        yolox._onnx_session(b"", "cuda", 0, autotune)
    yolox._onnx_session(b"", "cpu", 0, False)
    assert asked == [[("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"}), "CPUExecutionProvider"],
                     [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}), "CPUExecutionProvider"],
                     ["CPUExecutionProvider"]]


def test_the_choice_made_before_loading_describes_the_loaded_detector(detector, models_dir):
    from vlpcache.extract.detectors.choice import choose_detector

    choice = choose_detector("yolox", "mobilenet_v2+neck", None, str(models_dir))
    assert choice.provenance == detector.spec.provenance
    assert (choice.feature_dim, choice.max_side) == (detector.feature_dim, detector.max_side)
    with pytest.raises(UserError, match="unknown backbone 'resnet' for yolox"):
        choose_detector("yolox", "resnet", None, str(models_dir))
    with pytest.raises(UserError, match="--weights is for --detector frcnn or vg;"):
        choose_detector("yolox", None, "x.pth", str(models_dir))


def test_torchvisions_compiled_ops_called_by_path_give_torchvision_ops_numbers(monkeypatch):
    import torchvision.ops

    from vlpcache.extract.detectors import vision_ops

    assert vision_ops.library_path() is not None, "torchvision's compiled library is not where vision_ops looks"
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(200, 2, generator=generator) * 100
    boxes = torch.cat([corners, corners + 5 + torch.rand(200, 2, generator=generator) * 40], dim=1)
    scores = torch.rand(200, generator=generator)
    features = torch.randn(2, 16, 13, 17, generator=generator)
    rois = torch.cat([torch.randint(0, 2, (50, 1), generator=generator).float(), boxes[:50] / 8], dim=1)
    reference = (torchvision.ops.nms(boxes, scores, 0.45),
                 torchvision.ops.roi_align(features, rois, 2, spatial_scale=1 / 4, sampling_ratio=2, aligned=True))
    for compiled in (True, False):  # the library loaded by its path; torchvision.ops where it is not found
        monkeypatch.setattr(vision_ops, "compiled_ops", lambda: compiled)
        torch.testing.assert_close(vision_ops.nms(boxes, scores, 0.45), reference[0], rtol=0, atol=0)
        torch.testing.assert_close(vision_ops.roi_align(features, rois, 2, 1 / 4, 2, True), reference[1])


def tiny_onnx_graph() -> bytes:
    """A real ONNX graph of a few hundred bytes: one convolution."""
    import io
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the exporter's deprecation notes
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Conv2d(3, 4, 3), torch.zeros(1, 3, 8, 8), buffer, opset_version=17, dynamo=False)
    return buffer.getvalue()


def test_a_kept_onnx_graph_stays_where_onnxruntime_fails_to_import(tmp_path, monkeypatch, capsys):
    # any error loading it counted as damage: an ImportError of a Ctrl-C during onnxruntime's import was said as
    # "damaged ... made again", and the good graph deleted
    from vlpcache.extract.detectors import yolox

    graph = tiny_onnx_graph()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kept = tmp_path / "vlpcache" / "onnx" / "conv.onnx"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(graph)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(ImportError):
        yolox._cached_onnx(kept.name, lambda: pytest.fail("made again"), lambda data: yolox._onnx_session(data, "cpu", 1),
                          "conv", "")
    assert kept.read_bytes() == graph and "damaged" not in capsys.readouterr().err


def test_an_extract_loads_the_detector_without_torchvisions_package_or_onnx_and_finds_the_same_regions(
        people_frame, models_dir, tmp_path, msrvtt_dir):
    """torchvision's package imports torch._dynamo (1.3 s) and rewriting the YOLOX graph imports onnx (0.8 s)
    of each extract's start: the compiled ops are loaded by path, the rewritten graph is kept in
    ~/.cache/vlpcache/onnx (made by the first run on a machine, read by the next)."""
    probe = ("import sys, numpy as np\nfrom PIL import Image\n"
             "from vlpcache.extract.detectors.yolox import YoloxConfig, YoloxDetector\n"
             "detector = YoloxDetector(YoloxConfig(backbone='neck'), models=sys.argv[1])\n"
             "(regions,) = detector.detect([np.asarray(Image.open(sys.argv[2]).convert('RGB'))], 30)\n"
             "np.savez(sys.argv[3], boxes=regions.boxes, features=regions.features)\n"
             "print(sorted({'torchvision', 'torch._dynamo', 'onnx'} & set(sys.modules)))\n")
    frame = sorted((msrvtt_dir / "frames" / "val" / "video6513").iterdir())[0]
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    imported = []
    for run in ("first", "second"):
        result = subprocess.run([sys.executable, "-c", probe, str(models_dir), str(frame), str(tmp_path / f"{run}.npz")],
                                env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert result.returncode == 0, result.stderr
        imported.append(result.stdout.strip())
    assert imported == ["['onnx']", "[]"]  # the first run on a machine rewrites the graph once
    (kept,) = (tmp_path / "home" / ".cache" / "vlpcache" / "onnx").iterdir()
    assert kept.name.startswith("yolox-") and kept.name.endswith("-neck-v1.onnx")
    (reference,) = YoloxDetector(YoloxConfig(backbone="neck"), models=str(models_dir)).detect([people_frame], 30)
    for run in ("first", "second"):
        regions = np.load(tmp_path / f"{run}.npz")
        np.testing.assert_array_equal(regions["boxes"], reference.boxes)
        np.testing.assert_allclose(regions["features"], reference.features, rtol=1e-5, atol=1e-5)
