"""SQLiteStore: the state kept in one SQLite file, restored on open, written by group commit."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import threading
import time
import types
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import pytest_asyncio

from collab_grpc import servicer as servicer_module
from collab_grpc.events import EventFilter
from collab_grpc.model import Activity, ActivityStatus, ActivityType, Event, EventKind, MemoryOperation
from collab_grpc.servicer import CollaborationServicer
from collab_grpc.state import CollaborationState, StateSettings
from collab_grpc.store import (
    MemoryStore,
    RedisStore,
    Retention,
    SQLiteStore,
    StoreError,
    StoreUnavailable,
    open_store,
)
from collab_grpc.store import sqlite as sqlite_module
from collab_grpc.store.codec import encode
from collab_grpc.v1 import collaboration_pb2 as pb

METHOD = "RecordActivity"
FAULT = "disk full"


class FakeClock:
    """The state's clock: near the real time (retention compares it with time.time()),
    moving only when told to."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float = 1.0) -> float:
        self.now += seconds
        return self.now


@dataclass
class Hub:
    """A state following a store, closed once."""

    state: CollaborationState
    store: SQLiteStore
    closed: bool = False

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.store.close()


class Opener(Protocol):
    def __call__(
        self,
        *,
        settings: StateSettings | None = None,
        retention: Retention | None = None,
        start: bool = True,
        commit_delay: float = sqlite_module.COMMIT_DELAY,
        commit_quiet: float = sqlite_module.COMMIT_QUIET,
    ) -> Hub: ...


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(float(int(time.time())))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest_asyncio.fixture
async def open_hub(data_dir: Path, clock: FakeClock) -> AsyncIterator[Opener]:
    """Open a new state on the store in ``data_dir``; every hub is closed at the end."""
    hubs: list[Hub] = []

    def open_(
        *,
        settings: StateSettings | None = None,
        retention: Retention | None = None,
        start: bool = True,
        commit_delay: float = sqlite_module.COMMIT_DELAY,
        commit_quiet: float = sqlite_module.COMMIT_QUIET,
    ) -> Hub:
        state = CollaborationState(settings, clock=clock)
        store = SQLiteStore(data_dir, retention=retention, commit_delay=commit_delay, commit_quiet=commit_quiet)
        store.open(state)
        hub = Hub(state, store)
        hubs.append(hub)
        if start:
            store.start()
        return hub

    yield open_
    for hub in reversed(hubs):
        await hub.close()


async def commit(hub: Hub) -> None:
    await hub.store.durable(hub.state.log.last_seq)


async def reload_finished(store: SQLiteStore) -> None:
    """After a failed commit the store reloads the state on its single writer thread;
    a no-op queued behind that reload returns once it is done."""
    await asyncio.get_running_loop().run_in_executor(store._executor, lambda: None)


async def pruned(hub: Hub) -> int:
    """Run retention rounds, as the store's retention loop does, until one leaves
    nothing more to delete; how many ran."""
    store = hub.store
    rounds = 0
    more: bool | None = True
    while more:
        async with store._writer_lock:
            more = await asyncio.get_running_loop().run_in_executor(store._executor, store._prune_round)
        rounds += 1
    return rounds


def query(data_dir: Path, sql: str) -> list[tuple[object, ...]]:
    connection = sqlite3.connect(data_dir / sqlite_module.FILE_NAME)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def retained(state: CollaborationState) -> list[Event]:
    return list(state.log.events_after(0))


class FailingWrites:
    """Replaces a store's ``_commit``: the calls listed in ``fail`` raise OSError("disk full")."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, store: SQLiteStore, fail: set[int]) -> None:
        self.real = store._commit
        self.fail = fail
        self.calls = 0
        monkeypatch.setattr(store, "_commit", self)

    def __call__(self, *args: Any) -> None:
        self.calls += 1
        if self.calls in self.fail:
            raise OSError(FAULT)
        self.real(*args)


class GatedWrites:
    """Replaces a store's ``_commit``: call number ``gated`` waits for ``release``
    (``started`` is set once it is in flight); calls in ``fail`` raise OSError."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, store: SQLiteStore, gated: int, fail: frozenset[int] = frozenset()
    ) -> None:
        self.real = store._commit
        self.gated = gated
        self.fail = fail
        self.calls = 0
        self.started = threading.Event()
        self.release = threading.Event()
        monkeypatch.setattr(store, "_commit", self)

    def __call__(self, *args: Any) -> None:
        self.calls += 1
        if self.calls in self.fail:
            raise OSError(FAULT)
        if self.calls == self.gated:
            self.started.set()
            self.release.wait(5.0)
        self.real(*args)

    async def in_flight(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 5.0), "the gated commit never started"


# -- round trip -------------------------------------------------------------------------


async def test_round_trip_restores_everything(open_hub: Opener, clock: FakeClock, data_dir: Path) -> None:
    hub = open_hub()
    state = hub.state
    done = state.record_activity(
        agent_id="alice",
        activity_type=ActivityType.TASK_ASSIGNED,
        department="research",
        metadata={"k": "v", "n": 1, "f": 1.5, "nested": {"list": [1, "two", None], "flag": True}},
        related_agents=["bob"],
    )
    clock.advance()
    failed = state.record_activity(agent_id="bob", activity_type=ActivityType.MESSAGE_SENT, department="ops")
    clock.advance()
    open_one = state.record_activity(agent_id="carol", activity_type=ActivityType.MEMORY_READ)
    clock.advance()
    session = state.start_collaboration(participants=["alice", "bob"], session_type="council", metadata={"t": 1})
    clock.advance()
    in_session = state.record_activity(
        agent_id="alice", activity_type=ActivityType.COUNCIL_DEBATE, session_id=session.session_id
    )
    clock.advance()
    child = state.record_activity(
        agent_id="bob", activity_type=ActivityType.TASK_COMPLETED, parent_activity_id=done.activity_id
    )
    clock.advance()
    state.complete_activity(done.activity_id)
    clock.advance()
    state.complete_activity(failed.activity_id, success=False, failure_reason="timeout")
    clock.advance()
    state.record_decision(
        session_id=session.session_id,
        agent_id="alice",
        decision="ship it",
        rationale="tests pass",
        votes={"alice": "yes", "bob": "no"},
        metadata={"round": 2},
    )
    clock.advance()
    ended = state.start_collaboration(participants=["carol", "dave"])
    clock.advance()
    state.record_decision(session_id=ended.session_id, agent_id="dave", decision="stop", votes={"carol": "yes"})
    clock.advance()
    state.end_collaboration(ended.session_id)
    clock.advance()
    state.record_memory_update(operation=MemoryOperation.WRITE, item_id="item-1", agent_id="erin", metadata={"a": 1})
    clock.advance()
    state.record_memory_update(operation=MemoryOperation.DELETE, item_id="item-1", agent_id="alice")
    clock.advance()
    state.idempotency.store(METHOD, "key-1", b"\x00fingerprint\xff", b"\x01answer\x02", clock())
    await commit(hub)
    ids = [a.activity_id for a in (done, failed, open_one, in_session, child)]
    before_status = state.agent_status()
    before_feed = state.activity_feed(limit=500)
    before_activities = [state.get_activity(i) for i in ids]
    before_active = state.active_collaborations()
    before_ended = state.ended_collaborations()
    before_sessions = [state.get_collaboration(s.session_id) for s in (session, ended)]
    before_events = retained(state)
    epoch, last_seq = state.epoch, state.log.last_seq
    assert [e.seq for e in before_events] == list(range(1, last_seq + 1))
    await hub.close()

    again = open_hub()
    restored = again.state
    assert restored.epoch == epoch
    assert restored.log.last_seq == last_seq
    assert restored.agent_status() == before_status
    assert restored.activity_feed(limit=500) == before_feed
    assert [restored.get_activity(i) for i in ids] == before_activities
    assert restored.active_collaborations() == before_active
    assert restored.ended_collaborations() == before_ended
    assert [restored.get_collaboration(s.session_id) for s in (session, ended)] == before_sessions
    active_session, _, decisions = restored.get_collaboration(session.session_id)
    assert (active_session.activity_count, active_session.decision_count) == (1, 1)
    assert decisions[0].votes == {"alice": "yes", "bob": "no"}
    ended_session, _, _ = restored.get_collaboration(ended.session_id)
    assert (ended_session.ended_at, ended_session.decision_count) == (ended.ended_at, 1)
    restored_events = retained(restored)
    assert [(e.seq, e.kind, e.payload) for e in restored_events] == [(e.seq, e.kind, e.payload) for e in before_events]
    assert restored_events == before_events  # epoch and time too
    assert restored.idempotency.lookup(METHOD, "key-1", b"\x00fingerprint\xff", clock()) == b"\x01answer\x02"
    assert restored.log.can_resume(epoch, 3) is None

    # The history goes on from the old last seq, in the same epoch.
    clock.advance()
    restored.complete_activity(open_one.activity_id)
    later = restored.record_activity(agent_id="frank", activity_type=ActivityType.AGENT_STARTED)
    assert restored.log.last_seq == last_seq + 2
    await commit(again)
    assert [e.seq for e in retained(restored)][-2:] == [last_seq + 1, last_seq + 2]
    await again.close()

    third = open_hub()
    assert third.state.epoch == epoch
    assert third.state.log.last_seq == last_seq + 2
    assert third.state.get_activity(later.activity_id) == later
    reopened_open = third.state.get_activity(open_one.activity_id)
    assert reopened_open is not None and reopened_open.status is ActivityStatus.COMPLETED


async def test_rows_hold_each_event_as_the_state_has_it(open_hub: Opener, clock: FakeClock, data_dir: Path) -> None:
    """The writer thread takes a commit's events as one JSON array, each payload an
    object in it: SQLite must store the payload text as ``encode`` writes it, and the
    seq, time, kind and status exactly. A row orjson refuses (an integer beyond 64 bits,
    given through the Python API) is written by the json module, whose text may differ
    (``1e-07`` for ``1e-7``) with the same JSON; the other rows of its commit are not."""
    hub = open_hub()
    state = hub.state
    metadata = {"é": 'ü \\ " \n \u0000', "f": 1e-7, "n": -3, "t": 1795660000.123456, "z": -0.0}
    clock.advance(0.1234567891234)
    plain = state.record_activity(agent_id="alice", activity_type=ActivityType.TASK_ASSIGNED, metadata=metadata)
    clock.advance(0.3333333333333)
    state.complete_activity(plain.activity_id, success=False, failure_reason="timeout")
    session = state.start_collaboration(participants=["alice", "bob"], metadata={"t": [1, {"u": None}]})
    state.record_decision(session_id=session.session_id, agent_id="alice", decision="ship", votes={"bob": "yes"})
    state.record_memory_update(operation=MemoryOperation.WRITE, item_id="item-1", agent_id="carol")
    await commit(hub)
    events = retained(state)
    assert query(data_dir, "SELECT seq, time, kind, payload FROM events ORDER BY seq") == [
        (event.seq, event.time, event.kind.value, encode(event.payload)) for event in events
    ]
    done = state.get_activity(plain.activity_id)
    assert done is not None and done.completed_at is not None
    assert query(data_dir, "SELECT activity_id, seq, status, completed_at, body FROM activities") == [
        (done.activity_id, events[0].seq, "failed", done.completed_at, encode(done))
    ]

    # One row orjson refuses, in a commit with others.
    before = state.record_activity(agent_id="bob", activity_type=ActivityType.MESSAGE_SENT, metadata=metadata)
    huge_metadata = {**metadata, "n": 2**70}
    huge = state.record_activity(agent_id="bob", activity_type=ActivityType.MESSAGE_SENT, metadata=huge_metadata)
    state.complete_activity(before.activity_id)
    await commit(hub)
    recorded_before, recorded_huge, completed_before = retained(state)[-3:]
    stored = {
        row[0]: row[1] for row in query(data_dir, f"SELECT seq, payload FROM events WHERE seq > {events[-1].seq}")
    }
    assert stored[recorded_before.seq] == encode(recorded_before.payload)
    assert stored[completed_before.seq] == encode(completed_before.payload)
    huge_payload = stored[recorded_huge.seq]
    (body,) = query(data_dir, f"SELECT body FROM activities WHERE activity_id = '{huge.activity_id}'")[0]
    assert isinstance(huge_payload, str) and isinstance(body, str)
    assert json.loads(huge_payload) == json.loads(body) == json.loads(encode(huge))
    assert '"n":1180591620717411303424' in body


async def test_a_new_directory_gets_a_new_epoch(open_hub: Opener, tmp_path: Path, clock: FakeClock) -> None:
    hub = open_hub()
    other_state = CollaborationState(clock=clock)
    other = SQLiteStore(tmp_path / "other")
    other.open(other_state)
    try:
        assert other_state.epoch != hub.state.epoch
        assert other_state.log.last_seq == 0
    finally:
        await other.close()


async def test_open_activity_older_than_the_history_is_restored(open_hub: Opener, clock: FakeClock) -> None:
    settings = StateSettings(history_limit=3)
    hub = open_hub(settings=settings)
    old = hub.state.record_activity(agent_id="alice", activity_type=ActivityType.TASK_ASSIGNED)
    for index in range(5):
        clock.advance()
        newer = hub.state.record_activity(agent_id=f"agent-{index}", activity_type=ActivityType.MESSAGE_SENT)
        hub.state.complete_activity(newer.activity_id)
    await commit(hub)
    assert old.activity_id not in [a.activity_id for a in hub.state.activity_feed()]
    feed, status = hub.state.activity_feed(), hub.state.agent_status()
    await hub.close()

    again = open_hub(settings=settings)
    restored = again.state.get_activity(old.activity_id)
    assert restored == old
    assert restored is not None and restored.status is ActivityStatus.ACTIVE
    assert again.state.activity_feed() == feed
    assert again.state.agent_status() == status
    assert again.state.agent_status().active_activities == 1
    clock.advance()
    completed = again.state.complete_activity(old.activity_id, success=False, failure_reason="late")
    assert completed.status is ActivityStatus.FAILED
    await commit(again)
    await again.close()

    third = open_hub(settings=settings)
    assert third.state.agent_status().active_activities == 0
    assert [e.kind for e in retained(third.state)][-1] is EventKind.ACTIVITY_COMPLETED


# -- publication ------------------------------------------------------------------------


async def test_events_are_published_only_once_committed(open_hub: Opener) -> None:
    hub = open_hub()
    subscription = hub.state.subscribe(EventFilter(), 100)
    activity = hub.state.record_activity(agent_id="alice", activity_type=ActivityType.TASK_ASSIGNED)
    seq = hub.state.log.last_seq
    assert len(subscription) == 0
    assert subscription.take() == []
    assert retained(hub.state) == []
    assert hub.state.log.published_seq == seq - 1
    await hub.store.durable(seq)
    events = subscription.take()
    assert [(e.seq, e.kind) for e in events] == [(seq, EventKind.ACTIVITY_RECORDED)]
    payload = events[0].payload
    assert isinstance(payload, Activity) and payload.activity_id == activity.activity_id
    assert hub.state.log.published_seq == seq
    await hub.store.durable(seq)  # already durable: returns at once


# -- files that are not ours ------------------------------------------------------------


def test_a_file_that_is_not_sqlite_is_refused(data_dir: Path, clock: FakeClock) -> None:
    data_dir.mkdir()
    path = data_dir / sqlite_module.FILE_NAME
    content = random.Random(1234).randbytes(8192)
    path.write_bytes(content)
    store = SQLiteStore(data_dir)
    with pytest.raises(StoreError, match="cannot be read"):
        store.open(CollaborationState(clock=clock))
    assert path.read_bytes() == content


def test_a_foreign_sqlite_file_is_refused(data_dir: Path, clock: FakeClock) -> None:
    data_dir.mkdir()
    path = data_dir / sqlite_module.FILE_NAME
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    connection.execute("INSERT INTO notes (body) VALUES ('mine')")
    connection.commit()
    connection.close()
    content = path.read_bytes()
    store = SQLiteStore(data_dir)
    with pytest.raises(StoreError, match="not a collab store"):
        store.open(CollaborationState(clock=clock))
    assert path.read_bytes() == content
    assert query(data_dir, "SELECT body FROM notes") == [("mine",)]


async def test_another_schema_version_is_refused(open_hub: Opener, data_dir: Path, clock: FakeClock) -> None:
    hub = open_hub(start=False)
    await hub.close()
    connection = sqlite3.connect(data_dir / sqlite_module.FILE_NAME)
    connection.execute(f"PRAGMA user_version = {sqlite_module.SCHEMA_VERSION + 1}")
    connection.close()
    store = SQLiteStore(data_dir)
    with pytest.raises(StoreError, match=f"schema version {sqlite_module.SCHEMA_VERSION + 1}"):
        store.open(CollaborationState(clock=clock))


@pytest.fixture
def empty_file(data_dir: Path) -> Path:
    data_dir.mkdir()
    path = data_dir / sqlite_module.FILE_NAME
    path.write_bytes(b"")
    return path


async def test_an_empty_file_becomes_a_store(open_hub: Opener, empty_file: Path, data_dir: Path) -> None:
    hub = open_hub()
    hub.state.record_activity(agent_id="alice", activity_type=ActivityType.TASK_ASSIGNED)
    await commit(hub)
    assert query(data_dir, "SELECT count(*) FROM activities") == [(1,)]


# -- failed commits ---------------------------------------------------------------------


async def test_a_failed_commit_is_refused_and_the_state_reloaded(
    open_hub: Opener, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = open_hub()
    state, store = hub.state, hub.store
    acknowledged = state.record_activity(agent_id="alice", activity_type=ActivityType.TASK_ASSIGNED)
    session = state.start_collaboration(participants=["alice", "bob"])
    await commit(hub)
    acknowledged_seq = state.log.last_seq
    status = state.agent_status()
    subscription = state.subscribe(EventFilter(), 100)
    writes = FailingWrites(monkeypatch, store, fail={1})

    clock.advance()
    refused = state.record_activity(agent_id="alice", activity_type=ActivityType.MESSAGE_SENT)
    state.complete_activity(acknowledged.activity_id)
    with pytest.raises(StoreUnavailable, match=FAULT):
        await store.durable(state.log.last_seq)
    await reload_finished(store)

    assert state.get_activity(refused.activity_id) is None
    assert state.agent_status() == status
    still_open = state.get_activity(acknowledged.activity_id)
    assert still_open is not None and still_open.status is ActivityStatus.ACTIVE
    assert [s.session_id for s in state.active_collaborations()] == [session.session_id]
    assert state.log.last_seq == acknowledged_seq
    assert subscription.closed and subscription.closed_reason and "store failed" in subscription.closed_reason

    # The fault has cleared: writes go through again and survive a reopen.
    clock.advance()
    after = state.record_activity(agent_id="carol", activity_type=ActivityType.AGENT_STARTED)
    await commit(hub)
    assert writes.calls == 2
    assert store.failure is None
    assert state.log.last_seq == acknowledged_seq + 1
    await hub.close()

    again = open_hub()
    assert again.state.log.last_seq == acknowledged_seq + 1
    assert again.state.get_activity(acknowledged.activity_id) == still_open
    assert again.state.get_activity(after.activity_id) == after
    assert again.state.get_activity(refused.activity_id) is None
    assert [s.session_id for s in again.state.active_collaborations()] == [session.session_id]
    assert [e.seq for e in retained(again.state)] == list(range(1, acknowledged_seq + 2))


async def test_a_failed_commit_forgets_its_idempotency_answers(
    open_hub: Opener, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = open_hub()
    FailingWrites(monkeypatch, hub.store, fail={1})
    hub.state.record_activity(agent_id="alice", activity_type=ActivityType.TASK_ASSIGNED)
    hub.state.idempotency.store(METHOD, "retry-me", b"fp", b"answer of a refused write", clock())
    with pytest.raises(StoreUnavailable):
        await commit(hub)
    await reload_finished(hub.store)
    # A retry with the same key must run again, not get the answer of a write that was not recorded.
    assert hub.state.idempotency.lookup(METHOD, "retry-me", b"fp", clock()) is None


async def test_a_failed_commit_forgets_agents_it_created(
    open_hub: Opener, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = open_hub()
    hub.state.record_activity(agent_id="alice", activity_type=ActivityType.TASK_ASSIGNED)
    await commit(hub)
    status = hub.state.agent_status()
    FailingWrites(monkeypatch, hub.store, fail={1})
    hub.state.record_activity(agent_id="ghost", activity_type=ActivityType.TASK_ASSIGNED, department="nowhere")
    with pytest.raises(StoreUnavailable):
        await commit(hub)
    await reload_finished(hub.store)
    assert hub.state.agent_status() == status


async def test_refused_events_are_never_published(
    open_hub: Opener, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = open_hub()
    state = hub.state
    state.record_activity(agent_id="alice", activity_type=ActivityType.TASK_ASSIGNED)
    await commit(hub)
    FailingWrites(monkeypatch, hub.store, fail={1})
    refused = state.record_activity(agent_id="alice", activity_type=ActivityType.MESSAGE_SENT)
    with pytest.raises(StoreUnavailable):
        await commit(hub)
    await reload_finished(hub.store)

    subscription = state.subscribe(EventFilter(), 100)
    after = state.record_activity(agent_id="bob", activity_type=ActivityType.AGENT_STARTED)
    await commit(hub)
    published = subscription.take()
    assert [e.seq for e in published] == [state.log.last_seq]
    payload = published[0].payload
    assert isinstance(payload, Activity) and payload.activity_id == after.activity_id
    ids = {e.payload.activity_id for e in retained(state) if isinstance(e.payload, Activity)}
    assert refused.activity_id not in ids
    assert after.activity_id in ids


async def test_durable_waits_for_a_commit_in_flight_after_a_failure(
    open_hub: Opener, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = open_hub()
    writes = GatedWrites(monkeypatch, hub.store, gated=2, fail=frozenset({1}))
    try:
        hub.state.record_activity(agent_id="alice", activity_type=ActivityType.TASK_ASSIGNED)
        with pytest.raises(StoreUnavailable):
            await commit(hub)
        await reload_finished(hub.store)
        retry = hub.state.record_activity(agent_id="alice", activity_type=ActivityType.TASK_ASSIGNED)
        await writes.in_flight()
        waiter = asyncio.create_task(hub.store.durable(hub.state.log.last_seq))
        await asyncio.sleep(0)  # the waiter checks in while the commit is in flight
        writes.release.set()
        await waiter
        assert hub.state.get_activity(retry.activity_id) == retry
    finally:
        writes.release.set()


async def test_a_write_right_after_a_failure_is_kept(
    open_hub: Opener, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = open_hub()
    state, store = hub.state, hub.store
    state.record_activity(agent_id="alice", activity_type=ActivityType.TASK_ASSIGNED)
    await commit(hub)
    FailingWrites(monkeypatch, store, fail={1})
    real_load = store._load
    reload_may_finish = threading.Event()

    def slow_load(target: CollaborationState) -> None:
        # A slow disk: the reload takes until the caller has retried (or half a second,
        # for a store that finishes the reload before refusing the write).
        reload_may_finish.wait(0.5)
        real_load(target)

    monkeypatch.setattr(store, "_load", slow_load)
    state.record_activity(agent_id="alice", activity_type=ActivityType.MESSAGE_SENT)
    with pytest.raises(StoreUnavailable):
        await commit(hub)
    # The caller retries at once.
    retry = state.record_activity(agent_id="alice", activity_type=ActivityType.MESSAGE_SENT)
    retry_seq = state.log.last_seq
    reload_may_finish.set()
    await store.durable(retry_seq)  # acknowledged
    await reload_finished(store)
    assert state.get_activity(retry.activity_id) == retry
    assert state.log.last_seq == retry_seq


async def test_a_full_database_refuses_writes_saying_so_until_there_is_room(open_hub: Opener, clock: FakeClock) -> None:
    """SQLite's own SQLITE_FULL (``max_page_count`` makes SQLite fail exactly as on ENOSPC,
    rolling the transaction back itself), not a simulated exception."""
    hub = open_hub()
    state, store = hub.state, hub.store
    assert store._connection is not None
    kept = state.record_activity(agent_id="alice", activity_type=ActivityType.TASK_ASSIGNED)
    await commit(hub)
    (pages,) = store._connection.execute("PRAGMA page_count").fetchone()
    store._connection.execute(f"PRAGMA max_page_count = {pages}")

    clock.advance()
    refused = state.record_activity(agent_id="bob", activity_type=ActivityType.MESSAGE_SENT, metadata={"b": "x" * 9000})
    with pytest.raises(StoreUnavailable, match=r"could not write \(database or disk is full\)"):
        await commit(hub)
    await reload_finished(store)
    assert state.get_activity(refused.activity_id) is None
    assert state.get_activity(kept.activity_id) == kept

    store._connection.execute(f"PRAGMA max_page_count = {pages * 100}")  # room again
    clock.advance()
    after = state.record_activity(agent_id="bob", activity_type=ActivityType.MESSAGE_SENT, metadata={"b": "x" * 9000})
    await commit(hub)
    assert store.failure is None
    await hub.close()
    again = open_hub()
    assert [again.state.get_activity(a.activity_id) for a in (kept, after)] == [kept, after]
    assert again.state.get_activity(refused.activity_id) is None


class FullOnDelete:
    """A store connection whose DELETEs fail as they do on a full disk (a delete writes
    pages to the WAL too); everything else goes to the real connection."""

    def __init__(self, real: sqlite3.Connection) -> None:
        self.real = real
        self.refused = 0

    def execute(self, sql: str, parameters: Sequence[object] = ()) -> sqlite3.Cursor:
        if sql.startswith("DELETE"):
            self.refused += 1
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.execute(sql, parameters)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_pruning_that_fails_refuses_no_committed_write(
    open_hub: Opener, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention runs between commits: its failure must neither refuse a write nor
    leave a transaction open that would fail every later commit."""
    hub = open_hub(retention=Retention(count=1, every=3600.0))
    state, store = hub.state, hub.store
    assert store._connection is not None
    full = FullOnDelete(store._connection)
    monkeypatch.setattr(store, "_connection", full)
    recorded = []
    for index in range(3):
        clock.advance()
        recorded.append(state.record_activity(agent_id=f"agent-{index}", activity_type=ActivityType.MESSAGE_SENT))
        await commit(hub)  # acknowledged
        await pruned(hub)  # fails
    assert full.refused >= 3 and store.failure is None
    monkeypatch.setattr(store, "_connection", full.real)
    clock.advance()
    recorded.append(state.record_activity(agent_id="agent-3", activity_type=ActivityType.MESSAGE_SENT))
    await commit(hub)
    await hub.close()
    again = open_hub()
    assert [again.state.get_activity(a.activity_id) for a in recorded] == recorded


# -- close ------------------------------------------------------------------------------


async def test_close_commits_what_is_staged(open_hub: Opener, data_dir: Path) -> None:
    hub = open_hub()
    activity = hub.state.record_activity(agent_id="alice", activity_type=ActivityType.TASK_ASSIGNED)
    await hub.close()  # no durable(): close commits it
    again = open_hub()
    assert again.state.get_activity(activity.activity_id) == activity


async def test_close_commits_an_answer_staged_on_its_own(open_hub: Opener, clock: FakeClock) -> None:
    hub = open_hub()
    hub.state.record_activity(agent_id="alice", activity_type=ActivityType.TASK_ASSIGNED)
    await commit(hub)
    hub.state.idempotency.store(METHOD, "late", b"fp", b"answer", clock())
    await hub.close()
    again = open_hub()
    assert again.state.idempotency.lookup(METHOD, "late", b"fp", clock()) == b"answer"


async def test_a_write_after_close_is_refused_not_left_waiting(open_hub: Opener) -> None:
    hub = open_hub()
    await hub.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await asyncio.wait_for(hub.store.durable(record(hub)), 10)


async def test_close_releases_the_waiters_of_a_commit_in_flight(
    open_hub: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = open_hub()
    writes = GatedWrites(monkeypatch, hub.store, gated=1)
    hub.state.record_activity(agent_id="alice", activity_type=ActivityType.TASK_ASSIGNED)
    waiter = asyncio.create_task(hub.store.durable(hub.state.log.last_seq))
    try:
        await writes.in_flight()
        closing = asyncio.create_task(hub.close())
        await asyncio.sleep(0)  # close starts while the commit is in flight
        writes.release.set()
        await closing
        for _ in range(10):
            await asyncio.sleep(0)
        assert waiter.done()
        assert waiter.exception() is None
    finally:
        writes.release.set()
        waiter.cancel()


# -- retention --------------------------------------------------------------------------


async def test_retention_by_count(open_hub: Opener, clock: FakeClock, data_dir: Path) -> None:
    retention = Retention(count=5, every=3600.0)
    hub = open_hub(retention=retention)
    kept_open = hub.state.record_activity(agent_id="keeper", activity_type=ActivityType.TASK_ASSIGNED)
    await commit(hub)
    recorded: list[Activity] = []
    for index in range(20):
        clock.advance()
        recorded.append(hub.state.record_activity(agent_id=f"agent-{index}", activity_type=ActivityType.MESSAGE_SENT))
        await commit(hub)
    for activity in recorded:
        clock.advance()
        hub.state.complete_activity(activity.activity_id)
        await commit(hub)
    last_seq = hub.state.log.last_seq
    await pruned(hub)
    await hub.close()

    event_seqs = [seq for (seq,) in query(data_dir, "SELECT seq FROM events ORDER BY seq")]
    assert 0 < len(event_seqs) <= 5
    assert event_seqs == list(range(last_seq - len(event_seqs) + 1, last_seq + 1))  # the newest
    completed = [str(i) for (i,) in query(data_dir, "SELECT activity_id FROM activities WHERE status != 'active'")]
    assert 0 < len(completed) <= 5
    assert set(completed) <= {a.activity_id for a in recorded[-5:]}  # the newest
    assert query(data_dir, "SELECT activity_id, status FROM activities WHERE status = 'active'") == [
        (kept_open.activity_id, "active")
    ]

    again = open_hub(retention=retention)
    assert again.state.log.last_seq == last_seq
    assert again.state.get_activity(kept_open.activity_id) == kept_open
    again.state.complete_activity(kept_open.activity_id)
    await commit(again)


async def test_retention_keeps_the_newest_count_completed_activities(
    open_hub: Opener, clock: FakeClock, data_dir: Path
) -> None:
    hub = open_hub(retention=Retention(count=5, every=3600.0))
    recorded: list[Activity] = []
    for index in range(20):
        clock.advance()
        activity = hub.state.record_activity(agent_id=f"agent-{index}", activity_type=ActivityType.MESSAGE_SENT)
        recorded.append(activity)
        hub.state.complete_activity(activity.activity_id)
        await commit(hub)
    await pruned(hub)
    await hub.close()
    completed = {str(i) for (i,) in query(data_dir, "SELECT activity_id FROM activities")}
    assert completed == {a.activity_id for a in recorded[-5:]}


async def test_retention_by_age(
    open_hub: Opener, clock: FakeClock, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wall = clock.now + 10_000.0  # the store's time.time(): long after the old writes
    monkeypatch.setattr(sqlite_module, "time", types.SimpleNamespace(time=lambda: wall, monotonic=time.monotonic))
    retention = Retention(seconds=1_000.0, every=3600.0)
    hub = open_hub(retention=retention)
    state = hub.state

    old_done = state.record_activity(agent_id="alice", activity_type=ActivityType.TASK_ASSIGNED)
    state.complete_activity(old_done.activity_id)
    old_open = state.record_activity(agent_id="alice", activity_type=ActivityType.TASK_ASSIGNED)
    old_session = state.start_collaboration(participants=["alice", "bob"])
    state.record_decision(session_id=old_session.session_id, agent_id="alice", decision="old")
    state.end_collaboration(old_session.session_id)
    old_active = state.start_collaboration(participants=["carol"])
    state.idempotency.store(METHOD, "old-key", b"fp", b"old", wall - 2 * 24 * 3600.0)
    await commit(hub)

    clock.now = wall - 10.0  # recent writes
    new_done = state.record_activity(agent_id="bob", activity_type=ActivityType.MESSAGE_SENT)
    state.complete_activity(new_done.activity_id)
    new_session = state.start_collaboration(participants=["bob"])
    state.record_decision(session_id=new_session.session_id, agent_id="bob", decision="new")
    state.end_collaboration(new_session.session_id)
    state.idempotency.store(METHOD, "new-key", b"fp", b"new", clock())
    await commit(hub)
    await pruned(hub)
    await hub.close()

    assert [t for (t,) in query(data_dir, "SELECT min(time) FROM events")] == [wall - 10.0]
    assert {str(i) for (i,) in query(data_dir, "SELECT activity_id FROM activities")} == {
        old_open.activity_id,
        new_done.activity_id,
    }
    assert {str(i) for (i,) in query(data_dir, "SELECT session_id FROM sessions")} == {
        old_active.session_id,
        new_session.session_id,
    }
    assert {str(i) for (i,) in query(data_dir, "SELECT session_id FROM decisions")} == {new_session.session_id}
    assert [k for (k,) in query(data_dir, "SELECT key FROM idempotency")] == ["new-key"]

    again = open_hub(retention=retention)
    assert again.state.get_activity(old_open.activity_id) == old_open
    assert [s.session_id for s in again.state.active_collaborations()] == [old_active.session_id]
    assert [s.session_id for s in again.state.ended_collaborations()] == [new_session.session_id]
    again.state.complete_activity(old_open.activity_id)
    await commit(again)


# -- group commit -----------------------------------------------------------------------


async def test_group_commit(open_hub: Opener, monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    hub = open_hub()
    writes = FailingWrites(monkeypatch, hub.store, fail=set())
    recorded = [
        hub.state.record_activity(agent_id=f"agent-{index % 7}", activity_type=ActivityType.MESSAGE_SENT)
        for index in range(200)
    ]
    await hub.store.durable(hub.state.log.last_seq)
    assert 1 <= writes.calls < 200
    await hub.close()

    assert query(data_dir, "SELECT count(*) FROM activities") == [(200,)]
    again = open_hub()
    assert again.state.log.last_seq == 200
    assert again.state.agent_status().active_activities == 200
    assert all(again.state.get_activity(a.activity_id) == a for a in recorded)


def test_a_run_of_activities_leaves_agent_and_session_rows_as_its_rows_in_turn_would(data_dir: Path) -> None:
    """One agents row per agent is written for a run of new activities: its last
    activity, and the last department given in the run, else the one it had; and one
    sessions row update per session, by the run's activities in it."""
    store = SQLiteStore(data_dir)
    connection = store._open()
    try:
        connection.executemany(
            "INSERT INTO agents (agent_id, department, last_activity_id) VALUES (?, ?, 'act_old')",
            [("agent-x", "research"), ("agent-y", "ops")],
        )
        connection.executemany(
            "INSERT INTO sessions VALUES (?, 1, NULL, ?, 0, '{}')", [("collab_a", 5), ("collab_b", 0), ("collab_c", 2)]
        )

        def activity(number: int, agent_id: str, department: str, session_id: str = "") -> Activity:
            return Activity(
                activity_id=f"act_{number}",
                agent_id=agent_id,
                department=department,
                activity_type=ActivityType.MESSAGE_SENT,
                timestamp=1_764_000_000.0 + number,
                metadata={},
                related_agents=[],
                session_id=session_id,
            )

        run = [
            activity(1, "agent-x", "sales", "collab_a"),
            activity(2, "agent-x", "", "collab_b"),  # no department given: "sales" stays
            activity(3, "agent-y", ""),  # none in the whole run: the row's "ops" stays
            activity(4, "agent-z", "", "collab_a"),
            activity(5, "agent-z", "support", "collab_a"),
            activity(6, "agent-z", ""),
        ]
        SQLiteStore._activity_run(connection, run)
        agents = sorted(connection.execute("SELECT agent_id, department, last_activity_id FROM agents").fetchall())
        sessions = sorted(connection.execute("SELECT session_id, activity_count FROM sessions").fetchall())
    finally:
        connection.close()
    assert agents == [("agent-x", "sales", "act_2"), ("agent-y", "ops", "act_3"), ("agent-z", "support", "act_6")]
    assert sessions == [("collab_a", 8), ("collab_b", 1), ("collab_c", 2)]


async def test_writes_staged_before_the_commit_loop_starts_are_committed(open_hub: Opener, data_dir: Path) -> None:
    hub = open_hub(start=False)
    seqs = [record(hub, index) for index in range(3)]
    hub.store.start()
    await asyncio.wait_for(hub.store.durable(seqs[-1]), 10)
    assert query(data_dir, "SELECT count(*) FROM activities") == [(3,)]


def record(hub: Hub, index: int = 0) -> int:
    """Record an activity; the seq of its event."""
    hub.state.record_activity(agent_id=f"agent-{index % 7}", activity_type=ActivityType.MESSAGE_SENT)
    return hub.state.log.last_seq


async def made_busy(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> tuple[GatedWrites, asyncio.Future[None]]:
    """Commit a first write with a second one staged while that commit runs (what makes the
    store busy); the commits, and the second write's wait to be durable."""
    writes = GatedWrites(monkeypatch, hub.store, gated=1)
    first = asyncio.ensure_future(hub.store.durable(record(hub)))
    await writes.in_flight()
    second = asyncio.ensure_future(hub.store.durable(record(hub, 1)))
    writes.release.set()
    await asyncio.wait_for(first, 10)
    return writes, second


async def test_a_write_after_a_quiet_spell_commits_at_once(open_hub: Opener) -> None:
    """A lone writer never waits for company: each of its writes commits as soon as it is
    made, however long a busy server would hold a commit open."""
    hub = open_hub(commit_delay=60.0, commit_quiet=60.0)
    for index in range(5):
        await asyncio.wait_for(hub.store.durable(record(hub, index)), 10)
    assert hub.store.commits == 5


async def test_writes_that_keep_coming_share_a_commit(open_hub: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write staged while a commit runs means the server is busy: the next commit waits
    for the writes that keep arriving, each gap shorter than ``commit_quiet`` though they
    go on for much longer, carries them all, and goes once they stop."""
    hub = open_hub(commit_delay=30.0, commit_quiet=0.5)
    writes, second = await made_busy(hub, monkeypatch)
    waiting = [second]
    for index in range(2, 14):  # 1.2 s of writes, 0.1 s apart
        await asyncio.sleep(0.1)
        assert not any(write.done() for write in waiting), "committed while writes kept coming"
        waiting.append(asyncio.ensure_future(hub.store.durable(record(hub, index))))
    await asyncio.wait_for(asyncio.gather(*waiting), 10)  # committed once they stopped coming
    assert hub.store.commits == 2
    assert writes.calls == 2


async def test_a_busy_store_commits_by_the_delay_even_if_writes_never_stop(
    open_hub: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = open_hub(commit_delay=3.0, commit_quiet=60.0)
    _, second = await made_busy(hub, monkeypatch)
    later: list[asyncio.Future[None]] = []
    for index in range(2, 3000):  # a write every 10 ms, for up to 30 s
        if second.done():
            break
        later.append(asyncio.ensure_future(hub.store.durable(record(hub, index))))
        await asyncio.sleep(0.01)
    assert second.done(), "the commit waited for the writes to stop, past commit_delay"
    await second
    # It waited for company (writes made after it share its commit), then went while
    # writes went on.
    assert later and later[0].done()
    await asyncio.wait_for(asyncio.gather(*later), 10)


async def test_commit_delay_zero_commits_each_batch_at_once(open_hub: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = open_hub(commit_delay=0.0, commit_quiet=60.0)
    _, second = await made_busy(hub, monkeypatch)
    await asyncio.wait_for(second, 10)
    assert hub.store.commits == 2


# -- open_store -------------------------------------------------------------------------


def test_open_store_memory(tmp_path: Path) -> None:
    assert isinstance(open_store("memory", tmp_path), MemoryStore)


def test_open_store_sqlite(tmp_path: Path) -> None:
    store = open_store("sqlite", tmp_path, retention=Retention(count=7))
    assert isinstance(store, SQLiteStore)
    assert store.retention.count == 7
    assert str(tmp_path) in store.description


def test_open_store_redis_url_gives_a_redis_store_with_its_prefix(tmp_path: Path) -> None:
    store = open_store("redis://127.0.0.1:6379/2?prefix=team", tmp_path)
    assert isinstance(store, RedisStore)
    assert store.prefix == "team" and store.url == "redis://127.0.0.1:6379/2"


def test_open_store_unknown(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="must be sqlite, memory or redis"):
        open_store("bogus", tmp_path)


# -- a bulk stream across a failed commit -------------------------------------------------


async def test_a_bulk_stream_never_reports_a_refused_item_as_recorded(
    make_hub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that fails in the middle of a bulk stream refuses the items it held, though
    they were decided already; the stream's answer must say so, item by item: every item
    it reports recorded is stored, every one it reports UNAVAILABLE is not."""
    from collab_grpc.v1 import collaboration_pb2 as pb
    from tests.support.rpc import activity

    running, client = await make_hub(store="sqlite")
    FailingWrites(monkeypatch, running.store, fail={2})
    items = [pb.BulkRecordActivitiesRequest(activity=activity(f"bulk_{n % 4}")) for n in range(400)]

    async def send() -> Any:
        for number, item in enumerate(items):
            yield item
            if number % 25 == 0:
                await asyncio.sleep(0.01)  # several commits during the stream, one of them failing

    answer = await client.stub.BulkRecordActivities(send(), metadata=client.metadata)
    refused = [r for r in answer.results if r.error_code == "UNAVAILABLE"]
    stored = [r.activity_id for r in answer.results if not r.error_code]
    assert refused and stored, "the failing commit fell inside the stream"
    assert (answer.recorded, answer.failed) == (len(stored), len(refused))
    assert all(r.activity_id == "" and "not recorded" in r.error_message for r in refused)
    for activity_id in stored:
        found = await client.stub.GetActivity(pb.GetActivityRequest(activity_id=activity_id), metadata=client.metadata)
        assert found.activity.activity_id == activity_id
    assert running.store.failure_marks, "the failure was seen"


async def test_a_failed_reload_refuses_every_later_write_and_closes(
    open_hub: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit fails and reading the file back fails too: the state in memory can no
    longer be trusted, so that write and every later one is refused (none left waiting),
    and the store still closes."""
    hub = open_hub()
    state, store = hub.state, hub.store
    FailingWrites(monkeypatch, store, fail={1})

    def unreadable(_state: CollaborationState) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "_load", unreadable)
    state.record_activity(agent_id="alice", activity_type=ActivityType.TASK_ASSIGNED)
    with pytest.raises(StoreUnavailable, match="could not be read back"):
        await asyncio.wait_for(store.durable(state.log.last_seq), 5)
    state.record_activity(agent_id="bob", activity_type=ActivityType.TASK_ASSIGNED)
    with pytest.raises(StoreUnavailable, match="restarted"):
        await asyncio.wait_for(store.durable(state.log.last_seq), 5)
    await asyncio.wait_for(hub.close(), 5)


def test_an_sqlite_library_too_old_is_refused_saying_which_is_needed(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    with pytest.raises(StoreError, match=r"needs SQLite 3\.33\.0 or newer; this Python links SQLite 3\.31\.1"):
        SQLiteStore(data_dir).open(CollaborationState())
    assert query(data_dir, "SELECT count(*) FROM sqlite_master") == [(0,)]  # nothing written


def test_an_sqlite_library_without_json_functions_is_refused(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_module, "_JSON_PROBE", "SELECT no_such_json_function('[1]')")
    with pytest.raises(StoreError, match=r"needs SQLite's JSON functions; this Python's SQLite \S+ lacks them"):
        SQLiteStore(data_dir).open(CollaborationState())


async def test_a_statement_failing_in_the_writer_thread_refuses_the_whole_commit(
    open_hub: Opener, data_dir: Path
) -> None:
    """The events' rows go in first; when a later statement of the commit fails (here the
    new activity's row, whose id a row the store did not write has taken), the events'
    rows go too, the writes are refused, and the state is what the file holds."""
    hub = open_hub()
    kept = hub.state.record_activity(agent_id="alice", activity_type=ActivityType.MESSAGE_SENT)
    await commit(hub)
    refused = hub.state.record_activity(agent_id="bob", activity_type=ActivityType.MESSAGE_SENT)
    seq = hub.state.log.last_seq
    intruder = sqlite3.connect(data_dir / sqlite_module.FILE_NAME)
    try:
        intruder.execute(
            "INSERT INTO activities (activity_id, seq, status, body) VALUES (?, 0, 'active', ?)",
            (refused.activity_id, encode(refused)),
        )
        intruder.commit()
    finally:
        intruder.close()
    with pytest.raises(StoreUnavailable, match=r"UNIQUE constraint failed: activities\.activity_id"):
        await hub.store.durable(seq)
    await reload_finished(hub.store)
    assert query(data_dir, "SELECT seq FROM events") == [(seq - 1,)]
    assert query(data_dir, "SELECT value FROM meta WHERE key = 'last_seq'") == [(str(seq - 1),)]
    assert hub.state.log.last_seq == seq - 1
    assert hub.state.get_activity(kept.activity_id) == kept


async def test_a_commit_larger_than_one_statement_goes_in_chunk_by_chunk(
    open_hub: Opener, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each JSON array holds ROWS_PER_STATEMENT events (so a value never nears SQLite's
    size limit); an activity recorded in one chunk may be completed in the next."""
    monkeypatch.setattr(sqlite_module, "ROWS_PER_STATEMENT", 2)
    hub = open_hub()
    recorded = [
        hub.state.record_activity(agent_id=f"agent-{index}", activity_type=ActivityType.MESSAGE_SENT)
        for index in range(3)
    ]
    for activity in recorded[:2]:
        hub.state.complete_activity(activity.activity_id)
    await commit(hub)
    assert query(data_dir, "SELECT count(*) FROM events") == [(5,)]
    assert sorted(query(data_dir, "SELECT activity_id, status FROM activities")) == sorted(
        [
            (recorded[0].activity_id, "completed"),
            (recorded[1].activity_id, "completed"),
            (recorded[2].activity_id, "active"),
        ]
    )


# -- publish at commit, answer after the fsync (issue 22) ---------------------------------


class GatedSync:
    """Replaces a store's ``_sync`` (the WAL's fsync): it waits for ``release``, and
    raises OSError when ``fail`` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, store: SQLiteStore) -> None:
        self.real = store._sync
        self.started = threading.Event()
        self.release = threading.Event()
        self.fail = False
        monkeypatch.setattr(store, "_sync", self)

    def __call__(self) -> None:
        self.started.set()
        assert self.release.wait(10.0), "the test never released the fsync"
        if self.fail:
            raise OSError(5, "Input/output error")
        self.real()


async def test_events_are_published_at_commit_and_writes_answered_after_the_fsync(
    open_hub: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = open_hub()
    sync = GatedSync(monkeypatch, hub.store)
    subscription = hub.state.subscribe(EventFilter(), 100)
    seq = record(hub)
    answered = asyncio.ensure_future(hub.store.durable(seq))
    assert await asyncio.to_thread(sync.started.wait, 10.0)
    for _ in range(100):  # the publication crosses from the writer thread to the loop
        if len(subscription):
            break
        await asyncio.sleep(0.01)
    assert [event.seq for event in subscription.take()] == [seq], "published once committed, before the fsync"
    assert not answered.done(), "answered before the fsync"
    sync.release.set()
    await asyncio.wait_for(answered, 10)


async def test_a_failed_fsync_refuses_its_writes_and_every_later_one_and_the_next_start_begins_a_new_epoch(
    open_hub: Opener, monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    hub = open_hub()
    kept = record(hub)
    await hub.store.durable(kept)
    epoch = hub.state.epoch
    sync = GatedSync(monkeypatch, hub.store)
    sync.fail = True
    sync.release.set()
    with pytest.raises(StoreUnavailable, match=r"fsync failed: \[Errno 5\] Input/output error"):
        await asyncio.wait_for(hub.store.durable(record(hub, 1)), 10)
    with pytest.raises(StoreUnavailable, match="until the server is restarted"):
        await asyncio.wait_for(hub.store.durable(record(hub, 2)), 10)
    await hub.close()
    assert query(data_dir, "SELECT value FROM meta WHERE key = 'running'") == [(sqlite_module.SYNC_FAILED,)]
    again = open_hub()
    assert again.state.epoch != epoch, "subscribers may have seen events the disk lost: a new epoch"
    assert again.state.log.last_seq >= kept


async def test_a_start_begins_a_new_epoch_only_after_an_unclean_stop_on_another_boot(
    open_hub: Opener, monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    monkeypatch.setattr(sqlite_module, "boot_id", lambda: "boot-1")
    hub = open_hub()
    epoch = hub.state.epoch
    await hub.store.durable(record(hub))
    await hub.close()  # a clean stop
    assert query(data_dir, "SELECT value FROM meta WHERE key = 'running'") == [("",)]
    monkeypatch.setattr(sqlite_module, "boot_id", lambda: "boot-2")
    cleanly = open_hub()
    assert cleanly.state.epoch == epoch, "a clean stop: the history goes on, whatever the boot"
    await cleanly.store.durable(record(cleanly, 1))
    # Not closed (kill -9): the same boot keeps the epoch, another begins a new one.
    killed = open_hub()
    assert killed.state.epoch == epoch
    last = killed.state.log.last_seq
    monkeypatch.setattr(sqlite_module, "boot_id", lambda: "boot-3")
    crashed = open_hub()
    assert crashed.state.epoch != epoch
    assert crashed.state.log.last_seq == last, "the seq goes on in the new epoch"
    monkeypatch.setattr(sqlite_module, "boot_id", lambda: None)  # no boot id to compare with
    unknown = open_hub()
    assert unknown.state.epoch != crashed.state.epoch, "a boot it cannot tell: every unclean stop is a crash"
    again = open_hub()
    assert again.state.epoch != unknown.state.epoch


# -- resumes from the file (issue 19 item 6) ----------------------------------------------


async def test_a_resume_older_than_the_events_in_memory_reads_the_rest_from_the_file(open_hub: Opener) -> None:
    settings = StateSettings(event_log_retain=10)
    hub = open_hub(settings=settings)
    seqs = [record(hub, index) for index in range(50)]
    await hub.store.durable(seqs[-1])
    await hub.close()
    again = open_hub(settings=settings)
    store, state = again.store, again.state
    assert state.log.first_retained_seq == 41
    assert store.archived_from(state.epoch) == 1
    assert store.archived_from("another-epoch") is None
    resume, subscription = state.resume(EventFilter(), 100, state.epoch, 5, store.archived_from(state.epoch))
    assert resume.recovered and resume.archived_through == 40
    assert [event.seq for event in resume.replay] == list(range(41, 51))
    page = await store.read_events(5, resume.archived_through, 16)
    assert [event.seq for event in page] == list(range(6, 22))
    assert all(event.epoch == state.epoch for event in page)
    without, _ = state.resume(EventFilter(), 100, state.epoch, 5)  # a store without an archive
    assert not without.recovered and without.snapshot is not None
    state.log.unsubscribe(subscription)


# -- retention that keeps up (issue 19 item 7) --------------------------------------------


async def test_retention_runs_round_after_round_until_the_file_is_at_its_count(
    open_hub: Opener, data_dir: Path
) -> None:
    """The store's own loop (not a round per commit): 600 events and 300 completed
    activities come down to the count with no further write."""
    hub = open_hub(retention=Retention(count=20, every=3600.0, chunk=25))
    for index in range(300):
        activity = hub.state.record_activity(agent_id=f"agent-{index % 7}", activity_type=ActivityType.MESSAGE_SENT)
        hub.state.complete_activity(activity.activity_id)
    await hub.store.durable(hub.state.log.last_seq)
    assert hub.store._prune_now is not None
    hub.store._prune_now.set()  # wake it, as a commit past the byte budget does
    deadline = time.monotonic() + 60
    while query(data_dir, "SELECT count(*) FROM events") != [(20,)] or query(
        data_dir, "SELECT count(*) FROM activities"
    ) != [(20,)]:
        assert time.monotonic() < deadline, query(data_dir, "SELECT count(*) FROM events")
        await asyncio.sleep(0.05)
    assert hub.store.archived_from(hub.state.epoch) == 581


async def test_a_resume_from_the_file_ends_saying_so_when_retention_deleted_its_next_page(open_hub: Opener) -> None:
    """The servicer streams a resume from the file a page at a time; if retention deleted
    the next page meanwhile, the stream ends "no longer retained" (the client's next
    resume gets a fresh state) rather than skip events."""
    settings = StateSettings(event_log_retain=10)
    hub = open_hub(settings=settings)
    seqs = [record(hub, index) for index in range(1_000)]
    await hub.store.durable(seqs[-1])
    servicer = CollaborationServicer(hub.state, store=hub.store)
    archive = hub.store.archived_from(hub.state.epoch)
    resume, subscription = hub.state.resume(EventFilter(), 100, hub.state.epoch, 0, archive)
    assert resume.recovered and resume.archived_through == 990
    messages = servicer._messages(
        [], resume, subscription, pb.SubscribeEventsRequest(since_seq=0, epoch=hub.state.epoch)
    )
    first_page = [await anext(messages) for _ in range(servicer_module.ARCHIVE_PAGE)]
    assert [m.event.seq for m in first_page] == list(range(1, servicer_module.ARCHIVE_PAGE + 1))
    assert hub.store._connection is not None
    async with hub.store._writer_lock:  # retention, meanwhile
        hub.store._connection.execute("DELETE FROM events WHERE seq <= 600")
    rest = [message async for message in messages]
    assert rest == []
    assert subscription.closed_reason is not None
    assert f"events after seq {servicer_module.ARCHIVE_PAGE} are no longer retained" in subscription.closed_reason
