"""Search intents, their query texts and the relevance rule: an intent per target product
(:func:`sample_intents`), the text a shopper types for it (:func:`render_queries`), the hash that
keys a normalised query (:func:`query_hashes`), the label of (intent, product)
(:func:`relevance_labels`) and the candidate pools of an intent (:func:`draw_candidates`)."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from data import schema
from data.synth.catalog import Catalog
from data.synth.config import Behaviour
from data.synth.sampling import categorical
from data.text import normalize_query
from data.vocab import MODIFIERS

# Intent kinds (``intent_kind`` in the truth file).
TYPE, BRAND_TYPE, TYPE_VARIANT, BRAND_TYPE_VARIANT, BRAND, ORGANIC_TYPE, AISLE = range(7)
KIND_NAMES = ("type", "brand_type", "type_variant", "brand_type_variant", "brand", "organic_type", "aisle")
_HAS_BRAND = np.array([0, 1, 0, 1, 1, 0, 0], dtype=bool)
_HAS_TYPE = np.array([1, 1, 1, 1, 0, 1, 0], dtype=bool)
_HAS_VARIANT = np.array([0, 0, 1, 1, 0, 0, 0], dtype=bool)

# Candidate sources (``candidate_source`` in the truth file).
EXACT, NEAR, SAME_AISLE, POPULAR = range(4)


@dataclass
class Intents:
    """Parallel ``[n]`` arrays describing search intents (-1 = attribute not part of the intent)."""

    kind: np.ndarray
    aisle: np.ndarray  # always set: the target product's aisle
    brand: np.ndarray
    type: np.ndarray
    variant: np.ndarray
    organic: np.ndarray  # bool

    def take(self, idx: np.ndarray) -> "Intents":
        return Intents(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))


def sample_intents(rng: np.random.Generator, catalog: Catalog, targets: np.ndarray, behaviour: Behaviour) -> Intents:
    """An intent per target product: a kind, then the target's attributes that kind keeps."""
    n = len(targets)
    kind = categorical(rng, behaviour.intent_kind_probs, n)
    kind = np.where(catalog.organic[targets] & (rng.random(n) < behaviour.organic_query_share), ORGANIC_TYPE, kind)
    return Intents(kind=kind, aisle=catalog.aisle[targets],
                   brand=np.where(_HAS_BRAND[kind], catalog.brand[targets], -1),
                   type=np.where(_HAS_TYPE[kind], catalog.type[targets], -1),
                   variant=np.where(_HAS_VARIANT[kind], catalog.variant[targets], -1),
                   organic=kind == ORGANIC_TYPE)


def _misspell(word: str, code: int) -> str:
    if len(word) < 4:
        return word
    i = 1 + code % (len(word) - 2)
    op = (code >> 10) % 3
    if op == 0:
        return word[:i] + word[i + 1:]
    if op == 1:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word[:i] + word[i] + word[i:]


def render_queries(rng: np.random.Generator, catalog: Catalog, intents: Intents, behaviour: Behaviour) -> list[str]:
    """The text a shopper types for each intent (synonyms, modifiers, word order, typos)."""
    v = catalog.vocab
    n = len(intents.kind)
    use_synonym = (rng.random(n) < behaviour.query_synonym_share).tolist()
    synonym_u = rng.random(n).tolist()
    modifier = np.where(rng.random(n) < behaviour.query_modifier_share,
                        rng.integers(0, len(MODIFIERS), n), -1)
    second_modifier = np.where((modifier >= 0) & (rng.random(n) < behaviour.query_second_modifier_share),
                               rng.integers(0, len(MODIFIERS), n), -1).tolist()
    modifier = modifier.tolist()
    swap = (rng.random(n) < behaviour.query_swap_share).tolist()
    misspell = np.where(rng.random(n) < behaviour.query_misspell_share, rng.integers(0, 1 << 30, n), -1).tolist()
    capital = (rng.random(n) < behaviour.query_capital_share).tolist()
    kinds, aisles, brands = intents.kind.tolist(), intents.aisle.tolist(), intents.brand.tolist()
    types, variants = intents.type.tolist(), intents.variant.tolist()
    queries = []
    for i in range(n):
        kind = kinds[i]
        if kind == AISLE:
            names = (v.aisles[aisles[i]].name, *v.aisles[aisles[i]].synonyms)
        elif types[i] >= 0:
            names = (v.types[types[i]].name, *v.types[types[i]].synonyms)
        else:
            names = ("",)
        noun = names[1 + int(synonym_u[i] * (len(names) - 1))] if use_synonym[i] and len(names) > 1 else names[0]
        brand = catalog.brand_name[brands[i]].lower() if brands[i] >= 0 else ""
        if misspell[i] >= 0:
            if brand:
                brand = _misspell(brand, misspell[i])
            else:
                words = noun.split()
                longest = max(range(len(words)), key=lambda j: len(words[j]))
                words[longest] = _misspell(words[longest], misspell[i])
                noun = " ".join(words)
        variant = v.variant_names[variants[i]] if variants[i] >= 0 else ""
        if kind == BRAND:
            words = [brand]
        elif kind == ORGANIC_TYPE:
            words = [noun, "organic"] if swap[i] else ["organic", noun]
        elif kind == BRAND_TYPE_VARIANT:
            words = [brand, noun, variant] if swap[i] else [brand, variant, noun]
        elif kind == BRAND_TYPE:
            words = [noun, brand] if swap[i] else [brand, noun]
        elif kind == TYPE_VARIANT:
            words = [noun, variant] if swap[i] else [variant, noun]
        else:
            words = [noun]
        if modifier[i] >= 0:
            words = [MODIFIERS[modifier[i]], *words] if swap[i] else [*words, MODIFIERS[modifier[i]]]
        if second_modifier[i] >= 0 and second_modifier[i] != modifier[i]:
            words.append(MODIFIERS[second_modifier[i]])
        text = " ".join(words)
        queries.append(text[:1].upper() + text[1:] if capital[i] else text)
    return queries


def query_hashes(texts: Sequence[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(normalize_query(t).encode(), digest_size=8).digest(), "little")
                     for t in texts], dtype=np.uint64)

def relevance_labels(catalog: Catalog, intents: Intents, products: np.ndarray) -> np.ndarray:
    """``[n]`` int8 label (0 IR, 1 MR, 2 HR) of product ``products[i]`` for intent ``i``."""
    v = catalog.vocab
    p_brand, p_type = catalog.brand[products], catalog.type[products]
    has_brand, has_type = intents.brand >= 0, intents.type >= 0
    is_aisle = intents.kind == AISLE
    hr = ((~has_brand | (p_brand == intents.brand)) & (~has_type | (p_type == intents.type))
          & ((intents.variant < 0) | (catalog.variant[products] == intents.variant))
          & (~intents.organic | catalog.organic[products])
          & (~is_aisle | (catalog.aisle[products] == intents.aisle)))
    type_group = v.type_group
    aisle_group = v.aisle_group_ids
    mr = ((has_type & (type_group[p_type] == type_group[np.maximum(intents.type, 0)]))
          | (~has_type & has_brand & catalog.brand_makes[np.maximum(intents.brand, 0), p_type])
          | (is_aisle & (aisle_group[catalog.aisle[products]] == aisle_group[intents.aisle])))
    return np.where(hr, schema.HR, np.where(mr, schema.MR, schema.IR)).astype(np.int8)


def draw_candidates(rng: np.random.Generator, catalog: Catalog, intents: Intents, source: np.ndarray) -> np.ndarray:
    """One product per intent from pool ``source`` (EXACT, NEAR, SAME_AISLE, POPULAR), never -1."""
    n = len(source)
    out = np.full(n, -1, dtype=np.int64)
    # exact pools, by intent kind
    exact_pool = {TYPE: "type", BRAND_TYPE: "brand_type", TYPE_VARIANT: "type_variant",
                  BRAND_TYPE_VARIANT: "brand_type_variant", BRAND: "brand", ORGANIC_TYPE: "type_organic",
                  AISLE: "aisle"}
    for kind, pool in exact_pool.items():
        rows = np.flatnonzero((source == EXACT) & (intents.kind == kind))
        if len(rows):
            it = intents.take(rows)
            out[rows] = catalog.draw(rng, pool, aisle=it.aisle, brand=it.brand, type_=it.type,
                                     variant=it.variant, organic=np.ones(len(rows), dtype=np.int64))
    near = source == NEAR
    for mask, pool in ((near & (intents.type >= 0), "type_group"), (near & (intents.kind == BRAND), "aisle"),
                       (near & (intents.kind == AISLE), "aisle_group"), (source == SAME_AISLE, "aisle")):
        rows = np.flatnonzero(mask)
        if len(rows):
            out[rows] = catalog.draw(rng, pool, aisle=intents.aisle[rows], type_=intents.type[rows])
    rows = np.flatnonzero((source == POPULAR) | (out < 0))
    out[rows] = catalog.draw(rng, "all", aisle=np.zeros(len(rows), dtype=np.int64))
    return out
