"""The pretraining losses on hand-built cases: InfoNCE, region-word alignment (docs/design.md section 3)."""

import math
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vlpcache.model.losses import (
    ContrastiveLoss,
    multi_positive_cross_entropy,
    RegionWordLoss,
    focal_filter,
    region_word_alignment,
    region_word_score,
    rerank_score,
)

E = 16
LAM = 10.0


def basis(*indices: int) -> torch.Tensor:
    return torch.eye(E)[list(indices)]


def aligned_batch(batch=4, words=3, noise=0.05, seed=0):
    """Text b has words e_{3b}, e_{3b+1}, e_{3b+2}; video b holds regions near the same directions."""
    g = torch.Generator().manual_seed(seed)
    texts = torch.stack([basis(*range(words * b, words * b + words)) for b in range(batch)])  # (B, L, E)
    videos = texts.clone() + noise * torch.randn(texts.shape, generator=g)  # (B, R=L, E)
    return (
        F.normalize(texts, dim=-1),
        torch.ones(batch, words, dtype=torch.bool),
        F.normalize(videos, dim=-1),
        torch.ones(batch, words, dtype=torch.bool),
    )


def pad(x: torch.Tensor, mask: torch.Tensor, extra: int, garbage: float | None = None):
    """Append `extra` padded positions holding random garbage (or a constant such as NaN)."""
    shape = (*x.shape[:-2], extra, x.shape[-1])
    junk = torch.full(shape, garbage) if garbage is not None else 5 * torch.randn(shape)
    return torch.cat([x, junk], -2), torch.cat([mask, torch.zeros(mask.shape[:-1] + (extra,), dtype=torch.bool)], -1)


def test_perfectly_aligned_pairs_score_highest():
    words, word_mask, regions, region_mask = aligned_batch()
    scores = region_word_score(words, word_mask, regions, region_mask, LAM)  # (B, B)
    assert scores.shape == (4, 4)
    for b in range(4):
        assert scores[b].argmax() == b and scores[:, b].argmax() == b
    assert torch.allclose(scores.diagonal(), torch.full((4,), 2.0), atol=0.05)  # S_w→r + S_r→w ≈ 1 + 1


def test_extra_padding_with_garbage_changes_nothing():
    words, word_mask, regions, region_mask = aligned_batch()
    word_mask[1, 2] = False  # some padding already present
    region_mask[2, 0] = False
    reference = region_word_score(words, word_mask, regions, region_mask, LAM)
    for garbage in (None, float("nan"), 1e4):
        more_words, more_word_mask = pad(words, word_mask, 5, garbage)
        more_regions, more_region_mask = pad(regions, region_mask, 7, garbage)
        padded = region_word_score(more_words, more_word_mask, more_regions, more_region_mask, LAM)
        assert torch.allclose(padded, reference, atol=1e-6), garbage


def test_focal_filter_keeps_only_weights_above_the_mean_and_renormalises():
    attention = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    valid = torch.ones_like(attention, dtype=torch.bool)
    kept = focal_filter(attention, valid, dim=-1)
    assert torch.allclose(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # the mean counts valid entries only: over 3 valid regions it is 1/3, so 0.3 is dropped
    valid3 = torch.tensor([[True, True, True, False]])
    attention3 = torch.tensor([[0.6, 0.3, 0.1, 0.0]])
    assert torch.allclose(focal_filter(attention3, valid3, dim=-1), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    # uniform attention has nothing above its mean: all of it is kept
    uniform = torch.full((1, 4), 0.25)
    assert torch.allclose(focal_filter(uniform, valid, dim=-1), uniform)


def test_word_attention_is_focal_and_sums_to_one_over_real_regions():
    words, word_mask, regions, region_mask = aligned_batch(batch=1)
    regions, region_mask = pad(regions[0], region_mask[0], 3)
    details = region_word_alignment(words[0], word_mask[0], regions, region_mask, LAM)
    alpha = details.word_attention  # (L, R)
    assert torch.allclose(alpha.sum(-1), torch.ones(3))
    assert (alpha[:, ~region_mask] == 0).all()
    # each word attends to fewer regions than there are: focal filtering dropped the below-mean ones
    assert ((alpha > 0).sum(-1) < region_mask.sum()).all()
    # word t's attention peaks on its own region t
    assert (alpha[:, :3].argmax(-1) == torch.arange(3)).all()


def test_both_directions_contribute_to_the_score():
    # the video holds the text's 3 objects plus 3 objects the text does not mention
    words = basis(0, 1, 2)
    regions = basis(0, 1, 2, 3, 4, 5)
    wm, rm = torch.ones(3, dtype=torch.bool), torch.ones(6, dtype=torch.bool)
    alignment = region_word_alignment(words, wm, regions, rm, LAM)
    assert math.isclose(alignment.word_to_region.item(), 1.0, abs_tol=1e-4)  # every word finds its region
    assert alignment.region_to_word.item() < 0.8  # unmentioned regions find no word
    assert torch.allclose(alignment.score, alignment.word_to_region + alignment.region_to_word)
    # the converse: a caption mentioning objects the video lacks lowers word→region only
    converse = region_word_alignment(regions, rm, words, wm, LAM)
    assert converse.word_to_region.item() < 0.8
    assert math.isclose(converse.region_to_word.item(), 1.0, abs_tol=1e-4)


def test_masked_words_and_regions_take_no_attention_and_no_score():
    words, word_mask, regions, region_mask = aligned_batch(batch=1)
    word_mask[0, 1] = False
    region_mask[0, 2] = False
    details = region_word_alignment(words[0], word_mask[0], regions[0], region_mask[0], LAM)
    assert details.word_scores[1] == 0 and (details.word_attention[1] == 0).all()
    assert details.region_scores[2] == 0 and (details.region_attention[:, 2] == 0).all()
    assert (details.word_attention[:, 2] == 0).all() and (details.region_attention[1] == 0).all()
    # word 2's own region is masked, so its best remaining match is poor
    assert details.word_scores[2] < 0.5 and details.word_scores[0] > 0.95


def test_padded_words_and_regions_enter_no_mean():
    words, regions = basis(0, 1, 2), basis(0, 1, 5)
    alone = region_word_alignment(words[:2], torch.ones(2, dtype=torch.bool), regions[:2], torch.ones(2, dtype=torch.bool), LAM)
    # the same text and video with a third word and a third region, both padding (positions kept, not packed)
    padded = region_word_alignment(words, torch.tensor([True, True, False]), regions, torch.tensor([True, True, False]), LAM)
    assert math.isclose(alone.word_to_region.item(), 1.0, abs_tol=1e-4)  # each real word finds its region: mean 1
    assert torch.allclose(padded.word_to_region, alone.word_to_region, atol=1e-6)
    assert torch.allclose(padded.region_to_word, alone.region_to_word, atol=1e-6)


def test_region_word_loss_is_the_mean_of_its_text_to_video_and_video_to_text_cross_entropies():
    words, word_mask, regions, region_mask = aligned_batch(batch=4, noise=0.6, seed=2)
    regions[0] = regions[1]  # video 0 shows what text 1 says: S_loc is not symmetric
    scores = region_word_score(words, word_mask, regions, region_mask, LAM)  # (texts, videos)
    scale = 5.0
    text_to_video = -torch.stack([torch.log_softmax(scale * scores[b], 0)[b] for b in range(4)]).mean()
    video_to_text = -torch.stack([torch.log_softmax(scale * scores[:, b], 0)[b] for b in range(4)]).mean()
    assert abs(text_to_video - video_to_text) > 0.05  # the two directions differ here
    text = SimpleNamespace(words=words, word_mask=word_mask)
    video = SimpleNamespace(regions=regions, region_mask=region_mask)
    loss = RegionWordLoss(LAM)(text, video, torch.eye(4), torch.tensor(scale))
    assert torch.allclose(loss, (text_to_video + video_to_text) / 2, atol=1e-5)


def test_region_word_loss_gradient_reaches_real_tokens_only():
    words, word_mask, regions, region_mask = aligned_batch(noise=0.3)
    words, word_mask = pad(words, word_mask, 2)
    regions, region_mask = pad(regions, region_mask, 2)
    words.requires_grad_(True)
    regions.requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)
    text = SimpleNamespace(words=words, word_mask=word_mask)
    video = SimpleNamespace(regions=regions, region_mask=region_mask)
    loss = RegionWordLoss(LAM)(text, video, torch.eye(4), scale)
    loss.backward()
    assert torch.isfinite(loss)
    assert words.grad[word_mask].abs().sum() > 0 and regions.grad[region_mask].abs().sum() > 0
    assert (words.grad[~word_mask] == 0).all() and (regions.grad[~region_mask] == 0).all()
    assert scale.grad is not None and scale.grad != 0


def test_hard_negative_loss_with_every_negative_equals_full_batch_loss():
    words, word_mask, regions, region_mask = aligned_batch(batch=6, words=2, noise=0.5, seed=1)
    text = SimpleNamespace(words=words, word_mask=word_mask)
    video = SimpleNamespace(regions=regions, region_mask=region_mask)
    global_similarity = torch.randn(6, 6)
    full = RegionWordLoss(LAM, full_batch_max=64)(text, video, global_similarity, torch.tensor(5.0))
    hard_all = RegionWordLoss(LAM, hard_negatives=5, full_batch_max=0)(text, video, global_similarity, torch.tensor(5.0))
    hard_few = RegionWordLoss(LAM, hard_negatives=2, full_batch_max=0)(text, video, global_similarity, torch.tensor(5.0))
    assert torch.allclose(full, hard_all, atol=1e-5)
    assert torch.isfinite(hard_few) and hard_few < full  # fewer candidates, easier softmax


def test_contrastive_loss_prefers_matching_pairs_and_trains_the_temperature():
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(8, E, generator=g), dim=-1)
    video = F.normalize(text + 0.1 * torch.randn(8, E, generator=g), dim=-1)
    scale = torch.tensor(10.0, requires_grad=True)
    matched = ContrastiveLoss()(text, video, scale)
    shuffled = ContrastiveLoss()(text, video.roll(1, 0), scale)
    assert matched < shuffled
    matched.backward()
    assert scale.grad < 0  # sharper logits help a well-aligned batch


def _reference_multi_caption_loss(text, video, scale, per_video):
    """The symmetric multi-positive InfoNCE written out pair by pair, from its definition."""
    logits = scale * text @ video.T  # (B*K, B)
    owner = [i // per_video for i in range(len(text))]
    t2v = sum(-torch.log_softmax(logits[i], 0)[owner[i]] for i in range(len(text))) / len(text)
    terms = []
    for v in range(len(video)):
        negatives = [logits[i, v] for i in range(len(text)) if owner[i] != v]
        for i in (i for i in range(len(text)) if owner[i] == v):
            terms.append(-logits[i, v] + torch.logsumexp(torch.stack([logits[i, v], *negatives]), 0))
    return (t2v + sum(terms) / len(terms)) / 2


def test_contrastive_loss_with_several_captions_per_video_never_uses_own_captions_as_negatives():
    g = torch.Generator().manual_seed(3)
    video = F.normalize(torch.randn(4, E, generator=g), dim=-1)
    text = F.normalize(video.repeat_interleave(3, 0) + 0.5 * torch.randn(12, E, generator=g), dim=-1)  # 3 per video
    loss = ContrastiveLoss()(text, video, torch.tensor(10.0))
    assert torch.allclose(loss, _reference_multi_caption_loss(text, video, 10.0, 3), atol=1e-5)
    # every caption equal to its video, videos orthogonal: nearly zero loss; were a video's other
    # captions its negatives, video->text alone would cost log(3) / 2
    perfect = ContrastiveLoss()(basis(0, 1, 2, 3).repeat_interleave(3, 0), basis(0, 1, 2, 3), torch.tensor(10.0))
    assert perfect < 0.01


def test_multi_positive_cross_entropy_with_one_positive_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g)
    labels = torch.tensor([0, 3, 6, 2, 2])
    positive = F.one_hot(labels, 7).bool()
    assert torch.allclose(multi_positive_cross_entropy(logits, positive), F.cross_entropy(logits, labels), atol=1e-6)


def test_rerank_score_adds_weighted_local_score():
    assert torch.allclose(rerank_score(torch.tensor([0.5]), torch.tensor([1.0]), 0.25), torch.tensor([0.75]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gathered_loss_worker(rank: int, port: int, text, video, out_dir: str) -> None:
    import torch.distributed as dist

    from vlpcache.model.train import Processes, settle_before_destroy

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        per_video = len(text) // len(video)
        half = slice(rank * 4, rank * 4 + 4)
        t = text[rank * 4 * per_video : (rank + 1) * 4 * per_video].clone().requires_grad_(True)
        v = video[half].clone().requires_grad_(True)
        loss = ContrastiveLoss()(t, v, torch.tensor(10.0))
        loss.backward()
        torch.save({"loss": loss.detach(), "text_grad": t.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
        settle_before_destroy(Processes(rank=rank, world=2))  # torch < 2.8 could hang in destroy_process_group
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("per_video", [1, 3])
def test_contrastive_loss_all_gathers_negatives_across_processes_with_gloo(tmp_path, per_video):
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(8 * per_video, E, generator=g), dim=-1)
    video = F.normalize(torch.randn(8, E, generator=g), dim=-1)
    # spawn, not fork: a child forked from a parent whose OpenMP pool has run can hang in its first
    # parallel kernel (seen here: cross_entropy never returned)
    torch.multiprocessing.start_processes(
        _gathered_loss_worker, args=(_free_port(), text, video, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # one process over the whole batch: the mean of the per-process losses, and (DDP averages the
    # gradients of the processes) the same gradient
    t = text.clone().requires_grad_(True)
    full = ContrastiveLoss()(t, video, torch.tensor(10.0))
    full.backward()
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, full.detach(), atol=1e-5)
    averaged = torch.cat([ranks[0]["text_grad"], ranks[1]["text_grad"]]) / 2
    assert torch.allclose(averaged, t.grad, atol=1e-6)
