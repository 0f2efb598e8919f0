"""embeddings.losses: ITC (local and over 2 gloo ranks), hard negatives, ITM, PQC."""
from __future__ import annotations

import math
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from common.distributed import close_process_group
from embeddings.losses import ITCLoss, ITMLoss, PQCLoss, mine_hard_negatives


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# --- ITC -----------------------------------------------------------------------------------------

def test_itc_matches_hand_computed_value():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    loss, sim = ITCLoss(init_temperature=0.5)(image, text)
    # logits = 2 * image @ text.T = [[2, 1.2], [0, 1.6]]
    assert torch.allclose(sim, torch.tensor([[2.0, 1.2], [0.0, 1.6]]))
    i2t = softplus(1.2 - 2.0) + softplus(0.0 - 1.6)  # rows
    t2i = softplus(0.0 - 2.0) + softplus(1.2 - 1.6)  # columns
    assert loss.item() == pytest.approx((i2t + t2i) / 4, rel=1e-6)


def test_itc_log_share_lowers_the_text_to_image_logits_of_frequent_images():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    share = torch.tensor([0.75, 0.25])
    loss, sim = ITCLoss(init_temperature=0.5)(image, text, share.log())
    assert torch.allclose(sim, torch.tensor([[2.0, 1.2], [0.0, 1.6]]))  # the mining input stays uncorrected
    low, high = math.log(0.25), math.log(0.75)
    i2t = softplus(1.2 - 2.0) + softplus(0.0 - 1.6)  # image rows: unchanged
    t2i = softplus((0.0 - low) - (2.0 - high)) + softplus((1.2 - high) - (1.6 - low))  # text rows, corrected columns
    assert loss.item() == pytest.approx((i2t + t2i) / 4, rel=1e-6)
    # equal shares shift every logit of a row alike: no correction
    even = ITCLoss(init_temperature=0.5)(image, text, torch.full((2,), 0.5).log())[0]
    assert even.item() == pytest.approx(ITCLoss(init_temperature=0.5)(image, text)[0].item(), rel=1e-6)
    with pytest.raises(ValueError, match="image_log_share"):
        ITCLoss()(image, text, torch.zeros(3))


def test_itc_log_share_lets_a_frequent_positive_keep_its_score():
    """Two texts share image 0 as their positive, one text has image 1: image 0 fills two slots of
    every batch. Without the correction, training the image vectors pushes image 0 down for text 2
    as often as it pulls it up for texts 0 and 1; with it image 0 ends with the higher mean score."""
    def mean_score_gap(correct: bool) -> float:
        gen = torch.Generator().manual_seed(0)
        text = F.normalize(torch.randn(3, 8, generator=gen), dim=-1)
        images = torch.nn.Parameter(F.normalize(torch.randn(2, 8, generator=gen), dim=-1))
        rows = torch.tensor([0, 0, 1])
        share = torch.tensor([2 / 3, 2 / 3, 1 / 3]).log() if correct else None
        itc, opt = ITCLoss(init_temperature=0.1, learnable=False), torch.optim.SGD([images], lr=0.5)
        for _ in range(200):
            opt.zero_grad()
            itc(F.normalize(images[rows], dim=-1), text, share)[0].backward()
            opt.step()
        scores = text @ F.normalize(images.detach(), dim=-1).T
        return float(scores[:, 0].mean() - scores[:, 1].mean())

    assert mean_score_gap(correct=True) > mean_score_gap(correct=False)


def test_itc_is_symmetric_in_its_inputs():
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    text = F.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    itc = ITCLoss()
    loss_it, sim_it = itc(image, text)
    loss_ti, sim_ti = itc(text, image)
    assert loss_it.item() == pytest.approx(loss_ti.item(), rel=1e-6)
    assert torch.allclose(sim_it, sim_ti.T)
    assert not sim_it.requires_grad


def test_itc_temperature_is_learnable_and_clamped():
    itc = ITCLoss(init_temperature=0.07)
    assert itc.temperature == pytest.approx(0.07, rel=1e-5)
    gen = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    loss, _ = itc(image, image)
    loss.backward()
    assert itc.logit_scale.grad is not None and itc.logit_scale.grad.abs().item() > 0
    # perfectly matched pairs: a sharper softmax lowers the loss
    assert itc.logit_scale.grad.item() < 0
    frozen = ITCLoss(learnable=False)
    assert not frozen.logit_scale.requires_grad
    hot = ITCLoss(init_temperature=0.001)
    assert hot.temperature == pytest.approx(0.01, rel=1e-5)  # scale clamped to 100


def test_itc_rejects_bad_shapes_and_missing_process_group():
    with pytest.raises(ValueError, match=r"\[B, d\]"):
        ITCLoss()(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="process group"):
        ITCLoss(distributed=True)(torch.eye(2), torch.eye(2))


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return F.normalize(torch.randn(6, 4, generator=gen), dim=-1), F.normalize(torch.randn(6, 4, generator=gen), dim=-1)


def _log_share() -> torch.Tensor:
    return torch.tensor([0.3, 0.1, 0.1, 0.2, 0.2, 0.1]).log()


def _itc_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=30))
    ended = False
    try:
        torch.set_num_threads(1)
        image, text = _global_batch()
        local = slice(rank * 3, (rank + 1) * 3)
        image_local = image[local].clone().requires_grad_(True)
        text_local = text[local].clone().requires_grad_(True)
        itc = ITCLoss(init_temperature=0.1)
        loss, sim = itc(image_local, text_local)
        loss.backward()
        corrected, _ = itc(image[local], text[local], _log_share()[local])
        torch.save({"loss": loss.detach(), "sim": sim, "grad_image": image_local.grad, "grad_text": text_local.grad,
                    "grad_scale": itc.logit_scale.grad, "corrected": corrected.detach()},
                   Path(out_dir) / f"rank{rank}.pt")
        ended = True
    finally:
        close_process_group(synchronize=ended)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(60)
def test_itc_over_two_gloo_ranks_equals_the_loss_on_the_concatenated_batch(tmp_path):
    mp.spawn(_itc_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    image, text = _global_batch()
    image.requires_grad_(True)
    text.requires_grad_(True)
    itc = ITCLoss(init_temperature=0.1)
    loss, sim = itc(image, text)
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        local = slice(rank * 3, (rank + 1) * 3)
        assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
        assert torch.allclose(got["sim"], sim[local, local], atol=1e-6)
        # gradients reach this rank's features and equal those of the global loss
        assert got["grad_image"].abs().sum() > 0
        assert torch.allclose(got["grad_image"], image.grad[local], atol=1e-6)
        assert torch.allclose(got["grad_text"], text.grad[local], atol=1e-6)
        assert got["grad_scale"].item() == pytest.approx(itc.logit_scale.grad.item(), rel=1e-5)
        # the per-image log shares of every rank are gathered with the features
        assert got["corrected"].item() == pytest.approx(itc(image, text, _log_share())[0].item(), rel=1e-6)


# --- hard negatives ------------------------------------------------------------------------------

def test_hard_negatives_never_pick_the_positive_or_a_masked_row():
    batch = 6
    gen = torch.Generator().manual_seed(0)
    sim = torch.randn(batch, batch, generator=gen) * 3 + torch.eye(batch) * 50  # the positive dominates
    mask = torch.zeros(batch, batch, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = True  # rows 0 and 1 are the same product
    for _ in range(50):
        neg_text, neg_image = mine_hard_negatives(sim, gen, mask)
        assert neg_text.dtype == torch.long and neg_text.shape == (batch,)
        rows = torch.arange(batch)
        assert not (neg_text == rows).any() and not (neg_image == rows).any()
        assert not mask[rows, neg_text].any() and not mask[neg_image, rows].any()


def test_hard_negatives_follow_the_similarity_softmax():
    sim = torch.tensor([[9.0, 5.0, 0.0], [0.0, 9.0, 5.0], [5.0, 0.0, 9.0]])
    gen = torch.Generator().manual_seed(3)
    picks_text, picks_image = (torch.stack(p) for p in zip(*(mine_hard_negatives(sim, gen) for _ in range(100))))
    # image 0: text 1 with p = e^5 / (e^5 + e^0) ~ 0.993
    assert (picks_text[:, 0] == 1).float().mean() > 0.9
    # text 0 (column 0): image 2 has similarity 5, image 1 has 0
    assert (picks_image[:, 0] == 2).float().mean() > 0.9


def test_hard_negatives_are_reproducible_and_need_a_candidate():
    sim = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    first = mine_hard_negatives(sim, torch.Generator().manual_seed(11))
    second = mine_hard_negatives(sim, torch.Generator().manual_seed(11))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(ValueError, match="no hard-negative candidate"):
        mine_hard_negatives(torch.zeros(1, 1), torch.Generator())
    with pytest.raises(ValueError, match="no hard-negative candidate for batch row 0"):
        mine_hard_negatives(torch.zeros(2, 2), torch.Generator(), torch.ones(2, 2, dtype=torch.bool))


# --- ITM -----------------------------------------------------------------------------------------

def test_itm_is_two_way_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    loss = ITMLoss()(logits, torch.tensor([0, 0]))
    assert loss.item() == pytest.approx((softplus(-2.0) + softplus(1.0)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        ITMLoss()(torch.zeros(3, 3), torch.zeros(3, dtype=torch.long))


# --- PQC -----------------------------------------------------------------------------------------

def test_pqc_equals_manual_softmax_cross_entropy():
    gen = torch.Generator().manual_seed(5)
    product = torch.randn(4, 8, generator=gen)
    queries = torch.randn(4, 1 + 3, 8, generator=gen)
    loss = PQCLoss(tau=0.05)(product, queries)
    expected = 0.0
    for b in range(4):
        cos = torch.stack([F.cosine_similarity(product[b], queries[b, j], dim=0) for j in range(4)])
        expected += -torch.log_softmax(cos / 0.05, dim=0)[0].item()
    assert loss.item() == pytest.approx(expected / 4, rel=1e-5)


def test_pqc_with_one_negative_is_logistic_on_the_cosine_gap():
    product = torch.tensor([[1.0, 0.0]])
    queries = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]])  # cosines 0.6 (positive) and 0.0; scale-free
    loss = PQCLoss(tau=0.1)(product, queries)
    assert loss.item() == pytest.approx(softplus(-(0.6 - 0.0) / 0.1), rel=1e-4)
    swapped = PQCLoss(tau=0.1)(product, queries.flip(1))
    assert swapped.item() > loss.item()


def test_pqc_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, 1\+N, d\]"):
        PQCLoss()(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="tau"):
        PQCLoss(tau=0.0)


def test_pqc_leaves_invalid_slots_out_of_the_softmax():
    gen = torch.Generator().manual_seed(7)
    anchor = torch.randn(3, 8, generator=gen)
    candidates = torch.randn(3, 1 + 4, 8, generator=gen)
    valid = torch.tensor([[True, True, False, True, False], [True] * 5, [True, False, False, False, False]])
    loss = PQCLoss(tau=0.1)(anchor, candidates, valid)
    expected = 0.0
    for b in range(3):
        kept = candidates[b][valid[b]]
        cos = F.cosine_similarity(anchor[b][None], kept, dim=1)
        expected += -torch.log_softmax(cos / 0.1, dim=0)[0].item()
    assert loss.item() == pytest.approx(expected / 3, rel=1e-5)  # a row with no negative adds 0
    with pytest.raises(ValueError, match="positive valid"):
        PQCLoss()(anchor, candidates, ~valid)
