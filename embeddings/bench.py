"""DashCLIP throughput on random inputs: ``python -m embeddings.bench [--backbone mini] [--device auto]
[--batch-size 32] [--dtype fp32|bf16]``.

Measures, for the current device, batch size and dtype, with the training code's own step
functions (:func:`embeddings.steps.stage1_losses`, :func:`embeddings.steps.stage2_losses`):

* stage-1 training pairs/s: ITC + hard-negative ITM (3B grounded passes) + multimodal ITC,
  backward, AdamW step;
* stage-2 training tuples/s: PQC with ``1 + negatives`` queries per tuple, frozen product [CLS]
  and frozen query-layer states precomputed (as training caches them per distinct query);
* inference products/s (image encoder + grounded text encoder + multimodal projection) and
  queries/s (query encoder + projection), model only, at ``--dtype``;
* the encoder end to end, as ``embeddings.export`` runs it (:class:`embeddings.encode.DashEncoder`:
  image decoding, tokenisation, length-sorted batches on ``--encode-workers`` threads, encoders,
  projection), precision ``fp32`` (the reference) and each of ``--encode-precisions`` (``fast``,
  ``bf16``) in alternating rounds of the same run: products/s and queries/s (medians), the paired
  speed-up over fp32, the cosine of every vector with its fp32 vector (min and mean: the parity
  contract is a minimum of 0.999) and whether each precision gave byte-identical vectors in every
  round. Inputs: the first
  ``--encode-products`` rows of ``DIR/data/catalog.parquet`` and DIR's relevance queries when they
  exist, else synthetic packshots and titles of :mod:`data.synth`; weights: the untuned
  ``--backbone`` or, with ``--checkpoint trained``, DIR's trained model.

``blip-base`` is BLIP-base (ViT-B/16 + BERT-base with cross-attention) with random weights. Prints
Markdown tables and merges the figures into ``DIR/embeddings/bench.json`` (with the load average
before and after: on a shared machine, compare the ratios of one run).
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from common.cli import parse_config, resolve_threads, run_main
from common.io import prepare_workdir, read_json, write_json
from data import schema
from data.text import normalize_query
from embeddings.backbones import (CLIP_MEAN, CLIP_STD, TextConfig, TextTransformer, VisionConfig, VisionTransformer,
                                  load_tokenizer, minilm_path)
from embeddings.config import DashCLIPConfig, EmbeddingsBenchConfig
from embeddings.encode import DashEncoder, load_encoder
from embeddings.inputs import ImageSpec
from embeddings.losses import ITCLoss, ITMLoss, PQCLoss
from embeddings.models import DashCLIP, build_dashclip
from embeddings.runtime import cpu_bf16_instructions, resolve_device
from embeddings.steps import adamw, stage1_losses, stage2_losses


BLIP_BASE_TEXT = TextConfig(vocab_size=30524, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                            cross_attention_width=768)


def bench_model(cfg: EmbeddingsBenchConfig, image_size: int) -> tuple[DashCLIP, Any, ImageSpec]:
    """The model to time with its tokenizer and image spec: mini/tiny as built for training,
    blip-base from its config (random weights, MiniLM's uncased WordPiece tokenizer, CLIP's pixel
    normalisation)."""
    if cfg.backbone == "blip-base":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = DashCLIP(VisionTransformer(VisionConfig(image_size=image_size)), TextTransformer(BLIP_BASE_TEXT),
                             embed_dim=256)
        model.freeze_first_layers(cfg.freeze_fraction)
        return model, load_tokenizer(minilm_path()), ImageSpec(image_size, CLIP_MEAN, CLIP_STD)
    return build_dashclip(DashCLIPConfig(backbone=cfg.backbone, image_size=image_size,
                                      freeze_fraction=cfg.freeze_fraction))


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


def bench_model_steps(cfg: EmbeddingsBenchConfig) -> dict[str, dict[str, float]]:
    device = resolve_device(cfg.device)
    image_size = cfg.image_size or (384 if cfg.backbone == "blip-base" else 96)
    model = bench_model(cfg, image_size)[0].to(device)
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
        product_state = model.product_state(titles, title_mask, pixels, torch.ones(batch, dtype=torch.bool, device=device))
    product_state = product_state.float()
    groups = model.stage_parameter_groups(2)
    opt2 = adamw([{"params": groups["encoder"] + groups["new"], "lr": 1e-5}], 0.05, device)

    cached = model.frozen_layers.get("query_encoder", 0) > 0
    with torch.no_grad(), precision():  # stage 2 computes the frozen query layers once per distinct query
        query_prefix = model.query_prefix_states(queries, query_mask).float() if cached else None

    def stage2_step() -> None:
        prefix = query_prefix if cached else model.query_prefix_states(queries, query_mask)
        loss = sum(stage2_losses(model, pqc, in_batch, product_state, prefix, query_mask, precision).values())
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
            model.product_embedding_from_state(model.product_state(titles, title_mask, pixels, has_image))

    @torch.no_grad()
    def query_step() -> None:
        with precision():
            model.query_embedding(query_batch, query_batch_mask)

    for name, fn, unit in (("inference products", products, "products"), ("inference queries", query_step, "queries")):
        seconds = timed(fn, cfg.warmup, cfg.steps, device)
        results[name] = {"ms_per_step": 1e3 * seconds, "per_s": batch / seconds, "unit": unit}
    return results


# ------------------------------------------------------------------ encoder end to end: fp32 vs fast
def _queries_from_titles(titles: Sequence[str], n: int) -> list[str]:
    """``n`` query-like strings: 1-4 consecutive words of the titles (seeded)."""
    rng = np.random.default_rng(0)
    words = [normalize_query(t).split() or ["item"] for t in titles]
    out = []
    for i in range(n):
        w = words[i % len(words)]
        k = int(rng.integers(1, min(4, len(w)) + 1))
        start = int(rng.integers(0, len(w) - k + 1))
        out.append(" ".join(w[start:start + k]))
    return out


def encoder_inputs(cfg: EmbeddingsBenchConfig, image_size: int) -> tuple[pd.DataFrame, list[str], str]:
    """``(catalog [product_id, title, image], queries, description)`` for the encoder comparison."""
    workdir = Path(cfg.workdir)
    catalog_path = schema.table_path(workdir, "catalog")
    if catalog_path.exists():
        table = pq.read_table(catalog_path, columns=["product_id", "title", "image"]).slice(0, cfg.encode_products)
        catalog, source = table.to_pandas(), str(catalog_path)
    else:
        # only without a catalog: synthetic packshots
        from data.synth.catalog import build_catalog, catalog_batch
        from data.synth.config import PROFILES, ClickModel

        profile = PROFILES["tiny"]
        made = build_catalog(profile.scaled(max(1.0, cfg.encode_products / profile.n_products)), 0, ClickModel())
        n = min(cfg.encode_products, len(made.product_id))
        catalog = catalog_batch(made, 0, n, image_size).select(["product_id", "title", "image"]).to_pandas()
        source = f"synthetic packshots of data.synth ({image_size} px)"
    queries: list[str] = []
    relevance_path = schema.table_path(workdir, "relevance")
    if relevance_path.exists():
        column = pq.read_table(relevance_path, columns=["query"]).column("query")
        queries = sorted({normalize_query(q) for q in pc.unique(column).to_pylist() if q is not None} - {""})
        queries = queries[:cfg.encode_queries]
    if len(queries) < cfg.encode_queries:
        queries += _queries_from_titles(catalog["title"].astype(str).tolist(), cfg.encode_queries - len(queries))
    return catalog, queries, source


def compare_encoders(cfg: EmbeddingsBenchConfig, device: torch.device, image_size: int) -> dict[str, Any]:
    """The end-to-end encoder at each precision of ``--encode-precisions`` against fp32, alternating
    rounds (see the module docstring)."""
    if cfg.checkpoint == "trained":
        loaded = load_encoder(cfg.workdir, "trained", device, cfg.encode_batch_size, "fp32")
        model, tokenizer, spec, model_cfg = loaded.model, loaded.tokenizer, loaded.spec, loaded.cfg
        source = loaded.source
    else:
        model, tokenizer, spec = bench_model(cfg, image_size)
        model_cfg = DashCLIPConfig(image_size=spec.size)
        source = f"untuned {cfg.backbone}"
    precisions = ["fp32", *dict.fromkeys(p for p in cfg.encode_precisions if p != "fp32")]
    encoders = {precision: DashEncoder(model, tokenizer, spec, model_cfg, device, source, cfg.encode_batch_size,
                                       precision, cfg.encode_workers) for precision in precisions}
    catalog, queries, inputs = encoder_inputs(cfg, spec.size)
    work = {"products": (len(catalog), lambda e: e.products(catalog)),
            "queries": (len(queries), lambda e: e.queries(queries))}
    for encoder in encoders.values():  # untimed warm-up: one batch of each
        encoder.products(catalog.iloc[:cfg.encode_batch_size])
        encoder.queries(queries[:cfg.encode_batch_size])
    load_before = os.getloadavg()
    wall: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    first: dict[tuple[str, str], np.ndarray] = {}
    same = {precision: True for precision in precisions}
    for _ in range(max(1, cfg.encode_rounds)):
        for precision, encoder in encoders.items():
            for kind, (_, run) in work.items():
                started, cpu_started = time.perf_counter(), time.process_time()
                vectors = run(encoder)
                wall.setdefault((precision, kind), []).append(time.perf_counter() - started)
                cpu.setdefault((precision, kind), []).append(time.process_time() - cpu_started)
                if (precision, kind) in first:
                    same[precision] = same[precision] and vectors.tobytes() == first[precision, kind].tobytes()
                else:
                    first[precision, kind] = vectors
    workers, per_worker = encoders["fp32"].workers_for(2 ** 30)
    summary: dict[str, Any] = {"inputs": inputs, "weights": source, "n_products": len(catalog),
                               "n_queries": len(queries), "batch_size": cfg.encode_batch_size,
                               "rounds": max(1, cfg.encode_rounds), "threads": torch.get_num_threads(),
                               "workers": workers, "threads_per_worker": per_worker, "precisions": precisions,
                               "cpu_bf16_instructions": cpu_bf16_instructions(),
                               "deterministic": same, "load_average_before": [round(x, 2) for x in load_before],
                               "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    for kind, (n, _) in work.items():
        rows: dict[str, Any] = {}
        for precision in precisions:
            cos = np.sum(first["fp32", kind] * first[precision, kind], axis=1) if n else np.ones(1)
            rows[precision] = {
                "per_s": n / statistics.median(wall[precision, kind]),
                "cpu_ms_per_item": 1e3 * statistics.median(cpu[precision, kind]) / max(n, 1),
                "speedup": statistics.median(f / q for f, q in zip(wall["fp32", kind], wall[precision, kind])),
                "cpu_speedup": statistics.median(f / q for f, q in zip(cpu["fp32", kind], cpu[precision, kind])),
                "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
                "wall_s": [round(x, 4) for x in wall[precision, kind]]}
        summary[kind] = rows
    return summary


def markdown(cfg: EmbeddingsBenchConfig, device: torch.device, results: dict[str, dict[str, float]],
             comparison: dict[str, Any] | None = None) -> str:
    head = (f"DashCLIP bench: backbone {cfg.backbone}, device {device} ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads), dtype {cfg.dtype}, batch {cfg.batch_size}, "
            f"{cfg.title_tokens}-token titles, {cfg.query_tokens}-token queries, {cfg.negatives} negatives")
    lines = [head]
    if results:
        lines += ["", "| measurement | ms/step | throughput |", "|---|---:|---:|"]
        lines += [f"| {name} | {r['ms_per_step']:.1f} | {r['per_s']:.1f} {r['unit']}/s |" for name, r in results.items()]
    if comparison:
        c = comparison
        lines += ["", f"Encoder end to end ({c['weights']}; {c['n_products']} products and {c['n_queries']} queries "
                      f"from {c['inputs']}; batch {c['batch_size']}; {c['threads']} threads: {c['workers']} "
                      f"worker(s) x {c['threads_per_worker']} thread(s); CPU bf16 instructions: "
                      f"{c['cpu_bf16_instructions']}; medians of {c['rounds']} alternating rounds; "
                      f"load average {c['load_average_before'][0]:.2f} before, {c['load_average_after'][0]:.2f} after)",
                  "", "| precision | products/s | queries/s | speed-up vs fp32 (wall), products / queries | "
                      "speed-up (CPU time) | cosine with fp32, min (products / queries) | cosine mean | "
                      "byte-identical every round |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for precision in c["precisions"]:
            p, q = c["products"][precision], c["queries"][precision]
            lines.append(f"| {precision} | {p['per_s']:.1f} | {q['per_s']:.1f} | {p['speedup']:.2f}x / "
                         f"{q['speedup']:.2f}x | {p['cpu_speedup']:.2f}x / {q['cpu_speedup']:.2f}x | "
                         f"{p['cos_min']:.7f} / {q['cos_min']:.7f} | {p['cos_mean']:.7f} / {q['cos_mean']:.7f} | "
                         f"{'yes' if c['deterministic'][precision] else 'NO'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    cfg = parse_config(EmbeddingsBenchConfig, argv)
    torch.set_num_threads(resolve_threads(cfg.threads))
    device = resolve_device(cfg.device)
    results = {} if cfg.inference_only else bench_model_steps(cfg)
    image_size = cfg.image_size or (384 if cfg.backbone == "blip-base" else 96)
    comparison = compare_encoders(cfg, device, image_size) if cfg.encode_products > 0 else None
    print(markdown(cfg, device, results, comparison))
    out = prepare_workdir(cfg.workdir, "embeddings") / "embeddings" / "bench.json"
    recorded = read_json(out) if out.exists() else {}
    backbone = "trained" if cfg.checkpoint == "trained" else cfg.backbone
    key = f"{backbone}/{device.type}/{cfg.dtype}/batch{cfg.batch_size}/threads{torch.get_num_threads()}"
    entry = dict(recorded.get(key, {})) if cfg.inference_only else {}
    entry["config"] = asdict(cfg)
    if not cfg.inference_only:
        entry["results"] = results
    if comparison is not None:
        entry["encoder"] = comparison
    recorded[key] = entry
    write_json(recorded, out)
    return results


if __name__ == "__main__":
    run_main(main)
