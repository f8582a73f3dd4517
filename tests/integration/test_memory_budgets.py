"""Memory budgets through real processes (issue 17, items 2 and 4).

A flood of large open activities from ever new agent ids (so the per-agent rate limit
does not apply) is refused at the open-activity budget, RESOURCE_EXHAUSTED over gRPC
and 507 over REST, with a message naming the budget, while every other client is still
served and the rate limit stays a distinguishable 429; the RSS of both processes stays
within their budgets. After a bridge restart, 10 SSE clients resuming at once from
before a large backlog each get every event, and the bridge's RSS stays bounded.

The budgets are set small here so that a few megabytes reach them; what the RSS may
grow by is those budgets plus a fixed allowance for the interpreter, gRPC and the
allocator (not a timing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from websockets.asyncio.client import connect

from bench.memory_budgets import flood, follow_sse
from tests.support.faults import rss_mb
from tests.support.processes import BridgeProcess
from tests.support.rpc import READ_KEY, WRITE_KEY, Client, trailer
from tests.support.stack import API, AUTH, BRIDGE_ENV, Stack, opened, running_stack, wait_ready

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
METADATA = 60_000  # characters of metadata per activity, as in the issue
OPEN_BYTES = 4 * MiB  # the open-activity budget here: about 68 of them
SERVER_BUDGETS = {
    "COLLAB_MAX_OPEN_ACTIVITY_BYTES": str(OPEN_BYTES),
    "COLLAB_HISTORY_BYTES": str(4 * MiB),
    "COLLAB_ENDED_SESSIONS_BYTES": str(4 * MiB),
    "COLLAB_EVENT_RETAIN_BYTES": str(16 * MiB),
    "COLLAB_IDEMPOTENCY_BYTES": str(4 * MiB),
    "COLLAB_RATE_LIMIT": "1",  # per agent: the flood's new ids sidestep it, a repeated one meets it
}
BRIDGE_BUDGETS = {
    "COLLAB_EVENT_BUFFER_BYTES": str(4 * MiB),
    "COLLAB_CLIENT_BACKLOG_BYTES": str(1 * MiB),
    "COLLAB_MAX_CONCURRENT_RESUMES": "4",
}
# What the interpreter, gRPC's buffers and the allocator may add beyond the budgets.
ALLOWANCE_MB = 48


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("budgets"), SERVER_BUDGETS, bridge_env={**BRIDGE_ENV, **BRIDGE_BUDGETS}
    ) as running:
        yield running


async def test_a_flood_of_large_open_activities_is_refused_at_the_budget_and_others_are_served(
    stack: Stack,
) -> None:
    server_before = rss_mb(stack.server.process.pid)  # type: ignore[union-attr]
    bridge_before = rss_mb(stack.bridge.process.pid)  # type: ignore[union-attr]
    flooded = await flood(stack.server.target, WRITE_KEY, 600, METADATA, concurrency=8)
    # ~36 MB offered; the budget holds 4 MiB of them.
    fits = OPEN_BYTES // (METADATA + 600)
    assert fits - 2 <= flooded.accepted <= fits + 2, flooded
    assert flooded.refused == {"RESOURCE_EXHAUSTED max-open-activity-bytes": 600 - flooded.accepted}
    assert "COLLAB_MAX_OPEN_ACTIVITY_BYTES" in flooded.first_refusal
    assert "complete open activities" in flooded.first_refusal

    rpc = Client.connect(stack.server.target)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await rpc.record("one_more", metadata=_struct(METADATA))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert trailer(refused.value, "collab-budget") == "max-open-activity-bytes"
        pairs = cast("Sequence[tuple[str, str]]", refused.value.trailing_metadata() or ())
        assert all(key != "retry-after" for key, _ in pairs)
    finally:
        await rpc.close()

    async with httpx.AsyncClient(base_url=stack.bridge.http, headers=AUTH, timeout=30) as http:
        body = {"agent_id": "rest_flooder", "activity_type": "task_assigned", "metadata": {"blob": "x" * METADATA}}
        full = await http.post(f"{API}/record-activity", json=body)
        assert full.status_code == 507, full.text
        assert full.json()["code"] == "RESOURCE_EXHAUSTED" and "budget" in full.json()["detail"]
        assert "retry-after" not in full.headers

        # Everyone else is still served: reads, a new WebSocket, small writes.
        status = await http.get(f"{API}/agent-status")
        assert status.status_code == 200 and status.json()["active_activities"] == flooded.accepted
        assert (await http.get(f"{API}/activity-feed", params={"limit": 5})).status_code == 200
        async with connect(stack.ws_url(token=READ_KEY, client_id="reader"), max_size=None) as reader:
            await opened(reader)
        small = {"agent_id": "steady", "activity_type": "task_assigned"}
        first = await http.post(f"{API}/record-activity", json=small)
        assert first.status_code == 200, first.text
        # The per-agent rate limit is still a 429 with Retry-After, told apart from the budget.
        limited = await http.post(f"{API}/record-activity", json=small)
        assert limited.status_code == 429 and limited.headers.get("retry-after")

        # Completing an activity frees room in the budget; what was accepted is all there.
        feed = await http.get(f"{API}/activity-feed", params={"limit": 500})
        flooded_ids = [a["activity_id"] for a in feed.json()["activities"] if a["agent_id"].startswith("flood_")]
        assert 0 < len(flooded_ids) <= flooded.accepted
        done = await http.post(f"{API}/complete-activity", json={"activity_id": flooded_ids[0], "success": True})
        assert done.status_code == 200, done.text
        again = await http.post(f"{API}/record-activity", json={**body, "agent_id": "after_completion"})
        assert again.status_code == 200, again.text

    server_growth = rss_mb(stack.server.process.pid) - server_before  # type: ignore[union-attr]
    bridge_growth = rss_mb(stack.bridge.process.pid) - bridge_before  # type: ignore[union-attr]
    # Open activities, history and the resume log share their metadata: the largest bounds it.
    assert server_growth < (16 + 4) + ALLOWANCE_MB, f"server RSS grew {server_growth:.1f} MB"
    assert bridge_growth < 4 + ALLOWANCE_MB, f"bridge RSS grew {bridge_growth:.1f} MB"


async def test_ten_sse_resumes_after_a_bridge_restart_stay_bounded(tmp_path: Path) -> None:
    server_env = {**SERVER_BUDGETS, "COLLAB_RATE_LIMIT": "0", "COLLAB_MAX_OPEN_ACTIVITY_BYTES": str(64 * MiB)}
    with running_stack(tmp_path, server_env, bridge_env={**BRIDGE_ENV, **BRIDGE_BUDGETS}) as stack:
        async with connect(stack.ws_url(), max_size=None) as ws:
            established, _ = await opened(ws)
        epoch, since = established["epoch"], established["seq"]
        # 240 events of 30 KB: 7 MB each client must be given, from before the bridge's buffer.
        flooded = await flood(stack.server.target, WRITE_KEY, 240, 30_000, concurrency=4, prefix="backlog")
        assert flooded.accepted == 240
        until = since + 240

        assert stack.bridge.stop() == 0
        stack.bridge = BridgeProcess(
            stack.server.target, data_dir=tmp_path / "bridge", env={**BRIDGE_ENV, **BRIDGE_BUDGETS}
        ).start()
        wait_ready(stack)
        before = rss_mb(stack.bridge.process.pid)  # type: ignore[union-attr]
        followed = await asyncio.gather(
            *(follow_sse(stack.bridge.http, READ_KEY, epoch, since, until) for _ in range(10))
        )
        for one in followed:
            assert one.seqs == list(range(since + 1, until + 1)), (len(one.seqs), one.reconnects)
            assert one.recovered and all(one.recovered)  # resumed every time, never reset to a snapshot
        peak_growth = rss_mb(stack.bridge.process.pid, peak=True) - before  # type: ignore[union-attr]
        # At most 4 resumes at once, each holding one client's backlog (1 MiB) at most.
        assert peak_growth < 4 * 1 + ALLOWANCE_MB, f"bridge peak RSS grew {peak_growth:.1f} MB"


def _struct(size: int) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    metadata.update({"blob": "x" * size})
    return metadata
