"""One training step of each DashCLIP stage: its losses and the optimiser it updates with.

:func:`stage1_losses` (ITC, hard-negative ITM, multimodal ITC of a batch of (image, title) pairs)
and :func:`stage2_losses` (PQC, in-batch contrast and query-side contrast of a batch of tuples on
frozen product states) are the forward half of a step, in one process or as one rank's share of a
DDP step (:mod:`embeddings.distributed`); :func:`adamw` builds the optimiser. The training loop
(:mod:`embeddings.train`) and the throughput benchmark (:mod:`embeddings.bench`) both take their
steps from here, so the benchmark times the step that training runs. :class:`NonFinite` is the
error of a diverged step: :func:`stage1_losses` raises it when the image-text similarities are not
finite, the training loop when a loss is not.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from common.cli import UserError
from embeddings.distributed import Shard, tensor_from_main
from embeddings.losses import ITCLoss, ITMLoss, PQCLoss, gather_features, mine_hard_negatives
from embeddings.models import DashCLIP

Precision = Callable[[], contextlib.AbstractContextManager]


class NonFinite(UserError):
    """Training diverged: a loss or the similarities it is built from became NaN or infinite."""


def adamw(groups: list[dict[str, Any]], weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the parameter ``groups`` that have parameters (fused on CUDA)."""
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=device.type == "cuda")


def stage1_losses(model: DashCLIP, itc: ITCLoss, itm: ITMLoss, mm_itc: ITCLoss | None, pixels: torch.Tensor,
                  input_ids: torch.Tensor, attention_mask: torch.Tensor, same_title: torch.Tensor,
                  generator: torch.Generator, precision: Precision, shard: Shard = Shard()) -> dict[str, torch.Tensor]:
    """Stage-1 losses of a batch of B matched (image, title) pairs: ``itc``, ``itm`` and ``mm_itc``.

    pixels ``[B, 3, S, S]``, input_ids / attention_mask ``[B, L]``, same_title ``[B, B]`` bool (pairs
    that are never negatives of each other). ITM sees the B positives, one hard negative title per
    image and one hard negative image per title (3B grounded forward passes). With ``mm_itc``, the
    product embeddings of the B positives (multimodal projection of their grounded [CLS]) are also
    contrasted with the batch's title and image embeddings (mean of the two symmetric losses), which
    keeps the product content in the grounded [CLS]. ``precision`` opens the autocast region of the
    encoders; the losses themselves run in float32.

    In a DDP step (``shard`` of W ranks) every argument describes the global batch except
    ``pixels``, the images of this rank's block (:meth:`Shard.block`) ``[B/W, 3, S, S]``. The rank
    embeds its block; ``itc`` and ``mm_itc`` (:class:`embeddings.distributed.GlobalBatchITCLoss`)
    contrast the global batch; the hard negatives are mined from the similarities of the global
    batch (``generator`` is in the same state on every rank; rank 0's draw is broadcast, so the
    ranks agree even where devices round differently); the rank runs the ITM pairs whose image it
    holds (its positives, its images with their negative titles, and the titles of any rank whose
    negative image is one of its images), and its ITM loss is its share of the global mean, scaled
    by W so that the mean over the ranks is the single-process loss.
    """
    batch = input_ids.shape[0]
    local = shard.block(batch)
    with precision():
        tokens = model.image_tokens(pixels)
        image_emb = model.image_embedding(tokens).float()
        text_emb = model.text_embedding(input_ids[local], attention_mask[local]).float()
    losses = {}
    losses["itc"], sim_i2t = itc(image_emb, text_emb)
    if shard.distributed:
        all_image, all_text = gather_features(image_emb.detach(), text_emb.detach(), shard.rank, shard.world_size)
        sim_i2t = (1.0 / itc.temperature) * all_image @ all_text.T
    if not torch.isfinite(sim_i2t).all():  # the same global similarities on every rank: all stop together
        raise NonFinite("the image-text similarities are not finite")
    neg_text, neg_image = tensor_from_main(torch.stack(mine_hard_negatives(sim_i2t, generator, same_title)), shard)
    on_rank = (neg_image >= local.start) & (neg_image < local.stop)
    texts_of_own_negatives = torch.nonzero(on_rank).squeeze(1)  # in one process: every title, in order
    title_rows = torch.cat([torch.arange(local.start, local.stop, device=neg_text.device), neg_text[local],
                            texts_of_own_negatives])
    with precision():
        grounded = model.text_state(input_ids[title_rows], attention_mask[title_rows],
                                  torch.cat([tokens, tokens, tokens[neg_image[texts_of_own_negatives] - local.start]]))
        logits = model.itm_head(grounded)
    n_local = local.stop - local.start
    labels = torch.cat([torch.ones(n_local), torch.zeros(len(title_rows) - n_local)]).long().to(pixels.device)
    losses["itm"] = itm(logits.float(), labels) * (len(title_rows) * shard.world_size / (3 * batch))
    if mm_itc is not None:
        with precision():
            product_emb = model.product_embedding_from_state(grounded[:n_local]).float()
        losses["mm_itc"] = 0.5 * (mm_itc(product_emb, text_emb)[0] + mm_itc(product_emb, image_emb)[0])
    return losses


def stage2_losses(model: DashCLIP, pqc: PQCLoss, in_batch: ITCLoss | None, product_state: torch.Tensor,
                  query_prefix: torch.Tensor, query_mask: torch.Tensor, precision: Precision,
                  negative_product_state: torch.Tensor | None = None,
                  negative_product_valid: torch.Tensor | None = None,
                  query_slots: torch.Tensor | None = None,
                  product_log_share: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Stage-2 losses of B tuples: ``pqc``; with ``in_batch``, ``in_batch``; with negative products,
    ``query_side``.

    Inputs: frozen grounded states ``[B, Dt]`` and the tuples' queries as
    :meth:`DashCLIP.query_prefix_states` ``[B*(1+N), L, Dq]`` with mask ``[B*(1+N), L]``, flattened
    row-major (positive first in each tuple), or, with ``query_slots`` ``[B*(1+N)]`` (int64), the
    batch's distinct queries ``[Q, L, Dq]`` and each slot's row among them (a query that fills
    several slots is encoded once). PQC ranks each product's queries; it is blind to how
    a product scores against every query (a per-product offset leaves it unchanged), which is what
    retrieval over the catalog ranks on. ``in_batch`` adds the symmetric contrast of the B products
    with their B positive queries (each query against the batch's products, and vice versa);
    ``product_log_share`` ``[B]``, the log of each product's share of the tuples, corrects the
    query->product direction for how often a product is drawn (:class:`ITCLoss`), so that popular
    relevant products are not pushed down for being frequent negatives.
    ``query_side`` ranks, for each positive query, the tuple's product above M products that query
    ranks lower (:func:`embeddings.sampling.sample_negative_products`): frozen states
    ``[B, M, Dt]`` with ``negative_product_valid`` ``[B, M]`` bool (False = empty slot).
    """
    batch = product_state.shape[0]
    with precision():
        product = model.product_embedding_from_state(product_state).float()
        query = model.query_embedding_from_prefix(query_prefix, query_mask).float()
    if query_slots is not None:
        query = query[query_slots]
    query = query.view(batch, query.shape[0] // batch, -1)
    losses = {"pqc": pqc(product, query)}
    if in_batch is not None:
        losses["in_batch"] = in_batch(product, query[:, 0], product_log_share)[0]
    if negative_product_state is not None:
        with precision():
            negatives = model.product_embedding_from_state(negative_product_state).float()
        candidates = torch.cat([product[:, None], negatives], dim=1)
        valid = torch.cat([torch.ones_like(negative_product_valid[:, :1]), negative_product_valid], dim=1)
        losses["query_side"] = pqc(query[:, 0], candidates, valid)
    return losses
