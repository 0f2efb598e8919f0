"""ranking.optim.RowWiseAdagrad against torchrec's dense reference, on sparse and dense gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec.optim import RowWiseAdagrad as TorchrecRowWiseAdagrad

from ranking.optim import RowWiseAdagrad


def _bag(weights: torch.Tensor, sparse: bool) -> nn.EmbeddingBag:
    return nn.EmbeddingBag.from_pretrained(weights.clone(), freeze=False, mode="mean", sparse=sparse)


def _steps(bag: nn.EmbeddingBag, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for rows in batches:
        optimizer.zero_grad()
        target = torch.arange(rows.shape[0] * bag.embedding_dim, dtype=torch.float32).reshape(rows.shape[0], -1)
        ((bag(rows) - target.sin()) ** 2).sum().backward()
        optimizer.step()


def test_sparse_updates_equal_torchrecs_rowwise_adagrad_and_leave_other_rows_alone():
    weights = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    batches = [torch.tensor([[1, 2], [2, 2], [7, 1]]), torch.tensor([[7, 7], [3, 1], [1, 1]])]
    ours, reference = _bag(weights, sparse=True), _bag(weights, sparse=False)
    optimizer = RowWiseAdagrad(ours.parameters(), lr=0.1)
    _steps(ours, optimizer, batches)
    _steps(reference, TorchrecRowWiseAdagrad(reference.parameters(), lr=0.1), batches)
    assert torch.allclose(ours.weight, reference.weight, atol=1e-6)
    untouched = [0, 4, 5, 6, 8, 9]
    assert torch.equal(ours.weight[untouched], weights[untouched])
    state = optimizer.state[ours.weight]["sum"]
    assert state.shape == (10,) and torch.all(state[untouched] == 0) and torch.all(state[[1, 2, 3, 7]] > 0)


def test_dense_gradients_update_every_row_like_the_reference():
    weights = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    batches = [torch.tensor([[0, 5], [2, 3]])] * 3
    ours, reference = _bag(weights, sparse=False), _bag(weights, sparse=False)
    _steps(ours, RowWiseAdagrad(ours.parameters(), lr=0.05), batches)
    _steps(reference, TorchrecRowWiseAdagrad(reference.parameters(), lr=0.05), batches)
    assert torch.allclose(ours.weight, reference.weight, atol=1e-6)


def test_only_tables_and_valid_settings():
    with pytest.raises(ValueError, match="tables"):
        RowWiseAdagrad([nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="lr > 0"):
        RowWiseAdagrad([nn.Parameter(torch.zeros(3, 2))], lr=0.0)
