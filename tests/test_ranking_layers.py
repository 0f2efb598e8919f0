"""ranking.layers: the oneDNN linear and the torch/torchrec layers it stands in for (same numbers up to rounding)."""
from __future__ import annotations

import platform

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.mlp import MLP

from ranking.layers import ONEDNN_LINEAR, CrossNet, Linear, ReluMLP, linear


def _grads(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.grad.clone() for t in tensors if t is not None and t.grad is not None]


def test_onednn_is_used_on_x86():
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available():
        assert ONEDNN_LINEAR


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_linear_matches_f_linear_forward_and_backward(relu, bias, strided):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(37, 40, generator=g)
    x = (base[:, ::2] if strided else base[:, :20].contiguous()).requires_grad_(True)
    w = torch.randn(9, 20, generator=g, requires_grad=True)
    b = torch.randn(9, generator=g, requires_grad=True) if bias else None
    out_grad = torch.randn(37, 9, generator=g)
    results = []
    for fn in (lambda: linear(x, w, b, relu), lambda: torch.relu(F.linear(x, w, b)) if relu else F.linear(x, w, b)):
        for t in (x, w, b):
            if t is not None:
                t.grad = None
        out = fn()
        out.backward(out_grad)
        results.append((out.detach(), _grads(x, w, b)))
    (out, grads), (expected, expected_grads) = results
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linear_is_deterministic_and_needs_no_grad_of_the_input():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(300, 70, generator=g), torch.randn(20, 70, generator=g, requires_grad=True), torch.randn(20, generator=g)
    runs = []
    for _ in range(2):
        w.grad = None
        linear(x, w, b, True).square().sum().backward()
        with torch.no_grad():
            runs.append((linear(x, w, b, True), w.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_linear_scripts():
    scripted = torch.jit.script(linear)
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(5, 6, generator=g), torch.randn(3, 6, generator=g), torch.randn(3, generator=g)
    torch.testing.assert_close(scripted(x, w, b, True), torch.relu(F.linear(x, w, b)), rtol=1e-5, atol=1e-6)


def _same_weights(ours: nn.Module, stock: nn.Module) -> None:
    assert list(ours.state_dict()) == list(stock.state_dict())
    stock.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("make", [
    lambda: (Linear(12, 5), nn.Linear(12, 5)),
    lambda: (ReluMLP(12, [16, 8]), MLP(12, [16, 8])),
    lambda: (CrossNet(in_features=12, num_layers=2, low_rank=4), LowRankCrossNet(in_features=12, num_layers=2, low_rank=4)),
], ids=["linear", "mlp", "crossnet"])
def test_layers_compute_what_the_stock_modules_do(make):
    """Same parameters and state-dict keys; the same outputs and gradients up to float rounding,
    with and without autograd (the crossnet takes another route without it)."""
    torch.manual_seed(0)
    ours, stock = make()
    _same_weights(ours, stock)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(33, 12, generator=g)
    out_grad = torch.randn(33, 5 if isinstance(ours, nn.Linear) else 8 if isinstance(ours, MLP) else 12, generator=g)
    outs = []
    for module in (ours, stock):
        module.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        out.backward(out_grad)
        with torch.no_grad():
            no_grad = module(x)
        outs.append((out.detach(), no_grad, xi.grad, {n: p.grad for n, p in module.named_parameters()}))
    (out, no_grad, x_grad, grads), (want, want_no_grad, want_x_grad, want_grads) = outs
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(no_grad, want_no_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grad, want_x_grad, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_relu_keeps_nan_like_torch_relu():
    """Non-finite inputs must stay non-finite (ranking.train refuses a NaN click probability)."""
    x = torch.tensor([[float("nan"), 1.0], [float("inf"), 1.0], [1.0, 2.0]])
    w, b = torch.tensor([[1.0, 1.0], [-1.0, 0.0]]), torch.zeros(2)
    torch.testing.assert_close(linear(x, w, b, True), torch.relu(F.linear(x, w, b)), equal_nan=True)
    assert linear(x, w, b, True)[0].isnan().all()
