"""DashCLIP training losses, each a standalone module (open_clip ``loss.py`` style).

Stage 1 (continual pretraining on the catalog, BLIP-style):

* :class:`ITCLoss`: image-text contrastive loss, symmetric InfoNCE with a learnable temperature.
  Under ``torch.distributed`` it contrasts against the features of every rank (global batch).
* :func:`mine_hard_negatives`: BLIP's hard-negative mining for ITM, sampled from the ITC
  similarities.
* :class:`ITMLoss`: image-text matching, 2-way cross entropy on matched / mismatched pairs.

Stage 2 (product-query alignment):

* :class:`PQCLoss`: the product-query contrastive loss, eq. 1 of the DashCLIP paper: one positive
  and N negative queries per product, cosine similarity over a fixed temperature.

Shapes: ``B`` batch size, ``d`` embedding width, ``W`` world size, ``N`` negatives per product.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

MAX_LOGIT_SCALE = 100.0


def _distributed_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(image_emb: torch.Tensor, text_emb: torch.Tensor, rank: int,
                    world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather ``[B, d]`` features from every rank into ``[W*B, d]``.

    ``all_gather`` returns tensors without autograd history, so the local slot is replaced by the
    local tensor itself: gradients flow into this rank's features, the other ranks' features are
    constants here (open_clip's ``gather_with_grad=False``). Since a rank's features enter the
    global loss only through its own slot, each rank gets the exact gradient of the global loss
    with respect to its own features (DDP's gradient averaging then scales parameter gradients by
    ``1/W``, as in open_clip). Every rank must pass the same ``B``.
    """
    gathered_image = [torch.zeros_like(image_emb) for _ in range(world_size)]
    gathered_text = [torch.zeros_like(text_emb) for _ in range(world_size)]
    dist.all_gather(gathered_image, image_emb.contiguous())
    dist.all_gather(gathered_text, text_emb.contiguous())
    gathered_image[rank] = image_emb
    gathered_text[rank] = text_emb
    return torch.cat(gathered_image), torch.cat(gathered_text)


class ITCLoss(nn.Module):
    """Image-text contrastive loss: symmetric InfoNCE with a learnable temperature.

    The temperature is stored as ``logit_scale = log(1 / temperature)`` (CLIP's parametrisation)
    and the scale is clamped to at most 100 (temperature >= 0.01) when used.

    Args:
        init_temperature: initial softmax temperature.
        learnable: whether ``logit_scale`` receives gradients.
        distributed: ``None`` (default) contrasts over the global batch when a default process
            group with more than one rank is initialised; ``True`` requires one; ``False`` always
            uses the local batch only.
    """

    def __init__(self, init_temperature: float = 0.07, learnable: bool = True,
                 distributed: bool | None = None) -> None:
        super().__init__()
        if init_temperature <= 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learnable)
        self.distributed = distributed

    @property
    def temperature(self) -> float:
        """The current temperature (after clamping)."""
        return float(1.0 / self._scale().detach())

    def _scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def _world(self) -> tuple[int, int]:
        if self.distributed is False:
            return 0, 1
        if self.distributed is True and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ITCLoss(distributed=True) needs an initialised torch.distributed process group")
        return _distributed_world()

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor,
                image_log_share: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric contrastive loss of matched rows.

        Args:
            image_emb: ``[B, d]`` L2-normalised image (or product) embeddings.
            text_emb: ``[B, d]`` L2-normalised text embeddings; row i matches ``image_emb[i]``.
            image_log_share: ``[B]`` optional, the log of the probability that row i's image (product)
                fills a batch slot. Subtracted from every text->image logit of that image (the positive
                included): the sampling-bias ("logQ") correction of in-batch negatives (Yi et al.,
                RecSys 2019). Without it an image drawn k times as often is also a negative k times as
                often, and the text->image direction learns ``log P(image | text) - log P(image)``: how
                often an image is a positive cancels out. With it that direction learns
                ``log P(image | text)``. The image->text direction is left as it is.

        In a distributed run every rank computes the same loss over the global ``W*B`` batch
        (its own rows are labelled ``rank*B + i``) and gradients flow into its local features.

        Returns:
            ``(loss, sim_i2t)``: the scalar loss, mean of image->text and text->image cross
            entropies over the (global) batch, and ``sim_i2t`` ``[B, B]``, the detached scaled
            similarities (logits) of the local images against the local texts, the input of
            :func:`mine_hard_negatives`.
        """
        if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
            raise ValueError(f"image_emb and text_emb must both be [B, d], got {tuple(image_emb.shape)} "
                             f"and {tuple(text_emb.shape)}")
        if image_log_share is not None and image_log_share.shape != image_emb.shape[:1]:
            raise ValueError(f"image_log_share must be [B] = [{image_emb.shape[0]}], got {tuple(image_log_share.shape)}")
        scale = self._scale()
        batch = image_emb.shape[0]
        rank, world_size = self._world()
        if world_size > 1:
            all_image, all_text = gather_features(image_emb, text_emb, rank, world_size)
        else:
            all_image, all_text = image_emb, text_emb
        logits_per_image = scale * all_image @ all_text.T  # [W*B, W*B]
        labels = torch.arange(all_image.shape[0], device=image_emb.device)
        logits_per_text = logits_per_image.T
        if image_log_share is not None:
            logits_per_text = logits_per_text - self._gather(image_log_share.detach(), rank, world_size)[None, :]
        loss = 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
        local = slice(rank * batch, (rank + 1) * batch)
        sim_i2t = logits_per_image[local, local].detach()
        return loss, sim_i2t

    @staticmethod
    def _gather(values: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        """``[B]`` per-row constants of every rank, concatenated ``[W*B]`` (no gradient)."""
        if world_size == 1:
            return values
        gathered = [torch.zeros_like(values) for _ in range(world_size)]
        dist.all_gather(gathered, values.contiguous())
        return torch.cat(gathered)


def mine_hard_negatives(sim_i2t: torch.Tensor, generator: torch.Generator,
                        same_product_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's hard negatives for ITM, sampled from the softmax of the ITC similarities.

    For each image, one text of the batch is drawn with probability ``softmax(sim_i2t[i])`` over
    the candidates; the matching text (diagonal) and every text flagged in ``same_product_mask``
    are excluded. Likewise one image per text from ``softmax(sim_i2t[:, j])``.

    Args:
        sim_i2t: ``[B, B]`` image->text similarities (logits), row i = image i.
        generator: the torch random generator to draw from (same device as ``sim_i2t``).
        same_product_mask: optional ``[B, B]`` bool, ``True`` where image i and text j describe
            the same product (never a negative). The diagonal is always excluded.

    Returns:
        ``(neg_text_for_image, neg_image_for_text)``, each ``[B]`` long: batch indices.

    Raises:
        ValueError: when a row has no candidate left (e.g. ``B == 1``).
    """
    if sim_i2t.ndim != 2 or sim_i2t.shape[0] != sim_i2t.shape[1]:
        raise ValueError(f"sim_i2t must be [B, B], got {tuple(sim_i2t.shape)}")
    batch = sim_i2t.shape[0]
    excluded = torch.eye(batch, dtype=torch.bool, device=sim_i2t.device)
    if same_product_mask is not None:
        if same_product_mask.shape != sim_i2t.shape:
            raise ValueError(f"same_product_mask must be [B, B] = {tuple(sim_i2t.shape)}, "
                             f"got {tuple(same_product_mask.shape)}")
        excluded = excluded | same_product_mask.to(device=sim_i2t.device, dtype=torch.bool)
    no_candidate = excluded.all(dim=1) | excluded.all(dim=0)
    if no_candidate.any():
        row = int(torch.nonzero(no_candidate)[0])
        raise ValueError(f"no hard-negative candidate for batch row {row}: every other row is masked "
                         f"(batch size {batch})")
    logits = sim_i2t.detach().float().masked_fill(excluded, float("-inf"))
    weights_i2t = torch.softmax(logits, dim=1)
    weights_t2i = torch.softmax(logits.T, dim=1)
    neg_text_for_image = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    neg_image_for_text = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    return neg_text_for_image, neg_image_for_text


class ITMLoss(nn.Module):
    """Image-text matching: cross entropy of the 2-way match head (1 = matched, 0 = not)."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Args: ``logits`` ``[N, 2]``, ``labels`` ``[N]`` long in {0, 1}. Returns the mean loss."""
        if logits.ndim != 2 or logits.shape[1] != 2:
            raise ValueError(f"ITM logits must be [N, 2], got {tuple(logits.shape)}")
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"ITM labels must be [N] = [{logits.shape[0]}], got {tuple(labels.shape)}")
        return F.cross_entropy(logits, labels.long())


class PQCLoss(nn.Module):
    """Product-query contrastive loss, eq. 1 of the DashCLIP paper.

    For product ``p`` with positive query ``q+`` and negatives ``q1..qN``::

        loss = -log( exp(cos(p, q+) / tau) / sum_{q in {q+, q1..qN}} exp(cos(p, q) / tau) )

    averaged over the batch. ``tau`` is a fixed hyperparameter. The same contrast with the roles
    swapped (a query as the anchor, its positive product against products it ranks lower) is the
    query-side term of stage 2; ``valid`` drops the empty candidate slots of such tuples.
    """

    def __init__(self, tau: float = 0.05) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tau = tau

    def forward(self, product_emb: torch.Tensor, query_emb: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            product_emb: ``[B, d]`` anchor embeddings (normalised here, cosine similarity).
            query_emb: ``[B, 1+N, d]`` candidate embeddings; index 0 of dim 1 is the positive.
            valid: ``[B, 1+N]`` bool, False = an empty slot left out of the softmax (the positive
                must be valid); None = every slot.

        Returns: the scalar mean loss.
        """
        if product_emb.ndim != 2 or query_emb.ndim != 3 or query_emb.shape[0] != product_emb.shape[0] \
                or query_emb.shape[2] != product_emb.shape[1] or query_emb.shape[1] < 2:
            raise ValueError(f"expected product_emb [B, d] and query_emb [B, 1+N, d] with N >= 1, got "
                             f"{tuple(product_emb.shape)} and {tuple(query_emb.shape)}")
        cosine = torch.einsum("bd,bnd->bn", F.normalize(product_emb, dim=-1), F.normalize(query_emb, dim=-1))
        logits = cosine / self.tau
        if valid is not None:
            if valid.shape != cosine.shape or not bool(valid[:, 0].all()):
                raise ValueError(f"valid must be [B, 1+N] = {tuple(cosine.shape)} with every positive valid")
            logits = logits.masked_fill(~valid, float("-inf"))
        targets = torch.zeros(product_emb.shape[0], dtype=torch.long, device=product_emb.device)
        return F.cross_entropy(logits, targets)
