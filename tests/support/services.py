"""Services the tests use besides the hub's own processes: the machine's Redis."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

__all__ = ["SHARED_REDIS", "OwnRedis", "free_port", "redis_store_url", "require_redis"]

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


class OwnRedis:
    """A redis-server of the test's own on a free port, to stop, pause or roll back
    without disturbing the machine's. With ``persist`` it writes every change to its
    append-only file (appendfsync always), so it can be stopped and started again
    without losing what it acknowledged; without, it keeps nothing on disk."""

    def __init__(self, directory: Path, *, persist: bool = False) -> None:
        self.directory = directory
        self.persist = persist
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def start(self) -> OwnRedis:
        self.directory.mkdir(exist_ok=True)
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]
        argv = [
            shutil.which("redis-server") or "redis-server",
            "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory), "--save", "", *persistence,
        ]  # fmt: skip
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:  # another process took the port first
                raise AssertionError(f"redis-server exited ({self.process.returncode}): port {self.port} in use?")
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.2).ping()
                return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def pause(self) -> None:
        """SIGSTOP: Redis hangs (connections stay open, nothing is answered)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused one would not end
            self.process.terminate()
            self.process.wait(10)
