"""The DashCLIP model (paper sec. 3): BLIP-style product encoders plus a query encoder.

::

    pixels [B,3,S,S] --image_encoder--> image tokens [B,1+P,Dv] --image_proj(token 0)--> image emb [B,d]
    title ids [B,L] --text_encoder (plain)--> text state [B,Dt] --text_proj--> text emb [B,d]
    title ids + image tokens --text_encoder (image-grounded, cross-attention)--> grounded state [B,Dt]
        --multimodal_proj--> product emb [B,d]          --itm_head--> match logits [B,2]
    query ids [B,L] --query_encoder--> query state [B,Dq] --query_proj--> query emb [B,d]

A text "state" is the encoder's pooled output: its [CLS] position (BLIP, the paper) or the mean
over its tokens (``--pooling``, :class:`~embeddings.backbones.TextConfig`). With a gated
cross-attention (``--cross-attention gated``) the grounded state starts equal to the plain one.

The plain and the image-grounded text encoder are one module (shared weights; the grounded mode
adds the cross-attention blocks). The query encoder is a separate text-only copy of the text
encoder. A product without an image gets the grounded encoder run without image tokens, i.e. the
plain text state, through the same multimodal projection. Every ``*_embedding`` output is
L2-normalised.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.cli import check_config
from embeddings.backbones import (LITE0_MEAN, LITE0_STD, ConvTokenEncoder, EfficientNetLite0,
                                  FusedEfficientNetLite0, InferenceLinear, TextConfig, TextTransformer, VisionConfig,
                                  VisionTransformer, bert_text_config, load_bert_weights,
                                  load_efficientnet_lite0, load_tokenizer, minilm_path, read_blip_checkpoint,
                                  resize_position_embedding)
from embeddings.config import DashCLIPConfig
from embeddings.inputs import ImageSpec

log = logging.getLogger(__name__)

TINY_TEXT = TextConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_positions=128)
TINY_PATCH = 16


class DashCLIP(nn.Module):
    """Image encoder, shared plain/grounded text encoder, query encoder and their heads.

    Args:
        image_encoder: ``[B, 3, S, S]`` -> ``[B, 1+P, Dv]`` (token 0 global); has ``width``,
            ``num_layers`` and ``frozen_prefix(n)``.
        text_encoder: a :class:`TextTransformer` with cross-attention to ``Dv``-wide tokens.
        embed_dim: ``d``, the width of the shared space.
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: TextTransformer, embed_dim: int) -> None:
        super().__init__()
        if text_encoder.cfg.cross_attention_width != image_encoder.width:
            raise ValueError(f"text cross-attention width {text_encoder.cfg.cross_attention_width} != image "
                             f"token width {image_encoder.width}")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.query_encoder = TextTransformer(replace(text_encoder.cfg, cross_attention_width=0))
        width = text_encoder.width
        self.image_proj = nn.Linear(image_encoder.width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.multimodal_proj = nn.Linear(width, embed_dim)
        self.query_proj = nn.Linear(width, embed_dim)
        self.itm_head = nn.Linear(width, 2)
        # a semi-orthogonal title projection keeps the text encoder's geometry as far as d allows
        # (the identity when d equals the width): the untuned title vectors rank like the encoder's own
        nn.init.orthogonal_(self.text_proj.weight)
        nn.init.zeros_(self.text_proj.bias)
        self.pretrained_names: set[str] = set()
        self.frozen_layers: dict[str, int] = {}
        self._frozen: list[nn.Module] = []
        self.multimodal_proj.load_state_dict(self.text_proj.state_dict())
        self.init_query_side_from_text()

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def init_query_side_from_text(self) -> None:
        """Copy the text encoder (without cross-attention) into the query encoder and ``text_proj``
        into ``query_proj``: queries start in the title space (``multimodal_proj`` starts as a copy of
        ``text_proj`` at construction)."""
        text_state = {k: v for k, v in self.text_encoder.state_dict().items()
                      if ".crossattention." not in k and not k.endswith(".cross_gate")}
        self.query_encoder.load_state_dict(text_state, strict=True)
        self.query_proj.load_state_dict(self.text_proj.state_dict())

    def freeze_first_layers(self, fraction: float) -> dict[str, int]:
        """Freeze the first ``round(fraction * layers)`` layers (and the embeddings/stem) of the image,
        text and query encoders. Cross-attention blocks that were not loaded from a checkpoint (new,
        random) always train. Frozen parts also stay in eval mode (BatchNorm statistics, dropout).
        Call after ``pretrained_names`` is set. Returns the frozen layer count per encoder."""
        counts = {}
        self._frozen = []
        cross_pretrained = any(".crossattention." in n for n in self.pretrained_names)
        for name in ("image_encoder", "text_encoder", "query_encoder"):
            encoder = getattr(self, name)
            n = round(fraction * encoder.num_layers)
            counts[name] = n
            prefix = (encoder.frozen_prefix(n, include_cross_attention=cross_pretrained) if name == "text_encoder"
                      else encoder.frozen_prefix(n))
            for module in prefix:
                module.requires_grad_(False)
                self._frozen.append(module)
        self.train(self.training)
        self.frozen_layers = counts
        return counts

    def train(self, mode: bool = True) -> "DashCLIP":
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def stage_parameter_groups(self, stage: int) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters of a stage as ``{"encoder": [...], "new": [...]}`` (two learning rates).

        Stage 1 trains the image and text encoders, ``image_proj``, ``text_proj``, ``itm_head`` and
        ``multimodal_proj``;
        ``encoder`` holds the weights loaded from a pretrained backbone, ``new`` the rest
        (cross-attention, token projection, heads). Stage 2 trains the query encoder (``encoder``)
        and ``query_proj`` and ``multimodal_proj`` (``new``); the product encoders stay frozen.
        """
        groups: dict[str, list[nn.Parameter]] = {"encoder": [], "new": []}
        if stage == 1:
            prefixes = ("image_encoder.", "text_encoder.", "image_proj.", "text_proj.", "itm_head.", "multimodal_proj.")
            for name, param in self.named_parameters():
                if param.requires_grad and name.startswith(prefixes):
                    groups["encoder" if name in self.pretrained_names else "new"].append(param)
        else:
            groups["encoder"] = [p for p in self.query_encoder.parameters() if p.requires_grad]
            groups["new"] = [*self.query_proj.parameters(), *self.multimodal_proj.parameters()]
        return groups

    # ------------------------------------------------------------------ encoders
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> ``[B, 1+P, Dv]``."""
        return self.image_encoder(pixels)

    def image_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens ``[B, 1+P, Dv]`` -> ``[B, d]`` from the global token 0."""
        return F.normalize(self.image_proj(tokens[:, 0]), dim=-1)

    def text_state(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled text state ``[B, Dt]``: plain mode without ``image_tokens``, image-grounded with them."""
        return self.text_encoder.pooled(input_ids, attention_mask, image_tokens)

    def text_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Titles ``[B, L]`` -> unimodal text embeddings ``[B, d]``."""
        return F.normalize(self.text_proj(self.text_state(input_ids, attention_mask)), dim=-1)

    def itm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_tokens: torch.Tensor) -> torch.Tensor:
        """Match logits ``[B, 2]`` (index 1 = matched) of title i with image tokens i."""
        return self.itm_head(self.text_state(input_ids, attention_mask, image_tokens))

    def product_state(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixels: torch.Tensor | None,
                    has_image: torch.Tensor) -> torch.Tensor:
        """Grounded states ``[B, Dt]`` of products; ``pixels`` ``[K, 3, S, S]`` holds the images of the
        K rows where ``has_image`` ``[B]`` is True; the other rows run without image tokens (only
        those rows run the plain mode)."""
        tokens = self.image_tokens(pixels) if bool(has_image.any()) else None
        return self.product_state_from_tokens(input_ids, attention_mask, tokens, has_image)

    def product_state_from_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                  image_tokens: torch.Tensor | None, has_image: torch.Tensor) -> torch.Tensor:
        """:meth:`product_state` from the image tokens ``[K, 1+P, Dv]`` of the K rows with an image
        (:meth:`image_tokens` of their pixels; None when no row has one)."""
        if bool(has_image.all()):
            return self.text_state(input_ids, attention_mask, image_tokens)
        if not bool(has_image.any()):
            return self.text_state(input_ids, attention_mask)
        rows, plain_rows = has_image.nonzero().squeeze(1), (~has_image).nonzero().squeeze(1)
        grounded = self.text_state(input_ids[rows], attention_mask[rows], image_tokens)
        plain = self.text_state(input_ids[plain_rows], attention_mask[plain_rows])
        out = plain.new_empty((len(has_image), plain.shape[1]))
        out[plain_rows] = plain
        out[rows] = grounded.to(out.dtype)
        return out

    def product_embedding_from_state(self, state: torch.Tensor) -> torch.Tensor:
        """Grounded states ``[B, Dt]`` -> multimodal product embeddings ``[B, d]``."""
        return F.normalize(self.multimodal_proj(state), dim=-1)

    def query_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Queries ``[B, L]`` -> ``[B, d]``."""
        return F.normalize(self.query_proj(self.query_encoder.pooled(input_ids, attention_mask)), dim=-1)

    def inference_copy(self, dtype: torch.dtype = torch.float32) -> "DashCLIP":
        """A copy of this model for fast inference, in eval mode (use it under ``torch.inference_mode``).

        It shares the weights of this model except for: an EfficientNet-Lite0 image encoder becomes
        :class:`~embeddings.backbones.FusedEfficientNetLite0` (BatchNorm folded into the
        convolutions, ReLU6 and residual additions fused, channels-last, the batch in chunks), its
        token projection, every matrix product of a ViT image encoder and of the text and query
        encoders become oneDNN products on CPU (:class:`~embeddings.backbones.InferenceLinear`: query/key/value as one
        product, GELU and residual additions fused;
        :meth:`~embeddings.backbones.TextTransformer.fuse_projections`). With ``dtype`` float32 the
        same function as this model in eval mode up to float rounding; ``torch.bfloat16`` runs those
        convolutions and matrix products in bfloat16 (float32 accumulation; LayerNorm, attention
        softmax, residual stream, pooling and the projections stay float32). A snapshot: it does not
        follow later training of this model.
        """
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        shared = {id(t): t for t in (*self.parameters(), *self.buffers())}
        model = copy.deepcopy(self, shared).eval()
        image = model.image_encoder
        if isinstance(image, ConvTokenEncoder):
            if isinstance(image.backbone, EfficientNetLite0):
                image.backbone = FusedEfficientNetLite0(image.backbone, dtype)
            image.token_proj[0] = InferenceLinear.of(image.token_proj[0], dtype=dtype, out_dtype=torch.float32)
        elif isinstance(image, VisionTransformer):
            image.fuse_for_inference(dtype)
        model.text_encoder.fuse_projections(dtype)
        model.query_encoder.fuse_projections(dtype)
        model._frozen = []
        return model

    @property
    def reads_channels_last(self) -> bool:
        """True when the image encoder wants channels-last pixels (the fused CNN of :meth:`inference_copy`)."""
        return isinstance(getattr(self.image_encoder, "backbone", None), FusedEfficientNetLite0)

    def query_prefix_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, L, Dq]`` of queries after the frozen first layers of the query encoder
        (fixed while training: they can be computed once per distinct query)."""
        return self.query_encoder.prefix_states(input_ids, attention_mask, self.frozen_layers.get("query_encoder", 0))

    def query_embedding_from_prefix(self, prefix_states: torch.Tensor, attention_mask: torch.Tensor,
                                    length_buckets: int = 4) -> torch.Tensor:
        """:meth:`query_prefix_states` ``[B, L, Dq]`` -> query embeddings ``[B, d]`` (trainable layers only).

        The queries are sorted by length and run in ``length_buckets`` groups, each cut to its own
        longest query, so short queries do not pay for the padding of long ones.
        """
        lengths = attention_mask.sum(dim=1)
        order = torch.argsort(lengths, stable=True)
        start_layer = self.frozen_layers.get("query_encoder", 0)
        parts = []
        for rows in order.chunk(max(1, min(length_buckets, len(order)))):
            longest = int(lengths[rows].max())
            parts.append(self.query_encoder.pooled_from(prefix_states[rows, :longest], attention_mask[rows, :longest],
                                                        start_layer))
        state = torch.cat(parts)[torch.argsort(order)]
        return F.normalize(self.query_proj(state), dim=-1)


# ------------------------------------------------------------------------------------ builders
Built = tuple[nn.Module, TextTransformer, ImageSpec, set[str], dict[str, dict[str, torch.Tensor]]]


def text_options(cfg: DashCLIPConfig) -> dict[str, object]:
    """The :class:`TextConfig` fields that ``cfg`` chooses (pooling, cross-attention gate)."""
    return {"pooling": cfg.resolved_pooling(), "cross_attention_gate": cfg.resolved_cross_attention_gate()}


def _tiny(cfg: DashCLIPConfig) -> Built:
    if cfg.image_size % TINY_PATCH:
        raise ValueError(f"--image-size must be a multiple of {TINY_PATCH} for the tiny backbone")
    vision = VisionTransformer(VisionConfig(image_size=cfg.image_size, patch_size=TINY_PATCH, hidden_size=64,
                                            num_layers=2, num_heads=2, intermediate_size=128))
    text = TextTransformer(replace(TINY_TEXT, cross_attention_width=vision.width, **text_options(cfg)))
    return vision, text, ImageSpec(cfg.image_size, LITE0_MEAN, LITE0_STD), set(), {}


def _mini(cfg: DashCLIPConfig) -> Built:
    text_dir = minilm_path()
    text_cfg = bert_text_config(text_dir, cross_attention_width=0)
    image = ConvTokenEncoder(load_efficientnet_lite0(), width=text_cfg.hidden_size)
    text = TextTransformer(replace(text_cfg, cross_attention_width=image.width, **text_options(cfg)))
    missing = set(load_bert_weights(text, text_dir))
    pretrained = {f"image_encoder.{k}" for k, _ in image.backbone.named_parameters(prefix="backbone")}
    pretrained |= {f"text_encoder.{k}" for k, _ in text.named_parameters() if k not in missing}
    log.info("mini backbone: MiniLM-L6 text (%s) + EfficientNet-Lite0 images; %d new cross-attention tensors",
             text_dir, len(missing))
    return image, text, ImageSpec(cfg.image_size, LITE0_MEAN, LITE0_STD), pretrained, {}


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``module``; only cross-attention gates (new with ``--cross-attention gated``)
    may be missing."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.endswith(".cross_gate")]
    if missing or unexpected:
        raise ValueError(f"BLIP checkpoint {what}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _blip(cfg: DashCLIPConfig) -> Built:
    weights = read_blip_checkpoint(cfg.init_from)
    if cfg.image_size % weights.vision.patch_size:
        raise ValueError(f"--image-size {cfg.image_size} is not a multiple of the BLIP patch size "
                         f"{weights.vision.patch_size}")
    if not weights.text.cross_attention_width:
        raise ValueError(f"{cfg.init_from}: the BLIP text encoder has no cross-attention (is_decoder=False)")
    vision = VisionTransformer(replace(weights.vision, image_size=cfg.image_size))
    text = TextTransformer(replace(weights.text, **text_options(cfg)))
    sub = {prefix: {k[len(prefix):]: v for k, v in weights.state.items() if k.startswith(prefix)}
           for prefix in ("vision_model.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head.")}
    vision_state = sub["vision_model."]
    grid = cfg.image_size // weights.vision.patch_size
    key = "embeddings.position_embedding"
    if vision_state[key].shape[1] != grid * grid + 1:
        log.info("BLIP positions resampled from %d to %d patches for --image-size %d",
                 vision_state[key].shape[1] - 1, grid * grid, cfg.image_size)
        vision_state[key] = resize_position_embedding(vision_state[key], grid)
    _load_strict(vision, vision_state, "vision_model")
    _load_strict(text, {k: v for k, v in sub["text_encoder."].items() if k != "embeddings.position_ids"},
                 "text_encoder")
    heads = {"image_proj": sub["vision_proj."], "text_proj": sub["text_proj."], "itm_head": sub["itm_head."]}
    pretrained = {f"image_encoder.{k}" for k, _ in vision.named_parameters()}
    pretrained |= {f"text_encoder.{k}" for k, _ in text.named_parameters() if not k.endswith(".cross_gate")}
    pretrained |= {f"{head}.{k}" for head, state in heads.items() for k in state}
    spec = ImageSpec(cfg.image_size, weights.image_mean, weights.image_std)
    if weights.embed_dim != cfg.embed_dim:
        raise ValueError(f"the BLIP checkpoint projects to {weights.embed_dim} dims; pass --embed-dim "
                         f"{weights.embed_dim}")
    return vision, text, spec, pretrained, heads


def blip_tokenizer(model_dir: Path):
    """The checkpoint's own tokenizer, else MiniLM's (the same uncased BERT WordPiece vocabulary)."""
    if any((model_dir / name).exists() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        return load_tokenizer(model_dir)
    log.warning("%s has no tokenizer files; using the uncased BERT WordPiece vocabulary of MiniLM", model_dir)
    return load_tokenizer(minilm_path())


def build_dashclip(cfg: DashCLIPConfig) -> tuple[DashCLIP, object, ImageSpec]:
    """The untuned model of ``cfg`` (pretrained weights where the backbone has them, the rest
    initialised from ``cfg.seed``; the global RNG is left untouched), its tokenizer and image spec."""
    check_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        builders = {"tiny": _tiny, "mini": _mini, "blip": _blip}
        if cfg.backbone not in builders:
            raise ValueError(f"unknown backbone {cfg.backbone!r}")
        image, text, spec, pretrained, heads = builders[cfg.backbone](cfg)
        model = DashCLIP(image, text, cfg.embed_dim)
    tokenizer = blip_tokenizer(Path(cfg.init_from)) if cfg.backbone == "blip" else load_tokenizer(minilm_path())
    for head, state in heads.items():
        _load_strict(getattr(model, head), state, head)
    model.multimodal_proj.load_state_dict(model.text_proj.state_dict())
    model.init_query_side_from_text()
    model.pretrained_names = pretrained
    if len(tokenizer) > text.cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the text encoder {text.cfg.vocab_size}")
    frozen = model.freeze_first_layers(cfg.freeze_fraction)
    log.info("DashCLIP %s: %.1fM parameters; frozen first layers %s", cfg.backbone,
             sum(p.numel() for p in model.parameters()) / 1e6, frozen)
    return model, tokenizer, spec
