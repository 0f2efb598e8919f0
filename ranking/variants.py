"""The ranking variants of the paper's Table 2, by name.

========================  ======================================================================
``dcn``                   baseline: the DCN tower over the existing dense and sparse features
``dcn_pq``                + frozen DashCLIP product and query vectors and their cosine
``dcn_pq_hist``           + the mean-pooled 84-day purchase history and cosine(product, history)
                          (the paper's best)
``dcn_pq_hist_random``    the architecture of ``dcn_pq_hist`` with randomly initialised tables
                          trained end to end (are the pretrained vectors what helps?)
``dcn_pq_hist_finetune``  ``dcn_pq_hist`` warm-started: the DashCLIP tables are trained further
                          with row-sparse updates (only the rows a batch looks up change)
========================  ======================================================================

Trainable tables (``train_tables``) get row-sparse gradients and their own optimizer:
:class:`ranking.optim.RowWiseAdagrad` by default (``--table-optimizer same``: SparseAdam or
Adagrad) in a single process (:func:`ranking.train.make_optimizers`), torchrec's fused
optimizer applied in backward when sharded (:func:`ranking.distributed.shard_model`). Frozen
tables are never updated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.cli import UserError

TableInit = Literal["none", "pretrained", "random"]


@dataclass(frozen=True)
class Variant:
    """One row of Table 2: which towers and features the model has, how its tables start and
    whether training updates them (``train_tables``; random tables are always trained)."""

    name: str
    description: str
    table_init: TableInit
    use_history: bool
    train_tables: bool = False

    def __post_init__(self) -> None:
        if (self.table_init == "none" and self.train_tables) or (self.table_init == "random" and not self.train_tables):
            raise ValueError(f"variant {self.name}: tables {self.table_init!r} cannot have train_tables={self.train_tables}")

    @property
    def uses_tables(self) -> bool:
        """Whether the model has the product/query tables. Training reads the exported table
        files for every such variant (the random one takes only their shapes and id maps)."""
        return self.table_init != "none"


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("dcn", "DCNv2 over the existing features", "none", use_history=False),
    Variant("dcn_pq", "+ frozen product and query vectors, cosine(p, q)", "pretrained", use_history=False),
    Variant("dcn_pq_hist", "+ mean-pooled 84-day purchase history, cosine(p, history)", "pretrained",
            use_history=True),
    Variant("dcn_pq_hist_random", "dcn_pq_hist with random tables trained end to end", "random", use_history=True,
            train_tables=True),
    Variant("dcn_pq_hist_finetune", "dcn_pq_hist with the DashCLIP tables fine-tuned (row-sparse updates)",
            "pretrained", use_history=True, train_tables=True),
)}
BASELINE = "dcn"


def get_variant(name: str) -> Variant:
    """The variant called ``name``; a :class:`common.cli.UserError` listing the valid names otherwise."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise UserError(f"unknown ranking variant {name!r}; valid variants: {', '.join(VARIANTS)} (or 'all')") from None


def resolve_variants(name: str) -> list[Variant]:
    """``"all"`` -> every variant in Table 2 order; a comma-separated list or a single name otherwise."""
    if name == "all":
        return list(VARIANTS.values())
    return [get_variant(n.strip()) for n in name.split(",") if n.strip()]
