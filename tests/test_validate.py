"""Stage-side validation: validate_tables on exactly the tables a stage reads, streamed row numbers,
embeddings-only sources, and undecodable images caught as one line wherever they surface."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from common.cli import run_main
from data import schema
from data.schema import SchemaError, read_table, validate, validate_tables, validate_workdir
from embeddings.inputs import ImageSpec, ImageStore
from tests.test_schema import REPO, _load, _save, _set_value, jpeg_bytes


@pytest.mark.parametrize("name, column, value, expected", [
    ("relevance", "label", 3, "value 3 at row 7"),
    ("impressions", "dense_price", float("nan"), "value nan at row 7"),
    ("impressions", "query", "\u2764\ufe0f", "at row 7 normalises to the empty string"),
])
def test_streamed_rows_are_counted_from_the_file_start(tiny_workdir_copy: Path, name: str, column: str, value,
                                                       expected: str) -> None:
    _save(tiny_workdir_copy, name, _set_value(_load(tiny_workdir_copy, name), column, 7, value))
    with pytest.raises(SchemaError, match=f"column '{column}'.*{expected}"):
        validate_tables(tiny_workdir_copy, [name], batch_rows=3)


def test_validate_tables_checks_exactly_the_named_tables(tiny_workdir_copy: Path) -> None:
    _save(tiny_workdir_copy, "purchases", _set_value(_load(tiny_workdir_copy, "purchases"), "product_id", 0, 777_777))
    counts = validate_tables(tiny_workdir_copy, ["relevance"])
    assert set(counts) == {"catalog", "relevance"}  # the catalog always: it is the reference of product ids
    assert counts["relevance"] == _load(tiny_workdir_copy, "relevance").num_rows
    with pytest.raises(SchemaError, match=r"purchases\.parquet: column 'product_id': product_id 777777 at row 0"):
        validate_tables(tiny_workdir_copy, ["purchases"])


def test_embeddings_only_source_may_have_no_clicks(tiny_workdir_copy: Path) -> None:
    """Like data.adapters.fashion: impressions and purchases written empty with the contract's schema."""
    for name in ("impressions", "purchases"):
        _save(tiny_workdir_copy, name, schema.schema(name).empty_table())
    counts = validate_workdir(tiny_workdir_copy, check_images=False)
    assert counts["impressions"] == counts["purchases"] == 0 and counts["relevance"] > 0
    with pytest.raises(SchemaError, match=r"impressions\.parquet: the impressions table is empty \(0 rows\)"):
        validate_tables(tiny_workdir_copy, ["impressions", "purchases"], require_rows=["impressions"])


def test_an_empty_file_still_has_its_columns_checked(tiny_workdir_copy: Path) -> None:
    _save(tiny_workdir_copy, "purchases", schema.schema("purchases").empty_table().drop_columns(["ts"]))
    with pytest.raises(SchemaError, match=r"purchases\.parquet: column 'ts': missing required column"):
        validate_tables(tiny_workdir_copy, ["purchases"])


def test_non_ascii_queries_that_keep_a_character_pass(tiny_workdir: Path) -> None:
    relevance = _load(tiny_workdir, "relevance")
    for row, query in enumerate(["\u725b\u5976", "caf\u00e9 \U0001F355", "\uff23\uff21\uff34 food", "\u00aa"]):
        relevance = _set_value(relevance, "query", row, query)
    assert validate(relevance, "relevance.parquet", "relevance").num_rows == relevance.num_rows


def test_column_subset_names_a_missing_column(tiny_workdir: Path) -> None:
    with pytest.raises(SchemaError, match=r"relevance\.parquet: column 'nope': missing column"):
        read_table(tiny_workdir, "relevance", columns=["nope"])


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("blob", [b"not an image", jpeg_bytes(truncated=True)], ids=["junk", "truncated_jpeg"])
def test_image_store_names_the_product_of_an_undecodable_blob(tmp_path: Path, blob: bytes,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "catalog.parquet"
    store = ImageStore([_png(), jpeg_bytes(), blob], [10, 11, 12], ImageSpec(16, (0.5,) * 3, (0.5,) * 3),
                       source=source)
    assert store.pixels([0, 1]).shape == (2, 3, 16, 16)
    with pytest.raises(SchemaError) as info:
        store.pixels([0, 2])
    message = str(info.value)
    assert message.startswith(f"{source}: column 'image': cannot decode the image at row 2 (product_id 12)")
    assert "\n" not in message and "BytesIO" not in message
    with pytest.raises(SystemExit) as exit_info:  # a stage command prints it as one line, exit 2
        run_main(lambda argv: store.pixels([2]), [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


def test_validate_cli_names_the_image_row_and_product(tiny_workdir_copy: Path) -> None:
    path = _save(tiny_workdir_copy, "catalog", _set_value(_load(tiny_workdir_copy, "catalog"), "image", 2,
                                                          b"\xff\xd8 not a jpeg"))
    proc = subprocess.run([sys.executable, "-m", "data.validate", "--workdir", str(tiny_workdir_copy)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {path}: column 'image': unreadable image at row 2 (product_id 3): "
                     f"not an image (expected PNG or JPEG bytes)"]


def test_check_catalog_images_counts_rows_from_first_row(tiny_workdir: Path) -> None:
    catalog = _load(tiny_workdir, "catalog").slice(0, 4)
    bad = _set_value(catalog, "image", 1, b"junk")
    schema.check_catalog_images(catalog, "catalog.parquet")
    with pytest.raises(SchemaError, match=r"unreadable image at row 101 \(product_id 2\)"):
        schema.check_catalog_images(bad, "catalog.parquet", first_row=100)
