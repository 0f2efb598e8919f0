"""Evaluate DashCLIP embeddings on held-out queries (paper Table 1 and section 5).

``python -m embeddings.evaluate --workdir DIR [--seed 0] [--force]`` writes
``DIR/embeddings/metrics.json``, ``metrics.md`` and ``plots/{tsne,cosine_by_relevance}.png``,
published as one set (:func:`metrics_set`, manifest ``metrics.manifest.json``) made from the
catalog and relevance tables, the synthetic complete judgments (when present), the trained model's
set (``model.pt``, ``config.json``), the exported product table when it is used, and the flags;
a set made from exactly these is kept (``--force`` recomputes).

Held-out queries are the eval side of :func:`embeddings.sampling.split_queries`, with the seed and
fraction that training recorded in ``DIR/embeddings/config.json`` (defaults when it has none);
with more than ``--max-queries`` of them, a seeded uniform sample of that many (:func:`sample_queries`)
is evaluated in every view.
Cold-start products are :func:`embeddings.sampling.split_cold_products` of the catalog with the
seed and ``cold_product_fraction`` recorded there (0, none, for a model trained before that setting
existed): the products no training stage saw. The systems compared:

* ``random``: seeded random unit vectors for queries and products;
* ``untuned_text`` / ``untuned_image``: the encoders before any training, query vectors against
  title-only / image-only product vectors;
* ``untuned``: the untuned query vectors against the untuned multimodal product vectors (fusion
  before training); the probes' untuned baseline;
* ``dashclip``: the trained query and multimodal product vectors.

The views of ``metrics.json``:

* ``retrieval`` (candidates: the whole catalog), ``retrieval_complete`` (synthetic data: complete
  judgments), ``retrieval_judged`` (each query's judged candidates only), ``aisle_probe`` and
  ``relevance_probe`` (random 80/20 splits), ``cosine_by_label``;
* ``retrieval_table1``: the paper's Table 1 protocol. The candidates are the products of the
  held-out relevance pairs (any label) that training saw (the cold-start products are scored in
  ``cold_start`` instead), the queries are the held-out ones with an MR/HR product among them;
  with ``chance``, the expected metrics of a uniformly random ranking of that pool;
* ``retrieval_gain``: per view (``labels``, ``complete``, ``table1``, ``cold_start``), DashCLIP's
  relative gain over the untuned system with the best Recall@10 on that view, for each metric,
  with the 95% interval of a paired bootstrap over the queries (:func:`relative_gain`);
* ``cold_start``: retrieval of the held-out queries that have an MR/HR cold product, over the cold
  products only (with ``chance``, and ``retrieval_complete`` on synthetic data), and the aisle
  probe trained on the seen products and tested on the cold ones (macro F1 over the aisles of the
  cold products), for every system including ``random`` (chance).

Metrics (pure functions over numpy arrays, unit-tested with handcrafted vectors):

* :func:`retrieval_metrics`: top-10 products by cosine for each held-out query that has at least
  one MR/HR product; graded relevance = mean of label / 2 over the top 10 (unlabelled pairs count
  as IR = 0), Precision@10 and Recall@10 with MR and HR as relevant.
* with synthetic data (``data/synth_relevance_truth.parquet``), :func:`retrieval_metrics` again
  with complete judgments (``retrieval_complete``): every relevant product of the catalog known.
* :func:`judged_ranking_metrics`: each held-out query's labelled products ranked among themselves
  (nDCG@10) and the AUC of cosine for MR/HR against IR pairs: unlike full-catalog retrieval it
  does not count unjudged products as irrelevant.
* :func:`chance_retrieval`: the same metrics' expected values under a uniformly random ranking;
  :func:`oracle_retrieval` (with complete judgments, ``retrieval_oracle`` and each pool's
  ``oracle``): their expected values when every product is ranked by its true grade, ties at
  random, the most a relevance model can score on a sample of labels.
* :func:`train_probe`: an MLP (hidden layer, ReLU, dropout, linear) on frozen vectors, stratified
  80/20 split (or given test rows), macro F1 and per-class recall. Used for aisle classification of products
  (section 5.1) and 3-class relevance of (product, query) pairs of the held-out queries with IR
  downsampled by half (section 5.2).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from scipy import sparse
from sklearn.metrics import f1_score, recall_score
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits
from torch import nn
from tqdm import tqdm

from common.cli import DEFAULT_WORKDIR, UserError, parse_config, resolve_threads, run_main, threads_field
from common.io import prepare_workdir, read_json, temp_sibling, write_json, write_text
from common.provenance import MadeFrom, OutputSet
from common.seed import seed_everything
from data import dataset, schema
from data.dataset import RELEVANCE_TRUTH_FILE, input_hashes
from data.schema import HR, IR, LABEL_NAMES, MR
from embeddings import tables
from embeddings.config import EmbeddingsTrainConfig
from embeddings.runtime import MODEL_CHECKPOINT, RUN_CONFIG, Paths, stage_set
from embeddings.sampling import heldout_query_rows, normalized_query_codes, split_cold_products

log = logging.getLogger(__name__)

TOP_K = 10
DEFAULT_EVAL_FRACTION = EmbeddingsTrainConfig.query_eval_fraction
DEFAULT_COLD_FRACTION = EmbeddingsTrainConfig.cold_product_fraction
RETRIEVAL_SYSTEMS = {"random": "Random vectors", "untuned_text": "Untuned query vs title-text encoder",
                     "untuned_image": "Untuned query vs image encoder",
                     "untuned": "Untuned query vs multimodal fusion", "dashclip": "DashCLIP (trained)"}
# (query vectors, product vectors) of each system, keys of encode_all
RETRIEVAL_VECTORS = {"random": ("random_query", "random_product"), "untuned_text": ("untuned_query", "untuned_text"),
                     "untuned_image": ("untuned_query", "untuned_image"), "untuned": ("untuned_query", "untuned_product"),
                     "dashclip": ("dashclip_query", "dashclip_product")}
PROBE_SYSTEMS = {"random": "random vectors (chance)", "untuned_text": "untuned title-text encoder",
                 "untuned_image": "untuned image encoder", "untuned": "untuned multimodal fusion",
                 "dashclip": "DashCLIP"}
ORACLE_ROW = "Relevance oracle (true grades, ties at random; expected)"
METRICS_JSON, METRICS_MD = "embeddings/metrics.json", "embeddings/metrics.md"
PLOTS_DIR = "embeddings/plots"
QUERY_SAMPLE_STREAM = 1  # the generator of the held-out query sample: [seed, this]
PLOT_FILES = ("cosine_by_relevance.png", "tsne.png")  # t-SNE is left out when too few products remain


# ----------------------------------------------------------------------------------- retrieval

def relevance_matrix(pairs: pd.DataFrame, queries: Sequence[str], product_ids: np.ndarray) -> sparse.csr_matrix:
    """Sparse ``[Q, P]`` int8 labels of ``pairs`` (normalised query, product_id, label) over
    ``queries`` x ``product_ids``; a pair listed twice keeps its highest label; IR and unlabelled
    pairs are both 0 (not stored)."""
    query_index = pd.Index(queries).get_indexer(pairs["query"])
    product_index = pd.Index(product_ids).get_indexer(pairs["product_id"])
    known = (query_index >= 0) & (product_index >= 0)
    frame = pd.DataFrame({"q": query_index[known], "p": product_index[known],
                          "label": pairs["label"].to_numpy()[known].astype(np.int8)})
    frame = frame.groupby(["q", "p"], sort=True)["label"].max().reset_index()
    matrix = sparse.csr_matrix((frame["label"].to_numpy(), (frame["q"].to_numpy(), frame["p"].to_numpy())),
                               shape=(len(queries), len(product_ids)), dtype=np.int8)
    matrix.eliminate_zeros()
    return matrix


def top_k_products(query_vecs: np.ndarray, product_vecs: np.ndarray, k: int = TOP_K,
                   chunk_scores: int = 1 << 24) -> np.ndarray:
    """``[Q, k]`` product indices by decreasing cosine (inner product of unit vectors); ties within
    the k go to the lower index. Which of several products tied at the k-th cosine make the cut is
    numpy's partition's choice, the same for the same inputs but not by index (products with the
    same vector: the same title and no image, say). Computed in chunks of queries of about
    ``chunk_scores`` scores each, so the memory it takes (about 20 bytes a score: the scores, their
    negation and the partition's indices) is bounded whatever the catalog size."""
    k = min(k, product_vecs.shape[0])
    out = np.empty((query_vecs.shape[0], k), dtype=np.int64)
    chunk_size = max(1, chunk_scores // max(1, product_vecs.shape[0]))
    for start in range(0, query_vecs.shape[0], chunk_size):
        scores = query_vecs[start:start + chunk_size] @ product_vecs.T
        candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
            np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1))
        candidate_scores = np.take_along_axis(scores, candidates, axis=1)
        order = np.lexsort((candidates, -candidate_scores), axis=1)
        out[start:start + chunk_size] = np.take_along_axis(candidates, order, axis=1)
    return out


def _queries_with_relevant(labels: sparse.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """``(rows [Q'], n_relevant [Q'])`` of the queries of ``labels`` that have an MR/HR product."""
    n_relevant = np.asarray((labels >= MR).sum(axis=1)).ravel()
    keep = np.flatnonzero(n_relevant > 0)
    if len(keep) == 0:
        raise ValueError("no query has an MR or HR product: retrieval metrics are undefined")
    return keep, n_relevant[keep]


def ranked_list_scores(top: np.ndarray, labels: sparse.csr_matrix, keep: np.ndarray, n_relevant: np.ndarray,
                       k: int = TOP_K) -> dict[str, np.ndarray]:
    """Per-query ``graded_relevance``, ``recall_at_{k}``, ``precision_at_{k}`` ``[Q']`` and ``query``
    ``[Q']`` of the ranked lists ``top`` ``[Q', k']`` (candidate columns of ``labels``) of the queries
    ``keep`` (rows of ``labels``), each with ``n_relevant`` MR/HR products."""
    top_labels = np.asarray(labels[np.repeat(keep, top.shape[1]), top.ravel()]).reshape(top.shape)
    hits = (top_labels >= MR).sum(axis=1)
    return {"graded_relevance": top_labels.sum(axis=1) / (HR * k), f"recall_at_{k}": hits / n_relevant,
            f"precision_at_{k}": hits / k, "query": keep}


def per_query_retrieval(query_vecs: np.ndarray, product_vecs: np.ndarray, labels: sparse.spmatrix | np.ndarray,
                        k: int = TOP_K) -> dict[str, np.ndarray]:
    """The per-query scores behind :func:`retrieval_metrics` (:func:`ranked_list_scores`), over the
    queries that have an MR/HR product."""
    labels = sparse.csr_matrix(labels)
    if labels.shape != (query_vecs.shape[0], product_vecs.shape[0]):
        raise ValueError(f"labels must be [Q, P] = {(query_vecs.shape[0], product_vecs.shape[0])}, got {labels.shape}")
    keep, n_relevant = _queries_with_relevant(labels)
    top = top_k_products(np.asarray(query_vecs, np.float32)[keep], np.asarray(product_vecs, np.float32), k)
    return ranked_list_scores(top, labels, keep, n_relevant, k)


def mean_scores(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """The metrics of :func:`retrieval_metrics` from its per-query scores."""
    return {**{name: float(np.mean(values)) for name, values in scores.items() if name != "query"},
            "n_queries": int(len(scores["query"]))}


class Rankings:
    """The top-k candidates of every system of :data:`RETRIEVAL_VECTORS` for every query, computed
    once per candidate pool (the whole catalog or a set of catalog rows) and scored against any
    labels: the retrieval views and the gains over the untuned systems share them.

    ``vectors``: :func:`encode_all`'s L2-normalised sets, ``[Q, d]`` queries and ``[P, d]`` products.
    """

    def __init__(self, vectors: dict[str, np.ndarray], k: int = TOP_K) -> None:
        self.vectors, self.k = vectors, k
        self._top: dict[tuple[str, bytes | None], np.ndarray] = {}

    def top(self, system: str, pool: np.ndarray | None = None) -> np.ndarray:
        """``[Q, k']`` candidates of ``system`` by decreasing cosine: catalog rows, or positions in
        ``pool`` (catalog rows) when given."""
        key = (system, None if pool is None else np.asarray(pool, np.int64).tobytes())
        if key not in self._top:
            query, product = RETRIEVAL_VECTORS[system]
            products = self.vectors[product] if pool is None else self.vectors[product][pool]
            self._top[key] = top_k_products(np.asarray(self.vectors[query], np.float32),
                                            np.asarray(products, np.float32), self.k)
        return self._top[key]

    def scores(self, system: str, labels: sparse.spmatrix, pool: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Per-query scores (:func:`ranked_list_scores`) of ``system`` against ``labels`` ``[Q, P]`` over
        the whole catalog, its candidates cut to ``pool`` when given."""
        labels = sparse.csr_matrix(labels)
        if pool is not None:
            labels = labels[:, pool]
        keep, n_relevant = _queries_with_relevant(labels)
        return ranked_list_scores(self.top(system, pool)[keep], labels, keep, n_relevant, self.k)

    def metrics(self, system: str, labels: sparse.spmatrix, pool: np.ndarray | None = None) -> dict[str, float]:
        """:func:`retrieval_metrics` of ``system`` from the shared rankings."""
        return mean_scores(self.scores(system, labels, pool))


def retrieval_metrics(query_vecs: np.ndarray, product_vecs: np.ndarray, labels: sparse.spmatrix | np.ndarray,
                      k: int = TOP_K) -> dict[str, float]:
    """Graded relevance, Recall@k and Precision@k of top-k cosine retrieval.

    Args:
        query_vecs: ``[Q, d]`` L2-normalised query vectors.
        product_vecs: ``[P, d]`` L2-normalised product vectors (the whole candidate set).
        labels: ``[Q, P]`` relevance label of each (query, product) (0 IR or unlabelled, 1 MR, 2 HR),
            dense or scipy sparse.
        k: cut-off.

    Queries without any MR/HR product are skipped (their recall is undefined); all three metrics
    are averaged over the same queries. Returns ``graded_relevance``, ``recall_at_{k}``,
    ``precision_at_{k}`` and ``n_queries``.
    """
    return mean_scores(per_query_retrieval(query_vecs, product_vecs, labels, k))


def relative_gain(ours: np.ndarray, baseline: np.ndarray, seed: int, n_resamples: int = 2000) -> dict[str, Any]:
    """``mean(ours) / mean(baseline) - 1`` of paired per-query scores ``[Q]``, with the 95% interval
    of a paired bootstrap over the queries (``n_resamples`` resamples, seeded): how far the gain
    could move with another sample of queries of the same size."""
    ours, baseline = np.asarray(ours, np.float64), np.asarray(baseline, np.float64)
    if ours.shape != baseline.shape or ours.ndim != 1 or len(ours) == 0:
        raise ValueError(f"paired per-query scores must be two [Q] arrays, got {ours.shape} and {baseline.shape}")
    # the resampled rows as int32 (the same draws as int64, half the memory) and their means a
    # block of resamples at a time: the gathered scores of every resample at once took 32 bytes
    # per resample and query (1.5 GB for 32,000 queries)
    rows = np.random.default_rng(seed).integers(0, len(ours), size=(n_resamples, len(ours)), dtype=np.int32)
    base, mean_ours = np.empty(n_resamples), np.empty(n_resamples)
    block = max(1, (1 << 22) // len(ours))
    for start in range(0, n_resamples, block):
        base[start:start + block] = baseline[rows[start:start + block]].mean(axis=1)
        mean_ours[start:start + block] = ours[rows[start:start + block]].mean(axis=1)
    gains = mean_ours / np.where(base > 0, base, np.nan) - 1.0
    low, high = np.nanpercentile(gains, [2.5, 97.5])
    return {"relative": float(ours.mean() / baseline.mean() - 1.0) if baseline.mean() > 0 else None,
            "ci95": [float(low), float(high)]}


def gain_over_best_untuned(rankings: Rankings, labels: sparse.spmatrix, seed: int,
                           pool: np.ndarray | None = None) -> dict[str, Any]:
    """DashCLIP against the untuned system with the highest Recall@k on ``labels`` ``[Q, P]`` (the
    candidates cut to catalog rows ``pool`` when given): per metric, :func:`relative_gain`."""
    k = rankings.k
    scores = {name: rankings.scores(name, labels, pool)
              for name in RETRIEVAL_VECTORS if name == "dashclip" or name.startswith("untuned")}
    recall = f"recall_at_{k}"
    baseline = max((name for name in scores if name != "dashclip"), key=lambda name: scores[name][recall].mean())
    return {"baseline": baseline, "n_queries": int(len(scores["dashclip"]["query"])),
            **{metric: relative_gain(scores["dashclip"][metric], scores[baseline][metric], seed)
               for metric in ("graded_relevance", recall, f"precision_at_{k}")}}


def chance_retrieval(labels: sparse.spmatrix | np.ndarray, k: int = TOP_K) -> dict[str, float]:
    """The expected :func:`retrieval_metrics` of a uniformly random ranking of the ``P`` candidates
    of ``labels`` ``[Q, P]``: over the same queries (those with an MR/HR product), with
    ``k' = min(k, P)`` slots, Recall@k = k'/P, Precision@k = k' n_relevant / (P k), graded relevance
    = k' sum(labels) / (P 2 k)."""
    labels = sparse.csr_matrix(labels)
    n_products = labels.shape[1]
    n_relevant = np.asarray((labels >= MR).sum(axis=1)).ravel()
    keep = n_relevant > 0
    if not keep.any():
        raise ValueError("no query has an MR or HR product: retrieval metrics are undefined")
    slots = min(k, n_products)
    label_sum = np.asarray(labels.sum(axis=1)).ravel()[keep]
    return {"graded_relevance": float(np.mean(slots * label_sum / (n_products * HR * k))),
            f"recall_at_{k}": float(slots / n_products),
            f"precision_at_{k}": float(np.mean(slots * n_relevant[keep] / (n_products * k))),
            "n_queries": int(keep.sum())}


def oracle_retrieval(labels: sparse.spmatrix | np.ndarray, truth: sparse.spmatrix | np.ndarray,
                      k: int = TOP_K) -> dict[str, float] | None:
    """The expected :func:`retrieval_metrics` against ``labels`` ``[Q, P]`` of the best ranking a
    relevance model can make: every candidate ordered by its true grade (``truth`` ``[Q, P]``,
    complete judgments: HR, then MR, then the rest), ties in uniformly random order.

    With ``h`` true HR and ``m`` true MR candidates of a query, an HR candidate is in the top ``k``
    with probability ``min(1, k/h)``, an MR one with ``min(1, max(0, k-h)/m)``, any other with the
    slots left over ``max(0, k-h-m) / (P-h-m)``; the metrics are linear in these probabilities.
    The view's labels are a sample of the relevant products (on synthetic data, drawn in
    proportion to popularity), so this is what a model that knows relevance and nothing else
    scores on them. Over the queries with a labelled MR/HR candidate that ``truth`` covers (has an
    MR/HR product for); None when there are none.
    """
    labels, truth = sparse.csr_matrix(labels), sparse.csr_matrix(truth)
    if labels.shape != truth.shape:
        raise ValueError(f"labels {labels.shape} and truth {truth.shape} must have the same shape")
    n_products = labels.shape[1]
    n_relevant = np.asarray((labels >= MR).sum(axis=1)).ravel()
    n_hr = np.asarray((truth == HR).sum(axis=1)).ravel()
    n_mr = np.asarray((truth == MR).sum(axis=1)).ravel()
    keep = (n_relevant > 0) & (n_hr + n_mr > 0)
    if not keep.any():
        return None
    # probability that a product of each true grade is in the top k
    p_hr = np.minimum(1.0, k / np.maximum(n_hr, 1))
    left_after_hr = np.maximum(0, k - n_hr)
    p_mr = np.minimum(1.0, left_after_hr / np.maximum(n_mr, 1))
    rest = n_products - n_hr - n_mr
    p_other = np.maximum(0, left_after_hr - n_mr) / np.maximum(rest, 1)

    def by_grade(values: sparse.csr_matrix) -> np.ndarray:
        """Row sums of ``values`` weighted by each entry's top-k probability under its true grade."""
        total = np.asarray(values.sum(axis=1)).ravel()
        on_hr = np.asarray(values.multiply(truth == HR).sum(axis=1)).ravel()
        on_mr = np.asarray(values.multiply(truth == MR).sum(axis=1)).ravel()
        return p_hr * on_hr + p_mr * on_mr + p_other * (total - on_hr - on_mr)

    hits = by_grade((labels >= MR).astype(np.float64))[keep]
    graded = by_grade(labels.astype(np.float64))[keep] / (HR * k)
    return {"graded_relevance": float(np.mean(graded)), f"recall_at_{k}": float(np.mean(hits / n_relevant[keep])),
            f"precision_at_{k}": float(np.mean(hits / k)), "n_queries": int(keep.sum())}


def pool_retrieval(rankings: Rankings, labels: sparse.csr_matrix, pool: np.ndarray,
                   truth: sparse.csr_matrix | None = None) -> dict:
    """Retrieval of every system of :data:`RETRIEVAL_VECTORS` with the candidates cut to the
    catalog rows ``pool`` (``labels`` ``[Q, P]`` over the whole catalog): ``{"n_products",
    "chance": ..., "systems": {name: metrics}}`` and, with complete judgments ``truth``, the
    ``oracle`` (:func:`oracle_retrieval`), or ``{"n_products", "skipped": why}`` when no query has
    an MR/HR product in the pool."""
    k = rankings.k
    pooled = sparse.csr_matrix(labels)[:, pool]
    if len(pool) == 0 or pooled.max() < MR:
        return {"n_products": int(len(pool)), "skipped": "no held-out query has an MR or HR product among them"}
    oracle = oracle_retrieval(pooled, sparse.csr_matrix(truth)[:, pool], k) if truth is not None else None
    return {"n_products": int(len(pool)), "chance": chance_retrieval(pooled, k),
            **({"oracle": oracle} if oracle is not None else {}),
            "systems": {name: rankings.metrics(name, labels, pool) for name in RETRIEVAL_VECTORS}}


def pair_cosines(query_vecs: np.ndarray, product_vecs: np.ndarray, pair_query: np.ndarray,
                 pair_product: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """``[n]`` inner products of ``query_vecs[pair_query[i]]`` and ``product_vecs[pair_product[i]]``
    (cosines of unit rows), gathered ``chunk`` pairs at a time: the gathered rows of every pair at
    once would take ``2 n d`` floats (13 GB for the 32M pairs of the paper's size)."""
    query_vecs, product_vecs = np.asarray(query_vecs, np.float32), np.asarray(product_vecs, np.float32)
    out = np.empty(len(pair_query), np.float32)
    for start in range(0, len(pair_query), chunk):
        end = start + chunk
        out[start:end] = np.einsum("nd,nd->n", query_vecs[pair_query[start:end]],
                                   product_vecs[pair_product[start:end]])
    return out


def judged_ranking_metrics(query_vecs: np.ndarray, product_vecs: np.ndarray, pair_query: np.ndarray,
                           pair_product: np.ndarray, pair_label: np.ndarray, k: int = TOP_K,
                           top: np.ndarray | None = None) -> dict[str, float]:
    """Ranking of each query's judged candidates only (condensed lists, Sakai 2007).

    Full-catalog retrieval (:func:`retrieval_metrics`) counts every unjudged product as IR, so with
    a few judged pairs per query a model that surfaces relevant but unjudged products is scored as
    missing. Here each query's labelled products are ranked by cosine among themselves.

    Args:
        query_vecs: ``[Q, d]`` and product_vecs ``[P, d]``, L2-normalised.
        pair_query, pair_product: ``[n]`` row indices into them of the labelled pairs (one row per
            pair); pair_label: ``[n]`` labels (0 IR, 1 MR, 2 HR).
        k: nDCG cut-off.
        top: the full-catalog top ``k`` of every query (``[Q, k]``, :meth:`Rankings.top`) when
            already ranked; computed here otherwise.

    Returns ``ndcg_at_{k}`` (gain ``2**label - 1``, ``log2`` discount, mean over queries with an
    MR/HR pair; cosine ties broken by pair order), ``auc_relevant_vs_ir`` (ROC AUC of cosine for
    MR/HR against IR over all pairs; the signal the ranking stage's similarity feature carries),
    ``judged_share_of_top_{k}`` (share of the full-catalog top ``k`` of those queries that is
    judged at all: how much of :func:`retrieval_metrics` rests on labels) and ``n_queries``.
    """
    from sklearn.metrics import roc_auc_score

    cosine = pair_cosines(query_vecs, product_vecs, pair_query, pair_product)
    frame = pd.DataFrame({"q": pair_query, "cos": cosine, "gain": np.exp2(pair_label.astype(np.float64)) - 1.0,
                          "order": np.arange(len(pair_query))})
    frame = frame[frame.groupby("q")["gain"].transform("max") > 0]
    if frame.empty:
        raise ValueError("no query has an MR or HR pair: judged ranking metrics are undefined")

    def dcg(ranked: pd.DataFrame) -> pd.Series:
        rank = ranked.groupby("q").cumcount()
        discounted = (ranked["gain"] / np.log2(rank + 2.0)).where(rank < k, 0.0)
        return discounted.groupby(ranked["q"]).sum()

    ndcg = dcg(frame.sort_values(["q", "cos", "order"], ascending=[True, False, True])) / \
        dcg(frame.sort_values(["q", "gain"], ascending=[True, False]))
    relevant = pair_label >= MR
    auc = float(roc_auc_score(relevant, cosine)) if 0 < relevant.sum() < len(relevant) else float("nan")
    scored = np.unique(frame["q"].to_numpy())
    top = (top[scored] if top is not None else
           top_k_products(np.asarray(query_vecs, np.float32)[scored], np.asarray(product_vecs, np.float32), k))
    n_products = np.int64(product_vecs.shape[0])
    judged = np.isin(scored[:, None] * n_products + top, pair_query.astype(np.int64) * n_products + pair_product)
    return {f"ndcg_at_{k}": float(ndcg.mean()), "auc_relevant_vs_ir": auc,
            f"judged_share_of_top_{k}": float(judged.mean()), "n_queries": int(len(ndcg))}


# --------------------------------------------------------------------------------------- probes

@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch and the BLAS/OpenMP pools on one thread: a probe is too small to gain from more,
    and on a busy machine spinning threads make it many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)


class ProbeMLP(nn.Module):
    """Frozen-vector classifier: ``[N, F] -> Linear -> ReLU -> Dropout -> Linear -> [N, C]`` logits."""

    def __init__(self, in_features: int, n_classes: int, hidden: int = 256, dropout: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


@dataclass
class ProbeResult:
    """Test-split scores of a probe. ``per_class_recall`` is keyed by class name."""

    macro_f1: float
    per_class_recall: dict[str, float]
    n_train: int
    n_test: int
    n_classes: int


def train_probe(features: np.ndarray, labels: np.ndarray, *, seed: int, hidden: int = 256, dropout: float = 0.2,
                epochs: int = 40, lr: float = 1e-3, batch_size: int = 256, test_fraction: float = 0.2,
                test_rows: np.ndarray | None = None) -> ProbeResult:
    """Train :class:`ProbeMLP` on ``features`` ``[N, F]`` to predict ``labels`` ``[N]`` (any
    hashable values) and score it on a stratified held-out ``test_fraction``, or, with
    ``test_rows`` (row indices), on those rows after training on all the others.

    Stratified split: classes with fewer than 2 examples cannot be stratified and are dropped
    (logged). Given ``test_rows``: test rows of a class with no training row are dropped (logged),
    and macro F1 and the per-class recall are over the classes of the test rows. Features are
    standardised with the training split's mean and std; the cross entropy is weighted by inverse
    class frequency so that minority classes count as much as they do in macro F1. Deterministic
    for ``seed``; the global torch RNG state is left as it was.
    """
    labels = np.asarray(labels)
    features = np.asarray(features, np.float32)
    if test_rows is None:
        classes, y, counts = np.unique(labels, return_inverse=True, return_counts=True)
        usable = counts[y] >= 2
        if (~usable).any():
            log.info("probe: dropping %d classes with a single example", int((counts < 2).sum()))
        features, y = features[usable], y[usable]
        classes, y = np.unique(classes[y], return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"a probe needs at least 2 classes with 2+ examples, got {len(classes)}")
        n_test = max(int(round(test_fraction * len(y))), len(classes))
        train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=n_test, stratify=y, random_state=seed)
        scored = np.arange(len(classes))
    else:
        is_test = np.zeros(len(labels), dtype=bool)
        is_test[np.asarray(test_rows, dtype=np.int64)] = True
        known = np.isin(labels, np.unique(labels[~is_test]))
        if (is_test & ~known).any():
            log.info("probe: dropping %d test rows of classes without a training row", int((is_test & ~known).sum()))
        keep = ~is_test | known
        features, is_test = features[keep], is_test[keep]
        classes, y = np.unique(labels[keep], return_inverse=True)
        train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
        if len(classes) < 2 or len(test_idx) == 0:
            raise ValueError(f"a probe needs at least 2 classes and a test row of a trained class, got "
                             f"{len(classes)} classes and {len(test_idx)} test rows")
        scored = np.unique(y[test_idx])
    mean = features[train_idx].mean(axis=0)
    std = features[train_idx].std(axis=0) + 1e-6
    x_train = torch.from_numpy((features[train_idx] - mean) / std)
    x_test = torch.from_numpy((features[test_idx] - mean) / std)
    y_train = torch.from_numpy(y[train_idx]).long()
    with torch.random.fork_rng(devices=[]), single_threaded():
        torch.manual_seed(seed)
        model = ProbeMLP(features.shape[1], len(classes), hidden, dropout)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        class_counts = np.bincount(y[train_idx], minlength=len(classes))
        loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(len(train_idx) / (len(classes) * class_counts),
                                                          dtype=torch.float32))
        model.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(train_idx)).split(batch_size):
                optimizer.zero_grad()
                loss_fn(model(x_train[batch]), y_train[batch]).backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            predicted = model(x_test).argmax(dim=1).numpy()
    truth = y[test_idx]
    recall = recall_score(truth, predicted, labels=scored, average=None, zero_division=0)
    return ProbeResult(
        macro_f1=float(f1_score(truth, predicted, labels=scored, average="macro", zero_division=0)),
        per_class_recall={str(c): float(r) for c, r in zip(classes[scored], recall)},
        n_train=int(len(train_idx)), n_test=int(len(test_idx)), n_classes=int(len(scored)))


def downsample_label(labels: np.ndarray, label: int, keep_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices that keep every row except a random ``1 - keep_fraction`` of ``label``'s rows."""
    rows = np.flatnonzero(labels == label)
    kept = rng.choice(rows, size=int(math.floor(keep_fraction * len(rows))), replace=False)
    return np.sort(np.concatenate([np.flatnonzero(labels != label), kept]))


# ------------------------------------------------------------------------------------------ CLI

@dataclass
class EvaluateConfig:
    """Evaluate DashCLIP embeddings against random vectors and the untuned encoders on held-out queries."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory"})
    seed: int = field(default=0, metadata={"help": "seed of the random baseline, probes and t-SNE", "min": 0})
    force: bool = field(default=False, metadata={"help": "recompute even if metrics.json is up to date"})
    probe_epochs: int = field(default=40, metadata={"help": "training epochs of each MLP probe"})
    probe_hidden: int = field(default=256, metadata={"help": "hidden width of the MLP probes"})
    probe_max_rows: int = field(default=200_000, metadata={"help": "subsample each probe's rows to at most this"})
    tsne_points: int = field(default=2000, metadata={"help": "products per t-SNE map"})
    max_queries: int = field(default=20_000, metadata={
        "help": "evaluate a seeded sample of at most this many held-out queries (0: all): full-catalog retrieval "
                "costs queries x products, so without a cap it grows with the square of the data", "min": 0})
    threads: int = threads_field(note="the probes always train on one thread (see single_threaded)")


def split_settings(workdir: Path, seed: int) -> dict:
    """The query split and the cold-start products used by training: the ``seed``,
    ``query_eval_fraction`` and ``cold_product_fraction`` recorded in ``DIR/embeddings/config.json``,
    else ``--seed`` and the training defaults. A config that records a query split but no cold
    fraction is from a model trained before that setting, on every product: ``cold_fraction`` 0."""
    path = Paths(workdir).config
    recorded = read_json(path) if path.exists() else {}
    if "query_eval_fraction" in recorded:
        return {"seed": int(recorded.get("seed", seed)), "eval_fraction": float(recorded["query_eval_fraction"]),
                "cold_fraction": float(recorded.get("cold_product_fraction", 0.0)),
                "source": str(path.relative_to(workdir))}
    return {"seed": seed, "eval_fraction": DEFAULT_EVAL_FRACTION, "cold_fraction": DEFAULT_COLD_FRACTION,
            "source": f"defaults (no query_eval_fraction in {RUN_CONFIG})"}


def metrics_set(workdir: str | Path, plots: Sequence[str] = ()) -> OutputSet:
    """The evaluation's outputs: ``metrics.json``, ``metrics.md`` and the ``plots`` drawn (names in ``plots/``)."""
    return OutputSet(workdir, "embeddings/metrics.manifest.json",
                     [METRICS_JSON, METRICS_MD, *(f"{PLOTS_DIR}/{name}" for name in plots)],
                     what="python -m embeddings.evaluate")


def published_metrics(workdir: Path) -> OutputSet:
    """The metrics set with the plots its manifest lists (none when there is no manifest)."""
    manifest = metrics_set(workdir).manifest()
    listed = manifest.get("files") if manifest else None
    prefix = PLOTS_DIR + "/"
    return metrics_set(workdir, sorted(rel[len(prefix):] for rel in listed if rel.startswith(prefix))
                       if isinstance(listed, dict) else [])


def exported_product_table(workdir: Path, inputs: dict[str, str | None]) -> dict[str, str]:
    """``{product table: sha256}`` when the exported tables are an intact set made from the checkpoint
    and catalog of ``inputs`` (their product vectors then stand in for encoding the catalog), else ``{}``."""
    output = tables.tables_set(workdir)
    made = ((output.manifest() or {}).get("made_from") or {}).get("inputs") or {}
    if any(made.get(rel) != inputs[rel] for rel in (MODEL_CHECKPOINT, dataset.table_rel("catalog"))):
        return {}
    try:
        hashes = output.verify()
    except UserError:
        return {}
    rel = tables.embedding_table_rel("product")
    return {rel: hashes[rel]}


def evaluation_inputs(workdir: Path) -> dict[str, str | None]:
    """What the metrics are made from: the catalog and relevance tables, the trained model's set,
    the complete judgments (None when absent) and the exported product table when it is used."""
    inputs = {**input_hashes(workdir, ("catalog", "relevance")), **stage_set(workdir, 2).verify(),
              **MadeFrom.of(workdir, [f"data/{RELEVANCE_TRUTH_FILE}"], {}).inputs}
    return {**inputs, **exported_product_table(workdir, inputs)}


def complete_judgments(workdir: Path, queries: Sequence[str], product_ids: np.ndarray) -> sparse.csr_matrix | None:
    """``[Q, P]`` complete MR/HR labels of the held-out ``queries`` from the synthetic generator's
    ``data/synth_relevance_truth.parquet`` (every relevant catalog product of each query it
    covers), or None when the run has no such file (real data) or it covers none of ``queries``."""
    path = workdir / "data" / RELEVANCE_TRUTH_FILE
    if not path.exists():
        return None
    truth = pq.read_table(path).to_pandas()
    codes, vocabulary = normalized_query_codes(truth["query"])
    truth = truth.assign(query=vocabulary[codes])
    covered = truth["query"].isin(set(queries))
    log.info("%s: complete judgments for %d of %d held-out queries", path.name,
             truth.loc[covered, "query"].nunique(), len(queries))
    if not covered.any():  # e.g. the `paper` profile, which writes none: no view rather than an empty one
        return None
    return relevance_matrix(truth[covered], queries, product_ids)


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def trained_product_vectors(workdir: Path, encoder, catalog: pd.DataFrame, exported: bool) -> np.ndarray:
    """Trained multimodal product vectors ``[P, d]``: from the exported product table when
    ``exported`` (made from this checkpoint and catalog: no re-encoding), else from the trained encoder."""
    if not exported:
        return encoder.products(catalog)
    path = tables.embedding_table_path(workdir, "product")
    log.info("trained product vectors: read from %s", path)
    table = tables.read_embedding_table(path, "product")
    return table.vectors[table.lookup(catalog["product_id"].to_numpy())]


def _retrieval_rows(view: dict) -> list[str]:
    """Table rows of a :func:`pool_retrieval` view: every system, then chance and the relevance oracle."""
    rows = [(name, view["systems"][key]) for key, name in RETRIEVAL_SYSTEMS.items()]
    rows.append(("Chance (expected, uniformly random ranking)", view["chance"]))
    if "oracle" in view:
        rows.append((ORACLE_ROW, view["oracle"]))
    return [f"| {name} | {r['graded_relevance']:.4f} | {r['recall_at_10']:.4f} | {r['precision_at_10']:.4f} |"
            for name, r in rows]


GAIN_VIEWS = {"labels": "relevance labels, whole catalog", "complete": "complete judgments, whole catalog",
              "table1": "paper Table 1 protocol", "cold_start": "cold-start products only"}


def _gain_markdown(gain: dict | None) -> list[str]:
    """The ``retrieval_gain`` table: DashCLIP relative to the best untuned system, with intervals."""
    if not gain:
        return []
    lines = ["", "### DashCLIP against the best untuned encoder", "",
             "Relative gain of the mean over queries, with the 95% interval of a paired bootstrap over the queries "
             "(2,000 resamples).", "",
             "| view | best untuned | queries | Recall@10 | Precision@10 | graded relevance |",
             "|---|---|---:|---|---|---|"]
    for view, name in GAIN_VIEWS.items():
        if view in gain:
            g = gain[view]
            cells = [f"{g[m]['relative']:+.1%} [{g[m]['ci95'][0]:+.1%}, {g[m]['ci95'][1]:+.1%}]"
                     if g[m]["relative"] is not None else "—"
                     for m in ("recall_at_10", "precision_at_10", "graded_relevance")]
            lines.append(f"| {name} | {PROBE_SYSTEMS[g['baseline']]} | {g['n_queries']} | " + " | ".join(cells) + " |")
    return lines


def _markdown(metrics: dict) -> str:
    split = metrics["split"]
    n_cold = split.get("n_cold_products", 0)
    lines = ["# DashCLIP embedding evaluation", "",
             f"Held-out queries: {split['n_heldout_queries']} ({split['eval_fraction']:.0%} of distinct queries, "
             f"split seed {split['seed']}, from {split['source']}"
             + (f"; a seeded sample of the {split['n_heldout_queries_all']} held-out queries"
                if split["n_heldout_queries_all"] > split["n_heldout_queries"] else "")
             + "). "
             + (f"Cold-start products: {n_cold} ({split.get('cold_fraction', 0.0):.0%} of the catalog, stratified by "
                "aisle), left out of both training stages." if n_cold else
                "Cold-start products: none (the model was trained on every product)."), ""]
    table1 = metrics.get("retrieval_table1")
    if table1:
        lines += ["## Retrieval, paper Table 1 protocol", "",
                  f"Candidates: the {table1['n_products']} products of the held-out relevance pairs seen in training"
                  + (f" ({table1['n_cold_excluded']} cold-start products of those pairs are scored under Cold start)"
                     if table1["n_cold_excluded"] else "") + ". "]
        if "systems" in table1:
            lines[-1] += (f"{table1['systems']['dashclip']['n_queries']} held-out queries with an MR/HR product "
                          "among them are scored; graded relevance uses IR/MR/HR, Recall@10 and Precision@10 count "
                          "MR and HR as relevant.")
            lines += ["", "| model | graded relevance | Recall@10 | Precision@10 |", "|---|---:|---:|---:|",
                      *_retrieval_rows(table1)]
        else:
            lines[-1] += f"Not scored: {table1['skipped']}."
        lines.append("")
    lines += ["## Retrieval over the whole catalog (Table 1 layout)", "",
              f"{metrics['retrieval']['dashclip']['n_queries']} held-out queries have at least one MR/HR product and "
              f"are scored. Candidates: all {metrics['counts']['products']} catalog products "
              f"({n_cold} of them cold-start).", "",
              "| model | graded relevance | Recall@10 | Precision@10 |", "|---|---:|---:|---:|"]
    rows = [(name, metrics["retrieval"][key]) for key, name in RETRIEVAL_SYSTEMS.items()]
    if "retrieval_oracle" in metrics:
        rows.append((ORACLE_ROW, metrics["retrieval_oracle"]))
    for name, r in rows:
        lines.append(f"| {name} | {r['graded_relevance']:.4f} | {r['recall_at_10']:.4f} | {r['precision_at_10']:.4f} |")
    if "retrieval_oracle" in metrics:
        lines += ["", "Relevance oracle: every product ranked by its true grade (complete judgments), ties at "
                  "random: what a model that knows relevance and nothing else scores on these labels (the labelled "
                  "products are a sample of each query's relevant ones, drawn in proportion to popularity on "
                  "synthetic data)."]
    complete = metrics.get("retrieval_complete")
    if complete:
        lines += ["", f"With complete judgments (synthetic data: every relevant catalog product of "
                  f"{complete['dashclip']['n_queries']} held-out queries, from `data/{RELEVANCE_TRUTH_FILE}`):", "",
                  "| model | graded relevance | Recall@10 | Precision@10 |", "|---|---:|---:|---:|"]
        for key, name in RETRIEVAL_SYSTEMS.items():
            r = complete[key]
            lines.append(f"| {name} | {r['graded_relevance']:.4f} | {r['recall_at_10']:.4f} | "
                         f"{r['precision_at_10']:.4f} |")
    lines += _gain_markdown(metrics.get("retrieval_gain"))
    judged = metrics["retrieval_judged"]
    lines += ["", "Full-catalog retrieval counts every unjudged product as IR: with "
              f"{metrics['split']['n_heldout_pairs'] / max(metrics['split']['n_heldout_queries'], 1):.0f} judged "
              "products per query, a model that ranks relevant but unjudged products high is scored as missing. "
              "The judged-candidate ranking below (condensed lists) scores each query's labelled products only.", "",
              "## Ranking the judged candidates of each query", "",
              f"{judged['dashclip']['n_queries']} queries with an MR/HR pair.", "",
              "| model | nDCG@10 (judged) | AUC cosine, MR/HR vs IR | judged share of full-catalog top 10 |",
              "|---|---:|---:|---:|"]
    for key, name in RETRIEVAL_SYSTEMS.items():
        r = judged[key]
        lines.append(f"| {name} | {r['ndcg_at_10']:.4f} | {r['auc_relevant_vs_ir']:.4f} | "
                     f"{r['judged_share_of_top_10']:.4f} |")
    lines += ["", "## Aisle-category classification (paper section 5.1)", "",
              "MLP probe on frozen product vectors, stratified 80/20 split.", "",
              "| product vectors | macro F1 | classes | test products |", "|---|---:|---:|---:|"]
    for key, name in (("untuned", "untuned multimodal"), ("dashclip", "DashCLIP")):
        d = metrics["aisle_probe"][key]
        lines.append(f"| {name} | {metrics['aisle_f1'][key]:.4f} | {d['n_classes']} | {d['n_test']} |")
    lines += ["", "## 3-class relevance classification (paper section 5.2)", "",
              "MLP probe on [product vector, query vector] of the held-out queries' labelled pairs, IR downsampled "
              "by half, stratified 80/20 split.", "",
              "| vectors | macro F1 | recall IR | recall MR | recall HR | test pairs |", "|---|---:|---:|---:|---:|---:|"]
    for key, name in (("untuned", "untuned"), ("dashclip", "DashCLIP")):
        d = metrics["relevance_probe"][key]
        rec = d["per_class_recall"]
        lines.append(f"| {name} | {metrics['relevance_f1'][key]:.4f} | "
                     + " | ".join(f"{rec.get(LABEL_NAMES[c], float('nan')):.4f}" for c in (IR, MR, HR))
                     + f" | {d['n_test']} |")
    lines += _cold_start_markdown(metrics.get("cold_start"))
    lines += ["", "## Cosine(product, query) by relevance label (held-out pairs, mean)", "",
              "| vectors | IR | MR | HR |", "|---|---:|---:|---:|"]
    for key, means in metrics["cosine_by_label"].items():
        lines.append(f"| {key} | " + " | ".join(f"{means.get(LABEL_NAMES[c], float('nan')):.4f}" for c in (IR, MR, HR))
                     + " |")
    lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in metrics["plots"]]
    return "\n".join(lines) + "\n"


def _cold_start_markdown(cold: dict | None) -> list[str]:
    if not cold:
        return []
    lines = ["", "## Cold start: products no training stage saw", ""]
    if "skipped" in cold:
        return lines + [f"Not evaluated: {cold['skipped']}."]
    lines.append(f"{cold['n_products']} products ({cold['fraction']:.0%} of the catalog, stratified by aisle, seed "
                 f"{cold['seed']}, {cold['n_aisles']} aisles) were left out of stage 1 and stage 2.")
    retrieval = cold["retrieval"]
    lines += ["", "### Retrieval over the cold products only", ""]
    if "systems" in retrieval:
        lines += [f"Candidates: the {retrieval['n_products']} cold products; "
                  f"{retrieval['systems']['dashclip']['n_queries']} held-out queries with an MR/HR cold product.", "",
                  "| model | graded relevance | Recall@10 | Precision@10 |", "|---|---:|---:|---:|",
                  *_retrieval_rows(retrieval)]
    else:
        lines.append(f"Not scored: {retrieval['skipped']}.")
    complete = cold.get("retrieval_complete")
    if complete and "systems" in complete:
        lines += ["", f"With complete judgments (synthetic data, {complete['systems']['dashclip']['n_queries']} "
                  "held-out queries with a relevant cold product):", "",
                  "| model | graded relevance | Recall@10 | Precision@10 |", "|---|---:|---:|---:|",
                  *_retrieval_rows(complete)]
    lines += ["", "### Aisle probe: trained on seen products, tested on the cold ones", "",
              "| product vectors | macro F1 | aisles tested | train products | test products |",
              "|---|---:|---:|---:|---:|"]
    for key, name in PROBE_SYSTEMS.items():
        d = cold["aisle_probe"][key]
        lines.append(f"| {name} | {d['macro_f1']:.4f} | {d['n_classes']} | {d['n_train']} | {d['n_test']} |")
    return lines


def encode_all(workdir: Path, catalog: pd.DataFrame, queries: list[str], rng: np.random.Generator,
               exported: bool) -> dict[str, np.ndarray]:
    """Every vector set the evaluation compares, L2-normalised, keyed ``<system>_<kind>``:
    ``{untuned,dashclip,random}_{query,product}`` plus ``untuned_text`` and ``untuned_image``
    (trained product vectors from the exported table when ``exported``)."""
    from embeddings.encode import load_encoder  # the encoders are heavy: import only when evaluating

    steps = tqdm(total=5, desc="encode", unit="set")
    untuned = load_encoder(workdir, "untuned")
    vectors = {"untuned_query": _unit(untuned.queries(queries))}
    steps.update()
    vectors["untuned_text"] = _unit(untuned.texts(catalog["title"].tolist()))
    steps.update()
    image = np.zeros((len(catalog), untuned.dim), np.float32)  # zeros: products without an image
    vectors["untuned_product"] = _unit(untuned.products(catalog, image_out=image))  # one pass over the images
    vectors["untuned_image"] = _unit(image)
    steps.update()
    trained = load_encoder(workdir, "trained")
    vectors["dashclip_query"] = _unit(trained.queries(queries))
    steps.update()
    vectors["dashclip_product"] = _unit(trained_product_vectors(workdir, trained, catalog, exported))
    steps.update()
    steps.close()
    dim = vectors["dashclip_product"].shape[1]
    vectors["random_query"] = _unit(rng.standard_normal((len(queries), dim)))
    vectors["random_product"] = _unit(rng.standard_normal((len(catalog), dim)))
    return vectors


def sample_queries(n_queries: int, max_queries: int, seed: int) -> np.ndarray | None:
    """Sorted indices of a uniform sample of ``max_queries`` of ``n_queries`` held-out queries, drawn
    from a generator of its own (``seed``; the other draws of the evaluation do not move); None when
    all are kept (``max_queries`` 0 or at least ``n_queries``)."""
    if max_queries == 0 or n_queries <= max_queries:
        return None
    return np.sort(np.random.default_rng([seed, QUERY_SAMPLE_STREAM]).choice(n_queries, max_queries, replace=False))


def _cap_rows(rows: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(rows, cap, replace=False)) if len(rows) > cap else rows


def cold_start_views(rankings: Rankings, catalog: pd.DataFrame, is_cold: np.ndarray,
                     labels: sparse.csr_matrix, complete: sparse.csr_matrix | None, split: dict,
                     cfg: "EvaluateConfig", rng: np.random.Generator) -> dict:
    """The ``cold_start`` view: retrieval of the held-out queries over the cold products only
    (``labels`` and ``complete`` ``[Q, P]`` over the catalog), and the aisle probe of every system
    trained on the seen products (at most ``probe_max_rows``) and tested on the cold ones."""
    cold_rows = np.flatnonzero(is_cold)
    view: dict = {"fraction": split["cold_fraction"], "seed": split["seed"], "n_products": int(len(cold_rows))}
    if len(cold_rows) == 0:
        return {**view, "skipped": f"the model was trained on every product (cold_product_fraction "
                                   f"{split['cold_fraction']:g} in {split['source']})"}
    aisles = catalog["aisle"].astype(str).to_numpy()
    view["n_aisles"] = int(len(np.unique(aisles[cold_rows])))
    view["retrieval"] = pool_retrieval(rankings, labels, cold_rows, truth=complete)
    if complete is not None:
        view["retrieval_complete"] = pool_retrieval(rankings, complete, cold_rows)
    seen_rows = _cap_rows(np.flatnonzero(~is_cold), cfg.probe_max_rows, rng)
    rows = np.concatenate([seen_rows, cold_rows])
    test_rows = np.arange(len(seen_rows), len(rows))
    product_vectors = {name: p for name, (_, p) in RETRIEVAL_VECTORS.items()}
    probe = {name: train_probe(rankings.vectors[product_vectors[name]][rows], aisles[rows], seed=cfg.seed,
                               hidden=cfg.probe_hidden, epochs=cfg.probe_epochs, test_rows=test_rows)
             for name in tqdm(PROBE_SYSTEMS, desc="cold-start aisle probe")}
    view["aisle_f1"] = {name: r.macro_f1 for name, r in probe.items()}
    view["aisle_probe"] = {name: asdict(r) for name, r in probe.items()}
    return view


def publish_metrics(workdir: Path, made_from: MadeFrom, metrics: dict,
                    draw: Callable[[Path], list[Path | None]]) -> dict:
    """Draw the plots into a scratch directory (``draw(directory)`` returns their paths, None for a
    plot left out), then publish them with ``metrics.json`` and ``metrics.md`` as one set. Returns
    the metrics with their ``plots``."""
    scratch = temp_sibling(workdir / PLOTS_DIR)
    scratch.mkdir(parents=True)
    try:
        drawn = [path for path in draw(scratch) if path is not None]
        metrics = {**metrics, "plots": [f"plots/{path.name}" for path in drawn]}
        with metrics_set(workdir, [path.name for path in drawn]).publish(made_from) as staged:
            for path in drawn:
                os.replace(path, staged[f"{PLOTS_DIR}/{path.name}"])
            write_json(metrics, staged[METRICS_JSON])
            write_text(_markdown(metrics), staged[METRICS_MD])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for left_out in set(PLOT_FILES) - {path.name for path in drawn}:  # an earlier run's plot: not of these metrics
        (workdir / PLOTS_DIR / left_out).unlink(missing_ok=True)
    return metrics


def evaluate(cfg: EvaluateConfig) -> dict:
    """Run the whole evaluation; returns the metrics written to ``metrics.json``."""
    workdir = prepare_workdir(cfg.workdir, "embeddings")
    rng = seed_everything(cfg.seed)
    inputs = evaluation_inputs(workdir)
    split = split_settings(workdir, cfg.seed)
    made_from = MadeFrom(inputs, {"config": {k: v for k, v in asdict(cfg).items() if k not in ("workdir", "force",
                                                                                               "threads")},
                                  "split": split})
    if not cfg.force and published_metrics(workdir).current(made_from):
        log.info("%s is up to date for these inputs and settings: skipping (--force to redo)", workdir / METRICS_JSON)
        return read_json(workdir / METRICS_JSON)

    # Held-out queries and their labelled pairs.
    schema.validate_tables(workdir, ("catalog", "relevance"), check_images=True)
    catalog = schema.read_table(workdir, "catalog").to_pandas()
    relevance = schema.read_table(workdir, "relevance").to_pandas()
    heldout = relevance.loc[heldout_query_rows(relevance, split["eval_fraction"], split["seed"])]
    if heldout.empty:
        raise UserError(f"no held-out queries (eval_fraction {split['eval_fraction']} of "
                        f"{relevance['query'].nunique()} queries): nothing to evaluate")
    query_codes, vocabulary = normalized_query_codes(heldout["query"])
    n_heldout_queries = len(vocabulary)
    sampled = sample_queries(n_heldout_queries, cfg.max_queries, cfg.seed)
    if sampled is not None:
        rows = np.isin(query_codes, sampled)
        heldout, query_codes, vocabulary = heldout[rows], np.searchsorted(sampled, query_codes[rows]), vocabulary[sampled]
        log.info("evaluating a sample of %d of the %d held-out queries (--max-queries)", len(sampled), n_heldout_queries)
    queries = vocabulary.tolist()
    product_ids = catalog["product_id"].to_numpy(dtype=np.int64)
    pairs = (heldout.assign(query=vocabulary[query_codes])
             .groupby(["query", "product_id"], sort=True)["label"].max().reset_index())
    pair_query = pd.Index(queries).get_indexer(pairs["query"])
    pair_product = pd.Index(product_ids).get_indexer(pairs["product_id"])
    pair_label = pairs["label"].to_numpy(dtype=np.int8)
    log.info("evaluating on %d held-out queries (%d labelled pairs) over %d products",
             len(queries), len(pairs), len(product_ids))

    vectors = encode_all(workdir, catalog, queries, rng, tables.embedding_table_rel("product") in inputs)

    # Retrieval over the whole catalog, with complete judgments, of the judged candidates.
    labels = relevance_matrix(pairs, queries, product_ids)
    rankings = Rankings(vectors)  # each system's top 10 per candidate pool, computed once
    retrieval = {name: rankings.metrics(name, labels) for name in tqdm(RETRIEVAL_VECTORS, desc="retrieval")}
    retrieval_judged = {name: judged_ranking_metrics(vectors[q], vectors[p], pair_query, pair_product, pair_label,
                                                     rankings.k, rankings.top(name))
                        for name, (q, p) in RETRIEVAL_VECTORS.items()}
    complete = complete_judgments(workdir, queries, product_ids)
    retrieval_complete = ({name: rankings.metrics(name, complete) for name in RETRIEVAL_VECTORS}
                          if complete is not None else None)
    retrieval_oracle = oracle_retrieval(labels, complete) if complete is not None else None

    # Table 1 protocol: the candidates are the seen products of the held-out pairs.
    cold_ids = split_cold_products(catalog, split["cold_fraction"], split["seed"])
    trained_on = ((stage_set(workdir, 2).manifest() or {}).get("made_from") or {}).get("inputs") or {}
    catalog_rel = dataset.table_rel("catalog")
    if len(cold_ids) and trained_on.get(catalog_rel, inputs[catalog_rel]) != inputs[catalog_rel]:
        log.warning("the model was trained on another %s: its cold-start products are recomputed on this one and "
                    "may include products it saw", catalog_rel)
    is_cold = np.isin(product_ids, cold_ids)
    heldout_products = np.unique(pair_product)
    table1_pool = heldout_products[~is_cold[heldout_products]]
    table1 = {"pool": "products of the held-out relevance pairs seen in training",
              "n_cold_excluded": int(is_cold[heldout_products].sum()),
              **pool_retrieval(rankings, labels, table1_pool, truth=complete)}

    systems = ("untuned", "dashclip")
    probe_kwargs = dict(seed=cfg.seed, hidden=cfg.probe_hidden, epochs=cfg.probe_epochs)
    aisle_rows = _cap_rows(np.arange(len(product_ids)), cfg.probe_max_rows, rng)
    probe_rows = _cap_rows(downsample_label(pair_label, IR, 0.5, rng), cfg.probe_max_rows, rng)
    probe_labels = np.array([LABEL_NAMES[int(v)] for v in pair_label[probe_rows]])
    cosines = {name: (pair_cosines(vectors[f"{name}_query"], vectors[f"{name}_product"], pair_query, pair_product),
                      pair_label) for name in systems}
    from embeddings.plots import plot_cosine_histograms, plot_tsne

    # Section 5.1: aisle classification of products; 5.2: 3-class relevance of held-out pairs.
    aisle_probe = {name: train_probe(vectors[f"{name}_product"][aisle_rows], catalog["aisle"].to_numpy()[aisle_rows],
                                     **probe_kwargs)
                   for name in tqdm(systems, desc="aisle probe")}
    relevance_probe = {name: train_probe(np.concatenate([vectors[f"{name}_product"][pair_product[probe_rows]],
                                                         vectors[f"{name}_query"][pair_query[probe_rows]]], axis=1),
                                         probe_labels, **probe_kwargs)
                       for name in tqdm(systems, desc="relevance probe")}

    # Cold start: products no training stage saw.
    cold_start = cold_start_views(rankings, catalog, is_cold, labels, complete, split, cfg, rng)

    # DashCLIP against the best untuned system of each retrieval view, with bootstrap intervals.
    retrieval_gain = {"labels": gain_over_best_untuned(rankings, labels, cfg.seed)}
    if complete is not None:
        retrieval_gain["complete"] = gain_over_best_untuned(rankings, complete, cfg.seed)
    if "systems" in table1:
        retrieval_gain["table1"] = gain_over_best_untuned(rankings, labels, cfg.seed, table1_pool)
    if "systems" in cold_start.get("retrieval", {}):
        retrieval_gain["cold_start"] = gain_over_best_untuned(rankings, labels, cfg.seed, np.flatnonzero(is_cold))

    def draw(directory: Path) -> list[Path | None]:
        return [plot_cosine_histograms(cosines, directory / PLOT_FILES[0]),
                plot_tsne({name: vectors[f"{name}_product"] for name in systems}, catalog["aisle"].to_numpy(),
                          directory / PLOT_FILES[1], seed=cfg.seed, max_points=cfg.tsne_points)]

    metrics = {
        "retrieval": retrieval,
        "retrieval_judged": retrieval_judged,
        **({"retrieval_complete": retrieval_complete} if retrieval_complete is not None else {}),
        **({"retrieval_oracle": retrieval_oracle} if retrieval_oracle is not None else {}),
        "retrieval_table1": table1,
        "retrieval_gain": retrieval_gain,
        "cold_start": cold_start,
        "aisle_f1": {name: r.macro_f1 for name, r in aisle_probe.items()},
        "relevance_f1": {name: r.macro_f1 for name, r in relevance_probe.items()},
        "aisle_probe": {name: asdict(r) for name, r in aisle_probe.items()},
        "relevance_probe": {name: asdict(r) for name, r in relevance_probe.items()},
        "cosine_by_label": {name: {LABEL_NAMES[c]: float(cos[lab == c].mean()) for c in (IR, MR, HR) if (lab == c).any()}
                            for name, (cos, lab) in cosines.items()},
        "split": {**split, "n_heldout_queries": len(queries), "n_heldout_queries_all": n_heldout_queries,
                  "n_heldout_pairs": int(len(pairs)),
                  "n_cold_products": int(is_cold.sum())},
        "counts": {"products": int(len(product_ids)), "relevance_pairs": int(len(relevance))},
    }
    metrics = publish_metrics(workdir, made_from, metrics, draw)
    log.info("wrote %s: DashCLIP Recall@10 %.3f (untuned text %.3f, random %.3f); judged nDCG@10 %.3f (untuned "
             "text %.3f); aisle F1 %.3f vs %.3f; relevance F1 %.3f vs %.3f", workdir / METRICS_JSON,
             retrieval["dashclip"]["recall_at_10"], retrieval["untuned_text"]["recall_at_10"],
             retrieval["random"]["recall_at_10"], retrieval_judged["dashclip"]["ndcg_at_10"],
             retrieval_judged["untuned_text"]["ndcg_at_10"],
             metrics["aisle_f1"]["dashclip"], metrics["aisle_f1"]["untuned"],
             metrics["relevance_f1"]["dashclip"], metrics["relevance_f1"]["untuned"])
    if "systems" in table1:
        log.info("Table 1 protocol (%d products): DashCLIP Recall@10 %.3f, Precision@10 %.3f (chance %.3f, %.3f)",
                 table1["n_products"], table1["systems"]["dashclip"]["recall_at_10"],
                 table1["systems"]["dashclip"]["precision_at_10"], table1["chance"]["recall_at_10"],
                 table1["chance"]["precision_at_10"])
    if "systems" in cold_start.get("retrieval", {}):
        log.info("cold start (%d products): DashCLIP Recall@10 %.3f (untuned fusion %.3f, chance %.3f); aisle F1 "
                 "%.3f (untuned fusion %.3f, random %.3f)", cold_start["n_products"],
                 cold_start["retrieval"]["systems"]["dashclip"]["recall_at_10"],
                 cold_start["retrieval"]["systems"]["untuned"]["recall_at_10"],
                 cold_start["retrieval"]["chance"]["recall_at_10"], cold_start["aisle_f1"]["dashclip"],
                 cold_start["aisle_f1"]["untuned"], cold_start["aisle_f1"]["random"])
    return metrics


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_config(EvaluateConfig, argv)
    torch.set_num_threads(resolve_threads(cfg.threads))
    return evaluate(cfg)


if __name__ == "__main__":
    run_main(main)
