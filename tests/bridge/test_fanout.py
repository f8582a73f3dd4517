"""Subscriber and Fanout with fake connections: a fast one whose send never suspends and
a slow one whose send waits for an event the test sets."""

from __future__ import annotations

import asyncio
import re

import pytest

from bridge.fanout import CLOSE_TOO_SLOW, ClientFilter, Fanout, Frame, Subscriber


class Wire:
    """A fake connection: what was written, what was closed, and a gate for slow sends."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.started: list[str] = []
        self.closes: list[tuple[int, str]] = []
        self.gate = asyncio.Event()
        self.fail_with: Exception | None = None

    async def fast(self, text: str) -> None:
        self.started.append(text)
        if self.fail_with is not None:
            raise self.fail_with
        self.sent.append(text)

    async def slow(self, text: str) -> None:
        self.started.append(text)
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        self.sent.append(text)

    async def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))


def fast_subscriber(wire: Wire, max_backlog: int = 10) -> Subscriber:
    return Subscriber(wire.fast, wire.close, max_backlog=max_backlog, client_id="fast")


def slow_subscriber(wire: Wire, max_backlog: int = 10) -> Subscriber:
    return Subscriber(wire.slow, wire.close, max_backlog=max_backlog, client_id="slow")


def event(seq: int, kind: str = "agent_activity", activity_type: str | None = "memory_write") -> Frame:
    return Frame(f'{{"seq":{seq}}}', kind, activity_type, seq)


async def settle(subscriber: Subscriber) -> None:
    """Let the writer task (and any close task) run until the subscriber has caught up."""
    for _ in range(100):
        await asyncio.sleep(0)
        if not subscriber.behind:
            break
    await asyncio.sleep(0)
    assert not subscriber.behind


def other_tasks() -> set[asyncio.Task[object]]:
    return asyncio.all_tasks() - {asyncio.current_task()}


# -- ClientFilter ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message_types", "activity_types", "frame", "wanted"),
    [
        (None, None, event(1), True),
        (None, None, Frame("{}", "agent_status_update"), True),
        ({"memory_update"}, None, Frame("{}", "memory_update", None, 1), True),
        ({"memory_update"}, None, event(1), False),
        ({"memory_update"}, None, Frame("{}", "agent_status_update"), False),
        ({"agent_activity"}, {"memory_write"}, event(1, activity_type="memory_write"), True),
        ({"agent_activity"}, {"memory_write"}, event(1, activity_type="task_assigned"), False),
        ({"activity_completed"}, {"memory_write"}, event(1, "activity_completed", "memory_write"), True),
        ({"activity_completed"}, {"memory_write"}, event(1, "activity_completed", "task_assigned"), False),
        # activity_types alone narrows only the frames that carry an activity type
        (None, {"memory_write"}, event(1, activity_type="task_assigned"), False),
        (None, {"memory_write"}, Frame("{}", "memory_update", None, 1), True),
        (None, {"memory_write"}, Frame("{}", "collaboration_started", None, 1), True),
        (None, {"memory_write"}, Frame("{}", "agent_status_update"), True),
        ({"agent_activity", "memory_update"}, {"memory_write"}, Frame("{}", "memory_update", None, 1), True),
    ],
)
def test_client_filter_wants(
    message_types: set[str] | None, activity_types: set[str] | None, frame: Frame, wanted: bool
) -> None:
    client_filter = ClientFilter(
        None if message_types is None else frozenset(message_types),
        None if activity_types is None else frozenset(activity_types),
    )
    assert client_filter.wants(frame) is wanted


# -- Subscriber: a client that keeps up ---------------------------------------------------


async def test_a_fast_write_completes_synchronously_without_a_task() -> None:
    wire = Wire()
    subscriber = fast_subscriber(wire)
    before = other_tasks()
    subscriber.write("a")
    subscriber.write("b")
    assert wire.sent == ["a", "b"]  # before anything else got to run
    assert other_tasks() == before
    assert not subscriber.behind
    assert subscriber.backlog == 0
    assert subscriber.high_water == 0


async def test_deliver_writes_wanted_frames_and_tracks_last_seq() -> None:
    wire = Wire()
    subscriber = fast_subscriber(wire)
    subscriber.filter = ClientFilter(frozenset({"agent_activity"}), frozenset({"memory_write"}))
    subscriber.deliver(event(1))
    subscriber.deliver(event(2, activity_type="task_assigned"))  # narrowed out
    subscriber.deliver(Frame('{"seq":3}', "memory_update", None, 3))  # not subscribed
    assert wire.sent == ['{"seq":1}']
    assert subscriber.last_seq == 3  # frames it does not want still count as seen
    subscriber.deliver(event(4))
    assert wire.sent == ['{"seq":1}', '{"seq":4}']
    assert subscriber.last_seq == 4


async def test_frames_without_seq_are_filtered_but_do_not_move_last_seq() -> None:
    wire = Wire()
    subscriber = fast_subscriber(wire)
    subscriber.deliver(event(5))
    subscriber.deliver(Frame("status", "agent_status_update"))
    assert wire.sent == ['{"seq":5}', "status"]
    assert subscriber.last_seq == 5
    subscriber.filter = ClientFilter(frozenset({"agent_activity"}), None)
    subscriber.deliver(Frame("status 2", "agent_status_update"))
    assert wire.sent == ['{"seq":5}', "status"]
    assert subscriber.last_seq == 5


async def test_frames_covered_by_min_seq_are_skipped() -> None:
    wire = Wire()
    subscriber = fast_subscriber(wire)
    subscriber.min_seq = subscriber.last_seq = 5
    for seq in (3, 4, 5, 6, 7):
        subscriber.deliver(event(seq))
    assert wire.sent == ['{"seq":6}', '{"seq":7}']
    assert subscriber.last_seq == 7


async def test_skipped_frames_do_not_move_last_seq() -> None:
    wire = Wire()
    subscriber = fast_subscriber(wire)
    subscriber.min_seq = 5
    subscriber.last_seq = 2
    subscriber.deliver(event(4))
    assert subscriber.last_seq == 2
    assert wire.sent == []


async def test_send_frame_ignores_the_filter() -> None:
    wire = Wire()
    subscriber = fast_subscriber(wire)
    subscriber.filter = ClientFilter(frozenset({"memory_update"}), None)
    subscriber.send_frame(Frame("hello", "connection_established"))
    subscriber.send_frame(event(1))
    assert wire.sent == ["hello", '{"seq":1}']
    assert subscriber.last_seq == 0  # send_frame is not a broadcast


async def test_the_encode_hook_is_used_for_frames_not_for_raw_writes() -> None:
    wire = Wire()
    subscriber = Subscriber(
        wire.fast, wire.close, max_backlog=10, encode=lambda frame: f"{frame.type}#{frame.seq}:{frame.text}"
    )
    subscriber.send_frame(Frame("hi", "connection_established"))
    subscriber.deliver(event(1))
    subscriber.write("raw")
    assert wire.sent == ["connection_established#None:hi", 'agent_activity#1:{"seq":1}', "raw"]


async def test_a_send_that_raises_closes_the_subscriber() -> None:
    wire = Wire()
    wire.fail_with = ConnectionResetError("gone")
    subscriber = fast_subscriber(wire)
    subscriber.write("a")
    assert subscriber.closed
    assert not subscriber.behind
    subscriber.write("b")  # nothing more is attempted
    assert wire.started == ["a"]
    assert wire.closes == []


async def test_a_send_that_raises_after_suspending_closes_the_subscriber() -> None:
    wire = Wire()
    subscriber = slow_subscriber(wire)
    subscriber.write("a")
    subscriber.write("b")
    assert subscriber.behind
    wire.fail_with = ConnectionResetError("gone")
    wire.gate.set()
    await settle(subscriber)
    assert subscriber.closed
    assert wire.sent == []
    subscriber.write("c")
    assert wire.started == ["a"]


# -- Subscriber: a client that falls behind -------------------------------------------------


async def test_a_blocked_write_starts_a_writer_and_later_writes_queue_in_order() -> None:
    wire = Wire()
    subscriber = slow_subscriber(wire, max_backlog=5)
    before = other_tasks()
    subscriber.write("1")
    assert subscriber.behind
    assert len(other_tasks() - before) == 1  # one writer task, for this client
    subscriber.write("2")
    subscriber.write("3")
    assert subscriber.backlog == 2
    assert subscriber.high_water == 2
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert wire.sent == []  # still blocked
    assert wire.started == ["1"]
    assert len(other_tasks() - before) == 1  # no task per message

    wire.gate.set()
    subscriber.write("4")  # queued behind the others, not sent ahead of them
    await settle(subscriber)
    assert wire.sent == ["1", "2", "3", "4"]
    assert subscriber.backlog == 0
    assert subscriber.high_water == 3
    assert not subscriber.closed
    assert other_tasks() == before

    subscriber.write("5")  # caught up: synchronous again
    assert wire.sent[-1] == "5"
    assert not subscriber.behind


async def test_delivered_frames_keep_their_order_through_the_backlog() -> None:
    wire = Wire()
    subscriber = slow_subscriber(wire, max_backlog=50)
    for seq in range(1, 21):
        subscriber.deliver(event(seq))
        if seq == 10:
            wire.gate.set()
            await asyncio.sleep(0)
    await settle(subscriber)
    assert wire.sent == [f'{{"seq":{seq}}}' for seq in range(1, 21)]
    assert subscriber.last_seq == 20


async def test_backlog_overflow_disconnects_with_close_too_slow() -> None:
    wire = Wire()
    subscriber = slow_subscriber(wire, max_backlog=2)
    for seq in (1, 2, 3):  # 1 in flight, 2 and 3 waiting: at the bound, still connected
        subscriber.deliver(event(seq))
    assert subscriber.backlog == 2
    assert not subscriber.closed
    subscriber.deliver(event(4))  # one more than the bound
    assert subscriber.closed
    assert subscriber.backlog == 0
    assert not subscriber.behind
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(wire.closes) == 1
    code, reason = wire.closes[0]
    assert code == CLOSE_TOO_SLOW == 4008
    assert "too slow" in reason
    assert re.search(r"since=\d+", reason), reason

    subscriber.deliver(event(5))
    subscriber.disconnect(1000, "again")  # already closed: no second close
    wire.gate.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert wire.sent == []  # the blocked send was cancelled, nothing more written
    assert wire.started == ['{"seq":1}']
    assert len(wire.closes) == 1


async def test_the_too_slow_reason_names_a_seq_the_client_actually_has() -> None:
    wire = Wire()
    subscriber = slow_subscriber(wire, max_backlog=2)
    wire.gate.set()
    subscriber.deliver(event(1))
    subscriber.deliver(event(2))
    await settle(subscriber)
    assert wire.sent == ['{"seq":1}', '{"seq":2}']
    wire.gate.clear()
    for seq in (3, 4, 5, 6):  # 3 in flight, 4 and 5 queued, 6 overflows
        subscriber.deliver(event(seq))
    assert subscriber.closed
    await asyncio.sleep(0)
    (_, reason), *_ = wire.closes
    match = re.search(r"since=(\d+)", reason)
    assert match is not None
    # 2 was written; 3 was in flight when the writer was cancelled. 4, 5 and 6 never left.
    assert int(match.group(1)) in (2, 3), reason


async def test_disconnect_closes_once_and_cancels_the_writer() -> None:
    wire = Wire()
    subscriber = slow_subscriber(wire)
    subscriber.write("a")
    subscriber.write("b")
    subscriber.disconnect(1001, "going away")
    subscriber.disconnect(1001, "going away")
    assert subscriber.closed
    assert not subscriber.behind
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert wire.closes == [(1001, "going away")]
    wire.gate.set()
    await asyncio.sleep(0)
    assert wire.sent == []


# -- Fanout -------------------------------------------------------------------------------


async def test_broadcast_reaches_every_subscriber_that_wants_the_frame() -> None:
    fanout = Fanout()
    everything, activities, memory = Wire(), Wire(), Wire()
    fanout.add(fast_subscriber(everything))
    narrowed = fast_subscriber(activities)
    narrowed.filter = ClientFilter(frozenset({"agent_activity"}), frozenset({"memory_write"}))
    fanout.add(narrowed)
    only_memory = fast_subscriber(memory)
    only_memory.filter = ClientFilter(frozenset({"memory_update"}), None)
    fanout.add(only_memory)

    frames = [event(1), event(2, activity_type="task_assigned"), Frame("m", "memory_update", None, 3)]
    for frame in frames:
        fanout.broadcast(frame)
    assert everything.sent == [frame.text for frame in frames]
    assert activities.sent == [frames[0].text]
    assert memory.sent == ["m"]
    assert all(subscriber.last_seq == 3 for subscriber in fanout.subscribers)
    assert fanout.slow_disconnects == 0


async def test_a_slow_subscriber_is_dropped_and_the_others_get_everything() -> None:
    fanout = Fanout()
    fast_wire, slow_wire = Wire(), Wire()
    fast = fast_subscriber(fast_wire)
    slow = slow_subscriber(slow_wire, max_backlog=3)
    fanout.add(fast)
    fanout.add(slow)

    for seq in range(1, 5):  # 1 in flight, 2..4 queued
        fanout.broadcast(event(seq))
    assert slow in fanout.subscribers
    assert slow.backlog == 3
    fanout.broadcast(event(5))  # overflow
    assert slow.closed
    assert fanout.subscribers == {fast}
    assert fanout.slow_disconnects == 1
    for seq in range(6, 11):
        fanout.broadcast(event(seq))
    assert fanout.slow_disconnects == 1

    assert fast_wire.sent == [f'{{"seq":{seq}}}' for seq in range(1, 11)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [code for code, _ in slow_wire.closes] == [CLOSE_TOO_SLOW]
    slow_wire.gate.set()
    await asyncio.sleep(0)
    assert slow_wire.sent == []


async def test_a_subscriber_whose_send_fails_is_dropped() -> None:
    fanout = Fanout()
    good, broken = Wire(), Wire()
    broken.fail_with = BrokenPipeError("gone")
    failing = fast_subscriber(broken)
    fanout.add(fast_subscriber(good))
    fanout.add(failing)
    fanout.broadcast(event(1))
    fanout.broadcast(event(2))
    assert failing.closed
    assert failing not in fanout.subscribers
    assert len(fanout.subscribers) == 1
    assert good.sent == ['{"seq":1}', '{"seq":2}']
    assert broken.started == ['{"seq":1}']


async def test_a_subscriber_closed_elsewhere_is_dropped_on_the_next_broadcast() -> None:
    fanout = Fanout()
    wire = Wire()
    subscriber = fast_subscriber(wire)
    fanout.add(subscriber)
    subscriber.closed = True  # its connection handler saw the disconnect
    fanout.broadcast(event(1))
    assert fanout.subscribers == set()
    assert fanout.slow_disconnects == 0
    assert wire.started == []


async def test_remove_stops_delivery_and_tolerates_unknown_subscribers() -> None:
    fanout = Fanout()
    wire = Wire()
    subscriber = fast_subscriber(wire)
    fanout.add(subscriber)
    fanout.broadcast(event(1))
    fanout.remove(subscriber)
    fanout.remove(subscriber)
    fanout.broadcast(event(2))
    assert wire.sent == ['{"seq":1}']


async def test_a_failed_send_is_not_counted_as_a_slow_disconnect() -> None:
    fanout = Fanout()
    broken = Wire()
    broken.fail_with = BrokenPipeError("gone")
    failing = fast_subscriber(broken)
    fanout.add(failing)
    fanout.broadcast(event(1))
    assert failing.closed
    assert not broken.closes  # it was never disconnected for being slow
    assert fanout.slow_disconnects == 0


# -- tallies for the metrics --------------------------------------------------------------


async def test_broadcasts_count_the_messages_offered_by_type() -> None:
    fanout = Fanout()
    for _ in range(3):
        fanout.add(fast_subscriber(Wire()))
    fanout.broadcast(event(1))
    fanout.broadcast(event(2))
    fanout.broadcast(Frame("{}", "agent_status_update"))
    assert fanout.messages_offered == {"agent_activity": 6, "agent_status_update": 3}


async def test_a_slow_subscriber_leaves_once_with_its_backlog_high_water_mark() -> None:
    fanout = Fanout()
    left: list[Subscriber] = []
    fanout.on_leave = left.append
    slow_wire = Wire()
    slow = slow_subscriber(slow_wire, max_backlog=3)
    fast = fast_subscriber(Wire())
    fanout.add(slow)
    fanout.add(fast)
    for seq in range(1, 6):  # 1 in flight, 2..4 queued, 5 overflows
        fanout.broadcast(event(seq))
    fanout.remove(slow)  # its connection handler's turn: already gone, not counted again
    assert (fanout.slow_disconnects, fanout.peak_backlog, left) == (1, 3, [slow])
    fanout.remove(fast)
    assert (fanout.slow_disconnects, fanout.peak_backlog, left) == (1, 3, [slow, fast])
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [code for code, _ in slow_wire.closes] == [CLOSE_TOO_SLOW]


async def test_a_client_cut_off_outside_a_broadcast_is_counted_when_it_leaves() -> None:
    fanout = Fanout()
    slow = slow_subscriber(Wire(), max_backlog=1)
    fanout.add(slow)
    for text in ("pong", "pong", "pong"):  # replies to the client itself, not broadcasts
        slow.write(text)
    assert slow.too_slow and slow in fanout.subscribers
    fanout.remove(slow)
    assert (fanout.slow_disconnects, fanout.peak_backlog) == (1, 1)
    await asyncio.sleep(0)


async def test_close_all_closes_every_client_and_waits_a_bounded_time() -> None:
    """The bridge's drain on shutdown: every client gets the close code; one whose close
    never goes out (it does not read) holds the drain up no longer than ``within``."""
    fanout = Fanout()
    reading, stuck = Wire(), Wire()

    async def never_closes(code: int, reason: str) -> None:
        stuck.closes.append((code, reason))
        await asyncio.Event().wait()

    fanout.add(fast_subscriber(reading))
    fanout.add(Subscriber(stuck.fast, never_closes, max_backlog=10, client_id="stuck"))
    await asyncio.wait_for(fanout.close_all(1012, "restarting", within=0.05), 5)
    assert reading.closes == stuck.closes == [(1012, "restarting")]
    assert not fanout.subscribers
    for task in other_tasks():
        task.cancel()


# -- direct frame writes (bridge/wire.py) ----------------------------------------------


class DirectWire:
    """A fake direct writer: takes encoded frames while ``open``, else declines."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.open = True

    def __call__(self, data: bytes) -> bool:
        if not self.open:
            return False
        self.frames.append(data)
        return True


def text_of(frame: bytes) -> str:
    """The payload of a short unmasked text frame."""
    assert frame[0] == 0x81 and frame[1] < 126
    return frame[2:].decode()


async def test_a_broadcast_frame_goes_out_encoded_once_through_the_direct_writer() -> None:
    wire, direct = Wire(), DirectWire()
    first = Subscriber(wire.fast, wire.close, max_backlog=5, direct=direct)
    second = Subscriber(wire.fast, wire.close, max_backlog=5, direct=direct)
    frame = event(7)
    first.deliver(frame)
    second.deliver(frame)
    assert wire.sent == []  # not through the ASGI send
    assert [text_of(data) for data in direct.frames] == ['{"seq":7}', '{"seq":7}']
    assert direct.frames[0] is direct.frames[1]  # the same bytes object: built once
    assert first.written_seq == second.written_seq == 7


async def test_a_declined_direct_write_falls_back_to_send_and_keeps_the_order() -> None:
    wire, direct = Wire(), DirectWire()
    subscriber = Subscriber(wire.slow, wire.close, max_backlog=10, direct=direct)
    subscriber.deliver(event(1))
    direct.open = False  # the transport stopped taking data (the client is not reading)
    subscriber.deliver(event(2))
    assert subscriber.behind
    direct.open = True
    subscriber.deliver(event(3))  # behind: queued after 2, not written ahead of it
    assert [text_of(data) for data in direct.frames] == ['{"seq":1}']
    assert subscriber.backlog == 1
    wire.gate.set()
    await settle(subscriber)
    assert wire.sent == ['{"seq":2}']  # the blocked one, through `send`
    assert text_of(direct.frames[-1]) == '{"seq":3}'  # the backlog, written directly
    assert subscriber.written_seq == 3
    subscriber.deliver(event(4))  # caught up: direct again
    assert text_of(direct.frames[-1]) == '{"seq":4}'


async def test_control_replies_and_encoded_frames_do_not_use_the_direct_writer() -> None:
    wire, direct = Wire(), DirectWire()
    subscriber = Subscriber(wire.fast, wire.close, max_backlog=5, direct=direct, encode=lambda f: f"data: {f.text}")
    subscriber.deliver(event(1))  # encode set (SSE): the text path, encoded
    subscriber.write('{"type":"pong"}')
    assert direct.frames == []
    assert wire.sent == ['data: {"seq":1}', '{"type":"pong"}']


async def test_a_closed_subscriber_writes_nothing_directly() -> None:
    wire, direct = Wire(), DirectWire()
    subscriber = Subscriber(wire.fast, wire.close, max_backlog=5, direct=direct)
    subscriber.closed = True
    subscriber.deliver(event(1))
    assert direct.frames == [] and wire.sent == []


def test_a_released_frame_keeps_its_text_and_encodes_again_on_demand() -> None:
    frame = event(3)
    encoded = frame.wire()
    assert frame.wire() is encoded  # built once
    frame.release_wire()
    assert frame.wire() == encoded and frame.text == '{"seq":3}'
