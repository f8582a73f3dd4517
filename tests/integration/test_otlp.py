"""OTLP in, as a user meets it: the real OpenTelemetry SDK and its standard OTLP
exporters (gRPC to the server's port, HTTP/protobuf to the bridge's /v1/traces, and
OTLP/JSON posted by hand as the specification writes it, since the Python SDK has no
JSON exporter) against real `collab-server` and `collab-bridge` processes.

A three-level agent -> tool -> LLM span tree appears on the WebSocket, in order, as
activities with the right types, tree, session, status and metadata; a retried export
records nothing; bad credentials, oversize and malformed payloads are refused as the
OTLP specification says and change nothing.
"""

from __future__ import annotations

import base64
import gzip
import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode
from websockets.asyncio.client import ClientConnection, connect

from tests.support.rpc import READ_KEY, WRITE_KEY
from tests.support.stack import AUTH, Stack, opened, recv_until, running_stack

pytestmark = pytest.mark.integration

MAX_SPANS = 50
OTLP_MAX_BYTES = 256 * 1024
PROTOBUF = "application/x-protobuf"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("otlp"),
        server_env={"COLLAB_OTLP_MAX_SPANS": str(MAX_SPANS)},
        bridge_env={"COLLAB_OTLP_MAX_BYTES": str(OTLP_MAX_BYTES)},
    ) as running:
        yield running


def run_tree(exporter: SpanExporter, agent: str, conversation: str) -> list[ReadableSpan]:
    """An agent that calls a tool that calls a model (which fails), exported by the SDK's
    BatchSpanProcessor through ``exporter``; the finished spans, as the SDK made them."""
    kept = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "otlp-test"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    provider.add_span_processor(BatchSpanProcessor(kept))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span(
        f"invoke_agent {agent}",
        attributes={
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": agent,
            "gen_ai.conversation.id": conversation,
        },
    ):
        with (
            tracer.start_as_current_span(
                "execute_tool lookup",
                attributes={"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup"},
            ),
            tracer.start_as_current_span(
                "chat test-model",
                attributes={"gen_ai.operation.name": "chat", "gen_ai.request.model": "test-model"},
            ) as llm,
        ):
            llm.set_attribute("gen_ai.usage.input_tokens", 11)
            llm.set_attribute("gen_ai.usage.output_tokens", 7)
            llm.set_status(Status(StatusCode.ERROR, "model overloaded"))
        with tracer.start_as_current_span("GET /health"):  # not GenAI: dropped
            pass
    assert provider.force_flush(10_000)
    provider.shutdown()
    return list(kept.get_finished_spans())


def by_name(spans: Sequence[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


def is_about(agent: str) -> Callable[[dict[str, Any]], bool]:
    def wanted(message: dict[str, Any]) -> bool:
        if message["type"] == "agent_activity":
            return bool(message["activity"]["agent_id"] == agent)
        if message["type"] == "activity_completed":
            return bool(message["agent_id"] == agent)
        if message["type"] in ("collaboration_started", "collaboration_ended"):
            return agent in message["session"]["participants"]
        return False

    return wanted


async def assert_tree_on_websocket(ws: ClientConnection, agent: str, spans: Sequence[ReadableSpan]) -> None:
    wanted = is_about(agent)
    messages = [await recv_until(ws, wanted) for _ in range(8)]
    assert [m["type"] for m in messages] == [
        "collaboration_started",
        "agent_activity",
        "agent_activity",
        "agent_activity",
        "activity_completed",
        "activity_completed",
        "activity_completed",
        "collaboration_ended",
    ]
    session = messages[0]["session"]
    assert session["session_type"] == "conversation"
    root, tool, llm = (m["activity"] for m in messages[1:4])
    assert [a["activity_type"] for a in (root, tool, llm)] == ["agent_started", "task_assigned", "message_sent"]
    assert root["parent_activity_id"] is None
    assert tool["parent_activity_id"] == root["activity_id"]
    assert llm["parent_activity_id"] == tool["activity_id"]
    assert {a["session_id"] for a in (root, tool, llm)} == {session["session_id"]}
    assert {a["agent_id"] for a in (root, tool, llm)} == {agent}
    named = by_name(spans)
    model = named["chat test-model"]
    assert model.context is not None and model.start_time is not None and model.end_time is not None
    meta = llm["metadata"]
    assert meta["otel.trace_id"] == f"{model.context.trace_id:032x}"
    assert meta["otel.span_id"] == f"{model.context.span_id:016x}"
    assert meta["gen_ai.request.model"] == "test-model"
    assert meta["gen_ai.usage.input_tokens"] == 11
    assert meta["gen_ai.usage.output_tokens"] == 7
    assert meta["otel.start_time"] == pytest.approx(model.start_time / 1e9, abs=1e-5)
    assert meta["otel.end_time"] == pytest.approx(model.end_time / 1e9, abs=1e-5)
    assert tool["metadata"]["gen_ai.tool.name"] == "lookup"
    # Completed children first; the model's error is the failure reason.
    done = messages[4:7]
    assert [a["activity_id"] for a in done] == [llm["activity_id"], tool["activity_id"], root["activity_id"]]
    assert [a["status"] for a in done] == ["failed", "completed", "completed"]
    assert done[0]["failure_reason"] == "model overloaded"
    assert messages[7]["session_id"] == session["session_id"]


async def seq(http: httpx.AsyncClient) -> int:
    value: int = (await http.get("/readyz")).json()["seq"]
    return value


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- the SDK's exporters ----------------------------------------------------------------


async def test_grpc_exporter_tree_and_retry(stack: Stack, http: httpx.AsyncClient) -> None:
    agent = unique("grpc-agent")
    async with connect(stack.ws_url()) as ws:
        await opened(ws)
        exporter = GrpcExporter(
            endpoint=stack.server.target, insecure=True, headers={"authorization": f"Bearer {WRITE_KEY}"}
        )
        spans = run_tree(exporter, agent, unique("conversation"))
        await assert_tree_on_websocket(ws, agent, spans)
    before = await seq(http)
    counted = otlp_spans(stack)
    retry = GrpcExporter(endpoint=stack.server.target, insecure=True, headers={"authorization": f"Bearer {WRITE_KEY}"})
    assert retry.export(spans) is SpanExportResult.SUCCESS
    retry.shutdown()
    assert await seq(http) == before, "a re-exported batch recorded something"
    # Counted on the server's /metrics: the three GenAI spans seen again, the other one dropped.
    after = otlp_spans(stack)
    assert after["duplicate"] - counted.get("duplicate", 0) == 3
    assert after["dropped"] - counted.get("dropped", 0) == 1


def otlp_spans(stack: Stack) -> dict[str, float]:
    """collab_otlp_spans_total by outcome, from the server's /metrics."""
    text = httpx.get(stack.server.metrics_url).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("collab_otlp_spans_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('outcome="', 1)[1].split('"', 1)[0]] = float(value)
    return found


async def test_http_exporter_from_the_standard_environment(
    stack: Stack, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", stack.bridge.http)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"authorization=Bearer%20{WRITE_KEY}")
    agent = unique("http-agent")
    async with connect(stack.ws_url()) as ws:
        await opened(ws)
        spans = run_tree(HttpExporter(), agent, unique("conversation"))  # no collab code, no arguments
        await assert_tree_on_websocket(ws, agent, spans)
    before = await seq(http)
    retry = HttpExporter()
    assert retry.export(spans) is SpanExportResult.SUCCESS
    retry.shutdown()  # type: ignore[no-untyped-call]
    assert await seq(http) == before


def otlp_json(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """The spans as OTLP/JSON: protobuf's JSON mapping with lowerCamelCase names, but ids
    in hex (the one place OTLP/JSON differs)."""
    data = json_format.MessageToDict(encode_spans(spans))
    for resource_spans in data["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                for name in ("traceId", "spanId", "parentSpanId"):
                    if name in span:
                        span[name] = base64.b64decode(span[name]).hex()
    return data


async def test_http_json_and_gzip(stack: Stack, http: httpx.AsyncClient) -> None:
    agent = unique("json-agent")
    spans = run_tree(InMemorySpanExporter(), agent, unique("conversation"))
    body = gzip.compress(json.dumps(otlp_json(spans)).encode())
    async with connect(stack.ws_url()) as ws:
        await opened(ws)
        response = await http.post(
            "/v1/traces", content=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert response.json() == {}  # no partialSuccess: everything was taken
        await assert_tree_on_websocket(ws, agent, spans)
    before = await seq(http)
    again = await http.post("/v1/traces", json=otlp_json(spans))
    assert again.status_code == 200, again.text
    assert await seq(http) == before


async def test_partial_success_for_spans_the_hub_refuses(stack: Stack, http: httpx.AsyncClient) -> None:
    spans = run_tree(InMemorySpanExporter(), unique("partial-agent"), unique("conversation"))
    request = encode_spans(spans)
    bad = request.resource_spans[0].scope_spans[0].spans.add()
    bad.CopyFrom(request.resource_spans[0].scope_spans[0].spans[0])
    bad.span_id = b"\x01\x02\x03"  # not 8 bytes
    response = await http.post("/v1/traces", content=request.SerializeToString(), headers={"Content-Type": PROTOBUF})
    assert response.status_code == 200, response.text
    reply = otlp.ExportTraceServiceResponse.FromString(response.content)
    assert reply.partial_success.rejected_spans == 1
    assert "span_id must be 8 bytes" in reply.partial_success.error_message


# -- refusals change nothing ----------------------------------------------------------


def status_of(response: httpx.Response) -> status_pb2.Status:
    if response.headers["content-type"].startswith("application/json"):
        return json_format.Parse(response.text, status_pb2.Status())
    return status_pb2.Status.FromString(response.content)


@pytest.fixture
def request_bytes() -> bytes:
    spans = run_tree(InMemorySpanExporter(), unique("refused-agent"), unique("conversation"))
    return encode_spans(spans).SerializeToString()


@pytest.mark.parametrize(
    ("headers", "status", "fragment"),
    [
        ({}, 401, ""),
        ({"Authorization": "Bearer not-a-key"}, 401, ""),
        ({"Authorization": f"Bearer {READ_KEY}"}, 403, ""),
    ],
)
async def test_http_credentials(
    stack: Stack, request_bytes: bytes, headers: dict[str, str], status: int, fragment: str
) -> None:
    async with httpx.AsyncClient(base_url=stack.bridge.http) as anonymous:
        before = await seq(anonymous)
        response = await anonymous.post(
            "/v1/traces", content=request_bytes, headers={"Content-Type": PROTOBUF, **headers}
        )
        assert response.status_code == status, response.text
        assert status_of(response).message
        assert await seq(anonymous) == before


async def test_grpc_credentials(stack: Stack, http: httpx.AsyncClient, request_bytes: bytes) -> None:
    before = await seq(http)
    for token in ("not-a-key", READ_KEY):
        exporter = GrpcExporter(
            endpoint=stack.server.target, insecure=True, headers={"authorization": f"Bearer {token}"}
        )
        spans = run_tree(InMemorySpanExporter(), unique("refused-agent"), unique("conversation"))
        assert exporter.export(spans) is SpanExportResult.FAILURE
        exporter.shutdown()
    async with grpc.aio.insecure_channel(stack.server.target) as channel:
        stub = otlp_grpc.TraceServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Export(otlp.ExportTraceServiceRequest.FromString(request_bytes))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await seq(http) == before


MALFORMED: list[tuple[dict[str, str], bytes, int, str]] = [
    ({"Content-Type": PROTOBUF}, b"\xff\xff\xff\xff", 400, "not an OTLP trace export"),
    ({"Content-Type": "application/json"}, b"{not json", 400, "not JSON"),
    ({"Content-Type": "application/json"}, b'{"resourceSpans": 3}', 400, "not an OTLP trace export"),
    (
        {"Content-Type": "application/json"},
        b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"zz","spanId":"00f067aa0ba902b7"}]}]}]}',
        400,
        "is not hex",
    ),
    ({"Content-Type": PROTOBUF, "Content-Encoding": "gzip"}, b"not gzip at all", 400, "not valid gzip"),
    ({"Content-Type": PROTOBUF, "Content-Encoding": "br"}, b"", 415, "Content-Encoding"),
    ({"Content-Type": "text/plain"}, b"hello", 415, "Content-Type"),
]


@pytest.mark.parametrize(("headers", "body", "status", "fragment"), MALFORMED)
async def test_http_malformed(
    http: httpx.AsyncClient, headers: dict[str, str], body: bytes, status: int, fragment: str
) -> None:
    before = await seq(http)
    response = await http.post("/v1/traces", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert fragment in status_of(response).message
    assert await seq(http) == before


async def test_http_oversize(http: httpx.AsyncClient) -> None:
    before = await seq(http)
    bomb = gzip.compress(b"\0" * (OTLP_MAX_BYTES + 1))  # small on the wire, too large inflated
    response = await http.post(
        "/v1/traces", content=bomb, headers={"Content-Type": PROTOBUF, "Content-Encoding": "gzip"}
    )
    assert response.status_code == 413, response.text
    assert "inflates to more than" in status_of(response).message
    plain = await http.post("/v1/traces", content=b"\0" * (OTLP_MAX_BYTES + 1), headers={"Content-Type": PROTOBUF})
    assert plain.status_code == 413, plain.text
    assert await seq(http) == before


async def test_grpc_too_many_spans_and_undecodable(stack: Stack, http: httpx.AsyncClient) -> None:
    before = await seq(http)
    spans = run_tree(InMemorySpanExporter(), unique("many-agent"), unique("conversation"))
    request = encode_spans(spans * (MAX_SPANS // len(spans) + 1))
    metadata = (("authorization", f"Bearer {WRITE_KEY}"),)
    async with grpc.aio.insecure_channel(stack.server.target) as channel:
        stub = otlp_grpc.TraceServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Export(request, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"at most {MAX_SPANS}" in (caught.value.details() or "")
        raw = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(b"\xff\xff\xff\xff", metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await seq(http) == before


# -- rate limits, restarts and an unreachable server -------------------------------------


def post_until_taken(base: str, body: bytes) -> list[int]:
    """POST ``body`` as an exporter does: again after each 429/503, waiting Retry-After."""
    statuses: list[int] = []
    headers = {"Content-Type": PROTOBUF, "Authorization": f"Bearer {WRITE_KEY}"}
    for _ in range(20):
        response = httpx.post(base + "/v1/traces", content=body, headers=headers)
        statuses.append(response.status_code)
        if response.status_code == 200:
            return statuses
        assert response.status_code in (429, 503), response.text
        assert status_of(response).message
        time.sleep(float(response.headers["Retry-After"]))
    raise AssertionError(f"never taken: {statuses}")


def test_rate_limited_exports_are_retried_restarts_remember_spans(tmp_path: Path) -> None:
    agent = unique("limited-agent")
    spans = run_tree(InMemorySpanExporter(), agent, unique("conversation"))
    body = encode_spans(spans).SerializeToString()
    with running_stack(tmp_path, server_env={"COLLAB_RATE_LIMIT": "1"}) as stack:
        base = stack.bridge.http
        feed_url = f"{base}/api/v1/collaboration/activity-feed?agent_id={agent}"

        def feed() -> list[dict[str, Any]]:
            activities: list[dict[str, Any]] = httpx.get(feed_url, headers=AUTH).json()["activities"]
            return activities

        # One record a second for the agent: the tree's three activities take retries.
        statuses = post_until_taken(base, body)
        assert statuses[0] == 429 and statuses[-1] == 200
        recorded = feed()
        assert sorted(a["activity_type"] for a in recorded) == ["agent_started", "message_sent", "task_assigned"]
        assert sorted(a["status"] for a in recorded) == ["completed", "completed", "failed"]
        # The span index outlives a restart: the same export again records nothing.
        port = stack.server.port
        assert stack.server.stop() == 0
        stack.server.start(port)
        post_until_taken(base, body)
        assert sorted(a["activity_id"] for a in feed()) == sorted(a["activity_id"] for a in recorded)
        # The server gone: 503 with Retry-After, which exporters retry; the message says so,
        # as REST and the WebSocket do, without the server's address.
        assert stack.server.stop() == 0
        response = httpx.post(base + "/v1/traces", content=body, headers={"Content-Type": PROTOBUF, **AUTH}, timeout=30)
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "1"
        told = status_of(response)
        assert told.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert told.message.startswith("the collab server is unavailable: ") and str(port) not in told.message
