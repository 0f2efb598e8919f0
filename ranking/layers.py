"""The ranking model's dense layers, with the matrix products on oneDNN on CPU.

On CPU, ``F.linear`` runs on MKL's sgemm; oneDNN (``torch.ops.mkldnn._linear_pointwise``, built
into every x86 torch wheel) does the same fp32 product 2-3x faster for the tall, narrow shapes of
this model (``[4096, 98..256] @ [98..256, 16..128]``, one thread). Same
math, other rounding (fp32 accumulation either way). The ReLU is applied in place on the product,
not oneDNN's fused one, which turns NaN into 0. :func:`linear` picks oneDNN for float32 CPU tensors
when :data:`ONEDNN_LINEAR` (checked once at import against ``F.linear``) and falls back to
``F.linear`` elsewhere (CUDA, other dtypes, builds without oneDNN). Its backward
(:class:`_OneDNNLinear`) computes the input and weight gradients with oneDNN as well.

The modules keep the parameters and state-dict keys of the torch/torchrec modules they extend
(:class:`Linear` of ``nn.Linear``, :class:`ReluMLP` of ``torchrec.modules.mlp.MLP``,
:class:`CrossNet` of ``torchrec.modules.crossnet.LowRankCrossNet``), so checkpoints written
before load unchanged. :func:`linear` is a leaf of ``torch.fx`` tracing (``torch.fx.wrap``) that
``torch.jit.script`` compiles: the served TorchScript model runs the same kernels.
"""
# No `from __future__ import annotations`: TorchScript compiles linear() from its annotations.
import platform
from typing import List, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.mlp import MLP


def _onednn_linear_works() -> bool:
    """Whether this torch has oneDNN's linear on CPU and it agrees with ``F.linear`` (x86 builds)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g), torch.randn(3, generator=g)
        out = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return bool(torch.allclose(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5))
    except (RuntimeError, AttributeError):
        return False


ONEDNN_LINEAR: bool = _onednn_linear_works()


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    scalars: List[Optional[Union[int, float, complex]]] = []  # Scalar?[] in TorchScript
    out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", scalars, "")
    # oneDNN's fused ReLU maps NaN to 0; torch.relu keeps it, and non-finite checks rely on that
    return torch.relu_(out) if relu else out


class _OneDNNLinear(torch.autograd.Function):
    """``relu?(x @ weight.T + bias)`` on oneDNN, gradients too: ``dx = g @ W``, ``dW = g.T @ x``,
    ``db = g.sum(0)``; with the ReLU, ``g`` is first masked where the output is 0 (what
    ``torch.relu``'s backward does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
        out = _onednn(x, weight, bias, relu)
        ctx.relu = relu
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, out if relu else None)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight, out = ctx.saved_tensors
        if ctx.relu:
            grad = torch.ops.aten.threshold_backward(grad, out, 0)
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad, weight.t(), None, False)
        if ctx.needs_input_grad[1]:
            # the first operand is copied when transposed, the second read in place: copy the narrower one
            if x.shape[1] < grad.shape[1]:
                grad_w = _onednn(x.t().contiguous(), grad.t(), None, False).t().contiguous()
            else:
                grad_w = _onednn(grad.t().contiguous(), x.t(), None, False)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=0)
        return grad_x, grad_w, grad_b, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           relu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (then ``torch.relu`` when ``relu``) for a 2-D ``x``, on oneDNN
    for float32 CPU tensors when :data:`ONEDNN_LINEAR` (compiled by TorchScript: always, on the
    x86 builds that serve it), else ``F.linear``."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() == 2:
        if torch.jit.is_scripting():
            return _onednn(x, weight, bias, relu)
        if ONEDNN_LINEAR:
            if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                            or (bias is not None and bias.requires_grad)):
                return _OneDNNLinear.apply(x, weight, bias, relu)
            return _onednn(x, weight, bias, relu)
    out = F.linear(x, weight, bias)
    return torch.relu(out) if relu else out


torch.fx.wrap("linear")


class Linear(nn.Linear):
    """``nn.Linear`` through :func:`linear`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias)


class ReluMLP(MLP):
    """torchrec's ReLU :class:`MLP` (the same parameters and state dict), each layer
    :func:`linear` with its ReLU applied in place."""

    def __init__(self, in_size: int, layer_sizes: List[int]) -> None:
        super().__init__(in_size, layer_sizes)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input
        for perceptron in self._mlp:
            x = linear(x, perceptron._linear.weight, perceptron._linear.bias, True)
        return x


class CrossNet(LowRankCrossNet):
    """torchrec's :class:`LowRankCrossNet` (the same parameters and state dict): each layer
    ``x_{l+1} = x_0 * (W (V x_l) + b) + x_l`` as two :func:`linear` products (the bias inside
    the second), then one ``addcmul`` without autograd, or a product and an in-place sum with it
    (``addcmul``'s backward scales both gradients by its ``value`` first: two more passes)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x_0 = input
        x_l = x_0
        for layer in range(self._num_layers):
            x_l_w = linear(linear(x_l, self.V_kernels[layer]), self.W_kernels[layer], self.bias[layer])
            if torch.is_grad_enabled():
                x_l = (x_0 * x_l_w).add_(x_l)
            else:
                x_l = torch.addcmul(x_l, x_0, x_l_w)
        return x_l
