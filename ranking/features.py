"""Impressions + purchases -> model-ready batches, with the 84-day purchase history as of each impression.

Pipeline (every step streams or is vectorised; nothing holds the impression table in memory):

1. :class:`ImpressionCache` streams ``DIR/data/impressions.parquet`` once
   (``ParquetFile.iter_batches``, each batch validated against :mod:`data.schema`) into ``.npy``
   columns under ``DIR/ranking/cache/<key>/`` (:func:`ranking.layout.cache_dir`; read back as
   memory maps), where ``key`` hashes the impressions file and the split settings. It also
   computes training-split statistics (dense mean/std, sparse max ids, click rate) and the query
   vocabulary (normalised with :func:`data.text.normalize_query`). A complete cache is reused. A
   build writes to a temp directory named by :func:`common.io.temp_sibling` (it carries the
   builder's pid) that is renamed only when complete; the leftover of a killed build is removed
   by the next :meth:`ImpressionCache.open` (:func:`common.io.prepare_workdir` on
   ``DIR/ranking/cache``).
2. :class:`ranking.spec.PurchaseIndex` answers the as-of-time history lookups and
   :class:`ranking.spec.FeatureSpec`, the serving contract, says how raw fields become the
   model's plain tensors (:func:`build_spec` makes it from the cache's statistics).
3. :class:`RankingData` joins the three into :class:`RankingBatch` es.

Time split (:mod:`data.protocol`): evaluation ("NW") = impressions with ``ts >= max_ts - EVAL_DAYS``
(7 days); train = the rest. For early stopping, train splits again by time: ``valid`` = its last
``VALID_DAYS`` (7), ``fit`` = the rest. ``has_history`` (the ``nw_hist`` slice) = the user has at
least one purchase in the ``HISTORY_DAYS`` (84) days before the impression (counted before the
``history_len`` cap).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from common.io import prepare_workdir, read_json, temp_sibling, write_json
from data.dataset import input_hashes, table_rel
from data.protocol import DAY_S, EVAL_DAYS, HISTORY_DAYS
from data.schema import SchemaError, feature_columns, table_path, validate
from data.text import normalize_query
from embeddings.tables import EmbeddingTable
from ranking import layout
from ranking.spec import HISTORY_LEN, FeatureSpec, PurchaseIndex

log = logging.getLogger(__name__)

VALID_DAYS = 7  # the early-stopping hold-out: the last days before the evaluation week
CACHE_VERSION = 2  # 2: the query vocabulary as an Arrow file
QUERIES_FILE = "queries.arrow"
SPLITS = ("train", "eval", "fit", "valid")


@dataclass
class CacheMeta:
    """What :class:`ImpressionCache` learned in its one streaming pass (``meta.json``)."""

    key: str
    num_rows: int
    num_train: int
    num_eval: int
    dense_names: list[str]
    sparse_names: list[str]
    max_ts: int
    eval_start_ts: int
    eval_days: int
    dense_mean: list[float]
    dense_std: list[float]
    sparse_max_train_id: list[int]
    train_click_rate: float
    eval_click_rate: float


class ImpressionCache:
    """Column store of the impressions as ``.npy`` memory maps (see module docstring).

    Columns: ``ts`` int64 seconds, ``user_id`` int64, ``product_id`` int64, ``query_code`` int32
    (index into :attr:`queries`, the normalised queries in ``queries.arrow``), ``clicked`` int8, ``dense`` float32 ``[N, D]``, ``sparse`` int64
    ``[N, S]``, ``train_index`` / ``eval_index`` int64 row numbers of each split.
    Training statistics in :attr:`meta` (dense mean/std, sparse max ids, click rate) cover the
    whole ``train`` split.
    """

    COLUMNS = ("ts", "user_id", "product_id", "query_code", "clicked", "dense", "sparse", "train_index", "eval_index")

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.meta = CacheMeta(**read_json(directory / "meta.json"))
        # one Arrow array mapped from the file: no Python object per query
        self.queries: pa.LargeStringArray = pa.ipc.open_file(pa.memory_map(str(directory / QUERIES_FILE))).get_batch(0).column(0)
        self.columns = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in self.COLUMNS}

    @staticmethod
    def cache_key(workdir: str | Path, eval_days: int = EVAL_DAYS) -> str:
        """The key of the impressions table's cache (after checking the published data set)."""
        digest = input_hashes(workdir, ["impressions"])[table_rel("impressions")]
        blob = json.dumps({"impressions": digest, "eval_days": eval_days, "version": CACHE_VERSION})
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def open(cls, workdir: str | Path, eval_days: int = EVAL_DAYS, batch_rows: int = 262_144) -> "ImpressionCache":
        """Reuse ``DIR/ranking/cache/<key>`` when complete, else build it (atomically) and remove
        the caches of other keys (older impressions files); see :func:`open_cached`."""
        key = cls.cache_key(workdir, eval_days)
        prepare_workdir(workdir, layout.CACHE_REL)
        return cls(open_cached(layout.cache_dir(workdir, key),
                               lambda out: _build_cache(workdir, out, key, eval_days, batch_rows)))

    def query_text(self, code: int) -> str:
        """The normalised query of ``query_code`` ``code``."""
        return self.queries[code].as_py()

    def split_index(self, split: str, valid_days: int = VALID_DAYS) -> np.ndarray:
        """Row numbers of ``split``: ``train`` (before the evaluation week), ``eval`` (the last
        ``eval_days``), or ``train`` cut by time into ``fit`` and ``valid`` (its last ``valid_days``)."""
        if split in ("train", "eval"):
            return self.columns[f"{split}_index"]
        if split not in ("fit", "valid"):
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        train = np.asarray(self.columns["train_index"])
        in_valid = self.columns["ts"][train] >= self.meta.eval_start_ts - valid_days * DAY_S
        return train[in_valid] if split == "valid" else train[~in_valid]


def open_cached(directory: Path, build: Callable[[Path], None]) -> Path:
    """``directory`` when it is complete (it holds ``meta.json``, written last), else built:
    ``build(tmp)`` fills a fresh temp sibling, renamed to ``directory`` only when complete (the
    leftover of a killed build is removed by the next :func:`common.io.prepare_workdir` on the
    parent). After a build the other complete caches beside it, of inputs that are gone, are removed."""
    if (directory / "meta.json").exists():
        log.info("cache %s is complete; reusing it", directory)
        return directory
    tmp = temp_sibling(directory)
    tmp.mkdir()
    try:
        build(tmp)
        try:
            os.replace(tmp, directory)  # directories are renamed only when complete
        except OSError:
            if not (directory / "meta.json").exists():
                raise
            log.info("another process completed %s first; using it", directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in directory.parent.iterdir():
        if stale.is_dir() and stale != directory and not stale.name.startswith(".") and (stale / "meta.json").exists():
            shutil.rmtree(stale, ignore_errors=True)
    return directory


def write_queries(queries: list[str], path: Path) -> None:
    """The query vocabulary (code ``i`` -> ``queries[i]``) as an Arrow IPC file of one ``large_string``
    column, read back memory-mapped."""
    batch = pa.record_batch([pa.array(queries, pa.large_string())], names=["query"])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)


def _max_ts(pf: pq.ParquetFile, path: Path, batch_rows: int) -> int:
    """The latest impression time (seconds), from a pass over the ``ts`` column only."""
    best: int | None = None
    for batch in pf.iter_batches(batch_size=batch_rows, columns=["ts"]):
        col = batch.column(0)
        if not pa.types.is_timestamp(col.type):
            raise SchemaError(path, "ts", f"expected dtype timestamp[s], got {col.type}")
        m = pc.max(col.cast(pa.timestamp("s")).cast(pa.int64())).as_py()
        if m is not None and (best is None or m > best):
            best = int(m)
    if best is None:
        raise SchemaError(path, "ts", "no timestamps (empty table or all null)")
    return best


def _build_cache(workdir: str | Path, out: Path, key: str, eval_days: int, batch_rows: int) -> None:
    path = table_path(workdir, "impressions")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(path, None, f"not a readable Parquet file: {exc}") from None
    validate(pf.schema_arrow.empty_table(), path, "impressions")  # columns and dtypes, before any pass
    names = pf.schema_arrow.names
    dense_names, sparse_names = feature_columns(names)
    n, d, s = pf.metadata.num_rows, len(dense_names), len(sparse_names)
    if n == 0:
        raise SchemaError(path, None, "the impressions table is empty")
    max_ts = _max_ts(pf, path, batch_rows)
    eval_start = max_ts - eval_days * DAY_S
    fmt = np.lib.format
    cols = {
        "ts": fmt.open_memmap(out / "ts.npy", "w+", np.int64, (n,)),
        "user_id": fmt.open_memmap(out / "user_id.npy", "w+", np.int64, (n,)),
        "product_id": fmt.open_memmap(out / "product_id.npy", "w+", np.int64, (n,)),
        "query_code": fmt.open_memmap(out / "query_code.npy", "w+", np.int32, (n,)),
        "clicked": fmt.open_memmap(out / "clicked.npy", "w+", np.int8, (n,)),
        "dense": fmt.open_memmap(out / "dense.npy", "w+", np.float32, (n, d)),
        "sparse": fmt.open_memmap(out / "sparse.npy", "w+", np.int64, (n, s)),
    }
    vocab: dict[str, int] = {}
    dense_sum, dense_sq = np.zeros(d), np.zeros(d)
    sparse_max = np.full(s, -1, np.int64)
    clicks = {"train": 0, "eval": 0}
    counts = {"train": 0, "eval": 0}
    start = 0
    with tqdm(total=n, desc="feature cache", unit="row", disable=None) as bar:
        for batch in pf.iter_batches(batch_size=batch_rows):
            table = validate(pa.Table.from_batches([batch]), path, "impressions")
            m = table.num_rows
            rows = slice(start, start + m)
            ts = table.column("ts").cast(pa.int64()).to_numpy()
            cols["ts"][rows] = ts
            cols["user_id"][rows] = table.column("user_id").to_numpy()
            cols["product_id"][rows] = table.column("product_id").to_numpy()
            clicked = table.column("clicked").to_numpy()
            cols["clicked"][rows] = clicked
            encoded = pc.dictionary_encode(table.column("query").combine_chunks())
            local = np.array([vocab.setdefault(normalize_query(q), len(vocab))
                              for q in encoded.dictionary.to_pylist()], dtype=np.int32)
            cols["query_code"][rows] = local[encoded.indices.to_numpy()] if len(local) else 0
            dense = np.stack([table.column(c).to_numpy() for c in dense_names], axis=1) if d else np.zeros((m, 0), np.float32)
            sparse = np.stack([table.column(c).to_numpy() for c in sparse_names], axis=1) if s else np.zeros((m, 0), np.int64)
            cols["dense"][rows] = dense
            cols["sparse"][rows] = sparse
            train = ts < eval_start
            dense_sum += dense[train].sum(0, dtype=np.float64)
            dense_sq += np.square(dense[train], dtype=np.float64).sum(0)
            if train.any() and s:
                sparse_max = np.maximum(sparse_max, sparse[train].max(0))
            clicks["train"] += int(clicked[train].sum())
            clicks["eval"] += int(clicked[~train].sum())
            counts["train"] += int(train.sum())
            counts["eval"] += int((~train).sum())
            start += m
            bar.update(m)
    for arr in cols.values():
        arr.flush()
    ts_all = cols["ts"]
    np.save(out / "train_index.npy", np.flatnonzero(ts_all < eval_start))
    np.save(out / "eval_index.npy", np.flatnonzero(ts_all >= eval_start))
    if counts["train"] == 0:
        raise SchemaError(path, "ts", f"no training impressions: every row is within the last {eval_days} days "
                                      f"(max ts {max_ts}); the ranking split needs older impressions")
    mean = dense_sum / counts["train"]
    std = np.sqrt(np.maximum(dense_sq / counts["train"] - mean**2, 0.0))
    std = np.where(std > 1e-12, std, 1.0)
    write_queries(sorted(vocab, key=vocab.__getitem__), out / QUERIES_FILE)
    meta = CacheMeta(key=key, num_rows=n, num_train=counts["train"], num_eval=counts["eval"],
                     dense_names=dense_names, sparse_names=sparse_names, max_ts=max_ts, eval_start_ts=eval_start,
                     eval_days=eval_days, dense_mean=mean.tolist(), dense_std=std.tolist(),
                     sparse_max_train_id=sparse_max.tolist(), train_click_rate=clicks["train"] / counts["train"],
                     eval_click_rate=clicks["eval"] / max(counts["eval"], 1))
    write_json(asdict(meta), out / "meta.json")
    log.info("feature cache: %d impressions (%d train, %d eval), %d dense, %d sparse, %d queries",
             n, counts["train"], counts["eval"], d, s, len(vocab))


@dataclass
class RankingBatch:
    """One batch of plain tensors, in :class:`FeatureSpec` order.

    dense ``[B, D]`` float32 (raw), sparse_ids ``[B, S]`` int64 (raw), product_rows ``[B]``,
    query_rows ``[B]``, history_rows ``[B, L]`` (-1 padded; ``L`` = the longest bag of the batch,
    at most ``spec.history_len``), labels ``[B]`` float32, has_history ``[B]`` bool.
    """

    dense: torch.Tensor
    sparse_ids: torch.Tensor
    product_rows: torch.Tensor
    query_rows: torch.Tensor
    history_rows: torch.Tensor
    labels: torch.Tensor
    has_history: torch.Tensor

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """Positional inputs of ``PlainInputModel.forward``."""
        return self.dense, self.sparse_ids, self.product_rows, self.query_rows, self.history_rows

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def build_spec(meta: CacheMeta, tables: tuple[EmbeddingTable, EmbeddingTable] | None = None,
               history_len: int = HISTORY_LEN, history_days: int = HISTORY_DAYS) -> FeatureSpec:
    """The feature spec from training-split statistics (sparse tables get ``max train id + 2``
    rows: ids 0..max plus the reserved bucket) and, when given, the frozen tables' id maps."""
    spec = FeatureSpec(dense_names=list(meta.dense_names), dense_mean=list(meta.dense_mean),
                       dense_std=list(meta.dense_std), sparse_names=list(meta.sparse_names),
                       sparse_num_embeddings=[int(m) + 2 for m in meta.sparse_max_train_id],
                       train_click_rate=float(meta.train_click_rate), history_len=history_len,
                       history_days=history_days)
    return spec.with_tables(*tables) if tables is not None else spec


class RankingData:
    """Batches of one split from the cache, the purchase index and a spec."""

    def __init__(self, cache: ImpressionCache, purchases: PurchaseIndex, spec: FeatureSpec) -> None:
        self.cache, self.purchases, self.spec = cache, purchases, spec
        self._query_code_rows = spec.query_rows(cache.queries)  # the table row of every query code, mapped once
        self._purchase_rows = spec.product_rows(purchases.product_id)  # table row of every purchase, mapped once

    def num_rows(self, split: str) -> int:
        return len(self.cache.split_index(split))

    def batch(self, rows: np.ndarray) -> RankingBatch:
        """The batch of cache rows ``rows`` (sorted for memory-map locality by the caller)."""
        c, spec = self.cache.columns, self.spec
        user, ts = c["user_id"][rows], c["ts"][rows]
        positions, count = self.purchases.history_positions(user, ts, spec.history_len, spec.history_days, trim=True)
        history_rows = np.where(positions >= 0, self._purchase_rows[np.maximum(positions, 0)] if len(self.purchases) else -1, -1)
        return RankingBatch(
            dense=torch.from_numpy(np.ascontiguousarray(c["dense"][rows])),
            sparse_ids=torch.from_numpy(np.ascontiguousarray(c["sparse"][rows])),
            product_rows=torch.from_numpy(spec.product_rows(c["product_id"][rows])),
            query_rows=torch.from_numpy(self._query_code_rows[c["query_code"][rows]]),
            history_rows=torch.from_numpy(history_rows),
            labels=torch.from_numpy(c["clicked"][rows].astype(np.float32)),
            has_history=torch.from_numpy(count > 0),
        )

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False,
                rng: np.random.Generator | None = None) -> Iterator[RankingBatch]:
        """All rows of ``split`` in batches; ``shuffle`` draws the order from ``rng``."""
        index = np.asarray(self.cache.split_index(split))
        if shuffle:
            index = (rng or np.random.default_rng(0)).permutation(index)
        for start in range(0, len(index), batch_size):
            chunk = index[start:start + batch_size]
            yield self.batch(np.sort(chunk) if shuffle else chunk)
