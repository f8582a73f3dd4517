"""Services the tests use besides the hub's own processes: the machine's Redis."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator

import pytest
import redis

__all__ = ["SHARED_REDIS", "free_port", "redis_store_url", "require_redis"]

SHARED_REDIS = "redis://127.0.0.1:6379/0"


def require_redis(url: str = SHARED_REDIS) -> None:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.exceptions.ConnectionError as error:
        if os.environ.get("COLLAB_REQUIRE_REDIS") == "1":
            pytest.fail(f"Redis is required (COLLAB_REQUIRE_REDIS=1) but {url} does not answer: {error}")
        pytest.skip(f"no Redis at {url}: {error}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_store_url() -> Iterator[str]:
    """A COLLAB_STORE value on the machine's Redis with keys of its own, removed afterwards."""
    require_redis()
    prefix = f"collab-test-{uuid.uuid4().hex[:8]}"
    try:
        yield f"{SHARED_REDIS}?prefix={prefix}"
    finally:
        client = redis.Redis.from_url(SHARED_REDIS)
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)
