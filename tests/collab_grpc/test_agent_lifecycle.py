"""Agents have a lifecycle: an agent idle, in no active session and not in the roster
for the idle TTL leaves the live status with an AGENT_RETIRED event, its history stays
readable, every store keeps (and restores) only the live agents, and replicas follow.

Driven with a fake clock: nothing here waits for time to pass."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from bridge.fanout import ClientFilter, Frame
from bridge.hub import StreamHub
from bridge.mapping import event_json
from bridge.protocol import MESSAGE_TYPES, handle_client_message
from collab_grpc.convert import EVENT_KIND_TO_PROTO, event_to_proto
from collab_grpc.events import EventFilter
from collab_grpc.model import ActivityType, AgentRetirement, Event, EventKind, MemoryOperation
from collab_grpc.ratelimit import RateLimiter
from collab_grpc.server import expiry_period
from collab_grpc.state import CollaborationState, RosterEntry, StateSettings
from collab_grpc.store import sqlite as sqlite_module
from collab_grpc.store.codec import decode_payload, encode
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.collab_grpc.conftest import SQLiteStores

TTL = 100.0


class FakeClock:
    """Near the real time (the SQLite store's pruning compares with time.time()), moving
    only when told to."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(float(int(time.time())))


def settings(batch: int = 256) -> StateSettings:
    return StateSettings(agent_idle_ttl=TTL, agent_retire_batch=batch, activity_ttl=10 * TTL)


def make_state(clock: FakeClock, *, batch: int = 256, roster: tuple[RosterEntry, ...] = ()) -> CollaborationState:
    return CollaborationState(settings(batch), clock=clock, epoch="epoch-test", roster=roster)


def live_ids(state: CollaborationState) -> list[str]:
    return [view.agent_id for view in state.agent_status().agents]


def retired_ids(events: list[Event]) -> list[str]:
    return [e.payload.agent_id for e in events if isinstance(e.payload, AgentRetirement)]


def record_and_complete(state: CollaborationState, agent_id: str, department: str = "ops") -> str:
    activity = state.record_activity(
        agent_id=agent_id, activity_type=ActivityType.TASK_COMPLETED, department=department
    )
    state.complete_activity(activity.activity_id)
    return activity.activity_id


# -- the domain core --------------------------------------------------------------------


def test_an_idle_agent_leaves_the_live_status_after_the_ttl_with_an_event(clock: FakeClock) -> None:
    state = make_state(clock)
    subscription = state.subscribe(EventFilter(), 100)
    activity_id = record_and_complete(state, "worker_1")
    last_seen = clock.now
    clock.advance(TTL)  # exactly the TTL: not yet
    assert state.retire_idle_agents() == []
    assert live_ids(state) == ["worker_1"]

    clock.advance(1)
    (retired,) = state.retire_idle_agents()
    assert retired == AgentRetirement("worker_1", "ops", activity_id, last_seen)
    status = state.agent_status()
    assert (status.total_agents, status.idle_agents, status.agents) == (0, 0, [])
    assert state.find_agent("worker_1") is None
    assert state.snapshot().agent_status.total_agents == 0
    # Its history stays readable.
    assert state.require_activity(activity_id).agent_id == "worker_1"
    assert [a.activity_id for a in state.activity_feed(agent_id="worker_1")] == [activity_id]
    event = subscription.take()[-1]
    assert (event.kind, event.payload, event.time, event.agent_ids) == (
        EventKind.AGENT_RETIRED,
        retired,
        clock.now,
        ("worker_1",),
    )
    assert event.seq == state.log.last_seq


def test_active_agents_session_members_and_roster_agents_stay_live(clock: FakeClock) -> None:
    state = make_state(clock, roster=(RosterEntry("rostered", "research"),))
    open_activity = state.record_activity(agent_id="busy", activity_type=ActivityType.TASK_ASSIGNED)
    session = state.start_collaboration(participants=["member_a", "member_b"])
    record_and_complete(state, "idle")
    clock.advance(5 * TTL)
    retired = state.retire_idle_agents()
    assert [r.agent_id for r in retired] == ["idle"]
    assert sorted(live_ids(state)) == ["busy", "member_a", "member_b", "rostered"]

    # Their idle time starts when they stop being live: the completion, the session's end.
    state.complete_activity(open_activity.activity_id)
    state.end_collaboration(session.session_id)
    clock.advance(TTL / 2)
    assert state.retire_idle_agents() == []
    clock.advance(TTL / 2 + 1)
    assert sorted(r.agent_id for r in state.retire_idle_agents()) == ["busy", "member_a", "member_b"]
    assert live_ids(state) == ["rostered"]  # the roster keeps its agents whatever their age


def test_every_kind_of_event_about_an_agent_marks_it_seen(clock: FakeClock) -> None:
    state = make_state(clock)
    session = state.start_collaboration(participants=["a", "b"])
    state.end_collaboration(session.session_id)
    clock.advance(TTL - 1)
    state.record_memory_update(operation=MemoryOperation.WRITE, item_id="item", agent_id="a")
    other = state.start_collaboration(participants=["c"])
    state.record_decision(session_id=other.session_id, agent_id="b", decision="go")
    state.end_collaboration(other.session_id)
    clock.advance(2)  # past the TTL for the first session's end, not for the rest
    assert state.retire_idle_agents() == []
    clock.advance(TTL)
    assert sorted(r.agent_id for r in state.retire_idle_agents()) == ["a", "b", "c"]


def test_an_agent_that_records_again_comes_back(clock: FakeClock) -> None:
    state = make_state(clock)
    record_and_complete(state, "worker", department="ops")
    clock.advance(TTL + 1)
    assert [r.agent_id for r in state.retire_idle_agents()] == ["worker"]
    again = state.record_activity(agent_id="worker", activity_type=ActivityType.AGENT_STARTED, department="sales")
    (view,) = state.agent_status().agents
    assert (view.agent_id, view.department, view.active, view.last_activity_id) == (
        "worker",
        "sales",
        True,
        again.activity_id,
    )


def test_one_sweep_looks_at_no_more_than_its_batch(clock: FakeClock) -> None:
    state = make_state(clock, batch=3)
    for n in range(8):
        record_and_complete(state, f"agent_{n}")
    clock.advance(TTL + 1)
    state.record_activity(agent_id="fresh", activity_type=ActivityType.AGENT_STARTED)
    rounds = []
    while True:
        retired = state.retire_idle_agents()
        rounds.append([r.agent_id for r in retired])
        if not state.idle_backlog:
            break
    assert rounds == [["agent_0", "agent_1", "agent_2"], ["agent_3", "agent_4", "agent_5"], ["agent_6", "agent_7"]]
    assert live_ids(state) == ["fresh"]
    assert state.retire_idle_agents() == []


def test_live_agents_found_old_do_not_hold_up_the_sweep(clock: FakeClock) -> None:
    """A live agent at the front is looked at again a TTL later, not at every pass."""
    state = make_state(clock, batch=2)
    state.record_activity(agent_id="busy", activity_type=ActivityType.TASK_ASSIGNED)
    record_and_complete(state, "idle_1")
    record_and_complete(state, "idle_2")
    clock.advance(TTL + 1)
    assert [r.agent_id for r in state.retire_idle_agents()] == ["idle_1"]  # "busy" took one look
    assert [r.agent_id for r in state.retire_idle_agents()] == ["idle_2"]
    assert not state.idle_backlog
    assert live_ids(state) == ["busy"]


def test_a_replica_applying_the_events_ends_with_the_same_live_agents(clock: FakeClock) -> None:
    leader = make_state(clock)
    follower = make_state(clock)
    record_and_complete(leader, "gone")
    leader.start_collaboration(participants=["staying"])
    clock.advance(TTL + 1)
    leader.retire_idle_agents()
    record_and_complete(leader, "back")
    for event in leader.log.events_after(0):
        follower.apply(event)
    assert follower.agent_status() == leader.agent_status()
    assert sorted(live_ids(follower)) == ["back", "staying"]


def test_restore_keeps_only_live_agents(clock: FakeClock) -> None:
    state = make_state(clock, roster=(RosterEntry("rostered", "research"),))
    now = clock.now
    open_activity = CollaborationState(settings(), clock=clock).record_activity(
        agent_id="busy", activity_type=ActivityType.TASK_ASSIGNED
    )
    state.restore(
        epoch="epoch-test",
        last_seq=0,
        agents=[
            ("recent", "ops", "act_1", now - TTL + 1),
            ("stale", "ops", "act_2", now - TTL - 1),
            ("busy", "eng", None, now - 10 * TTL),  # old, but with an open activity
            ("rostered", "", None, now - 10 * TTL),
        ],
        activities=[open_activity],
        sessions=[],
        decisions=[],
        events=[],
    )
    assert sorted(live_ids(state)) == ["busy", "recent", "rostered"]
    busy = state.find_agent("busy")
    assert busy is not None and busy.department == "eng"
    # The recent one keeps its own idle time; the live ones stay.
    clock.advance(2)
    assert [r.agent_id for r in state.retire_idle_agents()] == ["recent"]
    assert sorted(live_ids(state)) == ["busy", "rostered"]


def test_the_sweep_runs_at_least_every_tenth_of_the_shorter_ttl() -> None:
    assert expiry_period(StateSettings(activity_ttl=3600, agent_idle_ttl=60)) == 6.0
    assert expiry_period(StateSettings(activity_ttl=3600, agent_idle_ttl=3600)) == 30.0
    assert expiry_period(StateSettings(activity_ttl=0.1, agent_idle_ttl=3600)) == 0.05


def test_the_rate_limiter_forgets_agents_whose_bucket_refilled() -> None:
    limiter = RateLimiter(10)  # burst 10: one record leaves a bucket that refills in 0.1 s
    for n in range(50_000):  # one new agent id a record, 10,000 a second
        limiter.acquire(f"agent_{n}", n / 10_000)
    # Only the agents of the last 0.1 s are remembered, not every id ever seen.
    assert limiter.tracked <= 1_001
    limiter.acquire("later", 100.0)
    assert limiter.tracked == 1


# -- the wire: proto, store codec, bridge --------------------------------------------------


def retirement_event() -> Event:
    return Event(7, "epoch-test", 1_764_000_100.25, EventKind.AGENT_RETIRED, AgentRetirement("w", "ops", "act_1", 1.5))


def test_the_event_round_trips_through_the_codec_and_the_proto() -> None:
    event = retirement_event()
    assert decode_payload(EventKind.AGENT_RETIRED, encode(event.payload)) == event.payload
    assert EVENT_KIND_TO_PROTO[EventKind.AGENT_RETIRED] == pb.EVENT_KIND_AGENT_RETIRED
    message = event_to_proto(event)
    assert message.WhichOneof("payload") == "agent_retired"
    retired = message.agent_retired
    assert (retired.agent_id, retired.department, retired.last_activity_id) == ("w", "ops", "act_1")
    assert retired.last_seen.ToNanoseconds() == 1_500_000_000
    none = event_to_proto(Event(8, "e", 2.0, EventKind.AGENT_RETIRED, AgentRetirement("w", "", None, 1.0)))
    assert none.agent_retired.last_activity_id == ""


def test_the_bridge_sends_an_additive_agent_retired_message() -> None:
    message = event_json(event_to_proto(retirement_event()))
    assert message == {
        "type": "agent_retired",
        "agent_id": "w",
        "department": "ops",
        "last_activity": "act_1",
        "last_seen": 1.5,
        "timestamp": "2025-11-24T16:01:40.250000+00:00",
        "seq": 7,
    }
    frame = StreamHub(16).frame(event_to_proto(retirement_event()))
    assert frame is not None and (frame.type, frame.seq, frame.activity_type) == ("agent_retired", 7, None)


def test_agent_retired_can_be_subscribed_to_by_name() -> None:
    assert "agent_retired" in MESSAGE_TYPES
    reply, chosen = handle_client_message(
        '{"type": "subscribe", "activity_types": ["agent_retired"]}', None, ClientFilter(), 1 << 16
    )
    assert reply["type"] == "subscribed" and reply["activity_types"] == ["agent_retired"]
    assert chosen.wants(Frame("{}", "agent_retired"))
    assert not chosen.wants(Frame("{}", "agent_activity"))
    _, only_activities = handle_client_message(
        '{"type": "subscribe", "activity_types": ["agent_activity"]}', None, ClientFilter(), 1 << 16
    )
    assert not only_activities.wants(Frame("{}", "agent_retired"))


# -- the SQLite store ------------------------------------------------------------------------


def agent_rows(data_dir: Path) -> list[tuple[str, float]]:
    connection = sqlite3.connect(data_dir / sqlite_module.FILE_NAME)
    try:
        return sorted(connection.execute("SELECT agent_id, seen_at FROM agents").fetchall())
    finally:
        connection.close()


async def test_sqlite_drops_a_retired_agent_and_restores_only_live_ones(
    tmp_path: Path, clock: FakeClock, sqlite_stores: SQLiteStores
) -> None:
    data_dir = tmp_path / "data"
    state = make_state(clock)
    store = sqlite_stores.open(data_dir, state)
    kept_activity = record_and_complete(state, "retiring")
    state.start_collaboration(participants=["member"])
    clock.advance(TTL + 1)
    record_and_complete(state, "recent")
    state.retire_idle_agents()
    await store.durable(state.log.last_seq)
    assert [agent_id for agent_id, _ in agent_rows(data_dir)] == ["member", "recent"]
    await sqlite_stores.close(store)

    again = make_state(clock)
    sqlite_stores.open(data_dir, again)
    assert sorted(live_ids(again)) == ["member", "recent"]
    assert again.require_activity(kept_activity).agent_id == "retiring"  # history stays
    events = list(again.log.events_after(0))
    assert retired_ids(events) == ["retiring"]


async def test_sqlite_restart_reads_only_the_live_agents_of_many(tmp_path: Path, sqlite_stores: SQLiteStores) -> None:
    """Agents that went idle while the server was down are not read back (nor counted)."""
    clock = FakeClock(time.time() - 10 * TTL)  # in the past: pruning goes by the real time
    data_dir = tmp_path / "data"
    state = make_state(clock)
    store = sqlite_stores.open(data_dir, state)
    for n in range(2_000):
        record_and_complete(state, f"historic_{n}")
    busy = state.record_activity(agent_id="busy", activity_type=ActivityType.TASK_ASSIGNED)
    await store.durable(state.log.last_seq)
    await sqlite_stores.close(store)

    clock.now = time.time()  # the server was down for longer than the TTL
    again = make_state(clock)
    reopened = sqlite_stores.open(data_dir, again)
    assert live_ids(again) == ["busy"]
    assert again.require_activity(busy.activity_id).status == "active"
    # The rows of agents never retired go with the retention's pruning.
    reopened.retention = sqlite_module.Retention(seconds=1.0)
    more: bool | None = True
    while more:  # rounds, as the store's retention loop runs them
        async with reopened._writer_lock:
            more = await asyncio.get_running_loop().run_in_executor(reopened._executor, reopened._prune_round)
    assert [agent_id for agent_id, _ in agent_rows(data_dir)] == ["busy"]


async def test_sqlite_schema_1_is_upgraded_with_seen_times(
    tmp_path: Path, clock: FakeClock, sqlite_stores: SQLiteStores
) -> None:
    data_dir = tmp_path / "data"
    state = make_state(clock)
    store = sqlite_stores.open(data_dir, state)
    record_and_complete(state, "old")
    clock.advance(TTL + 1)
    record_and_complete(state, "recent")
    await store.durable(state.log.last_seq)
    completed_at = clock.now
    await sqlite_stores.close(store)
    connection = sqlite3.connect(data_dir / sqlite_module.FILE_NAME)
    # Back to version 1's shape: without the agents' seen times (2), the search columns (3)
    # and the idempotency answers' index by age (4).
    undo_3 = (
        "DROP INDEX idempotency_by_age;"
        + "".join(f"DROP INDEX {index};" for index in sqlite_module.SEARCH_INDEXES)
        + "".join(
            f"ALTER TABLE activities DROP COLUMN {column};"
            for column in ("agent_id", "session_id", "parent_activity_id", "recorded_at")
        )
    )
    connection.executescript(
        f"{undo_3} DROP INDEX agents_seen; ALTER TABLE agents DROP COLUMN seen_at; PRAGMA user_version = 1;"
    )
    connection.close()

    again = make_state(clock)
    sqlite_stores.open(data_dir, again)
    assert live_ids(again) == ["recent"]
    assert dict(agent_rows(data_dir))["recent"] == completed_at
