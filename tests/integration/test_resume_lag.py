"""Resumes that hold when a bridge lags (issue 19, items 3 and 5), from the outside.

- A client told to resume on another bridge (close 1012, a load balancer) carries a seq
  that bridge may not have received yet: it is a few events behind the first. The client
  must still get every event after its seq as events, never a fresh state (``reset``).
- A bulk ingest with the bridge's upstream falling behind on the way (its queue on the
  server full): the upstream keeps its place and no browser is reset or misses an event.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.faults import Browser, assert_gap_free, follow_to_the_end, kill_all, until_connected
from tests.support.processes import BridgeProcess, ServerProcess
from tests.support.rpc import Client, activity, head_seq
from tests.support.stack import BRIDGE_ENV, SERVER_ENV, Stack, wait_ready

pytestmark = pytest.mark.integration

ROUNDS = 5
BURST = 2_000  # events recorded while the second bridge is stopped, per round
PER_MESSAGE = 500  # activities per BulkRecordActivities message, as the SDK's recorder sends
# The bulk ingest: streams of a quarter of the events the server retains (10,000, the
# default), so that what is in flight when the ingest holds back stays well within them.
BULK_PER_STREAM = 2_500
BULK_BEFORE_STOP = 2 * BULK_PER_STREAM  # browsers follow a live ingest when the bridge stops
BULK_STREAMS_AFTER = 4  # after the upstream caught up: the rest of the ingest, live
BULK_MAX_ITEMS = 200_000  # the ingest's cap: far past what fills the upstream's queue
# What a tool call's arguments might be. The stopped bridge's socket buffers hold bytes:
# items of some size fill them with far fewer events than bare ones (some 40,000 of those).
BULK_METADATA = {"note": "x" * 1000}


async def bulk_record(client: Client, agent_id: str, count: int, metadata: dict[str, str] | None = None) -> None:
    """``count`` activities over one BulkRecordActivities stream, ``PER_MESSAGE`` a message."""
    messages = []
    for start in range(0, count, PER_MESSAGE):
        items = [
            activity(agent_id, pb.ACTIVITY_TYPE_MEMORY_WRITE, metadata=metadata)
            for _ in range(min(PER_MESSAGE, count - start))
        ]
        messages.append(pb.BulkRecordActivitiesRequest(activities=items))
    response = await client.stub.BulkRecordActivities(iter(messages), metadata=client.metadata, timeout=300)
    assert response.recorded == count, response


async def scrape(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of ``name`` at ``url``, by its labels."""
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(url)
    assert response.status_code == 200, response.text
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == name
    }


def stop(process: BridgeProcess) -> None:
    assert process.process is not None
    os.kill(process.process.pid, signal.SIGSTOP)


def resume(process: BridgeProcess) -> None:
    assert process.process is not None
    os.kill(process.process.pid, signal.SIGCONT)


async def test_a_client_resuming_on_a_bridge_that_is_behind_gets_every_event(tmp_path: Path) -> None:
    """Each round: the second bridge is stopped while a burst is recorded; a browser on
    the first receives all of it, moves to the second (as on close 1012) with the seq
    of the burst's last event and is there before that bridge has caught up. It waits
    for the bridge to catch up and is resumed (``recovered``); then every event follows."""
    server = ServerProcess(tmp_path / "server", env=SERVER_ENV).start()
    # A generous wait: the machine may be loaded; what is tested is that the client waits, not how long.
    bridge_env = {**BRIDGE_ENV, "COLLAB_RESUME_WAIT": "30", "COLLAB_METRICS_PUBLIC": "on"}
    first = BridgeProcess(server.target, data_dir=tmp_path / "first", env=bridge_env).start()
    second = BridgeProcess(server.target, data_dir=tmp_path / "second", env=bridge_env).start()
    client = Client.connect(server.target)
    try:
        await asyncio.to_thread(wait_ready, Stack(server, first))
        await asyncio.to_thread(wait_ready, Stack(server, second))
        await client.record("warm_up")
        for round_ in range(ROUNDS):
            on_first = Browser([first.ws], f"first{round_}")
            following = asyncio.create_task(on_first.follow())
            await until_connected([on_first])
            stop(second)
            try:
                await bulk_record(client, f"burst{round_}", BURST)
                seq = await head_seq(client)
                await follow_to_the_end([on_first], [following], seq)
                # The same browser, now on the second bridge, from where it left the first.
                moved = Browser([second.ws], f"moved{round_}")
                moved.epoch, moved.start_seq = on_first.epoch, on_first.start_seq
                moved.seqs = list(on_first.seqs)
                moving = asyncio.create_task(moved.follow())
                await asyncio.sleep(0.2)  # its connection is queued on the stopped bridge's socket
            finally:
                resume(second)
            await until_connected([moved])
            await client.record(f"after{round_}")
            last = await head_seq(client)
            await follow_to_the_end([moved], [moving], last)
            assert_gap_free([moved], last)
            assert moved.resumes == 1, moved.summary()
        waits = await scrape(second.metrics_url, "collab_bridge_resume_waits_total")
        print(f"\nresumes on a bridge behind: {ROUNDS} rounds of {BURST} events, waits by outcome {waits}")
        assert waits[(("outcome", "expired"),)] == 0, waits
        assert waits[(("outcome", "refused"),)] == 0, waits
    finally:
        await client.close()
        for bridge in (first, second):  # a stopped process cannot take SIGKILL's place in the clean-up
            if bridge.process is not None and bridge.process.poll() is None:
                resume(bridge)
        kill_all(first, second, server)


async def until(condition: Callable[[], Awaitable[bool]], what: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, f"not {what} within {within} s"
        await asyncio.sleep(0.05)


async def test_a_bulk_ingest_with_the_bridge_behind_resets_no_browser(tmp_path: Path) -> None:
    """A bulk ingest with browsers following. Once it is under way the bridge is stopped
    until the server finds its upstream's queue full (half the events retained, the
    default), and let go: the upstream keeps its place (the server reads on from the
    events it retains) and catches up, the ingest holding back meanwhile so that the test
    does not depend on how fast this machine runs the bridge; then more of the ingest
    comes, which the bridge (batched upstream) follows. Every browser gets every event,
    in order, never a fresh state; the upstream is never cut.

    How much it takes to fill the queue is the queue and what the stopped bridge's socket
    buffers hold (bytes: several MB on loopback, some 7,000 of these events), so the
    ingest runs until the queue is full rather than for a count guessed to be enough."""
    server = ServerProcess(tmp_path / "server", env=SERVER_ENV).start()
    bridge_env = {**BRIDGE_ENV, "COLLAB_METRICS_PUBLIC": "on"}
    bridge = BridgeProcess(server.target, data_dir=tmp_path / "bridge", env=bridge_env).start()
    client = Client.connect(server.target)
    browsers = [Browser([bridge.ws], f"browser{n}") for n in range(3)]
    following: list[asyncio.Task[None]] = []
    go_on = asyncio.Event()
    go_on.set()
    ingested = 0
    # Set once the upstream caught up: the ingest ends after this many more streams.
    streams_left: int | None = None

    async def ingest_holding_back() -> None:
        nonlocal ingested, streams_left
        while ingested < BULK_MAX_ITEMS and streams_left != 0:
            await go_on.wait()
            await bulk_record(client, f"bulk{ingested // BULK_PER_STREAM}", BULK_PER_STREAM, BULK_METADATA)
            ingested += BULK_PER_STREAM
            if streams_left is not None:
                streams_left -= 1

    async def behind() -> float:
        return (await scrape(server.metrics_url, "collab_stream_subscribers_behind"))[()]

    try:
        await asyncio.to_thread(wait_ready, Stack(server, bridge))
        following = [asyncio.create_task(browser.follow(within=600)) for browser in browsers]
        await until_connected(browsers)
        ingest = asyncio.create_task(ingest_holding_back())

        async def under_way() -> bool:
            return ingest.done() or await head_seq(client) >= BULK_BEFORE_STOP

        async def upstream_behind() -> bool:
            return ingest.done() or await behind() >= 1

        async def caught_up() -> bool:
            return await behind() == 0

        await until(under_way, "the ingest under way", 300)
        stop(bridge)
        try:
            await until(upstream_behind, "the upstream's queue full", 300)
            go_on.clear()
        finally:
            resume(bridge)
        assert not ingest.done(), "the ingest ended before the bridge fell behind: nothing was tested"
        await until(caught_up, "the upstream caught up", 300)
        streams_left = BULK_STREAMS_AFTER
        go_on.set()
        await ingest
        assert streams_left == 0, f"the ingest reached its cap of {BULK_MAX_ITEMS} before the bridge caught up"
        last = await head_seq(client)
        await follow_to_the_end(browsers, following, last)
        assert_gap_free(browsers, last)
        reconnects = await scrape(bridge.metrics_url, "collab_bridge_upstream_reconnects_total")
        assert reconnects[(("stream", "events"),)] == 0, reconnects  # never cut: it kept its place
        print(f"\nbulk ingest of {ingested}: {[b.summary() for b in browsers]}")
    finally:
        await client.close()
        if bridge.process is not None and bridge.process.poll() is None:
            resume(bridge)
        kill_all(bridge, server)
