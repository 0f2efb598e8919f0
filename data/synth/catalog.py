"""The catalog: brands and products drawn from the vocabulary (:class:`Catalog`, :func:`build_catalog`),
the samplers of popular products within a pool, titles, and the catalog table's chunks with their
packshot images (:func:`catalog_batch`)."""
from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa

from data import schema
from data.packshot import Packshot, render
from data.synth.config import ClickModel, ProfileConfig
from data.synth.sampling import STREAM_BRANDS, STREAM_CATALOG, GroupedSampler, categorical, pick_slot, stream_rng
from data.vocab import CONTAINER_PLURAL, Vocabulary, brand_names, vocabulary


@dataclass
class Catalog:
    """Product attributes as parallel ``[n_products]`` arrays (index = product_id - 1)."""

    vocab: Vocabulary
    brand_name: list[str]
    brand_aisle: np.ndarray  # [n_brands]
    brand_rgb: np.ndarray  # [n_brands, 3] uint8
    brand_makes: np.ndarray  # [n_brands, n_types] bool
    brand_popularity: np.ndarray
    aisle: np.ndarray
    brand: np.ndarray
    type: np.ndarray
    variant: np.ndarray
    container: np.ndarray  # index into the type's containers
    amount: np.ndarray  # index into the type's amounts
    pack: np.ndarray  # pack count
    organic: np.ndarray
    organic_in_title: np.ndarray
    variant_in_title: np.ndarray
    price: np.ndarray
    price_z: np.ndarray
    popularity: np.ndarray
    appeal: np.ndarray
    jitter: np.ndarray  # [n_products, 3] int: dx, dy, background
    samplers: dict[str, GroupedSampler] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.aisle)

    @property
    def product_id(self) -> np.ndarray:
        return np.arange(1, self.n + 1, dtype=np.int64)

    def key(self, pool: str, aisle=None, brand=None, type_=None, variant=None, organic=None) -> np.ndarray:
        """The int64 sampler key of ``pool`` for the given attribute arrays."""
        v = self.vocab
        n_t, n_v = len(v.types), len(v.variant_names)
        if pool == "aisle":
            return np.asarray(aisle, dtype=np.int64)
        if pool == "aisle_group":
            return v.aisle_group_ids[aisle]
        if pool == "brand":
            return np.asarray(brand, dtype=np.int64)
        if pool == "type":
            return np.asarray(type_, dtype=np.int64)
        if pool == "type_group":
            return v.type_group[type_]
        if pool == "brand_type":
            return np.asarray(brand, dtype=np.int64) * n_t + type_
        if pool == "type_variant":
            return np.asarray(type_, dtype=np.int64) * n_v + variant
        if pool == "brand_type_variant":
            return (np.asarray(brand, dtype=np.int64) * n_t + type_) * n_v + variant
        if pool == "type_organic":
            return np.asarray(type_, dtype=np.int64) * 2 + np.asarray(organic, dtype=np.int64)
        if pool in ("all", "uniform"):
            return np.zeros(len(aisle), dtype=np.int64)
        raise ValueError(pool)

    def build_samplers(self) -> None:
        attrs = dict(aisle=self.aisle, brand=self.brand, type_=self.type, variant=self.variant, organic=self.organic)
        for pool in ("aisle", "aisle_group", "brand", "type", "type_group", "brand_type", "type_variant",
                     "brand_type_variant", "type_organic", "all"):
            self.samplers[pool] = GroupedSampler(self.key(pool, **attrs), self.popularity)
        self.samplers["uniform"] = GroupedSampler(np.zeros(self.n, dtype=np.int64), np.ones(self.n))
        self.samplers["brand_in_aisle"] = GroupedSampler(self.brand_aisle, self.brand_popularity)

    def draw(self, rng: np.random.Generator, pool: str, **attrs) -> np.ndarray:
        return self.samplers[pool].sample(rng, self.key(pool, **attrs))

    def title(self, i: int) -> str:
        v = self.vocab
        ptype = v.types[self.type[i]]
        words = [self.brand_name[self.brand[i]]]
        if self.organic_in_title[i]:
            words.append("Organic")
        words.append(_title_case(ptype.name))
        if self.variant_in_title[i]:
            words.append(_title_case(v.variant_names[self.variant[i]]))
        container = ptype.containers[self.container[i]]
        amount, pack = ptype.amounts[self.amount[i]], int(self.pack[i])
        if pack > 1:
            words.append(f"{pack} x {amount} {CONTAINER_PLURAL.get(container, container.capitalize() + 's')}")
        else:
            words.append(f"{amount} {container.capitalize()}")
        return " ".join(words)

    def size_text(self, i: int) -> str:
        ptype = self.vocab.types[self.type[i]]
        amount, pack = ptype.amounts[self.amount[i]], int(self.pack[i])
        return f"{pack} x {amount}" if pack > 1 else amount


_ACRONYMS = {"ipa", "bbq", "pb", "tv"}
_LOWER = {"and", "n", "of", "for", "with"}


def _title_case(text: str) -> str:
    return " ".join(w.upper() if w in _ACRONYMS else w if w in _LOWER else w[:1].upper() + w[1:] for w in text.split())


def _padded(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """``[R, max_len]`` int64 table (padded with the row's first entry) and ``[R]`` lengths."""
    width = max(len(x) for x in lists)
    table = np.array([list(x) + [x[0]] * (width - len(x)) for x in lists], dtype=np.int64)
    return table, np.array([len(x) for x in lists], dtype=np.int64)


def build_catalog(cfg: ProfileConfig, seed: int, clicks: ClickModel) -> Catalog:
    """Draw brands and products (attributes only; titles and images are made per chunk)."""
    vocab = vocabulary()
    n_aisles, n_types = len(vocab.aisles), len(vocab.types)
    aisle_w = np.array([a.weight for a in vocab.aisles])
    aisle_p = aisle_w / aisle_w.sum()

    rng = stream_rng(seed, STREAM_BRANDS)
    n_brands = max(2 * n_aisles, cfg.n_products // 12)
    brand_aisle = np.concatenate([np.repeat(np.arange(n_aisles), 2),
                                  categorical(rng, aisle_p, n_brands - 2 * n_aisles)])
    brand_popularity = rng.lognormal(0.0, 0.8, n_brands)
    brand_tier = rng.normal(0.0, 0.2, n_brands)
    hsv = np.stack([rng.random(n_brands), rng.uniform(0.55, 0.95, n_brands), rng.uniform(0.3, 0.85, n_brands)], 1)
    brand_rgb = np.array([colorsys.hsv_to_rgb(*x) for x in hsv]) * 255
    names = brand_names(rng, n_brands, vocab.words())
    types_of_aisle = [np.flatnonzero(vocab.type_aisle == a) for a in range(n_aisles)]
    brand_types = []
    brand_makes = np.zeros((n_brands, n_types), dtype=bool)
    n_made = 1 + rng.binomial(3, 0.4, n_brands)
    for b in range(n_brands):
        options = types_of_aisle[brand_aisle[b]]
        made = np.sort(rng.choice(options, size=min(n_made[b], len(options)), replace=False))
        brand_types.append(made.tolist())
        brand_makes[b, made] = True

    rng = stream_rng(seed, STREAM_CATALOG)
    n = cfg.n_products
    aisle = categorical(rng, aisle_p, n)
    brand = GroupedSampler(brand_aisle, brand_popularity).sample(rng, aisle)
    type_table, type_counts = _padded(brand_types)
    ptype = pick_slot(rng, type_table, brand, type_counts)
    group = vocab.type_group[ptype]
    variant_table, variant_counts = _padded([g.variants for g in vocab.groups])
    variant = pick_slot(rng, variant_table, group, variant_counts)
    n_containers = np.array([len(t.containers) for t in vocab.types])
    n_amounts = np.array([len(t.amounts) for t in vocab.types])
    pack_table, n_packs = _padded([t.packs for t in vocab.types])
    container = np.floor(rng.random(n) * n_containers[ptype]).astype(np.int64)
    amount = np.floor(rng.random(n) * n_amounts[ptype]).astype(np.int64)
    pack = pick_slot(rng, pack_table, ptype, n_packs)
    organic_share = np.array([a.organic_share for a in vocab.aisles])
    organic = rng.random(n) < organic_share[aisle]
    organic_in_title = organic & (rng.random(n) >= cfg.organic_image_only_share)
    variant_in_title = rng.random(n) >= cfg.variant_hidden_share
    base_price = np.array([t.base_price for t in vocab.types])
    price = (base_price[ptype] * (1 + 0.6 * amount) * pack.astype(float) ** 0.85
             * np.exp(brand_tier[brand] + rng.normal(0.0, 0.08, n)) * np.where(organic, 1.3, 1.0))
    price = np.maximum(0.49, np.round(price * 2) / 2 - 0.01)
    log_price = np.log(price)
    cnt = np.bincount(ptype, minlength=n_types).astype(float)
    mean = np.bincount(ptype, log_price, n_types) / np.maximum(cnt, 1)
    var = np.bincount(ptype, (log_price - mean[ptype]) ** 2, n_types) / np.maximum(cnt, 1)
    price_z = (log_price - mean[ptype]) / np.where(var > 0, np.sqrt(var), 1.0)[ptype]
    popularity = rng.lognormal(0.0, 1.0, n) * np.sqrt(brand_popularity[brand])
    appeal = rng.normal(0.0, clicks.appeal_sd, n)
    jitter = np.stack([rng.integers(-3, 4, n), rng.integers(-3, 4, n), rng.integers(236, 256, n)], 1)
    catalog = Catalog(vocab, names, brand_aisle, brand_rgb.astype(np.uint8), brand_makes, brand_popularity,
                      aisle, brand, ptype, variant, container, amount, pack, organic, organic_in_title,
                      variant_in_title, price, price_z, popularity, appeal, jitter)
    catalog.build_samplers()
    return catalog


CATALOG_EXTRA = [pa.field("product_type", pa.string()), pa.field("variant", pa.string()),
                 pa.field("container", pa.string()), pa.field("size", pa.string()),
                 pa.field("pack_count", pa.int32()), pa.field("price", pa.float64()),
                 pa.field("organic", pa.bool_()), pa.field("variant_in_title", pa.bool_()),
                 pa.field("organic_in_title", pa.bool_())]


def catalog_batch(catalog: Catalog, start: int, stop: int, image_px: int) -> pa.Table:
    """Rows ``start..stop-1`` of the catalog table, titles and packshots included."""
    v = catalog.vocab
    idx = range(start, stop)
    images = []
    for i in idx:
        ptype = v.types[catalog.type[i]]
        shot = Packshot(container=ptype.containers[catalog.container[i]],
                        body_rgb=v.variant_rgb[catalog.variant[i]],
                        label_rgb=tuple(int(c) for c in catalog.brand_rgb[catalog.brand[i]]),
                        brand=catalog.brand_name[catalog.brand[i]], organic=bool(catalog.organic[i]),
                        dx=int(catalog.jitter[i, 0]), dy=int(catalog.jitter[i, 1]),
                        background=int(catalog.jitter[i, 2]))
        images.append(render(shot, image_px))
    sl = slice(start, stop)
    return pa.Table.from_arrays([
        pa.array(catalog.product_id[sl]),
        pa.array([catalog.title(i) for i in idx], pa.string()),
        pa.array([v.aisles[a].name for a in catalog.aisle[sl]], pa.string()),
        pa.array(images, pa.binary()),
        pa.array([catalog.brand_name[b] for b in catalog.brand[sl]], pa.string()),
        pa.array([v.types[t].name for t in catalog.type[sl]], pa.string()),
        pa.array([v.variant_names[x] for x in catalog.variant[sl]], pa.string()),
        pa.array([v.types[catalog.type[i]].containers[catalog.container[i]] for i in idx], pa.string()),
        pa.array([catalog.size_text(i) for i in idx], pa.string()),
        pa.array(catalog.pack[sl].astype(np.int32)),
        pa.array(catalog.price[sl]),
        pa.array(catalog.organic[sl]),
        pa.array(catalog.variant_in_title[sl]),
        pa.array(catalog.organic_in_title[sl]),
    ], schema=schema.schema("catalog", CATALOG_EXTRA))
