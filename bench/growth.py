"""Growth: a hub that has seen many agents, sessions and activities, some with metadata
at the size limit, still answers every route, RPC and stream under its byte budget, and
its processes' memory stays bounded (issue 17).

``grow`` is the load: distinct agent ids over time (as ephemeral sub-agents make them),
sessions with many participants left active, activities recorded in bulk (each stream at
most the documented maximum) with every ``large_every``-th one carrying metadata near
the limit. Activities are never completed by the load: the server's expiry (a short
``COLLAB_ACTIVITY_TTL``) fails them, so the number open stays bounded by time.

``probe`` reads every route a user meets over REST, a WebSocket and SSE, and reports each
answer's size; tests/integration/test_growth.py asserts the budgets on a scaled load, and
``python -m bench.growth`` runs the full one (with SQLite) for docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf.message import Message
from websockets.asyncio.client import connect

from bench.fanout import TOKEN, _start, _stop, free_port, start_server
from collab_grpc.eventloop import run
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc

__all__ = ["GrowthLoad", "LoadReport", "ProbeReport", "grow", "probe", "probe_rpcs", "rss_kb"]

API = "/api/v1/collaboration"
MAX_BULK_ITEMS = 100_000  # the documented most one bulk stream carries
RETRY_PAUSE = 0.5  # seconds before items a full budget refused are sent again


@dataclass(frozen=True)
class GrowthLoad:
    agents: int = 100_000
    sessions: int = 10_000
    participants: int = 100
    activities: int = 1_000_000
    per_message: int = 500
    large_every: int = 1_000
    large_bytes: int = 60_000
    streams_at_once: int = 2


@dataclass
class LoadReport:
    recorded: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    sessions: int = 0
    streams: int = 0
    retried: int = 0  # items refused by a full budget and sent again
    seconds: float = 0.0
    session_ids: list[str] = field(default_factory=list, repr=False)
    last_activity_id: str = ""  # of the last stream answered: still in the feed's history


@dataclass
class ProbeReport:
    # What was read -> its size in bytes (a REST body, a WebSocket or SSE message).
    sizes: dict[str, int] = field(default_factory=dict)
    # What was read -> the HTTP status or close code when it was not a success.
    failures: dict[str, str] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)


def _metadata(index: int, load: GrowthLoad) -> dict[str, str | int]:
    if index % load.large_every == 0:
        return {"step": index, "blob": "x" * load.large_bytes}
    return {"step": index, "tool": "search"}


def _bulk_messages(indexes: Sequence[int], load: GrowthLoad) -> Iterator[pb.BulkRecordActivitiesRequest]:
    for first in range(0, len(indexes), load.per_message):
        message = pb.BulkRecordActivitiesRequest()
        for index in indexes[first : first + load.per_message]:
            item = message.activities.add(
                agent_id=f"agent_{index % load.agents}",
                department=f"dept_{index % 12}",
                activity_type=pb.ACTIVITY_TYPE_TASK_ASSIGNED,
            )
            item.metadata.update(_metadata(index, load))
        yield message


async def _messages(indexes: Sequence[int], load: GrowthLoad) -> AsyncIterator[pb.BulkRecordActivitiesRequest]:
    for message in _bulk_messages(indexes, load):
        yield message


async def grow(target: str, token: str, load: GrowthLoad) -> LoadReport:
    """Record ``load`` on the server at ``target``; what was recorded and refused."""
    report = LoadReport()
    metadata = (("authorization", f"Bearer {token}"),)
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CollaborationServiceStub(channel)
        for number in range(load.sessions):
            first = number * load.participants
            request = pb.StartCollaborationRequest(
                participants=[f"agent_{(first + k) % load.agents}" for k in range(load.participants)],
                session_type="council",
            )
            if number % load.large_every == 0:
                request.metadata.update({"topic": "y" * load.large_bytes})
            response = await stub.StartCollaboration(request, metadata=metadata)
            report.session_ids.append(response.session_id)
        report.sessions = load.sessions
        gate = asyncio.Semaphore(load.streams_at_once)

        async def stream(start: int, count: int) -> None:
            """Items ``start`` to ``start + count``, on as many streams as it takes, as a
            well-behaved client sends them: an answer that reached the hub's reply budget
            (``incomplete``) covers the first items only, and the rest go on a new stream;
            items a full budget of the hub refused (RESOURCE_EXHAUSTED: too many open
            activities while expiry catches up) are sent again after a pause."""
            pending = list(range(start, start + count))
            while pending:
                async with gate:
                    answer = await stub.BulkRecordActivities(_messages(pending, load), metadata=metadata)
                report.streams += 1
                report.recorded += answer.recorded
                if not answer.incomplete and len(answer.results) < len(pending):
                    raise AssertionError(f"a complete answer covers {len(answer.results)} of {len(pending)} items")
                retry: list[int] = []
                for index, result in zip(pending, answer.results, strict=False):
                    if result.error_code == "RESOURCE_EXHAUSTED":
                        retry.append(index)
                    elif result.error_code:
                        report.refused[result.error_code] = report.refused.get(result.error_code, 0) + 1
                    else:
                        report.last_activity_id = result.activity_id
                report.retried += len(retry)
                pending = retry + pending[len(answer.results) :]
                if retry:
                    await asyncio.sleep(RETRY_PAUSE)

        await asyncio.gather(
            *(
                stream(start, min(MAX_BULK_ITEMS, load.activities - start))
                for start in range(0, load.activities, MAX_BULK_ITEMS)
            )
        )
    report.seconds = time.perf_counter() - started
    return report


async def probe(http: str, ws: str, token: str, report: LoadReport) -> ProbeReport:
    """Read every route a user meets; each answer's size, and what failed."""
    result = ProbeReport()
    headers = {"Authorization": f"Bearer {token}"}
    session = report.session_ids[0] if report.session_ids else "none"
    activity = report.last_activity_id or "none"
    routes = {
        "agent-status": f"{API}/agent-status",
        "agents": f"{API}/agents?limit=500",
        "activity-feed?limit=500": f"{API}/activity-feed?limit=500",
        "active-collaborations": f"{API}/active-collaborations",
        "ended-collaborations?limit=500": f"{API}/ended-collaborations?limit=500",
        "collaborations/{id}": f"{API}/collaborations/{session}",
        "activities/{id}": f"{API}/activities/{activity}",
        "readyz": "/readyz",
    }
    async with httpx.AsyncClient(base_url=http, headers=headers, timeout=30) as client:
        for name, path in routes.items():
            response = await client.get(path)
            result.sizes[name] = len(response.content)
            if response.status_code != 200:
                result.failures[name] = f"HTTP {response.status_code}: {response.text[:200]}"
            elif name == "agent-status":
                body = response.json()
                result.totals = {key: value for key, value in body.items() if isinstance(value, int)}
        async with client.stream("GET", f"{API}/events") as events:
            if events.status_code != 200:
                result.failures["events (SSE)"] = f"HTTP {events.status_code}"
            else:
                async for line in events.aiter_lines():
                    if line.startswith("data:"):
                        result.sizes["events (SSE) first message"] = len(line)
                        break
    try:
        async with connect(f"{ws}?client_id=growth&token={token}", max_size=None, open_timeout=30) as socket:
            for expected in ("connection_established", "collaboration_state"):
                text = await asyncio.wait_for(socket.recv(), 30)
                message = json.loads(text)
                if message.get("type") != expected:
                    result.failures[f"websocket {expected}"] = f"got {message.get('type')}: {str(message)[:200]}"
                    break
                result.sizes[f"websocket {expected}"] = len(text.encode() if isinstance(text, str) else text)
    except Exception as error:  # a refusal or a close is what this reports
        result.failures["websocket"] = repr(error)[:300]
    return result


async def probe_rpcs(target: str, token: str, report: LoadReport) -> dict[str, int]:
    """Every read RPC's answer (and each stream's first message), by its serialised size."""
    metadata = (("authorization", f"Bearer {token}"),)
    session = report.session_ids[0] if report.session_ids else "none"
    sizes: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CollaborationServiceStub(channel)
        unary: dict[str, Awaitable[Message]] = {
            "GetAgentStatus": stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=metadata),
            "ListAgents": stub.ListAgents(pb.ListAgentsRequest(limit=500), metadata=metadata),
            "GetActivityFeed": stub.GetActivityFeed(pb.GetActivityFeedRequest(limit=500), metadata=metadata),
            "ListActiveCollaborations": stub.ListActiveCollaborations(
                pb.ListActiveCollaborationsRequest(), metadata=metadata
            ),
            "ListEndedCollaborations": stub.ListEndedCollaborations(
                pb.ListEndedCollaborationsRequest(limit=500), metadata=metadata
            ),
            "GetCollaboration": stub.GetCollaboration(
                pb.GetCollaborationRequest(session_id=session), metadata=metadata
            ),
        }
        for name, call in unary.items():
            sizes[name] = (await call).ByteSize()
        streams: dict[str, grpc.aio.UnaryStreamCall[Any, Any]] = {
            "SubscribeEvents snapshot": stub.SubscribeEvents(
                pb.SubscribeEventsRequest(include_snapshot=True), metadata=metadata
            ),
            "StreamAgentStatus": stub.StreamAgentStatus(pb.StreamAgentStatusRequest(), metadata=metadata),
        }
        for name, stream in streams.items():
            first = await stream.read()
            stream.cancel()
            assert isinstance(first, Message), f"{name} ended before its first message"
            sizes[name] = first.ByteSize()
    return sizes


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.growth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="sqlite", help="sqlite (default) or memory")
    parser.add_argument("--activities", type=int, default=GrowthLoad.activities)
    parser.add_argument("--agents", type=int, default=GrowthLoad.agents)
    parser.add_argument("--sessions", type=int, default=GrowthLoad.sessions)
    args = parser.parse_args(argv)
    load = GrowthLoad(agents=args.agents, sessions=args.sessions, activities=args.activities)
    with tempfile.TemporaryDirectory() as workdir:
        server, target = start_server(Path(workdir), COLLAB_STORE=args.store, COLLAB_ACTIVITY_TTL="2")
        port = free_port()
        http = f"http://127.0.0.1:{port}"
        bridge = _start(
            [sys.executable, "-m", "bridge.main", "--bridge-addr", f"127.0.0.1:{port}", "--grpc-target", target],
            "listening on",
            {"COLLAB_LOG_LEVEL": "warning", "COLLAB_UPSTREAM_TOKEN": TOKEN},
        )
        try:
            before = {"server": rss_kb(server.pid), "bridge": rss_kb(bridge.pid)}
            report = run(grow(target, TOKEN, load))
            ws = http.replace("http", "ws", 1) + f"{API}/ws"
            found = run(probe(http, ws, TOKEN, report))
            rpc_sizes = run(probe_rpcs(target, TOKEN, report))
            after = {"server": rss_kb(server.pid), "bridge": rss_kb(bridge.pid)}
        finally:
            _stop(bridge)
            _stop(server)
    summary = {
        "load": asdict(load),
        "store": args.store,
        "recorded": report.recorded,
        "bulk streams": report.streams,
        "retried after a budget refusal": report.retried,
        "refused": report.refused,
        "seconds": round(report.seconds, 1),
        "rss_kb_before": before,
        "rss_kb_after": after,
        "sizes": found.sizes,
        "rpc_sizes": rpc_sizes,
        "failures": found.failures,
        "totals": found.totals,
    }
    json.dump(summary, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
