"""Embed products, images, titles or queries with a DashCLIP checkpoint.

Python API (what ``embeddings.evaluate`` and ``embeddings.export`` use)::

    encoder = load_encoder(workdir, "trained")      # or "untuned": same architecture, before training
    encoder.products(catalog_df)   # multimodal product vectors (grounded [CLS] -> multimodal proj);
                                   # image_out=array: the image-only vectors too, from the same pass
    encoder.images(catalog_df)     # image-only vectors (zeros for products without an image)
    encoder.texts(titles)          # title-only vectors (plain text encoder)
    encoder.queries(queries)       # query vectors (queries normalised first)

Each returns float32 ``[N, d]``, L2-normalised, in input order. Inputs run in batches of similar
length (titles or queries sorted by token count, padded per batch, outputs put back in input order).

Precision (``load_encoder(..., precision=...)``, ``--precision``): ``auto`` (the default) is ``bf16``
on a CPU with bf16 instructions and ``fast`` elsewhere. ``fast`` runs
:meth:`embeddings.models.DashCLIP.inference_copy` under ``torch.inference_mode``: BatchNorm folded
into the EfficientNet convolutions with ReLU6 and residual additions fused (oneDNN) on
channels-last images in chunks, every matrix product of the text and query encoders through
oneDNN (query/key/value as one product, GELU and residual additions fused; torch's float32 CPU
path is MKL, half as fast on the AMD CPUs measured), attention without a mask for batches without
padding (and bf16 autocast on CUDA). ``bf16`` runs the same copy with its convolutions and matrix
products in bfloat16 on CPU (float32 accumulation; LayerNorm, softmax, the residual stream and the
projections in float32): about 1.5x ``fast`` where the CPU has bf16 instructions (AVX512-BF16,
AMX). ``fp32`` runs the model as trained in float32 (on CUDA too): the reference. On CPU ``fast``
agrees with it to a cosine above 0.9999 per vector and ``bf16`` above 0.999 (the contract;
0.99998 on the demo tables); ``python -m embeddings.bench`` measures all three.

Threads (``workers``, ``--workers``): on CPU the batches run on worker threads, by default up to
one per torch thread with each batch single-threaded (two cores: two batches at once). The
encoders' operators are small (titles of ~12 tokens), and splitting each of them over threads
costs more than it gains, the more so when other processes share the cores. Every precision is
deterministic run to run for the same inputs, batch size, thread count and workers; with the
default workers the vectors are those of a single-threaded run, whatever the thread count.

Command line, for new products or queries without retraining::

    python -m embeddings.encode --workdir DIR --kind product --input new_catalog.parquet --out vecs.parquet
    python -m embeddings.encode --workdir DIR --kind query --input queries.txt --out qvecs.parquet

An existing ``--out`` file is left untouched (exit 2) unless ``--force`` is given.
"""
from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from common.cli import UserError, parse_config, run_main
from common.io import file_sha256, read_json, write_parquet
from data import schema
from data.text import normalize_query
from embeddings.config import PRECISIONS, DashCLIPConfig, EncodeConfig, Precision, model_config_from
from embeddings.inputs import ImageSpec, ImageStore, TokenStore, length_sorted_batches
from embeddings.models import DashCLIP, build_dashclip
from embeddings.runtime import Paths, autocast, load_checkpoint, resolve_device, resolve_precision

log = logging.getLogger(__name__)

CATALOG_COLUMNS = ("product_id", "title", "image")
TEXT_BATCH_FACTOR = 4


@dataclass
class EncodeCommandConfig(EncodeConfig):
    """Embed a catalog file or queries into a Parquet file (replacing an existing --out only with --force)."""

    force: bool = field(default=False, metadata={"help": "overwrite --out if it exists"})


class DashEncoder:
    """A DashCLIP model in eval mode with its tokenizer and image preprocessing.

    Attributes:
        model: the model as loaded (eval mode).
        net: what computes the vectors: ``model.inference_copy()`` for precisions ``fast`` and
            ``bf16``, else ``model``.
        source: a description of the weights (checkpoint path and hash, or "untuned ...").
        workers: batches encoded at once on CPU (see :meth:`workers_for`).
    """

    def __init__(self, model: DashCLIP, tokenizer, spec: ImageSpec, cfg: DashCLIPConfig, device: torch.device,
                 source: str, batch_size: int = 64, precision: Precision = "auto", workers: int = 0) -> None:
        precision = resolve_precision(precision, device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be 'auto' or one of {PRECISIONS}, got {precision!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.model = model.to(device).eval()
        self.net = (self.model.inference_copy(torch.bfloat16 if precision == "bf16" else torch.float32)
                    if precision in ("fast", "bf16") else self.model)
        self.tokenizer, self.spec, self.cfg, self.device = tokenizer, spec, cfg, device
        self.source, self.batch_size, self.precision, self.workers = source, batch_size, precision, workers

    @property
    def dim(self) -> int:
        return self.model.text_proj.out_features

    @property
    def _fast(self) -> bool:
        return self.precision in ("fast", "bf16")

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA for the fast and bf16 paths; none otherwise (on CPU the bf16 path
        holds its own bf16 weights)."""
        return autocast(self.device) if self._fast else contextlib.nullcontext()

    def workers_for(self, n_batches: int) -> tuple[int, int]:
        """``(workers, threads per worker)`` for ``n_batches`` batches.

        On CPU the batches run on up to ``workers`` threads at once, each batch with
        ``torch.get_num_threads() // workers`` intra-op threads. ``workers=0`` (the default) takes up
        to one worker per torch thread and runs every batch single-threaded: on 2 cores faster than
        splitting each of the many small operators of a batch over 2 threads (far faster when other
        processes share the cores: no thread waits at a barrier for a descheduled partner), and the
        vectors are the bytes of a single-threaded run whatever the thread count (a 1-thread server
        and a 2-thread test process encode the same batch to the same bytes). On CUDA batches run
        one at a time."""
        threads = torch.get_num_threads()
        if self.device.type != "cpu":
            return 1, threads
        if self.workers == 0:
            return max(1, min(threads, n_batches)), 1
        return max(1, min(self.workers, threads, n_batches)), max(1, threads // min(self.workers, threads))

    def _map_batches(self, batches: list[np.ndarray], encode: Callable[[np.ndarray], torch.Tensor],
                     desc: str, out: np.ndarray) -> np.ndarray:
        """``out`` ``[N, d]`` with ``out[rows] = encode(rows)`` for every batch of rows (under inference
        mode and the precision's autocast), on :meth:`workers_for` threads. Each batch's vectors land
        in ``out`` as it finishes: the output is held once, whatever the number of batches."""
        def run(rows: np.ndarray) -> None:
            with torch.inference_mode(), self._autocast():  # both are thread-local
                out[rows] = encode(rows).float().cpu().numpy()

        workers, per_worker = self.workers_for(len(batches))
        threads = torch.get_num_threads()
        try:
            if workers == 1:
                if per_worker != threads:
                    torch.set_num_threads(per_worker)
                for rows in self._progress(batches, desc):
                    run(rows)
                return out
            with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(per_worker,)) as pool:
                futures = [pool.submit(run, rows) for rows in batches]
                for future in self._progress(as_completed(futures), desc, total=len(futures)):
                    if future.exception() is not None:  # e.g. an image that does not decode: stop early
                        for other in futures:
                            other.cancel()
                        break
            failed = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
            if failed:
                raise failed[0]  # the first failing batch in batch order
            return out
        finally:
            if torch.get_num_threads() != threads or workers > 1:
                torch.set_num_threads(threads)  # in a worker it also changes the default of new threads

    @staticmethod
    def _progress(batches: Iterable, desc: str, total: int | None = None) -> tqdm:
        return tqdm(batches, desc=desc, unit="batch", mininterval=1.0, leave=False, total=total)

    @staticmethod
    def _check_catalog(catalog: pd.DataFrame) -> None:
        missing = [c for c in CATALOG_COLUMNS if c not in catalog.columns]
        if missing:
            raise ValueError(f"catalog frame: missing column(s) {missing}; found {list(catalog.columns)}")

    def _stores(self, catalog: pd.DataFrame) -> tuple[ImageStore, TokenStore]:
        self._check_catalog(catalog)
        images = ImageStore(catalog["image"].tolist(), catalog["product_id"].tolist(), self.spec, cache_mb=0)
        titles = TokenStore(self.tokenizer, catalog["title"].astype(str).tolist(), self.cfg.title_max_tokens)
        return images, titles

    def _pixels(self, images: ImageStore, rows: np.ndarray) -> torch.Tensor:
        return images.pixels(rows, channels_last=self.net.reads_channels_last).to(self.device)

    def products(self, catalog: pd.DataFrame, out: np.ndarray | None = None,
                 image_out: np.ndarray | None = None) -> np.ndarray:
        """Multimodal product vectors ``[N, d]`` (into ``out`` when given). Products without an image
        use the text-only path (the text encoder without image tokens, then the multimodal projection).
        With ``image_out`` (float32 ``[N, d]``) the image-only vectors of :meth:`images` are written
        there too, from the same pass over the images (rows without an image are left as they are)."""
        images, titles = self._stores(catalog)
        n_text_only = int((~images.has_image).sum())
        if n_text_only:
            log.info("%d of %d products have no image: their vectors come from the title alone (text encoder "
                     "without image tokens + multimodal projection)", n_text_only, len(images))
        if image_out is not None:
            self._output(image_out, len(images))

        def encode(rows: np.ndarray) -> torch.Tensor:
            has_image = images.has_image[rows]
            tokens = self.net.image_tokens(self._pixels(images, rows[has_image])) if has_image.any() else None
            if image_out is not None and tokens is not None:
                image_out[rows[has_image]] = self.net.image_embedding(tokens.float()).float().cpu().numpy()
            ids, mask = (t.to(self.device) for t in titles.batch(rows))
            cls = self.net.product_state_from_tokens(ids, mask, tokens, torch.as_tensor(has_image, device=self.device))
            return self.net.product_embedding_from_state(cls.float())

        batches = length_sorted_batches(titles.lengths, self.batch_size)
        return self._map_batches(batches, encode, "products", self._output(out, len(titles)))

    def images(self, catalog: pd.DataFrame) -> np.ndarray:
        """Image-only vectors ``[N, d]``; rows of products without an image are zeros."""
        images, _ = self._stores(catalog)
        out = np.zeros((len(images), self.dim), np.float32)
        with_image = np.flatnonzero(images.has_image)
        if len(with_image) < len(images):
            log.warning("%d of %d products have no image: their image vectors are zeros",
                        len(images) - len(with_image), len(images))

        def encode(rows: np.ndarray) -> torch.Tensor:
            return self.net.image_embedding(self.net.image_tokens(self._pixels(images, rows)).float())

        batches = [with_image[start:start + self.batch_size] for start in range(0, len(with_image), self.batch_size)]
        return self._map_batches(batches, encode, "images", out)

    def _output(self, out: np.ndarray | None, rows: int) -> np.ndarray:
        """``out`` (checked: ``[rows, d]`` float32, written in place), or a new array."""
        if out is None:
            return np.empty((rows, self.dim), np.float32)
        if out.shape != (rows, self.dim) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 [{rows}, {self.dim}], got {out.dtype} {out.shape}")
        return out

    def _text_like(self, texts: list[str], max_tokens: int, query: bool, desc: str,
                   out: np.ndarray | None = None) -> np.ndarray:
        """Batches of similar length (little padding), returned in input order."""
        store = TokenStore(self.tokenizer, texts, max_tokens)
        embed = self.net.query_embedding if query else self.net.text_embedding

        def encode(rows: np.ndarray) -> torch.Tensor:
            ids, mask = (t.to(self.device) for t in store.batch(rows))
            return embed(ids, mask).float()

        # text-only inputs are light: larger batches
        batches = length_sorted_batches(store.lengths, TEXT_BATCH_FACTOR * self.batch_size)
        return self._map_batches(batches, encode, desc, self._output(out, len(store)))

    def texts(self, titles: Sequence[str]) -> np.ndarray:
        """Title-only vectors ``[N, d]`` (the plain text encoder and ``text_proj``)."""
        return self._text_like([str(t) for t in titles], self.cfg.title_max_tokens, False, "texts")

    def queries(self, queries: Sequence[str], out: np.ndarray | None = None) -> np.ndarray:
        """Query vectors ``[N, d]`` (into ``out`` when given); each query is normalised with
        :func:`data.text.normalize_query` first."""
        return self._text_like([normalize_query(str(q)) for q in queries], self.cfg.query_max_tokens, True, "queries",
                               out)


def load_encoder(workdir: str | Path, which: Literal["trained", "untuned"] = "trained",
                 device: str | torch.device = "cpu", batch_size: int = 64,
                 precision: Precision = "auto", workers: int = 0) -> DashEncoder:
    """The DashCLIP encoder of a training run in ``workdir``.

    ``trained`` loads ``DIR/embeddings/checkpoints/model.pt``; ``untuned`` builds the same
    architecture and backbone as the run's ``config.json`` at its initialisation (same seed),
    before any training. ``precision``: ``auto`` (``bf16`` on a CPU with bf16 instructions, else
    ``fast``), ``fast`` (fused inference copy), ``bf16`` or ``fp32`` (the reference); see the module
    docstring.
    """
    paths = Paths(Path(workdir))
    device = resolve_device(device) if isinstance(device, str) else device
    if which == "trained":
        path = paths.stage_final(2)
        if not path.exists():
            raise UserError(f"{path}: no trained DashCLIP model (run `python -m embeddings.train --workdir "
                            f"{workdir}` first)")
        state = load_checkpoint(path)
        cfg = model_config_from(state["model_config"])
        model, tokenizer, spec = build_dashclip(cfg)
        model.load_state_dict(state["model"])
        source = f"dashclip:{cfg.backbone}:{path.relative_to(paths.root)}:sha256={file_sha256(path)[:16]}"
    elif which == "untuned":
        if not paths.config.exists():
            raise UserError(f"{paths.config}: no DashCLIP run config (run `python -m embeddings.train --workdir "
                            f"{workdir}` first)")
        cfg = model_config_from(read_json(paths.config))
        model, tokenizer, spec = build_dashclip(cfg)
        source = f"dashclip:{cfg.backbone}:untuned:seed={cfg.seed}"
    else:
        raise ValueError(f"which must be 'trained' or 'untuned', got {which!r}")
    return DashEncoder(model, tokenizer, spec, cfg, device, source, batch_size, precision, workers)


def vector_table(key_name: str, keys: pa.Array, vectors: np.ndarray, source: str) -> pa.Table:
    """A Parquet-ready table: the key column and ``vector`` (fixed_size_list<float32>[d])."""
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), type=pa.float32())
    table = pa.table({key_name: keys, "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})
    return table.replace_schema_metadata({"dashrec.source": source, "dashrec.dim": str(vectors.shape[1])})


def read_queries(path: Path) -> list[str]:
    """Queries from a Parquet file (column ``query``) or a text file (one per line, blanks skipped)."""
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"{path}: not a readable Parquet file: {exc}") from None
        if "query" not in table.column_names:
            raise UserError(f"{path}: column 'query': missing; found {table.column_names}")
        return [str(q) for q in table.column("query").to_pylist() if q is not None]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_catalog_file(path: Path) -> pd.DataFrame:
    """A catalog-schema Parquet file, validated (images are checked when decoded)."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file: {exc}") from None
    try:
        return schema.validate(table, path, "catalog", check_images=False).to_pandas()
    except schema.SchemaError as exc:
        raise UserError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(EncodeCommandConfig, argv)
    if not cfg.input or not cfg.out:  # not a rule of the config: the settings parse without the files
        raise UserError("--input FILE and --out FILE are required")
    source_path, out_path = Path(cfg.input), Path(cfg.out)
    if not source_path.exists():
        raise UserError(f"--input {source_path}: no such file")
    if out_path.is_dir():
        raise UserError(f"--out {out_path}: is a directory; give a file path")
    if os.path.lexists(out_path) and not cfg.force:
        raise UserError(f"--out {out_path}: file exists; pass --force to overwrite it")
    encoder = load_encoder(cfg.workdir, cfg.which, cfg.device, cfg.batch_size, cfg.precision, cfg.workers)
    if cfg.kind == "query":
        queries = [normalize_query(q) for q in read_queries(source_path)]
        vectors = encoder.queries(queries)
        table = vector_table("query", pa.array(queries, pa.string()), vectors, encoder.source)
    else:
        catalog = read_catalog_file(source_path)
        try:
            vectors = {"product": encoder.products, "image": encoder.images,
                       "text": lambda c: encoder.texts(c["title"].tolist())}[cfg.kind](catalog)
        except ValueError as exc:  # an undecodable image names its product
            raise UserError(f"{source_path}: {exc}") from None
        table = vector_table("product_id", pa.array(catalog["product_id"].to_numpy(np.int64)), vectors,
                             f"{encoder.source}:{cfg.kind}")
    write_parquet(table, out_path)
    log.info("wrote %d %s vectors (dim %d) to %s", table.num_rows, cfg.kind, vectors.shape[1], out_path)
    return out_path


if __name__ == "__main__":
    run_main(main)
