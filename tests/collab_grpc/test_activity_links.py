"""An activity recorded without a parent is linked to one that arrives later
(CollaborationState.link_activity, an ACTIVITY_LINKED event): the core's rules and
refusals, the event on every layer (codec, proto, bridge message, subscribe), the SQLite
store keeping the link across a restart, and the OTLP ingest's index of children waiting
for their parent span.

Driven with a fake clock: nothing here waits for time to pass."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from bridge.fanout import ClientFilter, Frame
from bridge.hub import StreamHub
from bridge.mapping import event_json
from bridge.protocol import MESSAGE_TYPES, handle_client_message
from collab_grpc.convert import EVENT_KIND_TO_PROTO, event_to_proto
from collab_grpc.errors import FailedPrecondition, InvalidArgument, NotFound
from collab_grpc.events import EventFilter
from collab_grpc.history import ActivityQuery
from collab_grpc.model import Activity, ActivityLink, ActivityStatus, ActivityType, Event, EventKind
from collab_grpc.otlp_servicer import WaitingChildren
from collab_grpc.state import CollaborationState, StateSettings
from collab_grpc.store import sqlite as sqlite_module
from collab_grpc.store.codec import decode_payload, encode
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.collab_grpc.conftest import SQLiteStores


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(float(int(time.time())))


@pytest.fixture
def state(clock: FakeClock) -> CollaborationState:
    return CollaborationState(clock=clock, epoch="epoch-test")


def record(state: CollaborationState, agent: str = "a", parent: str = "") -> str:
    return state.record_activity(
        agent_id=agent, activity_type=ActivityType.TASK_ASSIGNED, parent_activity_id=parent
    ).activity_id


def last_event(state: CollaborationState) -> Event:
    return next(iter(state.log.events_after(state.log.last_seq - 1)))


def unchanged(state: CollaborationState) -> tuple[int, dict[str, str]]:
    """What a refusal must leave as it was: the log's seq and every held parent."""
    return state.log.last_seq, {a.activity_id: a.parent_activity_id for a in state.held_activities()}


# -- the core ------------------------------------------------------------------------------


def test_link_sets_the_parent_with_an_event(state: CollaborationState, clock: FakeClock) -> None:
    parent, child = record(state, "boss"), record(state, "worker")
    state.complete_activity(child)  # a completed child is linked too (the usual case)
    clock.now += 5
    linked = state.link_activity(child, parent)
    assert linked.parent_activity_id == parent
    assert linked.status is ActivityStatus.COMPLETED  # nothing else changes
    assert state.require_activity(child).parent_activity_id == parent
    event = last_event(state)
    assert event.kind is EventKind.ACTIVITY_LINKED and event.time == clock.now
    assert isinstance(event.payload, ActivityLink)
    assert (event.payload.activity_id, event.payload.parent_activity_id) == (child, parent)
    assert event.payload.activity is not linked  # a copy, as every event's payload
    assert event.agent_ids == ("worker",)
    assert event.activity_type is ActivityType.TASK_ASSIGNED
    # The history search finds it under its parent.
    found = [a.activity_id for a in state.held_activities() if ActivityQuery(parent_activity_ids=(parent,)).matches(a)]
    assert found == [child]


def test_an_open_child_is_linked_and_later_completed_keeps_its_parent(state: CollaborationState) -> None:
    parent, child = record(state), record(state)
    state.link_activity(child, parent)
    done = state.complete_activity(child)
    assert done.parent_activity_id == parent


@pytest.mark.parametrize(
    ("activity_id", "parent_id", "error", "says"),
    [
        ("", "PARENT", InvalidArgument, "activity_id"),
        ("CHILD", "", InvalidArgument, "parent_activity_id"),
        ("act_1_nobody_00000000", "PARENT", NotFound, "activity 'act_1_nobody_00000000' not found"),
        ("CHILD", "act_1_nobody_00000000", NotFound, "parent activity 'act_1_nobody_00000000' not found"),
        ("CHILD", "CHILD", FailedPrecondition, "cycle"),
        ("CHILD", "GRANDCHILD", FailedPrecondition, "cycle"),
        ("HAS_PARENT", "CHILD", FailedPrecondition, "already has a parent"),
    ],
)
def test_refusals_change_nothing(
    state: CollaborationState, activity_id: str, parent_id: str, error: type[Exception], says: str
) -> None:
    ids = {"PARENT": record(state), "CHILD": record(state)}
    ids["GRANDCHILD"] = record(state, parent=record(state, parent=ids["CHILD"]))
    ids["HAS_PARENT"] = record(state, parent=ids["PARENT"])
    before = unchanged(state)
    with pytest.raises(error, match=says):
        state.link_activity(ids.get(activity_id, activity_id), ids.get(parent_id, parent_id))
    assert unchanged(state) == before


def test_an_ancestry_that_leaves_memory_is_refused(clock: FakeClock) -> None:
    """A parent whose ancestor is no longer held: a cycle through it cannot be ruled out."""
    state = CollaborationState(StateSettings(history_limit=3), clock=clock, epoch="e")
    top = record(state)
    state.complete_activity(top)
    middle = record(state, parent=top)
    state.complete_activity(middle)
    parent = record(state, parent=middle)
    child = record(state)
    for _ in range(2):  # top and middle leave the history (completed, so not open either)
        state.complete_activity(record(state))
    assert state.get_activity(middle) is None and state.get_activity(parent) is not None
    before = unchanged(state)
    with pytest.raises(FailedPrecondition, match="no longer held"):
        state.link_activity(child, parent)
    assert unchanged(state) == before


def test_a_replica_applies_the_link(state: CollaborationState, clock: FakeClock) -> None:
    replica = CollaborationState(clock=clock, epoch="epoch-test")
    parent, child = record(state), record(state)
    for event in list(state.log.events_after(0)):
        replica.apply(event)
    state.link_activity(child, parent)
    replica.apply(last_event(state))
    assert replica.require_activity(child).parent_activity_id == parent
    assert replica.log.last_seq == state.log.last_seq


def test_a_subscription_narrowed_to_activity_types_narrows_links(state: CollaborationState) -> None:
    parent, child = record(state), record(state)
    state.link_activity(child, parent)
    event = last_event(state)
    assert EventFilter(kinds=frozenset({EventKind.ACTIVITY_LINKED})).matches(event)
    assert EventFilter(activity_types=frozenset({ActivityType.TASK_ASSIGNED})).matches(event)
    assert not EventFilter(activity_types=frozenset({ActivityType.MEMORY_READ})).matches(event)
    assert not EventFilter(agent_ids=frozenset({"someone-else"})).matches(event)


# -- the wire: codec, proto, bridge ----------------------------------------------------------


def link_event() -> Event:
    child = Activity(
        activity_id="act_1_w_0000000a",
        agent_id="w",
        department="ops",
        activity_type=ActivityType.TASK_ASSIGNED,
        timestamp=1_764_000_000.5,
        metadata={"otel.span_id": "00f067aa0ba902b7"},
        related_agents=[],
        status=ActivityStatus.COMPLETED,
        parent_activity_id="act_1_boss_0000000b",
        completed_at=1_764_000_001.0,
    )
    return Event(9, "epoch-test", 1_764_000_100.25, EventKind.ACTIVITY_LINKED, ActivityLink(child))


def test_the_event_round_trips_through_the_codec_and_the_proto() -> None:
    event = link_event()
    assert decode_payload(EventKind.ACTIVITY_LINKED, encode(event.payload)) == event.payload
    assert EVENT_KIND_TO_PROTO[EventKind.ACTIVITY_LINKED] == pb.EVENT_KIND_ACTIVITY_LINKED
    message = event_to_proto(event)
    assert message.WhichOneof("payload") == "activity_linked"
    linked = message.activity_linked
    assert (linked.activity_id, linked.parent_activity_id) == ("act_1_w_0000000a", "act_1_boss_0000000b")
    assert linked.activity.parent_activity_id == "act_1_boss_0000000b"
    assert linked.activity.status == pb.ACTIVITY_STATUS_COMPLETED


def test_the_bridge_sends_an_additive_activity_linked_message() -> None:
    assert event_json(event_to_proto(link_event())) == {
        "type": "activity_linked",
        "activity_id": "act_1_w_0000000a",
        "parent_activity_id": "act_1_boss_0000000b",
        "agent_id": "w",
        "activity_type": "task_assigned",
        "timestamp": "2025-11-24T16:01:40.250000+00:00",
        "seq": 9,
    }
    frame = StreamHub.frame(event_to_proto(link_event()))
    assert frame is not None and (frame.type, frame.seq, frame.activity_type) == ("activity_linked", 9, "task_assigned")


def test_activity_linked_can_be_subscribed_to_by_name() -> None:
    assert "activity_linked" in MESSAGE_TYPES
    reply, chosen = handle_client_message(
        '{"type": "subscribe", "activity_types": ["activity_linked"]}', None, ClientFilter(), 1 << 16
    )
    assert reply["type"] == "subscribed" and reply["activity_types"] == ["activity_linked"]
    assert chosen.wants(Frame("{}", "activity_linked", "task_assigned"))
    assert not chosen.wants(Frame("{}", "agent_activity", "task_assigned"))


def link_state(clock: FakeClock) -> CollaborationState:
    return CollaborationState(clock=clock, epoch="epoch-test")


# -- the SQLite store --------------------------------------------------------------------------


async def test_sqlite_keeps_the_link_across_a_restart(
    tmp_path: Path, clock: FakeClock, sqlite_stores: SQLiteStores
) -> None:
    data_dir = tmp_path / "data"
    state = link_state(clock)
    store = sqlite_stores.open(data_dir, state)
    parent = record(state, "boss")
    # Linked after its completion, in another commit.
    done_first = record(state, "w")
    state.complete_activity(done_first)
    await store.durable(state.log.last_seq)
    state.link_activity(done_first, parent)
    # Recorded, linked and completed in one commit: the row is written, then linked,
    # and the completion keeps the parent (and the link the completion's state).
    same_commit = record(state, "w")
    state.link_activity(same_commit, parent)
    state.complete_activity(same_commit, success=False, failure_reason="boom")
    # Completed after its link, in the same commit as the link.
    linked_first = record(state, "w", parent="")
    await store.durable(state.log.last_seq)
    state.link_activity(linked_first, parent)
    state.complete_activity(linked_first)
    await store.durable(state.log.last_seq)
    found = await store.query_activities(ActivityQuery(parent_activity_ids=(parent,), newest_first=False), 10)
    assert sorted(a.activity_id for a in found.activities) == sorted([done_first, same_commit, linked_first])
    await sqlite_stores.close(store)

    connection = sqlite3.connect(data_dir / sqlite_module.FILE_NAME)
    try:
        rows = dict(connection.execute("SELECT activity_id, parent_activity_id FROM activities").fetchall())
    finally:
        connection.close()
    assert rows == {parent: "", done_first: parent, same_commit: parent, linked_first: parent}

    again = link_state(clock)
    sqlite_stores.open(data_dir, again)
    for child in (done_first, same_commit, linked_first):
        assert again.require_activity(child).parent_activity_id == parent
    assert again.require_activity(done_first).status is ActivityStatus.COMPLETED
    assert again.require_activity(same_commit).failure_reason == "boom"
    assert again.require_activity(linked_first).status is ActivityStatus.COMPLETED
    links = [e for e in again.log.events_after(0) if e.kind is EventKind.ACTIVITY_LINKED]
    assert [e.payload.activity.activity_id for e in links if isinstance(e.payload, ActivityLink)] == [
        done_first,
        same_commit,
        linked_first,
    ]


# -- the OTLP ingest's waiting index -----------------------------------------------------------


def test_waiting_children_are_bounded_oldest_dropped_first() -> None:
    waiting = WaitingChildren(capacity=3)
    assert waiting.add("p1", "c1") == 0
    assert waiting.add("p1", "c2") == 0
    assert waiting.add("p2", "c3") == 0
    assert waiting.add("p2", "c4") == 1  # c1 goes
    assert len(waiting) == 3 and "p1" in waiting
    assert waiting.take("p1") == ["c2"]
    assert "p1" not in waiting and waiting.take("p1") == []
    # Waiting again (passed on to another key) moves it: it waits for one parent only.
    assert waiting.add("p3", "c3") == 0
    assert waiting.take("p2") == ["c4"]
    assert waiting.take("p3") == ["c3"]
    assert len(waiting) == 0


def test_waiting_children_drop_across_keys() -> None:
    waiting = WaitingChildren(capacity=1)
    waiting.add("p1", "c1")
    assert waiting.add("p2", "c2") == 1
    assert "p1" not in waiting and waiting.take("p2") == ["c2"]
