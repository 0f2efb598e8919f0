"""The data contract: every kind of bad table is rejected with a message naming file, column and row/value."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data import schema
from data.schema import SchemaError, read_table, validate, validate_workdir

REPO = Path(__file__).resolve().parents[1]


def _load(workdir: Path, name: str) -> pa.Table:
    return pq.read_table(schema.table_path(workdir, name))


def _save(workdir: Path, name: str, table: pa.Table) -> Path:
    path = schema.table_path(workdir, name)
    pq.write_table(table, path)
    return path


def _replace(table: pa.Table, column: str, array: pa.Array) -> pa.Table:
    idx = table.column_names.index(column)
    return table.set_column(idx, pa.field(column, array.type), array)


def _set_value(table: pa.Table, column: str, row: int, value, type_: pa.DataType | None = None) -> pa.Table:
    values = table.column(column).to_pylist()
    values[row] = value
    return _replace(table, column, pa.array(values, type_ or table.schema.field(column).type))


def jpeg_bytes(truncated: bool = False) -> bytes:
    """A small noisy JPEG, or its first half (decodes no further than the cut)."""
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    blob = buf.getvalue()
    return blob[:len(blob) // 2] if truncated else blob


Mutation = Callable[[pa.Table], pa.Table]

BAD_TABLES: dict[str, tuple[str, Mutation, list[str]]] = {
    # case: (table, mutation, substrings the error must contain besides the file name)
    "missing_column": ("catalog", lambda t: t.drop_columns(["title"]), ["'title'", "missing required column"]),
    "wrong_dtype": ("relevance", lambda t: _replace(t, "product_id", pc.cast(t.column("product_id"), pa.string())),
                    ["'product_id'", "expected dtype int64, got string"]),
    "null_not_allowed": ("impressions", lambda t: _set_value(t, "query", 5, None), ["'query'", "null at row 5"]),
    "label_outside_set": ("relevance", lambda t: _set_value(t, "label", 7, 3), ["'label'", "3", "at row 7"]),
    "clicked_outside_set": ("impressions", lambda t: _set_value(t, "clicked", 4, 2), ["'clicked'", "2", "at row 4"]),
    "impression_unknown_product": ("impressions", lambda t: _set_value(t, "product_id", 3, 999_999),
                                   ["'product_id'", "product_id 999999 at row 3 is not in the catalog"]),
    "relevance_unknown_product": ("relevance", lambda t: _set_value(t, "product_id", 11, 888_888),
                                  ["'product_id'", "product_id 888888 at row 11 is not in the catalog"]),
    "purchase_unknown_product": ("purchases", lambda t: _set_value(t, "product_id", 0, 777_777),
                                 ["'product_id'", "product_id 777777 at row 0"]),
    "unreadable_image": ("catalog", lambda t: _set_value(t, "image", 2, b"\x89PNG but not really"),
                         ["'image'", "unreadable image at row 2 (product_id 3)"]),
    "duplicate_product": ("catalog", lambda t: _set_value(t, "product_id", 9, 1),
                          ["'product_id'", "duplicate product_id 1 at row 9"]),
    "negative_sparse_id": ("impressions", lambda t: _set_value(t, "sparse_store", 6, -1),
                           ["'sparse_store'", "negative id -1 at row 6"]),
    "non_numeric_dense": ("impressions", lambda t: _replace(t, "dense_price", pc.cast(t.column("dense_price"),
                                                                                        pa.string())),
                          ["'dense_price'", "dense feature must be numeric"]),
    "float_timestamp": ("purchases", lambda t: _replace(t, "ts", pa.array(np.zeros(t.num_rows))),
                        ["'ts'", "expected dtype timestamp[s], got double"]),
    "nan_dense": ("impressions", lambda t: _set_value(t, "dense_price", 5, float("nan")),
                  ["'dense_price'", "value nan at row 5 is not a finite float32"]),
    "inf_dense": ("impressions", lambda t: _set_value(t, "dense_discount", 8, float("-inf")),
                  ["'dense_discount'", "value -inf at row 8"]),
    "dense_overflows_float32": ("impressions", lambda t: _set_value(t, "dense_hour", 3, 1e39, pa.float64()),
                                ["'dense_hour'", "value 1e+39 at row 3 is not a finite float32"]),
    "emoji_query": ("relevance", lambda t: _set_value(t, "query", 4, "\U0001F355\U0001F355!"),
                    ["'query'", "query '\U0001F355\U0001F355!' at row 4 normalises to the empty string"]),
    "blank_impression_query": ("impressions", lambda t: _set_value(t, "query", 2, " \t "),
                               ["'query'", "query ' \\t ' at row 2 normalises to the empty string"]),
    "truncated_jpeg": ("catalog", lambda t: _set_value(t, "image", 2, jpeg_bytes(truncated=True)),
                       ["'image'", "unreadable image at row 2 (product_id 3)", "truncated"]),
    "empty_catalog": ("catalog", lambda t: t.slice(0, 0), ["the catalog table is empty (0 rows)"]),
    "empty_relevance": ("relevance", lambda t: t.slice(0, 0), ["the relevance table is empty (0 rows)"]),
    "relevance_without_positives": ("relevance", lambda t: t.filter(pc.equal(t.column("label"), schema.IR)),
                                    ["'label'", "no MR (1) or HR (2) label"]),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_bad_table_is_rejected_with_file_column_and_row(tiny_workdir_copy: Path, case: str) -> None:
    name, mutate, expected = BAD_TABLES[case]
    path = _save(tiny_workdir_copy, name, mutate(_load(tiny_workdir_copy, name)))
    with pytest.raises(SchemaError) as info:
        validate_workdir(tiny_workdir_copy, check_images=True)
    message = str(info.value)
    assert message.startswith(str(path)), message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert "\n" not in message


def test_bad_label_value_is_printed_plainly(tiny_workdir_copy: Path) -> None:
    table = _set_value(_load(tiny_workdir_copy, "relevance"), "label", 7, 3)
    with pytest.raises(SchemaError, match=r"value 3 at row 7"):
        validate(table, "relevance.parquet", "relevance")


def test_valid_workdir_passes_and_reads_canonical_dtypes(tiny_workdir: Path) -> None:
    counts = validate_workdir(tiny_workdir, check_images=True)
    assert set(counts) == set(schema.TABLE_NAMES) and all(n > 0 for n in counts.values())
    impressions = read_table(tiny_workdir, "impressions")
    for col in schema.COLUMNS["impressions"]:
        assert impressions.schema.field(col.name).type == col.dtype  # ts comes back as timestamp[s]
    dense, sparse = schema.feature_columns(impressions.column_names)
    assert dense and sparse
    assert all(impressions.schema.field(c).type == pa.float32() for c in dense)
    assert all(impressions.schema.field(c).type == pa.int64() for c in sparse)


def test_compatible_dtypes_are_cast_not_rejected(tiny_workdir: Path) -> None:
    relevance = _load(tiny_workdir, "relevance")
    narrow = _replace(_replace(relevance, "product_id", pc.cast(relevance.column("product_id"), pa.int32())),
                      "query", pc.cast(relevance.column("query"), pa.large_string()))
    out = validate(narrow, "relevance.parquet", "relevance")
    assert out.schema.field("product_id").type == pa.int64()
    assert out.schema.field("query").type == pa.string()
    assert out.column("product_id").equals(relevance.column("product_id"))


def test_missing_table_file_names_it(tiny_workdir_copy: Path) -> None:
    schema.table_path(tiny_workdir_copy, "purchases").unlink()
    with pytest.raises(SchemaError, match=r"purchases\.parquet: missing table file"):
        validate_workdir(tiny_workdir_copy)


def _run_validate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.validate", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_validate_cli_prints_row_counts(tiny_workdir: Path) -> None:
    proc = _run_validate("--workdir", str(tiny_workdir), "--no-check-images")
    assert proc.returncode == 0, proc.stderr
    counts = dict(line.split("\t") for line in proc.stdout.strip().splitlines())
    assert counts == {k: str(v) for k, v in validate_workdir(tiny_workdir, check_images=False).items()}


def test_validate_cli_bad_table_is_one_line_exit_2(tiny_workdir_copy: Path) -> None:
    _save(tiny_workdir_copy, "relevance", _set_value(_load(tiny_workdir_copy, "relevance"), "label", 7, 5))
    proc = _run_validate("--workdir", str(tiny_workdir_copy))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "relevance.parquet" in lines[0] and "'label'" in lines[0] and "row 7" in lines[0]
