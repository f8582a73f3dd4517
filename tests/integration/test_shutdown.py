"""Graceful shutdown with real processes: SIGTERM to the bridge drains it (WebSocket
clients told to reconnect with 1012, event streams ended, REST calls in flight
finished, exit 0); SIGTERM to the server lets calls in flight finish and leaves every
acknowledged write in the store; a rolling restart of two bridges loses no client event.
(test_server_process covers the server's streams ending with UNAVAILABLE on SIGTERM.)"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bridge.app import SHUTDOWN_REASON
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.faults import (
    Agent,
    Browser,
    assert_every_write_once,
    assert_gap_free,
    follow_to_the_end,
    kill_all,
    last_seq,
    until_connected,
)
from tests.support.processes import BridgeProcess, ServerProcess
from tests.support.rpc import Client, activity
from tests.support.stack import API, AUTH, BRIDGE_ENV, SERVER_ENV, Stack, opened, start_stack, wait_ready

pytestmark = pytest.mark.integration

SERVICE_RESTART = 1012


async def _until_line(lines: AsyncIterator[str], wanted: str | None) -> None:
    """Read up to the line ``wanted``, or (None) to the end of the stream."""
    async for line in lines:
        if line == wanted:
            return
    assert wanted is None, f"the stream ended before {wanted!r}"


async def test_sigterm_to_the_bridge_drains_it(tmp_path: Path) -> None:
    """WebSocket clients get 1012 ("service restart") with a reason, an SSE stream ends,
    the bridge stops listening, and a REST call in flight (held up by a stopped server)
    is answered before the bridge exits with status 0."""
    stack = await asyncio.to_thread(start_stack, tmp_path)
    server, bridge = stack.server, stack.bridge
    assert server.process is not None and bridge.process is not None
    server_pid = server.process.pid
    try:
        await asyncio.to_thread(wait_ready, stack)
        sockets = [await connect(stack.ws_url(client_id=f"c{n}")) for n in range(5)]
        for ws in sockets:
            await opened(ws)
        async with httpx.AsyncClient(base_url=bridge.http, headers=AUTH, timeout=30) as http:
            async with http.stream("GET", f"{API}/events") as events:
                lines = events.aiter_lines()
                await asyncio.wait_for(_until_line(lines, "event: collaboration_state"), 10)
                os.kill(server_pid, signal.SIGSTOP)  # the server holds every call from now on
                in_flight = asyncio.create_task(
                    http.post(f"{API}/record-activity", json={"agent_id": "late", "activity_type": "memory_write"})
                )
                await asyncio.sleep(0.5)  # the call has reached the bridge and waits on the server
                bridge.process.send_signal(signal.SIGTERM)
                closes = []
                for ws in sockets:
                    with pytest.raises(ConnectionClosed) as closed:
                        while True:
                            await asyncio.wait_for(ws.recv(), 10)
                    closes.append(closed.value.rcvd)
                await asyncio.wait_for(_until_line(lines, None), 10)  # the stream ends
            with pytest.raises(httpx.ConnectError):
                await http.get("/healthz")
            assert not in_flight.done(), "the REST call waits on the stopped server"
            os.kill(server_pid, signal.SIGCONT)
            answered = await asyncio.wait_for(in_flight, 15)
        assert all(c is not None and (c.code, c.reason) == (SERVICE_RESTART, SHUTDOWN_REASON) for c in closes), closes
        assert answered.status_code == 200, answered.text
        assert await asyncio.to_thread(bridge.process.wait, 15) == 0
        client = Client.connect(server.target)
        try:
            got = await client.stub.GetActivity(
                pb.GetActivityRequest(activity_id=answered.json()["activity_id"]), metadata=client.metadata
            )
            assert got.activity.agent_id == "late"
        finally:
            await client.close()
        print(f"\nbridge SIGTERM: {len(closes)} WebSocket clients closed with 1012, 1 SSE stream ended, 1 REST call")
    finally:
        if server.process.poll() is None:
            os.kill(server_pid, signal.SIGCONT)
        kill_all(bridge, server)


async def test_sigterm_to_the_server_finishes_calls_in_flight_and_keeps_every_acknowledged_write(
    tmp_path: Path,
) -> None:
    """A BulkRecordActivities stream open at SIGTERM may go on sending for the shutdown
    grace, and is answered; agents writing meanwhile retry with their idempotency keys
    until the server is back. Nothing acknowledged is missing after the restart."""
    server = ServerProcess(tmp_path / "server", env={**SERVER_ENV, "COLLAB_SHUTDOWN_GRACE": "5"}).start()
    assert server.process is not None
    client = Client.connect(server.target)
    try:
        agents = [Agent(server.target, f"agent_{n}", pause=0.005) for n in range(4)]
        stop = asyncio.Event()
        writing = [asyncio.create_task(a.write_until(stop)) for a in agents]
        signalled = asyncio.Event()

        async def bulk() -> AsyncIterator[pb.BulkRecordActivitiesRequest]:
            for n in range(100):
                if n == 50:
                    await signalled.wait()  # half before SIGTERM, half after
                    await asyncio.sleep(0.3)
                yield pb.BulkRecordActivitiesRequest(activity=activity("bulk_agent", metadata=None))

        call = client.stub.BulkRecordActivities(bulk(), metadata=client.metadata, timeout=30)
        in_flight = asyncio.ensure_future(call)  # a grpc call is awaitable, not a coroutine
        await asyncio.sleep(1.0)
        server.process.send_signal(signal.SIGTERM)
        signalled.set()
        answer = await asyncio.wait_for(in_flight, 20)
        stopped_at = time.monotonic()
        assert await asyncio.to_thread(server.process.wait, 20) == 0
        assert (answer.recorded, answer.failed) == (100, 0)
        exited_in = time.monotonic() - stopped_at

        server = await asyncio.to_thread(ServerProcess(tmp_path / "server", env=SERVER_ENV).start, server.port)
        await asyncio.sleep(0.5)  # the agents' retries reach the restarted server
        stop.set()
        await asyncio.wait_for(asyncio.gather(*writing), 30)
        found = await assert_every_write_once(server.target, server.epoch, agents)
        restarted = Client.connect(server.target)
        try:
            for result in answer.results:
                got = await restarted.stub.GetActivity(
                    pb.GetActivityRequest(activity_id=result.activity_id), metadata=restarted.metadata
                )
                assert got.activity.agent_id == "bulk_agent"
        finally:
            await restarted.close()
        acknowledged = sum(len(a.acknowledged) for a in agents)
        print(
            f"\nserver SIGTERM: bulk call in flight answered with 100 of 100 recorded (50 sent after SIGTERM), "
            f"all found after restart; agents' writes acknowledged {acknowledged}, found {found}, "
            f"retried {sum(a.retries for a in agents)}; exit 0 {exited_in:.1f} s after the bulk answer"
        )
    finally:
        await client.close()
        kill_all(server)


async def test_a_rolling_restart_of_two_bridges_loses_no_client_event(tmp_path: Path) -> None:
    """Two bridges on one server, browsers spread over both, an agent writing all along.
    Bridge A is stopped (SIGTERM), its browsers move to B and resume; A comes back; then
    B likewise. Every browser has every event, in order, once."""
    server = ServerProcess(tmp_path / "server", env=SERVER_ENV).start()
    bridges = [BridgeProcess(server.target, data_dir=tmp_path / f"b{n}", env=BRIDGE_ENV).start() for n in range(2)]
    try:
        for bridge in bridges:
            await asyncio.to_thread(wait_ready, Stack(server, bridge))
        urls = [bridge.ws for bridge in bridges]
        # Half start on A, half on B; after a close each moves on to the other bridge.
        browsers = [Browser(urls if n % 2 == 0 else urls[::-1], f"browser_{n}") for n in range(16)]
        following = [asyncio.create_task(b.follow(within=90)) for b in browsers]
        await until_connected(browsers)
        agent = Agent(server.target, "steady_agent", pause=0.01)
        stop = asyncio.Event()
        writing = asyncio.create_task(agent.write_until(stop, within=90))
        await asyncio.sleep(0.5)
        for index in range(2):
            bridge = bridges[index]
            assert await asyncio.to_thread(bridge.stop) == 0
            await asyncio.sleep(0.5)  # its browsers are on the other bridge now; writes go on
            bridges[index] = await asyncio.to_thread(bridge.start, bridge.port)
            await asyncio.to_thread(wait_ready, Stack(server, bridges[index]))
            await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait_for(writing, 30)
        last = await last_seq(server.target)
        await asyncio.wait_for(follow_to_the_end(browsers, following, last), 60)

        assert_gap_free(browsers, last)
        # Every browser was on a bridge that stopped (those that started on A were on B
        # when B stopped), each time told to come back (1012), and resumed.
        assert all(b.closes.count(SERVICE_RESTART) == b.resumes >= 1 for b in browsers), [b.summary() for b in browsers]
        assert sum(b.resumes for b in browsers) >= 24
        await assert_every_write_once(server.target, server.epoch, [agent])
        print(
            f"\nrolling restart of 2 bridges: {len(browsers)} browsers, {sum(b.resumes for b in browsers)} resumes "
            f"(close 1012 each time), writes acknowledged {len(agent.acknowledged)}, events {last}, received "
            f"{sum(len(b.seqs) for b in browsers)} of {sum(last - (b.start_seq or 0) for b in browsers)} expected"
        )
    finally:
        kill_all(*bridges, server)
