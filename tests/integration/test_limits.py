"""Every hard limit at its boundary, through real processes: exactly at the limit is
accepted, one over is refused with the documented error and changes nothing, through
REST and gRPC where both lead there.

| limit | default | knob | over it |
|---|---|---|---|
| inbound WebSocket message | 64 KiB | COLLAB_MAX_WS_MESSAGE_BYTES | `error`, stays; over twice that: close 1009 |
| REST body | 1 MiB | COLLAB_MAX_BODY_BYTES | 413 PAYLOAD_TOO_LARGE |
| metadata, serialised | 64 KiB | COLLAB_MAX_METADATA_BYTES (server) | 400 / INVALID_ARGUMENT |
| metadata nesting | 32 levels | | 400 / INVALID_ARGUMENT |
| related agents, participants, votes | 100 | | 400 / INVALID_ARGUMENT |
| ids | 128 characters, printable, no white space | | 400 / INVALID_ARGUMENT |
| decision, rationale | 8 KiB | | 400 / INVALID_ARGUMENT |
| connections per token (WebSocket + SSE) | 1000 | COLLAB_MAX_CONNECTIONS_PER_TOKEN | close 4429 / HTTP 429 |
| WebSocket messages per connection | 20/s, bursts of 40 | COLLAB_WS_MESSAGES_PER_SECOND | `error`, dropped; 1008 |

The bridge here allows 3 connections per token and 5 messages per second, so that the
tests reach both limits with little traffic.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.rpc import READ_KEY, Client
from tests.support.stack import API, Stack, opened, recv, running_stack

pytestmark = pytest.mark.integration

CONNECTIONS_PER_TOKEN = 3
MESSAGES_PER_SECOND = 5  # bursts of 10; closed for flooding at 10 x 5 x 5 s = 250 dropped
MAX_WS_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
MAX_METADATA_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    bridge_env = {
        "COLLAB_MAX_CONNECTIONS_PER_TOKEN": str(CONNECTIONS_PER_TOKEN),
        "COLLAB_WS_MESSAGES_PER_SECOND": str(MESSAGES_PER_SECOND),
    }
    with running_stack(tmp_path_factory.mktemp("limits"), bridge_env=bridge_env) as running:
        yield running


@pytest_asyncio.fixture
async def rpc(stack: Stack) -> AsyncIterator[Client]:
    client = Client.connect(stack.server.target)
    yield client
    await client.close()


async def head(http: httpx.AsyncClient) -> tuple[Any, ...]:
    """What a refused write must leave as it was: the seq, and what the reads show."""
    ready = (await http.get("/readyz")).json()
    status = (await http.get(f"{API}/agent-status")).json()
    feed = (await http.get(f"{API}/activity-feed?limit=500")).json()
    sessions = (await http.get(f"{API}/active-collaborations")).json()
    return ready["seq"], status, feed, sessions


async def rest_refuses(http: httpx.AsyncClient, route: str, body: dict[str, Any], status: int, fragment: str) -> None:
    before = await head(http)
    response = await http.post(f"{API}/{route}", json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"], response.text
    assert await head(http) == before, "a refused write changed the hub"


async def rpc_refuses(http: httpx.AsyncClient, call: Awaitable[Any], fragment: str) -> None:
    before = await head(http)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert fragment in (refused.value.details() or ""), refused.value.details()
    assert await head(http) == before, "a refused call changed the hub"


def nested(levels: int) -> dict[str, Any]:
    """A JSON object ``levels`` objects deep, itself included."""
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    assert isinstance(value, dict)
    return value


def struct_request(agent_id: str, metadata: dict[str, Any]) -> pb.RecordActivityRequest:
    request = pb.RecordActivityRequest(agent_id=agent_id, activity_type=pb.ACTIVITY_TYPE_MEMORY_WRITE)
    request.metadata.update(metadata)  # in place: the constructor would re-decode it
    return request


# -- what the hub takes in ------------------------------------------------------------


async def test_metadata_size_at_the_limit_is_accepted_and_one_byte_over_refused(
    http: httpx.AsyncClient, rpc: Client
) -> None:
    # {"blob":"..."}: 11 bytes besides the string, serialised compactly.
    at_limit = {"blob": "x" * (MAX_METADATA_BYTES - 11)}
    over = {"blob": "x" * (MAX_METADATA_BYTES - 10)}
    assert len(json.dumps(at_limit, separators=(",", ":"))) == MAX_METADATA_BYTES
    body = {"agent_id": "meta_agent", "activity_type": "memory_write"}
    assert (await http.post(f"{API}/record-activity", json={**body, "metadata": at_limit})).status_code == 200
    fragment = f"metadata is {MAX_METADATA_BYTES + 1} bytes serialised; the limit is {MAX_METADATA_BYTES}"
    await rest_refuses(http, "record-activity", {**body, "metadata": over}, 400, fragment)
    assert await rpc.stub.RecordActivity(struct_request("meta_agent", at_limit), metadata=rpc.metadata)
    await rpc_refuses(
        http, rpc.stub.RecordActivity(struct_request("meta_agent", over), metadata=rpc.metadata), fragment
    )


async def test_metadata_nesting_at_the_limit_is_accepted_and_one_level_deeper_refused(
    http: httpx.AsyncClient, rpc: Client
) -> None:
    body = {"agent_id": "deep_agent", "activity_type": "memory_write"}
    assert (await http.post(f"{API}/record-activity", json={**body, "metadata": nested(32)})).status_code == 200
    fragment = "metadata is nested deeper than 32 levels"
    await rest_refuses(http, "record-activity", {**body, "metadata": nested(33)}, 400, fragment)
    await rest_refuses(http, "record-activity", {**body, "metadata": nested(500)}, 400, fragment)
    md = rpc.metadata
    assert await rpc.stub.RecordActivity(struct_request("deep_agent", nested(32)), metadata=md)
    await rpc_refuses(http, rpc.stub.RecordActivity(struct_request("deep_agent", nested(33)), metadata=md), fragment)
    # Deeper still, protobuf's decoder gives up before the hub sees the request.
    await rpc_refuses(
        http, rpc.stub.RecordActivity(struct_request("deep_agent", nested(60)), metadata=md), "nest too deeply"
    )


async def test_lists_of_100_ids_are_accepted_and_101_refused(http: httpx.AsyncClient, rpc: Client) -> None:
    hundred = [f"agent_{n}" for n in range(100)]
    over = [*hundred, "agent_100"]
    md = rpc.metadata
    body = {"agent_id": "list_agent", "activity_type": "message_sent"}
    assert (await http.post(f"{API}/record-activity", json={**body, "related_agents": hundred})).status_code == 200
    fragment = "related_agents has more than 100 entries"
    await rest_refuses(http, "record-activity", {**body, "related_agents": over}, 400, fragment)
    request = pb.RecordActivityRequest(agent_id="list_agent", activity_type=pb.ACTIVITY_TYPE_MESSAGE_SENT)
    request.related_agents.extend(over)
    await rpc_refuses(http, rpc.stub.RecordActivity(request, metadata=md), fragment)

    started = await http.post(f"{API}/start-collaboration", json={"participants": hundred})
    assert started.status_code == 200
    session_id = started.json()["session_id"]
    await rest_refuses(
        http, "start-collaboration", {"participants": over}, 400, "participants has more than 100 entries"
    )
    await rpc_refuses(
        http,
        rpc.stub.StartCollaboration(pb.StartCollaborationRequest(participants=over), metadata=md),
        "participants has more than 100 entries",
    )

    votes = dict.fromkeys(hundred, "yes")
    decision = {"session_id": session_id, "agent_id": "agent_0", "decision": "ship"}
    assert (await http.post(f"{API}/record-decision", json={**decision, "votes": votes})).status_code == 200
    over_votes = {**votes, "agent_100": "no"}
    await rest_refuses(http, "record-decision", {**decision, "votes": over_votes}, 400, "votes has more than 100")
    too_many = pb.RecordDecisionRequest(session_id=session_id, agent_id="agent_0", decision="ship", votes=over_votes)
    await rpc_refuses(http, rpc.stub.RecordDecision(too_many, metadata=md), "votes has more than 100")


@pytest.mark.parametrize(
    ("agent_id", "fragment"),
    [
        ("i" * 128, ""),
        ("名前_ü.x:y/z", ""),
        ("i" * 129, "agent_id is longer than 128 characters"),
        ("a b", "agent_id must be printable characters without white space"),
        ("a\u200bb", "agent_id must be printable characters without white space"),
        ("tab\tbed", "agent_id must be printable characters without white space"),
        ("", "agent_id is required"),
    ],
)
async def test_ids_up_to_128_printable_characters(
    http: httpx.AsyncClient, rpc: Client, agent_id: str, fragment: str
) -> None:
    body = {"agent_id": agent_id, "activity_type": "task_assigned"}
    request = pb.RecordActivityRequest(agent_id=agent_id, activity_type=pb.ACTIVITY_TYPE_TASK_ASSIGNED)
    if not fragment:
        assert (await http.post(f"{API}/record-activity", json=body)).status_code == 200
        assert (await rpc.stub.RecordActivity(request, metadata=rpc.metadata)).activity_id
        return
    await rest_refuses(http, "record-activity", body, 400, fragment)
    await rpc_refuses(http, rpc.stub.RecordActivity(request, metadata=rpc.metadata), fragment)


async def test_decision_text_up_to_8_kib(http: httpx.AsyncClient, rpc: Client) -> None:
    session_id = (await http.post(f"{API}/start-collaboration", json={"participants": ["a"]})).json()["session_id"]
    decision = {"session_id": session_id, "agent_id": "a"}
    assert (await http.post(f"{API}/record-decision", json={**decision, "decision": "d" * 8192})).status_code == 200
    fragment = "decision is longer than 8192 characters"
    await rest_refuses(http, "record-decision", {**decision, "decision": "d" * 8193}, 400, fragment)
    request = pb.RecordDecisionRequest(session_id=session_id, agent_id="a", decision="d" * 8193)
    await rpc_refuses(http, rpc.stub.RecordDecision(request, metadata=rpc.metadata), fragment)


async def test_rest_body_of_exactly_1_mib_is_read_and_one_byte_more_is_413(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    body = json.dumps({"agent_id": "body_agent", "activity_type": "memory_read"})
    exactly = body[:-1] + " " * (MAX_BODY_BYTES - len(body)) + "}"  # JSON allows the padding
    assert len(exactly.encode()) == MAX_BODY_BYTES
    headers = {"content-type": "application/json"}
    accepted = await http.post(f"{API}/record-activity", content=exactly, headers=headers)
    assert accepted.status_code == 200, accepted.text
    before = await head(http)
    over = body[:-1] + " " * (MAX_BODY_BYTES - len(body) + 1) + "}"
    refused = await http.post(f"{API}/record-activity", content=over, headers=headers)
    assert refused.status_code == 413
    assert refused.json() == {
        "detail": f"request body is larger than {MAX_BODY_BYTES} bytes",
        "code": "PAYLOAD_TOO_LARGE",
    }

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(over), 64 * 1024):
            yield over[start : start + 64 * 1024].encode()

    chunked = await http.post(f"{API}/record-activity", content=chunks(), headers=headers)
    assert chunked.status_code == 413
    assert await head(http) == before


async def test_websocket_message_of_exactly_64_kib_is_read_and_one_byte_more_refused(stack: Stack) -> None:
    head_ = '{"type":"ping","pad":"'
    exactly = head_ + "x" * (MAX_WS_BYTES - len(head_) - 2) + '"}'
    assert len(exactly.encode()) == MAX_WS_BYTES
    over = exactly[:-2] + 'x"}'
    async with connect(stack.ws_url(token=READ_KEY), max_size=None) as ws:
        await opened(ws)
        await ws.send(exactly)
        assert (await recv_reply(ws))["type"] == "pong"
        await ws.send(over)
        refused = await recv_reply(ws)
        assert refused["type"] == "error"
        assert f"{MAX_WS_BYTES + 1} bytes; the limit is {MAX_WS_BYTES}" in refused["error"]
        await asyncio.sleep(1 / MESSAGES_PER_SECOND)  # this test is not about the rate
        await ws.send(json.dumps({"type": "ping"}))
        assert (await recv_reply(ws))["type"] == "pong", "the connection stays up"
        # Over twice the limit the WebSocket protocol does not even assemble it: close 1009.
        await ws.send("x" * (1024 * 1024 + 1))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def recv_reply(ws: ClientConnection) -> dict[str, Any]:
    """The next message that is not a status tick."""
    while True:
        message = await recv(ws)
        if message["type"] != "agent_status_update":
            return message


# -- what one client may take ---------------------------------------------------------


async def refused_with(ws: ClientConnection, code: int) -> dict[str, Any]:
    refusal = await recv(ws)
    assert refusal["type"] == "error" and refusal["code"] == code, refusal
    with pytest.raises(ConnectionClosed) as closed:
        await recv(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code
    return refusal


async def test_connections_per_token_n_open_one_more_refused_until_one_closes(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    held = [await connect(stack.ws_url(client_id=f"held_{n}")) for n in range(CONNECTIONS_PER_TOKEN)]
    try:
        for ws in held:
            await opened(ws)
        async with connect(stack.ws_url(client_id="one_too_many")) as extra:
            refusal = await refused_with(extra, 4429)
        assert f"too many connections with this token: {CONNECTIONS_PER_TOKEN} are open" in refusal["error"]
        # Server-Sent Events count against the same budget: HTTP 429.
        stream = await http.get(f"{API}/events")
        assert stream.status_code == 429 and stream.json()["code"] == "RESOURCE_EXHAUSTED"
        assert "too many connections with this token" in stream.json()["detail"]
        # Another token has a budget of its own.
        async with connect(stack.ws_url(token=READ_KEY, client_id="other_token")) as other:
            await opened(other)
        # A closed connection frees its slot (once the bridge has seen it close).
        await held.pop().close()
        deadline = time.monotonic() + 10
        while True:
            async with connect(stack.ws_url(client_id="next")) as again:
                first = await recv(again)
                if first["type"] == "connection_established":
                    break
                assert first.get("code") == 4429, first
            assert time.monotonic() < deadline, "the closed connection's slot was never freed"
            await asyncio.sleep(0.05)
    finally:
        await asyncio.gather(*(ws.close() for ws in held))


async def test_sse_streams_hold_slots_too(stack: Stack) -> None:
    """Streams of one token fill its budget; a WebSocket with it is then refused."""
    headers = {"Authorization": f"Bearer {READ_KEY}"}
    async with httpx.AsyncClient(base_url=stack.bridge.http, headers=headers, timeout=10) as client:
        streams = [client.stream("GET", f"{API}/events") for _ in range(CONNECTIONS_PER_TOKEN)]
        opened_streams = [await stream.__aenter__() for stream in streams]
        try:
            assert all(response.status_code == 200 for response in opened_streams)
            async with connect(stack.ws_url(token=READ_KEY, client_id="after_streams")) as ws:
                await refused_with(ws, 4429)
        finally:
            for stream in streams:
                await stream.__aexit__(None, None, None)


async def test_messages_over_the_rate_get_an_error_and_are_dropped(stack: Stack) -> None:
    sent = 30
    async with connect(stack.ws_url(token=READ_KEY, client_id="eager")) as ws:
        await opened(ws)
        started = time.monotonic()
        for _ in range(sent):
            await ws.send(json.dumps({"type": "ping"}))
        replies = [await recv_reply(ws) for _ in range(sent)]  # one reply each
        elapsed = time.monotonic() - started
        kinds = [reply["type"] for reply in replies]
        burst = 2 * MESSAGES_PER_SECOND
        assert kinds[:burst] == ["pong"] * burst, "the burst is served"
        # Beyond the burst, only what the rate refilled meanwhile.
        assert kinds.count("pong") <= burst + MESSAGES_PER_SECOND * elapsed + 1, (kinds, elapsed)
        assert set(kinds) == {"pong", "error"}, kinds
        dropped = [reply for reply in replies if reply["type"] == "error"]
        assert all("rate limited" in reply["error"] and reply["retry_after"] > 0 for reply in dropped)
        # A dropped `subscribe` changes nothing either: the reply is the rate error.
        await ws.send(json.dumps({"type": "subscribe", "activity_types": ["memory_update"]}))
        assert (await recv_reply(ws))["type"] == "error"
        await asyncio.sleep(max(reply["retry_after"] for reply in dropped) + 0.05)
        await ws.send(json.dumps({"type": "ping"}))
        assert (await recv_reply(ws))["type"] == "pong", "after the hint the connection is served again"


async def test_a_client_that_keeps_flooding_is_closed_with_1008(stack: Stack) -> None:
    flood = 10 * MESSAGES_PER_SECOND * 5  # dropped within 5 s: then closed
    async with connect(stack.ws_url(token=READ_KEY, client_id="flooder")) as ws:
        await opened(ws)
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(flood + 100):
                await ws.send('{"type":"ping"}')
            for _ in range(flood + 200):  # its replies, then the close
                await recv(ws)
        assert closed.value.rcvd is not None, "the bridge closed it"
        assert closed.value.rcvd.code == 1008 and "flooding" in closed.value.rcvd.reason
    async with connect(stack.ws_url(token=READ_KEY, client_id="after_flood")) as ws:
        await opened(ws)
        await ws.send('{"type":"ping"}')
        assert (await recv_reply(ws))["type"] == "pong"
