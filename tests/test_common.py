"""Shared plumbing: CLI generation from dataclasses, atomic writes, query normalisation, tables."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.cli import UserError, parse_config
from common.io import atomic_path, prepare_workdir, write_json, read_json
from data.schema import SchemaError
from data.text import normalize_query
from embeddings import tables


@dataclasses.dataclass
class _Config:
    workdir: str = dataclasses.field(default="runs/demo", metadata={"help": "run directory"})
    profile: Literal["tiny", "demo"] = "demo"
    seed: int = 0
    force: bool = False
    rate: float = 0.5


def test_parse_config_flags_types_and_choices():
    cfg = parse_config(_Config, ["--workdir", "x", "--profile", "tiny", "--seed", "3", "--force", "--rate", "0.25"])
    assert cfg == _Config("x", "tiny", 3, True, 0.25)
    assert parse_config(_Config, []) == _Config()
    with pytest.raises(SystemExit):
        parse_config(_Config, ["--profile", "huge"])


def test_atomic_path_keeps_old_file_on_failure(tmp_path: Path):
    target = tmp_path / "out.json"
    write_json({"a": 1}, target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("killed")
    assert read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_prepare_workdir_rejects_a_file(tmp_path: Path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        prepare_workdir(f, "data")


def test_normalize_query():
    assert normalize_query("  Coca-Cola   ZERO!! ") == "coca-cola zero"
    assert normalize_query("Ben & Jerry's\tIce Cream") == "ben & jerry's ice cream"
    assert normalize_query("ＣＡＴ food") == "cat food"  # NFKC full-width


def test_embedding_table_round_trip(tmp_path: Path):
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(3, 4)).astype(np.float32)
    table = tables.build_table("query", ["Cola", "chips ", "Dog Food"], vecs, source="test")
    path = tables.write_table(table, tmp_path / "query_table.parquet")
    back = tables.read_embedding_table(path, "query")
    assert list(back.keys) == [None, "cola", "chips", "dog food"] and back.keys == table.keys
    np.testing.assert_array_equal(back.vectors[1:], vecs)
    assert not back.vectors[0].any()
    np.testing.assert_array_equal(back.lookup(["CHIPS", "unknown"]), [2, 0])
    with pytest.raises(SchemaError, match="expected a product table"):
        tables.read_embedding_table(path, "product")
    # an encoder writes into table_array(...)[1:]: the table takes that array as it is, no copy
    full = tables.table_array(3, 4)
    full[1:] = vecs
    in_place = tables.build_table("query", ["Cola", "chips ", "Dog Food"], full, source="test")
    assert in_place.vectors is full and np.array_equal(in_place.vectors, table.vectors)
    write_twice = tables.write_table(in_place, tmp_path / "again.parquet")
    assert write_twice.read_bytes() == path.read_bytes()
    full[0, 1] = 1.0  # row 0 must be the zero row: then it is one row too many
    with pytest.raises(ValueError, match=r"row 0 zeros"):
        tables.build_table("query", ["Cola", "chips ", "Dog Food"], full)


def test_embedding_table_reads_row_group_by_row_group(tmp_path: Path):
    """A table of more than one row group reads back bit for bit into one writable array, and the
    id map reads the keys alone; a null vector is named."""
    rows = tables.ROW_GROUP_ROWS + 1000
    vecs = np.random.default_rng(1).normal(size=(rows, 3)).astype(np.float32)
    ids = list(range(100, 100 + rows))
    path = tables.write_table(tables.build_table("product", ids, vecs, source="test"), tmp_path / "product_table.parquet")
    assert pq.ParquetFile(path).metadata.num_row_groups == 2
    back = tables.read_embedding_table(path, "product")
    np.testing.assert_array_equal(back.vectors[1:], vecs)
    assert back.vectors.flags.writeable and back.vectors.dtype == np.float32
    assert tables.read_table_keys(path, "product")[1] == back.keys and back.keys[1:] == ids
    np.testing.assert_array_equal(back.lookup([ids[-1], ids[0], 7]), [rows, 1, 0])
    arrow = pq.read_table(path)
    column = arrow.column("vector").combine_chunks()
    with_null = pa.FixedSizeListArray.from_arrays(column.flatten(), 3, mask=pa.array(np.arange(len(column)) == 5))
    pq.write_table(arrow.set_column(2, "vector", with_null).replace_schema_metadata(arrow.schema.metadata),
                   tmp_path / "null.parquet")
    with pytest.raises(SchemaError, match="vector.*1 null vectors"):
        tables.read_embedding_table(tmp_path / "null.parquet", "product")


def test_embedding_table_rejects_duplicates_and_missing(tmp_path: Path):
    with pytest.raises(ValueError, match="not unique"):
        tables.build_table("query", ["Cola", "cola"], np.zeros((2, 2)))
    with pytest.raises(SchemaError, match="missing embedding table"):
        tables.read_embedding_table(tmp_path / "nope.parquet")
