"""An activity recorded without a parent is linked to one that arrives later
(CollaborationState.link_activity, an ACTIVITY_LINKED event): the core's rules and
refusals, the event on every layer (codec, proto, bridge message, subscribe), the SQLite
store keeping the link across a restart, and the OTLP ingest's index of children waiting
for their parent span.

Driven with a fake clock: nothing here waits for time to pass."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from prometheus_client import REGISTRY

from bridge.fanout import ClientFilter, Frame
from bridge.hub import StreamHub
from bridge.mapping import event_json
from bridge.protocol import MESSAGE_TYPES, handle_client_message
from collab_grpc.convert import EVENT_KIND_TO_PROTO, event_to_proto
from collab_grpc.errors import FailedPrecondition, InvalidArgument, NotFound
from collab_grpc.events import EventFilter
from collab_grpc.history import ActivityQuery, Found
from collab_grpc.model import Activity, ActivityLink, ActivityStatus, ActivityType, Event, EventKind, copied
from collab_grpc.otlp_servicer import OtlpTraceServicer, WaitingChildren
from collab_grpc.state import MAX_LINK_DEPTH, CollaborationState, StateSettings
from collab_grpc.store import sqlite as sqlite_module
from collab_grpc.store.base import MemoryStore, SingleProcessStore, StoreUnavailable
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
    with pytest.raises(FailedPrecondition, match="neither held nor stored"):
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
    frame = StreamHub(16).frame(event_to_proto(link_event()))
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


# -- children (and ancestors) that left the in-memory history ------------------------------------

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


class Aborted(Exception):
    """What FakeContext.abort raises, as grpc.aio's does."""


class FakeContext:
    """The one thing Export asks of its context: to abort the call with a status."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: object = ()) -> None:
        self.code = code
        raise Aborted(details)


def otlp_span(span_id: str, operation: str, parent_span_id: str = "", trace_id: str = TRACE) -> trace_pb2.Span:
    attributes = {"gen_ai.operation.name": operation, "gen_ai.agent.name": "worker"}
    return trace_pb2.Span(
        trace_id=bytes.fromhex(trace_id),
        span_id=bytes.fromhex(span_id),
        parent_span_id=bytes.fromhex(parent_span_id) if parent_span_id else b"",
        name=f"{operation} span",
        start_time_unix_nano=1_000_000_000,
        end_time_unix_nano=2_000_000_000,
        attributes=[
            common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))
            for key, value in attributes.items()
        ],
    )


async def export(servicer: OtlpTraceServicer, *spans: trace_pb2.Span) -> FakeContext:
    """One Export of ``spans``; the context, which says whether it was aborted."""
    request = otlp.ExportTraceServiceRequest(
        resource_spans=[trace_pb2.ResourceSpans(scope_spans=[trace_pb2.ScopeSpans(spans=list(spans))])]
    )
    context = FakeContext()
    with contextlib.suppress(Aborted):
        await servicer.Export(request, cast(Any, context))
    return context


def links_counted(outcome: str) -> float:
    return REGISTRY.get_sample_value("collab_otlp_links_total", {"outcome": outcome}) or 0.0


async def evicted_child_then_parent(servicer: OtlpTraceServicer) -> tuple[Activity, str]:
    """A tool span exported before its agent span, then more other activities than the
    history holds, then the agent span: the child as recorded (completed) and the
    parent's activity id."""
    state = servicer.state
    await export(servicer, otlp_span("0000000000000011", "execute_tool", PARENT_SPAN))
    child = next(a for a in state.held_activities() if a.metadata.get("otel.span_id") == "0000000000000011")
    for number in range(state.settings.history_limit + 2):
        await export(servicer, otlp_span(f"{number + 1:016x}", "chat", trace_id=f"{number + 1:032x}"))
    assert state.get_activity(child.activity_id) is None  # left the history (completed at once)
    await export(servicer, otlp_span(PARENT_SPAN, "invoke_agent"))
    parent = next(a for a in state.held_activities() if a.metadata.get("otel.span_id") == PARENT_SPAN)
    return copied(child), parent.activity_id


async def test_a_child_that_left_the_history_is_linked_from_the_sqlite_store(
    tmp_path: Path, clock: FakeClock, sqlite_stores: SQLiteStores
) -> None:
    state = CollaborationState(StateSettings(history_limit=3), clock=clock, epoch="epoch-test")
    store = sqlite_stores.open(tmp_path, state)
    servicer = OtlpTraceServicer(state, store)
    linked_before, evicted_before = links_counted("linked"), links_counted("evicted")
    child, parent = await evicted_child_then_parent(servicer)
    assert links_counted("linked") == linked_before + 1
    assert links_counted("evicted") == evicted_before
    # The event carries the stored activity whole (its completion kept), now linked.
    (link,) = [e for e in state.log.events_after(0) if e.kind is EventKind.ACTIVITY_LINKED]
    assert isinstance(link.payload, ActivityLink)
    assert link.payload.activity == dataclasses.replace(child, parent_activity_id=parent)
    assert link.payload.activity.status is ActivityStatus.COMPLETED
    assert state.get_activity(child.activity_id) is None  # nothing is held back in memory for it
    await store.durable(state.log.last_seq)
    (stored,) = await store.read_activities([child.activity_id])
    assert stored == link.payload.activity
    found = await store.query_activities(ActivityQuery(parent_activity_ids=(parent,)), 10)
    assert [a.activity_id for a in found.activities] == [child.activity_id]


async def test_a_child_that_left_the_history_of_the_memory_store_is_counted_evicted(clock: FakeClock) -> None:
    state = CollaborationState(StateSettings(history_limit=3), clock=clock, epoch="epoch-test")
    servicer = OtlpTraceServicer(state, MemoryStore(state))
    linked_before, evicted_before = links_counted("linked"), links_counted("evicted")
    refused_before = links_counted("refused")
    await evicted_child_then_parent(servicer)
    assert (links_counted("linked"), links_counted("refused")) == (linked_before, refused_before)
    assert links_counted("evicted") == evicted_before + 1
    assert not [e for e in state.log.events_after(0) if e.kind is EventKind.ACTIVITY_LINKED]


async def test_an_ancestry_that_left_the_history_is_read_from_the_store(
    tmp_path: Path, clock: FakeClock, sqlite_stores: SQLiteStores
) -> None:
    """The cycle check follows the parent's ancestry through the stored copies: a link
    that would close a cycle through evicted ancestors is refused, one that would not is made."""
    state = CollaborationState(StateSettings(history_limit=2), clock=clock, epoch="epoch-test")
    store = sqlite_stores.open(tmp_path, state)
    servicer = OtlpTraceServicer(state, store)
    top = record(state)
    state.complete_activity(top)
    middle = record(state, parent=top)
    state.complete_activity(middle)
    parent = record(state, parent=middle)
    child = record(state)
    for _ in range(3):
        state.complete_activity(record(state))
    assert state.get_activity(top) is None and state.get_activity(middle) is None
    before = unchanged(state)
    with pytest.raises(FailedPrecondition, match="neither held nor stored"):
        state.link_activity(child, parent)
    # top is linked under the parent: a cycle through middle, found in the store.
    stored = await servicer._stored_for_links([top], parent)
    assert set(stored) == {top, middle}
    with pytest.raises(FailedPrecondition, match="cycle"):
        state.link_activity(top, parent, stored)
    assert unchanged(state) == before
    stored = await servicer._stored_for_links([child], parent)
    assert set(stored) == {top, middle}
    assert state.link_activity(child, parent, stored).parent_activity_id == parent


def test_an_ancestry_deeper_than_the_bound_is_refused(state: CollaborationState) -> None:
    below = record(state)
    for _ in range(MAX_LINK_DEPTH):
        below = record(state, parent=below)
    child = record(state)
    before = unchanged(state)
    with pytest.raises(FailedPrecondition, match=f"deeper than {MAX_LINK_DEPTH} levels"):
        state.link_activity(child, below)
    assert unchanged(state) == before
    assert state.unheld_for_link(below, {}) == ""  # nothing to read: too deep anyway


def test_a_replica_that_does_not_hold_the_activity_applies_nothing(clock: FakeClock) -> None:
    """A replica whose history no longer holds the child (it holds less) takes the event
    in, publishing it, and changes nothing."""
    state = CollaborationState(clock=clock, epoch="epoch-test")
    replica = CollaborationState(StateSettings(history_limit=1), clock=clock, epoch="epoch-test")
    parent, child = record(state), record(state)
    state.complete_activity(child)
    state.complete_activity(record(state))
    state.link_activity(child, parent)
    for event in list(state.log.events_after(0)):
        replica.apply(event)
    assert replica.get_activity(child) is None and replica.log.last_seq == state.log.last_seq


async def test_a_rebuild_does_not_count_drops_again(clock: FakeClock) -> None:
    state = CollaborationState(clock=clock, epoch="epoch-test")
    servicer = OtlpTraceServicer(state, MemoryStore(state), waiting_children=1)
    dropped_before = links_counted("dropped")
    await export(servicer, otlp_span("0000000000000021", "execute_tool", "00000000000000a1"))
    await export(servicer, otlp_span("0000000000000022", "execute_tool", "00000000000000a2"))
    assert links_counted("dropped") == dropped_before + 1  # the first, for room
    for _ in range(3):  # as a Redis replica reloads after stale state
        servicer._rebuild_waiting()
    assert links_counted("dropped") == dropped_before + 1
    assert len(servicer.waiting) == 1


class FailingWrites(SingleProcessStore):
    """The memory store, whose ``writing`` fails with StoreUnavailable at the write
    numbered ``fail_at`` (counted from 1): a store that cannot be written for a moment."""

    description = "memory, failing on demand"

    def __init__(self, state: CollaborationState) -> None:
        self.memory = MemoryStore(state)
        self.writes = 0
        self.fail_at = 0

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        self.writes += 1
        if self.writes == self.fail_at:
            raise StoreUnavailable("the store is unavailable (injected)")
        yield

    def writing(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._writing()

    async def attach(self, state: CollaborationState) -> None:
        await self.memory.attach(state)

    def start(self) -> None:
        pass

    async def durable(self, seq: int) -> None:
        pass

    async def close(self) -> None:
        pass

    async def query_activities(self, query: ActivityQuery, count: int) -> Found:
        return await self.memory.query_activities(query, count)

    async def read_activities(self, ids: Sequence[str]) -> list[Activity]:
        return await self.memory.read_activities(ids)


async def test_a_store_failure_while_linking_is_retried_by_the_exporter(clock: FakeClock) -> None:
    """Three children wait; the store fails on the second one's link: the Export fails
    (UNAVAILABLE), the unlinked ones wait again, and the exporter's retry of the same
    batch links them (the parent is not recorded twice)."""
    state = CollaborationState(clock=clock, epoch="epoch-test")
    store = FailingWrites(state)
    servicer = OtlpTraceServicer(state, store)
    children = [otlp_span(f"000000000000003{n}", "execute_tool", PARENT_SPAN) for n in range(3)]
    assert (await export(servicer, *children)).code is None
    parent_span = otlp_span(PARENT_SPAN, "invoke_agent")
    # The parent's record, the first link, then the second link's write fails.
    store.fail_at = store.writes + 3
    assert (await export(servicer, parent_span)).code is grpc.StatusCode.UNAVAILABLE
    (parent,) = [a for a in state.held_activities() if a.metadata.get("otel.span_id") == PARENT_SPAN]
    assert sum(a.parent_activity_id == parent.activity_id for a in state.held_activities()) == 1
    assert len(servicer.waiting) == 2
    assert (await export(servicer, parent_span)).code is None  # the exporter's retry
    assert sum(a.parent_activity_id == parent.activity_id for a in state.held_activities()) == 3
    assert len(servicer.waiting) == 0
    assert sum(a.activity_type is ActivityType.AGENT_STARTED for a in state.held_activities()) == 1
