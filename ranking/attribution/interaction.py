"""The trained ranking model fed at its interaction inputs, the values after every table lookup.

The model derives ``cos(p, q)`` and ``cos(p, h)`` from the looked-up vectors inside its table
tower, so permuting the table *rows* would move a vector and its cosines together. Importance
is therefore measured on :class:`InteractionInputModel`, the same trained weights fed with the
looked-up values as seven plain tensors: dense ``[B, D]``, the pooled sparse embeddings
``[B, S*E]``, the product, query and history vectors ``[B, d]`` and the two cosines ``[B]``,
computed once from the real rows (:func:`embed_batch`). Each feature group is a slice of one
tensor, so permuting ``product_embedding`` moves the product vector to another impression while
both cosines keep their original values, and permuting ``cosine_product_query`` moves only that
scalar. On unpermuted inputs it reproduces :class:`ranking.plain.PlainInputModel` (tested).
Permuting a sparse feature's pooled embedding across rows is the same as permuting its ids.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ranking.model import RankingModel
from ranking.plain import PlainInputModel
from ranking.tables import HISTORY_FEATURE, PRODUCT_FEATURE, QUERY_FEATURE

# Names of the InteractionInputModel inputs, in forward order.
DENSE, SPARSE, PRODUCT, QUERY, COSINE_PQ, HISTORY, COSINE_PH = (
    "dense", "sparse_embedded", "product", "query", "cosine_pq", "history", "cosine_ph")
INPUT_NAMES: tuple[str, ...] = (DENSE, SPARSE, PRODUCT, QUERY, COSINE_PQ, HISTORY, COSINE_PH)


class InteractionInputModel(nn.Module):
    """A trained :class:`RankingModel` fed with looked-up values instead of ids.

    ``forward(dense [B, D] raw, sparse_embedded [B, S*E] pooled sparse embeddings,
    product [B, d], query [B, d], cosine_pq [B], history [B, d], cosine_ph [B]) -> logits [B]``.
    Variants without tables take only the first two (the rest stay None); without history, the
    first five. With the values from :func:`embed_batch` it reproduces the wrapped model exactly;
    any input can then be changed on its own (e.g. a cosine without its vectors).
    """

    def __init__(self, model: RankingModel) -> None:
        super().__init__()
        self.model = model
        self.use_tables: bool = model.table_tower is not None
        self.use_history: bool = self.use_tables and model.table_tower.with_history

    def input_names(self) -> list[str]:
        """The inputs this variant reads, in forward order."""
        return list(INPUT_NAMES[: 2 + (3 if self.use_tables else 0) + (2 if self.use_history else 0)])

    def forward(self, dense: torch.Tensor, sparse_embedded: torch.Tensor, product: torch.Tensor | None = None,
                query: torch.Tensor | None = None, cosine_pq: torch.Tensor | None = None,
                history: torch.Tensor | None = None, cosine_ph: torch.Tensor | None = None) -> torch.Tensor:
        """See the class docstring; returns logits ``[B]``."""
        dcn = self.model.dcn_tower
        towers = [dcn.interact(dense, sparse_embedded if dcn.sparse_ebc is not None else None)]
        if self.use_tables:
            towers.append(self.model.table_tower.interact(product, query, cosine_pq, history, cosine_ph))
        return self.model.head(torch.cat(towers, dim=1)).squeeze(1)


@torch.no_grad()
def embed_batch(plain: PlainInputModel, dense: torch.Tensor, sparse_ids: torch.Tensor, product_rows: torch.Tensor,
                query_rows: torch.Tensor, history_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The :class:`InteractionInputModel` inputs of one batch of :class:`PlainInputModel` inputs.

    Takes ``dense [B, D]``, ``sparse_ids [B, S]``, ``product_rows [B]``, ``query_rows [B]`` and
    ``history_rows [B, L]`` (-1 = padding). Returns ``{dense [B, D], sparse_embedded [B, S*E],
    product, query, history [B, d], cosine_pq, cosine_ph [B]}`` (only the keys the variant
    reads). The cosines are computed as the table tower does (``eps=1e-8``: 0 against an
    all-zero vector).
    """
    model = plain.model
    features = plain.features(sparse_ids, product_rows, query_rows, history_rows)
    sparse_ebc = model.dcn_tower.sparse_ebc
    batch = dense.shape[0]
    out = {DENSE: dense.float(),
           SPARSE: sparse_ebc(features).values() if sparse_ebc is not None else torch.zeros(batch, 0)}
    if model.table_tower is not None:
        pooled = model.table_tower.tables(features).to_dict()
        product, query = pooled[PRODUCT_FEATURE], pooled[QUERY_FEATURE]
        out.update({PRODUCT: product, QUERY: query,
                    COSINE_PQ: F.cosine_similarity(product, query, dim=1, eps=1e-8)})
        if model.table_tower.with_history:
            history = pooled[HISTORY_FEATURE]
            out.update({HISTORY: history, COSINE_PH: F.cosine_similarity(product, history, dim=1, eps=1e-8)})
    return out
