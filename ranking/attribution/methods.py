"""The three Captum attribution methods over feature groups, on the model's logit.

AUC is rank based, so logits and probabilities agree.

``permutation``
    Captum ``FeaturePermutation`` with one group id per feature group, ``repeats`` times with
    permutations drawn from a generator seeded by ``(seed, repeat)``. Captum's per-impression
    attribution is ``logit(x) - logit(x with the group permuted)``; the permuted scores are
    recovered from it, and the score of a group is the ROC-AUC drop ``AUC(original) -
    AUC(permuted)`` (mean ± std over repeats). ``attribution`` = mean |attr|.
``ablation``
    Captum ``FeatureAblation``: each group replaced by its baseline (:mod:`ranking.attribution.groups`).
    Score = AUC drop (deterministic, std 0).
``ig``
    Captum ``IntegratedGradients`` from the same baselines on every (continuous) input; per
    impression the attributions of a group's elements are summed (their total is ``logit(x) -
    logit(baseline)``) and the score is the mean |group attribution|.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ranking.attribution.groups import ImportanceInputs
from ranking.attribution.interaction import InteractionInputModel
from ranking.metrics import roc_auc

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("permutation", "ablation", "ig")
# The score each method reports per group.
METRICS = {"permutation": "auc_drop", "ablation": "auc_drop", "ig": "mean_abs_attribution"}


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


def batched_forward(vmodel: InteractionInputModel, inputs: ImportanceInputs,
                    batch_size: int) -> Callable[..., torch.Tensor]:
    """Captum forward function over the Captum inputs (``[N, ...]`` each, one perturbation per
    evaluation): logits ``[N]``, computed in ``batch_size`` chunks."""
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
    """``[G]`` AUC(logits) - AUC(perturbed logits), where ``perturbed = logits - attribution``
    (``labels``, ``logits`` ``[N]``, ``group_attr`` ``[G, N]``)."""
    base = roc_auc(labels, logits)
    return np.array([base - roc_auc(labels, logits - attr) for attr in group_attr])


def permutation_importance(vmodel: InteractionInputModel, inputs: ImportanceInputs, logits: np.ndarray,
                           repeats: int, seed: int, batch_size: int) -> MethodResult:
    """Captum ``FeaturePermutation`` ``repeats`` times (generator seeded by ``(seed, repeat)``);
    ``logits`` ``[N]`` are the model's on the unpermuted inputs."""
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


def ablation_importance(vmodel: InteractionInputModel, inputs: ImportanceInputs, logits: np.ndarray,
                        batch_size: int) -> MethodResult:
    """Captum ``FeatureAblation``: each group replaced by its baseline (deterministic);
    ``logits`` ``[N]`` are the model's on the unchanged inputs."""
    from captum.attr import FeatureAblation

    explainer = FeatureAblation(batched_forward(vmodel, inputs, batch_size))
    attributions = explainer.attribute(inputs.captum_inputs(), baselines=inputs.baseline_inputs(),
                                       feature_mask=inputs.feature_masks(), show_progress=True)
    group_attr = inputs.group_values(attributions, "first")
    drops = _auc_drops(inputs.labels, logits, group_attr)
    return MethodResult("ablation", drops, np.zeros_like(drops), np.abs(group_attr).mean(axis=1))


def ig_importance(vmodel: InteractionInputModel, inputs: ImportanceInputs, rows: np.ndarray, steps: int,
                  batch_size: int) -> MethodResult:
    """Captum ``IntegratedGradients`` from the baselines on rows ``rows`` (``[R]`` positions in
    ``inputs``); score = mean over rows of |sum of the group's attributions|."""
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


def run_methods(vmodel: InteractionInputModel, inputs: ImportanceInputs, logits: np.ndarray, methods: Sequence[str],
                *, repeats: int, seed: int, ig_steps: int, ig_max_rows: int, batch_size: int) -> dict[str, MethodResult]:
    """Run ``methods`` (names from :data:`METHODS`) in order on ``inputs`` (``logits`` ``[N]``: the
    model's on the unchanged inputs). Integrated gradients run on at most ``ig_max_rows`` rows
    (0 = all) drawn without replacement from a generator seeded by ``(seed, 1)``."""
    results: dict[str, MethodResult] = {}
    for method in methods:
        if method == "permutation":
            results[method] = permutation_importance(vmodel, inputs, logits, repeats, seed, batch_size)
        elif method == "ablation":
            results[method] = ablation_importance(vmodel, inputs, logits, batch_size)
        elif method == "ig":
            ig_rows = np.arange(len(inputs.labels))
            if ig_max_rows and len(ig_rows) > ig_max_rows:
                ig_rows = np.sort(np.random.default_rng([seed, 1]).choice(ig_rows, ig_max_rows, replace=False))
            results[method] = ig_importance(vmodel, inputs, ig_rows, ig_steps, batch_size)
        else:
            raise ValueError(f"unknown importance method {method!r}; expected one of {METHODS}")
        log.info("%s done", method)
    return results
