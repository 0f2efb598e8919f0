"""Dataclass configs of the DashCLIP commands; every field is a ``--flag`` (common.cli.parse_config).

Field metadata ``stage`` says which outputs a setting changes: ``model`` (the architecture and its
initialisation: every stage), ``1`` (stage 1), ``2`` (stage 2) or ``run`` (how a run executes, not
what it computes). A finished stage is reused only when it was made from the same inputs and
these settings (:meth:`EmbeddingsTrainConfig.settings`, recorded in its :class:`common.provenance.MadeFrom`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from common.cli import DEFAULT_WORKDIR, UserError, threads_field

Backbone = Literal["mini", "blip", "tiny"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fast", "bf16", "fp32"]
PRECISIONS: tuple[str, ...] = ("fast", "bf16", "fp32")  # what "auto" resolves to: embeddings.runtime.resolve_precision
WORKERS_HELP = ("batches encoded at once on CPU: 0 = up to one per torch thread, each batch single-threaded (fastest "
                "on a few cores, the bytes of one thread); 1 = one batch at a time, its operators on all threads")
PRECISION_HELP = ("auto (default): bf16 on a CPU with bf16 instructions (AVX512-BF16 or AMX), fast elsewhere; "
                  "fast: the fused inference copy of the model in float32 (BatchNorm folded into the convolutions, "
                  "ReLU6, GELU and residual additions fused, images in chunks, channels-last, one oneDNN matrix "
                  "product for query/key/value; bf16 autocast on CUDA); bf16: the same copy with its convolutions and "
                  "matrix products in bfloat16 on CPU (float32 accumulation, LayerNorm and softmax in float32; "
                  "faster where the CPU has bf16 instructions); fp32: the model as trained, in float32 (the "
                  "reference). On CPU fast agrees with fp32 to a cosine above 0.9999 per vector, bf16 above 0.999")


def _f(default: Any, help: str, stage: str, **rules: Any) -> Any:
    """A field with its help, the outputs it changes (``stage``) and its rules (``min``, ``max``, ...:
    :mod:`common.cli`)."""
    return field(default=default, metadata={"help": help, "stage": stage, **rules})


@dataclass
class DashCLIPConfig:
    """Architecture of the DashCLIP encoders."""

    backbone: Backbone = _f("mini", "encoders: mini (MiniLM-L6 + EfficientNet-Lite0, pretrained), blip (a BLIP "
                                    "checkpoint dir, see --init-from), tiny (random, for tests)", "model")
    init_from: str = _f("", "BLIP checkpoint directory (BlipForImageTextRetrieval format) for --backbone blip",
                        "model")
    embed_dim: int = _f(256, "width of the shared embedding space", "model", min=1)
    image_size: int = _f(96, "square image side in pixels (paper: 384)", "model", min=32)
    title_max_tokens: int = _f(32, "titles are truncated to this many tokens", "model")
    query_max_tokens: int = _f(16, "queries are truncated to this many tokens", "model")
    freeze_fraction: float = _f(0.67, "share of the first layers of each encoder that stay frozen "
                                      "(paper: 8 of 12)", "model", min=0.0, max=1.0)
    pooling: Literal["auto", "cls", "mean"] = _f(
        "auto", "text state handed to the projections: cls (the [CLS] position, BLIP and the paper), mean (the mean "
                "over the tokens, how sentence encoders such as MiniLM are trained); auto = mean for mini, cls "
                "otherwise", "model")
    cross_attention: Literal["auto", "gated", "plain"] = _f(
        "auto", "image-grounded text encoder: gated (each new cross-attention block enters through a tanh gate "
                "that starts at 0, so the grounded encoder begins as the text encoder), plain (BLIP and the paper); "
                "auto = gated for mini and tiny (new cross-attention), plain for blip (pretrained)", "model")
    seed: int = _f(0, "seed of the initialisation, the data order and the sampling", "model", min=0)

    def check(self) -> None:
        """The rules between fields (common.cli.check_config runs the per-field ones first)."""
        if self.backbone == "blip" and not self.init_from:
            raise UserError("--backbone blip needs --init-from DIR (a BlipForImageTextRetrieval checkpoint)")
        if self.backbone != "blip" and self.init_from:
            raise UserError(f"--init-from is only used with --backbone blip (got --backbone {self.backbone})")

    def resolved_pooling(self) -> str:
        return ("mean" if self.backbone == "mini" else "cls") if self.pooling == "auto" else self.pooling

    def resolved_cross_attention_gate(self) -> bool:
        return self.backbone != "blip" if self.cross_attention == "auto" else self.cross_attention == "gated"

    def model_only(self) -> "DashCLIPConfig":
        return DashCLIPConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DashCLIPConfig)})


@dataclass
class EmbeddingsTrainConfig(DashCLIPConfig):
    """Train DashCLIP: stage 1 (ITC + ITM on catalog image-title pairs), stage 2 (PQC on queries)."""

    workdir: str = _f(DEFAULT_WORKDIR, "run directory (reads DIR/data, writes DIR/embeddings)", "run")
    stage: Literal["1", "2", "all"] = _f("all", "which stage(s) to run", "run")
    device: Device = _f("auto", "auto = cuda when available (bf16 autocast, fused AdamW), else cpu", "run")
    autocast: Literal["auto", "bf16", "fp32"] = _f(
        "auto", "precision of the encoders' forward passes in training (losses and optimizer stay float32): auto = "
                "bf16 autocast on CUDA and on CPUs with bf16 instructions (AVX512-BF16 or AMX), float32 on other "
                "CPUs, recorded as the one it chose; bf16 / fp32 = that on any device (compare `python -m "
                "embeddings.bench --dtype bf16` and fp32)", "1")
    resume: bool = _f(True, "continue an interrupted run of the same data and settings from its last "
                            "checkpoint", "run")
    force: bool = _f(False, "retrain even when finished outputs for the same data and settings exist", "run")
    threads: int = threads_field(stage="run")
    pg_timeout_s: float = _f(300.0, "under torchrun (WORLD_SIZE > 1): every collective fails after this many seconds, "
                                    "so a rank that dies stops the others instead of hanging them", "run", gt=0.0)
    max_steps_this_run: int = _f(0, "stop (with a checkpoint) after this many optimizer steps in this "
                                    "invocation, to split training into time slices; 0 = no limit", "run")
    checkpoint_every: int = _f(50, "save a resumable checkpoint every K optimizer steps", "run", min=1)
    image_cache_mb: int = _f(2048, "keep up to this many MB of decoded images in memory", "run")
    query_cache_mb: int = _f(2048, "keep the frozen query-encoder states of stage 2 in memory up to this many MB",
                             "run")
    weight_decay: float = _f(0.05, "AdamW weight decay (both stages)", "1")
    warmup_fraction: float = _f(0.05, "linear warm-up share of each stage's steps, then cosine decay", "1")
    head_lr: float = _f(5e-4, "learning rate of new layers (cross-attention, projections, ITM head)", "1")
    stage1_batch_size: int = _f(32, "image-title pairs per stage-1 step (>= 2: the in-batch negatives)", "1", min=2)
    stage1_epochs: float = _f(1.0, "passes over the stage-1 training products", "1")
    stage1_max_steps: int = _f(0, "cap on stage-1 optimizer steps (0 = epochs decide)", "1")
    stage1_lr: float = _f(5e-5, "learning rate of the pretrained encoder layers in stage 1", "1")
    stage1_eval_fraction: float = _f(0.1, "share of products held out for the ITM eval loss", "1", min=0.0, lt=1.0)
    stage1_eval_max: int = _f(256, "at most this many held-out products", "1")
    eval_every: int = _f(25, "evaluate the held-out ITM loss every K stage-1 steps", "1", min=1)
    patience: int = _f(4, "stop stage 1 after this many evaluations without a better ITM eval loss", "1", min=1)
    itc_temperature: float = _f(0.07, "initial ITC temperature (learnable)", "1")
    multimodal_itc_weight: float = _f(1.0, "weight of the multimodal contrastive term of stage 1: product "
                                           "embeddings (multimodal projection of the grounded [CLS]) against the "
                                           "batch's title and image embeddings; 0 = ITC + ITM only (the paper)", "1")
    stage2_batch_size: int = _f(128, "product-query tuples per stage-2 step", "2", min=1)
    stage2_epochs: float = _f(3.0, "passes over the stage-2 tuples", "2")
    stage2_max_steps: int = _f(0, "cap on stage-2 optimizer steps (0 = epochs decide)", "2")
    stage2_eval_every: int = _f(100, "log the PQC losses of fixed training and held-out tuples every K stage-2 steps",
                                "2", min=1)
    stage2_eval_max: int = _f(256, "at most this many tuples (held-out and training) for the logged PQC losses", "2")
    stage2_lr: float = _f(1e-4, "learning rate of the query encoder layers in stage 2", "2")
    stage2_head_lr: float = _f(1e-3, "learning rate of the multimodal and query projections in stage 2", "2")
    pqc_tau: float = _f(0.05, "PQC temperature", "2")
    pqc_in_batch_weight: float = _f(1.0, "weight of the in-batch product<->positive-query contrast added to PQC "
                                         "(temperature --pqc-tau); 0 = PQC only (the paper)", "2")
    pqc_in_batch_popularity: float = _f(1.0, "how much of product popularity the in-batch contrast keeps: each "
                                             "product's query->product logits are lowered by this times the log of "
                                             "its share of the tuples (sampling-bias correction of in-batch "
                                             "negatives); 1 = retrieval learns P(product | query), frequently "
                                             "labelled products included; 0 = popularity cancels out (a product is "
                                             "a negative as often as it is a positive)", "2", min=0.0)
    pqc_negatives: int = _f(10, "negative queries per tuple", "2", min=1)
    query_side_negatives: int = _f(10, "per tuple, products its positive query ranks lower in the relevance labels "
                                       "(IR, and MR under an HR positive), contrasted with the tuple's product for "
                                       "that query (temperature --pqc-tau): the order retrieval ranks in; 0 = PQC "
                                       "only (the paper)", "2", min=0)
    pqc_query_typo_rate: float = _f(0.0, "typo augmentation of the query side: each step, each distinct positive "
                                         "query of the batch gets, with this probability, one character-level typo "
                                         "(two adjacent letters swapped, or a letter dropped, doubled or replaced, "
                                         "in one word of >= 3 letters; drawn from --seed and the step), so the query "
                                         "encoder learns misspelled queries; the held-out losses, export and "
                                         "evaluation read the queries as labelled; 0 = no augmentation (the paper)",
                                    "2", min=0.0, max=1.0)
    pqc_title_query_rate: float = _f(0.0, "title-span queries: each step, each tuple's positive query is replaced, "
                                          "with this probability, by 1-3 consecutive words of its product's title "
                                          "(drawn from --seed and the step; no query-side negatives for it), so the "
                                          "query encoder learns every catalog word, brands no training query names "
                                          "included; 0 = off (the paper)", "2", min=0.0, max=1.0)
    pqc_title_query_context: bool = _f(False, "title-span queries keep the words of the replaced query that its "
                                              "product's title lacks (modifiers such as '6 pack', 'in stock', 'for "
                                              "home'), after the span, so a new brand is learnt in the company of the "
                                              "words real queries put beside it", "2")
    pqc_title_query_brand_share: float = _f(0.0, "share of the title-span queries that are their product's brand "
                                                 "(the catalog's `brand` column; a product whose brand is null keeps "
                                                 "its span) instead of a span, so brand-only queries ('sozisk', "
                                                 "'babury bulk') are learnt for every brand; 0 = spans only", "2",
                                            min=0.0, max=1.0)
    pqc_max_positives: int = _f(110, "at most this many positive queries per product", "2")
    pqc_hr_mr_ratio: float = _f(2.0, "HR:MR ratio among sampled positives", "2")
    query_eval_fraction: float = _f(0.2, "share of distinct queries held out of stage 2 (for evaluation)", "2",
                                    min=0.0, lt=1.0)
    cold_product_fraction: float = _f(0.1, "share of products (stratified by aisle, seeded by --seed) held out of "
                                           "both stages, catalog rows and relevance pairs, for the cold-start "
                                           "evaluation; 0 = train on every product", "1", min=0.0, lt=1.0)

    def check(self) -> None:
        super().check()
        if self.pqc_title_query_rate == 0 and (self.pqc_title_query_context or self.pqc_title_query_brand_share > 0):
            raise UserError("--pqc-title-query-context and --pqc-title-query-brand-share shape title-span queries: "
                            "they need --pqc-title-query-rate > 0")

    def settings(self, upto: str) -> dict[str, Any]:
        """The settings that determine the outputs of stage ``upto`` ("1" or "2")."""
        stages = {"model", "1"} if upto == "1" else {"model", "1", "2"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("stage") in stages}


# what a run recorded before a setting existed trained with
SETTINGS_BEFORE_RECORDED = {"pooling": "cls", "cross_attention": "plain"}


def model_config_from(settings: dict[str, Any]) -> DashCLIPConfig:
    """The :class:`DashCLIPConfig` recorded in a run's ``config.json``."""
    names = {f.name for f in dataclasses.fields(DashCLIPConfig)}
    return DashCLIPConfig(**{**SETTINGS_BEFORE_RECORDED, **{k: v for k, v in settings.items() if k in names}})


@dataclass
class EncodeConfig:
    """Embed a catalog file or a list of queries with a DashCLIP checkpoint."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory holding embeddings/"})
    kind: Literal["product", "image", "text", "query"] = field(
        default="product", metadata={"help": "product (multimodal), image, text (title) or query"})
    input: str = field(default="", metadata={"help": "catalog-schema Parquet (product/image/text) or a text/"
                                                     "Parquet file of queries (one per line / a `query` column)"})
    out: str = field(default="", metadata={"help": "output Parquet: key column + vector"})
    which: Literal["trained", "untuned"] = field(default="trained", metadata={"help": "trained checkpoint or the "
                                                                                      "untrained initialisation"})
    device: Device = field(default="auto", metadata={"help": "device"})
    batch_size: int = field(default=64, metadata={"help": "inputs per forward pass"})
    precision: Precision = field(default="auto", metadata={"help": PRECISION_HELP})
    workers: int = field(default=0, metadata={"help": WORKERS_HELP, "min": 0})


@dataclass
class TableExportConfig:
    """Export the frozen product and query tables from the trained DashCLIP checkpoint."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory"})
    device: Device = field(default="auto", metadata={"help": "device"})
    batch_size: int = field(default=64, metadata={"help": "inputs per forward pass"})
    precision: Precision = field(default="auto", metadata={"help": PRECISION_HELP})
    workers: int = field(default=0, metadata={"help": WORKERS_HELP, "min": 0})
    force: bool = field(default=False, metadata={"help": "re-export even if the tables were made from the same "
                                                           "checkpoint, data and settings"})


@dataclass
class EmbeddingsBenchConfig:
    """Throughput of DashCLIP training and inference on random inputs (prints a table)."""

    backbone: Literal["mini", "blip-base", "tiny"] = field(default="mini", metadata={
        "help": "mini (MiniLM + EfficientNet-Lite0), blip-base (BLIP-base shapes, random weights), tiny"})
    device: Device = field(default="auto", metadata={"help": "device"})
    dtype: Literal["bf16", "fp32"] = field(default="fp32", metadata={"help": "autocast dtype (bf16 on CPU too)"})
    batch_size: int = field(default=32, metadata={"help": "pairs / tuples / inputs per step"})
    image_size: int = field(default=0, metadata={"help": "image side (0 = 96 for mini/tiny, 384 for blip-base)"})
    title_tokens: int = field(default=24, metadata={"help": "tokens per title"})
    query_tokens: int = field(default=8, metadata={"help": "tokens per query"})
    negatives: int = field(default=10, metadata={"help": "negative queries per stage-2 tuple"})
    freeze_fraction: float = field(default=0.67, metadata={"help": "share of first layers frozen"})
    steps: int = field(default=5, metadata={"help": "timed steps per measurement (after warm-up)"})
    warmup: int = field(default=2, metadata={"help": "untimed warm-up steps"})
    threads: int = threads_field()
    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "bench.json is written to DIR/embeddings/"})
    inference_only: bool = field(default=False, metadata={"help": "skip the training and model-only measurements: "
                                                                  "only the end-to-end encoder comparison"})
    encode_products: int = field(default=512, metadata={
        "help": "products of the end-to-end encoder comparison (decode, tokenise, encode; each precision against "
                "fp32, same run): the first rows of DIR/data/catalog.parquet when it exists, else synthetic packshots; "
                "0 = skip"})
    encode_queries: int = field(default=2048, metadata={
        "help": "queries of the encoder comparison (DIR's relevance queries when present, else made from the titles)"})
    encode_batch_size: int = field(default=64, metadata={"help": "batch size of the encoder comparison (export's "
                                                                 "default)"})
    encode_rounds: int = field(default=3, metadata={"help": "alternating rounds of the precisions in the encoder "
                                                            "comparison (medians are reported)"})
    encode_precisions: list[str] = field(default_factory=lambda: ["fast", "bf16"], metadata={
        "help": "precisions timed against the fp32 reference in the encoder comparison (fp32 always runs)",
        "choices": list(PRECISIONS)})
    encode_workers: int = field(default=0, metadata={"help": f"encoder comparison: {WORKERS_HELP}", "min": 0})
    checkpoint: Literal["untuned", "trained"] = field(default="untuned", metadata={
        "help": "weights of the encoder comparison: untuned (the --backbone as built, random for blip-base) or "
                "trained (DIR's embeddings checkpoint: its backbone and image size)"})
