"""What every store offers the server, and the in-memory one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from collab_grpc.errors import CollabError
from collab_grpc.history import ActivityQuery, Found, query_held
from collab_grpc.model import Activity, Event
from collab_grpc.state import CollaborationState

__all__ = [
    "READ_ACTIVITIES_MAX",
    "STORE_TIMEOUT",
    "EventArchive",
    "MemoryStore",
    "SingleProcessStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "Waiters",
]


STORE_TIMEOUT = 2.0  # seconds a call waits for a shared store (Redis), by default (COLLAB_STORE_TIMEOUT)


# Activities one ``read_activities`` call takes ids of, at most.
READ_ACTIVITIES_MAX = 256


def check_read_count(ids: Sequence[str]) -> None:
    """``read_activities`` takes at most READ_ACTIVITIES_MAX ids (the caller splits more)."""
    if len(ids) > READ_ACTIVITIES_MAX:
        raise ValueError(f"read_activities takes at most {READ_ACTIVITIES_MAX} ids at once, got {len(ids)}")


# Writers waiting for their seq to be stored: (seq, the future their answer waits on).
Waiters = list[tuple[int, asyncio.Future[None]]]


def release_waiters(waiters: Waiters, ready: Callable[[int], bool], error: BaseException | None) -> Waiters:
    """Answer the waiters whose seq is ``ready`` (with ``error`` when given); the others."""
    waiting: Waiters = []
    for seq, waiter in waiters:
        if not ready(seq):
            waiting.append((seq, waiter))
        elif not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)
    return waiting


class StoreError(Exception):
    """The store cannot be used as configured (unreadable, foreign or corrupted file);
    the server refuses to start rather than lose or overwrite data."""


class StoreUnavailable(CollabError):
    """A write could not be made durable; it was not recorded (UNAVAILABLE)."""


class Store(Protocol):
    @property
    def description(self) -> str: ...

    @property
    def failure_marks(self) -> Sequence[int]:
        """For each failure that refused writes after they were decided (a failed group
        commit), the last seq that was durable before it; empty for stores whose writes
        fail before they are decided."""

    async def attach(self, state: CollaborationState) -> None:
        """Continue the stored history in ``state`` and follow its changes from now on."""

    def start(self) -> None:
        """Start background work (inside the running event loop)."""

    def writing(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Around deciding and storing one write: where replicas share the store, this
        holds their common write lock with the state caught up; elsewhere it is free."""

    async def fresh(self) -> None:
        """Before a read: take in what other replicas wrote (nothing to do for one)."""

    async def durable(self, seq: int) -> None:
        """Return once every change up to ``seq`` is stored; StoreUnavailable if it cannot be."""

    async def close(self) -> None:
        """Store what is pending and release the store."""

    async def query_activities(self, query: ActivityQuery, count: int) -> Found:
        """The first ``count`` activities of the retained history that ``query`` matches,
        in its order (each store says what it retains); a store may stop looking after a
        bound of its own (Found.scanned_to)."""

    async def read_activities(self, ids: Sequence[str]) -> list[Activity]:
        """The stored activities among ``ids`` (at most READ_ACTIVITIES_MAX, else
        ValueError), in their stored state (completed ones with what their completion
        merged); those the store does not keep are left out, in no particular order.
        Reads the store as of the last write made durable (StoreUnavailable if it cannot
        be read): what is still pending may be missing."""


@runtime_checkable
class EventArchive(Protocol):
    """A store that keeps more events than the log holds in memory, and replays them to
    a resume from before the oldest in memory."""

    def archived_from(self, epoch: str) -> int | None:
        """The oldest seq of ``epoch`` it can replay (None: none, or another epoch)."""

    async def read_events(self, after_seq: int, through_seq: int, count: int) -> list[Event]:
        """At most ``count`` events with ``after_seq < seq <= through_seq``, oldest first
        (StoreUnavailable if they cannot be read); the first is not ``after_seq + 1``
        when retention deleted it meanwhile."""


# Reusable, and cheaper than a generator-based context manager on every write.
_NO_LOCK: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()


class SingleProcessStore:
    """A store only one server process writes: no lock to take, nothing to catch up."""

    @property
    def failure_marks(self) -> Sequence[int]:
        return ()

    def writing(self) -> contextlib.AbstractAsyncContextManager[None]:
        return _NO_LOCK

    async def fresh(self) -> None:
        pass


class MemoryStore(SingleProcessStore):
    """Keeps nothing beyond the process: every change is final at once. The history it
    can search is what the state holds: the newest activities (``history_limit``, 1,000
    by default) and every open one."""

    description = "memory (nothing survives a restart)"

    def __init__(self, state: CollaborationState | None = None) -> None:
        self._state = state

    async def attach(self, state: CollaborationState) -> None:
        self._state = state

    async def query_activities(self, query: ActivityQuery, count: int) -> Found:
        if self._state is None:
            return Found([])
        return query_held(self._state.held_activities(), query, count)

    async def read_activities(self, ids: Sequence[str]) -> list[Activity]:
        """None: this store keeps nothing the state does not hold (the state's own copies
        are the ones to use)."""
        check_read_count(ids)
        return []

    def start(self) -> None:
        pass

    async def durable(self, seq: int) -> None:
        pass

    async def close(self) -> None:
        pass
