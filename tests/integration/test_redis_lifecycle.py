"""Agents have a lifecycle on the Redis store, with real processes: two replicas share
one retirement (one event, seen by the subscribers of both), Redis keeps only the live
agents, and a replica that starts over many historic agents reads back only the live ones.

Redis at 127.0.0.1:6379 is the machine's; without it these tests skip, unless
COLLAB_REQUIRE_REDIS=1 (as in CI), where they fail."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.processes import ServerProcess
from tests.support.rpc import Client
from tests.support.services import SHARED_REDIS, redis_store_url
from tests.support.stack import SERVER_ENV

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_store() -> Iterator[str]:
    with redis_store_url() as url:
        yield url


def redis_keys(store: str) -> tuple[Any, str]:
    """A client of the shared Redis (its replies read as bytes) and the store's prefix."""
    prefix = store.split("prefix=", 1)[1]
    return redis.Redis.from_url(SHARED_REDIS), prefix


def retirements_in_log(store: str) -> list[str]:
    client, prefix = redis_keys(store)
    agents = []
    for _, fields in client.xrange(f"{prefix}:events"):
        body = json.loads(fields[b"e"])
        if body["kind"] == "agent_retired":
            agents.append(body["payload"]["agent_id"])
    return agents


async def status(client: Client) -> pb.AgentStatusSummary:
    answer = await client.stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=client.metadata)
    return answer.agent_status


async def test_two_replicas_share_one_retirement_and_redis_keeps_only_live_agents(
    tmp_path: Path, redis_store: str
) -> None:
    env = {**SERVER_ENV, "COLLAB_STORE": redis_store, "COLLAB_AGENT_IDLE_TTL": "1"}
    servers = [ServerProcess(tmp_path / f"server{n}", env=env).start() for n in range(2)]
    clients = [Client.connect(s.target) for s in servers]
    try:
        streams = [
            c.stub.SubscribeEvents(pb.SubscribeEventsRequest(include_snapshot=True), metadata=c.metadata)
            for c in clients
        ]
        for stream in streams:
            first = await asyncio.wait_for(stream.read(), 10)
            assert isinstance(first, pb.SubscribeEventsResponse) and first.HasField("snapshot")
        await clients[0].stub.StartCollaboration(
            pb.StartCollaborationRequest(participants=["member"]), metadata=clients[0].metadata
        )
        activity_id = await clients[0].record("replica_agent")
        await clients[1].stub.CompleteActivity(
            pb.CompleteActivityRequest(activity_id=activity_id, success=True), metadata=clients[1].metadata
        )
        # Each replica's subscribers see the retirement, in the one seq order.
        seqs = []
        for stream in streams:
            while True:
                message = await asyncio.wait_for(stream.read(), 30)
                assert isinstance(message, pb.SubscribeEventsResponse)
                if message.event.WhichOneof("payload") == "agent_retired":
                    assert message.event.agent_retired.agent_id == "replica_agent"
                    assert message.event.agent_retired.last_activity_id == activity_id
                    seqs.append(message.event.seq)
                    break
            stream.cancel()
        assert seqs[0] == seqs[1]
        for client in clients:
            assert [a.agent_id for a in (await status(client)).agents] == ["member"]
        assert retirements_in_log(redis_store) == ["replica_agent"]  # decided once, not once per replica
        keys, prefix = redis_keys(redis_store)
        assert set(keys.hkeys(f"{prefix}:agent")) == {b"member"}
        assert set(keys.zrange(f"{prefix}:agent_seen", 0, -1)) == {b"member"}
        # Its history stays readable on both.
        for client in clients:
            got = await client.stub.GetActivity(
                pb.GetActivityRequest(activity_id=activity_id), metadata=client.metadata
            )
            assert got.activity.agent_id == "replica_agent"
    finally:
        for client in clients:
            await client.close()
        for server in servers:
            assert server.stop() == 0


async def test_a_replica_starting_over_many_historic_agents_reads_back_only_the_live_ones(
    tmp_path: Path, redis_store: str
) -> None:
    historic = 2_000
    first_env = {**SERVER_ENV, "COLLAB_STORE": redis_store, "COLLAB_ACTIVITY_TTL": "1"}
    with ServerProcess(tmp_path / "first", env=first_env) as server:
        client = Client.connect(server.target)
        try:
            requests = [
                pb.BulkRecordActivitiesRequest(
                    activities=[
                        pb.RecordActivityRequest(agent_id=f"sub_{n}", activity_type=pb.ACTIVITY_TYPE_TASK_ASSIGNED)
                        for n in range(start, start + 500)
                    ]
                )
                for start in range(0, historic, 500)
            ]
            answer = await client.stub.BulkRecordActivities(iter(requests), metadata=client.metadata, timeout=120)
            assert answer.recorded == historic
            await client.stub.StartCollaboration(
                pb.StartCollaborationRequest(participants=["lead"]), metadata=client.metadata
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while (current := await status(client)).active_agents:  # until every activity expired
                assert loop.time() < deadline, current.active_agents
                await asyncio.sleep(0.1)
            assert current.total_agents == historic + 1  # idle, within the default hour
        finally:
            await client.close()
        assert server.stop() == 0
    await asyncio.sleep(1.5)  # longer than the next replica's TTL since any of them was seen

    second_env = {**first_env, "COLLAB_AGENT_IDLE_TTL": "1"}
    with ServerProcess(tmp_path / "second", env=second_env) as server:
        client = Client.connect(server.target)
        try:
            assert [a.agent_id for a in (await status(client)).agents] == ["lead"]
        finally:
            await client.close()
        assert server.stop() == 0
    # The entries of the agents that went idle while no replica ran are gone.
    keys, prefix = redis_keys(redis_store)
    assert set(keys.hkeys(f"{prefix}:agent")) == {b"lead"}
    assert keys.zcard(f"{prefix}:agent_seen") == 1
