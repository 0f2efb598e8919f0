"""Figures of the embedding evaluation (matplotlib, Agg backend): t-SNE maps and cosine histograms.

Each function takes plain numpy arrays, one entry per model, and writes one PNG atomically.
"""
from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from common.io import atomic_path  # noqa: E402
from data.schema import LABEL_NAMES  # noqa: E402

log = logging.getLogger(__name__)


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def tsne_subset(aisles: np.ndarray, n_aisles: int, max_points: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices (sorted) of at most ``max_points`` products drawn from the ``n_aisles`` largest
    aisles (ties broken by name), the same rows for every model."""
    names, counts = np.unique(aisles, return_counts=True)
    largest = names[np.lexsort((names, -counts))[:n_aisles]]
    rows = np.flatnonzero(np.isin(aisles, largest))
    if len(rows) > max_points:
        rows = np.sort(rng.choice(rows, size=max_points, replace=False))
    return rows


def plot_tsne(vectors_by_model: dict[str, np.ndarray], aisles: np.ndarray, path: Path, *, seed: int,
              n_aisles: int = 10, max_points: int = 2000) -> Path | None:
    """One t-SNE panel per model of product vectors ``[P, d]`` coloured by aisle (``[P]``).

    Returns the path, or ``None`` (logged) when fewer than 5 products are left to plot.
    """
    rows = tsne_subset(np.asarray(aisles).astype(str), n_aisles, max_points, np.random.default_rng(seed))
    if len(rows) < 5:
        log.warning("t-SNE skipped: only %d products in the largest aisles", len(rows))
        return None
    sub_aisles = np.asarray(aisles).astype(str)[rows]
    legend = sorted(set(sub_aisles))
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(vectors_by_model), figsize=(6 * len(vectors_by_model), 5.5), squeeze=False)
    for ax, (model, vectors) in zip(axes[0], vectors_by_model.items()):
        tsne = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30.0, (len(rows) - 1) / 3.0))
        with threadpool_limits(1):  # OpenMP threads slow t-SNE down many times on a busy machine
            points = tsne.fit_transform(np.asarray(vectors, dtype=np.float32)[rows])
        for i, aisle in enumerate(legend):
            mask = sub_aisles == aisle
            ax.scatter(points[mask, 0], points[mask, 1], s=6, alpha=0.7, color=colours(i % 10), label=aisle)
        ax.set_title(f"{model}: product vectors ({len(rows)} products)")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2, title="aisle")
    return _save(fig, path)


def plot_cosine_histograms(cosines_by_model: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """One panel per model: histograms of cosine(product, query) ``[N]`` by relevance label ``[N]``."""
    fig, axes = plt.subplots(1, len(cosines_by_model), figsize=(6 * len(cosines_by_model), 4.5), squeeze=False,
                             sharey=False)
    for ax, (model, (cosine, labels)) in zip(axes[0], cosines_by_model.items()):
        bins = np.linspace(-1.0, 1.0, 41)
        for label, name in LABEL_NAMES.items():
            values = cosine[labels == label]
            if len(values):
                ax.hist(values, bins=bins, density=True, alpha=0.45, label=f"{name} (n={len(values)})")
        ax.set_title(f"{model}: cosine(product, query) by relevance")
        ax.set_xlabel("cosine similarity")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    return _save(fig, path)
