"""What runs on CUDA, checked against the CPU on a machine that has a GPU.

Skipped without one (CI and the 2-core development machine have none). `bench/device_check.sh` runs
this file first on a lent GPU machine, where the detector runs the torch runtime with fp16 autocast and
rounded batches, and pretraining steps run under bf16 autocast: paths no CPU test takes.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from vlpcache.cache.reader import RegionCache
from vlpcache.extract.detectors.yolox import YoloxConfig, YoloxDetector

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")


def test_yolox_on_cuda_finds_what_onnxruntime_finds_on_the_cpu(models_dir, msrvtt_dir):
    folder = msrvtt_dir / "frames" / "val" / "video6513"  # three clearly visible people
    frame = np.asarray(Image.open(sorted(folder.iterdir())[0]).convert("RGB"))
    frames = [frame, frame[:, ::-1].copy(), frame[::2].copy()]  # two canvases: calls of 2 rows (rounded) and 1
    cpu = YoloxDetector(YoloxConfig(backbone="mobilenet_v2+neck"), models=str(models_dir))
    cuda = YoloxDetector(YoloxConfig(backbone="mobilenet_v2+neck", device="cuda"), models=str(models_dir))
    assert cuda.runtime == "torch" and cuda.round_batches and cpu.runtime == "onnxruntime"
    for ours, reference in zip(cuda.detect(frames, 30), cpu.detect(frames, 30)):
        # fp16 may reorder or drop borderline detections; every confident one must be found again
        confident = np.flatnonzero(reference.scores[1:] > 0.3) + 1
        assert len(confident) >= 1
        iou = box_iou(torch.from_numpy(reference.boxes[confident]), torch.from_numpy(ours.boxes[1:])).numpy()
        same_label = reference.labels[confident][:, None] == ours.labels[1:][None, :]
        assert np.all((iou * same_label).max(axis=1) > 0.9)
        np.testing.assert_allclose(ours.features[0], reference.features[0], atol=0.05, rtol=0.05)  # the whole frame


def test_extract_on_cuda_caches_what_the_cpu_caches(msrvtt_dir, tmp_path):
    from vlpcache.extract.runner import run_extract

    folders = sorted((msrvtt_dir / "frames" / "val").iterdir())[:6]
    root = tmp_path / "frames"
    root.mkdir()
    for folder in folders:
        (root / folder.name).symlink_to(folder)
    for device in ("cpu", "cuda"):
        run_extract([root], cache_dir=tmp_path / device, frames=4, device=device, quiet=True)
    cpu, cuda = RegionCache(tmp_path / "cpu"), RegionCache(tmp_path / "cuda")
    assert sorted(cpu.ids) == sorted(cuda.ids) == sorted(f.name for f in folders)
    for item_id in cpu.ids:
        a, b = cpu.get(item_id), cuda.get(item_id)
        np.testing.assert_array_equal(a["frame_mask"], b["frame_mask"])
        whole = a["frame_mask"]  # each real frame's whole-frame region (row 0) is always there
        np.testing.assert_allclose(b["features"][whole, 0].astype(np.float32), a["features"][whole, 0].astype(np.float32),
                                   atol=0.05, rtol=0.05)


def test_a_pretraining_step_on_cuda_matches_the_cpu_and_learns(tmp_path):
    from test_model import build_tiny_text_model, random_items, tiny_config
    from vlpcache.model.batch import tokenize, video_batch
    from vlpcache.model.model import PretrainLoss, build_model
    from vlpcache.model.train import TrainConfig, autocast_for, parameter_groups, train_step

    torch.manual_seed(0)
    model, tokenizer = build_model(tiny_config(build_tiny_text_model(tmp_path / "tiny-bert"), text_trainable_layers=1))
    texts = ["a dog runs", "a man is cooking onions in a pan", "a cat", "two people dance"]
    input_ids, attention_mask = tokenize(tokenizer, texts, 16)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, **video_batch(random_items(4))}
    model.eval()
    with torch.no_grad():
        on_cpu = model(batch)
        model.cuda()
        on_cuda = model({k: v.cuda() for k, v in batch.items()})
    for ours, reference in ((on_cuda[0].global_, on_cpu[0].global_), (on_cuda[1].global_, on_cpu[1].global_)):
        np.testing.assert_allclose(ours.float().cpu().numpy(), reference.numpy(), atol=1e-3)

    model.train()
    device = torch.device("cuda")
    criterion = PretrainLoss(model.config)
    optimizer = torch.optim.AdamW(parameter_groups(model, TrainConfig()))
    precision = autocast_for(device)
    autocast, scaler = precision.autocast, precision.scaler
    inputs = {k: v.to(device) for k, v in batch.items()}
    before = model.region_encoder.feature_proj.weight.detach().clone()
    losses = [train_step(model, criterion, optimizer, inputs, autocast, scaler, 1.0)[0]["loss"] for _ in range(20)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]  # one batch, 20 steps: it fits it
    assert not torch.equal(before, model.region_encoder.feature_proj.weight)
