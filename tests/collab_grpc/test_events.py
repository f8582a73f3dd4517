"""EventLog, Subscription and EventFilter, with hand-made payloads."""

from __future__ import annotations

import pytest

from collab_grpc.events import EventFilter, EventLog, Subscription
from collab_grpc.model import (
    Activity,
    ActivityCompletion,
    ActivityStatus,
    ActivityType,
    Decision,
    Event,
    EventKind,
    EventPayload,
    MemoryOperation,
    MemoryUpdate,
    Session,
)

EPOCH = "e1"


def activity(agent_id: str = "agent_1", activity_type: ActivityType = ActivityType.MEMORY_WRITE) -> Activity:
    return Activity(f"act_0_{agent_id}_x", agent_id, "", activity_type, 0.0, {}, [])


def completion(
    agent_id: str = "agent_1", activity_type: ActivityType = ActivityType.MEMORY_WRITE
) -> ActivityCompletion:
    done = activity(agent_id, activity_type)
    done.status = ActivityStatus.COMPLETED
    return ActivityCompletion(done, True)


def memory(agent_id: str = "agent_1") -> MemoryUpdate:
    return MemoryUpdate(MemoryOperation.WRITE, "item_1", agent_id, 0.0, {})


def session(*participants: str) -> Session:
    return Session("collab_0_x", list(participants), "general", 0.0, {})


def decision(agent_id: str = "agent_1") -> Decision:
    return Decision("dec_0_x", "collab_0_x", agent_id, "d", "", {}, {}, 0.0)


def event(kind: EventKind, payload: EventPayload, seq: int = 1) -> Event:
    return Event(seq, EPOCH, 0.0, kind, payload)


ALL_KINDS: list[Event] = [
    event(EventKind.ACTIVITY_RECORDED, activity("a1", ActivityType.TASK_ASSIGNED)),
    event(EventKind.ACTIVITY_COMPLETED, completion("a2", ActivityType.TASK_COMPLETED)),
    event(EventKind.MEMORY_UPDATED, memory("a3")),
    event(EventKind.COLLABORATION_STARTED, session("a1", "a4")),
    event(EventKind.COLLABORATION_ENDED, session("a5", "a6")),
    event(EventKind.DECISION_RECORDED, decision("a7")),
]


def matching(event_filter: EventFilter) -> list[EventKind]:
    return [e.kind for e in ALL_KINDS if event_filter.matches(e)]


# -- Event properties -----------------------------------------------------------------------


def test_event_agent_ids_and_activity_type() -> None:
    assert [e.agent_ids for e in ALL_KINDS] == [("a1",), ("a2",), ("a3",), ("a1", "a4"), ("a5", "a6"), ("a7",)]
    assert [e.activity_type for e in ALL_KINDS] == [
        ActivityType.TASK_ASSIGNED,
        ActivityType.TASK_COMPLETED,
        None,
        None,
        None,
        None,
    ]


# -- EventFilter ---------------------------------------------------------------------------


def test_empty_filter_matches_everything() -> None:
    assert matching(EventFilter()) == [e.kind for e in ALL_KINDS]


def test_filter_by_kind() -> None:
    kinds = frozenset({EventKind.MEMORY_UPDATED, EventKind.COLLABORATION_ENDED})
    assert matching(EventFilter(kinds=kinds)) == [EventKind.MEMORY_UPDATED, EventKind.COLLABORATION_ENDED]


def test_activity_types_narrow_only_activity_kinds() -> None:
    event_filter = EventFilter(activity_types=frozenset({ActivityType.TASK_ASSIGNED}))
    assert matching(event_filter) == [
        EventKind.ACTIVITY_RECORDED,
        EventKind.MEMORY_UPDATED,
        EventKind.COLLABORATION_STARTED,
        EventKind.COLLABORATION_ENDED,
        EventKind.DECISION_RECORDED,
    ]
    completed = EventFilter(activity_types=frozenset({ActivityType.TASK_COMPLETED}))
    assert completed.matches(ALL_KINDS[1])
    assert not completed.matches(ALL_KINDS[0])


def test_activity_types_with_kinds() -> None:
    event_filter = EventFilter(
        kinds=frozenset({EventKind.ACTIVITY_RECORDED, EventKind.MEMORY_UPDATED}),
        activity_types=frozenset({ActivityType.MEMORY_READ, ActivityType.TASK_ASSIGNED}),
    )
    assert matching(event_filter) == [EventKind.ACTIVITY_RECORDED, EventKind.MEMORY_UPDATED]
    assert not event_filter.matches(event(EventKind.ACTIVITY_RECORDED, activity("a1", ActivityType.MEMORY_WRITE)))


def test_filter_by_agent_ids() -> None:
    assert matching(EventFilter(agent_ids=frozenset({"a1"}))) == [
        EventKind.ACTIVITY_RECORDED,
        EventKind.COLLABORATION_STARTED,
    ]
    # a session event matches when any participant is wanted
    assert matching(EventFilter(agent_ids=frozenset({"a6"}))) == [EventKind.COLLABORATION_ENDED]
    assert matching(EventFilter(agent_ids=frozenset({"a2", "a3", "a7"}))) == [
        EventKind.ACTIVITY_COMPLETED,
        EventKind.MEMORY_UPDATED,
        EventKind.DECISION_RECORDED,
    ]
    assert matching(EventFilter(agent_ids=frozenset({"nobody"}))) == []


def test_filters_combine() -> None:
    event_filter = EventFilter(
        kinds=frozenset({EventKind.ACTIVITY_RECORDED, EventKind.COLLABORATION_STARTED}),
        agent_ids=frozenset({"a4"}),
    )
    assert matching(event_filter) == [EventKind.COLLABORATION_STARTED]


# -- Subscription -------------------------------------------------------------------------


def test_subscription_queues_matching_events_in_order() -> None:
    subscription = Subscription(EventFilter(kinds=frozenset({EventKind.MEMORY_UPDATED})), capacity=10)
    events = [event(EventKind.MEMORY_UPDATED, memory(), seq) for seq in (1, 2, 3)]
    subscription.offer(events[0])
    subscription.offer(event(EventKind.DECISION_RECORDED, decision(), 9))
    subscription.offer(events[1])
    subscription.offer(events[2])
    assert len(subscription) == 3
    assert subscription.take() == events
    assert len(subscription) == 0
    assert subscription.take() == []
    assert not subscription.closed
    assert subscription.closed_reason is None


def test_on_ready_called_per_queued_event() -> None:
    calls: list[int] = []
    subscription = Subscription(EventFilter(agent_ids=frozenset({"a1"})), capacity=10)
    subscription.on_ready = lambda: calls.append(len(subscription))
    subscription.offer(event(EventKind.MEMORY_UPDATED, memory("a1")))
    subscription.offer(event(EventKind.MEMORY_UPDATED, memory("a2")))  # filtered out: no wake-up
    subscription.offer(event(EventKind.MEMORY_UPDATED, memory("a1")))
    assert calls == [1, 2]  # called after the event is queued


def test_overflow_closes_with_reason_and_clears_queue() -> None:
    calls: list[tuple[bool, int]] = []
    subscription = Subscription(EventFilter(), capacity=2)
    subscription.on_ready = lambda: calls.append((subscription.closed, len(subscription)))
    subscription.offer(event(EventKind.MEMORY_UPDATED, memory(), 1))
    subscription.offer(event(EventKind.MEMORY_UPDATED, memory(), 2))
    assert not subscription.closed
    subscription.offer(event(EventKind.MEMORY_UPDATED, memory(), 3))
    assert subscription.closed
    assert subscription.closed_reason is not None
    assert "fell behind" in subscription.closed_reason
    assert "more than 2 events" in subscription.closed_reason
    assert len(subscription) == 0
    assert subscription.take() == []
    assert calls == [(False, 1), (False, 2), (True, 0)]
    subscription.offer(event(EventKind.MEMORY_UPDATED, memory(), 4))  # ignored once closed
    assert len(subscription) == 0
    assert calls == [(False, 1), (False, 2), (True, 0)]


def test_filtered_out_events_do_not_count_toward_capacity() -> None:
    subscription = Subscription(EventFilter(kinds=frozenset({EventKind.MEMORY_UPDATED})), capacity=1)
    subscription.offer(event(EventKind.MEMORY_UPDATED, memory(), 1))
    for seq in range(2, 10):
        subscription.offer(event(EventKind.DECISION_RECORDED, decision(), seq))
    assert not subscription.closed
    assert len(subscription.take()) == 1
    subscription.offer(event(EventKind.MEMORY_UPDATED, memory(), 10))  # room again after take()
    assert not subscription.closed


def test_close_keeps_first_reason_and_wakes_once() -> None:
    calls: list[str | None] = []
    subscription = Subscription(EventFilter(), capacity=5)
    subscription.on_ready = lambda: calls.append(subscription.closed_reason)
    subscription.offer(event(EventKind.MEMORY_UPDATED, memory()))
    subscription.close("server shutting down")
    subscription.close("something else")
    assert subscription.closed_reason == "server shutting down"
    assert len(subscription) == 0
    assert calls == [None, "server shutting down"]


def test_close_without_on_ready() -> None:
    subscription = Subscription(EventFilter(), capacity=1)
    subscription.offer(event(EventKind.MEMORY_UPDATED, memory(), 1))
    subscription.offer(event(EventKind.MEMORY_UPDATED, memory(), 2))
    assert subscription.closed


# -- EventLog -------------------------------------------------------------------------------


def test_append_assigns_increasing_seq() -> None:
    log = EventLog(EPOCH)
    assert log.last_seq == 0
    first = log.append(EventKind.MEMORY_UPDATED, memory(), 10.0)
    second = log.append(EventKind.DECISION_RECORDED, decision(), 11.0)
    assert (first.seq, first.epoch, first.time, first.kind) == (1, EPOCH, 10.0, EventKind.MEMORY_UPDATED)
    assert (second.seq, second.kind) == (2, EventKind.DECISION_RECORDED)
    assert log.last_seq == 2
    assert list(log.events_after(0)) == [first, second]


def test_append_continues_from_last_seq() -> None:
    log = EventLog(EPOCH, last_seq=41)
    assert log.first_retained_seq == 42
    assert log.append(EventKind.MEMORY_UPDATED, memory(), 0.0).seq == 42


def test_subscribers_get_only_later_matching_events() -> None:
    log = EventLog(EPOCH)
    log.append(EventKind.MEMORY_UPDATED, memory(), 0.0)
    everything = log.subscribe(EventFilter(), 10)
    decisions = log.subscribe(EventFilter(kinds=frozenset({EventKind.DECISION_RECORDED})), 10)
    assert log.subscriber_count == 2
    second = log.append(EventKind.MEMORY_UPDATED, memory(), 0.0)
    third = log.append(EventKind.DECISION_RECORDED, decision(), 0.0)
    assert everything.take() == [second, third]
    assert decisions.take() == [third]


def test_unsubscribe() -> None:
    log = EventLog(EPOCH)
    subscription = log.subscribe(EventFilter(), 10)
    log.unsubscribe(subscription)
    log.unsubscribe(subscription)  # twice is harmless
    assert log.subscriber_count == 0
    log.append(EventKind.MEMORY_UPDATED, memory(), 0.0)
    assert len(subscription) == 0


def test_a_subscriber_whose_queue_fills_reads_on_from_the_log_and_misses_nothing() -> None:
    """A burst larger than its queue: the slow subscriber keeps its place and takes the
    rest from the retained events, in order, each once, then is queued for again."""
    log = EventLog(EPOCH, retain=10)
    slow = log.subscribe(EventFilter(), 2)
    fast = log.subscribe(EventFilter(), 2)
    woken: list[int] = []
    slow.on_ready = lambda: woken.append(len(slow))
    events = []
    for _ in range(7):
        events.append(log.append(EventKind.MEMORY_UPDATED, memory(), 0.0))
        fast.take()
    assert not slow.closed and slow.behind and len(slow) == 2  # nothing queued past its capacity
    taken = slow.take()
    while slow.behind:
        taken += slow.take()
    assert taken == events
    last = log.append(EventKind.MEMORY_UPDATED, memory(), 0.0)
    assert slow.take() == [last] and fast.take() == [last]


def test_a_subscriber_behind_what_is_retained_is_closed_and_woken() -> None:
    log = EventLog(EPOCH, retain=5)
    slow = log.subscribe(EventFilter(), 2)
    woken: list[bool] = []
    slow.on_ready = lambda: woken.append(slow.closed)
    for _ in range(7):
        log.append(EventKind.MEMORY_UPDATED, memory(), 0.0)
    assert not slow.closed  # seq 3 on is still retained
    log.append(EventKind.MEMORY_UPDATED, memory(), 0.0)  # lets go of seq 3
    assert slow.closed_reason == (
        "subscriber fell behind: events after seq 2 are no longer retained (oldest is 4); resubscribe with a snapshot"
    )
    assert woken[-1] is True and slow.take() == []
    # A resume from where it was cannot be filled either: the reason says why.
    assert log.can_resume(EPOCH, 2) is not None


def test_a_filtered_subscriber_behind_reads_on_only_what_matches() -> None:
    log = EventLog(EPOCH)
    mine = log.subscribe(EventFilter(agent_ids=frozenset({"a1"})), 1)
    appended = [log.append(EventKind.MEMORY_UPDATED, memory(f"a{n % 2}"), 0.0) for n in range(8)]
    taken = mine.take()
    while mine.behind:
        taken += mine.take()
    assert taken == [e for e in appended if "a1" in e.agent_ids]


def test_close_all() -> None:
    log = EventLog(EPOCH)
    woken: list[str] = []
    subscriptions = [log.subscribe(EventFilter(), 10) for _ in range(3)]
    for index, subscription in enumerate(subscriptions):
        subscription.on_ready = lambda index=index: woken.append(f"s{index}")
    log.append(EventKind.MEMORY_UPDATED, memory(), 0.0)
    woken.clear()
    log.close_all("server stopping")
    assert sorted(woken) == ["s0", "s1", "s2"]
    assert all(s.closed_reason == "server stopping" for s in subscriptions)
    assert all(len(s) == 0 for s in subscriptions)
    log.append(EventKind.MEMORY_UPDATED, memory(), 0.0)
    assert all(len(s) == 0 for s in subscriptions)


def test_retained_window() -> None:
    log = EventLog(EPOCH, retain=3)
    events = [log.append(EventKind.MEMORY_UPDATED, memory(), 0.0) for _ in range(5)]
    assert log.first_retained_seq == 3
    assert list(log.events_after(2)) == events[2:]
    assert list(log.events_after(3)) == events[3:]
    assert list(log.events_after(4)) == events[4:]
    assert list(log.events_after(5)) == []
    assert list(log.events_after(0)) == events[2:]  # only what is retained


def test_can_resume_edges() -> None:
    log = EventLog(EPOCH, retain=3)
    for _ in range(5):
        log.append(EventKind.MEMORY_UPDATED, memory(), 0.0)
    # retained: seqs 3, 4, 5
    assert log.can_resume(EPOCH, 2) is None
    assert log.can_resume(EPOCH, 4) is None
    assert log.can_resume(EPOCH, 5) is None
    too_old = log.can_resume(EPOCH, 1)
    assert too_old is not None
    assert "no longer retained" in too_old
    assert "oldest is 3" in too_old
    assert log.can_resume(EPOCH, 0) is not None
    ahead = log.can_resume(EPOCH, 6)
    assert ahead is not None
    assert "ahead" in ahead
    other = log.can_resume("e0", 5)
    assert other is not None
    assert "epoch" in other


def test_can_resume_empty_log() -> None:
    log = EventLog(EPOCH)
    assert log.first_retained_seq == 1
    assert log.can_resume(EPOCH, 0) is None
    assert list(log.events_after(0)) == []
    assert log.can_resume(EPOCH, 1) is not None


def test_can_resume_with_nothing_retained() -> None:
    log = EventLog(EPOCH, retain=0)
    for _ in range(3):
        log.append(EventKind.MEMORY_UPDATED, memory(), 0.0)
    assert log.first_retained_seq == 4
    assert log.can_resume(EPOCH, 3) is None
    assert list(log.events_after(3)) == []
    assert log.can_resume(EPOCH, 2) is not None


def test_can_resume_restarted_log() -> None:
    log = EventLog(EPOCH, last_seq=10)
    assert log.can_resume(EPOCH, 10) is None
    assert log.can_resume(EPOCH, 9) is not None
    new = log.append(EventKind.MEMORY_UPDATED, memory(), 0.0)
    assert log.can_resume(EPOCH, 10) is None
    assert list(log.events_after(10)) == [new]


@pytest.mark.parametrize("since", [3, 4, 5, 6, 7])
def test_events_after_matches_can_resume(since: int) -> None:
    log = EventLog(EPOCH, retain=4)
    events = [log.append(EventKind.MEMORY_UPDATED, memory(), 0.0) for _ in range(7)]
    assert log.can_resume(EPOCH, since) is None
    assert list(log.events_after(since)) == [e for e in events if e.seq > since]
