"""The synthetic marketplace: determinism, the planted truth (label split, relevance and history
effects on clicks, leak-free past CTR and query counting features), the vocabulary and images, and the CLI's
bad-input paths."""
from __future__ import annotations

import io
import itertools
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data import schema, synth
from data.dataset import RELEVANCE_TRUTH_FILE, TRUTH_FILE
from data.packshot import Packshot, render
from data.synth.catalog import Catalog, _title_case, build_catalog
from data.synth.config import Behaviour, ClickModel
from data.synth.counting import QUERY_COUNT_FEATURES, QueryCountFeatures
from data.synth.queries import (AISLE, BRAND_TYPE, BRAND_TYPE_VARIANT, TYPE_VARIANT, Intents, relevance_labels,
                                render_queries, sample_intents)
from data.text import normalize_query
from data.vocab import vocabulary

REPO = Path(__file__).resolve().parents[1]
DATA_FILES = ("catalog.parquet", "relevance.parquet", "impressions.parquet", "purchases.parquet",
              TRUTH_FILE, RELEVANCE_TRUTH_FILE, "manifest.json")


def _manifest(workdir: Path) -> dict:
    return json.loads((workdir / "data" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def tables(tiny_workdir: Path) -> dict[str, pd.DataFrame]:
    out = {name: schema.read_table(tiny_workdir, name).to_pandas() for name in schema.TABLE_NAMES}
    out["truth"] = pq.read_table(tiny_workdir / "data" / TRUTH_FILE).to_pandas()
    return out


def _run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.synth", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, **kwargs)


# ---- determinism and skipping


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tiny_workdir: Path, tmp_path: Path) -> None:
    synth.main(["--profile", "tiny", "--workdir", str(tmp_path / "again"), "--seed", "0"])
    for name in DATA_FILES:
        assert (tmp_path / "again" / "data" / name).read_bytes() == (tiny_workdir / "data" / name).read_bytes(), name
    synth.main(["--profile", "tiny", "--workdir", str(tmp_path / "other"), "--seed", "1"])
    for name in ("catalog.parquet", "relevance.parquet", "impressions.parquet", "purchases.parquet"):
        assert (tmp_path / "other" / "data" / name).read_bytes() != (tiny_workdir / "data" / name).read_bytes(), name


def test_rerun_with_same_settings_skips(tiny_workdir_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = {n: (tiny_workdir_copy / "data" / n).stat().st_mtime_ns for n in DATA_FILES}
    with caplog.at_level("INFO", logger="data.synth"):
        synth.main(["--profile", "tiny", "--workdir", str(tiny_workdir_copy), "--seed", "0"])
    assert "skipping" in caplog.text
    assert before == {n: (tiny_workdir_copy / "data" / n).stat().st_mtime_ns for n in DATA_FILES}


# ---- the planted truth


def test_manifest_records_settings_counts_and_split(tiny_workdir: Path, tables: dict[str, pd.DataFrame]) -> None:
    manifest = _manifest(tiny_workdir)
    assert manifest["schema_version"] == schema.SCHEMA_VERSION
    assert manifest["settings"]["profile"] == "tiny" and manifest["settings"]["seed"] == 0
    assert manifest["settings"]["label_noise"] == 0.0
    assert manifest["row_counts"] == {name: len(tables[name]) for name in schema.TABLE_NAMES}
    assert manifest["click_rate"] == pytest.approx(tables["impressions"].clicked.mean(), abs=1e-4)


def test_label_split_is_within_three_points_of_the_paper(tables: dict[str, pd.DataFrame]) -> None:
    split = tables["relevance"].label.value_counts(normalize=True)
    for label, target in zip((schema.IR, schema.MR, schema.HR), (0.69, 0.205, 0.099)):
        assert abs(split[label] - target) <= 0.03, split.to_dict()
    assert not tables["relevance"].duplicated(["query", "product_id"]).any()
    queries = tables["relevance"]["query"].map(normalize_query)
    assert queries.nunique() == tables["relevance"]["query"].nunique() == synth.PROFILES["tiny"].n_relevance_queries


def test_overall_click_rate_is_a_few_percent(tables: dict[str, pd.DataFrame]) -> None:
    # demo: about 5.6%; the tiny profile's users have a larger share of history matches (about 8%)
    assert 0.02 <= tables["impressions"].clicked.mean() <= 0.09


def test_clicks_depend_strongly_on_relevance(tables: dict[str, pd.DataFrame]) -> None:
    clicked, label = tables["impressions"].clicked, tables["truth"].true_label
    ctr_hr, ctr_ir = clicked[label == schema.HR].mean(), clicked[label == schema.IR].mean()
    n_hr, n_ir = (label == schema.HR).sum(), (label == schema.IR).sum()
    se = np.sqrt(ctr_hr * (1 - ctr_hr) / n_hr + ctr_ir * (1 - ctr_ir) / n_ir)
    assert ctr_hr > 4 * ctr_ir and ctr_hr - ctr_ir > 6 * se, (ctr_hr, ctr_ir)


def _history_matches(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Recompute, by brute force from the files, whether each impression's user bought the same
    aisle/brand/product in [ts - 84 days, ts)."""
    imp = tables["impressions"].reset_index(names="row")[["row", "ts", "user_id", "product_id"]]
    attrs = tables["catalog"][["product_id", "aisle", "brand"]]
    imp = imp.merge(attrs, on="product_id")
    bought = tables["purchases"].merge(attrs, on="product_id").rename(
        columns={"ts": "p_ts", "product_id": "p_product", "aisle": "p_aisle", "brand": "p_brand"})
    pairs = imp.merge(bought, on="user_id")
    window = (pairs.p_ts >= pairs.ts - pd.Timedelta(days=84)) & (pairs.p_ts < pairs.ts)
    pairs = pairs[window]
    out = pd.DataFrame(index=tables["impressions"].index)
    for level, a, b in (("aisle", "aisle", "p_aisle"), ("brand", "brand", "p_brand"),
                        ("product", "product_id", "p_product")):
        hit = set(pairs.row[pairs[a] == pairs[b]])
        out[level] = out.index.isin(list(hit)).astype(np.int8)
    return out


def test_history_flags_match_a_brute_force_84_day_window(tables: dict[str, pd.DataFrame]) -> None:
    brute = _history_matches(tables)
    for level in ("aisle", "brand", "product"):
        np.testing.assert_array_equal(brute[level].to_numpy(), tables["truth"][f"hist_{level}"].to_numpy(), level)
    assert brute.aisle.mean() > 0.05  # the window is not trivially empty


def test_clicks_depend_strongly_on_recent_purchases(tables: dict[str, pd.DataFrame]) -> None:
    imp = tables["impressions"]
    buyers = set(tables["purchases"].user_id)
    brute = _history_matches(tables)
    of_buyers = imp.user_id.isin(buyers)
    match = brute.aisle.astype(bool)
    ctr_yes, ctr_no = imp.clicked[of_buyers & match].mean(), imp.clicked[of_buyers & ~match].mean()
    n_yes, n_no = (of_buyers & match).sum(), (of_buyers & ~match).sum()
    se = np.sqrt(ctr_yes * (1 - ctr_yes) / n_yes + ctr_no * (1 - ctr_no) / n_no)
    assert ctr_yes > 2.5 * ctr_no and ctr_yes - ctr_no > 5 * se, (ctr_yes, ctr_no)


def test_past_ctr_uses_only_earlier_days(tables: dict[str, pd.DataFrame], tiny_workdir: Path) -> None:
    clicks = _manifest(tiny_workdir)["settings"]["click_model"]
    imp = tables["impressions"][["ts", "product_id", "clicked", "dense_product_ctr_past"]].copy()
    imp["day"] = imp.ts.dt.floor("D")
    daily = imp.groupby(["product_id", "day"]).clicked.agg(["size", "sum"]).reset_index()
    daily[["imps_before", "clicks_before"]] = (daily.groupby("product_id")[["size", "sum"]].cumsum()
                                               - daily[["size", "sum"]].to_numpy())
    imp = imp.merge(daily, on=["product_id", "day"], how="left")
    expected = ((imp.clicks_before + clicks["ctr_prior_strength"] * clicks["ctr_prior"])
                / (imp.imps_before + clicks["ctr_prior_strength"]))
    np.testing.assert_allclose(imp.dense_product_ctr_past, expected, rtol=1e-6)
    assert (imp.imps_before > 0).mean() > 0.5  # most rows do have earlier days


def _counts_before_day(imp: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Impressions (``size``) and clicks (``sum``) of each row's ``keys`` on the days strictly before
    the row's day, by brute force: every row joined with every row of the same key."""
    rows = imp.reset_index(names="row")[["row", *keys, "day"]]
    earlier = imp[[*keys, "day", "clicked"]].rename(columns={"day": "earlier_day"})
    pairs = rows.merge(earlier, on=keys)
    pairs = pairs[pairs.earlier_day < pairs.day]
    return pairs.groupby("row").clicked.agg(["size", "sum"]).reindex(imp.index, fill_value=0)


@pytest.fixture(scope="module")
def query_keyed(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The impressions with their day, normalised query and catalog aisle name."""
    imp = tables["impressions"].copy()
    imp["day"] = imp.ts.dt.floor("D")
    imp["query_key"] = imp["query"].map(normalize_query)
    aisle = tables["catalog"].set_index("product_id").aisle
    imp["aisle_name"] = aisle.loc[imp.product_id].to_numpy()
    return imp


QUERY_COUNT_KEYS = {"query": ["query_key"], "query_product": ["query_key", "product_id"],
                    "query_aisle": ["query_key", "aisle_name"]}


def test_query_counts_use_only_earlier_days(query_keyed: pd.DataFrame, tiny_workdir: Path) -> None:
    """Each query counting feature equals its value recomputed from the impressions of earlier
    days only: smoothed past CTR and log(1 + past impressions) of the query, (query, product) and
    (query, aisle)."""
    clicks = _manifest(tiny_workdir)["settings"]["click_model"]
    prior, strength = clicks["ctr_prior"], clicks["ctr_prior_strength"]
    assert [f.name for f in QUERY_COUNT_FEATURES] == [
        f"dense_{level}_{what}_past" for level in QUERY_COUNT_KEYS for what in ("ctr", "log_impressions")]
    for level, keys in QUERY_COUNT_KEYS.items():
        before = _counts_before_day(query_keyed, keys)
        np.testing.assert_allclose(query_keyed[f"dense_{level}_ctr_past"],
                                   (before["sum"] + strength * prior) / (before["size"] + strength), rtol=1e-6,
                                   err_msg=level)
        np.testing.assert_allclose(query_keyed[f"dense_{level}_log_impressions_past"], np.log1p(before["size"]),
                                   rtol=1e-6, err_msg=level)
        assert (before["size"] > 0).sum() > 50 and (before["sum"] > 0).any(), level  # not trivially the prior


def test_a_query_never_seen_on_an_earlier_day_gets_the_prior(query_keyed: pd.DataFrame, tiny_workdir: Path) -> None:
    prior = np.float32(_manifest(tiny_workdir)["settings"]["click_model"]["ctr_prior"])
    first_day = query_keyed.groupby("query_key").day.transform("min")
    new = query_keyed[query_keyed.day == first_day]  # the query's first day, the same day's rows not counted
    assert 0.1 < len(new) / len(query_keyed) < 0.9
    for level in QUERY_COUNT_KEYS:
        assert (new[f"dense_{level}_ctr_past"] == prior).all() and (new[f"dense_{level}_log_impressions_past"] == 0).all()
    seen = query_keyed[query_keyed.day > first_day]
    assert (seen["dense_query_log_impressions_past"] > 0).all()
    assert (seen["dense_query_ctr_past"] != prior).any()


def test_query_count_smoothing_and_same_day_exclusion() -> None:
    """Past counts move the CTR from the prior toward the observed rate by the pseudo-count;
    impressions of the day being featured are not counted until the day is added."""
    counts = QueryCountFeatures(n_products=10, n_aisles=3, prior=0.04, strength=20.0)
    query = np.array([7, 7, 7, 7, 9], dtype=np.uint64)  # query hashes
    product, aisle = np.array([1, 1, 2, 3, 1]), np.array([0, 0, 0, 2, 0])
    before = counts.features(query, product, aisle)
    assert all((col == np.float32(0.04)).all() for col in before[0::2]) and all((col == 0).all() for col in before[1::2])
    counts.add_day(query, product, aisle, clicked=np.array([1, 0, 1, 0, 0], dtype=np.int8))
    probe = counts.features(np.array([7, 7, 7, 8], dtype=np.uint64), np.array([1, 3, 4, 1]), np.array([0, 2, 1, 0]))
    names = [f.name for f in QUERY_COUNT_FEATURES]
    got = {name: col for name, col in zip(names, probe)}
    smoothed = lambda clicks, imps: np.float32((clicks + 20 * 0.04) / (imps + 20))  # noqa: E731
    np.testing.assert_array_equal(got["dense_query_ctr_past"], [smoothed(2, 4)] * 3 + [np.float32(0.04)])
    np.testing.assert_array_equal(got["dense_query_log_impressions_past"], np.float32([np.log1p(4)] * 3 + [0]))
    np.testing.assert_array_equal(got["dense_query_product_ctr_past"],
                                  [smoothed(1, 2), smoothed(0, 1), np.float32(0.04), np.float32(0.04)])
    np.testing.assert_array_equal(got["dense_query_aisle_ctr_past"],
                                  [smoothed(2, 3), smoothed(0, 1), np.float32(0.04), np.float32(0.04)])
    assert counts.sizes() == {"queries": 2, "query": 2, "query_product": 4, "query_aisle": 3}


def test_query_count_columns_meet_the_schema(tiny_workdir: Path, query_keyed: pd.DataFrame) -> None:
    """The six columns are float32 ``dense_*`` features that data.schema validates and the ranking
    stage discovers; the manifest records the setting and the accumulators' distinct keys."""
    assert schema.validate_tables(tiny_workdir, check_images=False)["impressions"] == len(query_keyed)
    file_schema = pq.read_schema(tiny_workdir / "data" / "impressions.parquet")
    dense, _ = schema.feature_columns(file_schema.names)
    for f in QUERY_COUNT_FEATURES:
        assert f.name in dense and file_schema.field(f.name).type == "float"
    ctr = query_keyed[[f"dense_{level}_ctr_past" for level in QUERY_COUNT_KEYS]].to_numpy()
    assert ((ctr > 0) & (ctr < 1)).all()
    manifest = _manifest(tiny_workdir)
    assert manifest["settings"]["query_counts"] is True
    assert manifest["query_count_keys"] == {"queries": query_keyed.query_key.nunique(),
                                            **{level: len(query_keyed.drop_duplicates(keys))
                                               for level, keys in QUERY_COUNT_KEYS.items()}}


def test_no_query_counts_gives_the_baseline_without_them(tiny_workdir: Path, tmp_path: Path) -> None:
    """--no-query-counts leaves every other column and table as it is and records the setting."""
    synth.main(["--profile", "tiny", "--workdir", str(tmp_path), "--seed", "0", "--no-query-counts"])
    plain = pq.read_table(tmp_path / "data" / "impressions.parquet")
    counted = pq.read_table(tiny_workdir / "data" / "impressions.parquet")
    assert plain.equals(counted.drop_columns([f.name for f in QUERY_COUNT_FEATURES]))
    for name in ("catalog.parquet", "relevance.parquet", "purchases.parquet", TRUTH_FILE):
        assert (tmp_path / "data" / name).read_bytes() == (tiny_workdir / "data" / name).read_bytes(), name
    manifest = _manifest(tmp_path)
    assert manifest["settings"]["query_counts"] is False and manifest["query_count_keys"] is None


def test_impressions_are_time_ordered_sessions(tables: dict[str, pd.DataFrame], tiny_workdir: Path) -> None:
    imp, cfg = tables["impressions"], synth.PROFILES["tiny"]
    assert imp.ts.is_monotonic_increasing and tables["purchases"].ts.is_monotonic_increasing
    assert imp.session_id.is_monotonic_increasing
    per_session = imp.groupby("session_id").position.agg(["min", "max", "size", "nunique"])
    assert (per_session["min"] == 0).all() and (per_session["max"] == per_session["size"] - 1).all()
    assert (per_session["nunique"] == per_session["size"]).all() and per_session["size"].max() <= cfg.max_candidates
    assert imp.groupby("session_id").ts.nunique().max() == 1 and imp.groupby("session_id").user_id.nunique().max() == 1
    days = (imp.ts.max() - imp.ts.min()).days
    assert cfg.n_days - 3 <= days + 1 <= cfg.n_days
    sparse = [c for c in imp.columns if c.startswith(schema.SPARSE_PREFIX)]
    card = _manifest(tiny_workdir)["sparse_cardinality"]
    assert all((imp[c] >= 0).all() and (imp[c] < card[c]).all() for c in sparse)


def test_a_share_of_users_never_buys_but_still_searches(tables: dict[str, pd.DataFrame]) -> None:
    n_users = synth.PROFILES["tiny"].n_users
    buyers = set(tables["purchases"].user_id)
    assert 0.15 <= 1 - len(buyers) / n_users <= 0.45
    assert (~tables["impressions"].user_id.isin(buyers)).mean() > 0.1


def test_eval_week_has_mostly_unseen_queries(tables: dict[str, pd.DataFrame], tiny_workdir: Path) -> None:
    imp, manifest = tables["impressions"], _manifest(tiny_workdir)
    query = imp["query"].map(normalize_query)
    in_eval = imp.ts >= pd.Timestamp(manifest["eval_week_start"], tz=imp.ts.dt.tz)
    unseen = ~query[in_eval].isin(set(query[~in_eval]))
    assert unseen.mean() > 0.3
    assert manifest["eval_share_of_impressions_with_unseen_query"] == pytest.approx(unseen.mean(), abs=1e-4)
    assert query.nunique() > 0.4 * imp.session_id.nunique()  # a long tail of distinct queries


def test_complete_judgments_contain_every_judged_relevant_pair(tables: dict[str, pd.DataFrame],
                                                               tiny_workdir: Path) -> None:
    """synth_relevance_truth.parquet lists every MR/HR product of each query: the noise-free
    relevance table's MR/HR pairs are in it with the same label, its IR pairs are not, and it knows
    many relevant products the relevance table never judged."""
    truth = pq.read_table(tiny_workdir / "data" / RELEVANCE_TRUTH_FILE).to_pandas()
    assert set(truth["label"]) == {schema.MR, schema.HR}
    assert not truth.duplicated(["query", "product_id"]).any()
    assert set(truth["query"]) == set(tables["relevance"]["query"])  # the tiny profile covers every query
    merged = tables["relevance"].merge(truth, on=["query", "product_id"], how="left", suffixes=("", "_truth"))
    judged_relevant = merged["label"] >= schema.MR
    assert (merged.loc[judged_relevant, "label_truth"] == merged.loc[judged_relevant, "label"]).all()
    assert merged.loc[~judged_relevant, "label_truth"].isna().all()
    assert len(truth) > 2 * judged_relevant.sum()


def test_label_noise_flips_adjacent_labels_and_is_recorded(tiny_workdir: Path, tmp_path: Path) -> None:
    noisy_dir = tmp_path / "noisy"
    synth.main(["--profile", "tiny", "--workdir", str(noisy_dir), "--seed", "0", "--label-noise", "0.2"])
    clean = schema.read_table(tiny_workdir, "relevance").to_pandas()
    noisy = schema.read_table(noisy_dir, "relevance").to_pandas()
    assert clean[["query", "product_id"]].equals(noisy[["query", "product_id"]])
    changed = clean.label != noisy.label
    assert 0.15 <= changed.mean() <= 0.25
    assert ((clean.label[changed].astype(int) - noisy.label[changed].astype(int)).abs() == 1).all()
    manifest = _manifest(noisy_dir)
    assert manifest["settings"]["label_noise"] == 0.2 and manifest["labels_flipped"] == int(changed.sum())
    assert manifest["label_split_clean"] == _manifest(tiny_workdir)["label_split"]


# ---- the relevance rule, vocabulary and images


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return build_catalog(synth.PROFILES["demo"], 0, ClickModel())


def _intent(catalog: Catalog, kind: int, product: int) -> Intents:
    return sample_intents(np.random.default_rng(0), catalog, np.array([product]),
                          Behaviour(intent_kind_probs=tuple(float(k == kind) for k in range(7)),
                                    organic_query_share=0.0))


def test_relevance_rule_on_hand_picked_products(catalog: Catalog) -> None:
    target = int(np.flatnonzero(np.bincount(catalog.brand) > 5)[0])  # a brand with several products
    p = int(np.flatnonzero(catalog.brand == target)[0])
    same_type_other_brand = np.flatnonzero((catalog.type == catalog.type[p]) & (catalog.brand != catalog.brand[p]))
    group = catalog.vocab.type_group
    related_type = np.flatnonzero((group[catalog.type] == group[catalog.type[p]]) & (catalog.type != catalog.type[p]))
    other_aisle_group = catalog.vocab.aisle_group_ids[catalog.aisle] != catalog.vocab.aisle_group_ids[catalog.aisle[p]]
    far = np.flatnonzero(other_aisle_group)
    brand_type = _intent(catalog, BRAND_TYPE, p)

    def label(intent: Intents, product: int) -> int:
        return int(relevance_labels(catalog, intent, np.array([product]))[0])

    assert label(brand_type, p) == schema.HR
    assert len(same_type_other_brand) and label(brand_type, int(same_type_other_brand[0])) == schema.MR
    if len(related_type):
        assert label(brand_type, int(related_type[0])) == schema.MR
    assert label(brand_type, int(far[0])) == schema.IR
    aisle = _intent(catalog, AISLE, p)
    assert label(aisle, int(np.flatnonzero(catalog.aisle == catalog.aisle[p])[-1])) == schema.HR
    assert label(aisle, int(far[0])) == schema.IR
    variant = _intent(catalog, TYPE_VARIANT, p)
    other_variant = np.flatnonzero((catalog.type == catalog.type[p]) & (catalog.variant != catalog.variant[p]))
    assert label(variant, p) == schema.HR
    if len(other_variant):
        assert label(variant, int(other_variant[0])) == schema.MR


def test_queries_name_the_intent_attributes(catalog: Catalog) -> None:
    p = int(np.flatnonzero(catalog.variant_in_title)[0])
    intent = _intent(catalog, BRAND_TYPE_VARIANT, p)
    behaviour = Behaviour(query_synonym_share=0, query_modifier_share=0, query_swap_share=0,
                          query_misspell_share=0, query_capital_share=0)
    (query,) = render_queries(np.random.default_rng(0), catalog, intent, behaviour)
    v = catalog.vocab
    assert query == " ".join([catalog.brand_name[catalog.brand[p]].lower(), v.variant_names[catalog.variant[p]],
                              v.types[catalog.type[p]].name])


def test_vocabulary_is_rich_and_unambiguous() -> None:
    v = vocabulary()
    assert len(v.aisles) >= 20 and len(v.types) >= 100
    owners: dict[str, set[str]] = {}
    for kind, name, words in ([("type", t.name, (t.name, *t.synonyms)) for t in v.types]
                              + [("aisle", a.name, (a.name, *a.synonyms)) for a in v.aisles]):
        for w in words:
            owners.setdefault(w, set()).add(f"{kind}:{name}")
    assert {w: o for w, o in owners.items() if len(o) > 1} == {}
    for group in v.groups:  # a variant must be recognisable from its colour alone
        colours = [np.array(v.variant_rgb[i], dtype=float) for i in group.variants]
        assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(colours, 2)) >= 55, group.name


def test_catalog_titles_and_image_only_facts(tables: dict[str, pd.DataFrame]) -> None:
    cat = tables["catalog"]
    assert cat.aisle.nunique() >= 20 and cat.brand.notna().all() and cat.image.notna().all()
    hidden = cat[~cat.variant_in_title]
    assert 0.15 <= len(hidden) / len(cat) <= 0.45  # the variant shows only as the packshot colour
    assert not any(_title_case(v) in t.replace(_title_case(p), "")  # "Ginger Ale" without "Ginger"
                   for t, v, p in zip(hidden.title, hidden.variant, hidden.product_type))
    shown = cat[cat.variant_in_title]
    assert all(_title_case(v) in t for t, v in zip(shown.title, shown.variant))
    organic_only_image = cat[cat.organic & ~cat.organic_in_title]
    assert all("Organic" not in t for t in organic_only_image.title)
    img = Image.open(io.BytesIO(cat.image.iloc[0]))
    assert img.format == "PNG" and img.size == (synth.PROFILES["tiny"].image_px,) * 2


def test_packshot_shows_variant_colour_and_organic_badge() -> None:
    base = Packshot("bottle", (200, 16, 46), (30, 60, 160), "Fizzly", organic=False)
    pixels = np.asarray(Image.open(io.BytesIO(render(base))).convert("RGB"))
    assert (np.abs(pixels.astype(int) - (200, 16, 46)).sum(-1) < 10).mean() > 0.1  # the body has the variant colour
    other_variant = Packshot("bottle", (40, 120, 200), (30, 60, 160), "Fizzly", organic=False)
    organic = Packshot("bottle", (200, 16, 46), (30, 60, 160), "Fizzly", organic=True)
    images = {render(s) for s in (base, other_variant, organic)}
    assert len(images) == 3 and render(base) == render(base)
    for container in ("can", "box", "bag", "jar", "tube", "carton", "tub", "pouch", "tray", "pack"):
        assert Image.open(io.BytesIO(render(Packshot(container, (1, 2, 3), (4, 5, 6), "X", True), 64))).size == (64, 64)


# ---- bad input on the command line


@pytest.mark.parametrize("args, expected", [
    (["--profile", "huge"], "unknown --profile 'huge'"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--label-noise", "1.5"], "--label-noise must be in [0, 1]"),
])
def test_cli_rejects_bad_flags_in_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    proc = _run_cli("--workdir", str(tmp_path / "w"), "--profile", "tiny", *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("*.parquet"))


def test_cli_workdir_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("not a directory")
    proc = _run_cli("--profile", "tiny", "--workdir", str(target))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "not a directory" in proc.stderr
    assert target.read_text() == "not a directory"


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def _mount_small_tmpfs(path: Path) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("how", ["enospc", "file_size_limit"])
def test_cli_full_disk_is_one_line_and_keeps_old_outputs(tmp_path: Path, how: str) -> None:
    workdir = tmp_path / "disk"
    if how == "enospc" and not _mount_small_tmpfs(workdir):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        old = {"catalog.parquet": b"old catalog", "manifest.json": b'{"old": true}'}
        for name, content in old.items():
            (workdir / "data" / name).write_bytes(content)
        proc = _run_cli("--profile", "tiny", "--workdir", str(workdir), "--seed", "3",
                        preexec_fn=_limit_file_size if how == "file_size_limit" else None)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
        assert lines[-1].startswith("error: cannot write the tables under")
        assert sum(line.startswith("error") or "Error" in line for line in lines) == 1
        assert {p.name: p.read_bytes() for p in (workdir / "data").iterdir()} == old  # no temp file left behind
    finally:
        if how == "enospc":
            subprocess.run(["umount", str(workdir)], capture_output=True)


def test_killed_between_renames_leaves_the_old_data_set(tiny_workdir_copy: Path) -> None:
    """kill -9 after two tables of a new seed were renamed into place: the next reader rolls the
    set back to the old seed, and nothing trusts a mix of two seeds."""
    tables = [tiny_workdir_copy / "data" / f"{name}.parquet" for name in schema.TABLE_NAMES]
    before = [p.read_bytes() for p in tables]
    script = (
        "import os, sys\n"
        "real, calls = os.replace, []\n"
        "def replace(src, dst):\n"
        "    calls.append(dst)\n"
        "    if str(dst).endswith('relevance.parquet'):\n"
        "        os._exit(9)\n"
        "    real(src, dst)\n"
        "os.replace = replace\n"
        "from data import synth\n"
        f"synth.main(['--profile', 'tiny', '--seed', '1', '--workdir', {str(tiny_workdir_copy)!r}])\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert tables[0].read_bytes() != before[0]  # the new catalog is in place, the manifest gone: a mix
    assert not (tiny_workdir_copy / "data" / "manifest.json").exists()
    validate = subprocess.run([sys.executable, "-m", "data.validate", "--workdir", str(tiny_workdir_copy)],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    assert validate.returncode == 0, validate.stderr[-2000:]
    assert [p.read_bytes() for p in tables] == before
    assert _manifest(tiny_workdir_copy)["settings"]["seed"] == 0
    assert not [p.name for p in (tiny_workdir_copy / "data").iterdir() if p.name.startswith(".")]
