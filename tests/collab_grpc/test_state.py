"""CollaborationState: the domain core's rules, driven directly with a fake clock."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from collab_grpc.errors import CollabError, FailedPrecondition, InvalidArgument, NotFound, RateLimited
from collab_grpc.events import EventFilter
from collab_grpc.model import (
    Activity,
    ActivityCompletion,
    ActivityStatus,
    ActivityType,
    Decision,
    EventKind,
    MemoryOperation,
    MemoryUpdate,
    Session,
)
from collab_grpc.ratelimit import RateLimiter
from collab_grpc.state import CollaborationState, RosterEntry, StateSettings
from collab_grpc.validation import Limits

T0 = 1_700_000_000.5
EPOCH = "epoch-test"


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(clock: FakeClock) -> CollaborationState:
    return CollaborationState(clock=clock, epoch=EPOCH)


def make_state(clock: FakeClock, settings: StateSettings) -> CollaborationState:
    return CollaborationState(settings, clock=clock, epoch=EPOCH)


def record(
    state: CollaborationState,
    agent_id: str = "agent_1",
    *,
    activity_type: ActivityType | str = ActivityType.MEMORY_WRITE,
    department: str = "",
    metadata: Mapping[str, Any] | None = None,
    related_agents: Iterable[str] = (),
    session_id: str = "",
    parent_activity_id: str = "",
) -> Activity:
    return state.record_activity(
        agent_id=agent_id,
        activity_type=activity_type,
        department=department,
        metadata=metadata,
        related_agents=related_agents,
        session_id=session_id,
        parent_activity_id=parent_activity_id,
    )


def all_events(state: CollaborationState) -> list[tuple[int, EventKind]]:
    return [(e.seq, e.kind) for e in state.log.events_after(0)]


def observe(state: CollaborationState) -> tuple[object, ...]:
    """Everything a caller can see, deep-copied so later changes cannot alter it."""
    sessions = state.active_collaborations() + state.ended_collaborations(limit=500)
    return (
        state.agent_status(),
        state.log.last_seq,
        copy.deepcopy(state.activity_feed(limit=500)),
        copy.deepcopy(sessions),
        [copy.deepcopy(state.get_collaboration(s.session_id)) for s in sessions],
    )


# -- activities -------------------------------------------------------------------------


def test_record_activity_fields(state: CollaborationState, clock: FakeClock) -> None:
    activity = state.record_activity(
        agent_id="agent_1",
        activity_type="memory_write",
        department="engineering",
        metadata={"item_id": "item_123", "size_bytes": 1024},
        related_agents=["agent_2"],
    )
    assert activity.agent_id == "agent_1"
    assert activity.department == "engineering"
    assert activity.activity_type is ActivityType.MEMORY_WRITE
    assert activity.timestamp == clock.now
    assert activity.metadata == {"item_id": "item_123", "size_bytes": 1024}
    assert activity.related_agents == ["agent_2"]
    assert activity.status is ActivityStatus.ACTIVE
    assert activity.session_id == ""
    assert activity.parent_activity_id == ""
    assert activity.completed_at is None
    assert activity.failure_reason == ""
    assert state.get_activity(activity.activity_id) is activity
    assert state.require_activity(activity.activity_id) is activity


@pytest.mark.parametrize("activity_type", list(ActivityType))
def test_every_activity_type_is_accepted_by_value(state: CollaborationState, activity_type: ActivityType) -> None:
    activity = record(state, activity_type=activity_type.value)
    assert activity.activity_type is activity_type


def test_activity_id_shape(state: CollaborationState) -> None:
    activity = record(state, "agent_7")
    prefix = f"act_{int(T0)}_agent_7_"
    assert activity.activity_id.startswith(prefix)
    assert len(activity.activity_id) > len(prefix)


def test_activity_ids_unique_within_one_second(state: CollaborationState) -> None:
    ids = [record(state, "agent_1").activity_id for _ in range(300)]
    assert len(set(ids)) == 300
    assert all(i.startswith(f"act_{int(T0)}_agent_1_") for i in ids)


def test_activity_id_retries_on_collision(state: CollaborationState, monkeypatch: pytest.MonkeyPatch) -> None:
    suffixes: Iterator[str] = iter(["aaaa", "aaaa", "aaaa", "bbbb"])
    monkeypatch.setattr("collab_grpc.state._random_suffix", lambda: next(suffixes))
    first = record(state)
    second = record(state)
    assert first.activity_id == f"act_{int(T0)}_agent_1_aaaa"
    assert second.activity_id == f"act_{int(T0)}_agent_1_bbbb"


def test_activity_metadata_is_copied(state: CollaborationState) -> None:
    metadata: dict[str, object] = {"k": 1}
    related = ["agent_2"]
    activity = record(state, metadata=metadata, related_agents=related)
    metadata["k"] = 2
    metadata["new"] = True
    related.append("agent_3")
    assert activity.metadata == {"k": 1}
    assert activity.related_agents == ["agent_2"]


def test_parent_activity_id(state: CollaborationState) -> None:
    parent = record(state)
    child = record(state, parent_activity_id=parent.activity_id)
    assert child.parent_activity_id == parent.activity_id
    state.complete_activity(parent.activity_id)
    grandchild = record(state, parent_activity_id=parent.activity_id)  # a completed parent is still known
    assert grandchild.parent_activity_id == parent.activity_id


def test_complete_activity_success(state: CollaborationState, clock: FakeClock) -> None:
    activity = record(state)
    clock.advance(2.5)
    done = state.complete_activity(activity.activity_id)
    assert done is activity
    assert done.status is ActivityStatus.COMPLETED
    assert done.completed_at == T0 + 2.5
    assert done.failure_reason == ""
    assert state.agent_status().active_activities == 0


def test_complete_activity_failure(state: CollaborationState) -> None:
    activity = record(state)
    done = state.complete_activity(activity.activity_id, success=False, failure_reason="disk full")
    assert done.status is ActivityStatus.FAILED
    assert done.failure_reason == "disk full"


def test_complete_activity_failure_without_reason(state: CollaborationState) -> None:
    activity = record(state)
    done = state.complete_activity(activity.activity_id, success=False)
    assert done.status is ActivityStatus.FAILED
    assert done.failure_reason == ""


def test_complete_twice_names_status(state: CollaborationState) -> None:
    activity = record(state)
    state.complete_activity(activity.activity_id, success=False)
    with pytest.raises(FailedPrecondition, match="already failed"):
        state.complete_activity(activity.activity_id)


# -- agents ---------------------------------------------------------------------------


def test_agent_active_then_idle(state: CollaborationState) -> None:
    activity = record(state, "agent_1")
    (view,) = state.agent_status().agents
    assert view.agent_id == "agent_1"
    assert view.active is True
    assert view.current_activity_id == activity.activity_id
    assert view.last_activity_id == activity.activity_id

    state.complete_activity(activity.activity_id)
    (view,) = state.agent_status().agents
    assert view.active is False
    assert view.current_activity_id is None
    assert view.last_activity_id == activity.activity_id


def test_current_activity_is_newest_open_one(state: CollaborationState) -> None:
    first = record(state)
    second = record(state)
    third = record(state)

    def view_ids() -> tuple[str | None, str | None]:
        (view,) = state.agent_status().agents
        return view.current_activity_id, view.last_activity_id

    assert view_ids() == (third.activity_id, third.activity_id)
    state.complete_activity(third.activity_id)
    assert view_ids() == (second.activity_id, third.activity_id)
    state.complete_activity(first.activity_id)
    assert view_ids() == (second.activity_id, third.activity_id)
    state.complete_activity(second.activity_id)
    assert view_ids() == (None, third.activity_id)


def test_agent_status_counts_and_order(state: CollaborationState) -> None:
    record(state, "zeta")
    done = record(state, "alpha")
    record(state, "mid")
    record(state, "mid")
    state.complete_activity(done.activity_id)
    state.start_collaboration(participants=["alpha", "zeta"])
    summary = state.agent_status()
    assert [v.agent_id for v in summary.agents] == ["alpha", "mid", "zeta"]
    assert summary.total_agents == 3
    assert summary.active_agents == 2
    assert summary.idle_agents == 1
    assert summary.active_activities == 3
    assert summary.active_collaborations == 1


def test_department_handling(clock: FakeClock) -> None:
    state = CollaborationState(clock=clock, roster=[RosterEntry("agent_1", "research")])
    first = record(state, "agent_1")
    assert first.department == "research"  # the roster's department when none is given
    second = record(state, "agent_1", department="engineering")
    assert second.department == "engineering"
    assert state.agent_status().agents[0].department == "engineering"  # the newest given department sticks
    third = record(state, "agent_1")
    assert third.department == "engineering"
    assert first.department == "research"  # earlier activities keep theirs
    newcomer = record(state, "agent_2")
    assert newcomer.department == ""


def test_roster_agents_are_known_and_idle(clock: FakeClock) -> None:
    state = CollaborationState(
        clock=clock, roster=[RosterEntry("agent_b", "ops"), RosterEntry("agent_a", "engineering"), RosterEntry("c")]
    )
    summary = state.agent_status()
    assert [(v.agent_id, v.department, v.active) for v in summary.agents] == [
        ("agent_a", "engineering", False),
        ("agent_b", "ops", False),
        ("c", "", False),
    ]
    assert summary.total_agents == 3
    assert summary.idle_agents == 3
    assert all(v.current_activity_id is None and v.last_activity_id is None for v in summary.agents)
    assert state.log.last_seq == 0  # a roster is not a change


@pytest.mark.parametrize(
    "entry", [RosterEntry(""), RosterEntry("has space"), RosterEntry("a" * 129), RosterEntry("ok", "bad\ndept")]
)
def test_invalid_roster_entry(entry: RosterEntry) -> None:
    with pytest.raises(InvalidArgument):
        CollaborationState(roster=[entry])


def test_writes_make_agents_known(state: CollaborationState) -> None:
    session = state.start_collaboration(participants=["p1", "p2"])
    state.record_decision(session_id=session.session_id, agent_id="voter", decision="ship it")
    state.record_memory_update(operation="read", item_id="item_1", agent_id="reader")
    views = {v.agent_id: v for v in state.agent_status().agents}
    assert set(views) == {"p1", "p2", "voter", "reader"}
    assert not any(v.active for v in views.values())
    assert views["p1"].collaboration_count == 1
    assert views["voter"].collaboration_count == 0


# -- sessions ---------------------------------------------------------------------------


def test_start_collaboration(state: CollaborationState, clock: FakeClock) -> None:
    session = state.start_collaboration(participants=["agent_1", "agent_2"], metadata={"topic": "x"})
    assert session.session_id.startswith(f"collab_{int(T0)}_")
    assert session.participants == ["agent_1", "agent_2"]
    assert session.session_type == "general"
    assert session.started_at == clock.now
    assert session.metadata == {"topic": "x"}
    assert session.ended_at is None
    assert (session.activity_count, session.decision_count) == (0, 0)
    assert state.active_collaborations() == [session]
    typed = state.start_collaboration(participants=["agent_1"], session_type="council")
    assert typed.session_type == "council"
    assert typed.session_id != session.session_id


def test_session_counts(state: CollaborationState) -> None:
    session = state.start_collaboration(participants=["agent_1", "agent_2"])
    other = state.start_collaboration(participants=["agent_3"])
    a1 = record(state, "agent_1", session_id=session.session_id)
    a2 = record(state, "agent_2", session_id=session.session_id)
    record(state, "agent_3", session_id=other.session_id)
    record(state, "agent_1")
    state.record_decision(session_id=session.session_id, agent_id="agent_1", decision="d1")
    state.complete_activity(a1.activity_id)
    assert (session.activity_count, session.decision_count) == (2, 1)
    assert (other.activity_count, other.decision_count) == (1, 0)
    found, activities, decisions = state.get_collaboration(session.session_id)
    assert found is session
    assert [a.activity_id for a in activities] == [a1.activity_id, a2.activity_id]  # oldest first
    assert [d.decision for d in decisions] == ["d1"]


def test_collaboration_count(state: CollaborationState) -> None:
    s1 = state.start_collaboration(participants=["agent_1", "agent_2"])
    state.start_collaboration(participants=["agent_1"])

    def counts() -> dict[str, int]:
        return {v.agent_id: v.collaboration_count for v in state.agent_status().agents}

    assert counts() == {"agent_1": 2, "agent_2": 1}
    state.end_collaboration(s1.session_id)
    assert counts() == {"agent_1": 1, "agent_2": 0}
    assert state.agent_status().active_collaborations == 1


def test_end_collaboration(state: CollaborationState, clock: FakeClock) -> None:
    session = state.start_collaboration(participants=["agent_1"])
    clock.advance(10)
    ended = state.end_collaboration(session.session_id)
    assert ended is session
    assert ended.ended_at == T0 + 10
    assert state.active_collaborations() == []
    assert state.ended_collaborations() == [session]
    found, _, _ = state.get_collaboration(session.session_id)
    assert found is session


def test_ended_sessions_newest_first(state: CollaborationState) -> None:
    sessions = [state.start_collaboration(participants=[f"agent_{i}"]) for i in range(4)]
    for session in (sessions[2], sessions[0], sessions[3]):
        state.end_collaboration(session.session_id)
    ended = [s.session_id for s in state.ended_collaborations()]
    assert ended == [sessions[3].session_id, sessions[0].session_id, sessions[2].session_id]
    assert [s.session_id for s in state.ended_collaborations(limit=2)] == ended[:2]
    assert state.active_collaborations() == [sessions[1]]


def test_ended_sessions_eviction(clock: FakeClock) -> None:
    state = make_state(clock, StateSettings(ended_sessions_limit=2))
    sessions = [state.start_collaboration(participants=["agent_1"]) for _ in range(3)]
    state.record_decision(session_id=sessions[0].session_id, agent_id="agent_1", decision="first")
    for session in sessions:
        state.end_collaboration(session.session_id)
    assert [s.session_id for s in state.ended_collaborations()] == [sessions[2].session_id, sessions[1].session_id]
    evicted = sessions[0].session_id
    with pytest.raises(NotFound):
        state.get_collaboration(evicted)
    with pytest.raises(NotFound):
        state.end_collaboration(evicted)
    with pytest.raises(NotFound):
        record(state, session_id=evicted)
    for kept in sessions[1:]:
        with pytest.raises(FailedPrecondition):
            state.end_collaboration(kept.session_id)


def test_get_collaboration_lists_only_activities_in_history(clock: FakeClock) -> None:
    state = make_state(clock, StateSettings(history_limit=2))
    session = state.start_collaboration(participants=["agent_1"])
    ids = [record(state, session_id=session.session_id).activity_id for _ in range(3)]
    _, activities, _ = state.get_collaboration(session.session_id)
    assert [a.activity_id for a in activities] == ids[1:]
    assert session.activity_count == 3


# -- decisions and memory -----------------------------------------------------------------


def test_record_decision(state: CollaborationState, clock: FakeClock) -> None:
    session = state.start_collaboration(participants=["agent_1", "agent_2"])
    votes = {"agent_1": "yes", "agent_2": "no"}
    decision = state.record_decision(
        session_id=session.session_id,
        agent_id="agent_1",
        decision="use postgres",
        rationale="we know it",
        votes=votes,
        metadata={"k": "v"},
    )
    votes["agent_3"] = "yes"
    assert decision.decision_id.startswith(f"dec_{int(T0)}_")
    assert decision.session_id == session.session_id
    assert decision.agent_id == "agent_1"
    assert decision.decision == "use postgres"
    assert decision.rationale == "we know it"
    assert decision.votes == {"agent_1": "yes", "agent_2": "no"}
    assert decision.metadata == {"k": "v"}
    assert decision.timestamp == clock.now
    second = state.record_decision(session_id=session.session_id, agent_id="agent_2", decision="second")
    assert second.decision_id != decision.decision_id
    assert state.get_collaboration(session.session_id)[2] == [decision, second]
    assert session.decision_count == 2


def test_decisions_stay_readable_after_session_ends(state: CollaborationState) -> None:
    session = state.start_collaboration(participants=["agent_1"])
    decision = state.record_decision(session_id=session.session_id, agent_id="agent_1", decision="d")
    state.end_collaboration(session.session_id)
    assert state.get_collaboration(session.session_id)[2] == [decision]


def test_decision_cap_per_session(clock: FakeClock) -> None:
    state = make_state(clock, StateSettings(max_decisions_per_session=2))
    session = state.start_collaboration(participants=["agent_1"])
    for text in ("one", "two"):
        state.record_decision(session_id=session.session_id, agent_id="agent_1", decision=text)
    before = observe(state)
    with pytest.raises(FailedPrecondition, match="2 decisions"):
        state.record_decision(session_id=session.session_id, agent_id="agent_1", decision="three")
    assert observe(state) == before
    other = state.start_collaboration(participants=["agent_1"])
    state.record_decision(session_id=other.session_id, agent_id="agent_1", decision="fine")


@pytest.mark.parametrize("operation", [*MemoryOperation, "write", "read", "delete"])
def test_record_memory_update(state: CollaborationState, clock: FakeClock, operation: MemoryOperation | str) -> None:
    update = state.record_memory_update(operation=operation, item_id="item_1", agent_id="agent_1", metadata={"n": 1})
    assert update.operation is MemoryOperation(operation)
    assert (update.item_id, update.agent_id, update.timestamp, update.metadata) == (
        "item_1",
        "agent_1",
        clock.now,
        {"n": 1},
    )
    (event,) = state.log.events_after(0)
    assert event.kind is EventKind.MEMORY_UPDATED
    assert event.payload == update


# -- history, feed, expiry ----------------------------------------------------------------


def test_history_limit_keeps_newest(clock: FakeClock) -> None:
    state = make_state(clock, StateSettings(history_limit=3))
    ids = [record(state).activity_id for _ in range(5)]
    assert [a.activity_id for a in state.activity_feed()] == ids[:1:-1]
    assert state.agent_status().active_activities == 5


def test_open_activity_completable_after_eviction(clock: FakeClock) -> None:
    state = make_state(clock, StateSettings(history_limit=2))
    oldest = record(state)
    for _ in range(3):
        record(state, "agent_2")
    assert oldest.activity_id not in [a.activity_id for a in state.activity_feed()]
    assert state.get_activity(oldest.activity_id) is oldest
    assert state.require_activity(oldest.activity_id) is oldest
    child = record(state, "agent_2", parent_activity_id=oldest.activity_id)
    assert child.parent_activity_id == oldest.activity_id
    seq = state.log.last_seq
    done = state.complete_activity(oldest.activity_id)
    assert done.status is ActivityStatus.COMPLETED
    assert state.log.last_seq == seq + 1
    views = {v.agent_id: v for v in state.agent_status().agents}
    assert views["agent_1"].active is False


def test_activity_feed_filters(state: CollaborationState) -> None:
    session = state.start_collaboration(participants=["agent_1", "agent_2"])
    a1 = record(state, "agent_1")
    a2 = record(state, "agent_2", session_id=session.session_id)
    a3 = record(state, "agent_1", session_id=session.session_id)
    a4 = record(state, "agent_2")

    def ids(agent_id: str = "", session_id: str = "", limit: int = 0) -> list[str]:
        return [a.activity_id for a in state.activity_feed(agent_id=agent_id, session_id=session_id, limit=limit)]

    assert ids() == [a4.activity_id, a3.activity_id, a2.activity_id, a1.activity_id]
    assert ids(agent_id="agent_1") == [a3.activity_id, a1.activity_id]
    assert ids(session_id=session.session_id) == [a3.activity_id, a2.activity_id]
    assert ids(agent_id="agent_2", session_id=session.session_id) == [a2.activity_id]
    assert ids(agent_id="nobody") == []
    assert ids(limit=1) == [a4.activity_id]
    assert ids(agent_id="agent_2", limit=1) == [a4.activity_id]


def test_activity_feed_shows_completion(state: CollaborationState) -> None:
    activity = record(state)
    state.complete_activity(activity.activity_id)
    (shown,) = state.activity_feed()
    assert shown.status is ActivityStatus.COMPLETED


@pytest.mark.parametrize(("limit", "expected"), [(0, 50), (1, 1), (49, 49), (60, 60), (500, 60)])
def test_activity_feed_limit_bounds(state: CollaborationState, limit: int, expected: int) -> None:
    for i in range(60):
        record(state, f"agent_{i % 3}")
    assert len(state.activity_feed(limit=limit)) == expected


@pytest.mark.parametrize("limit", [501, -1, 10_000])
def test_activity_feed_limit_out_of_range(state: CollaborationState, limit: int) -> None:
    record(state)
    with pytest.raises(InvalidArgument, match="limit"):
        state.activity_feed(limit=limit)
    with pytest.raises(InvalidArgument, match="limit"):
        state.ended_collaborations(limit=limit)


def test_ended_collaborations_default_limit(state: CollaborationState) -> None:
    for _ in range(55):
        state.end_collaboration(state.start_collaboration(participants=["agent_1"]).session_id)
    assert len(state.ended_collaborations()) == 50
    assert len(state.ended_collaborations(limit=500)) == 55


def test_expire_stale_activities(clock: FakeClock) -> None:
    state = make_state(clock, StateSettings(activity_ttl=60.0))
    old = record(state, "agent_1")
    done = record(state, "agent_3")
    state.complete_activity(done.activity_id)
    clock.advance(30)
    young = record(state, "agent_2")
    clock.advance(20)
    seq = state.log.last_seq
    assert state.expire_stale_activities() == []  # nothing is 60 s old yet
    assert state.log.last_seq == seq

    clock.advance(20)  # old is 70 s old, young 40 s
    expired = state.expire_stale_activities()
    assert expired == [old]
    assert old.status is ActivityStatus.FAILED
    assert old.failure_reason == "expired"
    assert old.completed_at == clock.now
    assert young.status is ActivityStatus.ACTIVE
    assert done.status is ActivityStatus.COMPLETED
    (event,) = list(state.log.events_after(seq))
    assert event.kind is EventKind.ACTIVITY_COMPLETED
    assert isinstance(event.payload, ActivityCompletion)
    assert event.payload.success is False
    assert event.payload.activity.failure_reason == "expired"
    views = {v.agent_id: v for v in state.agent_status().agents}
    assert views["agent_1"].active is False
    assert views["agent_2"].active is True
    with pytest.raises(FailedPrecondition, match="already failed"):
        state.complete_activity(old.activity_id)

    clock.advance(1000)
    assert state.expire_stale_activities() == [young]
    assert state.agent_status().active_activities == 0
    assert state.expire_stale_activities() == []


def test_expire_several_in_recording_order(clock: FakeClock) -> None:
    state = make_state(clock, StateSettings(activity_ttl=10.0))
    activities = [record(state, f"agent_{i}") for i in range(3)]
    clock.advance(1)
    late = record(state, "agent_9")
    clock.advance(9.5)  # the first three are 10.5 s old, the late one 9.5 s
    assert state.expire_stale_activities() == activities
    assert late.status is ActivityStatus.ACTIVE


def test_expire_reaches_activities_evicted_from_history(clock: FakeClock) -> None:
    state = make_state(clock, StateSettings(history_limit=1, activity_ttl=5.0))
    first = record(state)
    record(state, "agent_2")
    clock.advance(6)
    assert first in state.expire_stale_activities()
    assert first.status is ActivityStatus.FAILED


# -- error paths: each raises and changes nothing -------------------------------------------


@dataclass
class World:
    state: CollaborationState
    open_id: str
    done_id: str
    session_id: str
    ended_id: str


@pytest.fixture
def world(clock: FakeClock) -> World:
    state = CollaborationState(clock=clock, epoch=EPOCH, roster=[RosterEntry("roster_agent", "ops")])
    session = state.start_collaboration(participants=["agent_1", "agent_2"])
    ended = state.start_collaboration(participants=["agent_1"])
    open_activity = record(state, "agent_1", session_id=session.session_id)
    done = record(state, "agent_2", department="eng")
    state.complete_activity(done.activity_id)
    state.record_decision(session_id=session.session_id, agent_id="agent_1", decision="d")
    state.record_decision(session_id=ended.session_id, agent_id="agent_1", decision="d")
    state.end_collaboration(ended.session_id)
    state.record_memory_update(operation="write", item_id="i", agent_id="agent_2")
    return World(state, open_activity.activity_id, done.activity_id, session.session_id, ended.session_id)


Call = Callable[[World], object]
NAN = float("nan")


def _record(**kwargs: object) -> Call:
    def call(w: World) -> object:
        args: dict[str, object] = {"agent_id": "new_agent", "activity_type": "task_assigned"}
        args.update(kwargs)
        for key, value in args.items():
            if value == "<session>":
                args[key] = w.session_id
            elif value == "<ended>":
                args[key] = w.ended_id
        return w.state.record_activity(**args)  # type: ignore[arg-type]

    return call


def _decide(**kwargs: object) -> Call:
    def call(w: World) -> object:
        args: dict[str, object] = {"session_id": w.session_id, "agent_id": "agent_1", "decision": "x"}
        args.update(kwargs)
        if args["session_id"] == "<ended>":
            args["session_id"] = w.ended_id
        return w.state.record_decision(**args)  # type: ignore[arg-type]

    return call


def _memory(**kwargs: object) -> Call:
    def call(w: World) -> object:
        args: dict[str, object] = {"operation": "write", "item_id": "item_9", "agent_id": "new_agent"}
        args.update(kwargs)
        return w.state.record_memory_update(**args)  # type: ignore[arg-type]

    return call


ERROR_CASES: list[tuple[str, type[CollabError], Call]] = [
    # record_activity
    ("record-no-agent", InvalidArgument, _record(agent_id="")),
    ("record-agent-space", InvalidArgument, _record(agent_id="a b")),
    ("record-agent-too-long", InvalidArgument, _record(agent_id="a" * 129)),
    ("record-agent-control", InvalidArgument, _record(agent_id="a\x00")),
    ("record-bad-type", InvalidArgument, _record(activity_type="dancing")),
    ("record-type-by-name", InvalidArgument, _record(activity_type="MEMORY_WRITE")),
    ("record-no-type", InvalidArgument, _record(activity_type="")),
    ("record-department-control", InvalidArgument, _record(department="eng\n")),
    ("record-department-too-long", InvalidArgument, _record(department="d" * 129)),
    ("record-metadata-nan", InvalidArgument, _record(metadata={"x": NAN})),
    ("record-metadata-too-big", InvalidArgument, _record(metadata={"x": "a" * (64 * 1024)})),
    ("record-related-duplicate", InvalidArgument, _record(related_agents=["a", "a"])),
    ("record-related-empty-id", InvalidArgument, _record(related_agents=["a", ""])),
    ("record-related-too-many", InvalidArgument, _record(related_agents=[f"a{i}" for i in range(101)])),
    ("record-session-bad-id", InvalidArgument, _record(session_id="a b")),
    ("record-session-unknown", NotFound, _record(session_id="collab_0_unknown")),
    ("record-session-ended", FailedPrecondition, _record(session_id="<ended>")),
    ("record-parent-bad-id", InvalidArgument, _record(parent_activity_id="a b")),
    ("record-parent-unknown", NotFound, _record(parent_activity_id="act_0_x_y")),
    # complete_activity
    ("complete-empty-id", InvalidArgument, lambda w: w.state.complete_activity("")),
    ("complete-bad-id", InvalidArgument, lambda w: w.state.complete_activity("a b")),
    ("complete-unknown", NotFound, lambda w: w.state.complete_activity("act_0_x_y")),
    ("complete-already-completed", FailedPrecondition, lambda w: w.state.complete_activity(w.done_id)),
    (
        "complete-reason-with-success",
        InvalidArgument,
        lambda w: w.state.complete_activity(w.open_id, success=True, failure_reason="why"),
    ),
    (
        "complete-reason-control",
        InvalidArgument,
        lambda w: w.state.complete_activity(w.open_id, success=False, failure_reason="a\x07"),
    ),
    (
        "complete-reason-too-long",
        InvalidArgument,
        lambda w: w.state.complete_activity(w.open_id, success=False, failure_reason="r" * 1025),
    ),
    # start_collaboration
    ("start-no-participants", InvalidArgument, lambda w: w.state.start_collaboration(participants=[])),
    ("start-duplicate", InvalidArgument, lambda w: w.state.start_collaboration(participants=["a", "a"])),
    ("start-bad-participant", InvalidArgument, lambda w: w.state.start_collaboration(participants=["a b"])),
    (
        "start-too-many",
        InvalidArgument,
        lambda w: w.state.start_collaboration(participants=[f"p{i}" for i in range(101)]),
    ),
    (
        "start-bad-type",
        InvalidArgument,
        lambda w: w.state.start_collaboration(participants=["a"], session_type="a b"),
    ),
    (
        "start-metadata-nan",
        InvalidArgument,
        lambda w: w.state.start_collaboration(participants=["a"], metadata={"x": NAN}),
    ),
    # end_collaboration
    ("end-empty-id", InvalidArgument, lambda w: w.state.end_collaboration("")),
    ("end-bad-id", InvalidArgument, lambda w: w.state.end_collaboration("a b")),
    ("end-unknown", NotFound, lambda w: w.state.end_collaboration("collab_0_x")),
    ("end-already-ended", FailedPrecondition, lambda w: w.state.end_collaboration(w.ended_id)),
    # record_decision
    ("decide-no-session", InvalidArgument, _decide(session_id="")),
    ("decide-no-agent", InvalidArgument, _decide(agent_id="")),
    ("decide-no-decision", InvalidArgument, _decide(decision="")),
    ("decide-decision-control", InvalidArgument, _decide(decision="x\x1b")),
    ("decide-decision-too-long", InvalidArgument, _decide(decision="x" * (8 * 1024 + 1))),
    ("decide-rationale-control", InvalidArgument, _decide(rationale="x\x00")),
    ("decide-too-many-votes", InvalidArgument, _decide(votes={f"v{i}": "yes" for i in range(101)})),
    ("decide-bad-voter", InvalidArgument, _decide(votes={"a b": "yes"})),
    ("decide-empty-vote", InvalidArgument, _decide(votes={"agent_1": ""})),
    ("decide-vote-too-long", InvalidArgument, _decide(votes={"agent_1": "y" * 129})),
    ("decide-metadata-nan", InvalidArgument, _decide(metadata={"x": NAN})),
    ("decide-unknown-session", NotFound, _decide(session_id="collab_0_x")),
    ("decide-ended-session", FailedPrecondition, _decide(session_id="<ended>")),
    # record_memory_update
    ("memory-bad-operation", InvalidArgument, _memory(operation="upsert")),
    ("memory-no-operation", InvalidArgument, _memory(operation="")),
    ("memory-no-item", InvalidArgument, _memory(item_id="")),
    ("memory-bad-item", InvalidArgument, _memory(item_id="a b")),
    ("memory-no-agent", InvalidArgument, _memory(agent_id="")),
    ("memory-metadata-nan", InvalidArgument, _memory(metadata={"x": NAN})),
    # reads
    ("feed-bad-agent", InvalidArgument, lambda w: w.state.activity_feed(agent_id="a b")),
    ("feed-bad-session", InvalidArgument, lambda w: w.state.activity_feed(session_id="a b")),
    ("feed-limit-high", InvalidArgument, lambda w: w.state.activity_feed(limit=501)),
    ("feed-limit-negative", InvalidArgument, lambda w: w.state.activity_feed(limit=-1)),
    ("ended-limit-high", InvalidArgument, lambda w: w.state.ended_collaborations(limit=501)),
    ("get-collab-empty", InvalidArgument, lambda w: w.state.get_collaboration("")),
    ("get-collab-unknown", NotFound, lambda w: w.state.get_collaboration("collab_0_x")),
    ("require-activity-empty", InvalidArgument, lambda w: w.state.require_activity("")),
    ("require-activity-unknown", NotFound, lambda w: w.state.require_activity("act_0_x_y")),
]


@pytest.mark.parametrize(("error", "call"), [pytest.param(e, c, id=i) for i, e, c in ERROR_CASES])
def test_rejected_call_changes_nothing(world: World, error: type[CollabError], call: Call) -> None:
    before = observe(world.state)
    with pytest.raises(error) as info:
        call(world)
    assert type(info.value) is error
    assert str(info.value)  # every refusal says what is wrong
    assert observe(world.state) == before


def test_world_cases_succeed_when_fixed(world: World) -> None:
    """The error cases above fail for their stated reason, not because the fixture is broken."""
    _record()(world)
    _record(session_id="<session>", parent_activity_id=world.open_id)(world)
    _decide()(world)
    _memory()(world)
    world.state.complete_activity(world.open_id, success=False, failure_reason="r" * 1024)
    world.state.record_decision(
        session_id=world.session_id, agent_id="agent_1", decision="x" * (8 * 1024), votes={"agent_1": "y" * 128}
    )
    assert world.state.get_collaboration(world.ended_id)[0].ended_at is not None


# -- rate limiting ------------------------------------------------------------------------


def test_rate_limit_beyond_burst(clock: FakeClock) -> None:
    state = CollaborationState(clock=clock, rate_limiter=RateLimiter(2))
    record(state)
    record(state)
    before = observe(state)
    with pytest.raises(RateLimited) as info:
        record(state)
    assert info.value.retry_after > 0
    assert info.value.retry_after == pytest.approx(0.5)
    assert observe(state) == before
    record(state, "agent_2")  # per agent
    clock.advance(0.5)
    record(state)
    with pytest.raises(RateLimited):
        record(state)


def test_rate_limited_new_agent_is_not_created(clock: FakeClock) -> None:
    limiter = RateLimiter(1)
    state = CollaborationState(clock=clock, rate_limiter=limiter)
    limiter.acquire("ghost", clock.now)  # spend ghost's only token outside the state
    before = observe(state)
    with pytest.raises(RateLimited):
        record(state, "ghost")
    assert observe(state) == before
    assert state.agent_status().total_agents == 0


def test_rate_limit_covers_decisions_and_memory_updates(clock: FakeClock) -> None:
    state = CollaborationState(clock=clock, rate_limiter=RateLimiter(1))
    session = state.start_collaboration(participants=["agent_1"])
    state.record_memory_update(operation="write", item_id="i", agent_id="agent_1")
    before = observe(state)
    with pytest.raises(RateLimited):
        state.record_decision(session_id=session.session_id, agent_id="agent_1", decision="d")
    with pytest.raises(RateLimited):
        state.record_memory_update(operation="read", item_id="i", agent_id="agent_1")
    with pytest.raises(RateLimited):
        record(state, "agent_1")
    assert observe(state) == before
    assert session.decision_count == 0


def test_invalid_input_costs_no_tokens(clock: FakeClock) -> None:
    state = CollaborationState(clock=clock, rate_limiter=RateLimiter(1))
    session = state.start_collaboration(participants=["agent_1"])
    state.end_collaboration(session.session_id)
    for bad in (
        lambda: record(state, activity_type="nope"),
        lambda: record(state, metadata={"x": NAN}),
        lambda: record(state, session_id="collab_0_unknown"),
        lambda: record(state, session_id=session.session_id),
        lambda: record(state, parent_activity_id="act_0_x_y"),
        lambda: state.record_decision(session_id=session.session_id, agent_id="agent_1", decision="d"),
        lambda: state.record_memory_update(operation="nope", item_id="i", agent_id="agent_1"),
    ):
        with pytest.raises(CollabError) as info:
            bad()
        assert not isinstance(info.value, RateLimited)
    record(state)  # the one token is still there
    with pytest.raises(RateLimited):
        record(state)


# -- events -------------------------------------------------------------------------------


def test_every_change_appends_one_event(state: CollaborationState, clock: FakeClock) -> None:
    activity = record(state)
    clock.advance(1)
    state.complete_activity(activity.activity_id)
    session = state.start_collaboration(participants=["agent_1"])
    clock.advance(1)
    state.record_decision(session_id=session.session_id, agent_id="agent_1", decision="d")
    state.record_memory_update(operation="delete", item_id="i", agent_id="agent_1")
    clock.advance(1)
    state.end_collaboration(session.session_id)
    state.expire_stale_activities()  # nothing open: no event
    events = list(state.log.events_after(0))
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
    assert state.log.last_seq == 6
    assert [e.kind for e in events] == [
        EventKind.ACTIVITY_RECORDED,
        EventKind.ACTIVITY_COMPLETED,
        EventKind.COLLABORATION_STARTED,
        EventKind.DECISION_RECORDED,
        EventKind.MEMORY_UPDATED,
        EventKind.COLLABORATION_ENDED,
    ]
    assert {e.epoch for e in events} == {EPOCH}
    assert [e.time for e in events] == [T0, T0 + 1, T0 + 1, T0 + 2, T0 + 2, T0 + 3]
    assert [type(e.payload) for e in events] == [
        Activity,
        ActivityCompletion,
        Session,
        Decision,
        MemoryUpdate,
        Session,
    ]


def test_rejected_calls_append_no_event(world: World) -> None:
    seq = world.state.log.last_seq
    with pytest.raises(FailedPrecondition):
        world.state.complete_activity(world.done_id)
    record(world.state)
    assert world.state.log.last_seq == seq + 1


def test_activity_recorded_payload_is_a_copy(state: CollaborationState) -> None:
    activity = record(state)
    state.complete_activity(activity.activity_id, success=False, failure_reason="boom")
    recorded, completed = state.log.events_after(0)
    assert isinstance(recorded.payload, Activity)
    assert recorded.payload is not activity
    assert recorded.payload.activity_id == activity.activity_id
    assert recorded.payload.status is ActivityStatus.ACTIVE
    assert recorded.payload.completed_at is None
    assert isinstance(completed.payload, ActivityCompletion)
    assert completed.payload.success is False
    assert completed.payload.activity is not activity
    assert completed.payload.activity.status is ActivityStatus.FAILED
    assert completed.payload.activity.failure_reason == "boom"
    assert completed.payload.activity.completed_at == activity.completed_at


def test_completion_payload_success(state: CollaborationState) -> None:
    activity = record(state)
    state.complete_activity(activity.activity_id)
    _, completed = state.log.events_after(0)
    assert isinstance(completed.payload, ActivityCompletion)
    assert completed.payload.success is True
    assert completed.payload.activity.status is ActivityStatus.COMPLETED
    assert completed.activity_type is ActivityType.MEMORY_WRITE
    assert completed.agent_ids == ("agent_1",)


def test_session_payloads_are_copies(state: CollaborationState, clock: FakeClock) -> None:
    session = state.start_collaboration(participants=["agent_1", "agent_2"])
    record(state, session_id=session.session_id)
    state.record_decision(session_id=session.session_id, agent_id="agent_1", decision="d")
    clock.advance(5)
    state.end_collaboration(session.session_id)
    events = list(state.log.events_after(0))
    started, ended = events[0].payload, events[-1].payload
    assert isinstance(started, Session)
    assert isinstance(ended, Session)
    assert started is not session
    assert ended is not session
    assert (started.activity_count, started.decision_count, started.ended_at) == (0, 0, None)
    assert (ended.activity_count, ended.decision_count, ended.ended_at) == (1, 1, T0 + 5)
    assert events[0].agent_ids == ("agent_1", "agent_2")


# -- snapshots, subscriptions and resume ---------------------------------------------------


def test_epoch(clock: FakeClock) -> None:
    assert CollaborationState(clock=clock, epoch="e1").epoch == "e1"
    a, b = CollaborationState(clock=clock), CollaborationState(clock=clock)
    assert a.epoch and b.epoch and a.epoch != b.epoch


def test_snapshot(world: World) -> None:
    snapshot = world.state.snapshot()
    assert snapshot.epoch == EPOCH
    assert snapshot.seq == world.state.log.last_seq
    assert snapshot.agent_status == world.state.agent_status()
    (active,) = snapshot.active_collaborations
    assert active.session_id == world.session_id
    assert active is not world.state.active_collaborations()[0]
    record(world.state, session_id=world.session_id)
    assert active.activity_count == 1  # the snapshot does not follow later changes
    assert world.state.active_collaborations()[0].activity_count == 2


def test_subscribe_with_snapshot(world: World) -> None:
    state = world.state
    snapshot, subscription = state.subscribe_with_snapshot(EventFilter(), capacity=100)
    assert snapshot.seq == state.log.last_seq
    assert len(subscription) == 0
    activity = record(state)
    state.complete_activity(activity.activity_id)
    state.record_memory_update(operation="read", item_id="i", agent_id="agent_9")
    events = subscription.take()
    assert [e.seq for e in events] == [snapshot.seq + 1, snapshot.seq + 2, snapshot.seq + 3]
    assert events == list(state.log.events_after(snapshot.seq))
    assert subscription.take() == []


def test_subscribe_filtered(world: World) -> None:
    subscription = world.state.subscribe(EventFilter(kinds=frozenset({EventKind.MEMORY_UPDATED})), capacity=10)
    record(world.state)
    update = world.state.record_memory_update(operation="read", item_id="i", agent_id="agent_9")
    (event,) = subscription.take()
    assert event.payload == update


def test_resume_same_epoch_replays_events_after_seq(world: World) -> None:
    state = world.state
    last = state.log.last_seq
    for since in range(last + 1):
        resume, subscription = state.resume(EventFilter(), 100, EPOCH, since)
        assert resume.recovered is True
        assert resume.reason == ""
        assert resume.snapshot is None
        assert [e.seq for e in resume.replay] == list(range(since + 1, last + 1))
        state.log.unsubscribe(subscription)


def test_resume_replay_is_filtered_then_live(world: World) -> None:
    state = world.state
    event_filter = EventFilter(agent_ids=frozenset({"agent_2"}))
    resume, subscription = state.resume(event_filter, 100, EPOCH, 0)
    assert resume.recovered is True
    expected = [e for e in state.log.events_after(0) if "agent_2" in e.agent_ids]
    assert resume.replay == expected
    assert {e.kind for e in resume.replay} == {
        EventKind.COLLABORATION_STARTED,
        EventKind.ACTIVITY_RECORDED,
        EventKind.ACTIVITY_COMPLETED,
        EventKind.MEMORY_UPDATED,
    }
    record(state, "agent_1")
    mine = record(state, "agent_2")
    (live,) = subscription.take()
    assert live.seq == state.log.last_seq
    assert isinstance(live.payload, Activity)
    assert live.payload.activity_id == mine.activity_id


def test_resume_other_epoch(world: World) -> None:
    state = world.state
    resume, subscription = state.resume(EventFilter(), 100, "other-epoch", 1)
    assert resume.recovered is False
    assert "epoch" in resume.reason
    assert resume.replay == []
    assert resume.snapshot is not None
    assert resume.snapshot.seq == state.log.last_seq
    assert resume.snapshot.epoch == EPOCH
    record(state)
    assert [e.seq for e in subscription.take()] == [resume.snapshot.seq + 1]


def test_resume_ahead(world: World) -> None:
    last = world.state.log.last_seq
    resume, _ = world.state.resume(EventFilter(), 100, EPOCH, last + 1)
    assert resume.recovered is False
    assert "ahead" in resume.reason
    assert resume.replay == []
    assert resume.snapshot is not None
    assert resume.snapshot.seq == last


def test_resume_too_old(clock: FakeClock) -> None:
    state = make_state(clock, StateSettings(event_log_retain=3))
    for _ in range(6):
        record(state)
    assert state.log.first_retained_seq == 4
    for since in (0, 1, 2):
        resume, _ = state.resume(EventFilter(), 100, EPOCH, since)
        assert resume.recovered is False
        assert "no longer retained" in resume.reason
        assert resume.snapshot is not None
        assert resume.snapshot.seq == 6
    resume, _ = state.resume(EventFilter(), 100, EPOCH, 3)
    assert resume.recovered is True
    assert [e.seq for e in resume.replay] == [4, 5, 6]


def test_subscriptions_for_several_clients(state: CollaborationState) -> None:
    subs = [state.subscribe(EventFilter(), 10) for _ in range(3)]
    state.log.unsubscribe(subs[1])
    record(state)
    assert [len(s) for s in subs] == [1, 0, 1]
    assert state.log.subscriber_count == 2


def test_unique_counters_over_many_sessions(state: CollaborationState) -> None:
    ids = {state.start_collaboration(participants=["a"]).session_id for _ in range(200)}
    assert len(ids) == 200
    seqs = [e.seq for e in state.log.events_after(0)]
    assert seqs == sorted(set(seqs))
    assert all(b == a + 1 for a, b in itertools.pairwise(seqs))


def test_custom_limits(clock: FakeClock) -> None:
    state = CollaborationState(StateSettings(limits=Limits(max_metadata_bytes=20)), clock=clock)
    record(state, metadata={"a": "x" * 12})  # 20 bytes serialised
    with pytest.raises(InvalidArgument, match="21 bytes"):
        record(state, metadata={"a": "x" * 13})


def test_expiry_takes_the_oldest_first_and_at_most_its_limit(clock: FakeClock) -> None:
    state = CollaborationState(StateSettings(activity_ttl=60), clock=clock)
    activities = [state.record_activity(agent_id=f"agent_{n}", activity_type="task_assigned") for n in range(5)]
    clock.advance(61)
    first = state.expire_stale_activities(limit=2)
    assert [a.activity_id for a in first] == [a.activity_id for a in activities[:2]]
    assert [a.activity_id for a in state.expire_stale_activities(limit=10)] == [a.activity_id for a in activities[2:]]
    assert state.expire_stale_activities(limit=10) == []
