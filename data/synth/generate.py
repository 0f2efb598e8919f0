"""The command ``python -m data.synth`` (:class:`SynthArgs`, :func:`main`) and :func:`generate`: check
the flags, build the catalog and the users, write every table chunk by chunk through a validating
:class:`TableSink`, and publish the set with its manifest (settings, row counts, measured rates)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from common.cli import DEFAULT_WORKDIR, UserError, check_config, parse_config
from common.io import prepare_workdir
from common.provenance import MadeFrom, canonical
from data import schema
from data.dataset import RELEVANCE_TRUTH_FILE, TRUTH_FILE, data_set, table_rel
from data.protocol import DAY_S, EVAL_DAYS
from data.synth.catalog import CATALOG_EXTRA, Catalog, build_catalog, catalog_batch
from data.synth.config import PROFILES, Behaviour, ClickModel, ProfileConfig
from data.synth.counting import QueryCodes, QueryCountFeatures
from data.synth.history import PurchaseHistory
from data.synth.queries import KIND_NAMES
from data.synth.relevance import LabelCounts, relevance_batches
from data.synth.sampling import STREAM_STORES, stream_rng
from data.synth.simulate import (PURCHASES_SCHEMA, TRUTH_SCHEMA, ImpressionStats, MarketState, impression_features,
                                 simulate_day)
from data.synth.users import Users, build_users

log = logging.getLogger("data.synth")  # the command's name, in its log lines (not this module's)

GENERATOR_VERSION = 2


@dataclass
class SynthArgs:
    """Generate the synthetic marketplace tables under DIR/data."""

    profile: str = field(default="demo", metadata={"help": "size profile", "choices": tuple(PROFILES)})
    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory"})
    seed: int = field(default=0, metadata={"help": "random seed", "min": 0})
    label_noise: float = field(default=0.0, metadata={"help": "share of relevance labels flipped", "min": 0.0,
                                                      "max": 1.0})
    scale: float = field(default=1.0, metadata={"help": "multiply the profile's product/user/session/query counts",
                                                "gt": 0.0})
    query_counts: bool = field(default=True, metadata={
        "help": "add the query counting features (past CTR and impressions of the query, (query, product) and "
                "(query, aisle)) to the impressions; --no-query-counts gives the baseline without query signal"})
    force: bool = field(default=False, metadata={"help": "regenerate even if the outputs match these settings"})


class TableSink(contextlib.AbstractContextManager):
    """Validate incoming chunks and write them as fixed-size row groups to ``tmp`` (final name ``dest``).

    As a context manager it closes the file on success and abandons it on an error.
    """

    def __init__(self, tmp: Path, dest: Path, table_schema: pa.Schema, rows_per_group: int,
                 name: schema.TableName | None, catalog_ids: np.ndarray | None = None):
        self.dest, self.name, self.catalog_ids = dest, name, catalog_ids
        self.rows_per_group = rows_per_group
        self.writer = pq.ParquetWriter(tmp, table_schema, compression="zstd")
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if self.name is not None:
            schema.validate(table, self.dest, self.name, catalog_ids=self.catalog_ids)
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.rows += table.num_rows
        if self.pending_rows >= self.rows_per_group:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.pending:
            return
        data = pa.concat_tables(self.pending)
        full = data.num_rows if final else data.num_rows - data.num_rows % self.rows_per_group
        for start in range(0, full, self.rows_per_group):
            self.writer.write_table(data.slice(start, min(self.rows_per_group, full - start)),
                                    row_group_size=self.rows_per_group)
        rest = data.slice(full)
        self.pending = [rest] if rest.num_rows else []
        self.pending_rows = rest.num_rows

    def close(self) -> None:
        self._flush(final=True)
        self.writer.close()

    def abort(self) -> None:
        try:
            self.writer.close()
        except OSError:
            self.writer.is_open = False  # else pyarrow retries the close (and fails again) at garbage collection

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _settings(args: SynthArgs, cfg: ProfileConfig, behaviour: Behaviour, clicks: ClickModel) -> dict:
    return {"generator": "data.synth", "generator_version": GENERATOR_VERSION, "profile": args.profile,
            "seed": args.seed, "scale": args.scale, "label_noise": args.label_noise, "query_counts": args.query_counts,
            "config": dataclasses.asdict(cfg), "behaviour": dataclasses.asdict(behaviour),
            "click_model": dataclasses.asdict(clicks)}


OUTPUTS = (*schema.TABLE_NAMES, "truth", "relevance_truth")


def _rel(name: str) -> str:
    """The output's path relative to the workdir."""
    if name == "truth":
        return f"data/{TRUTH_FILE}"
    if name == "relevance_truth":
        return f"data/{RELEVANCE_TRUTH_FILE}"
    return table_rel(name)  # type: ignore[arg-type]


def _dest(workdir: Path, name: str) -> Path:
    return workdir / _rel(name)


def generate(args: SynthArgs) -> dict:
    """Generate all tables for ``args``; returns the manifest (also written to DIR/data/manifest.json)."""
    check_config(args)  # also when called with args built in code
    cfg = PROFILES[args.profile].scaled(args.scale)
    workdir = prepare_workdir(args.workdir, "data")
    behaviour, clicks = Behaviour(), ClickModel()
    settings = canonical(_settings(args, cfg, behaviour, clicks))
    output = data_set(workdir, [_rel(name) for name in OUTPUTS], what="python -m data.synth")
    made_from = MadeFrom(settings=settings)
    if not args.force and output.current(made_from):
        log.info("outputs in %s already match these settings; skipping (use --force to regenerate)",
                 workdir / "data")
        return output.manifest() or {}

    log.info("profile %s (scale %g, seed %d): %d products, %d users, %d sessions, %d relevance queries, %d days",
             args.profile, args.scale, args.seed, cfg.n_products, cfg.n_users, cfg.n_sessions,
             cfg.n_relevance_queries, cfg.n_days)
    catalog = build_catalog(cfg, args.seed, clicks)
    users = build_users(cfg, catalog, behaviour, clicks, args.seed)
    start_ts = int(datetime.fromisoformat(cfg.start_date).replace(tzinfo=timezone.utc).timestamp())
    ids = catalog.product_id
    label_counts, stats = LabelCounts(), ImpressionStats()
    manifest: dict = {}
    try:
        with output.publish(made_from, manifest) as staged:
            tmp = {name: staged[_rel(name)] for name in OUTPUTS}
            with contextlib.ExitStack() as writers:
                def sink(name: str, table_schema: pa.Schema, rows_per_group: int, validate_as: str | None,
                         known_ids: np.ndarray | None = None) -> TableSink:
                    return writers.enter_context(TableSink(tmp[name], _dest(workdir, name), table_schema,
                                                           rows_per_group, validate_as, known_ids))

                sinks = {
                    "catalog": sink("catalog", schema.schema("catalog", CATALOG_EXTRA), cfg.catalog_rows_per_group,
                                    "catalog"),
                    "relevance": sink("relevance", schema.schema("relevance"), cfg.rows_per_group, "relevance", ids),
                    "impressions": sink("impressions", schema.schema("impressions",
                                                                     impression_features(args.query_counts)),
                                        cfg.rows_per_group, "impressions", ids),
                    "purchases": sink("purchases", PURCHASES_SCHEMA, cfg.rows_per_group, "purchases", ids),
                    "truth": sink("truth", TRUTH_SCHEMA, cfg.rows_per_group, None),
                    "relevance_truth": sink("relevance_truth", schema.schema("relevance"), cfg.rows_per_group,
                                            None),
                }
                for start in tqdm(range(0, catalog.n, cfg.catalog_rows_per_group), desc="catalog", unit="chunk"):
                    stop = min(catalog.n, start + cfg.catalog_rows_per_group)
                    sinks["catalog"].write(catalog_batch(catalog, start, stop, cfg.image_px))
                for batch, truth in tqdm(relevance_batches(catalog, cfg, behaviour, args.seed, args.label_noise,
                                                           label_counts), desc="relevance", unit="chunk"):
                    sinks["relevance"].write(batch)
                    sinks["relevance_truth"].write(truth)
                _simulate(cfg, catalog, users, behaviour, clicks, args.seed, start_ts, sinks, stats, args.query_counts)
            # every table is complete and closed; the set is published when ``publish`` exits
            row_counts = {name: sinks[name].rows for name in schema.TABLE_NAMES}
            manifest.update(_manifest(settings, cfg, row_counts, label_counts, stats, catalog, users, start_ts))
    except OSError as exc:
        raise UserError(f"cannot write the tables under {workdir / 'data'}: {exc.strerror or exc}") from None
    log.info("wrote %s: %s; click rate %.4f; label split %s", workdir / "data", row_counts, manifest["click_rate"],
             manifest["label_split"])
    return output.manifest() or manifest


def _simulate(cfg: ProfileConfig, catalog: Catalog, users: Users, behaviour: Behaviour, clicks: ClickModel,
              seed: int, start_ts: int, sinks: dict[str, TableSink], stats: ImpressionStats,
              query_counts: bool) -> None:
    store_rng = stream_rng(seed, STREAM_STORES)
    state = MarketState(history=PurchaseHistory(catalog),
                        product_impressions=np.zeros(catalog.n, dtype=np.int64),
                        product_clicks=np.zeros(catalog.n, dtype=np.int64),
                        store_effect=store_rng.normal(0.0, clicks.store_sd, cfg.n_stores),
                        query_counts=QueryCountFeatures(catalog.n, len(catalog.vocab.aisles), clicks.ctr_prior,
                                                        clicks.ctr_prior_strength) if query_counts else None)
    eval_start = start_ts + (cfg.n_days - EVAL_DAYS) * DAY_S
    seen_queries = QueryCodes()  # the queries of the days before the evaluation week
    for day in tqdm(range(cfg.n_days), desc="days", unit="day"):
        result = simulate_day(day, cfg, catalog, users, behaviour, clicks, state, seed, start_ts)
        sinks["purchases"].write(result.purchases)
        sinks["impressions"].write(result.impressions)
        sinks["truth"].write(result.truth)
        label = result.truth.column("true_label").to_numpy()
        clicked = result.impressions.column("clicked").to_numpy()
        stats.rows += len(label)
        stats.clicks += int(clicked.sum())
        np.add.at(stats.by_label, (label, 0), 1)
        np.add.at(stats.by_label, (label, 1), clicked)
        buyer = users.has_purchases[result.impressions.column("user_id").to_numpy() - 1]
        hist_aisle = result.truth.column("hist_aisle").to_numpy()[buyer]
        np.add.at(stats.by_history_aisle, (hist_aisle, 0), 1)
        np.add.at(stats.by_history_aisle, (hist_aisle, 1), clicked[buyer])
        hashes = result.session_hashes
        if start_ts + day * DAY_S >= eval_start:
            stats.eval_rows += len(result.row_session)
            stats.eval_rows_new_query += int((seen_queries.lookup(hashes) < 0)[result.row_session].sum())
        else:
            seen_queries.assign(hashes)
    if state.query_counts is not None:
        stats.query_count_keys = state.query_counts.sizes()


def _manifest(settings: dict, cfg: ProfileConfig, row_counts: dict, labels: LabelCounts, stats: ImpressionStats,
              catalog: Catalog, users: Users, start_ts: int) -> dict:
    def split(counts: np.ndarray) -> dict[str, float]:
        total = max(1, int(counts.sum()))
        return {schema.LABEL_NAMES[k]: round(int(counts[k]) / total, 4) for k in (schema.IR, schema.MR, schema.HR)}

    def rate(rows_clicks: np.ndarray) -> float | None:
        return round(int(rows_clicks[1]) / int(rows_clicks[0]), 4) if rows_clicks[0] else None

    end = datetime.fromtimestamp(start_ts + cfg.n_days * DAY_S - 1, timezone.utc)
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "source": f"synth:{settings['profile']}",
        "settings": settings,
        "row_counts": row_counts,
        "click_rate": round(stats.clicks / max(1, stats.rows), 4),
        "label_split": split(labels.noisy),
        "label_split_clean": split(labels.clean),
        "labels_flipped": labels.flipped,
        "relevance_queries": labels.queries,
        "ctr_by_true_label": {schema.LABEL_NAMES[k]: rate(stats.by_label[k]) for k in range(3)},
        "ctr_buyers_by_history_aisle_match": {"no": rate(stats.by_history_aisle[0]),
                                              "yes": rate(stats.by_history_aisle[1])},
        "eval_share_of_impressions_with_unseen_query": round(stats.eval_rows_new_query / max(1, stats.eval_rows), 4),
        "query_count_keys": stats.query_count_keys,
        "date_range": [datetime.fromtimestamp(start_ts, timezone.utc).strftime("%Y-%m-%d"), end.strftime("%Y-%m-%d")],
        "eval_week_start": datetime.fromtimestamp(start_ts + (cfg.n_days - EVAL_DAYS) * DAY_S,
                                                  timezone.utc).strftime("%Y-%m-%d"),
        "users": {"total": users.n, "without_purchases_share": round(float(1 - users.has_purchases.mean()), 4)},
        "sparse_cardinality": {"sparse_store": cfg.n_stores, "sparse_aisle": len(catalog.vocab.aisles),
                               "sparse_brand": len(catalog.brand_name), "sparse_platform": 3,
                               "sparse_product": catalog.n + 1, "sparse_hour_bucket": 6, "sparse_weekday": 7},
        "truth_file": {"path": f"data/{TRUTH_FILE}", "row_aligned_with": "impressions",
                       "intent_kinds": list(KIND_NAMES),
                       "candidate_sources": ["exact", "near", "same_aisle", "popular"]},
    }


def main(argv: Sequence[str] | None = None) -> dict:
    return generate(parse_config(SynthArgs, argv))
