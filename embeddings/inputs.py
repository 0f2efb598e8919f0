"""Model inputs: decoded, resized, normalised product images and tokenised text, batched.

Images are decoded once with PIL, padded to a square on white (product photos sit on white),
resized to ``S x S`` and kept as ``uint8`` in memory up to a budget; :meth:`ImageStore.pixels`
turns a batch into normalised float pixels ``[B, 3, S, S]``. Text is tokenised once per distinct
string and padded per batch to its longest member. Bytes that do not decode raise
:class:`data.schema.SchemaError` naming the catalog file, the column ``image`` and the product_id.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps

from data.schema import SchemaError, load_image


@dataclass(frozen=True)
class ImageSpec:
    """How an image encoder wants its pixels: side, per-channel mean and std (on [0, 1] values)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def decode_image_hwc(blob: bytes, size: int) -> torch.Tensor:
    """PNG/JPEG bytes -> ``uint8`` ``[size, size, 3]`` (aspect kept, padded with white; pixel order
    as decoded, no copy into channels-first).

    Raises ``ValueError`` with a one-line reason when the bytes do not decode."""
    img = load_image(blob)
    if img.size != (size, size):  # ImageOps.pad returns a same-size image unchanged
        img = ImageOps.pad(img, (size, size), method=Image.Resampling.BICUBIC, color=(255, 255, 255))
    return torch.from_numpy(np.array(img, dtype=np.uint8))


def decode_image(blob: bytes, size: int) -> torch.Tensor:
    """PNG/JPEG bytes -> ``uint8`` ``[3, size, size]`` (aspect kept, padded with white).

    Raises ``ValueError`` with a one-line reason when the bytes do not decode."""
    return decode_image_hwc(blob, size).permute(2, 0, 1).contiguous()


class ImageStore:
    """Images of a catalog, decoded lazily and cached as ``uint8``.

    Args:
        blobs: encoded image bytes per product (None = no image).
        product_ids: the products' ids (named in errors).
        spec: target size and normalisation.
        cache_mb: memory budget of the decoded cache (images beyond it are decoded on every use).
        source: the file the blobs come from (named in errors), e.g. ``schema.table_path(workdir, "catalog")``.

    Raises :class:`~data.schema.SchemaError` (one line: file, column ``image``, row, product_id)
    when a blob does not decode.
    """

    def __init__(self, blobs: Sequence[bytes | None], product_ids: Sequence[int], spec: ImageSpec,
                 cache_mb: int = 2048, source: str | Path = "catalog.parquet") -> None:
        self.blobs = list(blobs)
        self.product_ids = list(product_ids)
        self.spec = spec
        self.source = source
        self.has_image = np.array([b is not None for b in self.blobs], dtype=bool)
        per_image = 3 * spec.size * spec.size
        self.cache_capacity = max(0, cache_mb * 2**20 // per_image)
        self._cache: dict[int, torch.Tensor] = {}  # index -> uint8 [S, S, 3]
        self._mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.blobs)

    def _decoded(self, index: int) -> torch.Tensor:
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        blob = self.blobs[index]
        if blob is None:
            raise ValueError(f"product_id {self.product_ids[index]} has no image")
        try:
            image = decode_image_hwc(blob, self.spec.size)
        except ValueError as exc:
            raise SchemaError(self.source, "image", f"cannot decode the image at row {index} "
                                                    f"(product_id {self.product_ids[index]}): {exc}") from None
        if len(self._cache) < self.cache_capacity:
            self._cache[index] = image
        return image

    def pixels(self, indices: Sequence[int], channels_last: bool = False) -> torch.Tensor:
        """Normalised float pixels ``[B, 3, S, S]`` of the products at ``indices`` (all with images).

        ``channels_last`` returns them in channels-last memory (what the fused CPU image encoder
        reads), normalised in place in one buffer; the values are the same either way."""
        batch = torch.stack([self._decoded(int(i)) for i in indices]).permute(0, 3, 1, 2)  # [B, 3, S, S] view
        if channels_last:
            return batch.float().div_(255.0).sub_(self._mean).div_(self._std)
        return (batch.contiguous().float().div_(255.0) - self._mean) / self._std


class TokenStore:
    """Token ids of a list of strings, tokenised once per distinct string (truncated to
    ``max_tokens`` incl. [CLS]/[SEP]) and packed into flat arrays: about 4 bytes per token and
    12 per string, where a list of Python ints per string costs about 30 times as much.

    Attributes:
        lengths: ``[N]`` int64, the token count of each string.
    """

    TOKENIZE_CHUNK = 8192  # distinct strings tokenised per call (bounds the tokenizer's Python lists)

    def __init__(self, tokenizer, texts: Sequence[str], max_tokens: int) -> None:
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.pad_id = int(tokenizer.pad_token_id or 0)
        codes, unique = pd.factorize(np.asarray(texts, dtype=object))
        chunks = []
        for start in range(0, len(unique), self.TOKENIZE_CHUNK):
            encoded = tokenizer(list(unique[start:start + self.TOKENIZE_CHUNK]), truncation=True,
                                max_length=max_tokens, add_special_tokens=True)["input_ids"]
            chunks.append((np.fromiter((len(ids) for ids in encoded), np.int64, len(encoded)),
                           np.fromiter((i for ids in encoded for i in ids), np.int32)))
        unique_lengths = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0, np.int64)
        self._flat = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros(0, np.int32)
        self._starts = np.concatenate([[0], np.cumsum(unique_lengths)[:-1]]).astype(np.int64)[codes]
        self.lengths = unique_lengths[codes]

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [B, L], attention_mask [B, L])`` padded to the longest of the batch."""
        rows = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[rows]
        valid = np.arange(int(lengths.max(initial=1)))[None, :] < lengths[:, None]  # [B, L]
        ids = np.full(valid.shape, self.pad_id, dtype=np.int64)
        ids[valid] = self._flat[(self._starts[rows][:, None] + np.arange(valid.shape[1])[None, :])[valid]]
        return torch.from_numpy(ids), torch.from_numpy(valid.astype(np.int64))

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`batch` of other strings, tokenised as the stored ones (and not kept)."""
        return TokenStore(self.tokenizer, texts, self.max_tokens).batch(np.arange(len(texts)))


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Index batches of inputs of similar length (so each pads little): the indices sorted by length
    (stable: ties keep input order) and cut into runs of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
