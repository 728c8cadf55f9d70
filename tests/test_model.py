"""The alignment model: real forward/backward on small shapes, with a tiny random BERT and the real MiniLM."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlpcache.errors import UserError
from vlpcache.model.batch import tokenize, video_batch
from vlpcache.model.model import ModelConfig, PretrainLoss, build_model, default_text_model
from waiting import HANG_GUARD_S, wait_until


def build_tiny_text_model(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT with random weights and the MiniLM WordPiece tokenizer, saved to folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64,
        )
        BertModel(config).save_pretrained(folder)
        AutoTokenizer.from_pretrained(default_text_model()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory) -> Path:
    return build_tiny_text_model(tmp_path_factory.mktemp("tiny-bert"))


def random_items(count: int, frames=2, regions=5, dim=12, seed=0) -> list[dict]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        xy = rng.uniform(0, 0.5, (frames, regions, 2))
        region_mask = np.ones((frames, regions), dtype=bool)
        region_mask[:, regions - 1 - i % 2 :] = False  # a few padded regions
        items.append({
            "features": rng.standard_normal((frames, regions, dim)).astype(np.float16),
            "boxes": np.concatenate([xy, xy + 0.4], -1).astype(np.float32),
            "region_mask": region_mask,
            "frame_mask": np.array([True] * (frames - 1) + [i % 2 == 0]),
            "timestamps": np.arange(frames, dtype=np.float32),
            "id": f"v{i}",
        })
    return items


def tiny_config(text_model: Path, **overrides) -> ModelConfig:
    values = dict(feature_dim=12, text_model=str(text_model), width=16, layers=1, heads=2, embed_dim=8)
    values.update(overrides)
    return ModelConfig(**values)


def test_forward_backward_trains_region_encoder_and_top_text_layers_only(tiny_text_model):
    model, tokenizer = build_model(tiny_config(tiny_text_model, text_trainable_layers=1))
    input_ids, attention_mask = tokenize(tokenizer, ["a dog runs", "a man is cooking onions in a pan", "cat"], 16)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, **video_batch(random_items(3))}
    text, video, scale, rwa_scale = model(batch)
    assert text.global_.shape == (3, 8) and text.words.shape == (3, input_ids.shape[1], 8)
    assert video.global_.shape == (3, 8) and video.regions.shape == (3, 2 * 5, 8)
    assert torch.allclose(text.global_.norm(dim=-1), torch.ones(3)) and torch.allclose(video.regions.norm(dim=-1), torch.ones(3, 10))
    losses = PretrainLoss(model.config)(text, video, scale, rwa_scale)
    losses["loss"].backward()
    assert set(losses) == {"contrastive", "rwa", "loss"} and torch.isfinite(losses["loss"])
    bert = model.text_encoder.backbone
    assert all(p.grad is not None for p in bert.encoder.layer[1].parameters())
    assert all(p.grad is None for p in bert.encoder.layer[0].parameters())
    assert bert.embeddings.word_embeddings.weight.grad is None
    assert model.region_encoder.feature_proj.weight.grad.abs().sum() > 0
    assert model.logit_scale.grad is not None and model.rwa_logit_scale.grad is not None


def test_word_mask_excludes_special_and_padding_tokens(tiny_text_model):
    model, tokenizer = build_model(tiny_config(tiny_text_model))
    input_ids, attention_mask = tokenize(tokenizer, ["a dog", "a dog runs fast"], 16)
    text = model.encode_text(input_ids, attention_mask)
    # [CLS] a dog [SEP] [PAD] [PAD] / [CLS] a dog runs fast [SEP]
    assert text.word_mask.tolist() == [[False, True, True, False, False, False], [False, True, True, True, True, False]]


def test_video_embedding_ignores_padded_regions_and_frames(tiny_text_model):
    model, _ = build_model(tiny_config(tiny_text_model))
    model.eval()
    items = random_items(2)
    reference = model.encode_video(**video_batch(items))
    for item in items:  # change whatever padding holds
        item["features"][~item["region_mask"]] = 100
        item["features"][~item["frame_mask"]] = -7
        item["boxes"][~item["region_mask"]] = 3
    changed = model.encode_video(**video_batch(items))
    assert torch.allclose(reference.global_, changed.global_, atol=1e-5)
    mask = reference.region_mask
    assert mask.tolist()[1][5:] == [False] * 5  # item 1's second frame is masked
    assert torch.allclose(reference.regions[mask], changed.regions[mask], atol=1e-5)
    for item in items:  # not even NaN or inf (a float16 overflow), which a product with a zero mask would spread
        item["features"][~item["region_mask"]] = np.nan
        item["features"][~item["frame_mask"]] = np.inf
        item["boxes"][~item["region_mask"]] = np.nan
    poisoned = model.encode_video(**video_batch(items))
    assert torch.allclose(reference.global_, poisoned.global_, atol=1e-5)
    assert torch.allclose(reference.regions[mask], poisoned.regions[mask], atol=1e-5)


def test_video_batch_pads_items_with_fewer_frames_and_regions():
    video, image = random_items(1, frames=3, regions=4)[0], random_items(1, frames=1, regions=2)[0]
    batch = video_batch([video, image])
    assert batch["features"].shape == (2, 3, 4, 12)
    assert batch["frame_mask"][1].tolist() == [True, False, False]
    assert not batch["region_mask"][1, 0, 2:].any()


def test_without_rwa_the_loss_is_contrastive_only_and_rwa_scale_is_frozen(tiny_text_model):
    model, tokenizer = build_model(tiny_config(tiny_text_model, rwa=False))
    input_ids, attention_mask = tokenize(tokenizer, ["a", "b"], 8)
    text, video, scale, rwa_scale = model({"input_ids": input_ids, "attention_mask": attention_mask, **video_batch(random_items(2))})
    losses = PretrainLoss(model.config)(text, video, scale, rwa_scale)
    assert set(losses) == {"contrastive", "loss"}
    assert not model.rwa_logit_scale.requires_grad


def test_default_minilm_text_encoder_runs_forward_and_backward():
    config = ModelConfig(feature_dim=12, width=16, layers=1, heads=2, embed_dim=8, text_trainable_layers=2)
    model, tokenizer = build_model(config)
    assert model.text_encoder.width == 384
    input_ids, attention_mask = tokenize(tokenizer, ["a person is slicing an onion", "two dogs play"], 32)
    text, video, scale, rwa_scale = model({"input_ids": input_ids, "attention_mask": attention_mask, **video_batch(random_items(2))})
    PretrainLoss(config)(text, video, scale, rwa_scale)["loss"].backward()
    trainable = [n for n, p in model.text_encoder.named_parameters() if p.requires_grad]
    assert trainable and all(".layer.4." in n or ".layer.5." in n for n in trainable)


def test_text_model_that_cannot_be_had_offline_is_one_clear_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without internet
    with pytest.raises(UserError, match="no-such-org/no-such-model.*--text-model"):
        build_model(ModelConfig(feature_dim=4, text_model="no-such-org/no-such-model"))
    with pytest.raises(UserError, match="cannot load it"):
        build_model(ModelConfig(feature_dim=4, text_model=str(tmp_path)))  # an empty directory
    from vlpcache.model import model as model_module

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("VLPCACHE_OFFLINE", "1")  # the project's own switch, as for the detector weights
    monkeypatch.setattr(model_module, "_huggingface_reachable", lambda: pytest.fail("asked the network"))
    with pytest.raises(UserError, match="no-such-org/no-such-model.*cannot be reached \\(or downloads are off\\)"):
        build_model(ModelConfig(feature_dim=4, text_model="no-such-org/no-such-model"))
    assert model_module.sentence_pooling("no-such-org/no-such-model")[0] is None


# ---------------------------------------------------------------- other text models, by architecture

_TINY = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64)
ENCODERS = {  # what a user may pass as --text-model, tiny and random: 3 layers, the top one trains
    "bert": ("BertConfig", _TINY),
    "distilbert": ("DistilBertConfig", dict(vocab_size=1000, dim=32, n_layers=3, n_heads=2, hidden_dim=64,
                                            max_position_embeddings=64)),
    "roberta": ("RobertaConfig", _TINY),
    "xlm-roberta": ("XLMRobertaConfig", _TINY),
    "electra": ("ElectraConfig", dict(_TINY, embedding_size=16)),  # embeddings narrower than its layers
    "mpnet": ("MPNetConfig", _TINY),
    "deberta-v2": ("DebertaV2Config", _TINY),  # its encoder unpacks two outputs of every layer
    "modernbert": ("ModernBertConfig", dict(_TINY, global_attn_every_n_layers=2, local_attention=8, pad_token_id=0,
                                            bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3)),
    "clip-text": ("CLIPTextConfig", dict(_TINY, bos_token_id=2, eos_token_id=3, pad_token_id=0)),
}


def tiny_backbone(config_class: str, values: dict):
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModel.from_config(getattr(transformers, config_class)(**values)).eval()


@pytest.mark.parametrize("architecture", ENCODERS)
def test_every_supported_architecture_trains_its_top_layer_on_the_cached_prefix_as_the_whole_model_would(
        architecture, monkeypatch):
    from vlpcache.model import model as model_module
    from vlpcache.model.model import TextEncoder

    backbone = tiny_backbone(*ENCODERS[architecture])
    encoder = TextEncoder(backbone, trainable_layers=1, pooling="mean")
    assert encoder.frozen_layers == 2 and encoder.width == 32
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 9, 5, 12, 4, 7, 12, 6, 10, 3, 8, 11])
    attention_mask = (torch.arange(12)[None] < lengths[:, None]).long()
    input_ids = torch.randint(5, 1000, (12, 12), generator=generator) * attention_mask
    real = attention_mask.bool()
    with torch.no_grad():
        whole = backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        prefix = encoder.prefix(input_ids, attention_mask)
    assert torch.allclose(prefix[real], whole.hidden_states[2][real], atol=1e-5)
    top = list(encoder.layers[2].parameters())
    for groups in (1, 4):
        monkeypatch.setattr(model_module, "CPU_LENGTH_GROUPS", groups)
        gradients = []
        for given in (None, prefix):
            backbone.zero_grad()
            hidden, pooled = encoder(input_ids, attention_mask, given)
            assert torch.allclose(hidden[real], whole.last_hidden_state[real], atol=1e-4), (groups, given is None)
            pooled.square().sum().backward()
            assert all(p.grad is None for layer in encoder.layers[:2] for p in layer.parameters())
            gradients.append([p.grad.clone() for p in top])
        assert all(g.abs().sum() > 0 for g in gradients[0])
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*gradients))  # live and cached: one gradient


@pytest.mark.parametrize("architecture", ENCODERS)
def test_max_words_may_be_as_many_tokens_as_the_model_reads_and_no_more(architecture):
    from vlpcache.model.model import TextEncoder, check_max_words, text_positions

    backbone = tiny_backbone(*ENCODERS[architecture])
    longest = text_positions(backbone)  # 64 embeddings: 62 tokens for RoBERTa-style numbering from padding id + 1
    assert longest == (62 if architecture in ("roberta", "xlm-roberta", "mpnet") else 64)
    check_max_words(longest, backbone, architecture)
    input_ids = torch.randint(5, 1000, (2, longest))
    with torch.no_grad():
        hidden, _ = TextEncoder(backbone, 1, "mean")(input_ids, torch.ones_like(input_ids))
    assert hidden.shape == (2, longest, 32)
    with pytest.raises(UserError, match=f"reads at most {longest} tokens"):
        check_max_words(longest + 1, backbone, architecture)

@pytest.mark.parametrize("config_class, values, says", [
    ("T5Config", dict(vocab_size=1000, d_model=32, num_layers=3, num_heads=2, d_ff=64, d_kv=16),
     "cannot run it as a text encoder"),  # encoder-decoder
    ("BartConfig", dict(vocab_size=1000, d_model=32, encoder_layers=3, decoder_layers=3, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64),
     "cannot run it as a text encoder"),
    ("AlbertConfig", dict(_TINY, embedding_size=16), "share their weights"),
])
def test_a_text_model_that_is_not_an_encoder_this_can_run_is_one_clear_line_when_the_model_is_built(
        config_class, values, says):
    from vlpcache.model.model import TextEncoder

    with pytest.raises(UserError, match=says) as raised:
        TextEncoder(tiny_backbone(config_class, values), trainable_layers=1, pooling="mean")
    assert "\n" not in str(raised.value) and "encoder-only text model: BERT" in str(raised.value)


def test_an_encoder_whose_layers_cannot_skip_the_frozen_ones_is_refused_and_both_suggested_settings_work():
    """T5's encoder: its first layer computes the position bias every later layer reads, so running the
    top layer on the cached prefix would give other states, silently; the check sees it."""
    import transformers
    from vlpcache.model.model import TextEncoder

    torch.manual_seed(0)
    backbone = transformers.T5EncoderModel(transformers.T5Config(vocab_size=1000, d_model=32, num_layers=3,
                                                                 num_heads=2, d_ff=64, d_kv=16)).eval()
    with pytest.raises(UserError, match="other states than the whole model.*--trainable-layers 0.*--trainable-layers 3"):
        TextEncoder(backbone, trainable_layers=1, pooling="mean")
    assert TextEncoder(backbone, trainable_layers=0, pooling="mean").frozen_layers == 3  # nothing cached per layer
    assert TextEncoder(backbone, trainable_layers=3, pooling="mean").frozen_layers == 0


def test_a_deberta_text_model_loads_without_a_warning_of_torch_on_any_python(tmp_path):
    # transformers up to 5.20 (the newest for Python 3.10) runs torch.jit.script on DeBERTa's helpers as it
    # imports them, and torch 2.14 printed a FutureWarning for it at every command; a fresh process imports them
    from transformers import AutoTokenizer, DebertaV2Config

    DebertaV2Config(**dict(_TINY, vocab_size=30522)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(default_text_model()).save_pretrained(tmp_path)
    probe = ("from vlpcache.model.model import load_text_backbone; "
             f"print(type(load_text_backbone({str(tmp_path)!r}, weights=False)[0]).__name__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0 and result.stdout.split() == ["DebertaV2Model"], result.stderr
    assert "Warning" not in result.stderr, result.stderr


def test_a_clip_checkpoint_gives_its_text_model_with_its_weights_and_no_load_report(tmp_path, capfd):
    """`--text-model openai/clip-vit-base-patch32`: an image and a text model in one checkpoint."""
    import transformers
    from transformers import AutoTokenizer
    from vlpcache.model.model import load_text_backbone

    torch.manual_seed(0)
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(_TINY, vocab_size=30522, bos_token_id=101, eos_token_id=102, pad_token_id=0),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=16)))
    clip.save_pretrained(tmp_path / "clip")
    AutoTokenizer.from_pretrained(default_text_model()).save_pretrained(tmp_path / "clip")
    capfd.readouterr()
    backbone, _ = load_text_backbone(str(tmp_path / "clip"))
    assert type(backbone).__name__ == "CLIPTextModel"
    assert "UNEXPECTED" not in "".join(capfd.readouterr())  # transformers' report of the image weights left out
    loaded = {key.removeprefix("text_model."): value for key, value in backbone.state_dict().items()}  # transformers 4
    assert loaded.keys() == clip.text_model.state_dict().keys()
    assert all(torch.equal(value, clip.text_model.state_dict()[key]) for key, value in loaded.items())
    assert type(load_text_backbone(str(tmp_path / "clip"), weights=False)[0]).__name__ == "CLIPTextModel"
    model, tokenizer = build_model(tiny_config(tmp_path / "clip", text_trainable_layers=1))
    text, video, scale, rwa_scale = model({**dict(zip(("input_ids", "attention_mask"),
                                                      tokenize(tokenizer, ["a dog runs", "a cat"], 16))),
                                           **video_batch(random_items(2))})
    PretrainLoss(model.config)(text, video, scale, rwa_scale)["loss"].backward()
    assert model.text_encoder.layers[2].mlp.fc1.weight.grad is not None

    from safetensors.torch import load_file, save_file  # a checkpoint that lost its text model's top layer

    weights = tmp_path / "clip" / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("text_model.encoder.layers.2.")},
              weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"clip: 16 of its text model's weights are not in the checkpoint "
                                        r"\(e\.g\. (text_model\.)?encoder\.layers\.2\."):  # 4.x: text_model.
        load_text_backbone(str(tmp_path / "clip"))


def test_trailing_padding_frames_and_regions_change_nothing_and_keep_the_frame_major_layout(tiny_text_model):
    model, _ = build_model(tiny_config(tiny_text_model))
    model.eval()
    items = random_items(2, frames=2, regions=5)
    reference = model.encode_video(**video_batch(items))
    wider = []
    for item in items:  # the same clips in a cache with T=4 frames and N=7 regions per frame
        big = {k: v for k, v in item.items()}
        for key in ("features", "boxes", "region_mask"):
            value = item[key]
            big[key] = np.zeros((4, 7, *value.shape[2:]), dtype=value.dtype)
            big[key][:2, :5] = value
        big["frame_mask"] = np.r_[item["frame_mask"], [False, False]]
        big["timestamps"] = np.arange(4, dtype=np.float32)
        wider.append(big)
    padded = model.encode_video(**video_batch(wider))
    assert padded.regions.shape == (2, 4 * 7, 8)
    assert torch.allclose(reference.global_, padded.global_, atol=1e-5)
    # region n of frame t is token t*N + n in both layouts
    ref = reference.regions.reshape(2, 2, 5, 8)
    big = padded.regions.reshape(2, 4, 7, 8)
    ref_mask = reference.region_mask.reshape(2, 2, 5)
    assert torch.equal(padded.region_mask.reshape(2, 4, 7)[:, :2, :5], ref_mask)
    assert not padded.region_mask.reshape(2, 4, 7)[:, 2:].any()
    assert torch.allclose(ref[ref_mask], big[:, :2, :5][ref_mask], atol=1e-5)


def test_frame_positions_spread_real_frames_over_their_segment_centres_whatever_their_slots():
    from vlpcache.model.model import frame_positions

    mask = torch.tensor([[True, True, False, False], [False, True, False, True], [True, True, True, True]])
    assert torch.allclose(frame_positions(mask), torch.tensor([[0.25, 0.75, 0, 0], [0, 0.25, 0, 0.75],
                                                               [0.125, 0.375, 0.625, 0.875]]))


def _moved_and_repeated(item: dict, slots: int = 8) -> tuple[dict, dict]:
    """The item's two real frames in slots 2 and 5 of a T=8 item, and repeated to fill all 8 slots."""
    real = np.flatnonzero(item["frame_mask"])[:2]
    moved, repeated = dict(item), dict(item)
    for name in ("features", "boxes", "region_mask", "timestamps"):
        value = item[name]
        moved[name] = np.zeros((slots, *value.shape[1:]), value.dtype)
        moved[name][[2, 5]] = value[real]
        repeated[name] = value[np.repeat(real, slots // 2)]
    moved["frame_mask"] = np.isin(np.arange(slots), [2, 5])
    repeated["frame_mask"] = np.ones(slots, bool)
    return moved, repeated


def test_video_embedding_does_not_depend_on_the_slots_of_its_frames(tiny_text_model):
    model, _ = build_model(tiny_config(tiny_text_model))
    model.eval()
    with torch.no_grad():  # a trained-looking time embedding: the test must see it if slots leaked in
        model.region_encoder.time_embedding.proj.weight.normal_()
    items = [i for i in random_items(4, frames=2) if i["frame_mask"].all()]
    moved = [_moved_and_repeated(i)[0] for i in items]
    with torch.no_grad():
        reference, shifted = (model.encode_video(**video_batch(x)).global_ for x in (items, moved))
    assert torch.allclose(reference, shifted, atol=1e-5)


def test_the_legacy_slot_embedding_is_what_moving_frames_would_break(tiny_text_model):
    model, _ = build_model(tiny_config(tiny_text_model, frame_time="slot"))
    model.eval()
    items = [i for i in random_items(4, frames=2) if i["frame_mask"].all()]
    with torch.no_grad():
        reference, shifted = (model.encode_video(**video_batch(x)).global_ for x in (items, [_moved_and_repeated(i)[0] for i in items]))
    assert not torch.allclose(reference, shifted, atol=1e-2)


def test_global_path_is_the_mean_of_the_whole_frame_regions_of_real_frames():
    from vlpcache.model.model import whole_frame_mean

    features = torch.arange(3 * 2, dtype=torch.float32).reshape(1, 3, 2, 1).repeat(2, 1, 1, 1)  # (B, T, N, D)
    region_mask = torch.ones(2, 3, 2, dtype=torch.bool)
    frame_mask = torch.tensor([[True, False, True], [False, True, False]])
    # region 0 of frames 0, 1, 2 holds 0, 2, 4
    assert whole_frame_mean(features, region_mask, frame_mask).flatten().tolist() == [2.0, 2.0]


def test_hiding_at_random_keeps_whole_frames_and_at_least_one_frame_per_item():
    from vlpcache.model.model import hide_at_random

    torch.manual_seed(0)
    region_mask = torch.ones(64, 4, 5, dtype=torch.bool)
    frame_mask = torch.ones(64, 4, dtype=torch.bool)
    frame_mask[0] = False  # an item without frames stays without
    regions, frames = hide_at_random(region_mask, frame_mask, frame_p=0.9, region_p=0.5)
    assert frames[1:].any(1).all() and not frames[0].any()
    assert regions[..., 0].all() and 0.3 < regions[..., 1:].float().mean() < 0.7
    assert 0.05 < frames[1:].float().mean() < 0.5


def test_training_hides_regions_and_frames_only_in_train_mode(tiny_text_model):
    model, _ = build_model(tiny_config(tiny_text_model, frame_dropout=0.5, region_dropout=0.5))
    items = random_items(4)
    model.eval()
    with torch.no_grad():
        a, b = (model.encode_video(**video_batch(items)).global_ for _ in range(2))
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        c = model.encode_video(**video_batch(items)).region_mask
    assert c.sum() < model.encode_video(**video_batch(items)).region_mask.numel()


def test_cached_text_inputs_give_what_the_live_encoder_gives(tiny_text_model, tmp_path):
    from vlpcache.model.text_features import cached_text_features

    model, tokenizer = build_model(tiny_config(tiny_text_model, text_trainable_layers=0))
    model.eval()
    captions = ["a dog runs", "a man is cooking onions in a pan", "cat"]
    features = cached_text_features(model, tokenizer, captions, tmp_path, with_words=True, device=torch.device("cpu"),
                                    progress=False)
    with torch.no_grad():
        live = model.encode_text(*tokenize(tokenizer, captions, 16))
        cached = model.project_text(*(features.model_inputs(captions, captions)[k] for k in ("text_hidden", "text_pooled", "word_mask")))
    assert torch.allclose(live.global_, cached.global_, atol=2e-3)
    for b in range(3):  # the same words, packed to the front
        assert torch.allclose(live.words[b][live.word_mask[b]], cached.words[b][cached.word_mask[b]], atol=2e-3)
    again = cached_text_features(model, tokenizer, list(reversed(captions)), tmp_path, with_words=True,
                                 device=torch.device("cpu"), progress=False)
    assert again.path == features.path and len(list(tmp_path.glob("text-features/*.h5"))) == 1
    # a workspace this user may not write (another's): the features go in the run's folder, said once
    shared, said = tmp_path / "shared", []
    shared.mkdir()
    mkdir = Path.mkdir

    def denied(path, *args, **kwargs):
        if shared in Path(path).parents:
            raise PermissionError(13, "Permission denied", str(path))
        return mkdir(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "mkdir", denied)
        own = cached_text_features(model, tokenizer, captions, shared, with_words=True, device=torch.device("cpu"),
                                   progress=False, say=said.append, fallback_root=tmp_path / "run")
    assert own.path.parent == tmp_path / "run" / "text-features" and own.path.name == features.path.name
    assert said == [f"note: cannot write the caption features in {shared / 'text-features'} (Permission denied (EACCES)): "
                    f"they are kept in {tmp_path / 'run' / 'text-features'} instead"]
    import pickle

    assert isinstance(features.tokens, np.memmap)  # the token states stay on disk until a batch reads them
    sent = pickle.dumps(features)  # as to a loader worker: the path, not the mapped tokens
    assert len(sent) < len(str(features.path)) + 200, len(sent)
    received = pickle.loads(sent)
    for key, value in received.model_inputs(captions, captions).items():
        assert torch.equal(value, features.model_inputs(captions, captions)[key]), key


def test_mlp_text_head_starts_as_its_linear_part_and_old_plain_linear_weights_load(tiny_text_model):
    model, tokenizer = build_model(tiny_config(tiny_text_model, text_head="mlp"))
    model.eval()
    ids, mask = tokenize(tokenizer, ["a dog runs"], 16)
    with torch.no_grad():
        hidden, pooled = model.text_encoder(ids, mask)
        assert torch.allclose(model.text_proj(pooled), model.text_proj.linear(pooled))
    plain, _ = build_model(tiny_config(tiny_text_model))
    state = {k.replace("text_proj.linear.", "text_proj."): v for k, v in plain.state_dict().items()}  # the old key names
    plain.load_state_dict(state, strict=True)
    assert torch.equal(plain.text_proj.linear.weight, state["text_proj.weight"])


def test_training_top_layers_on_the_frozen_layers_cached_output_equals_the_live_encoder(tiny_text_model, tmp_path):
    from vlpcache.model.text_features import cached_text_features

    model, tokenizer = build_model(tiny_config(tiny_text_model, text_trainable_layers=1))  # 1 of 2 layers frozen
    model.eval()
    captions = ["a dog runs", "a man is cooking onions in a pan", "cat"]
    features = cached_text_features(model, tokenizer, captions, tmp_path, with_words=True, device=torch.device("cpu"),
                                    progress=False)
    assert features.kind == "prefix" and model.text_encoder.frozen_layers == 1
    inputs = features.model_inputs(captions, captions)
    with torch.no_grad():
        live = model.encode_text(*tokenize(tokenizer, captions, 16))
        cached = model.encode_text(inputs["input_ids"], inputs["attention_mask"], inputs["text_prefix"])
    assert torch.allclose(live.global_, cached.global_, atol=2e-3)
    assert torch.equal(live.word_mask[:, : cached.word_mask.shape[1]], cached.word_mask)
    model.train()  # the trainable layer gets gradients through the cached path
    model.encode_text(inputs["input_ids"], inputs["attention_mask"], inputs["text_prefix"]).global_.sum().backward()
    layers = model.text_encoder.backbone.encoder.layer
    assert all(p.grad is not None for p in layers[1].parameters()) and all(p.grad is None for p in layers[0].parameters())


CAPTIONS = ["a dog runs", "a man is cooking onions in a pan", "cat", "two people dance on a stage", "rain",
            "a child rides a red bicycle down the street"]


def test_texts_run_in_groups_of_similar_length_on_the_cpu_as_one_padded_batch_would(tiny_text_model, monkeypatch):
    from vlpcache.model import model as model_module
    from vlpcache.model.model import length_groups

    model, tokenizer = build_model(tiny_config(tiny_text_model, text_trainable_layers=1))
    texts = [CAPTIONS[(7 * i) % len(CAPTIONS)] + " again" * (i % 3) for i in range(12)]  # mixed lengths, unsorted
    input_ids, attention_mask = tokenize(tokenizer, texts, 32)
    groups = length_groups(attention_mask, 4)
    lengths = attention_mask.sum(1)
    assert sorted(torch.cat([rows for rows, _ in groups]).tolist()) == list(range(12))  # every text once
    assert [n for _, n in groups] == [int(lengths[rows].max()) for rows, _ in groups]
    assert groups[0][1] < attention_mask.shape[1]  # the short texts do run shorter
    ran = []
    with torch.no_grad():
        handle = model.text_encoder.layers[1].attention.register_forward_hook(lambda *args: ran.append(1))
        prefix = model.text_encoder.prefix(input_ids, attention_mask)  # as text_features caches it
        assert not ran  # the trainable layer above the prefix is not run for it ...
        full = model.text_encoder.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    handle.remove()
    assert torch.equal(prefix, full.hidden_states[1])  # ... and the prefix is what the whole encoder had there
    real = attention_mask.bool()[..., None]
    results = {}
    for count in (1, 4):
        monkeypatch.setattr(model_module, "CPU_LENGTH_GROUPS", count)
        for name, given in (("live", None), ("prefix", prefix)):
            model.zero_grad()
            hidden, pooled = model.text_encoder(input_ids, attention_mask, given)
            ((hidden * real).square().sum() + pooled.sum()).backward()
            grads = [p.grad.clone() for p in model.text_encoder.layers[1].parameters()]
            results[count, name] = hidden, pooled, grads
    for name in ("live", "prefix"):
        (one_h, one_p, one_g), (grouped_h, grouped_p, grouped_g) = results[1, name], results[4, name]
        assert torch.allclose(one_h * real, grouped_h * real, atol=1e-5)  # each text in its own row, as before
        for rows, longest in groups:  # past a group's longest text nothing is computed
            assert not grouped_h[rows, longest:].any()
        assert torch.allclose(one_p, grouped_p, atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(one_g, grouped_g))
    left_padded = attention_mask.flip(1)
    assert len(length_groups(left_padded, 4)) == 1  # padding not at the end: one batch, nothing cut
    assert len(length_groups(attention_mask[:6], 4)) == 1  # too few texts to split


def stored_arrays(features) -> dict:
    import h5py

    with h5py.File(features.path, "r") as f:
        return {name: f[name][:] for name in f}


def test_caption_encoding_stopped_midway_resumes_from_the_kept_parts_and_equals_an_uninterrupted_one(
        tiny_text_model, tmp_path, monkeypatch):
    from vlpcache.model import text_features
    from vlpcache.model.text_features import cached_text_features

    monkeypatch.setattr(text_features, "PART_CAPTIONS", 2)  # 6 captions: 3 parts
    model, tokenizer = build_model(tiny_config(tiny_text_model, text_trainable_layers=1))
    cpu = torch.device("cpu")
    whole = cached_text_features(model, tokenizer, CAPTIONS, tmp_path / "whole", with_words=True, device=cpu,
                                 progress=False)
    calls, live_prefix = [], model.text_encoder.prefix

    def prefix(*args, stop_at=None):
        calls.append(len(args[0]))
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return live_prefix(*args)

    monkeypatch.setattr(model.text_encoder, "prefix", lambda *a: prefix(*a, stop_at=2))  # Ctrl-C in the second part
    with pytest.raises(KeyboardInterrupt):
        cached_text_features(model, tokenizer, CAPTIONS, tmp_path / "ws", with_words=True, device=cpu, progress=False)
    folder = tmp_path / "ws" / "text-features"
    assert not list(folder.glob("*.h5")) and len(list(folder.glob("*.parts/part-*.npz"))) == 1
    calls.clear()
    monkeypatch.setattr(model.text_encoder, "prefix", prefix)
    lines = []
    resumed = cached_text_features(model, tokenizer, CAPTIONS, tmp_path / "ws", with_words=True, device=cpu,
                                   progress=False, say=lines.append)
    assert calls == [2, 2]  # only the two parts the stopped run had not kept
    assert len(lines) == 1 and lines[0].startswith("resuming: 2 of the 6 captions were encoded by a run that did not "), lines
    expected, got = stored_arrays(whole), stored_arrays(resumed)
    assert expected.keys() == got.keys() == {"tokens", "token_ids", "offsets", "captions"}
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
    assert sorted(p.name for p in folder.iterdir()) == [resumed.path.name]  # parts, temporaries and lock gone


def test_parts_that_a_kill_left_after_their_join_are_removed_by_the_next_run_that_reads_the_file(
        tiny_text_model, tmp_path, monkeypatch):
    from vlpcache.model.text_features import cached_text_features

    model, tokenizer = build_model(tiny_config(tiny_text_model, text_trainable_layers=1))
    cpu = torch.device("cpu")
    first = cached_text_features(model, tokenizer, CAPTIONS, tmp_path, with_words=True, device=cpu, progress=False)
    parts = first.path.with_suffix(".parts")  # as a kill -9 after the join, before the parts went, leaves them
    parts.mkdir()
    (parts / "part-000000.npz").write_bytes(b"x" * 100)
    monkeypatch.setattr(model.text_encoder, "prefix", lambda *a: pytest.fail("encoded again"))
    again = cached_text_features(model, tokenizer, CAPTIONS, tmp_path, with_words=True, device=cpu, progress=False)
    assert again.path == first.path and not parts.exists()
    assert sorted(p.name for p in first.path.parent.iterdir()) == [first.path.name]


def test_an_unreadable_kept_part_is_encoded_again(tiny_text_model, tmp_path, monkeypatch):
    from vlpcache.model import text_features
    from vlpcache.model.text_features import cached_text_features

    monkeypatch.setattr(text_features, "PART_CAPTIONS", 4)
    model, tokenizer = build_model(tiny_config(tiny_text_model, text_trainable_layers=0))
    cpu = torch.device("cpu")
    whole = cached_text_features(model, tokenizer, CAPTIONS, tmp_path / "whole", with_words=True, device=cpu,
                                 progress=False)
    parts = tmp_path / "ws" / "text-features" / whole.path.with_suffix(".parts").name
    parts.mkdir(parents=True)
    (parts / "part-000000.npz").write_bytes(b"PK\x03\x04 cut short by a crash")
    (parts / ".part-000001.npz.123.tmp.npz").write_bytes(b"a killed write")
    lines = []
    again = cached_text_features(model, tokenizer, CAPTIONS, tmp_path / "ws", with_words=True, device=cpu,
                                 progress=False, say=lines.append)
    assert lines == []  # nothing usable was kept: no resume to speak of
    expected, got = stored_arrays(whole), stored_arrays(again)
    assert expected.keys() == got.keys() and "pooled" in got
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
    assert not parts.exists()


def test_a_damaged_caption_file_is_encoded_again_with_one_line(tiny_text_model, tmp_path):
    from vlpcache.model.text_features import cached_text_features

    model, tokenizer = build_model(tiny_config(tiny_text_model, text_trainable_layers=1))
    cpu = torch.device("cpu")
    features = cached_text_features(model, tokenizer, CAPTIONS, tmp_path, with_words=True, device=cpu, progress=False)
    expected = stored_arrays(features)
    data = features.path.read_bytes()
    features.path.write_bytes(data[: len(data) // 2])  # cut short, as a failing disk or a bad copy leaves it
    lines = []
    again = cached_text_features(model, tokenizer, CAPTIONS, tmp_path, with_words=True, device=cpu, progress=False,
                                 say=lines.append)
    assert len(lines) == 1 and lines[0].startswith(f"{features.path}: unreadable (") and "truncated" in lines[0], lines
    assert lines[0].endswith("); encoding the captions again")
    got = stored_arrays(again)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)


def test_a_second_process_encoding_the_same_captions_waits_for_the_first_and_reads_its_file(tiny_text_model, tmp_path):
    import shutil
    import threading

    from vlpcache.locks import WriterLock
    from vlpcache.model.text_features import cached_text_features

    model, tokenizer = build_model(tiny_config(tiny_text_model, text_trainable_layers=0))
    cpu = torch.device("cpu")
    reference = cached_text_features(model, tokenizer, CAPTIONS, tmp_path / "elsewhere", with_words=True,
                                     device=cpu, progress=False)
    folder = tmp_path / "ws" / "text-features"
    folder.mkdir(parents=True)
    held = WriterLock.take(folder / reference.path.with_suffix(".lock").name)  # "another process" is encoding
    lines, result = [], {}
    waiter = threading.Thread(target=lambda: result.update(features=cached_text_features(
        model, tokenizer, CAPTIONS, tmp_path / "ws", with_words=True, device=cpu, progress=False, say=lines.append)))
    waiter.start()
    wait_until(lambda: lines)
    assert lines[0].startswith(f"waiting for pid {os.getpid()} on ") and lines[0].endswith("encoding the same captions")
    assert waiter.is_alive() and not list(folder.glob("*.h5"))
    shutil.copy(reference.path, folder / reference.path.name)  # the other process finishes its file
    written = os.stat(folder / reference.path.name).st_ino
    held.release()
    waiter.join(timeout=60)
    assert not waiter.is_alive() and result["features"].path == folder / reference.path.name
    assert sorted(p.name for p in folder.iterdir()) == [reference.path.name]
    assert os.stat(folder / reference.path.name).st_ino == written  # read, not encoded and replaced


def test_a_new_caption_encoding_says_what_else_the_folder_holds_and_how_big_it_is(tiny_text_model, tmp_path):
    from vlpcache.model.text_features import FEATURES_DIR, cached_text_features

    folder = tmp_path / FEATURES_DIR
    (folder / "0123456789abcdef01234567.parts").mkdir(parents=True)  # an encoding abandoned for good
    (folder / "0123456789abcdef01234567.parts" / "part-000000.npz").write_bytes(b"x" * 2**20)
    (folder / "76543210fedcba9876543210.h5").write_bytes(b"x" * 2 * 2**20)  # another caption set's file
    (folder / "76543210fedcba9876543210.lock").write_text("")
    model, tokenizer = build_model(tiny_config(tiny_text_model, text_trainable_layers=1))
    lines, cpu = [], torch.device("cpu")
    features = cached_text_features(model, tokenizer, CAPTIONS, tmp_path, with_words=True, device=cpu, progress=False,
                                    say=lines.append)
    assert lines == [f"{folder} also holds the caption features of 2 other caption set(s) or text model(s), 3.0 MiB: any "
                     "that no run is encoding can be deleted (a run that needs it encodes it again)"]
    lines.clear()
    cached_text_features(model, tokenizer, CAPTIONS, tmp_path, with_words=True, device=cpu, progress=False,
                         say=lines.append)
    assert lines == [] and features.path.parent == folder  # read, not encoded: nothing to say


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's heap")
def test_memory_freed_between_blocks_still_held_goes_back_to_the_system():
    # what `vlpcache index` met: each 1,024 videos' batch tensors freed between others still held stayed on the
    # heap, 150 MB a chunk, 18 GB over 100k videos; encode_videos hands them back at the end of each call
    from vlpcache.devices import release_freed_memory

    blocks = [bytearray(64 * 1024) for _ in range(4000)]  # 256 MB on the heap (below the mmap threshold)
    held = blocks[::50]  # a few stay, spread over the heap, so that it cannot simply shrink from its top
    del blocks
    before = _rss_bytes()
    release_freed_memory()
    assert before - _rss_bytes() > 128 * 2**20
    assert len(held) == 80
