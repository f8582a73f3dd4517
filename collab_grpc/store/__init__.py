"""Where the hub's state lives: ``COLLAB_STORE`` = ``sqlite`` (default), ``memory`` or
``redis://host:port/db[?prefix=name]`` (shared by several server replicas)."""

from __future__ import annotations

from pathlib import Path

from collab_grpc.store.base import MemoryStore, Store, StoreError, StoreUnavailable
from collab_grpc.store.redis_store import STORE_TIMEOUT, RedisStore
from collab_grpc.store.sqlite import COMMIT_DELAY, HISTORY_SCAN_ROWS, Retention, SQLiteStore

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
        return RedisStore(spec, retain=retention.count if retention else 100_000, timeout=timeout)
    raise StoreError(f"COLLAB_STORE must be sqlite, memory or redis://..., got {spec!r}")
