"""Fixtures of the domain core's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from collab_grpc.state import CollaborationState
from collab_grpc.store.sqlite import SQLiteStore


class SQLiteStores:
    """SQLite stores a test opens (a restart is a second one on the same folder); those it
    did not close are closed after it, newest first."""

    def __init__(self) -> None:
        self.open_stores: list[SQLiteStore] = []

    def open(self, data_dir: Path, state: CollaborationState) -> SQLiteStore:
        """A store on ``data_dir`` for ``state``, loaded and started."""
        store = SQLiteStore(data_dir)
        store.open(state)
        store.start()
        self.open_stores.append(store)
        return store

    async def close(self, store: SQLiteStore) -> None:
        """Stop ``store`` cleanly, as a server's shutdown does."""
        self.open_stores.remove(store)
        await store.close()


@pytest_asyncio.fixture
async def sqlite_stores() -> AsyncIterator[SQLiteStores]:
    stores = SQLiteStores()
    yield stores
    for store in reversed(stores.open_stores):
        await store.close()
