"""Where the hub's state lives: ``COLLAB_STORE`` = ``sqlite`` (default), ``memory`` or
``redis://host:port/db[?prefix=name]`` (shared by several server replicas).

The Redis store, and its driver (the [redis] extra), is imported when first used: a hub
without Redis needs no redis package."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from collab_grpc.store.base import STORE_TIMEOUT, MemoryStore, Store, StoreError, StoreUnavailable
from collab_grpc.store.sqlite import COMMIT_DELAY, HISTORY_SCAN_ROWS, Retention, SQLiteStore

if TYPE_CHECKING:
    from collab_grpc.store.redis_store import RedisStore

__all__ = [
    "MemoryStore",
    "RedisStore",
    "Retention",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "open_store",
]


def open_store(
    spec: str,
    data_dir: Path,
    *,
    synchronous: str = "full",
    retention: Retention | None = None,
    commit_delay: float = COMMIT_DELAY,
    history_scan_rows: int = HISTORY_SCAN_ROWS,
    timeout: float = STORE_TIMEOUT,
) -> Store:
    """The store ``spec`` names (the value of COLLAB_STORE)."""
    if spec == "memory":
        return MemoryStore()
    if spec == "sqlite":
        return SQLiteStore(
            data_dir,
            synchronous=synchronous,
            retention=retention,
            commit_delay=commit_delay,
            history_scan_rows=history_scan_rows,
        )
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return _redis_store()(spec, retain=retention.count if retention else 100_000, timeout=timeout)
    raise StoreError(f"COLLAB_STORE must be sqlite, memory or redis://..., got {spec!r}")


def _redis_store() -> type[RedisStore]:
    """The RedisStore class; StoreError saying how to install the driver when it is missing."""
    try:
        from collab_grpc.store.redis_store import RedisStore
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "redis":
            raise
        raise StoreError(f"COLLAB_STORE is a Redis URL: {exc.msg}") from None
    return RedisStore


def __getattr__(name: str) -> Any:
    if name == "RedisStore":  # ModuleNotFoundError saying how to install redis when it is missing
        from collab_grpc.store.redis_store import RedisStore

        return RedisStore
    raise AttributeError(f"module 'collab_grpc.store' has no attribute {name!r}")
