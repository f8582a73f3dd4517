"""StreamAgentStatus: one build and one serialisation of the status shared by every
stream, and a floor on the interval a read-only credential may ask for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import jwt
import pytest
import pytest_asyncio

from collab_grpc.config import parse_server_config
from collab_grpc.servicer import CollaborationServicer, SharedStatus
from collab_grpc.state import CollaborationState
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc
from tests.conftest import HubFactory
from tests.support.rpc import JWT_SECRET, READ_KEY, Client


def status_request(milliseconds: int | None = None) -> pb.StreamAgentStatusRequest:
    request = pb.StreamAgentStatusRequest()
    if milliseconds is not None:
        request.interval.FromMilliseconds(milliseconds)
    return request


# -- the shared status, driven with explicit clocks -----------------------------------------


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def __call__(self) -> int:
        return self.value


def test_the_status_is_built_once_per_change_and_at_most_once_per_min_age() -> None:
    version = Counter()
    now = [0.0]  # the monotonic clock: it moves only when told to
    wall = [1_764_000_000.0]
    built: list[int] = []

    def build() -> pb.AgentStatusSummary:
        built.append(version.value)
        return pb.AgentStatusSummary(total_agents=version.value)

    shared = SharedStatus(build, version, lambda: wall[0], min_age=0.1, monotonic=lambda: now[0])

    def read() -> pb.StreamAgentStatusResponse:
        return pb.StreamAgentStatusResponse.FromString(shared.response())

    first = read()
    assert (shared.builds, first.agent_status.total_agents) == (1, 0)
    # Nothing changed: however many streams ask and however much later, no new build;
    # the time says the status is true now.
    for _ in range(10):
        now[0] += 1.0
        wall[0] += 1.0
        assert read().agent_status.total_agents == 0
    assert shared.builds == 1
    assert read().time.ToSeconds() == int(wall[0])

    # Changed, and the last build is old enough: one build, shared by every later reader.
    version.value = 1
    responses = [read() for _ in range(4)]
    assert shared.builds == 2
    assert {r.agent_status.total_agents for r in responses} == {1}
    taken_at = wall[0]

    # Changed again within min_age of that build: the same status (with the time it was
    # taken), until min_age has passed.
    version.value = 2
    now[0] += 0.05
    wall[0] += 0.05
    stale = read()
    assert (shared.builds, stale.agent_status.total_agents) == (2, 1)
    assert stale.time.ToNanoseconds() == round(taken_at * 1e9)
    now[0] += 0.05
    assert read().agent_status.total_agents == 2
    assert shared.builds == 3
    assert built == [0, 1, 2]


def test_a_slow_build_is_followed_by_a_longer_gap() -> None:
    """Building may take at most loop_share of the time: a build of 0.5 s is not followed
    by another for 5 s, whatever changes."""
    version = Counter()
    now = [0.0]

    def build() -> pb.AgentStatusSummary:
        now[0] += 0.5  # the build takes half a second of the loop
        return pb.AgentStatusSummary(total_agents=version.value)

    shared = SharedStatus(
        build, version, lambda: 1_764_000_000.0, min_age=0.1, loop_share=0.1, monotonic=lambda: now[0]
    )
    shared.response()
    version.value = 1
    now[0] += 4.4  # 4.9 s after the build began
    assert pb.StreamAgentStatusResponse.FromString(shared.response()).agent_status.total_agents == 0
    now[0] += 0.1
    assert pb.StreamAgentStatusResponse.FromString(shared.response()).agent_status.total_agents == 1
    assert shared.builds == 2


# -- streams on a real server ------------------------------------------------------------------


async def read_until(
    stream: grpc.aio.UnaryStreamCall[Any, pb.StreamAgentStatusResponse], agent_id: str
) -> pb.StreamAgentStatusResponse:
    while True:
        update = await asyncio.wait_for(stream.read(), 20)
        assert isinstance(update, pb.StreamAgentStatusResponse)
        if any(a.agent_id == agent_id for a in update.agent_status.agents):
            return update


async def test_several_streams_share_one_build_per_change(make_hub: HubFactory) -> None:
    running, client = await make_hub()
    status = running.servicer.status
    streams = [client.stub.StreamAgentStatus(status_request(200), metadata=client.metadata) for _ in range(4)]
    try:
        for _ in range(3):  # three ticks of every stream, nothing changing
            for stream in streams:
                update = await asyncio.wait_for(stream.read(), 20)
                assert isinstance(update, pb.StreamAgentStatusResponse)
                assert update.agent_status.total_agents == 0
        assert status.builds == 1

        await client.record("status_agent")
        updates = [await read_until(stream, "status_agent") for stream in streams]
        assert status.builds == 2  # one build for the change, for all four streams
        assert len({u.agent_status.SerializeToString() for u in updates}) == 1
    finally:
        for stream in streams:
            stream.cancel()


async def test_get_agent_status_is_never_stale(make_hub: HubFactory) -> None:
    """The unary read builds its own answer: a write is seen at once."""
    _, client = await make_hub()
    stream = client.stub.StreamAgentStatus(status_request(200), metadata=client.metadata)
    await stream.read()
    await client.record("seen_at_once")
    answer = await client.stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=client.metadata)
    assert [a.agent_id for a in answer.agent_status.agents] == ["seen_at_once"]
    stream.cancel()


@pytest.mark.parametrize("token", [READ_KEY, jwt.encode({"scope": "read"}, JWT_SECRET, algorithm="HS256")])
async def test_a_read_credential_may_not_ask_for_less_than_the_read_floor(make_hub: HubFactory, token: str) -> None:
    running, _ = await make_hub()
    reader = Client.connect(f"127.0.0.1:{running.port}", token=token)
    try:
        for milliseconds in (100, 999):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await reader.stub.StreamAgentStatus(status_request(milliseconds), metadata=reader.metadata).read()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = refused.value.details() or ""
            assert "interval must be between 1 s and 3600 s for a read-only credential" in details, details
            assert "a read+write one may ask for 0.1 s" in details and f"got {milliseconds / 1000:g} s" in details
        for request in (status_request(1000), status_request()):  # the floor, and the server's interval
            stream = reader.stub.StreamAgentStatus(request, metadata=reader.metadata)
            assert isinstance(await stream.read(), pb.StreamAgentStatusResponse)
            stream.cancel()
    finally:
        await reader.close()


async def test_the_read_floor_is_a_setting_and_write_credentials_keep_100_ms(make_hub: HubFactory) -> None:
    running, writer = await make_hub(status_read_min_interval=0.5)
    stream = writer.stub.StreamAgentStatus(status_request(100), metadata=writer.metadata)
    assert isinstance(await stream.read(), pb.StreamAgentStatusResponse)
    stream.cancel()
    reader = Client.connect(f"127.0.0.1:{running.port}", token=READ_KEY)
    try:
        stream = reader.stub.StreamAgentStatus(status_request(500), metadata=reader.metadata)
        assert isinstance(await stream.read(), pb.StreamAgentStatusResponse)
        stream.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await reader.stub.StreamAgentStatus(status_request(400), metadata=reader.metadata).read()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "between 0.5 s and 3600 s for a read-only credential" in (refused.value.details() or "")
    finally:
        await reader.close()


async def test_auth_off_allows_100_ms(make_hub: HubFactory) -> None:
    running, _ = await make_hub(auth=False)
    anyone = Client.connect(f"127.0.0.1:{running.port}", token=None)
    try:
        stream = anyone.stub.StreamAgentStatus(status_request(100), metadata=anyone.metadata)
        assert isinstance(await stream.read(), pb.StreamAgentStatusResponse)
        stream.cancel()
    finally:
        await anyone.close()


@pytest_asyncio.fixture
async def bare_server() -> AsyncIterator[Client]:
    """The servicer without the interceptor: no pass-through serializer, no credential."""
    server = grpc.aio.server()
    state = CollaborationState()
    state.record_activity(agent_id="bare_agent", activity_type="agent_started")
    pb_grpc.add_CollaborationServiceServicer_to_server(CollaborationServicer(state), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = Client.connect(f"127.0.0.1:{port}", token=None)
    yield client
    await client.close()
    await server.stop(0)


async def test_a_bare_servicer_sends_messages_and_counts_callers_as_read_only(bare_server: Client) -> None:
    stream = bare_server.stub.StreamAgentStatus(status_request(), metadata=())
    update = await stream.read()
    assert isinstance(update, pb.StreamAgentStatusResponse)
    assert [a.agent_id for a in update.agent_status.agents] == ["bare_agent"]
    stream.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await bare_server.stub.StreamAgentStatus(status_request(100)).read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_read_floor_setting_is_checked() -> None:
    assert parse_server_config([], env={}).status_read_min_interval == 1.0
    assert parse_server_config([], env={"COLLAB_STATUS_READ_MIN_INTERVAL": "5"}).status_read_min_interval == 5.0
    assert parse_server_config(["--status-read-min-interval", "0.1"], env={}).status_read_min_interval == 0.1
    for bad in ("0.05", "4000", "nan"):
        with pytest.raises(SystemExit):
            parse_server_config(["--status-read-min-interval", bad], env={})
