"""Scale-out on Redis with real processes: two servers and two bridges share one state
and one seq order; a replica can die; Redis can go away and come back.

Redis at 127.0.0.1:6379 is the machine's; tests that stop Redis run their own
`redis-server` on a free port. Without Redis these tests skip, unless
COLLAB_REQUIRE_REDIS=1 (as in CI), where they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from websockets.asyncio.client import connect

from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.processes import BridgeProcess, ServerProcess
from tests.support.rpc import Client
from tests.support.services import OwnRedis, free_port, redis_store_url, require_redis
from tests.support.stack import API, AUTH, BRIDGE_ENV, SERVER_ENV, Stack, opened, recv, wait_ready

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_store() -> Iterator[str]:
    """A COLLAB_STORE value on the shared Redis with keys of this test's own."""
    with redis_store_url() as url:
        yield url


async def test_two_servers_and_two_bridges_share_one_history(tmp_path: Path, redis_store: str) -> None:
    env = {**SERVER_ENV, "COLLAB_STORE": redis_store}
    servers = [ServerProcess(tmp_path / f"server{n}", env=env).start() for n in range(2)]
    bridges = [
        BridgeProcess(s.target, data_dir=tmp_path / f"bridge{n}", env=BRIDGE_ENV).start() for n, s in enumerate(servers)
    ]
    stacks = [Stack(s, b) for s, b in zip(servers, bridges, strict=True)]
    try:
        assert servers[0].epoch == servers[1].epoch
        for stack in stacks:
            await asyncio.to_thread(wait_ready, stack)
        clients = [Client.connect(s.target) for s in servers]
        async with (
            connect(stacks[0].ws_url(client_id="left")) as left,
            connect(stacks[1].ws_url(client_id="right")) as right,
        ):
            for ws in (left, right):
                await opened(ws)
                await ws.send(
                    json.dumps({"type": "subscribe", "activity_types": ["agent_activity", "activity_completed"]})
                )
            # Recorded through replica A, completed through replica B, and the reverse,
            # with writes through both at the same time.
            recorded = await asyncio.gather(*(clients[n % 2].record(f"agent_{n % 3}") for n in range(30)))
            for n, activity_id in enumerate(recorded[:10]):
                await clients[(n + 1) % 2].stub.CompleteActivity(
                    pb.CompleteActivityRequest(activity_id=activity_id, success=True), metadata=clients[0].metadata
                )
            feeds = [
                await c.stub.GetActivityFeed(pb.GetActivityFeedRequest(limit=500), metadata=c.metadata) for c in clients
            ]
            assert feeds[0] == feeds[1] and feeds[0].total == 30
            statuses = [await c.stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=c.metadata) for c in clients]
            assert statuses[0] == statuses[1] and statuses[0].agent_status.active_activities == 20

            async def events(ws: Any) -> list[tuple[int, str]]:
                seen: list[tuple[int, str]] = []
                while len(seen) < 40:
                    message = await recv(ws, 20)
                    if "seq" in message:
                        seen.append((message["seq"], message["type"]))
                return seen

            left_seen, right_seen = await asyncio.gather(events(left), events(right))
            assert left_seen == right_seen, "both bridges see the same events in the same order"
            assert [seq for seq, _ in left_seen] == list(range(1, 41)), "no gaps, no duplicates"

        # One replica dies; the other keeps serving and still has everything.
        servers[0].kill()
        survivor = clients[1]
        assert await survivor.record("agent_after")
        feed = await survivor.stub.GetActivityFeed(pb.GetActivityFeedRequest(limit=500), metadata=survivor.metadata)
        assert feed.total == 31
        async with httpx.AsyncClient(base_url=bridges[1].http, headers=AUTH, timeout=10) as http:
            assert (await http.get(f"{API}/agent-status")).json()["active_activities"] == 21
        for client in clients:
            await client.close()
    finally:
        for process in [*bridges, *servers]:
            if process.process is not None and process.process.poll() is None:
                process.kill()


async def test_redis_going_away_fails_calls_clearly_and_recovers_losing_nothing(tmp_path: Path) -> None:
    require_redis()  # the machine has Redis, so redis-server is installed
    own = OwnRedis(tmp_path / "redis", persist=True)
    own.start()
    server = ServerProcess(tmp_path / "server", env={**SERVER_ENV, "COLLAB_STORE": own.url}).start()
    client = Client.connect(server.target)
    acknowledged: list[str] = []
    refused: list[grpc.StatusCode] = []
    try:

        async def write_for(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            n = 0
            while time.monotonic() < deadline:
                n += 1
                try:
                    acknowledged.append(await client.record(f"agent_{n % 4}"))
                except grpc.aio.AioRpcError as error:
                    refused.append(error.code())
                    assert "redis" in (error.details() or "").lower(), error.details()
                    await asyncio.sleep(0.05)

        writing = asyncio.create_task(write_for(4.0))
        await asyncio.sleep(1.0)
        own.stop()
        await asyncio.sleep(1.0)
        with pytest.raises(grpc.aio.AioRpcError) as down:
            await client.stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=client.metadata)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.to_thread(own.start)
        await writing
        assert refused and set(refused) == {grpc.StatusCode.UNAVAILABLE}
        # Recovered by itself: writes and reads work again, and nothing acknowledged is lost.
        assert await client.record("agent_back")
        feed = await client.stub.GetActivityFeed(pb.GetActivityFeedRequest(limit=500), metadata=client.metadata)
        present = {a.activity_id for a in feed.activities}
        assert set(acknowledged[-450:]) <= present
        for activity_id in acknowledged:
            got = await client.stub.GetActivity(
                pb.GetActivityRequest(activity_id=activity_id), metadata=client.metadata
            )
            assert got.activity.activity_id == activity_id
    finally:
        await client.close()
        server.kill()
        own.stop()


def test_a_server_without_its_redis_refuses_to_start_clearly(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run(
        [
            sys.executable, "-m", "collab_grpc.server", "--grpc-addr", "127.0.0.1:0", "--data-dir", str(tmp_path),
            "--store", f"redis://127.0.0.1:{port}/0",
        ],
        env={**os.environ, **SERVER_ENV},
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Redis store is unavailable" in result.stderr and f"127.0.0.1:{port}" in result.stderr, result.stderr
