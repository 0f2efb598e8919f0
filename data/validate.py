"""Validate a workdir's four data tables against the contract (:mod:`data.schema`).

``python -m data.validate --workdir DIR`` checks catalog, relevance, impressions and purchases
(columns, dtypes, nulls, labels, product ids known to the catalog, decodable images) and prints
the row count of each table. A violation prints one line naming the file, the column and the
row or value, and exits with code 2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from common.cli import DEFAULT_WORKDIR, UserError, parse_config, run_main
from data.schema import SchemaError, validate_workdir


@dataclass
class ValidateArgs:
    """Validate DIR/data/{catalog,relevance,impressions,purchases}.parquet."""

    workdir: str = field(default=DEFAULT_WORKDIR, metadata={"help": "run directory"})
    check_images: bool = field(default=True, metadata={"help": "decode every catalog image"})


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    args = parse_config(ValidateArgs, argv)
    workdir = Path(args.workdir)
    if not workdir.is_dir():
        raise UserError(f"workdir {workdir} does not exist or is not a directory")
    try:
        counts = validate_workdir(workdir, check_images=args.check_images)
    except SchemaError as exc:
        raise UserError(str(exc)) from None
    for name, rows in counts.items():
        print(f"{name}\t{rows}")
    return counts


if __name__ == "__main__":
    run_main(main)
