"""The operator's view, on real processes: what `/metrics` of the server and of the
bridge say after known traffic (each counter moved by exactly what was done), request
ids from a browser's request to the server's log line, and the Grafana dashboard checked
against what the processes export."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.support.processes import OutputLines
from tests.support.rpc import WRITE_KEY
from tests.support.stack import API, AUTH, BRIDGE_ENV, Stack, opened, record, recv_until, running_stack
from tests.support.stalled import StalledClient

pytestmark = pytest.mark.integration

METRICS_TOKEN = "test-metrics-token"
METRICS_AUTH = {"Authorization": f"Bearer {METRICS_TOKEN}"}
DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "collab-dashboard.json"
BACKLOG = int(BRIDGE_ENV["COLLAB_CLIENT_BACKLOG"])
RATE_LIMIT = 2  # records per second per agent (and the burst)
HEX_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("metrics"),
        {"COLLAB_RATE_LIMIT": str(RATE_LIMIT)},
        bridge_env={"COLLAB_METRICS_TOKEN": METRICS_TOKEN},
        capture_stderr=True,
    ) as running:
        yield running


@dataclass(frozen=True)
class Scrape:
    """One scrape: every sample by (name, labels), and each family's type."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    types: dict[str, str]
    labels: dict[str, set[str]]

    def value(self, name: str, **labels: str) -> float:
        """A sample's value; 0 for a labelled series not created yet."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def series_names(self) -> set[str]:
        """Every series name a query may use: ``_total`` of counters, the histograms'
        ``_bucket``/``_sum``/``_count``, gauges as they are (declared families count
        even before their first sample)."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
        names = {name for name, _ in self.samples}
        for family, kind in self.types.items():
            names.update(family + suffix for suffix in suffixes.get(kind, ("",)))
        return names


async def scrape(url: str, headers: dict[str, str] | None = None) -> Scrape:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url, headers=headers)
    assert response.status_code == 200, response.text
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    types: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
            labels.setdefault(sample.name, set()).update(sample.labels)
    return Scrape(samples, types, labels)


async def scrape_both(stack: Stack) -> tuple[Scrape, Scrape]:
    return await scrape(stack.server.metrics_url), await scrape(stack.bridge.metrics_url, METRICS_AUTH)


async def settle(read: Callable[[], Any], wanted: Callable[[Any], bool], within: float = 10.0) -> Any:
    """Scrape again until ``wanted`` holds (a gauge catching up with a close); the last value."""
    deadline = time.monotonic() + within
    value = await read()
    while not wanted(value) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        value = await read()
    return value


async def bridge_gauges_settled(stack: Stack, connections: int, sse: int) -> Scrape:
    def settled(bridge: Scrape) -> bool:
        return (
            bridge.value("collab_bridge_websocket_connections") == connections
            and bridge.value("collab_bridge_sse_clients") == sse
        )

    bridge: Scrape = await settle(lambda: scrape(stack.bridge.metrics_url, METRICS_AUTH), settled)
    assert settled(bridge), "the bridge's connection gauges never settled"
    return bridge


async def open_sse(lines: AsyncIterator[str]) -> None:
    """Read an SSE stream up to its `collaboration_state`: it is then in the fan-out.
    (The caller keeps ``lines``: a line iterator collected early closes the stream.)"""
    async for line in lines:
        if line == "event: collaboration_state":
            return
    raise AssertionError("the SSE stream ended before its collaboration_state")


# -- counters after known traffic ----------------------------------------------------------


async def test_counters_move_by_exactly_what_was_done(stack: Stack, http: httpx.AsyncClient) -> None:
    before_server, _ = await scrape_both(stack)
    before_bridge = await bridge_gauges_settled(stack, connections=0, sse=0)
    assert before_bridge.value("collab_bridge_upstream_connected") == 1
    assert before_bridge.value("collab_bridge_upstream_reconnects_total", stream="events") == 0

    websockets: list[ClientConnection] = []
    try:
        for n in range(3):
            websockets.append(await connect(stack.ws_url(client_id=f"metrics_{n}")))
            await opened(websockets[-1])
        async with connect(stack.ws_url(token="not-a-key", client_id="refused")) as refused:
            with pytest.raises(ConnectionClosed) as closed:
                while True:  # the `error` message, then the close
                    await asyncio.wait_for(refused.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        async with http.stream("GET", f"{API}/events") as sse:
            sse_lines = sse.aiter_lines()
            await asyncio.wait_for(open_sse(sse_lines), 10)
            during = await bridge_gauges_settled(stack, connections=3, sse=1)
            assert during.value("collab_bridge_websocket_connections") == 3

            types = ["task_completed"] * 4 + ["memory_write"] * 2
            for n, activity_type in enumerate(types):
                await record(http, f"metrics_agent_{n}", activity_type)
            update = await http.post(
                f"{API}/record-memory-update",
                json={"operation": "write", "item_id": "item_1", "agent_id": "metrics_agent_0"},
            )
            assert update.status_code == 200, update.text
            statuses = []
            for _ in range(RATE_LIMIT + 8):  # the burst, then refusals until one is seen
                response = await http.post(
                    f"{API}/record-activity", json={"agent_id": "metrics_eager", "activity_type": "message_sent"}
                )
                statuses.append(response.status_code)
                if response.status_code == 429:
                    break
            eager_recorded, limited = statuses.count(200), statuses.count(429)
            assert limited == 1 and eager_recorded + limited == len(statuses), statuses
            missing = await http.get(f"{API}/activities/act_that_does_not_exist")
            assert missing.status_code == 404

            recorded = len(types) + eager_recorded
            events = recorded + 1  # and the memory update
            last_seq = 0
            for ws in websockets:  # every client got every event: the broadcasts are done
                for _ in range(events):
                    message = await recv_until(ws, lambda m: m["type"] in {"agent_activity", "memory_update"})
                    last_seq = max(last_seq, message["seq"])
            server, bridge = await scrape_both(stack)
    finally:
        await asyncio.gather(*(ws.close() for ws in websockets))

    def server_delta(name: str, **labels: str) -> float:
        return server.value(name, **labels) - before_server.value(name, **labels)

    def bridge_delta(name: str, **labels: str) -> float:
        return bridge.value(name, **labels) - before_bridge.value(name, **labels)

    recorded_kind = "activity_recorded"
    events_total = "collab_events_recorded_total"
    assert server_delta(events_total, kind=recorded_kind, activity_type="task_completed") == 4
    assert server_delta(events_total, kind=recorded_kind, activity_type="memory_write") == 2
    assert server_delta(events_total, kind=recorded_kind, activity_type="message_sent") == eager_recorded
    assert server_delta(events_total, kind="memory_updated", activity_type="") == 1
    assert server_delta("collab_rpcs_total", method="RecordActivity", code="OK") == recorded
    assert server_delta("collab_rpcs_total", method="RecordActivity", code="RESOURCE_EXHAUSTED") == limited
    assert server_delta("collab_rpcs_total", method="RecordMemoryUpdate", code="OK") == 1
    assert server_delta("collab_rpcs_total", method="GetActivity", code="NOT_FOUND") == 1
    assert server_delta("collab_rpcs_total", method="SubscribeEvents", code="UNAUTHENTICATED") == 1
    assert server_delta("collab_rpc_duration_seconds_count", method="RecordActivity") == recorded + limited
    assert server_delta("collab_rate_limited_total") == limited
    # Every durable event went through exactly one commit of the SQLite store.
    assert server_delta("collab_store_commit_events_sum", store="sqlite") == events
    assert 1 <= server_delta("collab_store_commit_duration_seconds_count", store="sqlite") <= events
    assert server.value("collab_event_log_seq") == last_seq
    assert server.value("collab_server_info", epoch=stack.server.epoch, store="sqlite") == 1

    fanned_out = 3 + 1  # three WebSocket clients and one SSE client
    assert bridge_delta("collab_bridge_fanout_messages_total", type="agent_activity") == recorded * fanned_out
    assert bridge_delta("collab_bridge_fanout_messages_total", type="memory_update") == fanned_out
    assert bridge_delta("collab_bridge_websocket_accepted_total") == 3
    assert bridge_delta("collab_bridge_websocket_refused_total", code="4401") == 1
    assert bridge.value("collab_bridge_upstream_last_seq") == last_seq
    route = "/api/v1/collaboration/record-activity"
    assert bridge_delta("collab_bridge_http_requests_total", route=route, method="POST", status="200") == recorded
    assert bridge_delta("collab_bridge_http_requests_total", route=route, method="POST", status="429") == limited
    one_activity = "/api/v1/collaboration/activities/{activity_id}"
    assert bridge_delta("collab_bridge_http_requests_total", route=one_activity, method="GET", status="404") == 1
    assert bridge_delta("collab_bridge_http_request_duration_seconds_count", route=route, method="POST") == len(
        statuses
    ) + len(types)
    # Nobody fell behind: every client that left had a backlog of zero.
    assert bridge_delta("collab_bridge_slow_client_disconnects_total") == 0

    after = await bridge_gauges_settled(stack, connections=0, sse=0)
    assert (
        after.value("collab_bridge_client_backlog_peak_messages_count")
        - before_bridge.value("collab_bridge_client_backlog_peak_messages_count")
        == fanned_out
    )
    server_after: Scrape = await settle(
        lambda: scrape(stack.server.metrics_url), lambda s: s.value("collab_stream_subscribers") == 1
    )
    assert server_after.value("collab_stream_subscribers") == 1, "only the bridge's own event stream is left"


async def test_a_client_that_never_reads_is_counted_as_cut_off_at_its_backlog_bound(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    before = await bridge_gauges_settled(stack, connections=0, sse=0)
    blob = "x" * 60_000
    stalled = StalledClient(stack.ws_url(client_id="stalled"), stack.bridge.port)
    try:
        await bridge_gauges_settled(stack, connections=1, sse=0)
        slow = "collab_bridge_slow_client_disconnects_total"
        flooded = 0
        bridge = before
        # 60 KB events until the bridge cuts the client off: its socket buffers fill
        # (a few MB), then its backlog (BACKLOG messages); checked every ten events.
        while bridge.value(slow) == before.value(slow) and flooded < 600:
            for _ in range(10):
                await record(http, f"flood_{flooded}", "message_sent", metadata={"blob": blob})
                flooded += 1
            bridge = await scrape(stack.bridge.metrics_url, METRICS_AUTH)
        _, close = await asyncio.to_thread(stalled.read_until_closed)
        assert close.code == 4008 and "too slow" in close.reason, close
    finally:
        stalled.close()
    after = await bridge_gauges_settled(stack, connections=0, sse=0)
    assert after.value(slow) - before.value(slow) == 1
    assert after.value("collab_bridge_client_backlog_high_water_messages") == BACKLOG
    peaks = "collab_bridge_client_backlog_peak_messages"
    assert after.value(f"{peaks}_count") - before.value(f"{peaks}_count") == 1
    assert after.value(f"{peaks}_sum") - before.value(f"{peaks}_sum") == BACKLOG
    print(f"slow client: cut off (4008) after {flooded} events of 60 KB, backlog high-water {BACKLOG}")


# -- request ids ------------------------------------------------------------------------------


def logged(output: OutputLines | None, request_id: str, *loggers: str) -> dict[str, dict[str, Any]]:
    """The JSON log line of each of ``loggers`` that carries ``request_id``, read as they come."""
    assert output is not None
    found: dict[str, dict[str, Any]] = {}
    for _ in range(10):  # a few lines per request at most
        found = {}
        for line in output.lines:
            if line.startswith("{") and request_id in line:
                entry = json.loads(line)
                assert entry["request_id"] == request_id and entry["logger"] not in found, entry
                found[entry["logger"]] = entry
        if set(loggers) <= set(found):
            return found
        output.wait_for(request_id)
    raise AssertionError(f"no line of {loggers} with {request_id}; found {found}")


async def test_a_request_id_goes_from_the_browser_to_the_servers_log_line(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    ws_id = f"ws-{uuid.uuid4().hex}"
    bad_token = f"not-a-key-{uuid.uuid4().hex}"
    async with connect(stack.ws_url(token=bad_token), additional_headers={"X-Request-ID": ws_id}) as refused:
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(refused.recv(), 10)
    server_lines = logged(stack.server.output, ws_id, "collab_grpc.auth", "collab_grpc.rpc")
    rpc = server_lines["collab_grpc.rpc"]
    assert (rpc["rpc"], rpc["code"], rpc["details"]) == ("SubscribeEvents", "UNAUTHENTICATED", "invalid credential")
    refusal = logged(stack.bridge.output, ws_id, "bridge.websocket")["bridge.websocket"]
    assert (refusal["message"], refusal["code"]) == ("websocket refused", 4401)

    request_id = f"rest-{uuid.uuid4().hex}"
    response = await http.get(f"{API}/activities/act_unknown", headers={"X-Request-ID": request_id})
    assert response.status_code == 404 and response.headers["x-request-id"] == request_id
    (server_line,) = logged(stack.server.output, request_id, "collab_grpc.rpc").values()
    assert server_line["level"] == "INFO"
    assert (server_line["rpc"], server_line["code"]) == ("GetActivity", "NOT_FOUND")
    assert server_line["details"] == "activity 'act_unknown' not found"
    (bridge_line,) = logged(stack.bridge.output, request_id, "bridge.http").values()
    assert (bridge_line["status"], bridge_line["route"]) == (404, f"{API}/activities/{{activity_id}}")

    # Absent, too long, or with characters that could forge a log line: a fresh one.
    for header in ({}, {"X-Request-ID": "x" * 129}, {"X-Request-ID": "two words"}, {"X-Request-ID": "a\tb"}):
        answer = await http.get(f"{API}/agent-status", headers=header)
        assert answer.status_code == 200 and HEX_ID.fullmatch(answer.headers["x-request-id"]), header
    assert (await http.get("/healthz", headers={"X-Request-ID": "x" * 128})).headers["x-request-id"] == "x" * 128

    # No credential in any line either process logged up to here.
    assert stack.server.output is not None and stack.bridge.output is not None
    for line in [*stack.server.output.lines, *stack.bridge.output.lines]:
        for secret in (WRITE_KEY, METRICS_TOKEN, bad_token):
            assert secret not in line, line


async def test_metrics_on_the_bridge_need_the_metrics_token(stack: Stack) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(stack.bridge.metrics_url)).status_code == 401
        wrong = await client.get(stack.bridge.metrics_url, headers=AUTH)  # a hub key is not the metrics token
        assert wrong.status_code == 401 and wrong.json()["code"] == "UNAUTHENTICATED"
        right = await client.get(stack.bridge.metrics_url, headers=METRICS_AUTH)
        assert right.status_code == 200 and right.headers["content-type"].startswith("text/plain")
        assert "process_resident_memory_bytes" in right.text


# -- the Grafana dashboard --------------------------------------------------------------------


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


async def test_the_dashboard_queries_only_what_the_processes_export(stack: Stack, http: httpx.AsyncClient) -> None:
    await record(http, "dashboard_agent", "agent_started")  # so that labelled series exist
    server, bridge = await scrape_both(stack)
    exported = server.series_names() | bridge.series_names()
    labels = {**server.labels, **bridge.labels}
    queries = dashboard_queries()
    assert len(queries) >= 10
    used: set[str] = set()
    for expr in queries:
        names = set(re.findall(r"\bcollab_[a-z0-9_]+", expr))
        assert names, f"a panel queries no collab metric: {expr}"
        unknown = names - exported
        assert not unknown, f"{expr} uses {sorted(unknown)}, which neither process exports"
        used |= names
        # Every label the query groups by or matches on exists on one of its metrics.
        grouped = {label for group in re.findall(r"\bby \(([^)]*)\)", expr) for label in group.split(",")}
        matched = set(re.findall(r"[{,]\s*([a-z_]+)\s*[!=]~?", expr))
        known = {"le", "instance", "job"}.union(*(labels.get(name, set()) for name in names))
        assert not {label.strip() for label in grouped | matched} - known, expr
    for required in (
        "collab_events_recorded_total",
        "collab_rpc_duration_seconds_bucket",
        "collab_rpcs_total",
        "collab_bridge_websocket_connections",
        "collab_bridge_fanout_messages_total",
        "collab_bridge_slow_client_disconnects_total",
        "collab_bridge_client_backlog_high_water_messages",
        "collab_store_commit_duration_seconds_bucket",
        "collab_rate_limited_total",
        "collab_bridge_upstream_reconnects_total",
    ):
        assert required in used, f"the dashboard has no panel on {required}"
    print(f"dashboard: {len(queries)} queries over {len(used)} metric series names, all exported")
