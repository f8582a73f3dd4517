"""Ingest: how fast agents can record, beside raw grpcio on the same machine.

- unary: `RecordActivity` with 64 calls in flight, against raw grpc.aio unary calls
  carrying the same request bytes and answering as many bytes as the hub does (the limit);
- bulk: `BulkRecordActivities`, one client stream with one activity a message, against a
  raw client-streaming call of the same messages;
- bulk, 100 a message: the same stream with 100 activities in each message (as the
  Python SDK's recorders send), against the same raw client-streaming limit.

The hub runs with the default SQLite store (durable before each answer) and with the
memory store. The load runs in its own process.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc

from bench.fanout import TOKEN, _start, _stop, free_port, start_server
from collab_grpc import convert
from collab_grpc.eventloop import run
from collab_grpc.model import Activity
from collab_grpc.v1 import collaboration_pb2 as pb

__all__ = ["IngestResult", "run_ingest"]

RAW_SERVICE = "bench.Raw"
IN_FLIGHT = 64
# The bulk mode with many activities per message (the Python SDK's recorders send 100),
# measured for the hub only: its limit is still raw client-streaming, message by message.
BATCHED = "bulk, 100 a message"
PER_MESSAGE = 100
MODES = ("unary", "bulk", BATCHED)


@dataclass
class IngestResult:
    target: str
    mode: str
    calls: int
    # Each round's time for the calls; the figure reported is the median round.
    rounds: list[float]

    @property
    def seconds(self) -> float:
        return statistics.median(self.rounds)

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


# -- the raw peer: a grpc.aio server with generic handlers over raw bytes ----------------


async def _serve_raw(port: int) -> None:
    answer = _answer()

    async def unary(request: bytes, context: Any) -> bytes:
        return answer

    async def streaming(requests: Any, context: Any) -> bytes:
        count = 0
        async for _ in requests:
            count += 1
        return str(count).encode()

    server = grpc.aio.server()
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_unary_rpc_method_handler(streaming),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(RAW_SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def _answer() -> bytes:
    """As many bytes as the hub's answer to ``_activity(0)``, for the raw peer to send."""
    request = _activity(0)
    activity = Activity(
        activity_id="act_1795660000_agent_0_0123abcd",
        agent_id=request.agent_id,
        department=request.department,
        activity_type=convert.activity_type_from_proto(request.activity_type),
        timestamp=time.time(),
        metadata=convert.struct_to_dict(request.metadata),
        related_agents=list(request.related_agents),
    )
    answer = pb.RecordActivityResponse(activity_id=activity.activity_id, activity=convert.activity_to_proto(activity))
    return answer.SerializeToString()


# -- load ------------------------------------------------------------------------------------


def _activity(n: int) -> pb.RecordActivityRequest:
    request = pb.RecordActivityRequest(
        agent_id=f"agent_{n % 48}",
        department="engineering",
        activity_type=pb.ACTIVITY_TYPE_MEMORY_WRITE,
        related_agents=["agent_2"],
    )
    request.metadata.update({"item_id": "item_123", "size_bytes": 1024})
    return request


# Each target's (unary, client-streaming) method.
_METHODS = {
    "raw": (f"/{RAW_SERVICE}/Unary", f"/{RAW_SERVICE}/Stream"),
    "hub": ("/collab.v1.CollaborationService/RecordActivity", "/collab.v1.CollaborationService/BulkRecordActivities"),
}


def _payloads(mode: str, calls: int) -> list[bytes]:
    """What the load sends in ``mode``, serialised up front: the unary requests, or the
    stream's messages (one activity each, or PER_MESSAGE)."""
    activities = [_activity(n) for n in range(calls)]
    if mode == "unary":
        return [a.SerializeToString() for a in activities]
    if mode == BATCHED:
        return [
            pb.BulkRecordActivitiesRequest(activities=activities[start : start + PER_MESSAGE]).SerializeToString()
            for start in range(0, calls, PER_MESSAGE)
        ]
    return [pb.BulkRecordActivitiesRequest(activity=a).SerializeToString() for a in activities]


async def _load(target: str, kind: str, mode: str, calls: int) -> float:
    """The same client for the limit and the hub: it sends the hub's requests as bytes
    (the raw peer moves the same bytes without decoding them), so the two differ only in
    the server."""
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    payloads = _payloads(mode, calls)
    unary_method, stream_method = _METHODS[kind]
    async with grpc.aio.insecure_channel(target) as channel:
        unary = channel.unary_unary(unary_method, None, None)
        stream = channel.stream_unary(stream_method, None, None)

        async def one(n: int) -> None:
            await unary(payloads[n], metadata=metadata)

        async def bulk() -> None:
            reply = await stream(iter(payloads), metadata=metadata)
            if kind == "hub":
                summary = pb.BulkRecordActivitiesResponse.FromString(reply)
                assert summary.recorded == calls, summary.failed

        started = time.perf_counter()
        if mode == "unary":
            queue = iter(range(calls))

            async def worker() -> None:
                for n in queue:
                    await one(n)

            await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        else:
            await bulk()
        return time.perf_counter() - started


def _load_process(target: str, kind: str, mode: str, calls: int, report: Connection) -> None:
    report.send(run(_load(target, kind, mode, calls)))


def _measure(target: str, kind: str, mode: str, calls: int) -> float:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_load_process, args=(target, kind, mode, calls, child))
    process.start()
    seconds: float = parent.recv() if parent.poll(300) else float("nan")
    process.join(10)
    return seconds


def run_ingest(workdir: Path, calls: int, rounds: int = 3) -> list[IngestResult]:
    """Each round measures the raw limit and the hub (SQLite, memory) back to back for
    each mode, so a drift in the machine's speed (this kind of machine drifts by 20 % over
    minutes) moves the limit and the hub together; the median round is reported."""
    targets = ("raw grpcio (limit)", "collab hub (sqlite)", "collab hub (memory)")
    times: dict[tuple[str, str], list[float]] = {}
    port = free_port()
    raw = _start([sys.executable, "-m", "bench.ingest", "raw-server", str(port)], "ready")
    try:
        for round_number in range(rounds):
            for mode in MODES:
                if mode != BATCHED:
                    times.setdefault((targets[0], mode), []).append(_measure(f"127.0.0.1:{port}", "raw", mode, calls))
                for store, name in (("sqlite", targets[1]), ("memory", targets[2])):
                    server, target = start_server(workdir / f"{store}-{mode}-{round_number}", COLLAB_STORE=store)
                    try:
                        times.setdefault((name, mode), []).append(_measure(target, "hub", mode, calls))
                    finally:
                        _stop(server)
    finally:
        _stop(raw)
    return [
        IngestResult(name, mode, calls, times[name, mode])
        for mode in MODES
        for name in targets
        if (name, mode) in times
    ]


if __name__ == "__main__" and sys.argv[1:2] == ["raw-server"]:
    run(_serve_raw(int(sys.argv[2])))
