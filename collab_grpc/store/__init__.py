"""Where the hub's state lives: ``COLLAB_STORE`` = ``sqlite`` (default) or ``memory``."""

from __future__ import annotations

from pathlib import Path

from collab_grpc.store.base import MemoryStore, Store, StoreError, StoreUnavailable
from collab_grpc.store.sqlite import Retention, SQLiteStore

__all__ = ["MemoryStore", "Retention", "SQLiteStore", "Store", "StoreError", "StoreUnavailable", "open_store"]


def open_store(spec: str, data_dir: Path, *, synchronous: str = "full", retention: Retention | None = None) -> Store:
    """The store ``spec`` names (the value of COLLAB_STORE)."""
    if spec == "memory":
        return MemoryStore()
    if spec == "sqlite":
        return SQLiteStore(data_dir, synchronous=synchronous, retention=retention)
    if spec.startswith(("redis://", "rediss://")):
        raise StoreError("COLLAB_STORE=redis://... is not available in this version; use sqlite or memory")
    raise StoreError(f"COLLAB_STORE must be sqlite, memory or redis://..., got {spec!r}")
