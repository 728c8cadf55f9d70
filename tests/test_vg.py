"""The vg detector: bottom-up attention's Visual Genome Faster R-CNN with random weights in the published
checkpoint's layout, on small frames and few proposals (a full-size frame costs seconds on a CPU)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import nms

from vlpcache.cache.labels import NO_ATTRIBUTE, region_names
from vlpcache.cache.reader import RegionCache
from vlpcache.cache.schema import FRAME_REGION_LABEL
from vlpcache.errors import UserError
from vlpcache.extract.detectors.choice import choose_detector
from vlpcache.extract.detectors.vg import (
    VgDetector,
    class_aware_confidence,
    kept_by_confidence,
    resized_size,
)
from vlpcache.extract.detectors.vg_model import OBJECT_CLASSES, VgFasterRCNN
from vlpcache.extract.detectors.weights import VG_FILE
from vlpcache.files import file_sha256
from waiting import HANG_GUARD_S

LAYOUT = Path(__file__).parent / "data" / "vg_checkpoint_layout.txt"
SMALL = dict(min_size=64, max_size=96, pre_nms_proposals=100, proposals=6)


def published_layout() -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every tensor in unc-nlp/frcnn-vg-finetuned's pytorch_model.bin."""
    layout = {}
    for line in LAYOUT.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape, dtype = line.split()
            layout[name] = (() if shape == "-" else tuple(int(s) for s in shape.split("x")), dtype)
    return layout


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory) -> Path:
    """Random weights saved as the published file lays them out (num_batches_tracked included)."""
    torch.manual_seed(0)
    state = VgFasterRCNN().state_dict()
    state |= {name: torch.tensor(0) for name in published_layout() if name.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("vg") / "pytorch_model.bin"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def detector(random_checkpoint) -> VgDetector:
    return VgDetector(weights_file=str(random_checkpoint), **SMALL)


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), rng.integers(0, 256, (140, 70, 3), dtype=np.uint8)]


def test_the_published_checkpoint_layout_loads_into_our_network_with_nothing_missing_or_unexpected():
    layout = published_layout()
    assert len(layout) == 640 and sum(np.prod(shape, dtype=int) for shape, _ in layout.values()) == 65_545_318
    state = {name: torch.zeros(shape, dtype=getattr(torch, dtype)) for name, (shape, dtype) in layout.items()}
    result = VgFasterRCNN().load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_a_random_checkpoint_in_the_published_layout_passes_the_registry_check(random_checkpoint):
    from vlpcache.extract.detectors.weights import REGISTRY

    REGISTRY[VG_FILE].check(random_checkpoint)  # raises ValueError when wrong
    assert set(torch.load(random_checkpoint, weights_only=True)) == set(published_layout())


def test_a_checkpoint_of_another_layout_is_one_line_naming_the_file(random_checkpoint, tmp_path):
    state = torch.load(random_checkpoint, weights_only=True)
    state.pop("roi_heads.box_predictor.attr_score.bias")
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(81, 2048)  # a COCO head
    torch.save(state, tmp_path / "coco.bin")
    with pytest.raises(UserError) as caught:
        VgDetector(weights_file=str(tmp_path / "coco.bin"), **SMALL)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'coco.bin'}: not the vg detector's state dict")
    assert "1 missing, 0 unexpected, 1 of another shape" in message


def test_frames_resize_as_the_reference_rounds_them():
    assert resized_size(240, 320, 600, 1000) == (600, 800)
    assert resized_size(1080, 1920, 600, 1000) == (562, 1000)  # longer side capped; 562.4999... in floats
    assert resized_size(375, 500, 600, 1000) == (600, 800)
    assert resized_size(333, 500, 600, 1000) == (600, 901)  # 900.9 rounds up


def butd_confidence(boxes: torch.Tensor, probs: torch.Tensor, iou: float) -> torch.Tensor:
    """bottom-up-attention's tools/generate_tsv.py, a class at a time."""
    confidence = torch.zeros(len(boxes))
    for c in range(probs.shape[1]):
        keep = nms(boxes, probs[:, c], iou)
        confidence[keep] = torch.maximum(confidence[keep], probs[keep, c])
    return confidence


def test_class_aware_confidence_is_bottom_up_attentions_per_class_nms_for_every_frame_of_a_batch():
    rng = torch.Generator().manual_seed(0)
    frames = []
    for count in (70, 25):  # frames with different numbers of proposals (70: two 64-bit words), padded into one batch
        xy = torch.rand(count, 2, generator=rng) * 80
        boxes = torch.cat([xy, xy + 10 + torch.rand(count, 2, generator=rng) * 40], dim=1)
        frames.append((boxes, torch.softmax(torch.randn(count, 30, generator=rng) * 3, dim=1)))
    boxes = torch.nn.utils.rnn.pad_sequence([b for b, _ in frames], batch_first=True)
    probs = torch.nn.utils.rnn.pad_sequence([p for _, p in frames], batch_first=True, padding_value=-1.0)
    confidence, labels = class_aware_confidence(boxes, probs, 0.3)
    for b, (frame_boxes, frame_probs) in enumerate(frames):
        count = len(frame_boxes)
        expected = butd_confidence(frame_boxes, frame_probs, 0.3)
        torch.testing.assert_close(confidence[b, :count], expected)
        assert torch.equal(frame_probs[torch.arange(count), labels[b, :count]], expected)  # the label scores it
        assert torch.all(confidence[b, count:] == 0)


def test_regions_are_those_above_threshold_at_least_min_at_most_max_best_first():
    confidence = torch.tensor([0.1, 0.5, 0.3, 0.05, 0.9, 0.25])
    assert kept_by_confidence(confidence, 0.2, 2, 10).tolist() == [4, 1, 2, 5]
    assert kept_by_confidence(confidence, 0.6, 3, 10).tolist() == [4, 1, 2]  # at least 3, below the threshold
    assert kept_by_confidence(confidence, 0.0, 2, 3).tolist() == [4, 1, 2]  # at most 3
    assert kept_by_confidence(confidence, 0.0, 10, 30).tolist() == [4, 1, 2, 5, 0, 3]  # what there is
    assert kept_by_confidence(confidence, 0.9, 10, 2).tolist() == [4, 1]  # --regions below the minimum: all of them


def test_each_frame_gets_the_whole_frame_then_its_regions_with_vg_labels_and_attributes(detector, frames):
    results = detector.detect(frames, max_detections=36)
    assert len(results) == len(frames)
    for regions in results:
        n = len(regions.scores)
        assert n == 1 + 6  # at least 10 regions by confidence, and 6 proposals are all there are
        assert regions.features.shape == (n, 2048) and regions.features.dtype == np.float32
        assert regions.labels[0] == FRAME_REGION_LABEL and regions.scores[0] == 1.0
        assert regions.attributes[0] == NO_ATTRIBUTE and regions.attribute_scores[0] == 0
        np.testing.assert_array_equal(regions.boxes[0], [0, 0, 1, 1])
        assert np.all((regions.labels[1:] >= 0) & (regions.labels[1:] < OBJECT_CLASSES))
        assert np.all((regions.attributes[1:] >= 0) & (regions.attributes[1:] < 400))
        assert np.all(np.diff(regions.scores[1:]) <= 0) and np.all((regions.boxes >= 0) & (regions.boxes <= 1))
    assert region_names(detector.spec.provenance["detector"]).label(int(results[0].labels[1])) != "frame"


def test_a_frames_regions_are_the_same_whatever_frames_share_its_batch(detector, frames):
    # zero-padded to the batch's largest frame, a portrait frame's boxes moved by up to 0.6 and its features by 2.5
    # between --batch-size 1 and the default: a cache depended on its batches
    together = detector.detect([frames[0], frames[1], frames[0]], max_detections=36)
    for frame, found in zip([frames[0], frames[1], frames[0]], together):
        [alone] = detector.detect([frame], max_detections=36)
        np.testing.assert_allclose(found.boxes, alone.boxes, atol=1e-4)
        np.testing.assert_allclose(found.features, alone.features, atol=1e-3, rtol=1e-3)
        np.testing.assert_array_equal(found.labels, alone.labels)


@pytest.mark.parametrize("shape", [(20, 10000, 3), (10000, 20, 3), (1, 1, 3)], ids=["wide", "tall", "1x1"])
def test_a_very_thin_or_tiny_picture_alone_in_its_batch_gets_its_regions(detector, shape):
    # resized to 2 x 1000, the stem's max-pool had no output: a RuntimeError ended the whole extract
    [regions] = detector.detect([np.full(shape, 128, np.uint8)], max_detections=36)
    assert regions.labels[0] == FRAME_REGION_LABEL and np.all((regions.boxes >= 0) & (regions.boxes <= 1))


def test_a_regions_attribute_is_the_attribute_heads_best_for_that_regions_own_feature(detector, frames):
    for regions in detector.detect(frames, max_detections=36):
        with torch.inference_mode():
            _, _, logits = detector.model.roi_heads.box_predictor(torch.from_numpy(regions.features[1:]))
        scores, attributes = logits[:, :-1].softmax(-1).max(-1)  # "none" left out, as extract does
        assert regions.attributes[1:].tolist() == attributes.tolist()
        np.testing.assert_allclose(regions.attribute_scores[1:], scores.numpy(), rtol=1e-4)


def test_a_vg_region_reads_as_its_attribute_and_object_and_a_coco_region_as_its_class():
    names = region_names("vg:frcnn_vg_finetuned.bin")
    car, red = names.classes.index("car"), names.attributes.index("red")
    assert names.label(car, red) == "red car" and names.label(car) == "car" and names.label(FRAME_REGION_LABEL) == "frame"
    item = {"labels": np.array([[FRAME_REGION_LABEL, car, car]]), "attributes": np.array([[NO_ATTRIBUTE, red, NO_ATTRIBUTE]])}
    assert [names.of(item, 0, n) for n in range(3)] == ["frame", "red car", "car"]
    assert region_names("yolox:yolox_nano_coco.onnx").of({"labels": np.array([[2]])}, 0, 0) == "car"


def res5_features(detector: VgDetector, frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """res5 on the 14x14 RoIPool of normalised boxes (n, 4) of one frame, averaged: from the model's parts."""
    with torch.inference_mode():
        images, [(h, w)] = detector.prepare([frame])
        res4 = detector.model.backbone(images)
        rois = torch.cat([torch.zeros(len(boxes), 1), torch.from_numpy(boxes) * torch.tensor([w, h, w, h])], dim=1)
        return detector.model.roi_heads.pooled_features(res4, rois.float()).numpy()


def test_a_regions_feature_is_the_pooled_res5_output_of_its_box(detector, frames):
    (regions,) = detector.detect(frames[:1], max_detections=36)
    rows = [0, 1, len(regions.scores) - 1]  # whole frame, best and last region
    expected = res5_features(detector, frames[0], regions.boxes[rows])
    np.testing.assert_allclose(regions.features[rows], expected, rtol=1e-3, atol=1e-4)


def test_regions_per_frame_follow_max_detections_and_the_lxmert_demos_rule_runs_too(random_checkpoint, frames):
    demo = VgDetector(weights_file=str(random_checkpoint), selection="max-class", **SMALL)
    for regions in demo.detect(frames, max_detections=3):
        assert len(regions.scores) == 1 + 3 and regions.features.shape == (4, 2048)


def test_bf16_autocast_keeps_float32_outputs_close_to_full_precision(random_checkpoint, detector, frames):
    mixed = VgDetector(weights_file=str(random_checkpoint), autocast="bf16", **(SMALL | {"proposals": 2}))
    (ours,), (theirs,) = detector.detect(frames[:1], 36), mixed.detect(frames[:1], 36)
    assert theirs.features.dtype == np.float32 and theirs.boxes.dtype == np.float32
    whole, whole_mixed = ours.features[0], theirs.features[0]  # row 0 does not depend on selection
    assert whole @ whole_mixed / np.linalg.norm(whole) / np.linalg.norm(whole_mixed) > 0.99


def vlpcache(*args, env=None, cwd=None, timeout=HANG_GUARD_S):
    return subprocess.run([sys.executable, "-m", "vlpcache", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_extract_with_a_checkpoint_file_writes_a_cache_of_vg_regions_and_attributes(random_checkpoint, videos_dir,
                                                                                    tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    for name in ("tests_data_test.avi", "carphone_distorted.mp4"):  # two small real videos
        (root / name).symlink_to(videos_dir / name)
    result = vlpcache("extract", root, "--detector", "vg", "--weights", random_checkpoint, "--scale", "64/96",
                      "--proposals", 4, "--frames", 2, "--workers", 1, "-o", tmp_path / "cache", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cache = RegionCache(tmp_path / "cache")
    settings = cache.settings
    assert len(cache) == 2 and settings.feature_dim == 2048 and settings.regions == 36 + 1 and settings.attributes
    assert settings.detector_weights_sha256 == file_sha256(random_checkpoint) and settings.nms_iou == 0.3
    assert settings.score_threshold == 0.2 and settings.extra == {"scale": [64, 96], "proposals": 4}
    for item_id in cache.ids:
        item = cache.get(item_id)
        real = item["region_mask"] & item["frame_mask"][:, None]
        assert real.sum() == 2 * (1 + 4)  # per frame: the whole frame and its 4 proposals (fewer than 10)
        detected = item["attributes"][:, 1:][real[:, 1:]]
        assert np.all((detected >= 0) & (detected < 400)) and np.all(item["attributes"][real[:, 0], 0] == NO_ATTRIBUTE)
        assert np.all(np.abs(item["features"][real]).sum(axis=-1) > 0)
    shown = vlpcache("inspect", tmp_path / "cache", cwd=tmp_path).stdout
    assert "Visual Genome: 1600 objects, 400 attributes" in shown and "vg:faster_rcnn_R_101_C4_attr" in shown


def test_offline_without_weights_is_one_line_naming_the_hugging_face_name_and_the_fetch_command(videos_dir, tmp_path):
    result = vlpcache("extract", videos_dir / "tests_data_test.avi", "--detector", "vg", "--models", tmp_path / "models",
                      "-o", tmp_path / "cache", cwd=tmp_path,
                      env={"VLPCACHE_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")})
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "https://huggingface.co/unc-nlp/frcnn-vg-finetuned" in lines[0]
    assert f"`vlpcache models fetch {VG_FILE} --models DIR`" in lines[0] and "--weights FILE" in lines[0]
    assert not (tmp_path / "cache").exists()


def test_options_that_vg_does_not_take_are_one_clear_error(random_checkpoint, models_dir):
    with pytest.raises(UserError, match="--backbone is for yolox and frcnn"):
        choose_detector("vg", "resnet50", str(random_checkpoint), None)
    with pytest.raises(UserError, match="--scale and --proposals are for frcnn and vg"):
        choose_detector("yolox", None, None, str(models_dir), scale=(300, 500))
    spec = choose_detector("vg", None, str(random_checkpoint), None, scale=(300, 500), proposals=50)
    assert spec.max_side == 500 and spec.cache_settings(2, 36, 0.2).extra == {"scale": [300, 500], "proposals": 50}
    # the detector's own, spelled out (a script's), are the plain run's settings: its cache was refused, and merge too
    plain = choose_detector("vg", None, str(random_checkpoint), None).cache_settings(2, 36, 0.2)
    for given in ({"scale": (600, 1000)}, {"proposals": 300}, {"scale": (600, 1000), "proposals": 300}):
        spelled = choose_detector("vg", None, str(random_checkpoint), None, **given)
        assert spelled.cache_settings(2, 36, 0.2) == plain and spelled.max_side == 1000
    small = ("frcnn", "fasterrcnn_mobilenet_v3_large_320_fpn", str(random_checkpoint), None)  # its file: hashed, not read
    assert (choose_detector(*small, scale=(320, 640), proposals=150).cache_settings(2, 36, 0.2)
            == choose_detector(*small).cache_settings(2, 36, 0.2))
    assert choose_detector(*small, proposals=300).cache_settings(2, 36, 0.2).extra == {"proposals": 300}
