"""Validate a workdir's four data tables against the contract (:mod:`data.schema`).

``python -m data.validate --workdir DIR`` checks catalog, relevance, impressions and purchases
(columns, dtypes, nulls, labels, finite dense features, queries that survive normalisation,
product ids known to the catalog, decodable images, a non-empty catalog and relevance labels
with positives) and prints the row count of each table. A violation prints one line naming the
file, the column and the row or value, and exits with code 2. A publication of ``data.synth`` or an
adapter that a killed run left half done is rolled back first (:meth:`common.provenance.OutputSet.recover`);
whether the files are still the published set is the stages' check (:func:`data.dataset.input_hashes`),
not this one: a hand-edited table is validated for what it holds. Stages run the same content
checks on the tables they read with :func:`data.schema.validate_tables`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from common.cli import DEFAULT_WORKDIR, UserError, parse_config, run_main
from data.dataset import data_set
from data.schema import TableName, validate_workdir


@dataclass
class ValidateArgs:
    """Validate DIR/data/{catalog,relevance,impressions,purchases}.parquet."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory"})
    check_images: bool = field(default=True, metadata={"help": "decode every catalog image"})


def main(argv: Sequence[str] | None = None) -> dict[TableName, int]:
    """Validate the workdir's tables (a :class:`~data.schema.SchemaError` is a one-line UserError); print row counts."""
    args = parse_config(ValidateArgs, argv)
    workdir = Path(args.workdir)
    if not workdir.is_dir():
        raise UserError(f"workdir {workdir} does not exist or is not a directory")
    data_set(workdir, []).recover()
    counts = validate_workdir(workdir, check_images=args.check_images)
    for name, rows in counts.items():
        print(f"{name}\t{rows}")
    return counts


if __name__ == "__main__":
    run_main(main)
