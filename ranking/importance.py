"""Feature importance of a trained ranking model with Captum (paper sec. 4.2.3).

``python -m ranking.importance --workdir DIR [--variant dcn_pq_hist] [--seed 0]
[--method permutation|ablation|ig|all] [--repeats 5] [--max-rows N] [--force]``

Reads ``DIR/ranking/<variant>/seed<k>/model.pt`` (from ``python -m ranking.train``; its set must be
intact) and the evaluation week ("NW", the last 7 days of ``DIR/data/impressions.parquet``); writes
``DIR/importance/importance.json``, ``importance.md`` (ranked table) and ``importance.png`` as one
:class:`common.provenance.OutputSet` (manifest ``DIR/importance/manifest.json``) made from the
trained set's hashes, the impressions and purchases tables' hashes and the settings (not
``--threads`` or ``--batch-size``); a rerun with the same inputs and settings is skipped.

Feature groups
    ``query_embedding``, ``product_embedding``, ``purchase_history`` (the mean-pooled 84-day bag),
    ``cosine_product_query``, ``cosine_product_history`` (only those the variant has), then every
    dense feature and every sparse feature under its impressions column name.

How the cosines are permuted on their own
    The model derives ``cos(p, q)`` and ``cos(p, h)`` from the looked-up vectors inside its table
    tower, so permuting the table *rows* would move a vector and its cosines together. Importance
    is therefore measured on :class:`VectorInputModel`, the same trained weights fed with the
    looked-up values as seven plain tensors: dense ``[B, D]``, the pooled sparse embeddings
    ``[B, S*E]``, the product, query and history vectors ``[B, d]`` and the two cosines ``[B]``,
    computed once from the real rows (:func:`embed_batch`). Each group is a slice of one tensor, so
    Captum permutes (or ablates) exactly that slice: permuting ``product_embedding`` moves the
    product vector to another impression while both cosines keep their original values, and
    permuting ``cosine_product_query`` moves only that scalar. This is the classic permutation
    importance of the model's own inputs to its interaction layers; on unpermuted inputs it
    reproduces :class:`ranking.plain.PlainInputModel` (tested). Permuting a sparse feature's
    pooled embedding across rows is the same as permuting its ids.

Methods (all on the model's logit; AUC is rank based, so logits and probabilities agree)
    ``permutation``: Captum ``FeaturePermutation`` with one group id per feature group, ``--repeats``
    times with permutations drawn from a generator seeded by ``(seed, repeat)``. Captum's
    per-impression attribution is ``logit(x) - logit(x with the group permuted)``; the permuted
    scores are recovered from it, and the score of a group is the NW ROC-AUC drop
    ``AUC(original) - AUC(permuted)`` (mean ± std over repeats). ``attribution`` = mean |attr|.
    ``ablation``: Captum ``FeatureAblation``; each group replaced by its baseline: zeros for the
    vectors and cosines (row 0, the unknown id / empty history), the training mean for a dense
    feature, the embedding of the most frequent training id for a sparse feature. Score = AUC drop
    (deterministic, std 0). ``ig``: Captum ``IntegratedGradients`` from the same baselines on
    every (continuous) input; per impression the attributions of a group's elements are summed
    (their total is ``logit(x) - logit(baseline)``) and the score is the mean |group attribution|.
    ``all`` runs the three and adds the Spearman rank correlation of every pair of methods'
    scores (``agreement``); the top-level ``groups`` are then the permutation results.

Rows: the NW impressions, or ``--max-rows`` of them drawn without replacement with ``--seed``
(``--ig-max-rows`` bounds the integrated-gradients rows further). Same seed, same numbers.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from common.cli import DEFAULT_WORKDIR, UserError, parse_config, run_main
from common.io import atomic_path, prepare_workdir, read_json, write_json, write_text
from common.provenance import MadeFrom, OutputSet
from common.seed import seed_everything
from data.dataset import input_hashes
from data.schema import SchemaError, table_path as data_table_path
from ranking.features import ImpressionCache, PurchaseIndex, RankingBatch, RankingData
from ranking.metrics import roc_auc
from ranking.model import RankingModel, load_model, trained_set
from ranking.plain import PlainInputModel
from ranking.tables import HISTORY_FEATURE, PRODUCT_FEATURE, QUERY_FEATURE
from ranking.variants import get_variant

log = logging.getLogger(__name__)

Method = Literal["permutation", "ablation", "ig", "all"]
METHODS: tuple[str, ...] = ("permutation", "ablation", "ig")
METRICS = {"permutation": "auc_drop", "ablation": "auc_drop", "ig": "mean_abs_attribution"}

# Names of the VectorInputModel inputs, in forward order.
DENSE, SPARSE, PRODUCT, QUERY, COSINE_PQ, HISTORY, COSINE_PH = (
    "dense", "sparse_embedded", "product", "query", "cosine_pq", "history", "cosine_ph")
INPUT_NAMES: tuple[str, ...] = (DENSE, SPARSE, PRODUCT, QUERY, COSINE_PQ, HISTORY, COSINE_PH)
# Table groups: (group name, input name), in report order.
TABLE_GROUPS: tuple[tuple[str, str], ...] = (
    ("query_embedding", QUERY), ("product_embedding", PRODUCT), ("purchase_history", HISTORY),
    ("cosine_product_query", COSINE_PQ), ("cosine_product_history", COSINE_PH))


@dataclass
class ImportanceConfig:
    """Feature importance of a trained ranking model (Captum) on the evaluation week."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory"})
    variant: str = field(default="dcn_pq_hist", metadata={"help": "ranking variant whose model to explain"})
    seed: int = field(default=0, metadata={"help": "which trained seed (seed<k>/model.pt); also seeds rows and permutations"})
    method: Method = field(default="permutation", metadata={"help": "Captum method, or 'all' for the three and their agreement"})
    repeats: int = field(default=5, metadata={"help": "permutations per group (mean ± std of the AUC drop)"})
    max_rows: int = field(default=50_000, metadata={"help": "NW impressions used (random subset with --seed; 0 = all)"})
    ig_steps: int = field(default=32, metadata={"help": "integrated-gradients steps"})
    ig_max_rows: int = field(default=5_000, metadata={"help": "rows for integrated gradients (a subset of the rows above; 0 = all)"})
    batch_size: int = field(default=8192, metadata={"help": "forward batch size"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    force: bool = field(default=False, metadata={"help": "recompute even if the outputs are complete for these settings"})


class VectorInputModel(nn.Module):
    """A trained :class:`RankingModel` fed with looked-up values instead of ids.

    ``forward(dense [B, D] raw, sparse_embedded [B, S*E] pooled sparse embeddings,
    product [B, d], query [B, d], cosine_pq [B], history [B, d], cosine_ph [B]) -> logits [B]``.
    Variants without tables take only the first two (the rest stay None); without history, the
    first five. With the values from :func:`embed_batch` it reproduces the wrapped model exactly;
    any input can then be changed on its own (e.g. a cosine without its vectors).
    """

    def __init__(self, model: RankingModel) -> None:
        super().__init__()
        self.model = model
        self.use_tables: bool = model.table_tower is not None
        self.use_history: bool = self.use_tables and model.table_tower.with_history

    def input_names(self) -> list[str]:
        """The inputs this variant reads, in forward order."""
        return list(INPUT_NAMES[: 2 + (3 if self.use_tables else 0) + (2 if self.use_history else 0)])

    def forward(self, dense: torch.Tensor, sparse_embedded: torch.Tensor, product: torch.Tensor | None = None,
                query: torch.Tensor | None = None, cosine_pq: torch.Tensor | None = None,
                history: torch.Tensor | None = None, cosine_ph: torch.Tensor | None = None) -> torch.Tensor:
        """See the class docstring; returns logits ``[B]``."""
        dcn = self.model.dcn_tower
        towers = [dcn.interact(dense, sparse_embedded if dcn.sparse_ebc is not None else None)]
        if self.use_tables:
            towers.append(self.model.table_tower.interact(product, query, cosine_pq, history, cosine_ph))
        return self.model.head(torch.cat(towers, dim=1)).squeeze(1)


@torch.no_grad()
def embed_batch(plain: PlainInputModel, dense: torch.Tensor, sparse_ids: torch.Tensor, product_rows: torch.Tensor,
                query_rows: torch.Tensor, history_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The :class:`VectorInputModel` inputs of one batch of :class:`PlainInputModel` inputs.

    Returns ``{dense [B, D], sparse_embedded [B, S*E], product, query, history [B, d],
    cosine_pq, cosine_ph [B]}`` (only the keys the variant reads). The cosines are computed as
    the table tower does (``eps=1e-8``: 0 against an all-zero vector).
    """
    model = plain.model
    features = plain.features(sparse_ids, product_rows, query_rows, history_rows)
    sparse_ebc = model.dcn_tower.sparse_ebc
    batch = dense.shape[0]
    out = {DENSE: dense.float(),
           SPARSE: sparse_ebc(features).values() if sparse_ebc is not None else torch.zeros(batch, 0)}
    if model.table_tower is not None:
        pooled = model.table_tower.tables(features).to_dict()
        product, query = pooled[PRODUCT_FEATURE], pooled[QUERY_FEATURE]
        out.update({PRODUCT: product, QUERY: query,
                    COSINE_PQ: F.cosine_similarity(product, query, dim=1, eps=1e-8)})
        if model.table_tower.with_history:
            history = pooled[HISTORY_FEATURE]
            out.update({HISTORY: history, COSINE_PH: F.cosine_similarity(product, history, dim=1, eps=1e-8)})
    return out


@dataclass(frozen=True)
class FeatureGroup:
    """A feature group: columns ``[start, stop)`` of 2-D input ``input`` (``None``: the whole
    input, e.g. a 1-D cosine). ``kind`` is ``table``, ``dense`` or ``sparse``."""

    name: str
    kind: Literal["table", "dense", "sparse"]
    input: str
    columns: tuple[int, int] | None = None


def feature_groups(model: RankingModel) -> list[FeatureGroup]:
    """The groups of ``model``: table groups it has, then dense and sparse features by column name."""
    vmodel = VectorInputModel(model)
    present = set(vmodel.input_names())
    groups = [FeatureGroup(name, "table", name_in, None if name_in in (COSINE_PQ, COSINE_PH) else (0, model.table_tower.tables.dim))
              for name, name_in in TABLE_GROUPS if name_in in present]
    groups += [FeatureGroup(name, "dense", DENSE, (j, j + 1)) for j, name in enumerate(model.spec.dense_names)]
    ebc = model.dcn_tower.sparse_ebc
    if ebc is not None:
        widths = {f: cfg.embedding_dim for cfg in ebc.embedding_bag_configs() for f in cfg.feature_names}
        start = 0
        for name in model.spec.sparse_names:  # KeyedTensor order = table order = spec order
            groups.append(FeatureGroup(name, "sparse", SPARSE, (start, start + widths[name])))
            start += widths[name]
    return groups


@dataclass
class ImportanceInputs:
    """The rows under study as :class:`VectorInputModel` inputs, their labels and the groups."""

    tensors: dict[str, torch.Tensor]  # input name -> [N, ...]
    labels: np.ndarray  # [N] clicks
    groups: list[FeatureGroup]
    baselines: dict[str, torch.Tensor]  # input name -> [...] (one row, without the batch dim)

    @property
    def names(self) -> list[str]:
        """Inputs handed to Captum: those some group covers (others stay fixed)."""
        used = {g.input for g in self.groups}
        return [n for n in self.tensors if n in used]

    def captum_inputs(self, rows: slice | np.ndarray = slice(None)) -> tuple[torch.Tensor, ...]:
        return tuple(self.tensors[n][rows] for n in self.names)

    def fixed_inputs(self, rows: slice | np.ndarray = slice(None)) -> dict[str, torch.Tensor]:
        return {n: t[rows] for n, t in self.tensors.items() if n not in self.names}

    def feature_masks(self) -> tuple[torch.Tensor, ...]:
        """One mask per Captum input, shape ``(1, width)`` (``(1,)`` for a 1-D input); group ``i``
        has id ``i`` (ids are global across inputs)."""
        masks = {n: torch.full((1, *self.tensors[n].shape[1:]), -1, dtype=torch.long) if self.tensors[n].dim() > 1
                 else torch.full((1,), -1, dtype=torch.long) for n in self.names}
        for i, g in enumerate(self.groups):
            if g.columns is None:
                masks[g.input][...] = i
            else:
                masks[g.input][:, g.columns[0]:g.columns[1]] = i
        for n, m in masks.items():
            if (m < 0).any():
                raise ValueError(f"input {n}: columns {torch.nonzero(m[0] < 0).flatten().tolist()} belong to no group")
        return tuple(masks[n] for n in self.names)

    def baseline_inputs(self) -> tuple[torch.Tensor | float, ...]:
        """Captum baselines: per input one row without the batch dim (a float for 1-D inputs)."""
        return tuple(float(self.baselines[n]) if self.tensors[n].dim() == 1 else self.baselines[n] for n in self.names)

    def group_values(self, attributions: Sequence[torch.Tensor], reduce: Literal["first", "sum"]) -> np.ndarray:
        """``[G, N]`` per-impression attribution of each group: the value of its first element
        (perturbation methods repeat it over the group) or the sum over its elements (IG)."""
        by_name = dict(zip(self.names, attributions))
        out = []
        for g in self.groups:
            attr = by_name[g.input].detach().double()
            if g.columns is None:
                out.append(attr.reshape(attr.shape[0]))
            elif reduce == "first":
                out.append(attr[:, g.columns[0]])
            else:
                out.append(attr[:, g.columns[0]:g.columns[1]].sum(dim=1))
        return torch.stack(out).numpy()


def most_frequent_ids(cache: ImpressionCache, sample: int = 1_000_000) -> np.ndarray:
    """``[S]`` most frequent id of each sparse feature on the training split (over up to
    ``sample`` evenly spaced training impressions; ties -> smallest id)."""
    index = np.asarray(cache.split_index("train"))
    index = index[:: max(1, len(index) // sample)]
    sparse = np.asarray(cache.columns["sparse"][index])
    return np.array([np.bincount(sparse[:, j]).argmax() for j in range(sparse.shape[1])], dtype=np.int64)


def build_inputs(model: RankingModel, data: RankingData, rows: np.ndarray, batch_size: int) -> ImportanceInputs:
    """Embed cache rows ``rows`` (sorted) for :class:`VectorInputModel`, with the baselines."""
    plain = PlainInputModel(model).eval()
    parts: dict[str, list[torch.Tensor]] = {}
    labels = []
    for start in tqdm(range(0, len(rows), batch_size), desc="embed NW rows", unit="batch", disable=None):
        batch: RankingBatch = data.batch(rows[start:start + batch_size])
        for name, value in embed_batch(plain, *batch.inputs()).items():
            parts.setdefault(name, []).append(value)
        labels.append(batch.labels.numpy())
    tensors = {name: torch.cat(values) for name, values in parts.items()}
    spec = model.spec
    base_request = embed_batch(
        plain, dense=torch.tensor([spec.dense_mean], dtype=torch.float32).reshape(1, len(spec.dense_names)),
        sparse_ids=torch.from_numpy(most_frequent_ids(data.cache)).reshape(1, len(spec.sparse_names)),
        product_rows=torch.zeros(1, dtype=torch.long), query_rows=torch.zeros(1, dtype=torch.long),
        history_rows=torch.full((1, 1), -1, dtype=torch.long))
    baselines = {name: value[0] for name, value in base_request.items()}
    return ImportanceInputs(tensors, np.concatenate(labels), feature_groups(model), baselines)


def batched_forward(vmodel: VectorInputModel, inputs: ImportanceInputs, batch_size: int) -> Callable[..., torch.Tensor]:
    """Captum forward function over the Captum inputs (one perturbation per evaluation):
    logits ``[N]``, computed in ``batch_size`` chunks."""
    names = inputs.names
    fixed = inputs.fixed_inputs()

    def forward(*tensors: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, tensors[0].shape[0], batch_size):
            window = slice(start, start + batch_size)
            kwargs = {k: v[window] for k, v in fixed.items()}
            kwargs.update({name: t[window] for name, t in zip(names, tensors)})
            out.append(vmodel(**kwargs))
        return torch.cat(out)

    return forward


@dataclass
class MethodResult:
    """One method's per-group scores (``[G]``), their std and the mean |attribution|."""

    method: str
    scores: np.ndarray
    score_std: np.ndarray
    attribution: np.ndarray
    repeats: int = 1

    def ranks(self) -> np.ndarray:
        """1-based ranks by descending score (NaN last; ties keep group order)."""
        key = np.where(np.isnan(self.scores), -np.inf, self.scores)
        order = np.argsort(-key, kind="stable")
        ranks = np.empty(len(order), dtype=np.int64)
        ranks[order] = np.arange(1, len(order) + 1)
        return ranks


def _permuter(generator: torch.Generator) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Captum ``perm_func``: one row permutation from ``generator`` for the masked columns."""
    def permute(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        perm = torch.randperm(n, generator=generator)
        while torch.equal(perm, torch.arange(n)):
            perm = torch.randperm(n, generator=generator)
        return torch.where(mask.bool(), x[perm], x)
    return permute


def _auc_drops(labels: np.ndarray, logits: np.ndarray, group_attr: np.ndarray) -> np.ndarray:
    """``[G]`` AUC(logits) - AUC(perturbed logits), where ``perturbed = logits - attribution``."""
    base = roc_auc(labels, logits)
    return np.array([base - roc_auc(labels, logits - attr) for attr in group_attr])


def permutation_importance(vmodel: VectorInputModel, inputs: ImportanceInputs, logits: np.ndarray,
                           repeats: int, seed: int, batch_size: int) -> MethodResult:
    """Captum ``FeaturePermutation`` ``repeats`` times (generator seeded by ``(seed, repeat)``)."""
    from captum.attr import FeaturePermutation

    forward = batched_forward(vmodel, inputs, batch_size)
    drops, attrs = [], []
    for repeat in tqdm(range(repeats), desc="permutation repeats", unit="repeat", disable=None):
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, repeat]).generate_state(1)[0]))
        explainer = FeaturePermutation(forward, perm_func=_permuter(generator))
        attributions = explainer.attribute(inputs.captum_inputs(), feature_mask=inputs.feature_masks())
        group_attr = inputs.group_values(attributions, "first")
        drops.append(_auc_drops(inputs.labels, logits, group_attr))
        attrs.append(np.abs(group_attr).mean(axis=1))
    drops_arr = np.stack(drops)
    return MethodResult("permutation", drops_arr.mean(0), drops_arr.std(0, ddof=1) if repeats > 1 else np.zeros(len(drops_arr[0])),
                        np.stack(attrs).mean(0), repeats)


def ablation_importance(vmodel: VectorInputModel, inputs: ImportanceInputs, logits: np.ndarray,
                        batch_size: int) -> MethodResult:
    """Captum ``FeatureAblation``: each group replaced by its baseline (deterministic)."""
    from captum.attr import FeatureAblation

    explainer = FeatureAblation(batched_forward(vmodel, inputs, batch_size))
    attributions = explainer.attribute(inputs.captum_inputs(), baselines=inputs.baseline_inputs(),
                                       feature_mask=inputs.feature_masks(), show_progress=True)
    group_attr = inputs.group_values(attributions, "first")
    drops = _auc_drops(inputs.labels, logits, group_attr)
    return MethodResult("ablation", drops, np.zeros_like(drops), np.abs(group_attr).mean(axis=1))


def ig_importance(vmodel: VectorInputModel, inputs: ImportanceInputs, rows: np.ndarray, steps: int,
                  batch_size: int) -> MethodResult:
    """Captum ``IntegratedGradients`` from the baselines on rows ``rows`` (positions in ``inputs``);
    score = mean over rows of |sum of the group's attributions|."""
    from captum.attr import IntegratedGradients

    chunk = max(1, batch_size // steps)
    group_attr = []
    for start in tqdm(range(0, len(rows), chunk), desc="integrated gradients", unit="chunk", disable=None):
        window = rows[start:start + chunk]
        fixed = inputs.fixed_inputs(window)
        names = inputs.names

        def forward(*tensors: torch.Tensor) -> torch.Tensor:
            reps = tensors[0].shape[0] // len(window)
            kwargs = {k: v.repeat(reps, *([1] * (v.dim() - 1))) for k, v in fixed.items()}
            kwargs.update(zip(names, tensors))
            return vmodel(**kwargs)

        captum_inputs = inputs.captum_inputs(window)
        baselines = tuple(torch.as_tensor(b, dtype=x.dtype).expand_as(x).contiguous()
                          for b, x in zip(inputs.baseline_inputs(), captum_inputs))
        attributions = IntegratedGradients(forward).attribute(captum_inputs, baselines=baselines, n_steps=steps,
                                                              internal_batch_size=len(window) * steps)
        group_attr.append(inputs.group_values(attributions, "sum"))
    values = np.abs(np.concatenate(group_attr, axis=1)).mean(axis=1)
    return MethodResult("ig", values, np.zeros_like(values), values)


def agreement(results: dict[str, MethodResult]) -> dict[str, dict]:
    """Spearman rank correlation of the scores of every pair of methods."""
    from scipy.stats import spearmanr

    out = {}
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ok = ~(np.isnan(results[a].scores) | np.isnan(results[b].scores))
            rho, p = spearmanr(results[a].scores[ok], results[b].scores[ok]) if ok.sum() > 2 else (np.nan, np.nan)
            out[f"{a}_vs_{b}"] = {"spearman": _num(rho), "p_value": _num(p), "groups": int(ok.sum())}
    return out


def _num(x: float) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def groups_json(result: MethodResult, groups: list[FeatureGroup]) -> dict[str, dict]:
    ranks = result.ranks()
    return {g.name: {"score": _num(result.scores[i]), "score_std": _num(result.score_std[i]), "rank": int(ranks[i]),
                     "attribution": _num(result.attribution[i]), "kind": g.kind} for i, g in enumerate(groups)}


def importance_markdown(report: dict) -> str:
    """The ranked table (one column pair per method when several ran) and the agreement."""
    methods = report["methods"]
    primary = report["groups"]
    order = sorted(primary, key=lambda g: primary[g]["rank"])
    head = ["rank", "feature group"]
    for m in methods:
        head += [f"{m} {METRICS[m]}", f"{m} rank"] + (["mean abs attr (logit)"] if m == "permutation" else [])
    lines = [f"# Feature importance: {report['variant']} seed {report['seed']}", "",
             f"NW ROC-AUC of the model on {report['rows']} evaluation impressions: {report['baseline_auc']:.4f}. "
             "auc_drop = NW ROC-AUC minus NW ROC-AUC with the group permuted (mean ± std over "
             f"{report['settings']['repeats']} permutations) or replaced by its baseline (ablation); "
             "mean_abs_attribution = mean |integrated gradients| of the group's inputs, in logits.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in order:
        row = [str(primary[g]["rank"]), g]
        for m in methods:
            r = report["by_method"][m][g]
            score = "n/a" if r["score"] is None else (
                f"{r['score']:.4f} ± {r['score_std']:.4f}" if m == "permutation" else f"{r['score']:.4f}")
            row += [score, str(r["rank"])] + ([f"{r['attribution']:.4f}"] if m == "permutation" else [])
        lines.append("| " + " | ".join(row) + " |")
    if report.get("agreement"):
        lines += ["", "Agreement between methods (Spearman rank correlation of the group scores):", ""]
        lines += [f"- {pair}: rho = {'n/a' if a['spearman'] is None else format(a['spearman'], '.3f')} "
                  f"over {a['groups']} groups" for pair, a in report["agreement"].items()]
    return "\n".join(lines) + "\n"


def plot_importance(report: dict, path: Path) -> Path:
    """Horizontal bars per method (rank 1 at the top) with std error bars; PNG, Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    colors = {"table": "tab:blue", "dense": "tab:orange", "sparse": "tab:green"}
    n = len(report["groups"])
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 1.2 + 0.32 * n), squeeze=False)
    for ax, m in zip(axes[0], methods):
        groups = report["by_method"][m]
        order = sorted(groups, key=lambda g: groups[g]["rank"])[::-1]
        values = [groups[g]["score"] or 0.0 for g in order]
        errors = [groups[g]["score_std"] or 0.0 for g in order]
        ax.barh(range(len(order)), values, xerr=errors if any(errors) else None, capsize=3,
                color=[colors[groups[g]["kind"]] for g in order])
        ax.set_yticks(range(len(order)), order, fontsize=8)
        ax.axvline(0.0, color="black", linewidth=0.6)
        ax.set_xlabel("NW ROC-AUC drop" if METRICS[m] == "auc_drop" else "mean |IG attribution| (logit)")
        ax.set_title(m)
    fig.suptitle(f"Feature importance, {report['variant']} seed {report['seed']} (blue: embedding-table "
                 "vectors and cosines, orange: dense, green: sparse)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def importance_set(workdir: str | Path) -> OutputSet:
    """The output set of this stage: ``importance.json``, ``importance.md`` and ``importance.png``."""
    return OutputSet(workdir, "importance/manifest.json", [f"importance/importance.{ext}" for ext in ("json", "md", "png")],
                     what="python -m ranking.importance")


def _made_from(cfg: ImportanceConfig, model_hashes: dict[str, str]) -> MadeFrom:
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("workdir", "force", "threads", "batch_size")}
    return MadeFrom({**model_hashes, **input_hashes(cfg.workdir, ["impressions", "purchases"])}, settings)


def _check_config(cfg: ImportanceConfig) -> None:
    get_variant(cfg.variant)
    if cfg.seed < 0:
        raise UserError(f"--seed must be >= 0, got {cfg.seed}")
    for flag, low in (("repeats", 1), ("ig_steps", 2), ("batch_size", 1), ("threads", 1), ("max_rows", 0), ("ig_max_rows", 0)):
        if getattr(cfg, flag) < low:
            raise UserError(f"--{flag.replace('_', '-')} must be >= {low}, got {getattr(cfg, flag)}")


def load_trained(cfg: ImportanceConfig) -> tuple[RankingModel, Path, dict[str, str]]:
    """The model of ``cfg.variant`` / ``cfg.seed``, its path and the hashes of its (intact) set;
    a clear error when it has not been trained."""
    trained = trained_set(cfg.workdir, cfg.variant, cfg.seed)
    path = trained.path(trained.files[0])
    if not path.exists():
        raise UserError(f"{path}: missing ranking model; run `python -m ranking.train --workdir {cfg.workdir} "
                        f"--variant {cfg.variant} --seeds {cfg.seed + 1}` first")
    hashes = trained.verify()
    model = load_model(path)
    if model.variant != cfg.variant:
        raise UserError(f"{path}: holds variant {model.variant!r}, expected {cfg.variant!r}")
    return model, path, hashes


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_config(ImportanceConfig, argv)
    _check_config(cfg)
    workdir = Path(cfg.workdir)
    model, model_path, model_hashes = load_trained(cfg)
    torch.set_num_threads(cfg.threads)
    try:
        cache = ImpressionCache.open(workdir)
        purchases = PurchaseIndex.from_workdir(workdir)
    except SchemaError as exc:
        raise UserError(str(exc)) from None
    spec = model.spec
    if (list(cache.meta.dense_names), list(cache.meta.sparse_names)) != (list(spec.dense_names), list(spec.sparse_names)):
        raise UserError(f"{model_path}: trained on features {spec.dense_names + spec.sparse_names}, but "
                        f"{data_table_path(workdir, 'impressions')} has {cache.meta.dense_names + cache.meta.sparse_names}; "
                        "retrain with `python -m ranking.train --force`")
    prepare_workdir(workdir, "importance")
    out = importance_set(workdir)
    json_rel, md_rel, png_rel = out.files
    made_from = _made_from(cfg, model_hashes)
    if not cfg.force and out.current(made_from):
        log.info("%s is complete for these inputs and settings; skipping (--force redoes it)", out.path(json_rel))
        return read_json(out.path(json_rel))

    rng = seed_everything(cfg.seed)
    eval_rows = np.asarray(cache.split_index("eval"))
    if cfg.max_rows and len(eval_rows) > cfg.max_rows:
        eval_rows = np.sort(rng.choice(eval_rows, cfg.max_rows, replace=False))
    if len(eval_rows) < 2:
        raise UserError(f"{data_table_path(workdir, 'impressions')}: {len(eval_rows)} impressions in the evaluation "
                        "week; permutation importance needs at least 2")
    data = RankingData(cache, purchases, spec)
    inputs = build_inputs(model, data, eval_rows, cfg.batch_size)
    if len(np.unique(inputs.labels)) < 2:
        raise UserError(f"{data_table_path(workdir, 'impressions')}: the evaluation week has only "
                        f"{'clicks' if inputs.labels[0] else 'non-clicks'}; ROC-AUC is undefined")
    vmodel = VectorInputModel(model).eval()
    with torch.no_grad():
        logits = batched_forward(vmodel, inputs, cfg.batch_size)(*inputs.captum_inputs()).double().numpy()
    baseline_auc = roc_auc(inputs.labels, logits)
    log.info("%s seed %d: NW ROC-AUC %.4f on %d impressions, %d feature groups", cfg.variant, cfg.seed,
             baseline_auc, len(eval_rows), len(inputs.groups))

    methods = list(METHODS) if cfg.method == "all" else [cfg.method]
    results: dict[str, MethodResult] = {}
    for method in methods:
        if method == "permutation":
            results[method] = permutation_importance(vmodel, inputs, logits, cfg.repeats, cfg.seed, cfg.batch_size)
        elif method == "ablation":
            results[method] = ablation_importance(vmodel, inputs, logits, cfg.batch_size)
        else:
            ig_rows = np.arange(len(eval_rows))
            if cfg.ig_max_rows and len(ig_rows) > cfg.ig_max_rows:
                ig_rows = np.sort(np.random.default_rng([cfg.seed, 1]).choice(ig_rows, cfg.ig_max_rows, replace=False))
            results[method] = ig_importance(vmodel, inputs, ig_rows, cfg.ig_steps, cfg.batch_size)
        log.info("%s done", method)

    primary = methods[0]
    report = {
        "method": cfg.method, "methods": methods, "variant": cfg.variant, "seed": cfg.seed,
        "metric": METRICS[primary], "baseline_auc": baseline_auc, "rows": int(len(eval_rows)),
        "groups": groups_json(results[primary], inputs.groups),
        "by_method": {m: groups_json(r, inputs.groups) for m, r in results.items()},
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("workdir", "force")},
        "model": str(model_path.relative_to(workdir)),
    }
    if len(results) > 1:
        report["agreement"] = agreement(results)
    with out.publish(made_from) as staged:
        write_json(report, staged[json_rel])
        write_text(importance_markdown(report), staged[md_rel])
        plot_importance(report, staged[png_rel])
    log.info("wrote %s, %s and %s", *(out.path(rel) for rel in out.files))
    return report


if __name__ == "__main__":
    run_main(main)
