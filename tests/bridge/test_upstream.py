"""The bridge's upstream against a real in-process server: it follows every event, and a
broken stream is resumed from the last seq with nothing lost or repeated."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from bridge.upstream import UPSTREAM_BATCH, Backoff, Upstream
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.conftest import HubFactory
from tests.support.rpc import WRITE_KEY, activity


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    async def poll() -> None:
        while not condition():  # noqa: ASYNC110 - the state is set by the code under test, not signalled
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), within)


async def test_a_broken_stream_resumes_from_the_last_seq(make_hub: HubFactory) -> None:
    running, client = await make_hub(status_interval=0.1)
    seen: list[int] = []
    snapshots: list[tuple[int, bool]] = []
    statuses: list[pb.StreamAgentStatusResponse] = []
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    upstream = Upstream(
        channel,
        WRITE_KEY,
        on_snapshot=lambda snapshot, reset: snapshots.append((snapshot.seq, reset)),
        on_event=lambda event: seen.append(event.seq),
        on_status=statuses.append,
    )
    upstream.start()
    try:
        await until(lambda: upstream.connected)
        for _ in range(5):
            await client.record("agent_up")
        await until(lambda: len(seen) == 5)
        # The server drops every subscription (as it does for one that falls behind);
        # events recorded meanwhile must still arrive, once each, in order.
        running.servicer.state.log.close_all("test: stream broken")
        for _ in range(5):
            await client.record("agent_up")
        await until(lambda: len(seen) == 10)
        assert seen == list(range(1, 11))
        assert snapshots == [(0, False)], "resumed, not restarted from a snapshot"
        assert upstream.connected and upstream.last_error.startswith("events stream")
        assert len(statuses) >= 1
    finally:
        await upstream.stop()
        await channel.close(None)


async def test_a_burst_arrives_in_batches_every_event_once_in_order(make_hub: HubFactory) -> None:
    """A bulk ingest reaches the upstream as EventBatches (it asks for them): every event
    is handed on, once, in order, and the server sent fewer messages than events."""
    running, client = await make_hub()
    seen: list[int] = []
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    upstream = Upstream(
        channel,
        WRITE_KEY,
        on_snapshot=lambda snapshot, reset: None,
        on_event=lambda event: seen.append(event.seq),
        on_status=lambda update: None,
    )
    sent: list[str] = []
    real_messages = running.servicer._event_messages

    def counted(events: list[Any], max_batch: int) -> Iterator[pb.SubscribeEventsResponse]:
        for message in real_messages(events, max_batch):
            sent.append(message.WhichOneof("message") or "")
            yield message

    running.servicer._event_messages = counted  # type: ignore[method-assign]
    upstream.start()
    try:
        await until(lambda: upstream.events_connected)
        items = [activity("agent_bulk", pb.ACTIVITY_TYPE_MEMORY_WRITE) for _ in range(UPSTREAM_BATCH + 100)]
        request = pb.BulkRecordActivitiesRequest(activities=items)
        reply = await client.stub.BulkRecordActivities(iter([request]), metadata=client.metadata)
        assert reply.recorded == len(items)
        await until(lambda: len(seen) == len(items))
        assert seen == list(range(1, len(items) + 1))
        assert "events" in sent and len(sent) < len(items)
    finally:
        await upstream.stop()
        await channel.close(None)


async def test_an_unreachable_server_is_retried_with_backoff() -> None:
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    upstream = Upstream(channel, WRITE_KEY, on_snapshot=print, on_event=print, on_status=print)
    upstream.start()
    try:
        await until(lambda: "UNAVAILABLE" in upstream.last_error)
        assert not upstream.connected
    finally:
        await upstream.stop()
        await channel.close(None)


def test_backoff_grows_to_its_cap_and_resets() -> None:
    backoff = Backoff(initial=0.1, maximum=0.4)
    delays = [backoff.delay() for _ in range(6)]
    assert all(0.05 <= delay <= 0.4 for delay in delays)
    assert backoff._next == 0.4
    backoff.reset()
    assert backoff.delay() <= 0.1
