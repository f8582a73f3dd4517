"""StreamHub: position, the buffer of recent frames, resume plans and how a client starts."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf import timestamp_pb2

from bridge import mapping
from bridge.fanout import ClientFilter, Subscriber
from bridge.hub import SKIPPED_KINDS, SKIPPED_LOG_INTERVAL, SkippedEvents, SnapshotTooOld, StreamHub
from collab_grpc.v1 import collaboration_pb2 as pb

EPOCH = "e1"
T0 = 1_700_000_000

ACTIVITY_TYPES = {
    "memory_write": pb.ACTIVITY_TYPE_MEMORY_WRITE,
    "task_assigned": pb.ACTIVITY_TYPE_TASK_ASSIGNED,
}


class Client:
    """A subscriber whose send never suspends, with what it received parsed."""

    def __init__(self, client_filter: ClientFilter | None = None) -> None:
        self.texts: list[str] = []
        self.closes: list[tuple[int, str]] = []
        self.subscriber = Subscriber(self._send, self._close, max_backlog=100, client_id="test")
        if client_filter is not None:
            self.subscriber.filter = client_filter

    async def _send(self, text: str) -> None:
        self.texts.append(text)

    async def _close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(text) for text in self.texts]

    @property
    def types(self) -> list[str]:
        return [message["type"] for message in self.messages]

    @property
    def seqs(self) -> list[int]:
        """The seqs of the event messages received."""
        return [message["seq"] for message in self.messages if message["type"] not in NOT_EVENTS]


NOT_EVENTS = {"connection_established", "collaboration_state", "agent_status_update"}


def activity_event(seq: int, activity_type: str = "memory_write", epoch: str = EPOCH) -> pb.Event:
    return pb.Event(
        seq=seq,
        epoch=epoch,
        time=timestamp_pb2.Timestamp(seconds=T0 + seq),
        activity_recorded=pb.Activity(
            activity_id=f"act_{T0 + seq}_agent_1_{seq}",
            agent_id="agent_1",
            department="engineering",
            activity_type=ACTIVITY_TYPES[activity_type],
            timestamp=timestamp_pb2.Timestamp(seconds=T0 + seq),
            status=pb.ACTIVITY_STATUS_ACTIVE,
        ),
    )


def completion_event(seq: int, activity_type: str = "memory_write") -> pb.Event:
    done = activity_event(seq, activity_type).activity_recorded
    done.status = pb.ACTIVITY_STATUS_COMPLETED
    return pb.Event(
        seq=seq,
        epoch=EPOCH,
        time=timestamp_pb2.Timestamp(seconds=T0 + seq),
        activity_completed=pb.ActivityCompleted(activity=done, success=True),
    )


def memory_event(seq: int) -> pb.Event:
    return pb.Event(
        seq=seq,
        epoch=EPOCH,
        time=timestamp_pb2.Timestamp(seconds=T0 + seq),
        memory_updated=pb.MemoryUpdate(
            operation=pb.MEMORY_OPERATION_WRITE,
            item_id="item_1",
            agent_id="agent_1",
            timestamp=timestamp_pb2.Timestamp(seconds=T0 + seq),
        ),
    )


def snapshot(seq: int, epoch: str = EPOCH, agents: int = 0) -> pb.Snapshot:
    summary = pb.AgentStatusSummary(
        total_agents=agents,
        idle_agents=agents,
        agents=[pb.Agent(agent_id=f"agent_{n}", status=pb.AGENT_STATE_IDLE) for n in range(agents)],
    )
    return pb.Snapshot(epoch=epoch, seq=seq, agent_status=summary)


def established(seq: int, epoch: str = EPOCH) -> dict[str, Any]:
    return {
        "type": "connection_established",
        "client_id": "test",
        "client_type": "general",
        "timestamp": mapping.iso_now(),
        "epoch": epoch,
        "seq": seq,
    }


def hub_with_events(first: int, last: int, buffer_size: int = 100, at: int | None = None) -> StreamHub:
    """A hub that started from a snapshot at ``at`` (default ``first - 1``) and then saw
    the events ``first..last``."""
    hub = StreamHub(buffer_size)
    hub.on_snapshot(snapshot(first - 1 if at is None else at), reset=False)
    for seq in range(first, last + 1):
        hub.on_event(activity_event(seq))
    return hub


def frame_seqs(hub: StreamHub, epoch: str, since: int) -> list[int | None]:
    return [frame.seq for frame in hub.plan_resume(epoch, since).catch_up]


# -- from upstream ----------------------------------------------------------------------


def test_on_snapshot_sets_the_position() -> None:
    hub = StreamHub(10)
    hub.on_snapshot(snapshot(41), reset=False)
    assert (hub.epoch, hub.last_seq) == (EPOCH, 41)
    join = hub.plan_resume(EPOCH, 41)
    assert join.recovered
    assert join.catch_up == []


def test_on_event_serialises_once_buffers_and_broadcasts_with_seq() -> None:
    hub = hub_with_events(1, 0)
    first, second = Client(), Client()
    hub.join(first.subscriber, 0)
    hub.join(second.subscriber, 0)
    event = activity_event(1)
    hub.on_event(event)
    assert hub.last_seq == 1
    assert first.texts == second.texts
    assert first.texts[0] is second.texts[0]  # one serialisation for every client
    assert first.messages == [json.loads(json.dumps(mapping.event_json(event)))]
    assert first.messages[0]["seq"] == 1
    assert frame_seqs(hub, EPOCH, 0) == [1]
    (frame,) = hub.plan_resume(EPOCH, 0).catch_up
    assert frame.text is first.texts[0]
    assert (frame.type, frame.activity_type, frame.seq) == ("agent_activity", "memory_write", 1)


def test_on_event_frames_carry_the_activity_type_for_filtering() -> None:
    hub = hub_with_events(1, 0)
    narrowed = Client(ClientFilter(frozenset({"agent_activity", "activity_completed"}), frozenset({"memory_write"})))
    everything = Client()
    hub.join(narrowed.subscriber, 0)
    hub.join(everything.subscriber, 0)
    hub.on_event(activity_event(1, "memory_write"))
    hub.on_event(activity_event(2, "task_assigned"))
    hub.on_event(completion_event(3, "memory_write"))
    hub.on_event(completion_event(4, "task_assigned"))
    hub.on_event(memory_event(5))
    assert everything.seqs == [1, 2, 3, 4, 5]
    assert narrowed.seqs == [1, 3]
    assert narrowed.subscriber.last_seq == 5
    assert [frame.activity_type for frame in hub.plan_resume(EPOCH, 0).catch_up] == [
        "memory_write",
        "task_assigned",
        "memory_write",
        "task_assigned",
        None,
    ]


def test_on_status_broadcasts_without_seq_and_keeps_the_latest() -> None:
    hub = hub_with_events(1, 0)
    client, muted = Client(), Client(ClientFilter(frozenset({"agent_activity"}), None))
    hub.join(client.subscriber, 0)
    hub.join(muted.subscriber, 0)
    update = pb.StreamAgentStatusResponse(
        time=timestamp_pb2.Timestamp(seconds=T0), agent_status=snapshot(0, agents=2).agent_status
    )
    hub.on_status(update)
    assert client.types == ["agent_status_update"]
    assert set(client.messages[0]["agents"]) == {"agent_0", "agent_1"}
    assert muted.texts == []
    assert hub.status_frame is not None
    assert hub.status_frame.seq is None
    assert hub.status_frame.text == client.texts[0]
    assert hub.last_seq == 0
    assert frame_seqs(hub, EPOCH, 0) == []  # status updates are not buffered for resume


# -- plan_resume ----------------------------------------------------------------------------


def test_plan_resume_in_the_same_epoch_within_the_buffer() -> None:
    hub = hub_with_events(11, 15, buffer_size=3)  # buffer holds 13, 14, 15
    assert frame_seqs(hub, EPOCH, 12) == [13, 14, 15]
    assert frame_seqs(hub, EPOCH, 13) == [14, 15]
    assert frame_seqs(hub, EPOCH, 14) == [15]
    join = hub.plan_resume(EPOCH, 15)
    assert join.recovered
    assert join.reason == ""
    assert join.catch_up == []


def test_plan_resume_from_another_epoch_is_not_recovered() -> None:
    hub = hub_with_events(11, 15)
    join = hub.plan_resume("e0", 14)
    assert not join.recovered
    assert "e0" in join.reason
    assert EPOCH in join.reason
    assert join.catch_up == []


def test_plan_resume_too_old_for_the_buffer_is_not_recovered() -> None:
    hub = hub_with_events(11, 15, buffer_size=3)
    for since in (0, 10, 11):
        join = hub.plan_resume(EPOCH, since)
        assert not join.recovered, since
        assert "no longer buffered" in join.reason
        assert "13" in join.reason
        assert join.catch_up == []


def test_plan_resume_ahead_of_the_newest_event_is_not_recovered() -> None:
    hub = hub_with_events(11, 15)
    join = hub.plan_resume(EPOCH, 16)
    assert not join.recovered
    assert "ahead" in join.reason
    assert "16" in join.reason
    assert join.catch_up == []


def test_plan_resume_with_an_empty_buffer() -> None:
    hub = StreamHub(5)
    hub.on_snapshot(snapshot(20), reset=False)
    assert hub.plan_resume(EPOCH, 20).recovered
    assert not hub.plan_resume(EPOCH, 19).recovered
    assert not hub.plan_resume(EPOCH, 21).recovered


def test_a_new_snapshot_clears_the_buffer() -> None:
    hub = hub_with_events(1, 5)
    hub.on_snapshot(snapshot(3, epoch="e2"), reset=False)
    assert (hub.epoch, hub.last_seq) == ("e2", 3)
    assert hub.plan_resume("e2", 3).catch_up == []
    assert not hub.plan_resume(EPOCH, 5).recovered
    assert not hub.plan_resume("e2", 2).recovered


# -- open and join ----------------------------------------------------------------------------


def test_open_for_a_new_client_sends_established_state_then_frames_after_the_snapshot() -> None:
    hub = hub_with_events(11, 15)
    client = Client()
    hello = established(12)
    hub.open(client.subscriber, snapshot(12, agents=1), hello, None, "")
    assert client.types[:2] == ["connection_established", "collaboration_state"]
    assert client.messages[0] == hello
    assert "recovered" not in client.messages[0]
    state = client.messages[1]
    assert (state["epoch"], state["seq"]) == (EPOCH, 12)
    assert set(state["agent_status"]["agents"]) == {"agent_0"}
    assert "reset" not in state
    assert client.seqs == [13, 14, 15]
    assert client.subscriber in hub.fanout.subscribers
    assert (client.subscriber.min_seq, client.subscriber.last_seq) == (12, 15)

    hub.on_event(activity_event(16))
    assert client.seqs == [13, 14, 15, 16]


def test_open_with_a_snapshot_newer_than_the_hub_skips_what_it_covers() -> None:
    hub = hub_with_events(11, 15)
    client = Client()
    hub.open(client.subscriber, snapshot(17), established(17), None, "")
    assert client.types == ["connection_established", "collaboration_state"]
    for seq in (16, 17, 18):
        hub.on_event(activity_event(seq))
    assert client.seqs == [18]


def test_open_applies_the_filter_to_buffered_frames() -> None:
    hub = StreamHub(100)
    hub.on_snapshot(snapshot(0), reset=False)
    hub.on_event(activity_event(1, "memory_write"))
    hub.on_event(activity_event(2, "task_assigned"))
    hub.on_event(memory_event(3))
    client = Client(ClientFilter(frozenset({"memory_update"}), None))
    hub.open(client.subscriber, snapshot(0), established(0), None, "")
    assert client.types == ["connection_established", "collaboration_state", "memory_update"]


def test_open_with_a_recoverable_since_sends_only_the_missed_frames() -> None:
    hub = hub_with_events(11, 15)
    client = Client()
    hub.open(client.subscriber, snapshot(15), established(15), 12, EPOCH)
    first = client.messages[0]
    assert first["type"] == "connection_established"
    assert first["recovered"] is True
    assert first["seq"] == 12
    assert "reason" not in first
    assert client.types[1:] == ["agent_activity"] * 3
    assert client.seqs == [13, 14, 15]
    assert client.subscriber.min_seq == 12

    hub.on_event(activity_event(16))
    assert client.seqs == [13, 14, 15, 16]


def test_open_resuming_at_the_newest_event_sends_nothing_more() -> None:
    hub = hub_with_events(11, 15)
    client = Client()
    hub.open(client.subscriber, snapshot(15), established(15), 15, EPOCH)
    assert client.types == ["connection_established"]
    assert client.messages[0]["recovered"] is True


def test_open_with_an_unrecoverable_since_falls_back_to_the_snapshot() -> None:
    hub = hub_with_events(11, 15, buffer_size=3)
    for since, epoch in ((11, EPOCH), (14, "e0"), (99, EPOCH)):
        client = Client()
        hub.open(client.subscriber, snapshot(14), established(14), since, epoch)
        first = client.messages[0]
        assert first["recovered"] is False
        assert first["reason"]
        assert first["seq"] == 14
        assert client.types[1] == "collaboration_state"
        assert client.messages[1]["seq"] == 14
        assert client.seqs == [15]


def test_open_with_a_snapshot_of_another_epoch_asks_for_another_then_sends_no_buffered_frames() -> None:
    hub = hub_with_events(11, 15)
    client = Client()
    with pytest.raises(SnapshotTooOld, match="epoch"):
        hub.open(client.subscriber, snapshot(3, epoch="e2"), established(3, "e2"), None, "")
    assert client.texts == []
    hub.open(client.subscriber, snapshot(3, epoch="e2"), established(3, "e2"), None, "", strict=False)
    assert client.types == ["connection_established", "collaboration_state"]
    assert client.messages[1]["epoch"] == "e2"
    assert client.subscriber.min_seq == 3


def test_leave_stops_delivery() -> None:
    hub = hub_with_events(1, 0)
    client = Client()
    hub.join(client.subscriber, 0)
    hub.on_event(activity_event(1))
    hub.leave(client.subscriber)
    hub.on_event(activity_event(2))
    assert client.seqs == [1]


# -- reset --------------------------------------------------------------------------------------


def test_a_reset_sends_every_client_the_fresh_state_and_moves_min_seq() -> None:
    hub = hub_with_events(1, 10)
    plain = Client()
    muted = Client(ClientFilter(frozenset({"memory_update"}), None))  # still gets the state
    hub.join(plain.subscriber, 10)
    hub.join(muted.subscriber, 10)

    hub.on_snapshot(snapshot(4, epoch="e2", agents=1), reset=True)
    for client in (plain, muted):
        assert client.types == ["collaboration_state"]
        state = client.messages[0]
        assert state["reset"] is True
        assert (state["epoch"], state["seq"]) == ("e2", 4)
        assert set(state["agent_status"]["agents"]) == {"agent_0"}
        assert (client.subscriber.min_seq, client.subscriber.last_seq) == (4, 4)
    assert (hub.epoch, hub.last_seq) == ("e2", 4)
    assert hub.plan_resume("e2", 4).catch_up == []

    hub.on_event(activity_event(5, epoch="e2"))
    assert plain.seqs == [5]
    assert muted.seqs == []


def test_a_reset_to_the_same_position_sends_nothing() -> None:
    hub = hub_with_events(1, 5)
    client = Client()
    hub.join(client.subscriber, 5)
    hub.on_snapshot(snapshot(5), reset=True)
    assert client.texts == []
    assert frame_seqs(hub, EPOCH, 3) == [4, 5]


def test_a_snapshot_that_continues_a_clients_position_sends_it_nothing() -> None:
    hub = hub_with_events(1, 5)
    ahead, behind = Client(), Client()
    hub.join(ahead.subscriber, 5)
    hub.join(behind.subscriber, 2)
    ahead.subscriber.last_seq = 9  # it saw events up to 9 from a snapshot of its own
    hub.on_snapshot(snapshot(9), reset=False)
    assert ahead.texts == []
    (state,) = [json.loads(text) for text in behind.texts[-1:]]
    assert (state["type"], state["seq"], state["reset"]) == ("collaboration_state", 9, True)


def test_a_snapshot_of_another_epoch_resets_every_client() -> None:
    hub = hub_with_events(1, 5)
    client = Client()
    hub.join(client.subscriber, 5)
    hub.on_snapshot(snapshot(9, epoch="e2"), reset=False)
    (state,) = [json.loads(text) for text in client.texts]
    assert (state["epoch"], state["seq"], state["reset"]) == ("e2", 9, True)


def test_a_client_that_joined_before_the_first_upstream_snapshot_misses_nothing() -> None:
    hub = StreamHub(100)  # the bridge just started: its upstream has not delivered a snapshot yet
    client = Client()
    hub.open(client.subscriber, snapshot(5), established(5), None, "")
    hub.on_snapshot(snapshot(8), reset=False)  # the upstream starts after events 6..8 happened
    hub.on_event(activity_event(9))
    messages = client.messages
    last_state = max(i for i, message in enumerate(messages) if message["type"] == "collaboration_state")
    covered = messages[last_state]["seq"]
    events_after = [message["seq"] for message in messages[last_state + 1 :]]
    # The newest state the client holds plus the events after it must leave no gap up to 9.
    assert events_after == list(range(covered + 1, 10)), (covered, events_after)


def test_a_snapshot_older_than_an_empty_buffer_asks_for_another() -> None:
    """Right after the upstream's snapshot at 10 the buffer is empty: a client snapshot at
    7 would miss 8..10."""
    hub = StreamHub(100)
    hub.on_snapshot(snapshot(10), reset=False)
    client = Client()
    with pytest.raises(SnapshotTooOld):
        hub.open(client.subscriber, snapshot(7), established(7), None, "")
    hub.open(client.subscriber, snapshot(10), established(10), None, "")
    assert client.types == ["connection_established", "collaboration_state"]


def test_resume_across_an_event_the_bridge_could_not_show() -> None:
    hub = hub_with_events(1, 2)
    unknown = activity_event(3)
    unknown.activity_recorded.activity_type = 99  # type: ignore[assignment]  # a newer server's type
    hub.on_event(unknown)
    for seq in (4, 5):
        hub.on_event(activity_event(seq))
    assert [frame.seq for frame in hub.plan_resume(EPOCH, 2).catch_up] == [4, 5]
    assert [frame.seq for frame in hub.plan_resume(EPOCH, 3).catch_up] == [4, 5]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def newer_kind_event(seq: int, field_number: int = 99) -> pb.Event:
    """An event whose payload this bridge's proto lacks (field ``field_number`` of the
    payload oneof), as a newer server sends."""
    tag, encoded = (field_number << 3) | 2, bytearray()  # a length-delimited field: a message
    while tag > 0x7F:  # as a varint
        encoded.append(tag & 0x7F | 0x80)
        tag >>= 7
    encoded += bytes([tag, 0])  # an empty message
    return pb.Event.FromString(pb.Event(seq=seq, epoch=EPOCH).SerializeToString() + bytes(encoded))


def test_events_a_bridge_cannot_show_are_counted_each_and_logged_once_a_minute_per_kind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = hub_with_events(1, 1)
    clock = FakeClock()
    hub.skipped = SkippedEvents(clock=clock)
    caplog.set_level("ERROR", logger="bridge.hub")
    for seq in range(2, 12):
        hub.on_event(newer_kind_event(seq))
    hub.on_event(newer_kind_event(12, field_number=98))
    lines = [r.getMessage() for r in caplog.records if r.name == "bridge.hub"]
    assert len(lines) == 2  # one a kind, not one an event
    assert "event 2 skipped" in lines[0] and "1 event(s) of kind field_99" in lines[0]
    assert "event 12 skipped" in lines[1] and "kind field_98" in lines[1]
    assert hub.skipped.counts == {"field_99": 10, "field_98": 1}
    caplog.clear()
    clock.now += SKIPPED_LOG_INTERVAL
    hub.on_event(newer_kind_event(13))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "bridge.hub"]
    assert "event 13 skipped" in line and "10 event(s) of kind field_99" in line  # 3..11, and 13
    assert hub.skipped.counts["field_99"] == 11
    assert hub.last_seq == 13 and [f.seq for f in hub.plan_resume(EPOCH, 1).catch_up] == []


def test_the_kinds_tallied_are_bounded() -> None:
    skipped = SkippedEvents(clock=FakeClock())
    for number in range(100, 100 + SKIPPED_KINDS + 5):
        skipped.skipped(newer_kind_event(1, number), ValueError("newer"))
    assert len(skipped.counts) == SKIPPED_KINDS + 1 and skipped.counts["other"] == 5
    # A payload this bridge knows, holding a value it does not (a newer activity type), is named.
    unknown_type = activity_event(3)
    unknown_type.activity_recorded.activity_type = 99  # type: ignore[assignment]
    assert SkippedEvents.kind_of(unknown_type) == "activity_recorded"
