"""The relevance table: distinct query texts from popular and uniformly drawn target products, their
candidate pairs labelled by the rule, subsampled to the target label split, optionally flipped by
label noise (:func:`relevance_batches`), and the complete noise-free judgments of the first queries
(:func:`complete_labels`)."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from data import schema
from data.synth.catalog import Catalog
from data.synth.config import Behaviour, ProfileConfig
from data.synth.counting import QueryCodes
from data.synth.queries import (EXACT, NEAR, POPULAR, Intents, draw_candidates, query_hashes, relevance_labels,
                                render_queries, sample_intents)
from data.synth.sampling import STREAM_RELEVANCE, categorical, stream_rng


@dataclass
class LabelCounts:
    clean: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=np.int64))
    noisy: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=np.int64))
    flipped: int = 0
    queries: int = 0


def complete_labels(catalog: Catalog, intents: Intents, texts: Sequence[str]) -> pa.Table:
    """Every MR/HR product of each intent (noise-free :func:`relevance_labels` over the whole
    catalog), as relevance rows (query text ``texts[i]`` of intent ``i``, product_id, label)."""
    queries, products, labels = [], [], []
    every_product = np.arange(catalog.n)
    for i, text in enumerate(texts):
        label = relevance_labels(catalog, intents.take(np.full(catalog.n, i)), every_product)
        relevant = np.flatnonzero(label >= schema.MR)
        queries += [text] * len(relevant)
        products.append(relevant + 1)
        labels.append(label[relevant])
    return pa.Table.from_arrays([pa.array(queries, pa.string()),
                                 pa.array(np.concatenate(products) if products else [], pa.int64()),
                                 pa.array(np.concatenate(labels) if labels else [], pa.int8())],
                                schema=schema.schema("relevance"))


def relevance_batches(catalog: Catalog, cfg: ProfileConfig, behaviour: Behaviour, seed: int, label_noise: float,
                      counts: LabelCounts) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Relevance rows for ``n_relevance_queries`` distinct queries, in chunks of queries, each with
    the complete MR/HR lists (:func:`complete_labels`) of its queries among the first
    ``complete_label_queries``.

    Every normalised query text occurs once in the table; each query gets ``pairs_per_query``
    pairs on average, subsampled per chunk to the target label split.
    """
    seen = QueryCodes()  # the normalised query texts already used
    target_split = np.asarray(behaviour.label_split)
    per_query = math.ceil(behaviour.relevance_oversample * cfg.pairs_per_query)
    for chunk in itertools.count():
        need = cfg.n_relevance_queries - counts.queries
        if need <= 0:
            return
        rng = stream_rng(seed, STREAM_RELEVANCE, chunk)
        n_q = min(cfg.relevance_queries_per_chunk, 2 * need + 16)
        uniform = rng.random(n_q) < behaviour.relevance_uniform_target_share
        targets = np.where(uniform, catalog.draw(rng, "uniform", aisle=np.zeros(n_q, dtype=np.int64)),
                           catalog.draw(rng, "all", aisle=np.zeros(n_q, dtype=np.int64)))
        intents = sample_intents(rng, catalog, targets, behaviour)
        texts = render_queries(rng, catalog, intents, behaviour)
        hashes = query_hashes(texts)
        _, first = np.unique(hashes, return_index=True)
        keep = np.zeros(n_q, dtype=bool)
        keep[first] = True
        keep &= seen.lookup(hashes) < 0
        q_idx = np.flatnonzero(keep)[:need]
        if not len(q_idx):
            raise RuntimeError(f"relevance chunk {chunk} found no new query text; the vocabulary is exhausted")
        seen.assign(hashes[q_idx])
        complete = q_idx[:max(0, cfg.complete_label_queries - counts.queries)]
        truth = complete_labels(catalog, intents.take(complete), [texts[i] for i in complete.tolist()])
        counts.queries += len(q_idx)
        rows = np.repeat(q_idx, per_query)
        pair_intents = intents.take(rows)
        source = np.array([EXACT, NEAR, POPULAR])[categorical(rng, behaviour.relevance_source_probs, len(rows))]
        products = draw_candidates(rng, catalog, pair_intents, source)
        labels = relevance_labels(catalog, pair_intents, products)
        _, first = np.unique(rows * (catalog.n + 1) + products, return_index=True)
        rows, products, labels = rows[first], products[first], labels[first]
        # keep len(q_idx) * pairs_per_query pairs in the target split (fewer, same split, if a label runs short)
        have = np.bincount(labels, minlength=3)
        total = min(len(q_idx) * cfg.pairs_per_query, np.min(have / target_split))
        keep_rows = [rng.choice(np.flatnonzero(labels == label), size=min(int(have[label]),
                                                                          round(total * target_split[label])),
                                replace=False) for label in (schema.IR, schema.MR, schema.HR)]
        sel = np.sort(np.concatenate(keep_rows))
        rows, products, labels = rows[sel], products[sel], labels[sel]
        counts.clean += np.bincount(labels, minlength=3)
        flip = rng.random(len(labels)) < label_noise
        mr_to = np.where(rng.random(len(labels)) < 0.5, schema.HR, schema.IR)
        flipped_label = np.where(labels == schema.MR, mr_to, schema.MR).astype(np.int8)
        labels = np.where(flip, flipped_label, labels).astype(np.int8)
        counts.flipped += int(flip.sum())
        counts.noisy += np.bincount(labels, minlength=3)
        yield pa.Table.from_arrays(
            [pa.array([texts[i] for i in rows.tolist()], pa.string()), pa.array(products + 1, pa.int64()),
             pa.array(labels, pa.int8())], schema=schema.schema("relevance")), truth
