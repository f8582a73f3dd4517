"""Memory under a flood of large records and under concurrent resumes (issue 17, items 2
and 4), with real `collab-server` + `collab-bridge` processes:

1. ``--activities`` open activities (12,000 in the issue) with ``--metadata-kb`` of
   metadata each (60), each from a new agent id (so the per-agent rate limit does not
   apply), sent ``--concurrency`` at a time: how many the server accepts before its
   open-activity budget refuses them, and the RSS of both processes before and after.
2. The bridge restarted, then ``--resumes`` SSE clients (10) with a read key resume at
   once from before the flood: the bridge's RSS before and at its peak.

    python -m bench.memory_budgets [--activities 12000] [--metadata-kb 60] [--store sqlite]

Budgets are the servers' defaults unless given as COLLAB_* variables in the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import httpx

from bench.fanout import TOKEN, _start, _stop, free_port
from bench.memory import rss_kb
from collab_grpc.errors import BUDGET_TRAILER
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc

__all__ = ["FloodResult", "flood", "follow_sse", "main"]

READ_TOKEN = "bench-read-token"


@dataclass
class FloodResult:
    attempted: int = 0
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # by status, with the budget named
    first_refusal: str = ""
    seconds: float = 0.0


def large_metadata(size: int) -> dict[str, Any]:
    return {"blob": "x" * size}


async def flood(
    target: str, token: str, count: int, metadata_bytes: int, concurrency: int = 16, prefix: str = "flood"
) -> FloodResult:
    """``count`` RecordActivity calls with ``metadata_bytes`` of metadata, each from a new
    agent id, ``concurrency`` at a time."""
    result = FloodResult(attempted=count)
    request_metadata = pb.RecordActivityRequest().metadata
    request_metadata.update(large_metadata(metadata_bytes))
    auth = (("authorization", f"Bearer {token}"),)
    started = time.monotonic()
    next_index = iter(range(count))
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.max_send_message_length", 8 * 1024 * 1024)]
    ) as channel:
        stub = pb_grpc.CollaborationServiceStub(channel)

        async def worker() -> None:
            for index in next_index:
                request = pb.RecordActivityRequest(
                    agent_id=f"{prefix}_{index}",
                    activity_type=pb.ACTIVITY_TYPE_TASK_ASSIGNED,
                    metadata=request_metadata,
                )
                try:
                    await stub.RecordActivity(request, metadata=auth, timeout=60)
                    result.accepted += 1
                except grpc.aio.AioRpcError as error:
                    pairs = cast("Sequence[tuple[str, str]]", error.trailing_metadata() or ())
                    budget = next((value for key, value in pairs if key == BUDGET_TRAILER), "")
                    key = f"{error.code().name} {budget}".strip()
                    result.refused[key] = result.refused.get(key, 0) + 1
                    result.first_refusal = result.first_refusal or (error.details() or "")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.monotonic() - started
    return result


@dataclass
class Followed:
    """What one SSE client received while resuming: the event seqs, how many times it
    had to reconnect (its stream ended, or it was refused, before it was caught up)."""

    seqs: list[int] = field(default_factory=list)
    reconnects: int = 0
    recovered: list[bool] = field(default_factory=list)


async def follow_sse(http: str, token: str, epoch: str, since: int, until: int, *, within: float = 120.0) -> Followed:
    """Resume the SSE stream from ``since`` and read until event ``until``, reconnecting
    as a browser's EventSource does (with the last id received) when the stream ends or
    is refused. Gives up at ``within`` seconds, or when the bridge could not resume it
    (``recovered`` false: the events are no longer kept; it was sent a snapshot)."""
    followed = Followed()
    last = since
    deadline = time.monotonic() + within
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
        while last < until and time.monotonic() < deadline and all(followed.recovered):
            url = f"{http}/api/v1/collaboration/events?epoch={epoch}"
            try:
                async with client.stream("GET", url, headers={**headers, "Last-Event-ID": str(last)}) as response:
                    if response.status_code != 200:
                        await response.aread()
                        followed.reconnects += 1
                        await asyncio.sleep(float(response.headers.get("retry-after", "0.5")))
                        continue
                    kind = ""
                    async for line in response.aiter_lines():
                        if line.startswith("event: "):
                            kind = line[7:]
                        elif line.startswith("data: ") and kind == "connection_established":
                            followed.recovered.append(bool(json.loads(line[6:]).get("recovered")))
                        elif line.startswith("id: "):
                            last = int(line[4:])
                            followed.seqs.append(last)
                        # Status updates arrive every few seconds, so this is checked.
                        if last >= until or not all(followed.recovered) or time.monotonic() > deadline:
                            break
            except httpx.HTTPError:
                pass
            if last < until and all(followed.recovered):
                followed.reconnects += 1
                await asyncio.sleep(0.5)
    return followed


def _mb(kb: int) -> float:
    return kb / 1024


def _server(data_dir: Path, store: str) -> tuple[Any, str]:
    port = free_port()
    env = {
        "COLLAB_API_KEYS": TOKEN,
        "COLLAB_READ_KEYS": READ_TOKEN,
        "COLLAB_RATE_LIMIT": "10",
        "COLLAB_STORE": store,
        "COLLAB_LOG_LEVEL": "warning",
    }
    argv = [sys.executable, "-m", "collab_grpc.server", "--grpc-addr", f"127.0.0.1:{port}", "--data-dir", str(data_dir)]
    return _start(argv, "listening on", env), f"127.0.0.1:{port}"


def _bridge(target: str) -> tuple[Any, str]:
    port = free_port()
    argv = [sys.executable, "-m", "bridge.main", "--bridge-addr", f"127.0.0.1:{port}", "--grpc-target", target]
    env = {"COLLAB_UPSTREAM_TOKEN": TOKEN, "COLLAB_LOG_LEVEL": "warning"}
    bridge = _start(argv, "listening on", env)
    http = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while httpx.get(f"{http}/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    return bridge, http


def _position(http: str) -> tuple[str, int]:
    """The epoch and newest seq, from the WebSocket's first message over SSE."""
    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{http}/api/v1/collaboration/events", headers={"Authorization": f"Bearer {TOKEN}"}) as r,
    ):
        for line in r.iter_lines():
            if line.startswith("data: "):
                message = json.loads(line[6:])
                if message.get("type") == "collaboration_state":
                    return message["epoch"], message["seq"]
    raise RuntimeError("no collaboration_state")


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"activities": args.activities, "metadata_kb": args.metadata_kb, "store": args.store}
    workdir = Path(tempfile.mkdtemp(prefix="collab-memory-budgets-"))
    server, target = _server(workdir / "server", args.store)
    bridge, http = _bridge(target)
    try:
        time.sleep(1.0)
        epoch, start_seq = _position(http)
        server_before, bridge_before = rss_kb(server.pid), rss_kb(bridge.pid)
        flooded = asyncio.run(flood(target, TOKEN, args.activities, args.metadata_kb * 1000, args.concurrency))
        time.sleep(1.0)
        report["flood"] = asdict(flooded)
        report["server_rss_mb"] = {
            "before": _mb(server_before),
            "after": _mb(rss_kb(server.pid)),
            "peak": _mb(rss_kb(server.pid, "VmHWM")),
        }
        report["bridge_rss_mb"] = {
            "before": _mb(bridge_before),
            "after": _mb(rss_kb(bridge.pid)),
            "peak": _mb(rss_kb(bridge.pid, "VmHWM")),
        }
        database = workdir / "server" / "collab.db"
        if database.exists():
            report["database_mb"] = sum(p.stat().st_size for p in database.parent.glob("collab.db*") if p.is_file()) / (
                1024 * 1024
            )
        _, end_seq = _position(http)

        _stop(bridge)  # a bridge restart: every client resumes from the server's log
        bridge, http = _bridge(target)
        time.sleep(1.0)
        before = rss_kb(bridge.pid)
        started = time.monotonic()

        async def resumes() -> list[Followed]:
            return list(
                await asyncio.gather(
                    *(follow_sse(http, READ_TOKEN, epoch, start_seq, end_seq) for _ in range(args.resumes))
                )
            )

        followed = asyncio.run(resumes())
        report["resumes"] = {
            "clients": args.resumes,
            "events_each": end_seq - start_seq,
            "complete": sum(1 for f in followed if f.seqs == list(range(start_seq + 1, end_seq + 1))),
            "reconnects": sum(f.reconnects for f in followed),
            "seconds": time.monotonic() - started,
            "bridge_rss_mb": {"before": _mb(before), "after": _mb(rss_kb(bridge.pid))},
            "bridge_peak_mb": _mb(rss_kb(bridge.pid, "VmHWM")),
        }
    finally:
        _stop(bridge)
        _stop(server)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_budgets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--activities", type=int, default=12_000)
    parser.add_argument("--metadata-kb", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--resumes", type=int, default=10)
    parser.add_argument("--store", default="sqlite", choices=("sqlite", "memory"))
    args = parser.parse_args(argv)
    report = run(args)
    report["budgets"] = {name: value for name, value in os.environ.items() if name.startswith("COLLAB_")}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
