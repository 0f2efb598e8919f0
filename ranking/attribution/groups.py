"""Feature groups, and the rows under study as grouped :class:`InteractionInputModel` inputs.

Groups, in report order: ``query_embedding``, ``product_embedding``, ``purchase_history`` (the
mean-pooled 84-day bag), ``cosine_product_query``, ``cosine_product_history`` (only those the
variant has), then every dense feature and every sparse feature under its impressions column
name. Each group is a slice of one :class:`InteractionInputModel` input, so Captum permutes (or
ablates) exactly that slice.

Baselines (ablation and integrated gradients): zeros for the vectors and cosines (row 0, the
unknown id / empty history), the training mean for a dense feature, the embedding of the most
frequent training id for a sparse feature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ranking.attribution.interaction import (COSINE_PH, COSINE_PQ, DENSE, HISTORY, PRODUCT, QUERY, SPARSE,
                                             InteractionInputModel, embed_batch)
from ranking.features import ImpressionCache, RankingBatch, RankingData
from ranking.model import RankingModel
from ranking.plain import PlainInputModel

# Table groups: (group name, input name), in report order.
TABLE_GROUPS: tuple[tuple[str, str], ...] = (
    ("query_embedding", QUERY), ("product_embedding", PRODUCT), ("purchase_history", HISTORY),
    ("cosine_product_query", COSINE_PQ), ("cosine_product_history", COSINE_PH))


@dataclass(frozen=True)
class FeatureGroup:
    """A feature group: columns ``[start, stop)`` of 2-D input ``input`` (``None``: the whole
    input, e.g. a 1-D cosine). ``kind`` is ``table``, ``dense`` or ``sparse``."""

    name: str
    kind: Literal["table", "dense", "sparse"]
    input: str
    columns: tuple[int, int] | None = None


def feature_groups(model: RankingModel) -> list[FeatureGroup]:
    """The groups of ``model``: table groups it has, then dense and sparse features by column name."""
    present = set(InteractionInputModel(model).input_names())
    groups = [FeatureGroup(name, "table", name_in, None if name_in in (COSINE_PQ, COSINE_PH) else (0, model.table_tower.tables.dim))
              for name, name_in in TABLE_GROUPS if name_in in present]
    groups += [FeatureGroup(name, "dense", DENSE, (j, j + 1)) for j, name in enumerate(model.spec.dense_names)]
    ebc = model.dcn_tower.sparse_ebc
    if ebc is not None:
        widths = {f: cfg.embedding_dim for cfg in ebc.embedding_bag_configs() for f in cfg.feature_names}
        start = 0
        for name in model.spec.sparse_names:  # KeyedTensor order = table order = spec order
            groups.append(FeatureGroup(name, "sparse", SPARSE, (start, start + widths[name])))
            start += widths[name]
    return groups


@dataclass
class ImportanceInputs:
    """The rows under study as :class:`InteractionInputModel` inputs, their labels and the groups."""

    tensors: dict[str, torch.Tensor]  # input name -> [N, ...]
    labels: np.ndarray  # [N] clicks
    groups: list[FeatureGroup]
    baselines: dict[str, torch.Tensor]  # input name -> [...] (one row, without the batch dim)

    @property
    def names(self) -> list[str]:
        """Inputs handed to Captum: those some group covers (others stay fixed)."""
        used = {g.input for g in self.groups}
        return [n for n in self.tensors if n in used]

    def captum_inputs(self, rows: slice | np.ndarray = slice(None)) -> tuple[torch.Tensor, ...]:
        """The inputs named by :attr:`names`, rows ``rows`` of each (``[R, ...]``)."""
        return tuple(self.tensors[n][rows] for n in self.names)

    def fixed_inputs(self, rows: slice | np.ndarray = slice(None)) -> dict[str, torch.Tensor]:
        """The inputs no group covers (name -> rows ``rows``, ``[R, ...]``): passed through unchanged."""
        return {n: t[rows] for n, t in self.tensors.items() if n not in self.names}

    def feature_masks(self) -> tuple[torch.Tensor, ...]:
        """One mask per Captum input, shape ``(1, width)`` (``(1,)`` for a 1-D input); group ``i``
        has id ``i`` (ids are global across inputs)."""
        masks = {n: torch.full((1, *self.tensors[n].shape[1:]), -1, dtype=torch.long) if self.tensors[n].dim() > 1
                 else torch.full((1,), -1, dtype=torch.long) for n in self.names}
        for i, g in enumerate(self.groups):
            if g.columns is None:
                masks[g.input][...] = i
            else:
                masks[g.input][:, g.columns[0]:g.columns[1]] = i
        for n, m in masks.items():
            if (m < 0).any():
                raise ValueError(f"input {n}: columns {torch.nonzero(m[0] < 0).flatten().tolist()} belong to no group")
        return tuple(masks[n] for n in self.names)

    def baseline_inputs(self) -> tuple[torch.Tensor | float, ...]:
        """Captum baselines: per input one row without the batch dim (a float for 1-D inputs)."""
        return tuple(float(self.baselines[n]) if self.tensors[n].dim() == 1 else self.baselines[n] for n in self.names)

    def group_values(self, attributions: Sequence[torch.Tensor], reduce: Literal["first", "sum"]) -> np.ndarray:
        """``[G, N]`` per-impression attribution of each group: the value of its first element
        (perturbation methods repeat it over the group) or the sum over its elements (IG)."""
        by_name = dict(zip(self.names, attributions))
        out = []
        for g in self.groups:
            attr = by_name[g.input].detach().double()
            if g.columns is None:
                out.append(attr.reshape(attr.shape[0]))
            elif reduce == "first":
                out.append(attr[:, g.columns[0]])
            else:
                out.append(attr[:, g.columns[0]:g.columns[1]].sum(dim=1))
        return torch.stack(out).numpy()


def most_frequent_ids(cache: ImpressionCache, sample: int = 1_000_000) -> np.ndarray:
    """``[S]`` most frequent id of each sparse feature on the training split (over up to
    ``sample`` evenly spaced training impressions; ties -> smallest id)."""
    index = np.asarray(cache.split_index("train"))
    index = index[:: max(1, len(index) // sample)]
    sparse = np.asarray(cache.columns["sparse"][index])
    return np.array([np.bincount(sparse[:, j]).argmax() for j in range(sparse.shape[1])], dtype=np.int64)


def build_inputs(model: RankingModel, data: RankingData, rows: np.ndarray, batch_size: int) -> ImportanceInputs:
    """Embed cache rows ``rows`` (``[N]``, sorted) for :class:`InteractionInputModel`, with the baselines."""
    plain = PlainInputModel(model).eval()
    parts: dict[str, list[torch.Tensor]] = {}
    labels = []
    for start in tqdm(range(0, len(rows), batch_size), desc="embed NW rows", unit="batch", disable=None):
        batch: RankingBatch = data.batch(rows[start:start + batch_size])
        for name, value in embed_batch(plain, *batch.inputs()).items():
            parts.setdefault(name, []).append(value)
        labels.append(batch.labels.numpy())
    tensors = {name: torch.cat(values) for name, values in parts.items()}
    spec = model.spec
    base_request = embed_batch(
        plain, dense=torch.tensor([spec.dense_mean], dtype=torch.float32).reshape(1, len(spec.dense_names)),
        sparse_ids=torch.from_numpy(most_frequent_ids(data.cache)).reshape(1, len(spec.sparse_names)),
        product_rows=torch.zeros(1, dtype=torch.long), query_rows=torch.zeros(1, dtype=torch.long),
        history_rows=torch.full((1, 1), -1, dtype=torch.long))
    baselines = {name: value[0] for name, value in base_request.items()}
    return ImportanceInputs(tensors, np.concatenate(labels), feature_groups(model), baselines)
