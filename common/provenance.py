"""What every stage's outputs were made from, and their publication as one unit.

One mechanism for every stage. A stage's outputs form an *output set*: the files one invocation
writes together (synth's four tables, export's product and query tables, a ranking seed's model
and metrics, ...). Each set has a manifest, a JSON file written last::

    {"made_from": {"inputs": {"data/catalog.parquet": "<sha256>", ...}, "settings": {...}},
     "files": {"embeddings/product_table.parquet": {"sha256": "...", "size": 123}, ...},
     ...anything the stage adds}

Paths are relative to the workdir, so a copied workdir keeps its manifests valid, and a manifest
holds no times: the same outputs give a byte-identical manifest. Hashes are computed once per
process and file (:func:`common.io.file_sha256`).

* **Reuse.** :meth:`OutputSet.current` is true only when the manifest's ``made_from`` equals the
  stage's :class:`MadeFrom` of this invocation (hashes of its input files and its settings) and
  every listed file is there with its recorded bytes. A stage reuses its outputs only then.
* **Readers.** :meth:`OutputSet.verify` returns the files' hashes (the next stage's input
  fingerprints) or raises a one-line :class:`~common.cli.UserError` when the files are not the
  set the manifest describes (missing, or left from two different publications).
* **Publication.** ``with out.publish(made_from) as staged:`` yields a temp path per file; when
  the block ends every temp file is fsynced, the current files are kept as hard-linked backups, a
  journal naming them is written, the temp files are renamed into place, the manifest is written,
  the directory fsynced, and the journal and backups are removed. A failure during the renames
  puts the backups back; a run killed during them leaves the journal, and the next
  :meth:`~OutputSet.current`, :meth:`~OutputSet.verify` or :meth:`~OutputSet.publish` of the set
  rolls it back the same way. Readers therefore see the old set or the new one, never a mix.
  With ``keep_same``, a publication of the very set that is there (the same files' bytes,
  ``made_from`` and manifest fields) leaves it as it is: a stage that writes its set on every run
  (``ranking.train``'s results) then changes no file when it made nothing new.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from common.cli import UserError
from common.io import file_sha256, fsync_path, read_json, remove_stale_temps, temp_sibling, write_json

log = logging.getLogger(__name__)


def canonical(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples -> lists, keys -> str, paths -> str)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


@dataclass(frozen=True)
class MadeFrom:
    """What an output set is made from: input files (workdir-relative path -> SHA-256, ``None`` when
    absent) and the settings that determine the outputs (JSON-able)."""

    inputs: dict[str, str | None] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, workdir: str | Path, inputs: Sequence[str | Path], settings: Mapping[str, Any]) -> "MadeFrom":
        """Hash the ``inputs`` (paths relative to ``workdir``) and take ``settings`` as JSON."""
        root = Path(workdir)
        hashes = {}
        for rel in inputs:
            path = root / rel
            hashes[Path(rel).as_posix()] = file_sha256(path) if path.is_file() else None
        return cls(hashes, canonical(dict(settings)))

    def with_inputs(self, hashes: Mapping[str, str | None]) -> "MadeFrom":
        """A copy with more input hashes (e.g. those :meth:`OutputSet.verify` returned)."""
        return MadeFrom({**self.inputs, **hashes}, self.settings)

    def as_json(self) -> dict[str, Any]:
        return {"inputs": dict(sorted(self.inputs.items())), "settings": self.settings}

    def key(self) -> str:
        """A short hash of the whole record (for names and logs)."""
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()[:16]


class OutputSet:
    """The files ``files`` (relative to ``workdir``) published together with the manifest ``manifest``."""

    def __init__(self, workdir: str | Path, manifest: str | Path, files: Sequence[str | Path], *,
                 what: str = "") -> None:
        self.root = Path(workdir)
        self.manifest_rel = Path(manifest).as_posix()
        self.files = [Path(f).as_posix() for f in files]
        if len(set(self.files)) != len(self.files) or self.manifest_rel in self.files:
            raise ValueError(f"output set {manifest}: files must be distinct and exclude the manifest")
        self.what = what or self.manifest_rel

    @property
    def manifest_path(self) -> Path:
        return self.root / self.manifest_rel

    @property
    def journal_path(self) -> Path:
        return self.manifest_path.with_name(f".{self.manifest_path.name}.journal")

    def path(self, rel: str | Path) -> Path:
        return self.root / rel

    # reading ---------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        """The manifest (after rolling back a killed publication), or None when there is none."""
        self.recover()
        if not self.manifest_path.is_file():
            return None
        try:
            data = read_json(self.manifest_path)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def _intact(self, manifest: Mapping[str, Any]) -> str | None:
        """None when every file matches the manifest, else the first problem."""
        recorded = manifest.get("files", {})
        for rel in self.files:
            entry, path = recorded.get(rel), self.path(rel)
            if not isinstance(entry, dict):
                return f"{rel} is not listed in {self.manifest_rel}"
            if not path.is_file():
                return f"{path} is missing"
            size = path.stat().st_size
            if size != entry.get("size"):
                return f"{path} has {size} bytes, {self.manifest_rel} lists {entry.get('size')}"
            if file_sha256(path) != entry.get("sha256"):
                return f"{path} is not the file {self.manifest_rel} lists (another run wrote it)"
        return None

    def current(self, made_from: MadeFrom) -> bool:
        """True when the set is complete, intact and made from exactly ``made_from``."""
        manifest = self.manifest()
        if manifest is None or manifest.get("made_from") != canonical(made_from.as_json()):
            return False
        return self._intact(manifest) is None

    def verify(self) -> dict[str, str]:
        """The SHA-256 of each file (``{relative path: hash}``) of an intact set; otherwise one
        :class:`UserError` naming the problem and the stage to rerun."""
        manifest = self.manifest()
        if manifest is None:
            missing = [rel for rel in self.files if not self.path(rel).is_file()]
            if missing:
                raise UserError(f"{self.path(missing[0])} not found: run {self.what} first")
            raise UserError(f"{self.manifest_path} not found: the files of {self.what} were not published "
                            f"together (a killed or older run); run {self.what} again")
        problem = self._intact(manifest)
        if problem is not None:
            raise UserError(f"{problem}: the set under {self.manifest_path.parent} is incomplete or mixed; "
                            f"run {self.what} again")
        return {rel: manifest["files"][rel]["sha256"] for rel in self.files}

    def hashes(self) -> dict[str, str | None]:
        """The files' SHA-256: checked against the manifest when the set was published
        (:meth:`verify`), else those of the files as they are (placed by hand; None when absent)."""
        if self.manifest() is not None:
            return dict(self.verify())
        return MadeFrom.of(self.root, self.files, {}).inputs

    # writing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def publish(self, made_from: MadeFrom, extra: Mapping[str, Any] | None = None, *,
                keep_same: bool = False) -> Iterator[dict[str, Path]]:
        """Yield ``{relative path: temp path}``; write every temp path in the block. On success the
        set is published as one unit (see the module docstring); on failure nothing changes.
        ``extra`` holds more manifest fields; it is read when the block ends, so the block may
        still fill it in (row counts, statistics). ``keep_same``: leave an intact published set
        untouched when the staged one is the same (files, ``made_from``, ``extra``)."""
        self.recover()
        staged = {rel: temp_sibling(self.path(rel)) for rel in self.files}
        for tmp in staged.values():
            tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield staged
            unwritten = [rel for rel, tmp in staged.items() if not tmp.is_file()]
            if unwritten:
                raise RuntimeError(f"output set {self.manifest_rel}: {unwritten[0]} was not written")
            manifest = self._manifest_of(staged, made_from, extra or {})
            if keep_same and manifest == self.manifest() and self._intact(manifest) is None:
                log.info("%s: the same set is published already; left as they are", self.manifest_path)
                return
            for tmp in staged.values():
                os.chmod(tmp, 0o644)
                fsync_path(tmp)
            self._swap(staged, manifest)
        finally:
            for tmp in staged.values():
                tmp.unlink(missing_ok=True)

    def _manifest_of(self, staged: Mapping[str, Path], made_from: MadeFrom, extra: Mapping[str, Any]) -> dict[str, Any]:
        """The manifest of the staged files (as it reads back from JSON)."""
        files = {rel: {"sha256": file_sha256(tmp), "size": tmp.stat().st_size} for rel, tmp in staged.items()}
        return canonical({**canonical(dict(extra)), "made_from": canonical(made_from.as_json()), "files": files})

    def _swap(self, staged: Mapping[str, Path], manifest: Mapping[str, Any]) -> None:
        backups: dict[str, str | None] = {}
        for rel in [*self.files, self.manifest_rel]:
            path = self.path(rel)
            if path.is_file():
                backup = temp_sibling(path, "bak")
                try:
                    os.link(path, backup)
                except OSError:  # a file system without hard links
                    shutil.copy2(path, backup)
                backups[rel] = backup.name
            else:
                backups[rel] = None
        write_json({"backups": backups}, self.journal_path)
        try:
            self.manifest_path.unlink(missing_ok=True)
            for rel, tmp in staged.items():
                os.replace(tmp, self.path(rel))
            for directory in {self.path(rel).parent for rel in self.files}:
                fsync_path(directory)
            write_json(manifest, self.manifest_path)
        except BaseException:
            self._roll_back(backups)
            raise
        self.journal_path.unlink(missing_ok=True)
        for rel, backup in backups.items():
            if backup is not None:
                (self.path(rel).parent / backup).unlink(missing_ok=True)
        fsync_path(self.manifest_path.parent)

    def _roll_back(self, backups: Mapping[str, str | None]) -> None:
        for rel, backup in backups.items():
            path = self.path(rel)
            saved = path.parent / backup if backup is not None else None
            if saved is None:
                path.unlink(missing_ok=True)
            elif saved.exists():
                if path.exists() and os.path.samefile(saved, path):  # never replaced: rename would be a no-op
                    saved.unlink()
                else:
                    os.replace(saved, path)
        for directory in {self.path(rel).parent for rel in backups}:
            fsync_path(directory)
        self.journal_path.unlink(missing_ok=True)

    def recover(self) -> None:
        """Roll back a publication that a killed run left half done (its journal is still there)."""
        if not self.journal_path.is_file():
            return
        try:
            backups = read_json(self.journal_path)["backups"]
        except (ValueError, KeyError, TypeError):
            backups = None
        if backups is None:  # the journal itself was cut short: the renames never started
            self.journal_path.unlink(missing_ok=True)
            return
        log.warning("%s: rolling back a publication that a killed run left unfinished", self.manifest_path)
        self._roll_back(backups)
        for directory in {self.path(rel).parent for rel in [*self.files, self.manifest_rel]}:
            remove_stale_temps(directory)

    def clear(self) -> None:
        """Delete the set (files and manifest), e.g. when a stage reruns and must not leave old outputs."""
        self.recover()
        self.manifest_path.unlink(missing_ok=True)
        for rel in self.files:
            self.path(rel).unlink(missing_ok=True)

