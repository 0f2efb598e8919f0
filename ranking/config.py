"""Dataclass configs of the ranking commands; every field is a ``--flag`` (common.cli.parse_config).

:class:`RankerConfig` is the architecture of :class:`ranking.model.RankingModel` (its widths and
depths). :class:`RankingTrainConfig` adds the training flags of ``python -m ranking.train``. The
architecture and the flags that change what is trained are the settings a trained set is made
from (:func:`ranking.train.training_settings`, recorded in its :class:`common.provenance.MadeFrom`),
so a changed width retrains instead of reusing a run of another architecture.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from common.cli import DEFAULT_WORKDIR, UserError, threads_field
from ranking.spec import HISTORY_LEN
from ranking.variants import VARIANTS, resolve_variants

TABLE_OPTIMIZERS = ("rowwise_adagrad", "same")  # --table-optimizer


def _size(default: Any, help: str) -> Any:
    """A width or depth (>= 1), or a list of widths (one or more, each >= 1)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "min": 1, "min_items": 1})
    return field(default=default, metadata={"help": help, "min": 1})


@dataclass
class RankerConfig:
    """Architecture of the ranking model: widths of the DCN tower, the table tower and the head
    (the defaults are sized for the demo on 2 CPU cores)."""

    sparse_embedding_dim: int = _size(16, "width E of each sparse feature's trainable table (DCN tower)")
    dcn_cross_layers: int = _size(2, "cross layers of the DCN tower's LowRankCrossNet")
    dcn_low_rank: int = _size(32, "rank of the DCN tower's cross layers")
    dcn_deep_sizes: list[int] = _size([128, 64], "layer widths of the DCN tower's MLP (the last is its output width)")
    table_proj_dim: int = _size(32, "width k of the learned projections of the product, query and history vectors")
    table_cross_layers: int = _size(2, "cross layers of the table tower's LowRankCrossNet")
    table_low_rank: int = _size(16, "rank of the table tower's cross layers")
    table_deep_sizes: list[int] = _size([128, 64], "layer widths of the table tower's MLP (the last is its output "
                                                   "width)")
    head_sizes: list[int] = _size([64], "layer widths of the head MLP before the final logit layer")

    def model_only(self) -> "RankerConfig":
        """The architecture part of this config (of a subclass such as :class:`RankingTrainConfig` too)."""
        return RankerConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RankerConfig)})


@dataclass
class RankingTrainConfig(RankerConfig):
    """Train the ranking variants (paper Table 2) over seeds and write DIR/ranking/results.{json,md}."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory"})
    variant: str = field(default="all", metadata={"help": f"'all' or a comma list of: {', '.join(VARIANTS)}"})
    seeds: int = field(default=5, metadata={"help": "seeds 0..N-1, each trained from scratch", "min": 1})
    epochs: int = field(default=4, metadata={"help": "passes over the training split (at most, with early stopping)",
                                             "min": 1})
    early_stopping: bool = field(default=True, metadata={
        "help": "hold out the last week of the training split, keep the parameters with its best logloss"})
    checks_per_epoch: int = field(default=4, metadata={"help": "validation checks per epoch (early stopping)",
                                                       "min": 1})
    patience: int = field(default=3, metadata={"help": "stop after this many checks without a better validation logloss",
                                               "min": 1})
    batch_size: int = field(default=2048, metadata={"help": "training batch size", "min": 1})
    lr: float = field(default=2e-3, metadata={"help": "learning rate", "gt": 0.0})
    optimizer: Literal["adam", "adagrad"] = field(default="adam", metadata={"help": "optimizer of the trainable parameters"})
    table_optimizer: Literal["rowwise_adagrad", "same"] = field(default="rowwise_adagrad", metadata={
        "help": "optimizer of the trainable DashCLIP tables (variants random, finetune): 'rowwise_adagrad' keeps "
                "one value per row (fbgemm's EXACT_ROWWISE_ADAGRAD), 'same' follows --optimizer (adam: SparseAdam, "
                "two moments the size of each table)"})
    history_len: int = field(default=HISTORY_LEN, metadata={"help": "cap of the purchase-history bag (most recent kept)",
                                                            "min": 1})
    eval_batch_size: int = field(default=8192, metadata={"help": "evaluation batch size", "min": 1})
    threads: int = threads_field(of="training job", note="1 is the fastest for these small models")
    workers: int = field(default=2, metadata={"help": "variant/seed jobs trained in parallel processes (fewer when "
                                                       "the memory holds fewer)", "min": 1})
    max_memory_gb: float = field(default=0.0, metadata={
        "help": "memory the parallel workers may plan for, in GB (0: what is available when the run starts); jobs "
                "that train tables hold a copy of them each and may get fewer workers than the others", "min": 0.0})
    force: bool = field(default=False, metadata={"help": "retrain finished variant/seed runs"})
    sharding: Literal["auto", "table_wise", "row_wise", "column_wise", "data_parallel"] = field(default="auto", metadata={
        "help": "under torchrun (WORLD_SIZE > 1): torchrec planner's plan, or one sharding type for every table"})
    pg_timeout_s: float = field(default=120.0, metadata={
        "help": "under torchrun: seconds a collective waits before failing (a dead rank stops the others)", "gt": 0.0})

    def check(self) -> None:
        """``--variant`` names variants (common.cli.check_config runs the per-field rules first)."""
        if not resolve_variants(self.variant):
            raise UserError(f"--variant {self.variant!r}: no variant named")
