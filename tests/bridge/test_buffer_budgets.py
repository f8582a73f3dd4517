"""The bridge's memory budgets: the resume buffer and a slow client's backlog bounded in
characters of text, the REST answer to a full server budget, and resumes from the
server's log streamed and limited in number."""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from bridge.config import BridgeConfig, parse_bridge_config
from bridge.errors import HubError, ServerUnavailable
from bridge.fanout import CLOSE_TOO_SLOW, Subscriber
from bridge.hub import StreamHub
from bridge.runtime import BridgeRuntime
from bridge.sse import EventStream
from collab_grpc.errors import BUDGET_TRAILER
from collab_grpc.v1 import collaboration_pb2 as pb

EPOCH = "e1"
OPENING = {"type": "connection_established"}
KB64 = 64 * 1024


def big_event(seq: int, size: int = 1000) -> pb.Event:
    metadata = struct_pb2.Struct()
    metadata.update({"blob": "x" * size})
    return pb.Event(
        seq=seq,
        epoch=EPOCH,
        time=timestamp_pb2.Timestamp(seconds=1_700_000_000),
        activity_recorded=pb.Activity(
            activity_id=f"act_{seq}",
            agent_id="a",
            activity_type=pb.ACTIVITY_TYPE_MEMORY_WRITE,
            timestamp=timestamp_pb2.Timestamp(seconds=1_700_000_000),
            status=pb.ACTIVITY_STATUS_ACTIVE,
            metadata=metadata,
        ),
    )


def snapshot(seq: int) -> pb.Snapshot:
    return pb.Snapshot(epoch=EPOCH, seq=seq, agent_status=pb.AgentStatusSummary())


class Wire:
    """A connection: ``fast`` never suspends; ``slow`` waits for ``gate``."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closes: list[tuple[int, str]] = []
        self.gate = asyncio.Event()

    async def fast(self, text: str) -> None:
        self.sent.append(text)

    async def slow(self, text: str) -> None:
        await self.gate.wait()
        self.sent.append(text)

    async def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    @property
    def seqs(self) -> list[int]:
        messages = [json.loads(text) for text in self.sent]
        return [m["seq"] for m in messages if m["type"] not in {"connection_established", "collaboration_state"}]


# -- the resume buffer ------------------------------------------------------------------


def test_the_resume_buffer_keeps_the_newest_frames_within_its_characters() -> None:
    probe = StreamHub(100)
    probe.on_snapshot(snapshot(0), reset=False)
    probe.on_event(big_event(10))
    one = probe.buffered_bytes  # every frame of seq 10..99 has this many characters
    hub = StreamHub(100, buffer_bytes=3 * one)
    hub.on_snapshot(snapshot(10), reset=False)
    for seq in range(11, 21):
        hub.on_event(big_event(seq))
    assert hub.first_buffered_seq == 18
    assert hub.buffered_bytes == 3 * one
    join = hub.plan_resume(EPOCH, 13)
    assert not join.recovered and "no longer buffered (oldest is 18)" in join.reason
    assert [frame.seq for frame in hub.plan_resume(EPOCH, 17).catch_up] == [18, 19, 20]
    hub.on_snapshot(pb.Snapshot(epoch="e2", seq=0), reset=True)
    assert hub.buffered_bytes == 0


def test_the_newest_frame_is_buffered_whatever_its_size() -> None:
    hub = StreamHub(100, buffer_bytes=10)
    hub.on_snapshot(snapshot(0), reset=False)
    hub.on_event(big_event(1))
    hub.on_event(big_event(2))
    assert hub.first_buffered_seq == 2


# -- a slow client's backlog --------------------------------------------------------------


async def test_a_slow_client_is_cut_before_its_backlog_holds_more_than_its_bytes() -> None:
    """1,000 messages of 64 KB would be 64 MB: the client is closed at 4 MB instead."""
    wire = Wire()
    budget = 4 * 1024 * 1024
    subscriber = Subscriber(wire.slow, wire.close, max_backlog=1000, max_backlog_bytes=budget)
    written = 0
    for seq in range(1, 1001):
        subscriber.write("x" * KB64, seq)
        if subscriber.closed:
            break
        written += 1
        assert subscriber.backlog_bytes <= budget
    assert subscriber.closed and subscriber.too_slow
    assert written == budget // KB64 + 1  # the one being written, then a full backlog
    await asyncio.sleep(0)
    assert wire.closes and wire.closes[0][0] == CLOSE_TOO_SLOW
    assert f"more than {budget} bytes of messages waiting" in wire.closes[0][1]
    assert subscriber.backlog_bytes == 0


async def test_a_backlog_within_its_bytes_drains_and_counts_down() -> None:
    wire = Wire()
    subscriber = Subscriber(wire.slow, wire.close, max_backlog=1000, max_backlog_bytes=10 * KB64)
    for seq in range(1, 6):
        subscriber.write("y" * KB64, seq)
    assert subscriber.backlog_bytes == 4 * KB64
    wire.gate.set()
    await subscriber.drained()
    assert subscriber.backlog_bytes == 0 and not subscriber.closed and len(wire.sent) == 5


def test_the_bridge_budgets_are_settings() -> None:
    defaults = parse_bridge_config([], env={})
    assert defaults.event_buffer_bytes == 32 * 1024 * 1024
    assert defaults.client_backlog_bytes == 4 * 1024 * 1024
    assert defaults.max_concurrent_resumes == 4
    config = parse_bridge_config(
        ["--event-buffer-bytes", "1000", "--max-concurrent-resumes", "2"],
        env={"COLLAB_CLIENT_BACKLOG_BYTES": "5000"},
    )
    assert (config.event_buffer_bytes, config.client_backlog_bytes, config.max_concurrent_resumes) == (1000, 5000, 2)
    with pytest.raises(SystemExit):
        parse_bridge_config(["--max-concurrent-resumes", "0"], env={})


# -- the REST answer to a full budget -------------------------------------------------------


def rpc_error(code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...]) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details, None)


def test_a_full_budget_is_507_and_the_rate_limit_stays_429_with_retry_after() -> None:
    full = HubError.from_rpc(
        rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "open activities hold ...", ((BUDGET_TRAILER, "x"),))
    )
    assert (full.status, full.code, full.retry_after) == (507, "RESOURCE_EXHAUSTED", None)
    assert full.detail == "open activities hold ..."
    limited = HubError.from_rpc(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", (("retry-after", "2"),)))
    assert (limited.status, limited.retry_after) == (429, "2")


# -- resumes from the server's log ------------------------------------------------------------


class ReplayCall:
    """A SubscribeEvents call replaying ``events`` after a recovered ResumeResult; it
    waits on ``hold`` before the first event so tests can keep it in flight."""

    def __init__(self, events: list[pb.Event], hold: asyncio.Event | None, recovered: bool = True) -> None:
        self.messages = [pb.SubscribeEventsResponse(resume=pb.ResumeResult(recovered=recovered, epoch=EPOCH))]
        self.messages += [pb.SubscribeEventsResponse(event=event) for event in events]
        self.hold = hold
        self.reads = 0
        self.cancelled = False

    async def read(self) -> Any:
        if self.reads == 1 and self.hold is not None:
            await self.hold.wait()
        if self.reads >= len(self.messages):
            await asyncio.Event().wait()
        self.reads += 1
        return self.messages[self.reads - 1]

    def cancel(self) -> None:
        self.cancelled = True


class ReplayStub:
    def __init__(self, events: list[pb.Event], hold: asyncio.Event | None = None, recovered: bool = True) -> None:
        self.events, self.hold, self.recovered = events, hold, recovered
        self.calls: list[ReplayCall] = []

    def SubscribeEvents(self, request: pb.SubscribeEventsRequest, **_: Any) -> ReplayCall | SnapshotCall:  # noqa: N802
        if request.include_snapshot:  # the snapshot a connecting client's credential is checked with
            return SnapshotCall()
        call = ReplayCall([e for e in self.events if e.seq > request.since_seq], self.hold, self.recovered)
        self.calls.append(call)
        return call

    async def CheckCredential(self, request: pb.CheckCredentialRequest, **_: Any) -> pb.CheckCredentialResponse:  # noqa: N802
        return pb.CheckCredentialResponse(read=True)  # a key: valid until removed, no expiry


class SnapshotCall:
    async def read(self) -> pb.SubscribeEventsResponse:
        return pb.SubscribeEventsResponse(snapshot=snapshot(30))

    def cancel(self) -> None:
        pass


def runtime_with(stub: ReplayStub, **config: Any) -> BridgeRuntime:
    """A runtime whose buffer holds events 21..30 (it restarted at 20); the server has 1..30."""
    runtime = BridgeRuntime(BridgeConfig(**config))
    runtime._stub = stub  # type: ignore[assignment]
    runtime._synced.set()
    runtime.hub.on_snapshot(snapshot(20), reset=False)
    for seq in range(21, 31):
        runtime.hub.on_event(big_event(seq))
    return runtime


async def test_a_resume_older_than_the_buffer_is_streamed_then_joins_the_buffer() -> None:
    stub = ReplayStub([big_event(seq) for seq in range(1, 31)])
    runtime = runtime_with(stub)
    wire = Wire()
    subscriber = Subscriber(wire.fast, wire.close, max_backlog=100)
    await runtime.open_client(subscriber, snapshot(30), None, OPENING, 5, EPOCH)
    first = json.loads(wire.sent[0])
    assert (first["type"], first["recovered"], first["seq"]) == ("connection_established", True, 5)
    assert wire.seqs == list(range(6, 31))  # 6..20 from the server, 21..30 from the buffer
    assert stub.calls[0].reads == 1 + 15  # read only up to where the buffer takes over
    assert stub.calls[0].cancelled
    runtime.hub.on_event(big_event(31))
    await asyncio.sleep(0)  # the broadcast pass runs at the loop's next turn
    assert wire.seqs[-1] == 31  # then live
    assert subscriber.max_backlog_bytes == runtime.config.client_backlog_bytes


async def test_a_resume_the_server_cannot_replay_falls_back_to_the_snapshot() -> None:
    runtime = runtime_with(ReplayStub([], recovered=False))
    wire = Wire()
    subscriber = Subscriber(wire.fast, wire.close, max_backlog=100)
    await runtime.open_client(subscriber, snapshot(30), None, OPENING, 5, EPOCH)
    first = json.loads(wire.sent[0])
    assert first["recovered"] is False and "no longer buffered" in first["reason"]
    assert json.loads(wire.sent[1])["type"] == "collaboration_state"


async def test_resumes_beyond_the_concurrency_limit_wait_then_are_refused_as_unavailable() -> None:
    hold = asyncio.Event()
    stub = ReplayStub([big_event(seq) for seq in range(1, 31)], hold)
    runtime = runtime_with(stub, max_concurrent_resumes=2, rpc_timeout=0.2)
    wires = [Wire() for _ in range(3)]
    opening = [
        asyncio.create_task(
            runtime.open_client(
                Subscriber(wire.fast, wire.close, max_backlog=100), snapshot(30), None, OPENING, 5, EPOCH
            )
        )
        for wire in wires
    ]
    done, pending = await asyncio.wait(opening, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1 and len(pending) == 2  # the third waited for a turn, then gave up
    refused = next(iter(done)).exception()
    assert isinstance(refused, ServerUnavailable) and refused.retry_after == "1"
    assert "COLLAB_MAX_CONCURRENT_RESUMES" in refused.detail
    assert len(stub.calls) == 2 and runtime.resumes_refused == 1
    hold.set()
    await asyncio.wait_for(asyncio.gather(*pending), 5)
    served = [wire for wire in wires if wire.sent]
    assert len(served) == 2 and all(wire.seqs == list(range(6, 31)) for wire in served)
    # The turns were given back: a later resume is served.
    late = Wire()
    await runtime.open_client(Subscriber(late.fast, late.close, max_backlog=100), snapshot(30), None, OPENING, 5, EPOCH)
    assert late.seqs == list(range(6, 31))


async def test_a_resuming_client_that_takes_nothing_is_closed_as_too_slow() -> None:
    stub = ReplayStub([big_event(seq) for seq in range(1, 31)])
    runtime = runtime_with(stub, rpc_timeout=0.2)
    wire = Wire()  # its gate never opens
    subscriber = Subscriber(wire.slow, wire.close, max_backlog=100)
    await runtime.open_client(subscriber, snapshot(30), None, OPENING, 5, EPOCH)
    await asyncio.sleep(0)
    assert subscriber.closed and wire.closes[0][0] == CLOSE_TOO_SLOW
    assert subscriber not in runtime.hub.fanout.subscribers
    assert stub.calls[0].reads < 16  # it stopped reading the replay


async def test_an_sse_resume_refused_a_turn_is_503_with_retry_after_before_any_200() -> None:
    hold = asyncio.Event()
    stub = ReplayStub([big_event(seq) for seq in range(1, 31)], hold)
    runtime = runtime_with(stub, max_concurrent_resumes=1, rpc_timeout=0.2)
    busy = asyncio.create_task(
        runtime.open_client(
            Subscriber(Wire().fast, Wire().close, max_backlog=100), snapshot(30), None, OPENING, 5, EPOCH
        )
    )
    await asyncio.sleep(0)  # it holds the one turn, waiting on the server
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/api/v1/collaboration/events",
        "query_string": f"epoch={EPOCH}".encode(),
        "headers": [(b"last-event-id", b"5")],
    }
    await asyncio.wait_for(EventStream(runtime)(scope, receive, send), 5)
    start = sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 503
    headers = {key.decode(): value.decode() for key, value in start["headers"]}
    assert headers["retry-after"] == "1"
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["code"] == "UNAVAILABLE" and "COLLAB_MAX_CONCURRENT_RESUMES" in body["detail"]
    hold.set()
    await asyncio.wait_for(busy, 5)
