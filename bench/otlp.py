"""OTLP ingest: spans per second through OTLP/gRPC (the server's TraceService/Export) and
OTLP/HTTP (the bridge's POST /v1/traces, protobuf), beside the native bulk RPC, on the
same machine in the same run.

`python -m bench.otlp [--spans N] [--batch B] [--rounds R]`

Each span is an ended GenAI ``chat`` span with a model and token usage, from one of ten
agents (the rate limit off), sent B to a request, one request at a time (as an
OpenTelemetry BatchSpanProcessor sends: 512 spans a request by default). An ended span
costs the hub two events (the activity recorded, then completed); the native bulk
stream records one activity (one event) per item, 100 to a message, so the table gives
events per second too. The hub runs with its default store (SQLite, durable before each
answer); the load runs in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from bench.fanout import TOKEN, _start, _stop, free_port, start_server
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc

__all__ = ["OtlpResult", "main", "run_otlp"]

AGENTS = 10
PER_MESSAGE = 100
METADATA = (("authorization", f"Bearer {TOKEN}"),)


@dataclass
class OtlpResult:
    path: str
    spans: int
    events_per_span: int
    rounds: list[float]

    @property
    def rate(self) -> float:
        seconds = statistics.median(self.rounds)
        return self.spans / seconds if seconds else 0.0


def _attribute(key: str, value: str | int) -> common_pb2.KeyValue:
    if isinstance(value, int):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(int_value=value))
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))


def _requests(spans: int, batch: int, round_number: int) -> list[otlp.ExportTraceServiceRequest]:
    """``spans`` ended chat spans in requests of ``batch``; ids unique to the round."""
    now = time.time_ns()
    requests: list[otlp.ExportTraceServiceRequest] = []
    for first in range(0, spans, batch):
        request = otlp.ExportTraceServiceRequest()
        scope = request.resource_spans.add().scope_spans.add()
        for n in range(first, min(spans, first + batch)):
            scope.spans.append(
                trace_pb2.Span(
                    trace_id=(round_number * 1_000_000_000 + n + 1).to_bytes(16, "big"),
                    span_id=(n + 1).to_bytes(8, "big"),
                    name="chat bench-model",
                    start_time_unix_nano=now,
                    end_time_unix_nano=now + 1_000_000,
                    attributes=[
                        _attribute("gen_ai.operation.name", "chat"),
                        _attribute("gen_ai.agent.name", f"bench-agent-{n % AGENTS}"),
                        _attribute("gen_ai.request.model", "bench-model"),
                        _attribute("gen_ai.usage.input_tokens", 120),
                        _attribute("gen_ai.usage.output_tokens", 40),
                    ],
                )
            )
        requests.append(request)
    return requests


async def _grpc(target: str, requests: list[otlp.ExportTraceServiceRequest]) -> float:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = otlp_grpc.TraceServiceStub(channel)  # type: ignore[no-untyped-call]
        started = time.perf_counter()
        for request in requests:
            reply = await stub.Export(request, metadata=METADATA)
            assert not reply.partial_success.rejected_spans, reply.partial_success.error_message
        return time.perf_counter() - started


async def _http(base: str, requests: list[otlp.ExportTraceServiceRequest]) -> float:
    bodies = [request.SerializeToString() for request in requests]
    headers = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:
        started = time.perf_counter()
        for body in bodies:
            response = await client.post("/v1/traces", content=body)
            assert response.status_code == 200, response.text
            reply = otlp.ExportTraceServiceResponse.FromString(response.content)
            assert not reply.partial_success.rejected_spans, reply.partial_success.error_message
        return time.perf_counter() - started


async def _native(target: str, spans: int) -> float:
    items = [
        pb.RecordActivityRequest(
            agent_id=f"bench-agent-{n % AGENTS}", activity_type=pb.ACTIVITY_TYPE_MESSAGE_SENT, idempotency_key=""
        )
        for n in range(spans)
    ]
    for item, n in zip(items, range(spans), strict=True):
        item.metadata.update({"gen_ai.request.model": "bench-model", "gen_ai.usage.input_tokens": 120, "n": n})
    messages = [
        pb.BulkRecordActivitiesRequest(activities=items[first : first + PER_MESSAGE])
        for first in range(0, spans, PER_MESSAGE)
    ]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CollaborationServiceStub(channel)
        started = time.perf_counter()
        reply = await stub.BulkRecordActivities(iter(messages), metadata=METADATA)
        elapsed = time.perf_counter() - started
        assert reply.recorded == spans, reply.failed
        return elapsed


def run_otlp(workdir: Path, spans: int, batch: int, rounds: int) -> list[OtlpResult]:
    server, target = start_server(workdir / "server", COLLAB_STORE="sqlite", COLLAB_HISTORY_LIMIT="1000")
    port = free_port()
    bridge_argv = [sys.executable, "-m", "bridge.main", "--bridge-addr", f"127.0.0.1:{port}", "--grpc-target", target]
    bridge_env = {"COLLAB_UPSTREAM_TOKEN": TOKEN, "COLLAB_LOG_LEVEL": "warning", "COLLAB_DATA_DIR": str(workdir)}
    bridge = _start(bridge_argv, "listening on", bridge_env)
    results = {
        "native bulk (100 a message)": OtlpResult("native bulk (100 a message)", spans, 1, []),
        "OTLP/gRPC": OtlpResult("OTLP/gRPC", spans, 2, []),
        "OTLP/HTTP protobuf": OtlpResult("OTLP/HTTP protobuf", spans, 2, []),
    }
    try:
        for round_number in range(rounds):
            results["native bulk (100 a message)"].rounds.append(asyncio.run(_native(target, spans)))
            grpc_requests = _requests(spans, batch, 2 * round_number + 1)
            results["OTLP/gRPC"].rounds.append(asyncio.run(_grpc(target, grpc_requests)))
            http_requests = _requests(spans, batch, 2 * round_number + 2)
            results["OTLP/HTTP protobuf"].rounds.append(asyncio.run(_http(f"http://127.0.0.1:{port}", http_requests)))
    finally:
        _stop(bridge)
        _stop(server)
    return list(results.values())


def table(results: list[OtlpResult]) -> str:
    lines = ["| path | spans | spans/s | events/s | rounds (s) |", "|---|---|---|---|---|"]
    for result in results:
        rounds = ", ".join(f"{seconds:.2f}" for seconds in result.rounds)
        lines.append(
            f"| {result.path} | {result.spans:,} | {result.rate:,.0f} | "
            f"{result.rate * result.events_per_span:,.0f} | {rounds} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.otlp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=5000, help="spans (or native activities) per path and round")
    parser.add_argument("--batch", type=int, default=512, help="spans per OTLP request")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="collab-bench-otlp-") as workdir:
        results = run_otlp(Path(workdir), args.spans, args.batch, args.rounds)
    print(f"OTLP ingest, {os.cpu_count()} CPUs, SQLite store, {args.batch} spans a request")
    print(table(results))


if __name__ == "__main__":
    main()
