"""A plain-tensor front door to :class:`ranking.model.RankingModel` (Captum, TorchScript serving, training).

``PlainInputModel(model).forward(dense, sparse_ids, product_rows, query_rows, history_rows)``:

=============== ============ ========================================================================
input           shape/dtype  meaning (order and ids: :class:`ranking.spec.FeatureSpec`)
=============== ============ ========================================================================
dense           [B, D] f32   raw dense features in ``spec.dense_names`` order
sparse_ids      [B, S] i64   one id per sparse feature in ``spec.sparse_names`` order; negative ids
                             or ids beyond the training range go to the feature's reserved bucket
product_rows    [B] i64      product table row (``spec.product_rows``); out of range -> 0 (zeros)
query_rows      [B] i64      query table row (``spec.query_rows``); out of range -> 0 (zeros)
history_rows    [B, L] i64   purchase-history product rows, -1 = padding (any L; empty -> zeros)
=============== ============ ========================================================================

Returns logits ``[B]`` (apply ``torch.sigmoid`` for click probabilities). A local model (every
embedding collection a stock, unsharded EBC) is fed the sanitised ids directly
(:meth:`PlainFeatures.rows`, :meth:`ranking.model.RankingModel.forward_rows`); any other gets the
KeyedJaggedTensor built inside ``forward``. Either way ``torchrec.fx.symbolic_trace`` followed by
``torch.jit.script`` gives a module that loads with ``import torch, fbgemm_gpu`` alone.
Variants without tables ignore the three row inputs, so every variant has the same signature.

Distributed training (DMP) can shard ``PlainInputModel(model)`` as it is, or keep torchrec's
native signature: build the KJT from a batch with ``PlainInputModel(model).features(...)``
(a :class:`PlainFeatures`) and call ``model(dense, kjt)``.
"""
# No `from __future__ import annotations` here: fx copies the forward signature into the traced
# module, and TorchScript cannot read string annotations there.
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ranking.model import RankingModel
from ranking.tables import HISTORY_FEATURE, PRODUCT_FEATURE, QUERY_FEATURE


class PlainFeatures(nn.Module):
    """Plain id tensors -> the model's KeyedJaggedTensor (ids sanitised as the module docstring says).

    Args:
        sparse_num_embeddings: rows of each sparse feature's table (the last one is the reserved bucket).
        num_product_rows, num_query_rows: table sizes; 0 for a model without tables.
        use_history: whether to emit the ``purchase_history_84d`` bags.
    """

    def __init__(self, sparse_names: list[str], sparse_num_embeddings: list[int], num_product_rows: int = 0,
                 num_query_rows: int = 0, use_history: bool = False) -> None:
        super().__init__()
        self.register_buffer("reserved_bucket", torch.tensor([n - 1 for n in sparse_num_embeddings], dtype=torch.int64))
        self.use_tables: bool = num_product_rows > 0
        self.use_history: bool = use_history and self.use_tables
        self.num_product_rows, self.num_query_rows = num_product_rows, num_query_rows
        self.keys: list[str] = list(sparse_names) + (
            [PRODUCT_FEATURE, QUERY_FEATURE] + ([HISTORY_FEATURE] if self.use_history else []) if self.use_tables else [])

    def forward(self, sparse_ids: torch.Tensor, product_rows: torch.Tensor, query_rows: torch.Tensor,
                history_rows: torch.Tensor) -> KeyedJaggedTensor:
        """``[B, S]``, ``[B]``, ``[B]``, ``[B, L]`` int64 -> KJT with keys ``self.keys``."""
        ids, product, query, history, offsets = self.rows(sparse_ids, product_rows, query_rows, history_rows)
        values = [ids.t().reshape(-1)]
        lengths = [torch.ones_like(values[0])]
        if product is not None and query is not None:
            values += [product, query]
            lengths += [torch.ones_like(product), torch.ones_like(query)]
            if history is not None and offsets is not None:
                values.append(history)
                lengths.append(offsets[1:] - offsets[:-1])
        return KeyedJaggedTensor(keys=self.keys, values=torch.cat(values), lengths=torch.cat(lengths))

    def rows(self, sparse_ids: torch.Tensor, product_rows: torch.Tensor, query_rows: torch.Tensor,
             history_rows: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor],
                                                  Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The sanitised ids of :meth:`forward`'s KJT without the KJT: sparse ids ``[B, S]``, product
        and query rows ``[B]`` and the history bags (values and ``B + 1`` offsets); None for the
        parts the model has no tables for."""
        ids = torch.where((sparse_ids >= 0) & (sparse_ids < self.reserved_bucket), sparse_ids, self.reserved_bucket)
        if not self.use_tables:
            return ids, None, None, None, None
        product = torch.where((product_rows >= 0) & (product_rows < self.num_product_rows), product_rows,
                              torch.zeros_like(product_rows))
        query = torch.where((query_rows >= 0) & (query_rows < self.num_query_rows), query_rows,
                            torch.zeros_like(query_rows))
        if not self.use_history:
            return ids, product, query, None, None
        present = history_rows >= 0
        history = torch.masked_select(history_rows, present)
        history = torch.where(history < self.num_product_rows, history, torch.zeros_like(history))
        offsets = F.pad(present.sum(dim=1).cumsum(dim=0), (1, 0))
        return ids, product, query, history, offsets


class PlainInputModel(nn.Module):
    """Wraps a :class:`RankingModel`; see the module docstring for the signature."""

    def __init__(self, model: RankingModel) -> None:
        super().__init__()
        self.model = model
        spec, tower = model.spec, model.table_tower
        self.features = PlainFeatures(spec.sparse_names, spec.sparse_num_embeddings,
                                      tower.tables.num_product_rows if tower is not None else 0,
                                      tower.tables.num_query_rows if tower is not None else 0,
                                      tower is not None and tower.with_history)

    def forward(self, dense: torch.Tensor, sparse_ids: torch.Tensor, product_rows: torch.Tensor,
                query_rows: torch.Tensor, history_rows: torch.Tensor) -> torch.Tensor:
        """Plain tensors (see module docstring) -> logits ``[B]``. A local model (no sharded or
        quantized collection) is fed the sanitised ids directly (:meth:`RankingModel.forward_rows`),
        any other through the KJT."""
        if self.model.is_local():
            ids, product, query, history, offsets = self.features.rows(sparse_ids, product_rows, query_rows, history_rows)
            return self.model.forward_rows(dense, ids, product, query, history, offsets)
        return self.model(dense, self.features(sparse_ids, product_rows, query_rows, history_rows))
