"""DashCLIP throughput on random inputs: ``python -m embeddings.bench [--backbone mini] [--device auto]
[--batch-size 32] [--dtype fp32|bf16]``.

Measures, for the current device, batch size and dtype, with the training code's own step
functions (:func:`embeddings.train.stage1_losses`, :func:`embeddings.train.stage2_losses`):

* stage-1 training pairs/s: ITC + hard-negative ITM (3B grounded passes) + multimodal ITC,
  backward, AdamW step;
* stage-2 training tuples/s: PQC with ``1 + negatives`` queries per tuple, frozen product [CLS]
  and frozen query-layer states precomputed (as training caches them per distinct query);
* inference products/s (image encoder + grounded text encoder + multimodal projection) and
  queries/s (query encoder + projection).

``blip-base`` is BLIP-base (ViT-B/16 + BERT-base with cross-attention) with random weights. Prints a
Markdown table and merges the figures into ``DIR/embeddings/bench.json``.
"""
from __future__ import annotations

import contextlib
import functools
import platform
import time
from dataclasses import asdict
from typing import Callable, Sequence

import torch

from common.cli import parse_config, run_main
from common.io import prepare_workdir, read_json, write_json
from embeddings.backbones import TextConfig, TextTransformer, VisionConfig, VisionTransformer
from embeddings.config import BenchConfig, ModelConfig
from embeddings.losses import ITCLoss, ITMLoss, PQCLoss
from embeddings.models import DashCLIP, build_model
from embeddings.train import adamw, resolve_device, stage1_losses, stage2_losses


BLIP_BASE_TEXT = TextConfig(vocab_size=30524, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                            cross_attention_width=768)


def bench_model(cfg: BenchConfig, image_size: int) -> DashCLIP:
    """The model to time: mini/tiny as built for training, blip-base from its config (random)."""
    if cfg.backbone == "blip-base":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = DashCLIP(VisionTransformer(VisionConfig(image_size=image_size)), TextTransformer(BLIP_BASE_TEXT),
                             embed_dim=256)
        model.freeze_first_layers(cfg.freeze_fraction)
        return model
    model, _, _ = build_model(ModelConfig(backbone=cfg.backbone, image_size=image_size,
                                          freeze_fraction=cfg.freeze_fraction))
    return model


def timed(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per call of ``step`` (median-free mean over ``steps`` after ``warmup`` calls)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / steps


def run_bench(cfg: BenchConfig) -> dict[str, dict[str, float]]:
    device = resolve_device(cfg.device)
    image_size = cfg.image_size or (384 if cfg.backbone == "blip-base" else 96)
    model = bench_model(cfg, image_size).to(device)
    vocab = model.text_encoder.cfg.vocab_size
    batch = cfg.batch_size
    precision: Callable[[], contextlib.AbstractContextManager] = (
        functools.partial(torch.autocast, device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16"
        else contextlib.nullcontext)
    gen = torch.Generator(device=device).manual_seed(0)

    def ids(n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(1000, vocab, (n, length), generator=gen, device=device)
        return tokens, torch.ones_like(tokens)

    pixels = torch.randn(batch, 3, image_size, image_size, generator=gen, device=device)
    titles, title_mask = ids(batch, cfg.title_tokens)
    queries, query_mask = ids(batch * (1 + cfg.negatives), cfg.query_tokens)
    same_title = torch.zeros(batch, batch, dtype=torch.bool, device=device)
    itc, itm, mm_itc, pqc = ITCLoss().to(device), ITMLoss(), ITCLoss().to(device), PQCLoss()
    in_batch = ITCLoss(0.05, learnable=False).to(device)
    results: dict[str, dict[str, float]] = {}

    model.train()
    groups = model.stage_parameter_groups(1)
    temperatures = [*itc.parameters(), *mm_itc.parameters()]
    opt1 = adamw([{"params": groups["encoder"] + groups["new"] + temperatures, "lr": 1e-5}], 0.05, device)

    def stage1_step() -> None:
        losses = stage1_losses(model, itc, itm, mm_itc, pixels, titles, title_mask, same_title, gen, precision)
        opt1.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt1.step()

    seconds = timed(stage1_step, cfg.warmup, cfg.steps, device)
    results["stage 1 train (ITC+ITM+mm-ITC)"] = {"ms_per_step": 1e3 * seconds, "per_s": batch / seconds, "unit": "pairs"}
    del opt1
    with torch.no_grad(), precision():
        product_cls = model.product_cls(titles, title_mask, pixels, torch.ones(batch, dtype=torch.bool, device=device))
    product_cls = product_cls.float()
    groups = model.stage_parameter_groups(2)
    opt2 = adamw([{"params": groups["encoder"] + groups["new"], "lr": 1e-5}], 0.05, device)

    cached = model.frozen_layers.get("query_encoder", 0) > 0
    with torch.no_grad(), precision():  # stage 2 computes the frozen query layers once per distinct query
        query_prefix = model.query_prefix_states(queries, query_mask).float() if cached else None

    def stage2_step() -> None:
        prefix = query_prefix if cached else model.query_prefix_states(queries, query_mask)
        loss = sum(stage2_losses(model, pqc, in_batch, product_cls, prefix, query_mask, precision).values())
        opt2.zero_grad(set_to_none=True)
        loss.backward()
        opt2.step()

    seconds = timed(stage2_step, cfg.warmup, cfg.steps, device)
    results["stage 2 train (PQC+in-batch)"] = {"ms_per_step": 1e3 * seconds, "per_s": batch / seconds, "unit": "tuples"}
    del opt2
    model.eval()
    query_batch, query_batch_mask = queries[:batch], query_mask[:batch]
    has_image = torch.ones(batch, dtype=torch.bool, device=device)

    @torch.no_grad()
    def products() -> None:
        with precision():
            model.product_embedding_from_cls(model.product_cls(titles, title_mask, pixels, has_image))

    @torch.no_grad()
    def query_step() -> None:
        with precision():
            model.query_embedding(query_batch, query_batch_mask)

    for name, fn, unit in (("inference products", products, "products"), ("inference queries", query_step, "queries")):
        seconds = timed(fn, cfg.warmup, cfg.steps, device)
        results[name] = {"ms_per_step": 1e3 * seconds, "per_s": batch / seconds, "unit": unit}
    return results


def markdown(cfg: BenchConfig, device: torch.device, results: dict[str, dict[str, float]]) -> str:
    head = (f"DashCLIP bench: backbone {cfg.backbone}, device {device} ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads), dtype {cfg.dtype}, batch {cfg.batch_size}, "
            f"{cfg.title_tokens}-token titles, {cfg.query_tokens}-token queries, {cfg.negatives} negatives")
    lines = [head, "", "| measurement | ms/step | throughput |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['ms_per_step']:.1f} | {r['per_s']:.1f} {r['unit']}/s |" for name, r in results.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    cfg = parse_config(BenchConfig, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    results = run_bench(cfg)
    print(markdown(cfg, device, results))
    out = prepare_workdir(cfg.workdir, "embeddings") / "embeddings" / "bench.json"
    recorded = read_json(out) if out.exists() else {}
    key = f"{cfg.backbone}/{device.type}/{cfg.dtype}/batch{cfg.batch_size}/threads{torch.get_num_threads()}"
    recorded[key] = {"config": asdict(cfg), "results": results}
    write_json(recorded, out)
    return results


if __name__ == "__main__":
    run_main(main)
