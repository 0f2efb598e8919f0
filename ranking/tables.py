"""The DashCLIP tables inside the ranking model: a thin composition around torchrec's EBC.

:class:`PretrainedEmbeddingBagCollection` owns one plain ``torchrec.EmbeddingBagCollection``
(attribute ``ebc``) with two MEAN-pooled tables:

========================= ================= ===========================================
table                     features          bag
========================= ================= ===========================================
``product_table`` [Rp, d] ``product_id``    one row per sample (mean of one row = row)
                          ``purchase_history_84d``  0..L product rows (empty bag -> zeros)
``query_table``   [Rq, d] ``query_id``      one row per sample
========================= ================= ===========================================

One table serves two features exactly like ``EmbeddingBagConfig(feature_names=[...])`` does,
so the product vector and the pooled purchase history live in the same space. Row 0 of each
table is the all-zero row for unknown ids (the file contract of :mod:`embeddings.tables`).

Why a composition and not a subclass: ``DistributedModelParallel`` picks a sharder by the
*exact* module type (``type(module)``), so a subclass of ``EmbeddingBagCollection`` would not
be sharded by the stock ``EmbeddingBagCollectionSharder``. The inner ``ebc`` is a stock EBC:
fx tracing (``torchrec.fx.symbolic_trace``), ``torch.jit.script`` of the traced graph and
DMP sharding all see the type they know.

Frozen tables: the constructor sets ``requires_grad_(False)`` when ``frozen``. That flag does not
survive DMP sharding (fused TBE kernels update every table they own), so
:meth:`PretrainedEmbeddingBagCollection.frozen_table_names` and
:func:`frozen_parameter_names` expose the frozen tables for a DMP optimizer to exclude
(e.g. ``apply_optimizer_in_backward(SGD, [weight], {"lr": 0.0})``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from data.schema import SchemaError
from embeddings.tables import (EmbeddingTable, copy_table_vectors, embedding_table_path, embedding_table_rel,
                               mapped_table, read_embedding_table)

PRODUCT_FEATURE = "product_id"
QUERY_FEATURE = "query_id"
HISTORY_FEATURE = "purchase_history_84d"
PRODUCT_TABLE = "product_table"
QUERY_TABLE = "query_table"
TABLE_KINDS = ("product", "query")


class PretrainedEmbeddingBagCollection(nn.Module):
    """Product and query tables (frozen by default) serving ``product_id``, ``query_id`` and
    optionally ``purchase_history_84d`` (MEAN-pooled product rows).

    Args:
        product_vectors: ``[Rp, d]`` float32, row 0 = unknown product. The module holds this tensor
            itself as the table's weight, not a copy (trainable tables train it in place).
        query_vectors: ``[Rq, d]`` float32, row 0 = unknown query; same ``d``; held likewise.
        with_history: whether the product table also serves ``purchase_history_84d``.
        frozen: freeze both tables (``requires_grad=False``; see :meth:`frozen_table_names`).
            Trainable tables produce sparse gradients (``nn.EmbeddingBag.sparse``): only the rows a
            batch touches, so an optimizer step costs O(batch) rather than O(table) (see
            :func:`sparse_gradient_parameters`).

    Input: a KeyedJaggedTensor holding at least :meth:`feature_names` (extra keys are ignored).
    Output: a KeyedTensor with keys ``product_id``, [``purchase_history_84d``,] ``query_id``,
    each ``[B, d]``.

    Frozen tables also keep the L2 norm of every row (``product_norms`` ``[Rp]``, ``query_norms``
    ``[Rq]``; buffers outside the state dict, recomputed when one is loaded) for the cosines of
    :func:`ranking.model.frozen_table_inputs`.
    """

    def __init__(self, product_vectors: torch.Tensor, query_vectors: torch.Tensor, *,
                 with_history: bool = True, frozen: bool = True) -> None:
        super().__init__()
        if product_vectors.ndim != 2 or query_vectors.ndim != 2:
            raise ValueError(f"tables must be 2-D, got {tuple(product_vectors.shape)} and {tuple(query_vectors.shape)}")
        if product_vectors.shape[1] != query_vectors.shape[1]:
            raise ValueError(f"product table dim {product_vectors.shape[1]} != query table dim {query_vectors.shape[1]}")
        self.dim: int = int(product_vectors.shape[1])
        self.with_history: bool = with_history
        self.frozen: bool = frozen
        product_features = [PRODUCT_FEATURE, HISTORY_FEATURE] if with_history else [PRODUCT_FEATURE]
        configs = [
            EmbeddingBagConfig(name=PRODUCT_TABLE, embedding_dim=self.dim, num_embeddings=int(product_vectors.shape[0]),
                               feature_names=product_features, pooling=PoolingType.MEAN),
            EmbeddingBagConfig(name=QUERY_TABLE, embedding_dim=self.dim, num_embeddings=int(query_vectors.shape[0]),
                               feature_names=[QUERY_FEATURE], pooling=PoolingType.MEAN),
        ]
        # built on the meta device (no allocation, no random init), then given the vectors themselves
        # as its weights: one copy of each table in memory, the caller's
        self.ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
        self.ebc.load_state_dict({f"embedding_bags.{PRODUCT_TABLE}.weight": product_vectors,
                                  f"embedding_bags.{QUERY_TABLE}.weight": query_vectors}, assign=True)
        self.ebc._device = torch.device("cpu")  # the EBC's `device` (DMP reads it) would still say meta
        if frozen:
            self.ebc.requires_grad_(False)
        else:  # trainable (random, finetune): row-sparse gradients, for ranking.train's table optimizers
            for bag in self.ebc.embedding_bags.values():
                bag.sparse = True
        # the L2 norm of every row of a frozen table (empty when trainable): not in the state dict,
        # computed here and again whenever a state dict is loaded
        self.register_buffer("product_norms", torch.empty(0), persistent=False)
        self.register_buffer("query_norms", torch.empty(0), persistent=False)
        self.refresh_norms()
        self.register_load_state_dict_post_hook(_refresh_norms)

    @classmethod
    def from_tables(cls, product: EmbeddingTable, query: EmbeddingTable, *, with_history: bool = True,
                    frozen: bool = True) -> "PretrainedEmbeddingBagCollection":
        """From in-memory :class:`embeddings.tables.EmbeddingTable` objects, bit for bit. Frozen tables
        share the objects' arrays (a table of millions of queries is held once however many models
        read it); trainable ones are copies, so training leaves the objects as they are (made a chunk at
        a time from a mapped table, whose pages leave this process as they are copied:
        :func:`embeddings.tables.copy_table_vectors`)."""
        def weight(table: EmbeddingTable) -> torch.Tensor:
            if frozen:
                return torch.as_tensor(table.vectors, dtype=torch.float32).contiguous()
            return torch.from_numpy(copy_table_vectors(table.vectors))
        return cls(weight(product), weight(query), with_history=with_history, frozen=frozen)

    @classmethod
    def from_files(cls, product_path: str | Path, query_path: str | Path, *, expected_dim: int | None = None,
                   with_history: bool = True, frozen: bool = True) -> "PretrainedEmbeddingBagCollection":
        """Load ``product_table.parquet`` and ``query_table.parquet`` (frozen by default).

        Raises :class:`data.schema.SchemaError` naming the file when one is missing, malformed,
        of the wrong kind, or of a dimension other than ``expected_dim``.
        """
        product, query = load_tables(product_path, query_path, expected_dim=expected_dim)
        return cls.from_tables(product, query, with_history=with_history, frozen=frozen)

    @classmethod
    def random(cls, num_product_rows: int, num_query_rows: int, dim: int, *, generator: torch.Generator | None = None,
               with_history: bool = True) -> "PretrainedEmbeddingBagCollection":
        """Same shapes, ``N(0, 1/d)`` rows (unit norm on average), row 0 zeros, trainable."""
        def init(rows: int) -> torch.Tensor:
            table = torch.randn(rows, dim, generator=generator).div_(math.sqrt(dim))  # in place: one table in memory
            table[0] = 0.0
            return table
        return cls(init(num_product_rows), init(num_query_rows), with_history=with_history, frozen=False)

    @property
    def num_product_rows(self) -> int:
        return int(self.ebc.embedding_bags[PRODUCT_TABLE].num_embeddings)

    @property
    def num_query_rows(self) -> int:
        return int(self.ebc.embedding_bags[QUERY_TABLE].num_embeddings)

    def feature_names(self) -> list[str]:
        """KJT keys this module reads."""
        return [f for cfg in self.ebc.embedding_bag_configs() for f in cfg.feature_names]

    @torch.no_grad()
    def refresh_norms(self) -> None:
        """Recompute ``product_norms`` ``[Rp]`` and ``query_norms`` ``[Rq]`` from frozen local tables
        (after the tables were written other than by ``load_state_dict``)."""
        if self.frozen and type(self.ebc) is EmbeddingBagCollection:
            bags = self.ebc.embedding_bags
            self.product_norms = torch.linalg.vector_norm(bags[PRODUCT_TABLE].weight, 2, dim=1)
            self.query_norms = torch.linalg.vector_norm(bags[QUERY_TABLE].weight, 2, dim=1)

    def frozen_table_names(self) -> list[str]:
        """Names of the tables that must not be updated (all of them when ``frozen``, else none)."""
        return [PRODUCT_TABLE, QUERY_TABLE] if self.frozen else []

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """``features`` KJT (row ids) -> KeyedTensor of ``[B, d]`` pooled vectors per feature."""
        return self.ebc(features)

    def pooled(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """``features`` KJT (row ids) -> ``{feature: [B, d]}``: the vectors of :meth:`forward`, bit for bit.

        The stock EBC's forward writes every pooled vector into one KeyedTensor (``[B, 3d]``) that
        the table tower only splits again; a local EBC is read here without that copy:
        ``product_id`` and ``query_id`` hold one row per sample (the mean of a bag of one row is
        that row), so they are plain row gathers, and ``purchase_history_84d`` is the product
        table's MEAN bag. A sharded (DMP) or quantized (serving) ``ebc`` runs its own forward.
        """
        if type(self.ebc) is not EmbeddingBagCollection:
            return self.ebc(features).to_dict()
        bags = features.to_dict()
        history = bags[HISTORY_FEATURE] if self.with_history else None
        product, query, pooled_history = self.pooled_rows(
            bags[PRODUCT_FEATURE].values(), bags[QUERY_FEATURE].values(),
            history.values() if history is not None else None, history.offsets() if history is not None else None)
        out = {PRODUCT_FEATURE: product, QUERY_FEATURE: query}
        if pooled_history is not None:
            out[HISTORY_FEATURE] = pooled_history
        return out

    def pooled_rows(self, product_rows: torch.Tensor, query_rows: torch.Tensor, history_values: torch.Tensor | None,
                    history_offsets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The vectors of :meth:`pooled` from plain rows of the local EBC: product ``[B, d]``, query
        ``[B, d]`` and the MEAN bags of ``history_values`` at ``history_offsets`` (``B + 1``; None
        without history)."""
        product, query = self.ebc.embedding_bags[PRODUCT_TABLE], self.ebc.embedding_bags[QUERY_TABLE]
        history = None
        if self.with_history and history_values is not None and history_offsets is not None:
            history = product(history_values, history_offsets)
        return (F.embedding(product_rows, product.weight, sparse=product.sparse),
                F.embedding(query_rows, query.weight, sparse=query.sparse), history)


def _refresh_norms(module: PretrainedEmbeddingBagCollection, incompatible_keys: object) -> None:
    module.refresh_norms()


def load_tables(product_path: str | Path, query_path: str | Path, *,
                expected_dim: int | None = None) -> tuple[EmbeddingTable, EmbeddingTable]:
    """Read both table files and check that their dimensions agree (with each other and with
    ``expected_dim`` when given). Errors name the file."""
    product = read_embedding_table(product_path, "product")
    query = read_embedding_table(query_path, "query")
    if expected_dim is not None and product.dim != expected_dim:
        raise SchemaError(product_path, "vector", f"table dimension {product.dim} does not match the model's "
                                                   f"table dimension {expected_dim}")
    if query.dim != product.dim:
        raise SchemaError(query_path, "vector", f"table dimension {query.dim} does not match the product "
                                                 f"table's dimension {product.dim} ({product_path})")
    return product, query


def frozen_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the parameters of every frozen :class:`PretrainedEmbeddingBagCollection`
    in ``model`` (e.g. ``table_tower.tables.ebc.embedding_bags.product_table.weight``).

    Independent of ``requires_grad``, so it stays right where sharding resets that flag.
    """
    names: list[str] = []
    for prefix, module in model.named_modules():
        if isinstance(module, PretrainedEmbeddingBagCollection):
            for table in module.frozen_table_names():
                names.append(f"{prefix + '.' if prefix else ''}ebc.embedding_bags.{table}.weight")
    return names


def sparse_gradient_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters whose gradients are sparse (embedding bags with ``sparse=True``):
    they need a sparse optimizer (:class:`ranking.optim.RowWiseAdagrad`, ``torch.optim.SparseAdam``
    or ``Adagrad``); ``Adam`` rejects them."""
    return [m.weight for m in model.modules()
            if isinstance(m, nn.EmbeddingBag) and m.sparse and m.weight.requires_grad]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` except the frozen tables: what an optimizer should own."""
    frozen = set(frozen_parameter_names(model))
    return [p for name, p in model.named_parameters() if name not in frozen]


def mapped_tables(workdir: str | Path, digests: Mapping[str, str | None]) -> tuple[EmbeddingTable, EmbeddingTable]:
    """The product and query tables of ``workdir`` with their vectors memory-mapped
    (:func:`embeddings.tables.mapped_table`; ``digests``: the SHA-256 of each table file by its
    workdir-relative path), their dimensions checked as :func:`load_tables` does. Processes that
    map them (the workers of ``ranking.train``) share one copy; a frozen table's weights are the
    mapped pages themselves."""
    product, query = (mapped_table(workdir, kind, str(digests[embedding_table_rel(kind)])) for kind in TABLE_KINDS)
    if query.dim != product.dim:
        raise SchemaError(embedding_table_path(workdir, "query"), "vector", f"table dimension {query.dim} does not "
                                                                           f"match the product table's dimension "
                                                                           f"{product.dim}")
    return product, query
