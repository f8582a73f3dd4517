"""`collab-server` as a real process: what only a whole process shows (start-up, keys,
signals, health, reflection, the default rate limit, expiry, bad configuration)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.processes import ServerProcess
from tests.support.rpc import WRITE_KEY, Client, activity, bearer, binary_trailer, drain, take, trailer

pytestmark = pytest.mark.integration


def run_server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collab_grpc.server", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_generates_a_private_key_once_and_accepts_only_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with ServerProcess(data_dir) as server:
        assert server.process is not None
        key_file = data_dir / "api_key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        client = Client.connect(server.target, key)
        try:
            assert await client.record("agent_1")
            wrong = Client.connect(server.target, WRITE_KEY)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await wrong.record("agent_1")
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await wrong.close()
        finally:
            await client.close()
        assert server.stop() == 0
    restarted = ServerProcess(data_dir)
    with restarted:
        assert restarted.process is not None
        client = Client.connect(restarted.target, key)
        try:
            assert await client.record("agent_1")
        finally:
            await client.close()
    assert key_file.read_text().strip() == key


async def test_auth_off_says_so_and_accepts_anonymous_calls(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, env={"COLLAB_AUTH": "off"}) as server:
        assert any("WARNING: COLLAB_AUTH=off" in line for line in server.banner), server.banner
        client = Client.connect(server.target, None)
        try:
            assert await client.record("agent_1")
        finally:
            await client.close()
    assert not (tmp_path / "api_key").exists()


async def test_default_rate_limit_is_ten_per_second_per_agent(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, env={"COLLAB_API_KEYS": WRITE_KEY}) as server:
        client = Client.connect(server.target)
        try:
            outcomes = []
            for _ in range(15):
                try:
                    await client.record("busy_agent")
                    outcomes.append("ok")
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "rate limit of 10 records per second" in (error.details() or "")
                    assert int(trailer(error, "retry-after")) >= 1
                    # google.rpc.RetryInfo as OpenTelemetry's exporters read it: alone, and in the rich status.
                    delay = RetryInfo.FromString(binary_trailer(error, "google.rpc.retryinfo-bin")).retry_delay
                    assert 0 < delay.ToNanoseconds() <= 1_000_000_000
                    status = Status.FromString(binary_trailer(error, "grpc-status-details-bin"))
                    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
                    assert status.message == error.details()
                    unpacked = RetryInfo()
                    assert status.details[0].Unpack(unpacked) and unpacked.retry_delay == delay
                    outcomes.append("limited")
            assert outcomes[:10] == ["ok"] * 10 and "limited" in outcomes
            assert await client.record("calm_agent")  # the limit is per agent
        finally:
            await client.close()


async def test_health_and_reflection_work_without_a_token(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, env={"COLLAB_API_KEYS": WRITE_KEY}) as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "collab.v1.CollaborationService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING

    # A reflection-based client (as grpcurl is) discovers the service and calls it
    # without any generated code.
    def call_by_reflection(target: str) -> tuple[list[str], str]:
        with grpc.insecure_channel(target) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = sorted(database.get_services())
            pool = descriptor_pool.DescriptorPool(database)
            service = pool.FindServiceByName("collab.v1.CollaborationService")
            method = service.methods_by_name["RecordActivity"]
            request_class = message_factory.GetMessageClass(method.input_type)
            response_class = message_factory.GetMessageClass(method.output_type)
            # Filled from JSON, as grpcurl does: the class is only known at run time.
            fields = {"agent_id": "agent_1", "activity_type": 5}  # 5: council_debate
            request = json_format.ParseDict(fields, request_class())
            call = channel.unary_unary(
                "/collab.v1.CollaborationService/RecordActivity",
                request_serializer=lambda message: message.SerializeToString(),
                response_deserializer=response_class.FromString,
            )
            response = call(request, metadata=bearer(WRITE_KEY), timeout=10)
            return services, str(response.activity_id)

    with ServerProcess(tmp_path, env={"COLLAB_API_KEYS": WRITE_KEY}) as server:
        services, activity_id = await asyncio.to_thread(call_by_reflection, server.target)
    assert "collab.v1.CollaborationService" in services
    assert "grpc.health.v1.Health" in services
    assert activity_id.startswith("act_")


async def test_sigterm_ends_streams_with_unavailable_and_exits_cleanly(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, env={"COLLAB_API_KEYS": WRITE_KEY}).start()
    client = Client.connect(server.target)
    try:
        stream = await client.subscribe()
        status_stream = client.stub.StreamAgentStatus(pb.StreamAgentStatusRequest(), metadata=client.metadata)
        assert isinstance(await status_stream.read(), pb.StreamAgentStatusResponse)
        await client.record("agent_1")
        (event,) = await take(stream, 1)
        assert event.event.seq == 1
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        for call in (stream, status_stream):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await drain(call)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (caught.value.details() or "")
        assert await asyncio.to_thread(server.stop) == 0
    finally:
        await client.close()
        if server.process is not None and server.process.poll() is None:
            server.kill()


async def test_activities_never_completed_expire(tmp_path: Path) -> None:
    env = {"COLLAB_API_KEYS": WRITE_KEY, "COLLAB_ACTIVITY_TTL": "0.3"}
    with ServerProcess(tmp_path, env=env) as server:
        client = Client.connect(server.target)
        try:
            stream = await client.subscribe(kinds=[pb.EVENT_KIND_ACTIVITY_COMPLETED])
            activity_id = await client.record("forgetful_agent")
            (expired,) = await asyncio.wait_for(take(stream, 1), 10)
            done = expired.event.activity_completed
            assert done.activity.activity_id == activity_id and not done.success
            assert done.activity.failure_reason == "expired"
            assert done.activity.status == pb.ACTIVITY_STATUS_FAILED
        finally:
            await client.close()


async def test_roster_agents_are_known_before_they_record(tmp_path: Path) -> None:
    roster = tmp_path / "roster.json"
    roster.write_text(json.dumps([{"agent_id": "planner", "department": "research"}, {"agent_id": "coder"}]))
    with ServerProcess(tmp_path, args=["--roster", str(roster)], env={"COLLAB_API_KEYS": WRITE_KEY}) as server:
        client = Client.connect(server.target)
        try:
            reply = await client.stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=client.metadata)
            agents = {a.agent_id: (a.department, a.status) for a in reply.agent_status.agents}
            assert agents == {"coder": ("", pb.AGENT_STATE_IDLE), "planner": ("research", pb.AGENT_STATE_IDLE)}
            await client.stub.RecordActivity(activity("planner"), metadata=client.metadata)
        finally:
            await client.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate-limit", "fast"], "--rate-limit / COLLAB_RATE_LIMIT: invalid value 'fast'"),
        (["--auth", "maybe"], "expected on or off"),
        (["--history-limit", "0"], "--history-limit / COLLAB_HISTORY_LIMIT: invalid value '0': must be at least 1"),
        (["--roster", "/nonexistent/roster.json"], "No such file"),
        (["--grpc-addr", "256.1.1.1:1"], "cannot listen on 256.1.1.1:1"),
    ],
)
def test_bad_configuration_fails_at_start_with_a_clear_message(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_server("--data-dir", str(tmp_path), *args, env={"COLLAB_API_KEYS": WRITE_KEY})
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_a_sigterm_right_after_the_listening_line_stops_it_cleanly(tmp_path: Path) -> None:
    # A supervisor may stop the server the moment it announces itself: the signal handlers
    # are in place before the line is printed, so the stop is the graceful one (exit 0).
    for attempt in range(5):
        server = ServerProcess(tmp_path / str(attempt), env={"COLLAB_API_KEYS": WRITE_KEY}).start()
        assert server.stop() == 0, f"attempt {attempt}: killed by the signal instead of stopping"
