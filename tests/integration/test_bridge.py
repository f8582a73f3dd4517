"""`collab-bridge` and `collab-server` as real processes, driven as browsers and scripts
drive them: the guide's REST routes and WebSocket messages, checked against the contract."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.support.contract import validate_rest, validate_ws
from tests.support.processes import BridgeProcess, OutputLines
from tests.support.rpc import READ_KEY, WRITE_KEY
from tests.support.stack import (
    API,
    AUTH,
    BRIDGE_ENV,
    Stack,
    is_event,
    opened,
    record,
    recv,
    recv_until,
    running_stack,
    start_stack,
    stop_stack,
    wait_ready,
)
from tests.support.stalled import StalledClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


# -- the guide's examples ------------------------------------------------------------------


GUIDE_PYTHON_EXAMPLE = """
import asyncio
import websockets
import json

async def connect_collaboration():
    uri = "{uri}"

    async with websockets.connect(uri) as websocket:
        # Receive initial state
        message = await websocket.recv()
        data = json.loads(message)
        print(f"Initial state: {{data}}")

        # Send ping
        await websocket.send(json.dumps({{"type": "ping"}}))

        # Listen for updates
        while True:
            message = await websocket.recv()
            data = json.loads(message)

            if data["type"] == "agent_activity":
                print(f"Activity: {{data['activity']['activity_type']}}")
            elif data["type"] == "memory_update":
                print(f"Memory update: {{data['update']['operation']}}")
            elif data["type"] == "agent_status_update":
                print(f"Status update: {{data['agents']}}")

# Run
asyncio.run(connect_collaboration())
"""


def run_script(path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-u", str(path)], stdout=subprocess.PIPE, text=True)


async def test_the_guides_python_example_works_with_a_token(
    stack: Stack, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    script = tmp_path / "example.py"
    script.write_text(GUIDE_PYTHON_EXAMPLE.format(uri=stack.ws_url(client_id="client_1")))
    example = run_script(script)
    assert example.stdout is not None
    output = OutputLines(example.stdout)
    try:
        await asyncio.to_thread(output.wait_for, "Initial state: {'type': 'connection_established'")
        await asyncio.sleep(0.3)  # the script reads the rest of its opening and waits
        await record(http, "guide_agent", "memory_write", metadata={"item_id": "item_123", "size_bytes": 1024})
        response = await http.post(
            f"{API}/record-memory-update",
            json={"operation": "write", "item_id": "item_123", "agent_id": "guide_agent", "metadata": {}},
        )
        validate_rest("record-memory-update", response.json())
        await asyncio.to_thread(output.wait_for, "Activity: memory_write")
        await asyncio.to_thread(output.wait_for, "Memory update: write")
        await asyncio.to_thread(output.wait_for, "Status update: {", 5)
    finally:
        example.kill()
        example.wait()


GUIDE_REQUESTS_EXAMPLE = """
import requests

# Record an activity
response = requests.post(
    "http://localhost:8000/api/v1/collaboration/record-activity",
    headers={"Authorization": "Bearer YOUR_TOKEN"},
    json={
        "agent_id": "agent_1",
        "department": "engineering",
        "activity_type": "memory_write",
        "metadata": {
            "item_id": "item_123",
            "size_bytes": 1024
        },
        "related_agents": ["agent_2"]
    }
)
print(response.json())

# Complete the activity
response = requests.post(
    "http://localhost:8000/api/v1/collaboration/complete-activity",
    headers={"Authorization": "Bearer YOUR_TOKEN"},
    json={
        "activity_id": response.json()["activity_id"],
        "success": True
    }
)
"""

GUIDE_JAVASCRIPT_EXAMPLE = """
const ws = new WebSocket('ws://localhost:8000/api/v1/collaboration/ws?client_id=client_1');

ws.onopen = () => {
  console.log('Connected to collaboration WebSocket');

  // Send ping
  setInterval(() => {
    ws.send(JSON.stringify({ type: 'ping' }));
  }, 30000); // Every 30 seconds
};

ws.onmessage = (event) => {
  const data = JSON.parse(event.data);

  switch (data.type) {
    case 'collaboration_state':
      console.log('Initial state:', data);
      break;
    case 'agent_activity':
      console.log('Activity:', data.activity);
      break;
    case 'memory_update':
      console.log('Memory update:', data.update);
      break;
    case 'agent_status_update':
      console.log('Status update:', data.agents);
      break;
  }
};

ws.onerror = (error) => {
  console.error('WebSocket error:', error);
};

ws.onclose = () => {
  console.log('WebSocket closed');
};
"""


async def test_the_guides_requests_example_works_with_a_token(
    stack: Stack, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    script = tmp_path / "record.py"
    script.write_text(
        GUIDE_REQUESTS_EXAMPLE.replace("http://localhost:8000", stack.bridge.http).replace("YOUR_TOKEN", WRITE_KEY)
    )
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(script)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip()
    assert printed.startswith("{'success': True, 'activity_id': 'act_"), printed
    activity_id = printed.split("'activity_id': '", 1)[1].split("'", 1)[0]
    activity = (await http.get(f"{API}/activities/{activity_id}")).json()["activity"]
    assert (activity["agent_id"], activity["status"]) == ("agent_1", "completed")


def run_node(path: Path) -> subprocess.Popen[str]:
    # Node 20 has the browser WebSocket API behind this flag (on by default from Node 22).
    return subprocess.Popen(["node", "--experimental-websocket", str(path)], stdout=subprocess.PIPE, text=True)


async def test_the_guides_javascript_example_works_with_a_token(
    stack: Stack, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    script = tmp_path / "example.js"
    url = stack.ws_url(client_id="client_1")
    script.write_text(
        GUIDE_JAVASCRIPT_EXAMPLE.replace("ws://localhost:8000/api/v1/collaboration/ws?client_id=client_1", url)
    )
    example = run_node(script)
    assert example.stdout is not None
    output = OutputLines(example.stdout)
    try:
        await asyncio.to_thread(output.wait_for, "Connected to collaboration WebSocket")
        await asyncio.to_thread(output.wait_for, "Initial state:")
        await record(http, "js_agent", "message_sent")
        await asyncio.to_thread(output.wait_for, "Activity:")
        await asyncio.to_thread(output.wait_for, "Status update:", 5)
    finally:
        example.kill()
        example.wait()


# -- REST ---------------------------------------------------------------------------------


async def test_every_rest_route_answers_in_the_guides_shapes(http: httpx.AsyncClient) -> None:
    activity_id = await record(
        http,
        "rest_agent",
        "council_debate",
        department="engineering",
        metadata={"item_id": "item_123", "size_bytes": 1024, "ratio": 13.3},
        related_agents=["agent_2"],
    )
    feed = validate_rest("activity-feed", (await http.get(f"{API}/activity-feed?agent_id=rest_agent&limit=5")).json())
    assert feed["agent_id"] == "rest_agent" and feed["total"] == 1
    (activity,) = feed["activities"]
    assert activity["metadata"] == {"item_id": "item_123", "size_bytes": 1024, "ratio": 13.3}
    assert isinstance(activity["timestamp"], float) and activity["status"] == "active"

    status = validate_rest("agent-status", (await http.get(f"{API}/agent-status")).json())
    assert status["agents"]["rest_agent"]["current_activity"] == activity_id

    done = await http.post(f"{API}/complete-activity", json={"activity_id": activity_id, "success": True})
    assert validate_rest("complete-activity", done.json()) == {"success": True, "activity_id": activity_id}
    status = (await http.get(f"{API}/agent-status")).json()
    assert status["agents"]["rest_agent"]["status"] == "idle"

    started = await http.post(f"{API}/start-collaboration", json={"participants": ["rest_agent", "agent_2"]})
    session_id = validate_rest("start-collaboration", started.json())["session_id"]
    in_session = await record(http, "rest_agent", "task_assigned", session_id=session_id)
    decided = await http.post(
        f"{API}/record-decision",
        json={"session_id": session_id, "agent_id": "rest_agent", "decision": "go", "votes": {"agent_2": "yes"}},
    )
    assert decided.status_code == 200 and decided.json()["decision_id"].startswith("dec_")
    active = validate_rest("active-collaborations", (await http.get(f"{API}/active-collaborations")).json())
    (mine,) = [c for c in active["collaborations"] if c["session_id"] == session_id]
    assert (mine["activity_count"], mine["decision_count"]) == (1, 1)
    detail = (await http.get(f"{API}/collaborations/{session_id}")).json()
    assert [a["activity_id"] for a in detail["activities"]] == [in_session]
    assert detail["decisions"][0]["votes"] == {"agent_2": "yes"}

    ended = await http.post(f"{API}/end-collaboration", json={"session_id": session_id})
    assert validate_rest("end-collaboration", ended.json()) == {"success": True, "session_id": session_id}
    history = (await http.get(f"{API}/ended-collaborations?limit=1")).json()
    assert history["collaborations"][0]["session_id"] == session_id and history["collaborations"][0]["ended_at"]
    memory = await http.post(
        f"{API}/record-memory-update",
        json={"operation": "delete", "item_id": "item_9", "agent_id": "rest_agent"},
    )
    assert validate_rest("record-memory-update", memory.json()) == {"success": True}
    listed = (await http.get(f"{API}/memory-updates?agent_id=rest_agent&limit=1")).json()
    (newest,) = listed["memory_updates"]
    assert newest["update"] == {
        "operation": "delete",
        "item_id": "item_9",
        "agent_id": "rest_agent",
        "timestamp": newest["update"]["timestamp"],
        "metadata": {},
    }
    assert newest["seq"] >= listed["oldest_retained_seq"] and listed["epoch"]
    one = (await http.get(f"{API}/activities/{activity_id}")).json()
    assert one["activity"]["status"] == "completed"


async def test_idempotency_key_header_records_once(http: httpx.AsyncClient) -> None:
    body = {"agent_id": "idem_agent", "activity_type": "task_assigned"}
    first = await http.post(f"{API}/record-activity", json=body, headers={"Idempotency-Key": "k-1"})
    again = await http.post(f"{API}/record-activity", json=body, headers={"Idempotency-Key": "k-1"})
    assert first.json() == again.json()
    feed = (await http.get(f"{API}/activity-feed?agent_id=idem_agent")).json()
    assert feed["total"] == 1
    other = await http.post(
        f"{API}/record-activity", json={**body, "activity_type": "task_completed"}, headers={"Idempotency-Key": "k-1"}
    )
    assert other.status_code == 409 and "already used" in other.json()["detail"]


async def test_rest_errors_have_the_documented_status_and_say_what_is_wrong(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    async with httpx.AsyncClient(base_url=stack.bridge.http, timeout=10) as anonymous:
        missing = await anonymous.get(f"{API}/agent-status")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "missing credential" in missing.json()["detail"]
        wrong = await anonymous.get(f"{API}/agent-status", headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401
        read_only = {"Authorization": f"Bearer {READ_KEY}"}
        assert (await anonymous.get(f"{API}/agent-status", headers=read_only)).status_code == 200
        denied = await anonymous.post(
            f"{API}/record-activity", headers=read_only, json={"agent_id": "a", "activity_type": "memory_read"}
        )
        assert denied.status_code == 403 and "read-only" in denied.json()["detail"]

    cases: list[tuple[str, str, dict[str, Any] | None, int, str]] = [
        ("post", "complete-activity", {"activity_id": "act_missing"}, 404, "not found"),
        ("post", "end-collaboration", {"session_id": "collab_missing"}, 404, "not found"),
        ("get", "collaborations/collab_missing", None, 404, "not found"),
        ("get", "activities/act_missing", None, 404, "not found"),
        ("post", "record-activity", {"agent_id": "has space", "activity_type": "memory_read"}, 400, "white space"),
        ("post", "record-activity", {"agent_id": "a", "activity_type": "dancing"}, 422, "activity_type"),
        ("post", "record-activity", {"activity_type": "memory_read"}, 422, "agent_id"),
        ("post", "record-activity", {"agent_id": "a", "activity_type": "memory_read", "extra": 1}, 422, "extra"),
        ("post", "start-collaboration", {"participants": []}, 400, "participants"),
        ("post", "record-memory-update", {"operation": "erase", "item_id": "i", "agent_id": "a"}, 422, "operation"),
        ("get", "activity-feed?limit=0", None, 422, "limit"),
        ("get", "activity-feed?limit=501", None, 422, "limit"),
        ("get", "ended-collaborations?limit=501", None, 422, "limit"),
        ("get", "memory-updates?limit=501", None, 422, "limit"),
        ("get", "memory-updates?cursor=made-up", None, 400, "not a cursor"),
    ]
    for method, route, body, status, fragment in cases:
        response = await http.request(method, f"{API}/{route}", json=body)
        assert response.status_code == status, (route, response.text)
        assert fragment in response.text, (route, response.text)

    big = {"agent_id": "a", "activity_type": "memory_read", "metadata": {"blob": "x" * (1024 * 1024)}}
    too_large = await http.post(f"{API}/record-activity", json=big)
    assert too_large.status_code == 413 and "larger than 1048576 bytes" in too_large.json()["detail"]
    over_meta = {"agent_id": "a", "activity_type": "memory_read", "metadata": {"blob": "x" * (65 * 1024)}}
    refused = await http.post(f"{API}/record-activity", json=over_meta)
    assert refused.status_code == 400 and "the limit is 65536" in refused.json()["detail"]
    completed_twice = await record(http, "twice_agent")
    for _ in range(2):
        response = await http.post(f"{API}/complete-activity", json={"activity_id": completed_twice})
    assert response.status_code == 409 and "already completed" in response.json()["detail"]
    feed = (await http.get(f"{API}/activity-feed?agent_id=a")).json()
    assert feed["total"] == 0, "refused writes recorded nothing"


async def test_rate_limit_is_429_with_retry_after(tmp_path: Path) -> None:
    limited = await asyncio.to_thread(start_stack, tmp_path, {"COLLAB_RATE_LIMIT": "2"})
    try:
        async with httpx.AsyncClient(base_url=limited.bridge.http, headers=AUTH, timeout=10) as client:
            statuses = []
            for _ in range(4):
                response = await client.post(
                    f"{API}/record-activity", json={"agent_id": "eager", "activity_type": "message_sent"}
                )
                statuses.append(response.status_code)
            assert statuses[:2] == [200, 200] and statuses[-1] == 429
            assert int(response.headers["retry-after"]) >= 1
            assert "rate limit" in response.json()["detail"]
    finally:
        await asyncio.to_thread(stop_stack, limited)


async def test_server_unreachable_is_503_fast_and_not_ready(tmp_path: Path) -> None:
    bridge = await asyncio.to_thread(BridgeProcess("127.0.0.1:1", data_dir=tmp_path, env=BRIDGE_ENV).start)
    try:
        async with httpx.AsyncClient(base_url=bridge.http, headers=AUTH, timeout=10) as client:
            started = time.monotonic()
            response = await client.get(f"{API}/agent-status")
            assert response.status_code == 503 and "unavailable" in response.json()["detail"]
            assert time.monotonic() - started < 5
            assert (await client.get("/healthz")).status_code == 200
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["ready"] is False
    finally:
        await asyncio.to_thread(bridge.stop)


async def test_openapi_and_docs_are_served(http: httpx.AsyncClient) -> None:
    spec = (await http.get("/openapi.json")).json()
    for route in ("record-activity", "complete-activity", "agent-status", "activity-feed", "record-decision"):
        assert f"{API}/{route}" in spec["paths"]
    assert (await http.get("/docs")).status_code == 200


# -- WebSocket ------------------------------------------------------------------------------


async def test_every_message_type_in_the_guides_shapes_with_seq(stack: Stack, http: httpx.AsyncClient) -> None:
    async with connect(stack.ws_url(client_type="dashboard")) as ws:
        established, state = await opened(ws)
        assert established["client_type"] == "dashboard" and established["client_id"] == "test"
        assert state["epoch"] == established["epoch"] and state["seq"] == established["seq"]
        await ws.send(json.dumps({"type": "subscribe", "activity_types": []}))
        await recv_until(ws, is_event("subscribed"))

        activity_id = await record(http, "ws_agent", "memory_write", related_agents=["agent_2"])
        await http.post(f"{API}/complete-activity", json={"activity_id": activity_id, "success": False})
        await http.post(
            f"{API}/record-memory-update",
            json={"operation": "write", "item_id": "item_1", "agent_id": "ws_agent", "metadata": {"size_bytes": 7}},
        )
        started = (await http.post(f"{API}/start-collaboration", json={"participants": ["ws_agent"]})).json()
        await http.post(
            f"{API}/record-decision",
            json={"session_id": started["session_id"], "agent_id": "ws_agent", "decision": "stop"},
        )
        await http.post(f"{API}/end-collaboration", json={"session_id": started["session_id"]})

        expected = [
            "agent_activity",
            "activity_completed",
            "memory_update",
            "collaboration_started",
            "decision_recorded",
            "collaboration_ended",
        ]
        events = [await recv_until(ws, lambda m: "seq" in m and m["type"] != "collaboration_state") for _ in expected]
        assert [e["type"] for e in events] == expected
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(seqs[0], seqs[0] + len(expected))) and seqs[0] > state["seq"]
        for event in events:
            if event["type"] != "decision_recorded":
                validate_ws(event)
        assert events[0]["activity"]["activity_id"] == activity_id
        assert events[1] == {**events[1], "activity_id": activity_id, "success": False}
        assert events[2]["update"]["metadata"] == {"size_bytes": 7}
        assert events[3]["session"]["session_id"] == started["session_id"]
        status = validate_ws(await recv_until(ws, is_event("agent_status_update"), within=5))
        assert status["agents"]["ws_agent"]["status"] == "idle"


async def test_ping_subscribe_and_malformed_messages(stack: Stack, http: httpx.AsyncClient) -> None:
    async with connect(stack.ws_url()) as ws:
        await opened(ws)
        await ws.send(json.dumps({"type": "ping"}))
        assert (await recv_until(ws, lambda m: m["type"] != "agent_status_update"))["type"] == "pong"
        await ws.send(json.dumps({"type": "subscribe", "activity_types": ["memory_write", "memory_update"]}))
        subscribed = await recv_until(ws, lambda m: m["type"] != "agent_status_update")
        assert subscribed["type"] == "subscribed"
        assert subscribed["activity_types"] == ["agent_activity", "memory_update", "memory_write"]

        bad_messages: list[str | bytes] = [
            "not json",
            json.dumps([1, 2]),
            json.dumps({"type": "dance"}),
            json.dumps({"type": "subscribe", "activity_types": ["agent_dancing"]}),
            json.dumps({"type": "subscribe", "activity_types": "memory_write"}),
            json.dumps({"type": "ping", "pad": "x" * (70 * 1024)}),
            b"\x00\x01binary",
        ]
        for bad in bad_messages:
            await ws.send(bad)
            reply = await recv(ws)
            assert reply["type"] == "error" and reply["error"], reply

        await record(http, "filter_agent", "memory_read")
        wanted = await record(http, "filter_agent", "memory_write")
        await http.post(
            f"{API}/record-memory-update", json={"operation": "read", "item_id": "i", "agent_id": "filter_agent"}
        )
        first = await recv(ws)
        second = await recv(ws)
        assert first["type"] == "agent_activity" and first["activity"]["activity_id"] == wanted
        assert second["type"] == "memory_update"
        await ws.send(json.dumps({"type": "ping"}))
        assert (await recv(ws))["type"] == "pong", "status updates are filtered out; the connection is still up"


async def test_websocket_auth(stack: Stack) -> None:
    for token, code in ((None, 4401), ("wrong", 4401)):
        async with connect(stack.ws_url(token=token)) as ws:
            refusal = await recv(ws)
            assert refusal["type"] == "error" and refusal["code"] == code
            with pytest.raises(ConnectionClosed) as closed:
                await recv(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == code
    async with connect(stack.ws_url(token=READ_KEY)) as ws:
        await opened(ws)
    async with connect(stack.ws_url(since="abc", epoch="e")) as ws:
        assert (await recv(ws))["code"] == 4400


async def test_status_update_every_two_seconds(stack: Stack) -> None:
    async with connect(stack.ws_url()) as ws:
        await opened(ws)
        await ws.send(json.dumps({"type": "subscribe", "activity_types": ["agent_status_update"]}))
        await recv_until(ws, is_event("subscribed"))
        arrivals = []
        for _ in range(3):
            validate_ws(await recv_until(ws, is_event("agent_status_update"), within=5))
            arrivals.append(time.monotonic())
        gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
        assert all(1.5 < gap < 2.6 for gap in gaps), gaps


async def test_resume_after_reconnect_has_no_gap_and_no_duplicate(stack: Stack, http: httpx.AsyncClient) -> None:
    async with connect(stack.ws_url()) as ws:
        established, _ = await opened(ws)
        await record(http, "resume_agent")
        seen = await recv_until(ws, is_event("agent_activity"))
    missed = [await record(http, "resume_agent", "task_assigned") for _ in range(5)]
    async with connect(stack.ws_url(since=seen["seq"], epoch=established["epoch"])) as ws:
        resumed = validate_ws(await recv(ws))
        assert resumed["type"] == "connection_established" and resumed["recovered"] is True
        replay = [await recv_until(ws, lambda m: "seq" in m) for _ in missed]
        assert [m["activity"]["activity_id"] for m in replay] == missed
        assert [m["seq"] for m in replay] == list(range(seen["seq"] + 1, seen["seq"] + 6))
        live = await record(http, "resume_agent", "task_completed")
        after = await recv_until(ws, lambda m: "seq" in m)
        assert after["activity"]["activity_id"] == live and after["seq"] == replay[-1]["seq"] + 1


async def test_resume_that_cannot_be_filled_says_so_and_sends_fresh_state(stack: Stack) -> None:
    async with connect(stack.ws_url(since=1, epoch="some-other-epoch")) as ws:
        established = validate_ws(await recv(ws))
        assert established["recovered"] is False and "epoch" in established["reason"]
        assert validate_ws(await recv(ws))["type"] == "collaboration_state"


async def test_stalled_client_is_cut_off_while_a_healthy_one_gets_everything(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    count = 300  # 60 KB each, ~18 MB: far beyond the stalled socket's buffers plus the 64-message backlog
    blob = "x" * 60_000
    stalled = StalledClient(stack.ws_url(client_id="stalled"), stack.bridge.port)
    try:
        async with connect(stack.ws_url(client_id="healthy"), max_size=None) as healthy:
            await opened(healthy)
            await healthy.send(json.dumps({"type": "subscribe", "activity_types": ["agent_activity"]}))
            await recv_until(healthy, is_event("subscribed"))
            received: list[int] = []

            async def read_healthy() -> None:
                while len(received) < count:
                    message = await recv(healthy, 30)
                    if message["type"] == "agent_activity" and message["activity"]["agent_id"] == "flood_agent":
                        received.append(message["seq"])

            reader = asyncio.create_task(read_healthy())
            for _ in range(count):
                await record(http, "flood_agent", "message_sent", metadata={"blob": blob})
            await asyncio.wait_for(reader, 60)
            assert received == sorted(received) and len(set(received)) == count

        texts, close = await asyncio.to_thread(stalled.read_until_closed)
        assert close.code == 4008 and "too slow" in close.reason, close
        assert texts < count + 2, "the stalled client was cut off, not sent everything"
        since = int(close.reason.rsplit("since=", 1)[1])
        assert since < received[-1]
    finally:
        stalled.close()


async def test_compression_is_declined_by_default_and_events_still_arrive(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    # Browsers offer permessage-deflate; declined, every client takes the broadcast frame
    # built once, and holds no compression buffers (docs/BENCHMARKS.md, "Memory").
    async with connect(stack.ws_url(client_id="offers-deflate"), compression="deflate") as ws:
        assert ws.protocol.extensions == []
        await opened(ws)
        activity_id = await record(http, "deflate_agent", "message_sent")
        message = validate_ws(await recv_until(ws, is_event("agent_activity")))
        assert message["activity"]["activity_id"] == activity_id


async def test_compression_can_be_turned_on(tmp_path: Path) -> None:
    with running_stack(tmp_path, bridge_env={"COLLAB_WS_COMPRESSION": "on"}) as compressed:
        async with (
            httpx.AsyncClient(base_url=compressed.bridge.http, headers=AUTH, timeout=10) as http,
            connect(compressed.ws_url(client_id="compressed"), compression="deflate") as ws,
        ):
            assert [type(extension).__name__ for extension in ws.protocol.extensions] == ["PerMessageDeflate"]
            await opened(ws)
            activity_id = await record(http, "deflate_agent", "message_sent", metadata={"text": "y" * 5000})
            message = validate_ws(await recv_until(ws, is_event("agent_activity")))
            assert message["activity"]["activity_id"] == activity_id


async def test_two_hundred_clients_receive_every_event_of_a_burst_in_order(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    clients = [await connect(stack.ws_url(client_id=f"c{n}")) for n in range(200)]
    try:
        for ws in clients:
            await opened(ws)
            await ws.send(json.dumps({"type": "subscribe", "activity_types": ["agent_activity"]}))
        burst = 50
        recorded = [await record(http, "burst_agent", "task_completed") for _ in range(burst)]

        async def collect(ws: ClientConnection) -> list[str]:
            ids: list[str] = []
            while len(ids) < burst:
                message = await recv(ws, 20)
                if message["type"] == "agent_activity" and message["activity"]["agent_id"] == "burst_agent":
                    ids.append(message["activity"]["activity_id"])
            return ids

        results = await asyncio.gather(*(collect(ws) for ws in clients))
        assert all(ids == recorded for ids in results)
    finally:
        await asyncio.gather(*(ws.close() for ws in clients))


async def test_server_sent_events_with_resume(stack: Stack, http: httpx.AsyncClient) -> None:
    async def read_events(response: httpx.Response, count: int) -> list[tuple[str, str, dict[str, Any]]]:
        events: list[tuple[str, str, dict[str, Any]]] = []
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            events.append((fields.get("id", ""), fields["event"], json.loads(fields["data"])))
            fields = {}
            if len(events) == count:
                break
        return events

    url = f"{API}/events?types=agent_activity"
    async with http.stream("GET", url) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        recorded = await record(http, "sse_agent", "agent_started")
        opening = await asyncio.wait_for(read_events(response, 3), 10)
    assert [kind for _, kind, _ in opening] == ["connection_established", "collaboration_state", "agent_activity"]
    last_id, _, event = opening[2]
    assert event["activity"]["activity_id"] == recorded and last_id == str(event["seq"])

    missed = [await record(http, "sse_agent", "agent_completed") for _ in range(3)]
    async with http.stream("GET", url, headers={"Last-Event-ID": last_id}) as response:
        resumed = await asyncio.wait_for(read_events(response, 4), 10)
    assert resumed[0][2]["recovered"] is True
    assert [data["activity"]["activity_id"] for _, _, data in resumed[1:]] == missed

    async with httpx.AsyncClient(base_url=stack.bridge.http, timeout=10) as anonymous:
        refused = await anonymous.get(f"{API}/events")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["code"] == "UNAUTHENTICATED"
    bad_id = await http.get(f"{API}/events", headers={"Last-Event-ID": "abc"})
    assert bad_id.status_code == 400 and "Last-Event-ID must be an integer" in bad_id.json()["detail"]
    bad_types = await http.get(f"{API}/events?types=dancing")
    assert bad_types.status_code == 400 and "unknown type names: dancing" in bad_types.json()["detail"]


async def test_clients_miss_nothing_across_a_server_restart(tmp_path: Path) -> None:
    """With the SQLite store a restarted server continues its history (same epoch, seq
    going on): the bridge resumes its upstream and connected clients just go on."""
    running = await asyncio.to_thread(start_stack, tmp_path)
    try:
        await asyncio.to_thread(wait_ready, running)
        async with (
            connect(running.ws_url()) as ws,
            httpx.AsyncClient(base_url=running.bridge.http, headers=AUTH, timeout=10) as client,
        ):
            established, _ = await opened(ws)
            await record(client, "restart_agent")
            before = await recv_until(ws, is_event("agent_activity"))
            port = running.server.port
            assert await asyncio.to_thread(running.server.stop) == 0
            down = await client.get(f"{API}/agent-status")
            assert down.status_code == 503
            running.server = await asyncio.to_thread(running.server.start, port)
            assert running.server.epoch == established["epoch"]
            await asyncio.to_thread(wait_ready, running)
            after = await record(client, "restart_agent", "agent_started")
            message = await recv_until(ws, lambda m: m["type"] in ("agent_activity", "collaboration_state"))
            assert message["type"] == "agent_activity", "no reset: the history went on"
            assert message["activity"]["activity_id"] == after and message["seq"] == before["seq"] + 1
    finally:
        await asyncio.to_thread(stop_stack, running)


async def test_a_server_restarted_without_storage_resets_clients(tmp_path: Path) -> None:
    """With the in-memory store a restarted server starts a new history: connected
    clients stay up, are told (a fresh `collaboration_state` with `reset`), and continue."""
    running = await asyncio.to_thread(start_stack, tmp_path, {"COLLAB_STORE": "memory"})
    try:
        await asyncio.to_thread(wait_ready, running)
        async with (
            connect(running.ws_url()) as ws,
            httpx.AsyncClient(base_url=running.bridge.http, headers=AUTH, timeout=10) as client,
        ):
            established, _ = await opened(ws)
            await record(client, "restart_agent")
            await recv_until(ws, is_event("agent_activity"))
            port = running.server.port
            assert await asyncio.to_thread(running.server.stop) == 0
            running.server = await asyncio.to_thread(running.server.start, port)
            reset = validate_ws(await recv_until(ws, is_event("collaboration_state"), within=20))
            assert reset["reset"] is True and reset["epoch"] != established["epoch"]
            after = await record(client, "restart_agent", "agent_started")
            event = await recv_until(ws, is_event("agent_activity"))
            assert event["activity"]["activity_id"] == after and event["seq"] == reset["seq"] + 1
    finally:
        await asyncio.to_thread(stop_stack, running)


def test_bridge_help_lists_its_settings() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bridge.main", "--help"], capture_output=True, text=True, timeout=30, env=os.environ
    )
    assert result.returncode == 0
    for variable in ("COLLAB_BRIDGE_ADDR", "COLLAB_GRPC_TARGET", "COLLAB_UPSTREAM_TOKEN", "COLLAB_CLIENT_BACKLOG"):
        assert variable in result.stdout
