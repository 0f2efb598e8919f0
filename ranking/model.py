"""The pCTR model: a DCN tower, a table tower and a head (paper sec. 4.2), as small modules.

Notation: B batch, D dense features, S sparse features, E sparse embedding dim, d table dim,
k projection dim of the table vectors (P, Q: learned projections d -> k).

::

    dense [B, D] --normalise--+
                              +-- concat [B, D + S*E] -- LowRankCrossNet -- MLP --> [B, dcn_out] --+
    sparse_* KJT --EBC(SUM)---+                                                                    |
                                                                                                   +-- concat -- MLP -- Linear --> logit [B]
    product_id, query_id,      Pp, Qq, cos(p,q) [, Ph, cos(p,h)]                                    |
    purchase_history_84d KJT --> DashCLIP tables --> [B, 2k+1 (+k+1)] -- LowRankCrossNet -- MLP ----+

``RankingModel.forward(dense_features, features)`` takes the torchrec inputs (one
KeyedJaggedTensor holding every sparse key) like ``torchrec.models.dlrm.DLRM`` does, so DMP can
shard its two EBCs. The widths are a :class:`ranking.config.RankerConfig` (``ranking.train`` flags).
:class:`ranking.plain.PlainInputModel` is the plain-tensor front door
(serving, Captum, training). :func:`build_model`, :func:`save_model` and :func:`load_model`
construct, write and read a variant with its :class:`ranking.spec.FeatureSpec`;
:func:`trained_set` is the output set of one trained variant/seed (``model.pt`` + ``metrics.json``).
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from common.cli import UserError
from common.io import atomic_path
from common.provenance import OutputSet
from data.schema import SchemaError
from embeddings.tables import EmbeddingTable, embedding_table_rel, release_pages, tables_set
from ranking import layout
from ranking.config import RankerConfig
from ranking.layers import CrossNet, Linear, ReluMLP, linear
from ranking.spec import FeatureSpec
from ranking.tables import (HISTORY_FEATURE, PRODUCT_FEATURE, PRODUCT_TABLE, QUERY_FEATURE, QUERY_TABLE, TABLE_KINDS,
                            PretrainedEmbeddingBagCollection, mapped_tables)
from ranking.variants import Variant, get_variant


def sparse_feature_ebc(spec: FeatureSpec, embedding_dim: int) -> EmbeddingBagCollection | None:
    """One trainable SUM table per sparse feature (``spec.sparse_num_embeddings`` rows; the last
    row is the reserved bucket), or None when there are no sparse features."""
    if not spec.sparse_names:
        return None
    configs = [EmbeddingBagConfig(name=f"t_{name}", embedding_dim=embedding_dim, num_embeddings=rows,
                                  feature_names=[name], pooling=PoolingType.SUM)
               for name, rows in zip(spec.sparse_names, spec.sparse_num_embeddings)]
    return EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))


def unit_rows(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``[B, d]`` -> ``[B, d]``, each row over ``max(its L2 norm, eps)`` (an all-zero row stays zero):
    ``F.cosine_similarity(x, y, dim=1, eps=eps)`` is ``(unit_rows(x) * unit_rows(y)).sum(dim=1)``
    bit for bit."""
    return x / torch.linalg.vector_norm(x, 2, dim=1, keepdim=True).clamp_min(eps)


def frozen_table_inputs(product_rows: torch.Tensor, query_rows: torch.Tensor, history_values: Optional[torch.Tensor],
                        history_offsets: Optional[torch.Tensor], product_table: torch.Tensor, query_table: torch.Tensor,
                        product_norms: torch.Tensor, query_norms: torch.Tensor, product_weight: torch.Tensor,
                        product_bias: torch.Tensor, query_weight: torch.Tensor, query_bias: torch.Tensor) -> torch.Tensor:
    """The table tower's interaction row ``[Pp, Qq, cos(p, q)[, Ph, cos(p, h)]]`` ``[B, 2k + 1 (+ k + 1)]``
    straight from the row ids of frozen tables.

    ``product_rows``/``query_rows`` ``[B]``, ``history_values``/``history_offsets`` the bags of
    product rows (``B + 1`` offsets; None without history), the tables ``[R, d]``, the L2 norms
    of their rows ``[R]`` and the projections ``weight [k, d]``, ``bias [k]``. The numbers of :meth:`TableTower.interact` on
    the looked-up vectors (``h`` the mean of the bag), up to float rounding:

    * ``cos(x, y) = <x, y> / (max(|x|, eps) * max(|y|, eps))`` (``F.cosine_similarity`` first
      divides both ``[B, d]`` operands by their norms); for the history it is taken on the bag's
      sum ``n h`` with ``max(|n h|, n eps)``: the same value without dividing ``[B, d]`` by ``n``;
    * the projection is linear, ``W h + b = mean(W rows) + b`` (``b`` for an empty bag): when
      the product table has no more rows than there are product vectors to project (``B``, ``2B``
      with the history), the table is projected (``[Rp, k]``, no bias), ``W p`` is gathered and
      ``W h`` pooled from it, and the weight gradient is one ``[k, Rp] @ [Rp, d]`` product. Else
      the vectors are projected (``W h = (W n h) / n``).

    Rows of frozen tables need no gradient: a dot product is written over a gathered vector that
    no projection keeps for its backward.
    """
    eps = 1e-8  # F.cosine_similarity's, as in the table tower
    batch = product_rows.shape[0]
    vectors = batch if history_values is None else 2 * batch
    project_table = product_table.shape[0] <= vectors
    # the product side first: projecting the table streams it through the cache for the gathers after it
    projected_table = linear(product_table, product_weight) if project_table else product_table
    product = F.embedding(product_rows, product_table)
    product_norm = product_norms.index_select(0, product_rows).clamp_min(eps)
    if project_table:
        projected_product = F.embedding(product_rows, projected_table) + product_bias
    else:
        projected_product = linear(product, product_weight, product_bias)
    projected_history: Optional[torch.Tensor] = None
    cosine_ph: Optional[torch.Tensor] = None
    if history_values is not None and history_offsets is not None:
        counts = (history_offsets[1:] - history_offsets[:-1]).to(product.dtype)
        history = F.embedding_bag(history_values, product_table, history_offsets, mode="sum", include_last_offset=True)
        history_norm = torch.maximum(torch.linalg.vector_norm(history, 2, dim=1), counts * eps).clamp_min(eps)
        if project_table:
            projected_history = F.embedding_bag(history_values, projected_table, history_offsets, mode="mean",
                                                include_last_offset=True) + product_bias
            dot_ph = history.mul_(product).sum(dim=1)
        else:
            projected_history = torch.addcmul(product_bias, linear(history, product_weight),
                                              counts.clamp_min(1.0).reciprocal().unsqueeze(1))
            dot_ph = torch.linalg.vecdot(product, history)
        cosine_ph = dot_ph / (product_norm * history_norm)
    query = F.embedding(query_rows, query_table)
    query_norm = query_norms.index_select(0, query_rows).clamp_min(eps)
    projected_query = linear(query, query_weight, query_bias)
    dot_pq = product.mul_(query).sum(dim=1) if project_table else torch.linalg.vecdot(product, query)
    cosine_pq = dot_pq / (product_norm * query_norm)
    if projected_history is not None and cosine_ph is not None:
        return torch.cat([projected_product, projected_query, cosine_pq.unsqueeze(1), projected_history,
                          cosine_ph.unsqueeze(1)], dim=1)
    return torch.cat([projected_product, projected_query, cosine_pq.unsqueeze(1)], dim=1)


torch.fx.wrap("frozen_table_inputs")


class DCNTower(nn.Module):
    """The existing features through DCNv2 (stacked: cross network, then deep MLP).

    Args:
        dense_mean, dense_std: ``[D]`` training-split statistics (buffers) for normalisation.
        sparse_ebc: trainable tables of the ``sparse_*`` features (E each), or None.
        cross_layers, low_rank: ``LowRankCrossNet`` over ``[B, D + S*E]``.
        deep_sizes: MLP layer sizes; the output is ``[B, deep_sizes[-1]]``.
    """

    def __init__(self, dense_mean: torch.Tensor, dense_std: torch.Tensor, sparse_ebc: EmbeddingBagCollection | None,
                 cross_layers: int, low_rank: int, deep_sizes: list[int]) -> None:
        super().__init__()
        self.register_buffer("dense_mean", dense_mean.float().clone())
        self.register_buffer("dense_std", dense_std.float().clone())
        self.sparse_ebc = sparse_ebc
        configs = [] if sparse_ebc is None else sparse_ebc.embedding_bag_configs()
        sparse_width = sum(c.embedding_dim for c in configs)
        # first row of each table in their concatenation (sparse_embedded), not part of the state dict
        self.register_buffer("sparse_row_offsets", torch.tensor([0] + [c.num_embeddings for c in configs][:-1],
                                                                dtype=torch.int64).cumsum(0)[:len(configs)],
                             persistent=False)
        self.sparse_dim: int = configs[0].embedding_dim if configs and all(
            c.embedding_dim == configs[0].embedding_dim for c in configs) else 0
        in_features = int(dense_mean.numel()) + sparse_width
        self.crossnet = CrossNet(in_features=in_features, num_layers=cross_layers, low_rank=low_rank)
        self.deep = ReluMLP(in_features, list(deep_sizes))
        self.out_features: int = deep_sizes[-1]

    def forward(self, dense_features: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
        """dense_features ``[B, D]`` raw, features KJT with the ``sparse_*`` keys -> ``[B, out_features]``."""
        return self.interact(dense_features, self.sparse_embedded(features))

    def from_ids(self, dense_features: torch.Tensor, sparse_ids: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` of a local EBC from plain ids: raw dense ``[B, D]`` and ``sparse_ids``
        ``[B, S]`` (one valid row per feature, columns in ``sparse_ebc`` order = ``spec.sparse_names``)."""
        return self.interact(dense_features, self.embed_ids(sparse_ids) if self.sparse_ebc is not None else None)

    def sparse_embedded(self, features: KeyedJaggedTensor) -> torch.Tensor | None:
        """The pooled sparse embeddings ``[B, S*E]`` of ``features``: ``sparse_ebc``'s output values
        (:meth:`embed_ids` of each feature's ids for a local EBC; a sharded one runs its own forward)."""
        if self.sparse_ebc is None:
            return None
        if type(self.sparse_ebc) is not EmbeddingBagCollection:
            return self.sparse_ebc(features).values()
        bags = features.to_dict()
        return self.embed_ids(torch.stack([bags[c.feature_names[0]].values()
                                           for c in self.sparse_ebc.embedding_bag_configs()], dim=1))

    def embed_ids(self, sparse_ids: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` ids (one per sparse feature, ``sparse_ebc`` order) -> ``[B, S*E]``, the values
        of the local ``sparse_ebc``'s forward.

        Every sparse feature holds one id per sample (:class:`ranking.plain.PlainFeatures`), and
        the SUM of a bag of one row is that row, so the tables are read as one row gather from
        their concatenation (``[sum R, E]``, ids shifted by ``sparse_row_offsets``): the same
        values without the per-table bags and the KeyedTensor copy, and a backward that adds
        each gradient to its row instead of sorting the ids of every bag.
        """
        configs = self.sparse_ebc.embedding_bag_configs()
        weights = [self.sparse_ebc.embedding_bags[c.name].weight for c in configs]
        if self.sparse_dim == 0:  # tables of different widths: one gather each
            return torch.cat([F.embedding(sparse_ids[:, k], w) for k, w in enumerate(weights)], dim=1)
        return F.embedding(sparse_ids + self.sparse_row_offsets, torch.cat(weights)).flatten(1)

    def interact(self, dense_features: torch.Tensor, sparse_embedded: torch.Tensor | None) -> torch.Tensor:
        """The tower after the lookups: raw dense ``[B, D]`` and the pooled sparse embeddings
        ``[B, S*E]`` (``sparse_ebc`` output order = ``spec.sparse_names``) -> ``[B, out_features]``.
        Feature importance permutes these inputs."""
        x = (dense_features - self.dense_mean) / self.dense_std
        if sparse_embedded is not None:
            x = torch.cat([x, sparse_embedded], dim=1)
        return self.deep(self.crossnet(x))


class TableTower(nn.Module):
    """The DashCLIP vectors and their cosines, crossed with each other.

    The cosines come from the full ``d``-dim vectors (0 against an all-zero vector: unknown id,
    empty history); the vectors are projected to ``proj_dim`` (``k``) first, with one projection
    for the product space (product and pooled history: same table) and one for queries. Row:
    ``[Pp, Qq, cos(p, q)]`` (``[B, 2k + 1]``), plus ``[Ph, cos(p, h)]`` with the purchase history
    (``[B, 3k + 2]``). Then ``LowRankCrossNet`` and an MLP -> ``[B, deep_sizes[-1]]``.

    Frozen tables in a local EBC go from the row ids to that row in :func:`frozen_table_inputs`
    (no ``[B, d]`` division, the history summed, the product table projected when it is the
    smaller operand); trainable, sharded (DMP) or quantized (serving) tables take
    :meth:`pooled` vectors, :meth:`cosines` and :meth:`interact`.
    """

    def __init__(self, tables: PretrainedEmbeddingBagCollection, proj_dim: int, cross_layers: int, low_rank: int,
                 deep_sizes: list[int]) -> None:
        super().__init__()
        self.tables = tables
        self.with_history: bool = tables.with_history
        self.product_proj = Linear(tables.dim, proj_dim)
        self.query_proj = Linear(tables.dim, proj_dim)
        in_features = 2 * proj_dim + 1 + (proj_dim + 1 if tables.with_history else 0)
        self.crossnet = CrossNet(in_features=in_features, num_layers=cross_layers, low_rank=low_rank)
        self.deep = ReluMLP(in_features, list(deep_sizes))
        self.out_features: int = deep_sizes[-1]

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """features KJT with ``product_id``, ``query_id`` [, ``purchase_history_84d``] rows -> ``[B, out_features]``."""
        if type(self.tables.ebc) is EmbeddingBagCollection:
            bags = features.to_dict()
            history = bags[HISTORY_FEATURE] if self.with_history else None
            return self.from_rows(bags[PRODUCT_FEATURE].values(), bags[QUERY_FEATURE].values(),
                                  history.values() if history is not None else None,
                                  history.offsets() if history is not None else None)
        pooled = self.tables.pooled(features)
        product, query = pooled[PRODUCT_FEATURE], pooled[QUERY_FEATURE]
        return self.from_vectors(product, query, pooled[HISTORY_FEATURE] if self.with_history else None)

    def from_rows(self, product_rows: torch.Tensor, query_rows: torch.Tensor, history_values: torch.Tensor | None = None,
                  history_offsets: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` of a local EBC from plain rows: ``product_rows``, ``query_rows`` ``[B]``
        and the history bags (values and ``B + 1`` offsets; None without history)."""
        if self.tables.frozen:
            tables = self.tables.ebc.embedding_bags
            x = frozen_table_inputs(product_rows, query_rows, history_values, history_offsets,
                                    tables[PRODUCT_TABLE].weight, tables[QUERY_TABLE].weight,
                                    self.tables.product_norms, self.tables.query_norms, self.product_proj.weight,
                                    self.product_proj.bias, self.query_proj.weight, self.query_proj.bias)
            return self.deep(self.crossnet(x))
        product, query, history = self.tables.pooled_rows(product_rows, query_rows, history_values, history_offsets)
        return self.from_vectors(product, query, history)

    def from_vectors(self, product: torch.Tensor, query: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        """The tower of looked-up vectors ``[B, d]`` (``history`` None without it): cosines, then :meth:`interact`."""
        others = [query, history] if history is not None else [query]
        cosines = self.cosines(product, others)
        if history is None:
            return self.interact(product, query, cosines[0])
        return self.interact(product, query, cosines[0], history, cosines[1])

    def cosines(self, product: torch.Tensor, others: list[torch.Tensor]) -> list[torch.Tensor]:
        """``F.cosine_similarity(product, other, dim=1, eps=1e-8)`` ``[B]`` for each ``[B, d]`` other.

        Frozen tables never change (no gradient is computed for their vectors in one process;
        sharded, the lr-0 optimizer discards it), so the product rows are normalised once for all
        cosines and each product of unit rows is written over the other's fresh unit rows
        (:func:`unit_rows`: the same values bit for bit, half the ``[B, d]`` temporaries).
        Trainable tables keep ``F.cosine_similarity``'s own graph: a shared normalisation would
        sum the gradient of the product rows in another order (other rounding).
        """
        if not self.tables.frozen:
            return [F.cosine_similarity(product, other, dim=1, eps=1e-8) for other in others]
        unit_product = unit_rows(product)
        return [unit_rows(other).mul_(unit_product).sum(dim=1) for other in others]

    def interact(self, product: torch.Tensor, query: torch.Tensor, cosine_pq: torch.Tensor,
                 history: torch.Tensor | None = None, cosine_ph: torch.Tensor | None = None) -> torch.Tensor:
        """The tower after the lookups: vectors ``[B, d]`` and cosines ``[B]`` (``history`` and
        ``cosine_ph`` when ``with_history``) -> ``[B, out_features]``. Feature importance permutes
        these inputs one group at a time."""
        parts = [self.product_proj(product), self.query_proj(query), cosine_pq.unsqueeze(1)]
        if history is not None and cosine_ph is not None:
            parts += [self.product_proj(history), cosine_ph.unsqueeze(1)]
        return self.deep(self.crossnet(torch.cat(parts, dim=1)))


class RankingModel(nn.Module):
    """DCN tower [+ table tower] -> head MLP -> one logit per sample.

    Attributes ``variant`` (name), ``spec`` (:class:`FeatureSpec`) and ``config``
    (:class:`RankerConfig`) describe how it was built and how to feed it.

    Embedding collections (what DMP shards): ``dcn_tower.sparse_ebc`` (trainable, one SUM table
    per sparse feature) and ``table_tower.tables.ebc`` (product + query tables; frozen in the
    pretrained variants unless ``Variant.train_tables``: :func:`ranking.tables.frozen_parameter_names`
    lists the frozen ones for the optimizer to leave out, since ``requires_grad`` does not survive
    sharding).
    """

    def __init__(self, dcn_tower: DCNTower, table_tower: TableTower | None, head_sizes: list[int], *,
                 variant: str, spec: FeatureSpec, config: RankerConfig) -> None:
        super().__init__()
        self.dcn_tower = dcn_tower
        self.table_tower = table_tower
        in_features = dcn_tower.out_features + (table_tower.out_features if table_tower is not None else 0)
        self.head = nn.Sequential(ReluMLP(in_features, list(head_sizes)), Linear(head_sizes[-1], 1))
        self.variant, self.spec, self.config = variant, spec, config

    def forward(self, dense_features: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
        """dense_features ``[B, D]`` raw, features KJT (sparse ids + table rows) -> logits ``[B]``."""
        towers = [self.dcn_tower(dense_features, features)]
        if self.table_tower is not None:
            towers.append(self.table_tower(features))
        return self.head(torch.cat(towers, dim=1)).squeeze(1)

    def is_local(self) -> bool:
        """Whether every embedding collection is a stock, unsharded EBC (what :meth:`forward_rows` reads)."""
        return ((self.dcn_tower.sparse_ebc is None or type(self.dcn_tower.sparse_ebc) is EmbeddingBagCollection)
                and (self.table_tower is None or type(self.table_tower.tables.ebc) is EmbeddingBagCollection))

    def forward_rows(self, dense_features: torch.Tensor, sparse_ids: torch.Tensor, product_rows: torch.Tensor | None,
                     query_rows: torch.Tensor | None, history_values: torch.Tensor | None,
                     history_offsets: torch.Tensor | None) -> torch.Tensor:
        """:meth:`forward` of a local model (:meth:`is_local`) from the ids the KJT would hold:
        ``sparse_ids [B, S]``, table rows ``[B]`` and history bags (values, ``B + 1`` offsets), all
        valid rows (:meth:`ranking.plain.PlainFeatures.rows`), without building the KJT."""
        towers = [self.dcn_tower.from_ids(dense_features, sparse_ids)]
        if self.table_tower is not None:
            assert product_rows is not None and query_rows is not None
            towers.append(self.table_tower.from_rows(product_rows, query_rows, history_values, history_offsets))
        return self.head(torch.cat(towers, dim=1)).squeeze(1)


def build_tables(variant: Variant, spec: FeatureSpec, tables: tuple[EmbeddingTable, EmbeddingTable] | None = None,
                 generator: torch.Generator | None = None) -> PretrainedEmbeddingBagCollection | None:
    """The table module of ``variant``: ``tables`` (pretrained variants; frozen unless
    ``variant.train_tables``, see :meth:`PretrainedEmbeddingBagCollection.from_tables`), random
    trainable tables of the spec's shapes (the random variant), or placeholders of those shapes on
    the meta device when ``tables`` is None, which only :func:`model_from_state` fills."""
    if not variant.uses_tables:
        return None
    if spec.table_dim <= 0:
        raise ValueError(f"variant {variant.name} needs tables but the feature spec has none")
    if variant.table_init == "random":
        for table in tables or ():  # not read by this model: a worker that mapped them for others lets them go
            release_pages(table.vectors)
        return PretrainedEmbeddingBagCollection.random(spec.num_product_rows, spec.num_query_rows, spec.table_dim,
                                                       generator=generator, with_history=variant.use_history)
    frozen = not variant.train_tables
    if tables is None:
        meta = torch.device("meta")
        return PretrainedEmbeddingBagCollection(torch.empty(spec.num_product_rows, spec.table_dim, device=meta),
                                                torch.empty(spec.num_query_rows, spec.table_dim, device=meta),
                                                with_history=variant.use_history, frozen=frozen)
    product, query = tables
    if product.vectors.shape != (spec.num_product_rows, spec.table_dim) or query.vectors.shape != (spec.num_query_rows, spec.table_dim):
        raise ValueError(f"tables {product.vectors.shape}/{query.vectors.shape} do not match the feature spec "
                         f"({spec.num_product_rows}/{spec.num_query_rows} x {spec.table_dim})")
    return PretrainedEmbeddingBagCollection.from_tables(product, query, with_history=variant.use_history, frozen=frozen)


def build_model(variant: Variant | str, spec: FeatureSpec, config: RankerConfig | None = None,
                tables: PretrainedEmbeddingBagCollection | None = None) -> RankingModel:
    """Assemble ``variant`` for ``spec`` (tables from :func:`build_tables`; ignored by ``dcn``)."""
    variant = get_variant(variant) if isinstance(variant, str) else variant
    config = config or RankerConfig()
    if variant.uses_tables and tables is None:
        raise ValueError(f"variant {variant.name} needs its table module (see build_tables)")
    dcn = DCNTower(torch.tensor(spec.dense_mean, dtype=torch.float32), torch.tensor(spec.dense_std, dtype=torch.float32),
                   sparse_feature_ebc(spec, config.sparse_embedding_dim), config.dcn_cross_layers, config.dcn_low_rank,
                   config.dcn_deep_sizes)
    tower = (TableTower(tables, config.table_proj_dim, config.table_cross_layers, config.table_low_rank, config.table_deep_sizes)
             if variant.uses_tables else None)
    return RankingModel(dcn, tower, config.head_sizes, variant=variant.name, spec=spec, config=config)


def trained_set(workdir: str | Path, variant: str, seed: int) -> OutputSet:
    """The output set of ``ranking.train``'s run of ``variant`` with ``seed``: ``model.pt`` and
    ``metrics.json`` (in that order) under ``DIR/ranking/<variant>/seed<k>/`` (:func:`ranking.layout.run_rel`),
    published together."""
    rel = layout.run_rel(variant, seed)
    return OutputSet(workdir, f"{rel}/{layout.RUN_MANIFEST_FILE}",
                     [f"{rel}/{layout.MODEL_FILE}", f"{rel}/{layout.METRICS_FILE}"],
                     what=f"python -m ranking.train --workdir {workdir} --variant {variant} --seeds {seed + 1}")


# the state-dict name of each table's weight in a model with tables -> its kind
TABLE_WEIGHTS: dict[str, str] = {f"table_tower.tables.ebc.embedding_bags.{table}.weight": kind
                                 for table, kind in zip((PRODUCT_TABLE, QUERY_TABLE), TABLE_KINDS)}


def frozen_table_weights(model: RankingModel) -> dict[str, str]:
    """:data:`TABLE_WEIGHTS` for a model whose pretrained tables are frozen; empty for one whose
    tables train (random, finetune) or that has none."""
    return TABLE_WEIGHTS if model.table_tower is not None and model.table_tower.tables.frozen else {}


def save_model(model: RankingModel, path: str | Path,
               tables_from: Optional[tuple[Path, dict[str, str]]] = None) -> Path:
    """Write ``{state_dict, variant, model_config, feature_spec, table_keys[, frozen_tables]}`` atomically
    (``torch.load(weights_only=True)``-safe).

    With ``tables_from`` = ``(workdir, {workdir-relative table file: sha256})``, the files the
    model's frozen tables were mapped from (:func:`ranking.tables.mapped_tables`), the checkpoint
    names them instead of holding their weights (``frozen_tables``: the path from ``path``'s folder
    to ``workdir`` and the digests); :func:`load_model` maps them back. Trainable tables (random,
    finetune) are always held.

    The same model gives the same bytes: ``torch.save`` gets an open file, so the zip archive's
    inner folder is torch's fixed ``archive`` rather than the (temporary) file name.
    """
    referenced = frozen_table_weights(model) if tables_from is not None else {}
    payload = {"state_dict": {name: tensor for name, tensor in model.state_dict().items() if name not in referenced},
               "variant": model.variant, "model_config": asdict(model.config),
               "feature_spec": model.spec.to_dict(), "table_keys": model.spec.key_tensors()}
    if referenced:
        workdir, digests = tables_from
        payload["frozen_tables"] = {"workdir": Path(os.path.relpath(workdir, Path(path).parent)).as_posix(),
                                    "digests": {embedding_table_rel(kind): digests[embedding_table_rel(kind)]
                                                for kind in TABLE_KINDS}}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
    return Path(path)


def load_model(path: str | Path, variant: str | None = None) -> RankingModel:
    """Rebuild the model saved by :func:`save_model` (eval mode). ``model.spec`` says how to feed it.
    With ``variant``, a checkpoint of another variant is a one-line error. Frozen tables the
    checkpoint names (``frozen_tables``) are mapped from its workdir's table cache
    (:func:`ranking.tables.mapped_tables`) after the table files are checked to be the ones it was
    trained from."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: missing ranking model (run `python -m ranking.train` first)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        saved = get_variant(payload["variant"])
        spec = FeatureSpec.from_dict(payload["feature_spec"], payload.get("table_keys"))
        config = RankerConfig(**payload["model_config"])
    except (KeyError, TypeError, RuntimeError, EOFError) as exc:
        raise UserError(f"{path}: not a ranking model checkpoint ({type(exc).__name__}: {exc})") from None
    if variant is not None and saved.name != variant:
        raise UserError(f"{path}: holds variant {saved.name!r}, expected {variant!r}")
    state = dict(payload["state_dict"])
    if "frozen_tables" in payload:
        state.update(referenced_tables(path, payload["frozen_tables"]))
    return model_from_state(saved, spec, config, state).eval()


def referenced_tables(path: Path, reference: dict) -> dict[str, torch.Tensor]:
    """The frozen table weights a checkpoint at ``path`` names (:func:`save_model`'s
    ``frozen_tables``), by state-dict name, mapped from its workdir: one-line errors when the
    workdir's table files are missing or not the ones it names."""
    workdir = Path(os.path.normpath(path.parent / reference["workdir"]))
    digests = tables_set(workdir).hashes()
    for rel, digest in reference["digests"].items():
        if digests.get(rel) is None:
            raise UserError(f"{path}: its frozen tables are read from {workdir / rel}, which is missing (a checkpoint "
                            f"with frozen tables stays inside the workdir it was trained in, and reads its tables there)")
        if digests[rel] != digest:
            raise UserError(f"{path}: its frozen tables are {rel} with sha256 {digest[:12]}, and {workdir / rel} now "
                            f"has sha256 {digests[rel][:12]} (the model reads its tables from there): run "
                            f"`python -m ranking.train` again")
    try:
        product, query = mapped_tables(workdir, digests)
    except SchemaError as exc:
        raise UserError(str(exc)) from None
    vectors = {"product": product.vectors, "query": query.vectors}
    return {name: torch.as_tensor(vectors[kind]) for name, kind in TABLE_WEIGHTS.items()}


def shared_copy(model: RankingModel) -> RankingModel:
    """A second module over ``model``'s own weight tensors (nothing copied), to wrap, trace or swap
    tables in (serving's fused and vectors models) without touching ``model``'s modules."""
    return model_from_state(get_variant(model.variant), model.spec, model.config, model.state_dict())


def model_from_state(variant: Variant, spec: FeatureSpec, config: RankerConfig,
                     state: dict[str, torch.Tensor]) -> RankingModel:
    """``variant`` for ``spec`` holding the tensors of ``state`` (a complete ``state_dict``) as its
    weights, not copies: the tables are never allocated twice (their placeholders are on the meta
    device), and a state read with ``torch.load(weights_only=True, mmap=True)`` stays in the file's pages."""
    model = build_model(variant, spec, config, build_tables(variant, spec))
    model.load_state_dict(state, assign=True)
    return model
