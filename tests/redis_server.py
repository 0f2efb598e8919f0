"""Pytest fixture helper: a real ``redis-server`` on a free localhost port.

Use from a test module::

    from tests.redis_server import redis_server  # noqa: F401  (the fixture)

    def test_x(redis_server):
        client = redis_server.client()

The fixture is module-scoped, starts a private server (no persistence) and stops it after the
module. When the ``redis-server`` binary is not installed the test is skipped with the reason.
"""
from __future__ import annotations

import pytest

from serving.redis_store import RedisServer, RedisUnavailable


@pytest.fixture(scope="module")
def redis_server():
    """A started :class:`serving.redis_store.RedisServer`; skipped when the binary is absent."""
    try:
        server = RedisServer().start()
    except RedisUnavailable as exc:
        pytest.skip(f"needs a real redis-server: {exc}")
    try:
        yield server
    finally:
        server.stop()
