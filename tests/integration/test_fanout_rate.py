"""The fan-out at a high rate with coalescing on (the default): events recorded back to
back over a gRPC bulk stream reach the bridge faster than one broadcast pass per event
could serve them, so passes carry several events and each client gets its share in one
write. Every client still gets what it subscribed to, in order, once; SSE clients too;
clients that drop mid-burst resume without a gap; a client that stops reading is cut off
with 4008 while the others get everything. No timings are asserted (figures: bench/)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.faults import Browser, assert_gap_free, follow_to_the_end, until_connected
from tests.support.rpc import WRITE_KEY, Client, head_seq
from tests.support.stack import API, AUTH, Stack, is_event, opened, recv, recv_until, running_stack
from tests.support.stalled import StalledClient

pytestmark = pytest.mark.integration

EVENTS = 3000
KINDS = (pb.ACTIVITY_TYPE_MEMORY_WRITE, pb.ACTIVITY_TYPE_TASK_ASSIGNED)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A backlog that a busy test machine's reading clients stay within; the stalled one
    # below overflows it whatever its size.
    with running_stack(tmp_path_factory.mktemp("rate"), bridge_env={"COLLAB_CLIENT_BACKLOG": "5000"}) as running:
        yield running


async def bulk_record(target: str, count: int, blob: str = "") -> int:
    """``count`` activities over one bulk stream, alternating two types and ending with
    a memory_write; the newest seq after."""
    client = Client.connect(target)
    try:
        requests = []
        for n in range(count):
            kind = KINDS[(count - 1 - n) % 2]
            request = pb.RecordActivityRequest(agent_id=f"agent_{n % 16}", department="engineering", activity_type=kind)
            if blob:
                request.metadata.update({"blob": blob})
            requests.append(pb.BulkRecordActivitiesRequest(activity=request))
        await client.stub.BulkRecordActivities(iter(requests), metadata=client.metadata, timeout=120)
        return await head_seq(client)
    finally:
        await client.close()


async def subscribed(ws: ClientConnection, names: list[str]) -> None:
    await opened(ws)
    await ws.send(json.dumps({"type": "subscribe", "activity_types": names}))
    await recv_until(ws, is_event("subscribed"))


async def read_until(ws: ClientConnection, last: int, into: list[dict[str, Any]]) -> None:
    """Every message with a seq, up to ``last``."""
    while not into or into[-1]["seq"] < last:
        message = await recv(ws, 60)
        if "seq" in message:
            into.append(message)


async def read_event_stream(http: httpx.AsyncClient, query: str, into: list[int]) -> None:
    """The `id:` of every event of an SSE stream, until cancelled."""
    async with http.stream("GET", f"{API}/events{query}", timeout=60) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                into.append(int(line[4:]))


async def reached(into: list[int], seq: int, within: float = 60.0) -> None:
    async with asyncio.timeout(within):
        while not into or into[-1] < seq:  # noqa: ASYNC110 - a list filled by a reader task
            await asyncio.sleep(0.05)


async def test_every_client_gets_its_events_in_order_at_a_high_rate(stack: Stack) -> None:
    browsers = [Browser([stack.bridge.ws], f"rate_{n}") for n in range(12)]
    tasks = [asyncio.create_task(browser.follow(within=180)) for browser in browsers]
    await until_connected(browsers)
    sse_all: list[int] = []
    sse_tasks: list[int] = []
    async with (
        httpx.AsyncClient(base_url=stack.bridge.http, headers=AUTH) as http,
        connect(stack.ws_url(client_id="everything"), max_size=None, max_queue=None) as everything,
        connect(stack.ws_url(client_id="writes"), max_size=None, max_queue=None) as writes,
    ):
        await subscribed(everything, [])
        await subscribed(writes, ["memory_write"])
        readers = [
            asyncio.create_task(read_event_stream(http, "", sse_all)),
            asyncio.create_task(read_event_stream(http, "?types=task_assigned", sse_tasks)),
        ]
        await asyncio.sleep(0.5)  # the event streams are open
        recording = asyncio.create_task(bulk_record(stack.server.target, EVENTS))
        for browser in browsers[:4]:  # some drop mid-burst and resume
            await until_connected([browser])
            await browser.drop()
        last = await recording
        everything_got: list[dict[str, Any]] = []
        writes_got: list[dict[str, Any]] = []
        await read_until(everything, last, everything_got)
        await read_until(writes, last, writes_got)
        last_task = max(
            m["seq"] for m in everything_got if m.get("activity", {}).get("activity_type") == "task_assigned"
        )
        await reached(sse_all, last)
        await reached(sse_tasks, last_task)
        for reader in readers:
            reader.cancel()
    await follow_to_the_end(browsers, tasks, last)

    assert_gap_free(browsers, last)
    assert all(browser.resumes >= 1 for browser in browsers[:4])
    seqs = [message["seq"] for message in everything_got]
    assert seqs == sorted(set(seqs)) and seqs[-1] == last
    activities = [m for m in everything_got if m["type"] == "agent_activity"]
    assert len(activities) >= EVENTS
    expected_writes = [m["seq"] for m in activities if m["activity"]["activity_type"] == "memory_write"]
    expected_tasks = [m["seq"] for m in activities if m["activity"]["activity_type"] == "task_assigned"]
    assert [m["seq"] for m in writes_got] == expected_writes
    assert {m["type"] for m in writes_got} == {"agent_activity"}
    # The event streams opened before the burst: they have every event of it, in order, once.
    assert sse_all == sorted(set(sse_all)) and set(seqs) <= set(sse_all)
    assert sse_tasks == sorted(set(sse_tasks)) and set(expected_tasks) <= set(sse_tasks)
    assert not set(sse_tasks) & set(expected_writes)


async def test_a_stalled_client_is_cut_off_at_a_high_rate_while_the_others_get_everything(stack: Stack) -> None:
    count = 800  # 30 KB each, ~24 MB: far beyond the stalled socket's buffers plus its 4 MB backlog
    stalled = StalledClient(stack.ws_url(client_id="stalled"), stack.bridge.port)
    try:
        browsers = [Browser([stack.bridge.ws], f"beside_stalled_{n}", token=WRITE_KEY) for n in range(4)]
        tasks = [asyncio.create_task(browser.follow(within=180)) for browser in browsers]
        await until_connected(browsers)
        last = await bulk_record(stack.server.target, count, blob="x" * 30_000)
        await follow_to_the_end(browsers, tasks, last)
        assert_gap_free(browsers, last)
        texts, close = await asyncio.to_thread(stalled.read_until_closed)
        assert close.code == 4008 and "too slow" in close.reason, close
        assert texts < count, "the stalled client was cut off, not sent everything"
        since = int(close.reason.rsplit("since=", 1)[1])
        assert since < last
    finally:
        stalled.close()
