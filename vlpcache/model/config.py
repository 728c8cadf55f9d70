"""Settings of the model and of a pretraining run, as plain data (no torch): stored as JSON in every run
directory, read back on --resume and by index/search, and the defaults `vlpcache pretrain --help` shows."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from vlpcache.devices import DEFAULT_DEVICE
from vlpcache.records import JsonRecord


@dataclass
class ModelConfig(JsonRecord):
    """Everything needed to rebuild the model; stored as JSON in every run directory."""

    feature_dim: int  # D of the region cache
    text_model: str = ""  # Hugging Face name or directory it was initialised from ("" = default_text_model())
    text_trainable_layers: int = 2  # top transformer layers of the text encoder that train; the rest is frozen
    # "mean" over tokens (how all-MiniLM-L6-v2 was trained) or "cls"; a new run takes the text model's
    # own (its sentence-transformers pooling config) unless --text-pooling says
    text_pooling: str = "mean"
    max_words: int = 32  # tokens per caption, special tokens included
    special_token_ids: list[int] = field(default_factory=list)  # excluded from words (filled from the tokenizer)
    # how a region token knows its frame's place in the item: "relative" embeds the frame's position
    # among the item's real frames in [0, 1] (a 2-frame folder at 0.25/0.75, an 8-frame video at
    # 1/16..15/16), "none" embeds nothing, "slot" (runs before schema 2 only) one learned vector per slot
    frame_time: str = "relative"
    max_frames: int = 64  # "slot" only: number of slot embeddings
    global_path: bool = True  # the whole-frame regions' mean over frames enters the video embedding
    text_head: str = "linear"  # text encoder -> joint space: "linear", or "mlp" (linear + a residual MLP)
    frame_dropout: float = 0.2  # training only: chance that a real frame is hidden (one always stays)
    region_dropout: float = 0.2  # training only: chance that a detected region is hidden (whole frames stay)
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


    @classmethod
    def from_json(cls, data: dict) -> "ModelConfig":
        """Configs of runs made before frame_time/global_path existed describe the model they trained."""
        legacy = {"frame_time": "slot", "global_path": False, "text_head": "linear"}
        return super().from_json({**{k: v for k, v in legacy.items() if k not in data}, **data})


# captions of a video per step by default: every caption of a typical video, at most these many
MAX_CAPTIONS_PER_VIDEO = 20  # text encoder frozen: a caption costs a lookup in the cached outputs
MAX_CAPTIONS_PER_VIDEO_TEXT_TRAINING = 4  # top text layers train: each caption costs a pass through them


@dataclass
class TrainConfig(JsonRecord):
    epochs: int = 10
    batch_size: int = 64  # videos per step and process
    # K captions of each video per step (multi-positive InfoNCE); None: the median number of captions
    # of a training video, at most MAX_CAPTIONS_PER_VIDEO(_TEXT_TRAINING) (MSR-VTT: 20 with a frozen
    # text encoder, 4 when it trains; Flickr8k: 5 / 4; alt-text data: 1)
    captions_per_video: int | None = None
    lr: float = 5e-4  # region encoder, projections, temperatures
    text_lr: float = 5e-5  # the pretrained text layers that train
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05  # of all steps
    grad_clip: float = 1.0
    seed: int = 0
    workers: int | None = None  # DataLoader workers per process (None: 0 on CPU, 4 on CUDA)
    # minutes of training between saves of the run's place within an epoch, which --resume continues from
    # and when Ctrl-C or SIGTERM stops it (0: never; a stopped epoch is redone)
    save_every: float = 30.0
    # the training step's arithmetic: "auto" is bf16 autocast on CUDA (fp16 with a gradient scaler where
    # bf16 is missing) and on CPUs with native bf16 (AVX512-BF16 or AMX), full precision on other CPUs;
    # "bf16" insists on it (refused where the hardware lacks it: emulated it is 10x slower or more), "fp32" never;
    # weights, validation and search stay in fp32
    precision: str = "auto"
    val_batch_size: int = 128
    caches: list[str] = dataclasses.field(default_factory=list)
    captions: list[str] = dataclasses.field(default_factory=list)
    val_captions: str | None = None
    # the run folder (resolved) where the locations above were recorded: a run moved or copied with its
    # data finds them at the same place relative to it (run_layout.located); None in older runs
    made_in: str | None = None

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        """Runs made before captions_per_video existed trained on one caption per video."""
        return super().from_json({"captions_per_video": 1, **data})


# options of `vlpcache pretrain` that set a TrainConfig field, and those that set a ModelConfig field
TRAIN_OPTIONS = ("epochs", "batch_size", "captions_per_video", "lr", "text_lr", "seed", "workers", "precision",
                 "save_every")
MODEL_OPTIONS = {"text_model": "text_model", "trainable_layers": "text_trainable_layers", "rwa_weight": "rwa_weight",
                 "width": "width", "layers": "layers", "frame_time": "frame_time", "global_path": "global_path",
                 "frame_dropout": "frame_dropout", "region_dropout": "region_dropout", "text_head": "text_head",
                 "max_words": "max_words", "text_pooling": "text_pooling"}
PRECISIONS = ("auto", "bf16", "fp32")  # pretrain --precision (train.autocast_for)
# what --resume may change: a longer schedule, other hardware, how often its place is saved
RESUMABLE_OPTIONS = ("epochs", "workers", "precision", "save_every")


@dataclass
class PretrainOptions:
    """What `vlpcache pretrain` was asked for. None takes the default for a new run, or the run's
    stored value on --resume (where any other value is refused)."""

    cache_dirs: tuple = ()
    captions: tuple = ()
    val_captions: str | None = None
    run_dir: str | None = None
    resume: bool = False
    no_rwa: bool = False
    device: str = DEFAULT_DEVICE
    quiet: bool = False
    epochs: int | None = None
    batch_size: int | None = None
    captions_per_video: int | None = None
    lr: float | None = None
    text_lr: float | None = None
    seed: int | None = None
    workers: int | None = None
    precision: str | None = None
    save_every: float | None = None
    text_model: str | None = None
    trainable_layers: int | None = None
    rwa_weight: float | None = None
    width: int | None = None
    layers: int | None = None
    frame_time: str | None = None
    global_path: bool | None = None
    frame_dropout: float | None = None
    region_dropout: float | None = None
    text_head: str | None = None
    max_words: int | None = None
    text_pooling: str | None = None
    init: str | None = None  # a run's folder or checkpoint that a new run starts from (finetune.py)


def differing_model_options(options: PretrainOptions, config: ModelConfig) -> list[tuple[str, object, str, object]]:
    """Each model option given that differs from `config`: (its ModelConfig field, the value given, "--option VALUE",
    what config has, "the default text model" for the "" a run records for it)."""
    found = []
    for option, name in MODEL_OPTIONS.items():
        value, had = getattr(options, option), getattr(config, name)
        if value is not None and value != had and not (name == "text_model" and same_folder(value, had)):
            if name == "text_model" and not had:  # "" is the default model of the vlpcache that trained it
                had = "the default text model"
            found.append((name, value, f"--{option.replace('_', '-')} {value}", had))
    return found


def same_folder(given: str, recorded: str) -> bool:
    """Whether --text-model names the folder a run records (given relative to the current folder, say)."""
    try:
        return bool(recorded) and os.path.samefile(given, recorded)
    except OSError:  # not a folder of this machine: a Hugging Face name
        return False


def captions_per_video_cap(trainable_layers: int | None) -> int:
    """The most captions per video a default run uses, given the text layers that train (None: the default)."""
    layers = ModelConfig.text_trainable_layers if trainable_layers is None else trainable_layers
    return MAX_CAPTIONS_PER_VIDEO if layers == 0 else MAX_CAPTIONS_PER_VIDEO_TEXT_TRAINING
