"""Pretraining losses: video-text InfoNCE and bidirectional region-word alignment (docs/design.md section 3).

Both are small modules with the distributed detail inside them (open_clip's ClipLoss style): under
torch.distributed the global embeddings of every process are all-gathered, with gradients, so each
process contrasts its captions against the videos of the whole global batch.

Region-word alignment (RWA), for one text (words w_t, t over real words) and one video (regions r_i,
i over real regions), all in the joint space:

    a_it  = LeakyReLU_0.1(cos(r_i, w_t))
    word -> region:  â = a L2-normalised over words;   α_it = softmax_i(λ â_it)
                     focal: keep α_it > 1/R (R = real regions), renormalise
                     c_t = Σ_i α_it r_i;    S_w→r = mean_t cos(w_t, c_t)
    region -> word:  â = a L2-normalised over regions; β_ti = softmax_t(λ â_it)
                     focal: keep β_ti > 1/L (L = real words), renormalise
                     c_i = Σ_t β_ti w_t;    S_r→w = mean_i cos(r_i, c_i)
    S_loc = S_w→r + S_r→w                                  (in [-2, 2])

Padded words and regions are zeroed before anything else, take no attention and are left out of every
mean, so the amount of padding (and whatever values it holds) never changes a score.

cos(w_t, c_t) is computed without materialising c_t: w_t·c_t = Σ_i α_it cos(w_t, r_i) and
|c_t|² = αᵀ G α with G the regions' Gram matrix, so every pair costs L×R×(R+L) instead of L×R×E.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

EPS = 1e-6


# ---------------------------------------------------------------- distributed gather


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands each process the gradient of its own shard,
    summed over every process's loss (all_reduce), so negatives from other processes train too.
    Works with gloo (CPU) and nccl; every process must contribute the same number of rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_batch(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(world * B, ...) rows of every process, and the offset of this process's rows in them."""
    if not distributed():
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


def symmetric_cross_entropy(logits_t2v: torch.Tensor, logits_v2t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (F.cross_entropy(logits_t2v, labels) + F.cross_entropy(logits_v2t, labels)) / 2


# ---------------------------------------------------------------- video-text InfoNCE


def multi_positive_cross_entropy(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over positive pairs of -log(e^s_pos / (e^s_pos + Σ_negatives e^s)): each positive is
    contrasted with the row's negatives only, never with the row's other positives.

    logits (B, C), positive (B, C) bool. With one positive per row this is the usual cross-entropy.
    """
    negatives = torch.logsumexp(logits.masked_fill(positive, float("-inf")), dim=1, keepdim=True)  # (B, 1)
    return (torch.logaddexp(logits, negatives) - logits)[positive].mean()


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE between the global text and video embeddings of a batch (and, under DDP,
    of every process's batch). The temperature is the model's learnable logit scale.

    Each video may come with K captions (rows b*K .. b*K+K-1 of text describe video b): text->video
    has one positive per caption; video->text has K, none of which is a negative of the others."""

    def forward(self, text: torch.Tensor, video: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        # text (B*K, E), video (B, E): L2-normalised
        per_video = text.shape[0] // video.shape[0]
        all_text, text_offset = gather_batch(text)  # (W*B*K, E)
        all_video, video_offset = gather_batch(video)  # (W*B, E)
        owner = torch.arange(all_text.shape[0], device=text.device) // per_video  # (W*B*K,) video of each caption
        logits_t2v = logit_scale * text.float() @ all_video.float().T  # (B*K, W*B)
        logits_v2t = logit_scale * video.float() @ all_text.float().T  # (B, W*B*K)
        own = torch.arange(video.shape[0], device=video.device) + video_offset  # (B,)
        t2v = F.cross_entropy(logits_t2v, owner[text_offset : text_offset + text.shape[0]])
        v2t = multi_positive_cross_entropy(logits_v2t, owner[None, :] == own[:, None])
        return (t2v + v2t) / 2


# ---------------------------------------------------------------- region-word alignment


class RegionWordAlignment(NamedTuple):
    """Scores and attentions of text/video pairs; leading dims are the broadcast pair dims."""

    score: torch.Tensor  # (...,) S_loc = S_w→r + S_r→w
    word_to_region: torch.Tensor  # (...,) S_w→r
    region_to_word: torch.Tensor  # (...,) S_r→w
    word_attention: torch.Tensor  # (..., L, R) α after focal filtering; rows of real words sum to 1
    region_attention: torch.Tensor  # (..., L, R) β after focal filtering; columns of real regions sum to 1
    word_scores: torch.Tensor  # (..., L) cos(w_t, c_t), 0 for padded words
    region_scores: torch.Tensor  # (..., R) cos(r_i, c_i), 0 for padded regions


def focal_filter(attention: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    """Keep the attention weights above their mean (1 / number of valid entries) and renormalise.

    A uniform distribution (nothing strictly above the mean) keeps its maxima, i.e. everything.
    """
    count = valid.sum(dim, keepdim=True).clamp_min(1)
    keep = (attention > 1.0 / count) | (attention >= attention.amax(dim, keepdim=True))
    kept = attention * (keep & valid)
    return kept / kept.sum(dim, keepdim=True).clamp_min(EPS)


def _masked_softmax(logits: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    weights = torch.softmax(logits.masked_fill(~valid, torch.finfo(logits.dtype).min), dim=dim)
    return weights * valid  # a text with no words or a video with no regions attends to nothing


def pack_tokens(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the front (order kept) and drop the columns that are padding
    in every row: (B, R, E), (B, R) -> (B, R', E), (B, R'). RWA is blind to padding, so this changes
    no score, while a T=8 cache of 2-frame clips with ~6 regions per frame shrinks R from 248 to ~30."""
    mask = mask.bool()
    used = max(1, int(mask.sum(-1).max())) if mask.numel() else 1
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :used]  # (B, R')
    return tokens.gather(-2, order[..., None].expand(*order.shape, tokens.shape[-1])), mask.gather(-1, order)


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return (values * valid).sum(-1) / valid.sum(-1).clamp_min(1)


def region_word_alignment(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    regions: torch.Tensor,
    region_mask: torch.Tensor,
    lam: float,
) -> RegionWordAlignment:
    """RWA of every pair given by broadcasting words (..., L, E) against regions (..., R, E).

    E.g. words[:, None], regions[None] give all (Bt, Bv) pairs. Computed in float32.
    """
    words, word_mask = _unit_tokens(words, word_mask)
    regions, region_mask = _unit_tokens(regions, region_mask)
    cosine = words @ regions.transpose(-1, -2)  # (..., L, R)
    word_gram = words @ words.transpose(-1, -2)  # (..., L, L)
    region_gram = regions @ regions.transpose(-1, -2)  # (..., R, R)
    return _alignment_from_cosine(cosine, word_gram, region_gram, word_mask, region_mask, lam)


def _unit_tokens(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # zero padding first: whatever it holds (even NaN) cannot leak into a score
    mask = mask.bool()
    return F.normalize(tokens.float().masked_fill(~mask[..., None], 0), dim=-1, eps=EPS), mask


def _alignment_from_cosine(
    cosine: torch.Tensor,  # (..., L, R) cos(w_t, r_i), 0 where either is padding
    word_gram: torch.Tensor,  # (..., L, L) cos(w_t, w_s)
    region_gram: torch.Tensor,  # (..., R, R) cos(r_i, r_j)
    word_mask: torch.Tensor,  # (..., L)
    region_mask: torch.Tensor,  # (..., R)
    lam: float,
) -> RegionWordAlignment:
    word_valid = word_mask[..., :, None]  # (..., L, 1)
    region_valid = region_mask[..., None, :]  # (..., 1, R)
    valid = word_valid & region_valid  # (..., L, R)
    a = F.leaky_relu(cosine, 0.1).masked_fill(~valid, 0)

    # word -> region: attend regions (softmax over R) with scores normalised over words
    a_hat = a / a.norm(dim=-2, keepdim=True).clamp_min(EPS)
    alpha = focal_filter(_masked_softmax(lam * a_hat, valid, dim=-1), valid, dim=-1)  # (..., L, R)
    context_dot = (alpha * cosine).sum(-1)  # (..., L)  w_t · c_t
    context_norm = ((alpha @ region_gram) * alpha).sum(-1).clamp_min(EPS).sqrt()  # (..., L)  |c_t|
    word_scores = (context_dot / context_norm) * word_mask
    s_w2r = _masked_mean(word_scores, word_mask.expand_as(word_scores))

    # region -> word: attend words (softmax over L) with scores normalised over regions
    a_hat = a / a.norm(dim=-1, keepdim=True).clamp_min(EPS)
    beta = focal_filter(_masked_softmax(lam * a_hat, valid, dim=-2), valid, dim=-2)  # (..., L, R)
    context_dot = (beta * cosine).sum(-2)  # (..., R)  r_i · c_i
    context_norm = ((word_gram @ beta) * beta).sum(-2).clamp_min(EPS).sqrt()  # (..., R)  |c_i|
    region_scores = (context_dot / context_norm) * region_mask
    s_r2w = _masked_mean(region_scores, region_mask.expand_as(region_scores))

    return RegionWordAlignment(s_w2r + s_r2w, s_w2r, s_r2w, alpha, beta, word_scores, region_scores)


class TokenSets(NamedTuple):
    """Words of Bt texts and regions of Bv videos, packed, L2-normalised, with their Gram matrices:
    computed once, then scored for any pairs (pair_scores)."""

    words: torch.Tensor  # (Bt, L, E)
    word_mask: torch.Tensor  # (Bt, L)
    word_gram: torch.Tensor  # (Bt, L, L)
    regions: torch.Tensor  # (Bv, R, E)
    region_mask: torch.Tensor  # (Bv, R)
    region_gram: torch.Tensor  # (Bv, R, R)


def token_sets(words: torch.Tensor, word_mask: torch.Tensor, regions: torch.Tensor, region_mask: torch.Tensor) -> TokenSets:
    words, word_mask = _unit_tokens(*pack_tokens(words, word_mask))  # (Bt, L, E)
    regions, region_mask = _unit_tokens(*pack_tokens(regions, region_mask))  # (Bv, R, E)
    return TokenSets(words, word_mask, words @ words.transpose(-1, -2), regions, region_mask,
                     regions @ regions.transpose(-1, -2))


def pair_scores(sets: TokenSets, texts: torch.Tensor, videos: torch.Tensor, lam: float) -> torch.Tensor:
    """S_loc of the pairs (texts[...], videos[...]): two index tensors that broadcast to the pairs'
    shape, e.g. texts (c, 1) and videos (c, P) for each of c texts against P videos of its own."""
    word_mask, region_mask = sets.word_mask[texts], sets.region_mask[videos]
    # tokens are packed to the front: columns that are padding for every pair here are dropped (exact)
    L = max(1, int(word_mask.sum(-1).max())) if word_mask.numel() else 1
    R = max(1, int(region_mask.sum(-1).max())) if region_mask.numel() else 1
    cosine = sets.words[:, :L][texts] @ sets.regions[:, :R][videos].transpose(-1, -2)  # (..., L, R)
    return _alignment_from_cosine(cosine, sets.word_gram[:, :L, :L][texts], sets.region_gram[:, :R, :R][videos],
                                  word_mask[..., :L], region_mask[..., :R], lam).score


def region_word_score(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    regions: torch.Tensor,
    region_mask: torch.Tensor,
    lam: float,
    chunk: int = 32,
) -> torch.Tensor:
    """S_loc of every text against every video: words (Bt, L, E), regions (Bv, R, E) -> (Bt, Bv).

    Texts are processed `chunk` at a time to bound memory (Bt×Bv×L×R floats per intermediate).
    """
    sets = token_sets(words, word_mask, regions, region_mask)
    videos = torch.arange(regions.shape[0], device=regions.device)[None]  # (1, Bv)
    rows = [pair_scores(sets, torch.arange(start, min(start + chunk, words.shape[0]), device=words.device)[:, None],
                        videos, lam) for start in range(0, words.shape[0], chunk)]
    if not rows:
        return words.new_zeros((0, regions.shape[0]), dtype=torch.float32)
    return torch.cat(rows)


def rerank_score(global_similarity: torch.Tensor, local_score: torch.Tensor, rerank_weight: float) -> torch.Tensor:
    """The score search and eval rank by after re-ranking: global cosine + weight · S_loc."""
    return global_similarity + rerank_weight * local_score


class RegionWordLoss(nn.Module):
    """Contrastive loss on S_loc over the (local) batch, text→video and video→text.

    S_loc costs Bt×Bv×L×R×(L+R): above `full_batch_max` pairs per side, each text is scored against
    its own video and its `hard_negatives` most similar other videos by global similarity (and each
    video likewise against texts) instead of the whole batch.
    """

    def __init__(self, lam: float, hard_negatives: int = 15, full_batch_max: int = 32):
        super().__init__()
        self.lam = lam
        self.hard_negatives = hard_negatives
        self.full_batch_max = full_batch_max

    def forward(self, text, video, global_similarity: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        # text: TextEmbedding (words (B, L, E), word_mask (B, L)); video: VideoEmbedding (regions (B, R, E), region_mask)
        batch = text.words.shape[0]
        labels = torch.arange(batch, device=text.words.device)
        if batch <= self.full_batch_max:
            scores = region_word_score(text.words, text.word_mask, video.regions, video.region_mask, self.lam)  # (B, B)
            return symmetric_cross_entropy(logit_scale * scores, logit_scale * scores.T, labels)
        # candidates: the positive first, then the hardest negatives by global similarity
        k = min(self.hard_negatives, batch - 1)
        sim = global_similarity.detach().float().clone()
        sim.fill_diagonal_(float("-inf"))
        videos_of_text = torch.cat([labels[:, None], sim.topk(k, dim=1).indices], 1)  # (B, 1+k)
        texts_of_video = torch.cat([labels[:, None], sim.T.topk(k, dim=1).indices], 1)  # (B, 1+k)
        # Gram matrices once per token set, then each candidate pair scored
        sets = token_sets(text.words, text.word_mask, video.regions, video.region_mask)
        rows = labels[:, None]
        t2v = pair_scores(sets, rows, videos_of_text, self.lam)  # (B, 1+k)
        v2t = pair_scores(sets, texts_of_video, rows, self.lam)  # (B, 1+k)
        target = torch.zeros_like(labels)
        return symmetric_cross_entropy(logit_scale * t2v, logit_scale * v2t, target)
