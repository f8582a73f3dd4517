"""Coalesced fan-out: a broadcast pass takes every event queued since the last one, and
each client gets what it wants of them in one write (bridge/hub.py, bridge/fanout.py)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from bridge.config import parse_bridge_config
from bridge.fanout import CLOSE_TOO_SLOW, MAX_SHARED_SELECTIONS, Batch, ClientFilter, Frame, Subscriber
from bridge.hub import StreamHub
from bridge.sse import sse_encode
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.bridge.test_fanout import Wire, settle
from tests.bridge.test_hub import EPOCH, activity_event, snapshot


class DirectWire:
    """A fake direct writer: each call is one transport write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.open = True

    def __call__(self, data: bytes) -> bool:
        if not self.open:
            return False
        self.writes.append(data)
        return True

    @staticmethod
    def split(data: bytes) -> list[str]:
        """The text messages in ``data``: unmasked frames back to back, each its own message."""
        texts, at = [], 0
        while at < len(data):
            assert data[at] == 0x81  # FIN + text: a whole message per frame
            length, header = data[at + 1], 2
            if length == 126:
                length, header = int.from_bytes(data[at + 2 : at + 4], "big"), 4
            texts.append(data[at + header : at + header + length].decode())
            at += header + length
        return texts

    @property
    def all_seqs(self) -> list[int]:
        """The seqs of every message written, in order."""
        return [seq for write in self.seqs for seq in write]

    @property
    def seqs(self) -> list[list[int]]:
        """The seqs each write carried."""
        return [[json.loads(text)["seq"] for text in self.split(data)] for data in self.writes]


async def passes_run(hub: StreamHub) -> None:
    """Until the hub has broadcast everything queued (a busy hub's pass may wait a little)."""
    async with asyncio.timeout(10):
        while hub.pass_due:  # noqa: ASYNC110 - the hub schedules its pass on the loop, no event
            await asyncio.sleep(0.001)


def coalescing_hub(batch_size: int = 256) -> StreamHub:
    hub = StreamHub(1000, coalesce_delay=0.005, batch_size=batch_size)
    hub.on_snapshot(snapshot(0), reset=False)
    return hub


def direct_client(hub: StreamHub, client_filter: ClientFilter | None = None) -> tuple[Subscriber, DirectWire, Wire]:
    wire, direct = Wire(), DirectWire()
    subscriber = Subscriber(wire.slow, wire.close, max_backlog=10, direct=direct)
    if client_filter is not None:
        subscriber.filter = client_filter
    hub.join(subscriber, 0)
    return subscriber, direct, wire


async def test_events_queued_in_one_loop_turn_go_out_in_one_pass_and_one_write_per_client() -> None:
    hub = coalescing_hub()
    first, first_wire, _ = direct_client(hub)
    second, second_wire, _ = direct_client(hub)
    for seq in (1, 2, 3):
        hub.on_event(activity_event(seq))
    assert first_wire.writes == []  # queued for the pass at the loop's next turn
    await asyncio.sleep(0)
    assert first_wire.seqs == second_wire.seqs == [[1, 2, 3]]
    assert first_wire.writes[0] is second_wire.writes[0]  # joined once, shared
    assert (hub.fanout.passes, hub.fanout.frames_passed) == (1, 3)
    assert first.written_seq == second.written_seq == 3
    assert (first.writes, first.messages_written) == (1, 3)


async def test_a_lone_event_on_an_idle_hub_goes_out_at_the_next_loop_turn() -> None:
    hub = coalescing_hub()
    _, direct, _ = direct_client(hub)
    hub.on_event(activity_event(1))
    await asyncio.sleep(0)
    assert direct.seqs == [[1]]


def published(event: pb.Event, at: float) -> pb.Event:
    """``event`` as the server published it at ``at`` (epoch seconds)."""
    event.time.FromNanoseconds(int(at * 1e9))
    return event


class SlowDirectWire(DirectWire):
    """A direct writer whose every write takes ``seconds``: a pass over it lasts that long."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def __call__(self, data: bytes) -> bool:
        time.sleep(self.seconds)  # the pass is synchronous: this is how long it blocks the loop
        return super().__call__(data)


async def test_events_further_apart_than_a_pass_lasts_go_out_at_once_even_just_after_a_pass() -> None:
    # A pass lasts 20 ms; events are published every 30 ms, so each is read 10 ms after
    # the last pass ended, within the coalescing delay (50 ms): nothing would share a
    # delayed pass.
    hub = StreamHub(1000, coalesce_delay=0.05)
    hub.on_snapshot(snapshot(0), reset=False)
    wire = SlowDirectWire(0.02)
    hub.join(Subscriber(Wire().slow, Wire().close, max_backlog=10, direct=wire), 0)
    start = time.time()
    for seq in range(1, 7):
        hub.on_event(published(activity_event(seq), start + 0.03 * seq))
        await asyncio.sleep(0)  # the loop's next turn: the pass has run
        assert wire.all_seqs == list(range(1, seq + 1)), f"event {seq} waited"
        await asyncio.sleep(0.01)
    assert hub.fanout.passes == 6


async def test_events_closer_together_than_a_pass_lasts_share_passes() -> None:
    # A pass lasts 20 ms; events are published every 2 ms: one pass each would fall ever
    # further behind (and read one event a pass, which looks like a rate it keeps up with).
    hub = StreamHub(1000, coalesce_delay=0.05)
    hub.on_snapshot(snapshot(0), reset=False)
    wire = SlowDirectWire(0.02)
    hub.join(Subscriber(Wire().slow, Wire().close, max_backlog=100, direct=wire), 0)
    # As the upstream reads them: what arrived during a pass is read one event a loop
    # turn once it ends (each event is due 2 ms after the one before).
    start, seq = time.time(), 1
    while seq <= 40:
        if time.time() - start >= (seq - 1) * 0.002:
            hub.on_event(published(activity_event(seq), start + 0.002 * seq))
            seq += 1
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(0.001)
    await passes_run(hub)
    assert wire.all_seqs == list(range(1, 41))
    assert hub.fanout.passes < 20, f"{hub.fanout.passes} passes for 40 events"


async def test_a_full_batch_is_broadcast_at_once() -> None:
    hub = coalescing_hub(batch_size=2)
    _, direct, _ = direct_client(hub)
    hub.on_event(activity_event(1))
    hub.on_event(activity_event(2))  # the batch is full: its pass runs now
    assert direct.seqs == [[1, 2]]
    hub.on_event(activity_event(3))
    await passes_run(hub)
    assert direct.seqs == [[1, 2], [3]]


async def test_each_filter_gets_its_share_in_order_and_moves_past_what_it_skips() -> None:
    hub = coalescing_hub()
    narrowed, narrowed_wire, _ = direct_client(
        hub, ClientFilter(frozenset({"agent_activity"}), frozenset({"memory_write"}))
    )
    everything, everything_wire, _ = direct_client(hub)
    hub.on_event(activity_event(1))
    hub.on_event(activity_event(2, "task_assigned"))
    hub.on_event(activity_event(3))
    hub.on_event(activity_event(4, "task_assigned"))
    await asyncio.sleep(0)
    assert narrowed_wire.seqs == [[1, 3]]
    assert everything_wire.seqs == [[1, 2, 3, 4]]
    # What it skipped at the end of the batch counts as had: it resumes after 4.
    assert narrowed.written_seq == narrowed.last_seq == everything.written_seq == 4


async def test_a_client_joining_while_events_are_queued_gets_each_of_them_once() -> None:
    hub = coalescing_hub()
    _, early, _ = direct_client(hub)
    hub.on_event(activity_event(1))
    hub.on_event(activity_event(2))
    _, late, _ = direct_client(hub)  # the queued pass runs first, then its catch-up
    hub.on_event(activity_event(3))
    await passes_run(hub)
    assert early.all_seqs == [1, 2, 3]
    assert late.all_seqs == [1, 2, 3]


async def test_a_resume_plan_sees_the_queued_events_and_a_status_update_comes_after_them() -> None:
    hub = coalescing_hub()
    _, direct, _ = direct_client(hub)
    hub.on_event(activity_event(1))
    hub.on_event(activity_event(2))
    assert [frame.seq for frame in hub.plan_resume(EPOCH, 0).catch_up] == [1, 2]
    assert direct.seqs == [[1, 2]]  # the plan ran the queued pass first
    hub.on_event(activity_event(3))
    hub.on_status(pb.StreamAgentStatusResponse())
    received = [json.loads(text) for data in direct.writes for text in DirectWire.split(data)]
    assert [(m["type"], m.get("seq")) for m in received] == [
        ("agent_activity", 1),
        ("agent_activity", 2),
        ("agent_activity", 3),
        ("agent_status_update", None),
    ]


async def test_a_snapshot_runs_the_queued_pass_before_it_resets_anyone() -> None:
    hub = coalescing_hub()
    _, direct, _ = direct_client(hub)
    hub.on_event(activity_event(1))
    hub.on_snapshot(snapshot(5, epoch="e2"), reset=True)
    assert direct.seqs[0] == [1]
    (reset,) = DirectWire.split(direct.writes[1])
    assert json.loads(reset)["type"] == "collaboration_state"


async def test_a_client_that_cannot_take_a_write_queues_the_batch_and_flushes_its_backlog_in_one_write() -> None:
    hub = coalescing_hub()
    slow, slow_wire, wire = direct_client(hub)
    _, fast_wire, _ = direct_client(hub)
    slow_wire.open = False  # its transport is full: the first frame waits in `send`
    for seq in (1, 2, 3):
        hub.on_event(activity_event(seq))
    await asyncio.sleep(0)
    assert fast_wire.seqs == [[1, 2, 3]]  # nobody waits for the slow one
    assert slow.behind and slow.backlog == 2
    slow_wire.open = True
    wire.gate.set()
    await settle(slow)
    assert [json.loads(text)["seq"] for text in wire.sent] == [1]  # the first, through `send`
    assert slow_wire.seqs == [[2, 3]]  # the backlog: one write
    assert slow.written_seq == 3


async def test_a_batch_larger_than_a_slow_clients_backlog_closes_it_with_4008() -> None:
    hub = coalescing_hub()
    slow, slow_wire, wire = direct_client(hub)  # max_backlog=10 messages
    _, fast_wire, _ = direct_client(hub)
    slow_wire.open = False
    for seq in range(1, 13):  # 1 in flight, 11 to queue: one more than the bound
        hub.on_event(activity_event(seq))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert slow.closed and slow.too_slow
    assert wire.closes and wire.closes[0][0] == CLOSE_TOO_SLOW
    assert slow not in hub.fanout.subscribers
    assert fast_wire.all_seqs == list(range(1, 13))


async def test_an_event_stream_client_gets_a_batch_as_one_body_of_events() -> None:
    hub = coalescing_hub()
    wire = Wire()
    subscriber = Subscriber(wire.fast, wire.close, max_backlog=10, encode=sse_encode)
    hub.join(subscriber, 0)
    for seq in (1, 2, 3):
        hub.on_event(activity_event(seq))
    await asyncio.sleep(0)
    (body,) = wire.sent
    assert [line for line in body.split("\n") if line.startswith("id: ")] == ["id: 1", "id: 2", "id: 3"]
    assert body.count("\n\n") == 3
    assert subscriber.written_seq == 3 and subscriber.messages_written == 3


async def test_an_event_stream_backlog_is_flushed_as_one_body() -> None:
    wire = Wire()
    subscriber = Subscriber(wire.slow, wire.close, max_backlog=10, encode=sse_encode)
    for seq in (1, 2, 3, 4):
        subscriber.deliver(Frame(f'{{"seq":{seq}}}', "agent_activity", "memory_write", seq))
    assert subscriber.backlog == 3
    wire.gate.set()
    await settle(subscriber)
    assert len(wire.sent) == 2  # the one in flight, then the backlog in one body
    assert wire.sent[1].count("\n\n") == 3
    assert subscriber.written_seq == 4


def test_a_batch_selection_skips_what_a_clients_snapshot_covers() -> None:
    frames = [Frame(f'{{"seq":{seq}}}', "agent_activity", "memory_write", seq) for seq in (1, 2, 3, 4)]
    batch = Batch(frames)
    everything = ClientFilter()
    assert [f.seq for f in batch.select(everything, 0).frames] == [1, 2, 3, 4]
    covered = batch.select(everything, 2)
    assert [f.seq for f in covered.frames] == [3, 4] and covered.last_seq == 4
    assert batch.select(everything, 0) is batch.select(ClientFilter(), 0)  # shared by equal filters
    assert batch.select(everything, 4).frames == [] and batch.select(everything, 4).last_seq is None


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        (
            "--fanout-coalesce-delay",
            "-0.001",
            "COLLAB_FANOUT_COALESCE_DELAY: invalid value '-0.001': must be at least 0",
        ),
        (
            "--fanout-coalesce-delay",
            "nan",
            "COLLAB_FANOUT_COALESCE_DELAY: invalid value 'nan': must be a finite number",
        ),
        ("--fanout-batch", "0", "--fanout-batch / COLLAB_FANOUT_BATCH: invalid value '0': must be at least 1"),
        ("--workers", "0", "--workers / COLLAB_BRIDGE_WORKERS: invalid value '0': must be at least 1 and at most 64"),
        ("--workers", "65", "--workers / COLLAB_BRIDGE_WORKERS: invalid value '65': must be at least 1 and at most 64"),
        ("--workers", "two", "invalid value 'two'"),
    ],
)
def test_bad_fanout_settings_are_refused(flag: str, value: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_bridge_config([flag, value], env={})
    assert says in capsys.readouterr().err


def test_the_fanout_settings_and_their_defaults() -> None:
    config = parse_bridge_config([], env={})
    assert (config.fanout_coalesce_delay, config.fanout_batch, config.workers) == (0.005, 256, 1)
    config = parse_bridge_config([], env={"COLLAB_FANOUT_BATCH": "1", "COLLAB_BRIDGE_WORKERS": "4"})
    assert (config.fanout_batch, config.workers) == (1, 4)


def test_a_pass_shares_a_bounded_number_of_selections() -> None:
    frames = [Frame(f'{{"seq":{seq}}}', "agent_activity", f"type_{seq}", seq) for seq in range(1, 101)]
    batch = Batch(frames)
    filters = [ClientFilter(None, frozenset({f"type_{n}"})) for n in range(1, 101)]
    selections = [batch.select(client_filter, 0) for client_filter in filters]
    assert [[frame.seq for frame in s.frames] for s in selections] == [[n] for n in range(1, 101)]
    assert batch.select(filters[0], 0) is selections[0]  # within the bound: shared
    assert batch.select(filters[-1], 0) is not selections[-1]  # beyond it: built again, not kept
    assert len(batch._selections) == MAX_SHARED_SELECTIONS
