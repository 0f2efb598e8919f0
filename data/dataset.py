"""The data set of a workdir as one published unit: ``DIR/data/manifest.json`` and its tables.

``data.synth`` and the adapters publish the four tables (and any extra files of theirs) as one
:class:`common.provenance.OutputSet` whose manifest is ``DIR/data/manifest.json``. A user's own
tables, copied into ``DIR/data/`` by hand, have no manifest; they are taken as they are.

Every stage that reads tables calls :func:`input_hashes` for the fingerprints of what it reads:
it rolls back a publication that a killed run left half done, refuses a directory whose files
are not the set its manifest lists (one ``error:`` line naming the file), and returns the SHA-256
of each requested table for the stage's :class:`common.provenance.MadeFrom`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from common.io import file_sha256
from common.provenance import OutputSet
from data import schema

MANIFEST = "data/manifest.json"
# extra files of data.synth's set, in DIR/data/: the generator's truth of each impression, and
# every MR/HR catalog product of each query (the complete judgments embeddings.evaluate scores with)
TRUTH_FILE = "synth_truth.parquet"
RELEVANCE_TRUTH_FILE = "synth_relevance_truth.parquet"


def table_rel(name: schema.TableName) -> str:
    """``data/<name>.parquet``: the table's path relative to the workdir."""
    return f"data/{name}.parquet"


def data_set(workdir: str | Path, files: Sequence[str], what: str = "the data stage") -> OutputSet:
    """The output set of the data stage: ``files`` (workdir-relative) under ``data/manifest.json``."""
    return OutputSet(workdir, MANIFEST, files, what=what)


def published_set(workdir: str | Path) -> OutputSet | None:
    """The set the workdir's data manifest lists (after a rollback), or None for hand-placed tables."""
    manifest = data_set(workdir, []).manifest()
    listed = manifest.get("files") if manifest else None
    if not isinstance(listed, dict) or not listed or not all(
            isinstance(v, dict) and {"sha256", "size"} <= v.keys() for v in listed.values()):
        return None  # no manifest, or one of an older format: nothing to check against
    return data_set(workdir, sorted(listed), what=f"the data stage ({manifest.get('source', 'unknown source')})")


def input_hashes(workdir: str | Path, names: Iterable[schema.TableName]) -> dict[str, str]:
    """``{data/<name>.parquet: sha256}`` for the tables a stage reads, after checking that the
    published set (when there is one) is intact; a missing table is a one-line error naming it."""
    root = Path(workdir)
    published = published_set(root)
    verified = published.verify() if published is not None else {}
    return {table_rel(name): verified.get(table_rel(name)) or file_sha256(schema.existing_table_path(root, name))
            for name in names}
