"""Throughput of the ranking variants next to torchrec's own DLRM_DCN, and the data-loading share.

``python -m ranking.bench --workdir DIR [--device auto] [--batch-size 4096] [--steps 20]``

On the workdir's real features (the feature cache of :mod:`ranking.features`; the exported
tables when present, else random tables of the same shapes, which time the same), for every
variant (the architecture flags of :class:`ranking.config.RankerConfig`, as in ``ranking.train``)
and for ``torchrec.models.dlrm.DLRM_DCN`` on the same batches:

* train samples/s: forward + BCE + backward + optimizer step (:func:`ranking.train.make_optimizers`:
  Adam on the dense parameters, row-wise Adagrad on trainable tables, nothing on frozen ones;
  Adam for DLRM_DCN);
* eval samples/s: forward under ``no_grad``;
* data ms/batch: building the batch (memory-mapped gather, history lookup, id maps), and the
  data share = data time / (data time + train step time) of a training loop without prefetch.

Every model is built first; then the models take turns batch by batch (on each batch every model
makes its training step, then its eval forward), so a change of machine load during the run (the
CPU may be shared) touches every model alike, and every model sees the same batches in the same
order. Each step is timed in wall-clock seconds (the samples/s columns) and, on CPU, in CPU
seconds of this process, which other jobs on a shared machine do not inflate.

DLRM_DCN needs one embedding dim for every feature and a dense arch ending in that dim, so it
runs with every table at ``sparse_embedding_dim`` (E), the dense arch ``[dcn_deep_sizes[0], E]``,
the DCN interaction with the DCN tower's cross layers and rank and the over arch
``[*dcn_deep_sizes, 1]`` (the widths of our DCN tower and head; one thread for every model).
``DLRM_DCN (dense+sparse)`` sees the features of ``dcn``; ``DLRM_DCN (+p,q,hist)`` also gets
``product_id``, ``query_id`` and the mean-pooled ``purchase_history_84d`` bags as trainable
E-dim tables. "vs torchrec" is a variant's rate over the rate of its reference in the same run
(the dense+sparse one for ``dcn``, the one with the table features for the variants with
tables), from wall-clock and from CPU seconds. Prints a table and writes ``DIR/ranking/bench.json``.
"""
from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field, replace
from typing import Literal, Sequence

import numpy as np
import torch
from torch import nn
from torchrec.models.dlrm import DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from common.cli import DEFAULT_WORKDIR, UserError, parse_config, resolve_threads, run_main, threads_field
from common.io import prepare_workdir, write_json
from common.seed import seed_everything
from data.schema import SchemaError
from embeddings.tables import build_table, embedding_table_path
from ranking import layout
from ranking.config import RankerConfig
from ranking.features import ImpressionCache, RankingBatch, RankingData, build_spec
from ranking.model import build_model, build_tables
from ranking.plain import PlainFeatures, PlainInputModel
from ranking.spec import FeatureSpec, PurchaseIndex
from ranking.tables import HISTORY_FEATURE, PRODUCT_FEATURE, QUERY_FEATURE, load_tables
from ranking.train import make_optimizers
from ranking.variants import VARIANTS

log = logging.getLogger(__name__)

# The torchrec reference of a variant, by whether the variant has the product/query tables.
REFERENCES: dict[bool, str] = {False: "torchrec DLRM_DCN (dense+sparse)", True: "torchrec DLRM_DCN (+p,q,hist)"}


@dataclass
class RankingBenchConfig(RankerConfig):
    """Training and evaluation samples/s of every ranking variant next to torchrec's DLRM_DCN."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory (its data and tables)"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "auto (cuda if available), cpu or cuda"})
    batch_size: int = field(default=4096, metadata={"help": "batch size of every measurement", "min": 1})
    steps: int = field(default=20, metadata={"help": "timed batches: a train and an eval step of every model on each",
                                             "min": 1})
    warmup: int = field(default=3, metadata={"help": "untimed batches first", "min": 0})
    threads: int = threads_field()
    table_dim: int = field(default=256, metadata={"help": "dim of the random tables used when none are exported",
                                                  "min": 1})
    seed: int = field(default=0, metadata={"help": "seed of the models and the batch order", "min": 0})


class DLRMPlain(nn.Module):
    """``DLRM_DCN`` behind the same plain-tensor signature as :class:`ranking.plain.PlainInputModel`."""

    def __init__(self, spec: FeatureSpec, dim: int, with_tables: bool, config: RankerConfig) -> None:
        super().__init__()
        tables = [EmbeddingBagConfig(name=f"t_{n}", embedding_dim=dim, num_embeddings=rows, feature_names=[n])
                  for n, rows in zip(spec.sparse_names, spec.sparse_num_embeddings)]
        if with_tables:
            tables += [EmbeddingBagConfig(name="product_table", embedding_dim=dim, num_embeddings=spec.num_product_rows,
                                          feature_names=[PRODUCT_FEATURE, HISTORY_FEATURE], pooling=PoolingType.MEAN),
                       EmbeddingBagConfig(name="query_table", embedding_dim=dim, num_embeddings=spec.num_query_rows,
                                          feature_names=[QUERY_FEATURE], pooling=PoolingType.MEAN)]
        self.dlrm = DLRM_DCN(EmbeddingBagCollection(tables=tables), dense_in_features=len(spec.dense_names),
                             dense_arch_layer_sizes=[config.dcn_deep_sizes[0], dim],
                             over_arch_layer_sizes=[*config.dcn_deep_sizes, 1],
                             dcn_num_layers=config.dcn_cross_layers, dcn_low_rank_dim=config.dcn_low_rank)
        self.features = PlainFeatures(spec.sparse_names, spec.sparse_num_embeddings,
                                      spec.num_product_rows if with_tables else 0, spec.num_query_rows if with_tables else 0,
                                      use_history=with_tables)

    def forward(self, dense: torch.Tensor, sparse_ids: torch.Tensor, product_rows: torch.Tensor,
                query_rows: torch.Tensor, history_rows: torch.Tensor) -> torch.Tensor:
        kjt = self.features(sparse_ids, product_rows, query_rows, history_rows)
        return self.dlrm(dense, kjt).squeeze(1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _to(batch: RankingBatch, device: torch.device) -> RankingBatch:
    return RankingBatch(*(t.to(device, non_blocking=True) for t in (batch.dense, batch.sparse_ids, batch.product_rows,
                                                                  batch.query_rows, batch.history_rows, batch.labels,
                                                                  batch.has_history)))


class TimedModel:
    """One model under test, its optimizers and the summed times of its timed steps.

    ``step(batch, train)``: a training step (forward + BCE + backward + optimizer step, train
    mode) or an eval forward (``no_grad``, eval mode); a timed step adds its wall-clock and CPU
    seconds to ``seconds[(train, clock)]``, clock ``"wall"`` or ``"cpu"``.
    """

    def __init__(self, name: str, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                 device: torch.device) -> None:
        self.name, self.model, self.optimizers, self.device = name, model, optimizers, device
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.seconds = {(train, clock): 0.0 for train in (True, False) for clock in ("wall", "cpu")}

    def step(self, batch: RankingBatch, train: bool, timed: bool = True) -> None:
        self.model.train(train)
        _sync(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        if train:
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
            self.loss_fn(self.model(*batch.inputs()), batch.labels).backward()
            for optimizer in self.optimizers:
                optimizer.step()
        else:
            with torch.no_grad():
                self.model(*batch.inputs())
        _sync(self.device)
        if timed:
            self.seconds[train, "wall"] += time.perf_counter() - wall
            self.seconds[train, "cpu"] += time.process_time() - cpu


def _load_data(cfg: RankingBenchConfig) -> tuple[RankingData, FeatureSpec, tuple]:
    try:
        cache = ImpressionCache.open(cfg.workdir)
        purchases = PurchaseIndex.from_workdir(cfg.workdir)
        paths = (embedding_table_path(cfg.workdir, "product"), embedding_table_path(cfg.workdir, "query"))
        if all(p.exists() for p in paths):
            tables = load_tables(*paths)
        else:
            log.info("no exported tables in %s: timing with random tables of dim %d (same cost)", cfg.workdir, cfg.table_dim)
            rng = np.random.default_rng(cfg.seed)
            ids = np.unique(np.asarray(cache.columns["product_id"]))
            tables = (build_table("product", ids, rng.normal(size=(len(ids), cfg.table_dim)), "bench:random"),
                      build_table("query", cache.queries, rng.normal(size=(len(cache.queries), cfg.table_dim)), "bench:random"))
    except SchemaError as exc:
        raise UserError(str(exc)) from None
    spec = build_spec(cache.meta, tables)
    return RankingData(cache, purchases, spec), spec, tables


def run(cfg: RankingBenchConfig) -> tuple[list[dict], torch.device]:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    torch.set_num_threads(resolve_threads(cfg.threads))
    data, spec, tables = _load_data(cfg)
    n_batches = cfg.warmup + cfg.steps
    if data.num_rows("train") < cfg.batch_size:
        raise UserError(f"{cfg.workdir}: {data.num_rows('train')} training impressions, fewer than one batch of {cfg.batch_size}")
    rng = np.random.default_rng(cfg.seed)
    index = rng.permutation(np.asarray(data.cache.split_index("train")))
    batches, data_s = [], 0.0
    for k in range(n_batches):
        rows = np.sort(index[(k * cfg.batch_size) % (len(index) - cfg.batch_size):][: cfg.batch_size])
        start = time.perf_counter()
        batches.append(data.batch(rows))
        data_s += time.perf_counter() - start
    data_ms = 1000 * data_s / n_batches
    batches = [_to(b, device) for b in batches]
    config = cfg.model_only()
    models: list[TimedModel] = []
    for name, variant in VARIANTS.items():
        seed_everything(cfg.seed)
        model = build_model(variant, spec, config, build_tables(variant, spec, tables, torch.Generator().manual_seed(cfg.seed)))
        models.append(TimedModel(name, PlainInputModel(model).to(device), make_optimizers(model.to(device), "adam", 1e-3),
                                 device))
    for with_tables, label in REFERENCES.items():
        seed_everything(cfg.seed)
        dlrm = DLRMPlain(spec, config.sparse_embedding_dim, with_tables, config).to(device)
        models.append(TimedModel(label, dlrm, [torch.optim.Adam(dlrm.parameters(), lr=1e-3)], device))
    for k, batch in enumerate(batches):
        for m in models:
            for train in (True, False):
                m.step(batch, train, timed=k >= cfg.warmup)
    samples = cfg.steps * cfg.batch_size
    rows = []
    for m in models:
        rate = {key: samples / seconds for key, seconds in m.seconds.items()}
        step_ms = 1000 * m.seconds[True, "wall"] / cfg.steps
        rows.append({"model": m.name, "train_samples_per_s": rate[True, "wall"], "eval_samples_per_s": rate[False, "wall"],
                     "train_samples_per_cpu_s": rate[True, "cpu"] if device.type == "cpu" else None,
                     "eval_samples_per_cpu_s": rate[False, "cpu"] if device.type == "cpu" else None,
                     "train_step_ms": step_ms, "data_ms_per_batch": data_ms,
                     "data_share": data_ms / (data_ms + step_ms),
                     "parameters": sum(p.numel() for p in m.model.parameters()),
                     "trainable_parameters": sum(p.numel() for o in m.optimizers for g in o.param_groups
                                                 for p in g["params"])})
        log.info("%s: train %.0f samples/s, eval %.0f samples/s", m.name, rate[True, "wall"], rate[False, "wall"])
    by_name = {r["model"]: r for r in rows}
    for r in rows:
        if r["model"] in VARIANTS:
            ref = by_name[REFERENCES[VARIANTS[r["model"]].uses_tables]]
            on_cpu = device.type == "cpu"
            r.update(reference=ref["model"],
                     train_vs_reference=r["train_samples_per_s"] / ref["train_samples_per_s"],
                     eval_vs_reference=r["eval_samples_per_s"] / ref["eval_samples_per_s"],
                     train_vs_reference_cpu=r["train_samples_per_cpu_s"] / ref["train_samples_per_cpu_s"] if on_cpu else None,
                     eval_vs_reference_cpu=r["eval_samples_per_cpu_s"] / ref["eval_samples_per_cpu_s"] if on_cpu else None)
    return rows, device


def format_table(rows: list[dict], cfg: RankingBenchConfig, device: torch.device) -> str:
    head = (f"ranking bench: device {device} ({platform.processor() or platform.machine()}, {cfg.threads} threads), "
            f"batch {cfg.batch_size}, {cfg.steps} timed batches after {cfg.warmup} warm-up, the models taking turns "
            f"batch by batch\n")
    lines = [head, "| model | train samples/s | eval samples/s | vs torchrec: train / eval | same, CPU time | "
                   "train step ms | data ms/batch | data share | params (trainable) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        versus = cpu = "—"
        if "reference" in r:
            versus = f"{r['train_vs_reference']:.2f}x / {r['eval_vs_reference']:.2f}x"
            if r["train_vs_reference_cpu"] is not None:
                cpu = f"{r['train_vs_reference_cpu']:.2f}x / {r['eval_vs_reference_cpu']:.2f}x"
        lines.append(f"| {r['model']} | {r['train_samples_per_s']:,.0f} | {r['eval_samples_per_s']:,.0f} | {versus} | "
                     f"{cpu} | {r['train_step_ms']:.1f} | {r['data_ms_per_batch']:.1f} | {r['data_share']:.1%} | "
                     f"{r['parameters']:,} ({r['trainable_parameters']:,}) |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict]:
    cfg = parse_config(RankingBenchConfig, argv)
    cfg = replace(cfg, threads=resolve_threads(cfg.threads))  # the count measured, recorded
    rows, device = run(cfg)
    table = format_table(rows, cfg, device)
    print(table)
    root = prepare_workdir(cfg.workdir, layout.ROOT)
    write_json({"device": str(device), "batch_size": cfg.batch_size, "steps": cfg.steps, "warmup": cfg.warmup,
                "threads": cfg.threads, "rows": rows}, root / layout.BENCH_JSON_REL)
    return rows


if __name__ == "__main__":
    run_main(main)
