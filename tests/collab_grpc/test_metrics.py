"""The server's metrics and request ids, in process: the metrics-address setting, the
event log's recorded-events hook, the observing interceptor (counts, request ids in log
lines, slow calls), and the metrics port."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import AsyncIterator, Iterator

import grpc
import httpx
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from collab_grpc.config import DEFAULT_METRICS_ADDR, parse_server_config
from collab_grpc.events import EventLog
from collab_grpc.interceptors import CallInterceptor
from collab_grpc.logs import RequestIdFilter
from collab_grpc.metrics import MetricsEndpoint, serve_metrics
from collab_grpc.model import ActivityType, EventKind, MemoryOperation, MemoryUpdate
from collab_grpc.servicer import CollaborationServicer
from collab_grpc.state import CollaborationState
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc
from tests.conftest import HubFactory
from tests.support.rpc import WRITE_KEY, Client, activity, bearer

HEX_ID = re.compile(r"[0-9a-f]{32}")


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- the setting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("off", "off"), ("OFF", "off"), ("0.0.0.0:9100", "0.0.0.0:9100"), ("[::1]:0", "[::1]:0"), ("localhost:1", None)],
)
def test_metrics_addr_is_host_port_or_off(value: str, parsed: str | None) -> None:
    assert parse_server_config(["--metrics-addr", value], {}).metrics_addr == (parsed or value)
    assert parse_server_config([], {"COLLAB_METRICS_ADDR": value}).metrics_addr == (parsed or value)


def test_metrics_addr_defaults_to_the_loopback_port_tried_leniently() -> None:
    assert parse_server_config([], {}).metrics_addr is None  # None: DEFAULT_METRICS_ADDR, lenient
    assert DEFAULT_METRICS_ADDR == "127.0.0.1:9464"


@pytest.mark.parametrize("value", ["9464", ":9464", "host:", "host:port", "host:65536", "[]:80"])
def test_a_bad_metrics_addr_is_refused_with_a_clear_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_server_config(["--metrics-addr", value], {})
    assert "--metrics-addr / COLLAB_METRICS_ADDR: invalid value" in capsys.readouterr().err


# -- the event log's hook ---------------------------------------------------------------------


def test_on_recorded_hears_durable_events_of_this_log_only() -> None:
    update = MemoryUpdate(MemoryOperation.WRITE, "item", "agent", 1.0, {})
    heard: list[int] = []
    immediate = EventLog("e1")
    immediate.on_recorded = lambda event: heard.append(event.seq)
    immediate.append(EventKind.MEMORY_UPDATED, update, 1.0)
    assert heard == [1]

    heard.clear()
    stored = EventLog("e2")
    stored.sink = lambda event: None
    stored.on_recorded = lambda event: heard.append(event.seq)
    stored.append(EventKind.MEMORY_UPDATED, update, 1.0)
    stored.append(EventKind.MEMORY_UPDATED, update, 1.0)
    assert heard == []  # not durable yet
    stored.publish_through(1)
    assert heard == [1]
    stored.publish_through(2)
    assert heard == [1, 2]

    heard.clear()
    replica = EventLog("e3")
    replica.on_recorded = lambda event: heard.append(event.seq)
    other = EventLog("e3")
    replica.adopt(other.append(EventKind.MEMORY_UPDATED, update, 1.0))
    assert heard == [] and replica.published_seq == 1  # published here, counted by its own replica


# -- the interceptor, on a hub in this process ------------------------------------------------


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Log records as the server's handler sees them: with their request id."""
    request_ids = RequestIdFilter()
    caplog.handler.addFilter(request_ids)
    caplog.set_level(logging.DEBUG, logger="collab_grpc")
    yield caplog
    caplog.handler.removeFilter(request_ids)


def rpc_records(caplog: pytest.LogCaptureFixture, method: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "collab_grpc.rpc" and getattr(r, "rpc", None) == method]


async def test_calls_are_counted_by_method_and_code_and_failures_logged_with_the_request_id(
    make_hub: HubFactory, captured: pytest.LogCaptureFixture
) -> None:
    _, client = await make_hub(rate_limit=1)
    ok = sample("collab_rpcs_total", method="RecordActivity", code="OK")
    limited = sample("collab_rpcs_total", method="RecordActivity", code="RESOURCE_EXHAUSTED")
    rejections = sample("collab_rate_limited_total")
    not_found = sample("collab_rpcs_total", method="GetActivity", code="NOT_FOUND")
    refused = sample("collab_rpcs_total", method="GetAgentStatus", code="UNAUTHENTICATED")
    timed = sample("collab_rpc_duration_seconds_count", method="RecordActivity")
    recorded = sample("collab_events_recorded_total", kind="activity_recorded", activity_type="memory_write")

    await client.record("limited_agent")
    with pytest.raises(grpc.aio.AioRpcError) as over:
        await client.record("limited_agent")
    assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError):
        await client.stub.GetActivity(
            pb.GetActivityRequest(activity_id="act_none"),
            metadata=(*client.metadata, ("x-request-id", "caller-id-1")),
        )
    with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
        await client.stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=(("x-request-id", "bad id"),))
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED

    assert sample("collab_rpcs_total", method="RecordActivity", code="OK") - ok == 1
    assert sample("collab_rpcs_total", method="RecordActivity", code="RESOURCE_EXHAUSTED") - limited == 1
    assert sample("collab_rate_limited_total") - rejections == 1
    assert sample("collab_rpcs_total", method="GetActivity", code="NOT_FOUND") - not_found == 1
    assert sample("collab_rpcs_total", method="GetAgentStatus", code="UNAUTHENTICATED") - refused == 1
    assert sample("collab_rpc_duration_seconds_count", method="RecordActivity") - timed == 2
    recorded_now = sample("collab_events_recorded_total", kind="activity_recorded", activity_type="memory_write")
    assert recorded_now - recorded == 1
    assert sample("collab_rpcs_in_flight", method="GetActivity") == 0

    (missing,) = map(vars, rpc_records(captured, "GetActivity"))
    assert (missing["levelno"], missing["request_id"], missing["code"]) == (logging.INFO, "caller-id-1", "NOT_FOUND")
    assert missing["details"] == "activity 'act_none' not found"
    (anonymous,) = [vars(r) for r in rpc_records(captured, "GetAgentStatus") if r.levelno == logging.INFO]
    assert HEX_ID.fullmatch(anonymous["request_id"]), "an unacceptable id is replaced by a new one"
    (auth_line,) = [vars(r) for r in captured.records if r.name == "collab_grpc.auth"]
    assert auth_line["request_id"] == anonymous["request_id"], "the auth interceptor's line carries it too"
    assert all(WRITE_KEY not in r.getMessage() and WRITE_KEY not in str(vars(r)) for r in captured.records)


@pytest_asyncio.fixture
async def eager_observer() -> AsyncIterator[Client]:
    """A bare server whose observer finds every call slow."""
    server = grpc.aio.server(interceptors=[CallInterceptor(None, slow_seconds=0.0)])
    pb_grpc.add_CollaborationServiceServicer_to_server(CollaborationServicer(CollaborationState()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = Client.connect(f"127.0.0.1:{port}", token=None)
    yield client
    await client.close()
    await server.stop(0)


async def test_slow_calls_are_warned_about_and_streams_are_not_timed(
    eager_observer: Client, captured: pytest.LogCaptureFixture
) -> None:
    streams = sample("collab_rpc_duration_seconds_count", method="SubscribeEvents")
    cancelled = sample("collab_rpcs_total", method="SubscribeEvents", code="CANCELLED")
    await eager_observer.stub.GetAgentStatus(pb.GetAgentStatusRequest())
    (slow,) = rpc_records(captured, "GetAgentStatus")
    assert (slow.levelno, vars(slow)["code"]) == (logging.WARNING, "OK") and "slow rpc" in slow.getMessage()

    stream = await eager_observer.subscribe()
    assert sample("collab_rpcs_in_flight", method="SubscribeEvents") == 1
    stream.cancel()
    for _ in range(200):  # the server notices the cancellation on its next turn
        if sample("collab_rpcs_total", method="SubscribeEvents", code="CANCELLED") > cancelled:
            break
        await asyncio.sleep(0.01)
    assert sample("collab_rpcs_total", method="SubscribeEvents", code="CANCELLED") - cancelled == 1
    assert sample("collab_rpcs_in_flight", method="SubscribeEvents") == 0
    assert sample("collab_rpc_duration_seconds_count", method="SubscribeEvents") == streams
    assert not [r for r in rpc_records(captured, "SubscribeEvents") if r.levelno >= logging.INFO]


async def test_bulk_rejections_count_as_rate_limited(make_hub: HubFactory) -> None:
    _, client = await make_hub(rate_limit=1)
    before = sample("collab_rate_limited_total")

    async def requests() -> AsyncIterator[pb.BulkRecordActivitiesRequest]:
        for _ in range(3):
            yield pb.BulkRecordActivitiesRequest(activity=activity("bulk_agent"))

    reply = await client.stub.BulkRecordActivities(requests(), metadata=bearer(WRITE_KEY))
    assert (reply.recorded, reply.failed) == (1, 2)
    assert sample("collab_rate_limited_total") - before == 2


# -- the metrics port -------------------------------------------------------------------------


def test_the_metrics_port_serves_the_state_and_closes_cleanly() -> None:
    state = CollaborationState()
    state.record_activity(agent_id="a", activity_type=ActivityType.AGENT_STARTED)
    endpoint = serve_metrics("127.0.0.1:0", state, "memory", strict=True)
    assert isinstance(endpoint, MetricsEndpoint)
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", endpoint.url)
        text = httpx.get(endpoint.url, timeout=10).text
        assert "collab_event_log_seq 1.0" in text
        assert "collab_event_log_retained_events 1.0" in text
        assert "collab_stream_subscribers 0.0" in text
        assert f'collab_server_info{{epoch="{state.epoch}",store="memory"}} 1.0' in text
        assert 'collab_store_commit_failures_total{store="memory"} 0.0' in text
    finally:
        endpoint.close()
    again = serve_metrics("127.0.0.1:0", state, "memory", strict=True)  # the collector was unregistered
    assert again is not None
    again.close()


def test_a_taken_metrics_port_stops_the_server_only_when_it_was_asked_for(
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = CollaborationState()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(SystemExit, match=f"cannot serve metrics on {addr}"):
            serve_metrics(addr, state, "memory", strict=True)
        assert serve_metrics(addr, state, "memory", strict=False) is None
    assert f"metrics off, cannot listen on {addr}" in capsys.readouterr().out
    endpoint = serve_metrics("127.0.0.1:0", state, "memory", strict=True)  # nothing left registered
    assert endpoint is not None
    endpoint.close()
