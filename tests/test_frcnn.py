"""The frcnn detector: real torchvision Faster R-CNN architectures with random weights, small frames."""

import numpy as np
import pytest
import torch

from vlpcache.cache.schema import FRAME_REGION_LABEL
from vlpcache.errors import UserError
from vlpcache.cache.labels import COCO_CLASSES
from vlpcache.extract.detectors.frcnn import FasterRCNNDetector, FrcnnConfig
from vlpcache.files import file_sha256

ARCH = "fasterrcnn_mobilenet_v3_large_fpn"
MOBILENET_URL_FILE = "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth"  # torchvision's COCO_V1 file name


def small_config(**changes) -> FrcnnConfig:
    # random weights score every class about 1/91: threshold 0 keeps detections to select from
    options = dict(arch=ARCH, weights=None, min_size=128, max_size=192, proposals=64, score_threshold=0.0)
    return FrcnnConfig(**{**options, **changes})


@pytest.fixture(scope="module")
def detector() -> FasterRCNNDetector:
    torch.manual_seed(0)
    return FasterRCNNDetector(small_config())


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), rng.integers(0, 256, (140, 70, 3), dtype=np.uint8)]


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache, and downloads refused at once even on a machine with internet."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    return tmp_path / "torch"


def test_each_frame_gets_the_whole_frame_region_first_then_at_most_n_detections(detector, frames):
    results = detector.detect(frames, max_detections=5)
    assert len(results) == len(frames)
    for regions in results:
        n = len(regions.scores)
        assert 2 <= n <= 1 + 5
        assert regions.boxes.shape == (n, 4) and regions.boxes.dtype == np.float32
        assert regions.features.shape == (n, 1024) and regions.features.dtype == np.float32
        assert regions.labels[0] == FRAME_REGION_LABEL and regions.scores[0] == 1.0
        np.testing.assert_array_equal(regions.boxes[0], [0, 0, 1, 1])


def test_detections_are_best_first_with_normalised_boxes_and_coco_labels(detector, frames):
    for regions in detector.detect(frames, max_detections=8):
        boxes, scores, labels = regions.boxes[1:], regions.scores[1:], regions.labels[1:]
        assert np.all(np.diff(scores) <= 0)
        assert np.all((boxes >= 0) & (boxes <= 1))
        assert np.all(boxes[:, 2:] >= boxes[:, :2])
        assert np.all((labels >= 0) & (labels < len(COCO_CLASSES)))


def test_boxes_are_the_networks_own_detections_in_each_frames_proportions(detector, frames):
    # torchvision's own forward pass scales its boxes back to each frame's pixels; ours are those over the
    # frame's width and height (one frame wide, one tall)
    with torch.inference_mode():
        outputs = detector.model([torch.from_numpy(f).permute(2, 0, 1).float() / 255 for f in frames])
    for frame, regions, theirs in zip(frames, detector.detect(frames, max_detections=5), outputs):
        h, w = frame.shape[:2]
        ours = regions.boxes[1:] * np.array([w, h, w, h])  # (n, 4) pixels
        assert len(ours) >= 2
        distance = np.abs(ours[:, None] - theirs["boxes"].numpy()[None]).max(-1).min(-1)  # (n,) to the nearest of theirs
        assert np.all(distance < 0.05), distance


def test_torchvisions_categories_that_coco_lacks_are_never_kept(frames):
    torch.manual_seed(0)
    detector = FasterRCNNDetector(small_config())
    with torch.no_grad():
        scores = detector.model.roi_heads.box_predictor.cls_score.bias
        scores[12] += 8  # "N/A", one of the gaps in torchvision's 91-way COCO label space: the most likely class
        scores[1] += 6  # person, the next
    for regions in detector.detect(frames, max_detections=8):
        assert len(regions.labels) > 1 and set(regions.labels[1:].tolist()) == {COCO_CLASSES.index("person")}


def test_no_detection_above_threshold_leaves_only_the_whole_frame_region(frames):
    torch.manual_seed(0)
    strict = FasterRCNNDetector(small_config(score_threshold=0.9))
    (regions,) = strict.detect(frames[:1], max_detections=5)
    assert len(regions.scores) == 1 and regions.labels[0] == FRAME_REGION_LABEL
    assert regions.features.shape == (1, 1024)


def box_head_feature(detector: FasterRCNNDetector, frame: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The box head applied to one normalised box of one frame, computed from the model's parts."""
    model = detector.model
    with torch.inference_mode():
        image = torch.from_numpy(frame).permute(2, 0, 1).float() / 255
        image_list, _ = model.transform([image])
        h, w = image_list.image_sizes[0]
        features = model.backbone(image_list.tensors)
        pixels = torch.from_numpy(box).float()[None] * torch.tensor([w, h, w, h])
        pooled = model.roi_heads.box_roi_pool(features, [pixels], image_list.image_sizes)
        return model.roi_heads.box_head(pooled)[0].numpy()


def test_region_features_are_the_box_head_on_the_final_boxes(detector, frames):
    (regions,) = detector.detect(frames[:1], max_detections=5)
    for row in (0, 1, len(regions.scores) - 1):  # whole frame, best and last detection
        expected = box_head_feature(detector, frames[0], regions.boxes[row])
        np.testing.assert_allclose(regions.features[row], expected, rtol=1e-4, atol=1e-4)


def test_default_architecture_resnet50_fpn_v2_gives_1024_d_features(frames):
    torch.manual_seed(0)
    resnet = FasterRCNNDetector(small_config(arch="fasterrcnn_resnet50_fpn_v2"))
    assert resnet.feature_dim == 1024
    (regions,) = resnet.detect(frames[:1], max_detections=3)
    assert regions.features.shape == (len(regions.scores), 1024) and len(regions.scores) >= 2
    assert resnet.spec.provenance["detector"] == "frcnn:fasterrcnn_resnet50_fpn_v2"


def test_saved_state_dict_round_trips_through_weights_file(detector, frames, tmp_path):
    path = tmp_path / "frcnn.pth"
    torch.save({"model": detector.model.state_dict()}, path)  # a training checkpoint; bare: next test
    loaded = FasterRCNNDetector(small_config(weights_file=str(path)))
    for ours, theirs in zip(detector.detect(frames, 5), loaded.detect(frames, 5)):
        np.testing.assert_array_equal(ours.boxes, theirs.boxes)
        np.testing.assert_array_equal(ours.features, theirs.features)
    assert loaded.spec.provenance["detector_weights_sha256"] == file_sha256(path)
    from vlpcache.extract.detectors.choice import choose_detector

    choice = choose_detector("frcnn", loaded.config.arch, str(path), None)  # what extract writes before loading
    assert choice.provenance == loaded.spec.provenance and choice.feature_dim == loaded.feature_dim


def test_torchvision_weights_already_in_the_hub_cache_load_offline(detector, frames, offline_torch_home):
    checkpoints = offline_torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    # like torchvision's COCO file: saved from FrozenBatchNorm2d layers, so no num_batches_tracked
    state = {k: v for k, v in detector.model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, checkpoints / MOBILENET_URL_FILE)
    cached = FasterRCNNDetector(small_config(weights="DEFAULT"))
    np.testing.assert_array_equal(cached.detect(frames[:1], 5)[0].features, detector.detect(frames[:1], 5)[0].features)


def test_offline_without_weights_is_one_clear_user_error_naming_the_file(offline_torch_home):
    with pytest.raises(UserError) as caught:
        FasterRCNNDetector(small_config(weights="DEFAULT"))
    message = str(caught.value)
    assert "\n" not in message
    assert MOBILENET_URL_FILE in message and str(offline_torch_home / "hub" / "checkpoints") in message
    assert "--weights FILE" in message


def test_state_dict_of_another_architecture_is_a_user_error_naming_the_file(detector, tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save(detector.model.state_dict(), path)
    with pytest.raises(UserError, match="mobilenet.pth: not a fasterrcnn_resnet50_fpn state dict"):
        FasterRCNNDetector(small_config(arch="fasterrcnn_resnet50_fpn", weights_file=str(path)))


def test_unknown_architecture_or_weights_name_is_a_user_error():
    with pytest.raises(UserError, match="choose from fasterrcnn_resnet50_fpn_v2"):
        FasterRCNNDetector(small_config(arch="retinanet_resnet50_fpn"))
    with pytest.raises(UserError, match="choose from COCO_V1, DEFAULT"):
        FasterRCNNDetector(small_config(weights="IMAGENET"))


def test_bf16_autocast_keeps_float32_outputs_close_to_full_precision(detector, frames):
    torch.manual_seed(0)  # the same random weights as the fixture
    mixed = FasterRCNNDetector(small_config(autocast="bf16"))
    (ours,), (theirs,) = detector.detect(frames[:1], 5), mixed.detect(frames[:1], 5)
    assert theirs.features.dtype == np.float32 and theirs.boxes.dtype == np.float32
    whole_frame, whole_frame_mixed = ours.features[0], theirs.features[0]  # row 0 does not depend on selection
    cosine = whole_frame @ whole_frame_mixed / np.linalg.norm(whole_frame) / np.linalg.norm(whole_frame_mixed)
    assert cosine > 0.99


def test_box_decoding_stays_float32_for_half_precision_heads(detector):
    coder = detector.model.rpn.box_coder
    proposals = [torch.tensor([[0.0, 0.0, 600.0, 500.0]], dtype=torch.float16)]  # area 300000 > fp16 max
    decoded = coder.decode(torch.zeros(1, 4, dtype=torch.float16), proposals)  # zero deltas: the box itself
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded.reshape(-1, 4), proposals[0].float())


def test_extract_help_gives_the_320_models_own_scale_and_proposals_as_their_defaults():
    from click.testing import CliRunner

    from vlpcache.cli import cli
    from vlpcache.extract.detectors.spec import FRCNN_SCALES

    text = " ".join(CliRunner().invoke(cli, ["extract", "--help"]).output.split())
    short, long, proposals = FRCNN_SCALES["fasterrcnn_mobilenet_v3_large_320_fpn"]
    assert f"[default: 600/1000; fasterrcnn_mobilenet_v3_large_320_fpn: {short}/{long}]" in text
    assert f"[default: 300; fasterrcnn_mobilenet_v3_large_320_fpn: {proposals}]" in text
