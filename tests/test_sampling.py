"""embeddings.sampling: the query split and each PQC tuple rule on handcrafted relevance frames."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from embeddings.sampling import (KIND_PROXY, PQCTuples, _sample_without_replacement, build_pqc_tuples,
                                corrupt_queries, sample_negative_products, split_queries, title_spans, typo)

IR, MR, HR = 0, 1, 2


def relevance(rows: list[tuple[str, int, int]]) -> pd.DataFrame:
    query, product_id, label = zip(*rows)
    return pd.DataFrame({"query": list(query), "product_id": np.array(product_id, dtype=np.int64),
                         "label": np.array(label, dtype=np.int8)})


def catalog(aisles: dict[int, str]) -> pd.DataFrame:
    return pd.DataFrame({"product_id": np.array(list(aisles), dtype=np.int64), "aisle": list(aisles.values())})


# Products 900 and 901 live in other aisles and supply proxy negatives (to dairy and to each other).
SNACKS = [(f"snack {i}", 900, HR) for i in range(12)] + [(f"snack ir {i}", 900, IR) for i in range(12)]
BAKERY = [(f"bread {i}", 901, HR) for i in range(12)] + [(f"bread ir {i}", 901, IR) for i in range(12)]
PROXY_SOURCE = SNACKS + BAKERY
AISLES = {1: "dairy", 2: "dairy", 3: "dairy", 900: "snacks", 901: "bakery"}


def pqc_frame(*args, **kwargs) -> pd.DataFrame:
    """The readable form of :func:`build_pqc_tuples`."""
    return build_pqc_tuples(*args, **kwargs).frame()


def queries_of(rows, product_id, label):
    return {q for q, p, lab in rows if p == product_id and lab == label}


# --- split_queries -------------------------------------------------------------------------------

def test_split_is_by_normalised_query_and_deterministic():
    rows = [(f"Query {i}", i % 7, i % 3) for i in range(200)] + [(f"query {i}!!", 50, HR) for i in range(200)]
    rel = relevance(rows)
    train, heldout = split_queries(rel, eval_fraction=0.1, seed=0)
    assert len(train) + len(heldout) == len(rel)
    assert heldout["query"].str.lower().str.strip("!").nunique() == 20  # 10% of 200 distinct queries
    norm = lambda frame: set(frame["query"].str.lower().str.strip("!"))  # noqa: E731
    assert not norm(train) & norm(heldout)  # "Query 5" and "query 5!!" land on the same side
    again_train, again_eval = split_queries(rel.sample(frac=1.0, random_state=3), eval_fraction=0.1, seed=0)
    assert norm(again_eval) == norm(heldout)
    _, other_eval = split_queries(rel, eval_fraction=0.1, seed=1)
    assert norm(other_eval) != norm(heldout)
    assert list(train.columns) == ["query", "product_id", "label"]


def test_split_rejects_bad_fraction_and_missing_column():
    with pytest.raises(ValueError, match="eval_fraction"):
        split_queries(relevance([("a", 1, 0)]), eval_fraction=1.0)
    with pytest.raises(ValueError, match="missing column.*query"):
        split_queries(pd.DataFrame({"q": ["a"]}))


# --- sampling without replacement ----------------------------------------------------------------

def test_floyd_sampling_is_uniform_over_subsets():
    rng = np.random.default_rng(0)
    chosen = _sample_without_replacement(np.full(20000, 5), 2, rng)
    assert (chosen[:, 0] != chosen[:, 1]).all() and chosen.min() >= 0 and chosen.max() <= 4
    subsets = Counter(frozenset(row) for row in chosen.tolist())
    assert len(subsets) == 10
    assert all(abs(count / 20000 - 0.1) < 0.015 for count in subsets.values())
    short = _sample_without_replacement(np.array([0, 1, 3]), 3, rng)
    assert short[0].tolist() == [-1, -1, -1] and short[1].tolist() == [0, -1, -1]
    assert sorted(short[2].tolist()) == [0, 1, 2]


# --- build_pqc_tuples: one rule per test ---------------------------------------------------------

def test_only_products_with_an_mr_or_hr_query_take_part():
    rows = [("milk", 1, IR), ("cheese", 1, IR), ("yogurt", 2, MR), ("butter", 2, IR)] + PROXY_SOURCE
    tuples = pqc_frame(relevance(rows), catalog(AISLES), n_negatives=3)
    assert 1 not in set(tuples["product_id"])
    assert set(tuples.loc[tuples["product_id"] == 2, "positive"]) == {"yogurt"}


def test_positives_are_capped_in_the_ratio_two_to_one():
    rows = [(f"hr {i}", 1, HR) for i in range(20)] + [(f"mr {i}", 1, MR) for i in range(20)] + PROXY_SOURCE
    tuples = pqc_frame(relevance(rows), catalog(AISLES), n_negatives=2, max_positives=9)
    assert Counter(tuples.loc[tuples["product_id"] == 1, "positive_label"]) == {HR: 6, MR: 3}
    big = ([(f"hr {i}", 1, HR) for i in range(200)] + [(f"mr {i}", 1, MR) for i in range(200)]
           + [(f"ir {i}", 1, IR) for i in range(20)] + PROXY_SOURCE)
    tuples = pqc_frame(relevance(big), catalog(AISLES), n_negatives=2)
    assert Counter(tuples.loc[tuples["product_id"] == 1, "positive_label"]) == {HR: 73, MR: 37}  # cap 110
    assert tuples.loc[tuples["product_id"] == 1, "positive"].is_unique


def test_a_short_class_gives_all_it_has_and_the_other_fills_the_cap():
    few_hr = [(f"hr {i}", 1, HR) for i in range(2)] + [(f"mr {i}", 1, MR) for i in range(20)]
    few_mr = [(f"hr {i}", 2, HR) for i in range(20)] + [(f"mr {i}", 2, MR) for i in range(1)]
    under_cap = [(f"hr {i}", 3, HR) for i in range(4)] + [(f"mr {i}", 3, MR) for i in range(4)]
    tuples = pqc_frame(relevance(few_hr + few_mr + under_cap + PROXY_SOURCE), catalog(AISLES),
                              n_negatives=2, max_positives=9)
    by_product = {pid: Counter(group["positive_label"]) for pid, group in tuples.groupby("product_id")}
    assert by_product[1] == {HR: 2, MR: 7}
    assert by_product[2] == {HR: 8, MR: 1}
    assert by_product[3] == {HR: 4, MR: 4}  # under the cap: every positive is used


def test_hr_positives_take_negatives_from_ir_or_mr_queries():
    rows = ([("hr", 1, HR)] + [(f"mr {i}", 1, MR) for i in range(3)] + [(f"ir {i}", 1, IR) for i in range(20)]
            + PROXY_SOURCE)
    ir, mr = queries_of(rows, 1, IR), queries_of(rows, 1, MR)
    seen_kinds = Counter()
    for seed in range(20):
        tuples = pqc_frame(relevance(rows), catalog(AISLES), n_negatives=5, seed=seed)
        hr_tuple = tuples[tuples["positive_label"] == HR].iloc[0]
        for query, kind in zip(hr_tuple["negatives"], hr_tuple["negative_kinds"]):
            assert kind in {"IR", "MR", "proxy"}
            if kind != "proxy":
                assert query in (ir if kind == "IR" else mr)
            seen_kinds[kind] += 1
        assert len(set(hr_tuple["negatives"])) == 5
    assert seen_kinds["IR"] > 0 and seen_kinds["MR"] > 0


def test_mr_positives_take_negatives_from_ir_only():
    rows = ([("hr", 1, HR)] + [(f"mr {i}", 1, MR) for i in range(5)] + [(f"ir {i}", 1, IR) for i in range(20)]
            + PROXY_SOURCE)
    ir = queries_of(rows, 1, IR)
    tuples = pqc_frame(relevance(rows), catalog(AISLES), n_negatives=6)
    mr_tuples = tuples[tuples["positive_label"] == MR]
    assert len(mr_tuples) == 5
    for negatives, kinds in zip(mr_tuples["negatives"], mr_tuples["negative_kinds"]):
        assert "MR" not in kinds
        assert all(q in ir for q, k in zip(negatives, kinds) if k == "IR")


def test_missing_negatives_are_proxies_from_another_aisles_hr_queries():
    rows = [("milk", 1, HR), ("yogurt", 1, MR), ("oat milk", 1, IR),
            ("cheese", 2, HR),              # same aisle (dairy): never a proxy for product 1
            ("milk", 900, HR),              # HR in another aisle but HR for product 1 itself
            ("yogurt", 900, HR),            # HR in another aisle but MR for product 1
            ("chips", 900, HR), ("pretzels", 900, HR), ("salsa", 900, HR), ("nachos", 900, HR),
            ("popcorn", 900, MR)]           # only MR elsewhere: not a proxy
    rows += [(f"snack ir {i}", 900, IR) for i in range(12)] + BAKERY  # IR: never a proxy
    allowed = {"chips", "pretzels", "salsa", "nachos"} | {f"bread {i}" for i in range(12)}
    for seed in range(10):
        tuples = pqc_frame(relevance(rows), catalog(AISLES), n_negatives=4, seed=seed)
        product_1 = tuples[tuples["product_id"] == 1].set_index("positive")
        # MR "yogurt": one IR ("oat milk") then 3 proxies
        assert product_1.loc["yogurt", "negative_kinds"] == ["IR", "proxy", "proxy", "proxy"]
        for positive in ("milk", "yogurt"):
            negatives, kinds = product_1.loc[positive, "negatives"], product_1.loc[positive, "negative_kinds"]
            proxies = [q for q, k in zip(negatives, kinds) if k == "proxy"]
            assert set(proxies) <= allowed
            assert len(set(negatives)) == len(negatives)


def test_an_all_ir_tuple_gets_exactly_one_proxy():
    rows = ([("hr", 1, HR), ("mr", 1, MR)] + [(f"ir {i}", 1, IR) for i in range(30)]
            + [("hr b", 2, HR)] + [(f"ir b {i}", 2, IR) for i in range(30)] + PROXY_SOURCE)
    tuples = pqc_frame(relevance(rows), catalog(AISLES), n_negatives=5, seed=4)
    kinds = tuples.set_index(["product_id", "positive"])["negative_kinds"]
    # MR positive with plenty of IR: 4 IR + 1 proxy
    assert Counter(kinds[(1, "mr")]) == {"IR": 4, "proxy": 1}
    # HR positive whose pool is IR only: 4 IR + 1 proxy
    assert Counter(kinds[(2, "hr b")]) == {"IR": 4, "proxy": 1}
    # no tuple anywhere is all IR; the proxy slot is not always the same one
    many = pqc_frame(relevance(rows), catalog(AISLES), n_negatives=5, seed=0, max_positives=110)
    assert all(Counter(k)["IR"] < 5 for k in many["negative_kinds"])
    slots = {pqc_frame(relevance(rows), catalog(AISLES), n_negatives=5, seed=s)
             .set_index(["product_id", "positive"]).loc[(1, "mr"), "negative_kinds"].index("proxy") for s in range(12)}
    assert len(slots) > 1


def test_tuples_are_deterministic_and_independent_of_row_order():
    rows = ([(f"hr {i}", p, HR) for p in (1, 2) for i in range(6)] + [(f"mr {i}", p, MR) for p in (1, 2) for i in range(4)]
            + [(f"ir {i}", p, IR) for p in (1, 2) for i in range(15)] + PROXY_SOURCE)
    rel = relevance(rows)
    first = pqc_frame(rel, catalog(AISLES), n_negatives=4, max_positives=7, seed=3)
    shuffled = pqc_frame(rel.sample(frac=1.0, random_state=1), catalog(AISLES), n_negatives=4,
                                max_positives=7, seed=3)
    pd.testing.assert_frame_equal(first, shuffled)
    other = pqc_frame(rel, catalog(AISLES), n_negatives=4, max_positives=7, seed=4)
    assert not first.equals(other)
    assert first["product_id"].dtype == np.int64 and first["positive_label"].dtype == np.int8
    assert list(first.columns) == ["product_id", "positive", "positive_label", "negatives", "negative_kinds"]
    assert all(len(n) == 4 for n in first["negatives"])


def test_tuples_are_compact_codes_into_the_sorted_queries():
    rows = ([(f"hr {i}", p, HR) for p in (1, 2) for i in range(6)] + [(f"ir {i}", p, IR) for p in (1, 2) for i in range(15)]
            + PROXY_SOURCE)
    tuples = build_pqc_tuples(relevance(rows), catalog(AISLES), n_negatives=4, max_positives=5, seed=1)
    assert isinstance(tuples, PQCTuples) and len(tuples) == 5 * 4  # products 1, 2, 900, 901
    assert (tuples.queries[:-1] < tuples.queries[1:]).all()  # sorted and distinct
    assert tuples.positive.dtype == tuples.negatives.dtype == np.int32 and tuples.negatives.shape == (20, 4)
    assert tuples.negative_kinds.dtype == np.int8 and (tuples.negative_kinds == KIND_PROXY).any(axis=1).all()
    some = tuples.take(np.array([3, 0]))
    assert some.frame().equals(tuples.frame().iloc[[3, 0]].reset_index(drop=True))


def test_queries_are_normalised_and_duplicates_keep_the_highest_label():
    rows = [("Milk!", 1, HR), ("milk", 1, IR), ("  CHEESE ", 1, IR)] + PROXY_SOURCE
    tuples = pqc_frame(relevance(rows), catalog(AISLES), n_negatives=2)
    product_1 = tuples[tuples["product_id"] == 1]
    assert product_1["positive"].tolist() == ["milk"]
    assert "milk" not in product_1.iloc[0]["negatives"]
    assert "cheese" in product_1.iloc[0]["negatives"]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="product_id 5 .* no aisle"):
        pqc_frame(relevance([("milk", 5, HR)]), catalog(AISLES))
    with pytest.raises(ValueError, match="no product of another aisle has an HR query"):
        pqc_frame(relevance([("milk", 1, HR), ("cheese", 2, HR)]), catalog(AISLES), n_negatives=2)
    with pytest.raises(ValueError, match="no product has an MR or HR query"):
        pqc_frame(relevance([("milk", 1, IR)]), catalog(AISLES))
    with pytest.raises(ValueError, match="enough distinct proxy negatives"):
        pqc_frame(relevance([("milk", 1, HR), ("chips", 900, HR)]), catalog(AISLES), n_negatives=3)
    with pytest.raises(ValueError, match="missing column.*label"):
        pqc_frame(pd.DataFrame({"query": ["a"], "product_id": [1]}), catalog(AISLES))


# --- sample_negative_products --------------------------------------------------------------------

def test_negative_products_are_those_the_positive_query_ranks_lower():
    # "milk": HR for 1, MR for 2, IR for 3 and 4; "oat milk": MR for 1, IR for 5
    rows = [("milk", 1, HR), ("milk", 2, MR), ("Milk ", 3, IR), ("milk", 4, IR), ("oat milk", 1, MR), ("oat milk", 5, IR)]
    tuples = pd.DataFrame({"product_id": [1, 2, 1], "positive": ["milk", "milk", "oat milk"],
                           "positive_label": np.array([HR, MR, MR], dtype=np.int8)})
    negatives = sample_negative_products(relevance(rows), tuples["positive"], tuples["positive_label"], n_negatives=4,
                                         seed=3)
    assert negatives.shape == (3, 4)
    assert set(negatives[0]) == {2, 3, 4, -1}  # under an HR positive: the MR and IR products of the query
    assert set(negatives[1]) == {3, 4, -1}  # under an MR positive: its IR products only
    assert set(negatives[2]) == {5, -1}
    assert (negatives[:, -1] == -1).all() and (np.sort(negatives[0][:3]) == [2, 3, 4]).all()
    again = sample_negative_products(relevance(rows[::-1]), tuples["positive"], tuples["positive_label"],
                                     n_negatives=4, seed=3)
    assert (np.sort(again, axis=1) == np.sort(negatives, axis=1)).all()


def test_negative_products_draw_uniformly_without_replacement():
    rows = [("tea", 1, HR)] + [("tea", p, IR) for p in range(10, 16)]
    tuples = pd.DataFrame({"product_id": [1] * 3000, "positive": ["tea"] * 3000,
                           "positive_label": np.full(3000, HR, dtype=np.int8)})
    negatives = sample_negative_products(relevance(rows), tuples["positive"], tuples["positive_label"], n_negatives=2,
                                         seed=0)
    assert (negatives[:, 0] != negatives[:, 1]).all() and np.isin(negatives, np.arange(10, 16)).all()
    counts = np.bincount(negatives.ravel() - 10, minlength=6)
    assert counts.min() > 0.9 * 1000 and counts.max() < 1.1 * 1000


# --- corrupt_queries (typo augmentation) ---------------------------------------------------------

def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


TYPO_QUERIES = ["red wine", "turkey breast", "tv 4k", "omega-3 pack", "organic whole milk 2 pack", "aa", "Zato soap"]


def test_corrupt_queries_rate_0_changes_nothing_and_rate_1_one_word_of_every_query_that_has_one():
    assert corrupt_queries(TYPO_QUERIES, 0.0, np.random.default_rng(0)) == TYPO_QUERIES
    for seed in range(200):
        out = corrupt_queries(TYPO_QUERIES, 1.0, np.random.default_rng(seed))
        assert out[2] == "tv 4k" and out[5] == "aa"  # no word of 3 letters: unchanged
        for before, after in zip(TYPO_QUERIES, out):
            if before in ("tv 4k", "aa"):
                continue
            changed = [(w, v) for w, v in zip(before.split(" "), after.split(" ")) if w != v]
            assert len(after.split(" ")) == len(before.split(" ")) and len(changed) == 1
            word, new = changed[0]
            assert sum(c.isalpha() for c in word) >= 3 and _edit_distance(word, new) in (1, 2)
            assert [c for c in new if not c.isalpha()] == [c for c in word if not c.isalpha()]  # letters only


def test_corrupt_queries_is_deterministic_for_a_seed_and_picks_the_rate_share():
    texts = [f"query number {i}" for i in range(2000)]
    first = corrupt_queries(texts, 0.3, np.random.default_rng([7, 1]))
    assert first == corrupt_queries(texts, 0.3, np.random.default_rng([7, 1]))
    assert first != corrupt_queries(texts, 0.3, np.random.default_rng([7, 2]))
    assert 0.27 < np.mean([a != b for a, b in zip(texts, first)]) < 0.33
    with pytest.raises(ValueError, match="typo rate"):
        corrupt_queries(texts, 1.5, np.random.default_rng(0))


def test_typo_draws_each_operation_equally_often():
    word = "Cheese"
    kinds = Counter()
    for seed in range(800):
        new = typo(word, np.random.default_rng(seed))
        differ = [i for i in range(min(len(new), len(word))) if new[i] != word[i]]
        if new in {word[:i] + word[i + 1:] for i in range(len(word))}:
            kinds["drop"] += 1
        elif new in {word[:i] + word[i] + word[i:] for i in range(len(word))}:
            kinds["double"] += 1
        elif len(differ) == 2 and differ[1] == differ[0] + 1 and new[differ[0]] == word[differ[1]] \
                and new[differ[1]] == word[differ[0]]:
            kinds["swap"] += 1
        else:
            assert len(new) == len(word) and len(differ) == 1 and new[differ[0]].lower() != word[differ[0]].lower()
            assert new[differ[0]].isupper() == (differ[0] == 0)  # the replacement keeps the case
            kinds["replace"] += 1
    assert sorted(kinds) == ["double", "drop", "replace", "swap"] and min(kinds.values()) > 160
    # no two adjacent different letters: a drop instead of a swap, never the word unchanged
    assert all(_edit_distance(typo("aaa", np.random.default_rng(seed)), "aaa") == 1 for seed in range(50))


def test_title_spans_are_one_to_three_consecutive_words_of_the_normalised_title():
    titles = ["Mobbix Loose Leaf Tea Black 8 oz Bag", "Soap", "", "Red  Wine, Dry"]
    seen = set()
    for seed in range(300):
        spans = title_spans(titles, np.random.default_rng(seed))
        assert spans == title_spans(titles, np.random.default_rng(seed))  # deterministic for a seed
        assert spans[1] == "soap" and spans[2] == ""
        words = "mobbix loose leaf tea black 8 oz bag".split()
        n = len(spans[0].split())
        assert 1 <= n <= 3 and any(words[i:i + n] == spans[0].split() for i in range(len(words) - n + 1))
        seen.add(spans[0])
    assert {"mobbix", "bag", "mobbix loose leaf", "oz bag"} <= seen  # every length and position is drawn


def test_title_spans_with_queries_keep_the_query_words_the_title_lacks():
    titles = ["Sozisk Potato Chips Jalapeno 13 oz Bag", "Soap", "Babury Tea Bags 40 ct Box"]
    queries = ["potato chips 6 pack", "Soap", "tea bags bulk for home"]
    for seed in range(50):
        plain = title_spans(titles, np.random.default_rng(seed))
        spans = title_spans(titles, np.random.default_rng(seed), queries=queries)
        # the same span (the queries draw nothing), then the query's words absent from the title, in order
        assert spans[0] == plain[0] + " 6 pack" and spans[1] == "soap" and spans[2] == plain[2] + " bulk for home"


def test_title_spans_with_brands_give_the_brand_where_one_is_given_and_draw_for_the_others():
    titles = ["Sozisk Potato Chips Jalapeno 13 oz Bag", "Babury Tea Bags 40 ct Box", "Fizzly Cola 12 x 12 fl oz Cans"]
    queries = ["potato chips 6 pack", "tea bulk", "cola near me"]
    for seed in range(50):
        no_brands = title_spans(titles, np.random.default_rng(seed), queries=queries, brands=[None, None, None])
        assert no_brands == title_spans(titles, np.random.default_rng(seed), queries=queries)
        spans = title_spans(titles, np.random.default_rng(seed), queries=queries, brands=["Sozisk", None, "Fizzly Co"])
        # a brand span draws nothing, so the second title takes the first draw of the stream
        alone = title_spans(titles[1:2], np.random.default_rng(seed), queries=queries[1:2])
        assert spans == ["sozisk 6 pack", alone[0], "fizzly co near me"]
