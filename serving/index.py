"""Nearest-product index over the exported product table (FAISS, cosine).

``python -m serving.index --workdir DIR [--kind auto|exact|hnsw|ivf] [--exact-below 50000]
[--hnsw-m 32] [--ef-construction 200] [--ef-search 128] [--nlist 0] [--nprobe 32]
[--build-threads 1] [--seed 0] [--force]``

Reads ``DIR/embeddings/product_table.parquet`` (the layout of :mod:`embeddings.tables`, checked
with ``embeddings.tables.tables_set(DIR).verify()``) and writes, as one
:class:`common.provenance.OutputSet` beside the exported model:

``DIR/serving/index.faiss``
    A FAISS index (``faiss.write_index``) over the table's rows 1..R-1. Row 0, the zero vector of
    unknown ids, is left out, so it is never a result; so are other all-zero rows (logged).
    Vectors are normalised again (the table's rows should already be unit vectors; rows whose
    norm is off by more than 1e-3 are counted and logged), so inner product = cosine.
``DIR/serving/index_ids.npy``
    int64 ``[N]``: index position -> ``product_id``.
``DIR/serving/index.manifest.json``
    ``made_from`` = the product table's SHA-256 + the settings of the index kind built;
    ``files`` = both files' hashes; plus kind, products, dim, faiss version.

Kinds (``--kind auto`` = ``exact`` when the table has fewer than ``--exact-below`` products,
else ``hnsw``):

``exact``  ``IndexFlatIP``: brute force, exact.
``hnsw``   ``IndexHNSWFlat(d, --hnsw-m, METRIC_INNER_PRODUCT)`` with ``--ef-construction``;
           ``--ef-search`` is stored in the file (a caller may override it per search).
``ivf``    ``IndexIVFFlat`` over an ``IndexFlatIP`` coarse quantizer, spherical k-means with
           ``--seed``, ``--nlist`` lists (0 = ``4 * sqrt(N)``, at most ``N / 39``), ``--nprobe``.

The index is rebuilt when the product table or the settings of the kind built change, skipped
(logged) otherwise; ``--force`` rebuilds. Determinism: with ``--build-threads 1`` (default) the
same table and settings give a byte-identical ``index.faiss`` for every kind (the HNSW level
draw uses FAISS's fixed seed; checked by the tests). With more threads FAISS inserts HNSW points
in parallel under locks, so the graph may depend on the thread schedule: an equally good index,
but the same bytes are not guaranteed.

Serving: :class:`ProductIndex` (``ProductIndex.load(DIR).search(query_vectors [Q, d], k)`` ->
``(product_ids [Q, k'] int64, cosines [Q, k'] float32)``, ``k' = min(k, N)``). Searches are
read-only on the FAISS index (per-call search parameters, FAISS releases the GIL), so one
instance serves many threads. ``python -m serving.add_products`` serves its own copy of the index
with the added products (:func:`index_with`, read with :meth:`ProductIndex.read`); this set stays
the index of the exported product table.

Benchmark: ``python -m serving.index --bench [--bench-n 400000] [--bench-dim 256]
[--bench-data clustered|uniform] [--bench-kinds exact hnsw ivf]`` builds each kind over random
unit vectors (:func:`bench_vectors`) with the flags above, measures build time, index bytes,
peak RSS, recall@10 against exact search over ``--bench-queries`` queries and p50/p99 latency of
one query per call on one thread (sweeping ``--bench-ef-search`` / ``--bench-nprobe``), prints a
table and writes ``DIR/serving/index_bench.json``. Latency is reported as wall time and as the
searching thread's CPU time (what a query costs without preemption by other processes).

Measured (2 shared cores, load average 5-13 from other jobs, faiss-cpu 1.15.1 AVX2):

* ``--bench`` (400k x 256 clustered, ``--build-threads 2``, defaults otherwise): exact p50
  92.7 ms wall / 49.0 ms CPU; hnsw (M 32, efConstruction 200) built in 2020 s wall, 494 MB,
  efSearch 128: recall@10 1.0000, p50 1.00 ms, CPU p50 0.97 / p99 1.59 ms (wall p99 20 ms:
  preemption); efSearch 64: recall 0.9990, CPU p99 1.15 ms; ivf (nlist 2530) built in 312 s,
  396 MB, nprobe 32: recall 0.9999, CPU p99 1.35 ms.
* uniform (isotropic) vectors are the worst case: at 100k x 256 hnsw needs efSearch 1024 for
  recall 0.954 (CPU p50 9.6 ms, about brute force); ivf nprobe 256 reaches 0.58. Real
  embeddings are far from isotropic; measure with the product table before trusting a setting.
* The default build (1 thread) of 400k x 256: 1289 s wall, 547 s CPU, a 518 MB
  ``index.faiss``; the skip check 2.9 s; ``ProductIndex.load`` 3.3 s (hashes and reads).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import resource
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np

from common.cli import DEFAULT_WORKDIR, UserError, check_config, parse_config, run_main
from common.io import file_sha256, prepare_workdir, write_json
from common.provenance import MadeFrom, OutputSet
from data.schema import SchemaError
from embeddings import tables

log = logging.getLogger("serving.index")

INDEX_FORMAT = 1  # bump when the files' layout or the build recipe changes
INDEX_REL = "serving/index.faiss"
IDS_REL = "serving/index_ids.npy"
MANIFEST_REL = "serving/index.manifest.json"
BENCH_REL = "serving/index_bench.json"
NORM_TOLERANCE = 1e-3
MISSING_ID = -1  # product id of a result slot the index could not fill (cosine -inf)

IndexKind = Literal["auto", "exact", "hnsw", "ivf"]
BenchData = Literal["clustered", "uniform"]


def _faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines say which SIMD build loaded
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is a dependency
        raise UserError("the product index needs faiss: pip install faiss-cpu==1.15.1") from None
    return faiss


@dataclass
class IndexConfig:
    """Build the nearest-product index (FAISS, cosine) over DIR/embeddings/product_table.parquet."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory"})
    kind: IndexKind = field(default="auto", metadata={
        "help": "auto = exact below --exact-below products, else hnsw"})
    exact_below: int = field(default=50_000, metadata={"help": "auto: product count from which an ANN index is built",
                                                       "min": 1})
    hnsw_m: int = field(default=32, metadata={"help": "hnsw: graph neighbours per node (M)", "min": 1})
    ef_construction: int = field(default=200, metadata={"help": "hnsw: candidate list size while building", "min": 1})
    ef_search: int = field(default=128, metadata={"help": "hnsw: candidate list size while searching (stored)", "min": 1})
    nlist: int = field(default=0, metadata={"help": "ivf: number of lists (0 = 4*sqrt(N), at most N/39)", "min": 0})
    nprobe: int = field(default=32, metadata={"help": "ivf: lists visited per query (stored)", "min": 1})
    build_threads: int = field(default=1, metadata={
        "help": "FAISS threads for the build (1 = byte-identical files; more is faster, HNSW bytes then vary)",
        "min": 1})
    seed: int = field(default=0, metadata={"help": "ivf: k-means seed; bench: random vectors", "min": 0})
    force: bool = field(default=False, metadata={"help": "rebuild even when the index is current"})
    bench: bool = field(default=False, metadata={
        "help": "benchmark the index kinds on random unit vectors instead of building DIR's index"})
    bench_n: int = field(default=400_000, metadata={"help": "bench: products", "min": 1})
    bench_dim: int = field(default=256, metadata={"help": "bench: vector dimension", "min": 1})
    bench_queries: int = field(default=1000, metadata={"help": "bench: queries for recall and latency", "min": 1})
    bench_data: BenchData = field(default="clustered", metadata={
        "help": "bench: clustered (embedding-like) or uniform (isotropic, the worst case) random unit vectors"})
    bench_kinds: list[str] = field(default_factory=lambda: ["exact", "hnsw", "ivf"], metadata={
        "help": "bench: index kinds to build", "choices": ["exact", "hnsw", "ivf"], "min_items": 1})
    bench_ef_search: list[int] = field(default_factory=lambda: [32, 64, 128, 256], metadata={
        "help": "bench: efSearch values timed for hnsw (besides --ef-search)", "min": 1})
    bench_nprobe: list[int] = field(default_factory=lambda: [8, 16, 32, 64], metadata={
        "help": "bench: nprobe values timed for ivf (besides --nprobe)", "min": 1})


def index_set(workdir: str | Path) -> OutputSet:
    """``serving/index.faiss`` + ``serving/index_ids.npy``, published together."""
    return OutputSet(workdir, MANIFEST_REL, [INDEX_REL, IDS_REL], what="python -m serving.index")


def auto_nlist(n: int) -> int:
    """``4 * sqrt(n)`` lists, at most ``n / 39`` (FAISS wants 39 training points per list), at least 1."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


def resolve_kind(cfg: IndexConfig, n: int) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    return "exact" if n < cfg.exact_below else "hnsw"


def index_settings(cfg: IndexConfig, kind: str, n: int) -> dict[str, Any]:
    """The settings that determine the index file of ``kind`` over ``n`` products (the manifest's
    ``made_from.settings``): only those of the kind built, so e.g. ``--ef-search`` does not
    rebuild an exact index."""
    settings: dict[str, Any] = {"format": INDEX_FORMAT, "kind": kind, "metric": "cosine"}
    if kind == "hnsw":
        settings.update(hnsw_m=cfg.hnsw_m, ef_construction=cfg.ef_construction, ef_search=cfg.ef_search,
                        build_threads=cfg.build_threads)
    elif kind == "ivf":
        nlist = cfg.nlist or auto_nlist(n)
        settings.update(nlist=nlist, nprobe=min(cfg.nprobe, nlist), seed=cfg.seed, build_threads=cfg.build_threads)
    return settings


# vectors --------------------------------------------------------------------------------------
def unit_rows_and_norms(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``vectors`` ``[n, d]`` scaled to unit norm (all-zero rows stay zero) and the original norms."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    scale = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0).astype(np.float32)
    return vectors * scale[:, None], norms


@dataclass
class IndexInput:
    """The rows that go into the index: unit vectors ``[N, d]`` and their product ids ``[N]``."""

    vectors: np.ndarray
    product_ids: np.ndarray
    zero_rows: int  # all-zero rows besides row 0, left out
    renormalised_rows: int  # rows whose norm was off 1 by more than NORM_TOLERANCE


def index_input(table: tables.EmbeddingTable, path: str | Path = "product table") -> IndexInput:
    """Rows 1..R-1 of a product table, checked (finite) and normalised; zero rows left out."""
    if table.kind != "product":
        raise UserError(f"{path}: expected a product table, found a {table.kind} table")
    vectors = table.vectors[tables.UNKNOWN_ROW + 1:]
    ids = np.asarray(table.keys.values, dtype=np.int64)
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0]) + 1
        raise UserError(f"{path}: column 'vector': row_id {row} (product_id {ids[row - 1]}) is not finite")
    unit, norms = unit_rows_and_norms(vectors)
    keep = norms > 0
    zero_rows = int((~keep).sum())
    off = int((np.abs(norms[keep] - 1.0) > NORM_TOLERANCE).sum())
    if zero_rows:
        log.warning("%s: %d products have an all-zero vector; left out of the index (never a result)", path, zero_rows)
    if off:
        log.warning("%s: %d of %d vectors are not unit vectors (|norm - 1| > %g, norms %.4g..%.4g); normalised",
                    path, off, int(keep.sum()), NORM_TOLERANCE, float(norms[keep].min()), float(norms[keep].max()))
    if not keep.any():
        raise UserError(f"{path}: no product with a non-zero vector: nothing to index")
    if zero_rows:
        unit, ids = unit[keep], ids[keep]
    return IndexInput(np.ascontiguousarray(unit), ids, zero_rows, off)


# building -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _omp_threads(threads: int) -> Iterator[None]:
    """FAISS's OpenMP threads set to ``threads`` for the block (and restored)."""
    faiss = _faiss()
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def build_faiss_index(vectors: np.ndarray, settings: dict[str, Any]):
    """A FAISS index of ``settings["kind"]`` over unit ``vectors`` ``[N, d]`` (float32, contiguous),
    built with ``settings.get("build_threads", 1)`` threads."""
    faiss = _faiss()
    n, d = vectors.shape
    kind = settings["kind"]
    with _omp_threads(int(settings.get("build_threads", 1))):
        if kind == "exact":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, int(settings["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(settings["ef_construction"])
            index.hnsw.efSearch = int(settings["ef_search"])
        elif kind == "ivf":
            nlist = int(settings["nlist"])
            if nlist > n:
                raise UserError(f"--nlist {nlist} exceeds the {n} products to index")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)  # keeps a ref
            index.cp.spherical = True
            index.cp.seed = int(settings["seed"])
            index.train(vectors)
            index.nprobe = int(settings["nprobe"])
        else:
            raise ValueError(f"unknown index kind {kind!r}")
        index.add(vectors)
    return index


def write_index_files(index: Any, product_ids: np.ndarray, index_path: Path, ids_path: Path) -> None:
    """``faiss.write_index`` and the id map (``np.save``, int64 ``[N]``: index position -> ``product_id``)."""
    _faiss().write_index(index, str(index_path))
    with open(ids_path, "wb") as sink:
        np.save(sink, np.asarray(product_ids, np.int64), allow_pickle=False)


def index_with(workdir: str | Path, product_ids: np.ndarray, vectors: np.ndarray) -> tuple[Any, np.ndarray]:
    """The published index of ``workdir`` with the products ``product_ids [M]`` (vectors ``[M, d]``)
    put in: one the index holds is replaced, a new one added. Returns ``(FAISS index, ids [N'] int64)``.

    Without replacements the published file is read and the vectors added to it (FAISS inserts into a
    flat, HNSW or IVF index alike; for IVF the new vectors go to the lists trained before). A
    replacement rebuilds with the index's settings over the product table's rows (an HNSW graph
    cannot drop a vector): at the scale of ``--bench`` that takes as long as ``serving.index``.
    Same inputs, same index (the index's ``build_threads``, 1 by default)."""
    out = index_set(workdir)
    out.verify()
    settings = (out.manifest() or {})["made_from"]["settings"]
    unit, norms = unit_rows_and_norms(vectors)
    if not (norms > 0).all():
        raise UserError(f"product_id {int(product_ids[np.flatnonzero(norms == 0)[0]])}: all-zero vector")
    indexed = np.load(out.path(IDS_REL), allow_pickle=False)
    if not np.isin(indexed, product_ids).any():
        index = _faiss().read_index(str(out.path(INDEX_REL)))
        with _omp_threads(int(settings.get("build_threads", 1))):
            index.add(unit)
        return index, np.concatenate([indexed, product_ids]).astype(np.int64)
    rows = index_input(tables.read_embedding_table(tables.embedding_table_path(workdir, "product"), "product"))
    keep = ~np.isin(rows.product_ids, product_ids)
    log.info("rebuilding the %s index: %d of its products are replaced", settings["kind"], int((~keep).sum()))
    index = build_faiss_index(np.ascontiguousarray(np.concatenate([rows.vectors[keep], unit])), settings)
    return index, np.concatenate([rows.product_ids[keep], product_ids]).astype(np.int64)


def _product_count(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return max(0, pq.ParquetFile(path).metadata.num_rows - 1)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None


def build_product_index(cfg: IndexConfig) -> dict[str, Any]:
    """Build (or keep) ``DIR/serving/index.faiss`` and ``index_ids.npy``; returns the manifest."""
    check_config(cfg)  # also when called with a config built in code
    path = tables.embedding_table_path(cfg.workdir, "product")
    if not path.is_file():
        raise UserError(f"{path} not found: the product index needs the exported product table "
                        f"(run `python -m embeddings.export --workdir {cfg.workdir}` first)")
    workdir = prepare_workdir(cfg.workdir, "serving")
    rel = tables.embedding_table_rel("product")
    hashes = tables.tables_set(workdir).verify()
    n = _product_count(path)
    kind = resolve_kind(cfg, n)
    settings = index_settings(cfg, kind, n)
    made_from = MadeFrom({rel: hashes[rel]}, settings)
    out = index_set(workdir)
    if not cfg.force and out.current(made_from):
        log.info("%s is current for this product table and settings (%s); skipping (--force rebuilds)",
                 out.path(INDEX_REL), settings)
        return out.manifest() or {}
    try:
        table = tables.read_embedding_table(path, "product")
    except SchemaError as exc:
        raise UserError(str(exc)) from None
    if file_sha256(path) != hashes[rel]:  # replaced by a concurrent export since it was verified
        raise UserError(f"{path} changed while the index was being built; run python -m serving.index again")
    rows = index_input(table, path)
    log.info("building a %s index over %d products x %d (%s)", kind, len(rows.product_ids), table.dim, settings)
    started, started_cpu = time.perf_counter(), time.process_time()
    index = build_faiss_index(rows.vectors, settings)
    build_s, build_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
    faiss = _faiss()
    extra = {"kind": kind, "products": int(len(rows.product_ids)), "dim": table.dim,
             "zero_rows_left_out": rows.zero_rows, "renormalised_rows": rows.renormalised_rows,
             "table_source": table.source, "faiss_version": faiss.__version__,
             "load": "serving.index.ProductIndex.load(workdir)"}
    with out.publish(made_from, extra) as staged:
        write_index_files(index, rows.product_ids, staged[INDEX_REL], staged[IDS_REL])
    manifest = out.manifest() or {}
    log.info("built %s (%s, %d products, %d bytes) in %.1f s (%.1f s CPU)", out.path(INDEX_REL), kind,
             len(rows.product_ids), out.path(INDEX_REL).stat().st_size, build_s, build_cpu_s)
    return manifest


# serving --------------------------------------------------------------------------------------
class DimensionMismatch(UserError, ValueError):
    """Query vectors of another dimension than the index."""


class ProductIndex:
    """A loaded product index: ``search(query_vectors [Q, d], k) -> (product_ids, cosines)``.

    Thread safety: ``search`` never changes the FAISS index (efSearch / nprobe overrides go in
    per-call search parameters) and FAISS releases the GIL while it searches, so many threads may
    share one instance. Each search runs on ``threads`` OpenMP threads of the calling thread
    (set for the call and restored; ``None`` = leave FAISS's setting alone). The default 1 is the
    fastest for one query per call (measured: FAISS's default of all cores made single-query
    exact search 3.5x slower on 2 busy cores); a service gets its parallelism from its request
    threads, and a large batch may use more.
    """

    def __init__(self, index: Any, product_ids: np.ndarray, kind: str = "", manifest: dict | None = None,
                 threads: int | None = 1) -> None:
        product_ids = np.asarray(product_ids, dtype=np.int64)
        if product_ids.ndim != 1 or len(product_ids) != index.ntotal:
            raise ValueError(f"the id map has {product_ids.shape} entries for an index of {index.ntotal} vectors")
        self.index = index
        self.product_ids = product_ids
        self.kind = kind
        self.manifest = manifest or {}
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        self.threads = threads
        # the id map with a trailing MISSING_ID, so FAISS's -1 (unfilled slot) maps to MISSING_ID
        self._ids = np.append(product_ids, np.int64(MISSING_ID))

    @classmethod
    def load(cls, workdir: str | Path, check_table: bool = True, threads: int | None = 1) -> "ProductIndex":
        """Load ``DIR/serving/index.faiss`` + ``index_ids.npy`` (checked against their manifest).
        With ``check_table`` the index must have been built from the current product table."""
        out = index_set(workdir)
        out.verify()
        manifest = out.manifest() or {}
        if check_table:
            rel = tables.embedding_table_rel("product")
            built_from = manifest.get("made_from", {}).get("inputs", {}).get(rel)
            if tables.tables_set(workdir).verify()[rel] != built_from:
                raise UserError(f"{out.path(INDEX_REL)} was built from another {rel}: "
                                f"run python -m serving.index --workdir {workdir} again")
        return cls.read(out.path(INDEX_REL), out.path(IDS_REL), manifest.get("kind", ""), manifest, threads)

    @classmethod
    def read(cls, index_path: Path, ids_path: Path, kind: str = "", manifest: dict | None = None,
             threads: int | None = 1) -> "ProductIndex":
        """An index from its two files (whose set the caller has checked)."""
        return cls(_faiss().read_index(str(index_path)), np.load(ids_path, allow_pickle=False), kind, manifest,
                   threads)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def _params(self, ef_search: int | None, nprobe: int | None):
        faiss = _faiss()
        if ef_search is not None and self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=int(ef_search))
        if nprobe is not None and self.kind == "ivf":
            return faiss.SearchParametersIVF(nprobe=int(nprobe))
        return None

    def search(self, query_vectors: np.ndarray, k: int, *, ef_search: int | None = None,
               nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``min(k, N)`` nearest products of each query by cosine, best first:
        ``(product_ids [Q, k'] int64, cosines [Q, k'] float32)``. Queries are normalised (a zero
        query scores 0 everywhere). A slot an approximate index could not fill has product id
        ``MISSING_ID`` (-1) and cosine ``-inf``. ``ef_search`` / ``nprobe`` override the stored
        value for this call (hnsw / ivf)."""
        queries = np.asarray(query_vectors, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2:
            raise ValueError(f"query vectors must be [Q, d], got shape {queries.shape}")
        if queries.shape[1] != self.dim:
            raise DimensionMismatch(f"query vectors have dimension {queries.shape[1]}, the product index has "
                                    f"dimension {self.dim}")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not np.isfinite(queries).all():
            raise ValueError("query vectors contain NaN or infinite values")
        k = min(int(k), len(self))
        unit, _ = unit_rows_and_norms(queries)
        if len(unit) == 0:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        params = self._params(ef_search, nprobe)
        if self.threads is None:
            scores, positions = self.index.search(unit, k, params=params)
        else:
            with _omp_threads(self.threads):  # this thread's setting, restored after
                scores, positions = self.index.search(unit, k, params=params)
        missing = positions < 0
        ids = self._ids[np.where(missing, len(self.product_ids), positions)]
        scores = np.where(missing, np.float32(-np.inf), scores).astype(np.float32, copy=False)
        return ids, scores


# benchmark ------------------------------------------------------------------------------------
def bench_vectors(n: int, d: int, queries: int, data: str = "clustered", seed: int = 0,
                  chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Random unit product vectors ``[n, d]`` and query vectors ``[queries, d]`` (float32).

    ``uniform``: isotropic Gaussian directions, products and queries alike: no structure, the
    worst case for any ANN index (all neighbours are nearly equally far).
    ``clustered``: embedding-like. ``max(1, n // 400)`` cluster centres (product types); a
    product = its centre + Gaussian noise of the same total scale whose per-direction spread
    decays as ``i ** -0.5`` in a random basis (embeddings have decaying spectra); a query = a
    random product + half that noise (a query close to the products it should find).
    """
    rng = np.random.default_rng(seed)
    if data == "uniform":
        products = np.empty((n, d), np.float32)
        for start in range(0, n, chunk):
            block = rng.standard_normal((min(chunk, n - start), d), dtype=np.float32)
            products[start:start + len(block)] = unit_rows_and_norms(block)[0]
        return products, unit_rows_and_norms(rng.standard_normal((queries, d), dtype=np.float32))[0]
    if data != "clustered":
        raise ValueError(f"unknown bench data {data!r}")
    clusters = max(1, n // 400)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    spread = np.arange(1, d + 1, dtype=np.float64) ** -0.5
    spread = (spread * math.sqrt(d) / np.linalg.norm(spread)).astype(np.float32)  # total noise scale = centre scale
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
    mixing = spread[:, None] * basis
    products = np.empty((n, d), np.float32)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        block = centres[rng.integers(0, clusters, size)] + rng.standard_normal((size, d), dtype=np.float32) @ mixing
        products[start:start + size] = unit_rows_and_norms(block)[0]
    picked = products[rng.integers(0, n, queries)] * math.sqrt(d)
    query_vectors = picked + 0.5 * rng.standard_normal((queries, d), dtype=np.float32) @ mixing
    return products, unit_rows_and_norms(query_vectors)[0]


class PeakRSS:
    """Peak resident memory of this process (psutil, sampled every ``interval`` s) while in the block."""

    def __init__(self, interval: float = 0.01) -> None:
        import psutil

        self._process = psutil.Process()
        self.interval = interval
        self.start = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, truth)]))


def _latency(index: ProductIndex, queries: np.ndarray, k: int, warmup: int = 50, **params: Any) -> dict[str, float]:
    for i in range(min(warmup, len(queries))):
        index.search(queries[i:i + 1], k, **params)
    wall, cpu = np.empty(len(queries)), np.empty(len(queries))
    for i in range(len(queries)):
        started, started_cpu = time.perf_counter_ns(), time.thread_time_ns()
        index.search(queries[i:i + 1], k, **params)
        cpu[i] = time.thread_time_ns() - started_cpu
        wall[i] = time.perf_counter_ns() - started
    wall, cpu = wall / 1e6, cpu / 1e6
    return {"p50_ms": float(np.percentile(wall, 50)), "p99_ms": float(np.percentile(wall, 99)),
            "mean_ms": float(wall.mean()), "cpu_p50_ms": float(np.percentile(cpu, 50)),
            "cpu_p99_ms": float(np.percentile(cpu, 99)), "n": int(len(wall))}


def bench_index(n: int = 400_000, d: int = 256, *, queries: int = 1000, k: int = 10, data: str = "clustered",
                kinds: Sequence[str] = ("exact", "hnsw", "ivf"), cfg: IndexConfig | None = None,
                ef_search_sweep: Sequence[int] = (32, 64, 128, 256), nprobe_sweep: Sequence[int] = (8, 16, 32, 64),
                seed: int = 0) -> dict[str, Any]:
    """Build each of ``kinds`` over :func:`bench_vectors` and measure: build time, index bytes (the
    written file), RSS (before and peak during the build, psutil), recall@k against exact search
    over ``queries`` queries, and p50/p99 latency of one query per :meth:`ProductIndex.search` call
    on one FAISS thread (after 50 warm-up calls) -- for the configured efSearch / nprobe and each
    value of the sweeps. Index settings come from ``cfg`` (defaults of :class:`IndexConfig`)."""
    faiss = _faiss()
    cfg = cfg or IndexConfig()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    products, query_vectors = bench_vectors(n, d, queries, data, seed)
    log.info("bench: %d x %d %s vectors and %d queries in %.1f s", n, d, data, queries, time.perf_counter() - started)
    ids = np.arange(1, n + 1, dtype=np.int64)  # product ids as in a table (row 0 left out)
    threads = cfg.build_threads
    exact = ProductIndex(build_faiss_index(products, {"kind": "exact"}), ids, "exact",
                         threads=max(threads, os.cpu_count() or 1))
    started = time.perf_counter()
    truth = exact.search(query_vectors, k)[0]
    truth_s = time.perf_counter() - started
    del exact
    results: dict[str, Any] = {}
    for kind in kinds:
        settings = index_settings(cfg, kind, n)
        log.info("bench: building %s %s", kind, settings)
        with PeakRSS() as rss:
            started, started_cpu = time.perf_counter(), time.process_time()
            index = build_faiss_index(products, settings)
            build_s, build_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
        with tempfile.TemporaryDirectory() as tmp:
            faiss.write_index(index, str(Path(tmp) / "index.faiss"))
            index_bytes = (Path(tmp) / "index.faiss").stat().st_size
        served = ProductIndex(index, ids, kind, threads=1)
        batch = ProductIndex(index, ids, kind, threads=max(threads, os.cpu_count() or 1))
        entry: dict[str, Any] = {"settings": settings, "build_s": build_s, "build_cpu_s": build_cpu_s,
                                 "index_bytes": index_bytes,
                                 "vector_bytes": int(products.nbytes), "rss_before_build_bytes": rss.start,
                                 "rss_peak_build_bytes": rss.peak, "rss_build_growth_bytes": rss.peak - rss.start,
                                 "searches": []}
        if kind == "hnsw":
            sweep = [("ef_search", v) for v in sorted({*ef_search_sweep, settings["ef_search"]})]
        elif kind == "ivf":
            sweep = [("nprobe", v) for v in sorted({*nprobe_sweep, settings["nprobe"]}) if v <= settings["nlist"]]
        else:
            sweep = [(None, None)]
        for name, value in sweep:
            params = {name: value} if name else {}
            found = batch.search(query_vectors, k, **params)[0]
            row = {"param": name, "value": value, "default": name is None or value == settings.get(name),
                   f"recall_at_{k}": _recall(found, truth), **_latency(served, query_vectors, k, **params)}
            log.info("bench: %s %s=%s recall@%d %.4f p50 %.3f ms p99 %.3f ms", kind, name, value, k,
                     row[f"recall_at_{k}"], row["p50_ms"], row["p99_ms"])
            entry["searches"].append(row)
        results[kind] = entry
        del served, batch, index
    load_after = os.getloadavg()[0]
    return {"n": n, "dim": d, "queries": queries, "k": k, "data": data, "seed": seed,
            "exact_ground_truth_s": truth_s, "kinds": results,
            "environment": {"cpu_count": os.cpu_count(), "machine": platform.platform(),
                            "python": platform.python_version(), "faiss": faiss.__version__,
                            "faiss_simd": faiss.get_compile_options().strip(),
                            "load_average_1min": {"start": load_before, "end": load_after},
                            "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}


def bench_table(results: dict[str, Any]) -> str:
    """A Markdown table of :func:`bench_index`'s results."""
    k = results["k"]
    lines = [f"Product index: {results['n']:,} x {results['dim']} {results['data']} unit vectors, "
             f"{results['queries']} queries, recall@{k} vs exact, latency = one query per call, 1 thread",
             "(cpu = the searching thread's CPU time: the latency without preemption by other processes; "
             "build s = wall (CPU))",
             "", f"| kind | setting | build s | index MB | peak RSS MB (build +MB) | recall@{k} | p50 ms | p99 ms "
                 "| cpu p50 ms | cpu p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, entry in results["kinds"].items():
        for row in entry["searches"]:
            setting = f"{row['param']}={row['value']}" if row["param"] else "-"
            setting += " (default)" if row["param"] and row["default"] else ""
            build_cpu = entry.get("build_cpu_s", float("nan"))
            lines.append(f"| {kind} | {setting} | {entry['build_s']:.1f} ({build_cpu:.1f}) "
                         f"| {entry['index_bytes'] / 2**20:.0f} | "
                         f"{entry['rss_peak_build_bytes'] / 2**20:.0f} "
                         f"(+{entry['rss_build_growth_bytes'] / 2**20:.0f}) "
                         f"| {row[f'recall_at_{k}']:.4f} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} "
                         f"| {row['cpu_p50_ms']:.3f} | {row['cpu_p99_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def run_bench(cfg: IndexConfig, argv: Sequence[str] | None = None) -> dict[str, Any]:
    check_config(cfg)  # also when called with a config built in code
    workdir = prepare_workdir(cfg.workdir, "serving")
    results = bench_index(cfg.bench_n, cfg.bench_dim, queries=cfg.bench_queries, data=cfg.bench_data,
                          kinds=list(dict.fromkeys(cfg.bench_kinds)), cfg=cfg, ef_search_sweep=cfg.bench_ef_search,
                          nprobe_sweep=cfg.bench_nprobe, seed=cfg.seed)
    results["command"] = shlex.join(["python", "-m", "serving.index", *(argv if argv is not None else sys.argv[1:])])
    results["config"] = {k: v for k, v in asdict(cfg).items() if k not in ("workdir", "force", "bench")}
    write_json(results, workdir / BENCH_REL)
    print(bench_table(results))
    log.info("wrote %s", workdir / BENCH_REL)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(IndexConfig, argv)
    return run_bench(cfg, argv) if cfg.bench else build_product_index(cfg)


if __name__ == "__main__":
    run_main(main)
