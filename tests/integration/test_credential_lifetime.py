"""A credential is checked for as long as a stream lasts, not only when it opens
(issue 17, item 8), against real `collab-server` + `collab-bridge` processes:

- a JWT that expires ends its WebSocket (an `error`, then close 4401), its SSE stream (an
  `error` event, then the end; a reconnect is answered 401, so an EventSource stops) and
  its gRPC streams (UNAUTHENTICATED "token has expired") at its `exp`, and not before;
- a read key removed from the server's configuration (restarted with another) ends the
  WebSocket that holds it within the bridge's recheck interval (set short here), while a
  connection with a key still configured stays.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc
from tests.support.processes import ServerProcess
from tests.support.rpc import EOF, JWT_SECRET, READ_KEY, WRITE_KEY, bearer
from tests.support.stack import API, AUTH, SERVER_ENV, Stack, opened, recv, running_stack, wait_ready

pytestmark = pytest.mark.integration

# Seconds ahead of now a test JWT expires: enough to connect and see events first.
LIFETIME = 4
# Generous: a loaded machine is slow, the checks here are about what happens, not when.
WITHIN = 30.0
RECHECK_INTERVAL = "0.5"
OTHER_READ_KEY = "another-read-key-of-the-suite"


def expiring_jwt(scope: str = "read", lifetime: int = LIFETIME) -> tuple[str, int]:
    expires = int(time.time()) + lifetime
    return jwt.encode({"scope": scope, "exp": expires, "sub": "expiring"}, JWT_SECRET, algorithm="HS256"), expires


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("lifetime"),
        server_env={"COLLAB_JWT_SECRET": JWT_SECRET},
        bridge_env={"COLLAB_CREDENTIAL_RECHECK_INTERVAL": RECHECK_INTERVAL},
    ) as running:
        yield running


async def record_one(stack: Stack, agent_id: str) -> None:
    async with httpx.AsyncClient(base_url=stack.bridge.http, headers=AUTH, timeout=10) as http:
        response = await http.post(
            f"{API}/record-activity", json={"agent_id": agent_id, "activity_type": "memory_write"}
        )
        assert response.status_code == 200, response.text


async def until_closed(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every message until the server closes the connection."""
    received: list[dict[str, Any]] = []
    try:
        while True:
            received.append(await recv(ws, WITHIN))
    except ConnectionClosed:
        return received


# -- JWT expiry -----------------------------------------------------------------------------------


async def test_a_websocket_ends_when_its_jwt_expires(stack: Stack) -> None:
    token, expires = expiring_jwt()
    async with connect(stack.ws_url(token)) as ws:
        await opened(ws)
        await record_one(stack, "lifetime_ws")  # served while the token is good
        received = await until_closed(ws)
        ended = time.time()
        assert ws.close_code == 4401
        assert ws.close_reason == "token has expired"
    assert any(m["type"] == "agent_activity" and m["activity"]["agent_id"] == "lifetime_ws" for m in received)
    last = received[-1]
    assert (last["type"], last["error"], last["code"]) == ("error", "token has expired", 4401)
    assert expires - 0.5 <= ended <= expires + WITHIN
    # Coming back with it is refused the same way (the browser client stops on 4401).
    async with connect(stack.ws_url(token)) as again:
        refusal = await recv(again)
        with pytest.raises(ConnectionClosed):
            await recv(again)
        assert (refusal["type"], again.close_code) == ("error", 4401)


async def test_an_sse_stream_ends_when_its_jwt_expires(stack: Stack) -> None:
    token, expires = expiring_jwt()
    events: list[tuple[str, str]] = []
    last_id = ""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=stack.bridge.http, timeout=WITHIN) as http:
        async with http.stream("GET", f"{API}/events", headers=headers) as response:
            assert response.status_code == 200
            kind = ""
            recorded = False
            async for line in response.aiter_lines():  # ends when the bridge ends the stream
                if line.startswith("id: "):
                    last_id = line.removeprefix("id: ")
                elif line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((kind, line.removeprefix("data: ")))
                    if kind == "collaboration_state" and not recorded:
                        recorded = True
                        await record_one(stack, "lifetime_sse")
        ended = time.time()
        kinds = [kind for kind, _ in events]
        assert "agent_activity" in kinds
        assert kinds[-1] == "error"
        last = json.loads(events[-1][1])
        assert (last["error"], last["code"]) == ("token has expired", 4401)
        assert expires - 0.5 <= ended <= expires + WITHIN
        # An EventSource reconnects once with Last-Event-ID, gets 401 and stops for good.
        again = await http.get(f"{API}/events", headers={**headers, "Last-Event-ID": last_id})
        assert again.status_code == 401
        assert not again.headers.get("content-type", "").startswith("text/event-stream")


@pytest.mark.parametrize("rpc", ["SubscribeEvents", "StreamAgentStatus"])
async def test_a_grpc_stream_ends_when_its_jwt_expires(stack: Stack, rpc: str) -> None:
    token, expires = expiring_jwt()
    async with grpc.aio.insecure_channel(stack.server.target) as channel:
        stub = pb_grpc.CollaborationServiceStub(channel)
        call: Any
        if rpc == "SubscribeEvents":
            call = stub.SubscribeEvents(pb.SubscribeEventsRequest(include_snapshot=True), metadata=bearer(token))
        else:
            call = stub.StreamAgentStatus(pb.StreamAgentStatusRequest(), metadata=bearer(token))
        messages = 0
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                message = await asyncio.wait_for(call.read(), WITHIN)
                assert message is not EOF, "the stream ended without a status"
                messages += 1
                if messages == 1 and rpc == "SubscribeEvents":
                    await record_one(stack, "lifetime_grpc")
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ended.value.details() == "token has expired"
        assert messages >= 2  # served until then
        assert expires - 0.5 <= time.time() <= expires + WITHIN


async def test_check_credential_answers_what_a_credential_grants(stack: Stack) -> None:
    token, expires = expiring_jwt(scope="read write", lifetime=600)
    async with grpc.aio.insecure_channel(stack.server.target) as channel:
        stub = pb_grpc.CollaborationServiceStub(channel)
        reply = await stub.CheckCredential(pb.CheckCredentialRequest(), metadata=bearer(token))
        assert (reply.read, reply.write, reply.expires_at.seconds) == (True, True, expires)
        reply = await stub.CheckCredential(pb.CheckCredentialRequest(), metadata=bearer(READ_KEY))
        assert (reply.read, reply.write, reply.HasField("expires_at")) == (True, False, False)
        for wrong in (None, "not-a-key-of-this-server"):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.CheckCredential(pb.CheckCredentialRequest(), metadata=bearer(wrong) if wrong else ())
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- revocation -----------------------------------------------------------------------------------


async def test_a_read_key_removed_from_the_server_ends_its_websocket(tmp_path: Path) -> None:
    server_env = {**SERVER_ENV, "COLLAB_READ_KEYS": f"{READ_KEY},{OTHER_READ_KEY}"}
    with running_stack(
        tmp_path, server_env, bridge_env={"COLLAB_CREDENTIAL_RECHECK_INTERVAL": RECHECK_INTERVAL}
    ) as stack:
        async with connect(stack.ws_url(READ_KEY)) as revoked, connect(stack.ws_url(OTHER_READ_KEY)) as kept:
            await opened(revoked)
            await opened(kept)
            # The server restarts with READ_KEY no longer configured.
            assert await asyncio.to_thread(stack.server.stop) == 0
            restarted_env = {**SERVER_ENV, "COLLAB_READ_KEYS": OTHER_READ_KEY}
            server = await asyncio.to_thread(
                ServerProcess(tmp_path / "server", env=restarted_env).start, stack.server.port
            )
            try:
                stack.server = server
                await asyncio.to_thread(wait_ready, stack)
                received = await until_closed(revoked)
                assert revoked.close_code == 4401
                last = received[-1]
                assert (last["type"], last["code"], last["error"]) == ("error", 4401, "invalid credential")
                # The key still configured keeps its connection, and it is served.
                await record_one(stack, "still_served")
                while True:
                    message = await recv(kept, WITHIN)
                    if message["type"] == "agent_activity" and message["activity"]["agent_id"] == "still_served":
                        break
                assert kept.close_code is None
            finally:
                await asyncio.to_thread(server.stop)


async def test_a_removed_key_is_refused_at_connect_after_the_restart(tmp_path: Path) -> None:
    """The other half of revocation: a new connection with a removed key is refused at once."""
    with running_stack(tmp_path) as stack:
        assert await asyncio.to_thread(stack.server.stop) == 0
        env = {**SERVER_ENV, "COLLAB_READ_KEYS": OTHER_READ_KEY}
        server = await asyncio.to_thread(ServerProcess(tmp_path / "server", env=env).start, stack.server.port)
        try:
            stack.server = server
            await asyncio.to_thread(wait_ready, stack)
            async with connect(stack.ws_url(READ_KEY)) as ws:
                refusal = await recv(ws)
                with pytest.raises(ConnectionClosed):
                    await recv(ws)
                assert (refusal["type"], ws.close_code) == ("error", 4401)
            async with connect(stack.ws_url(WRITE_KEY)) as ws:
                await opened(ws)
        finally:
            await asyncio.to_thread(server.stop)


# -- in a browser: the clients stop instead of retrying with the expired token --------------------


@pytest_asyncio.fixture(loop_scope="session")
async def page(browser: Browser, stack: Stack) -> Page:
    opened_page = await browser.new_page()
    await opened_page.goto(f"{stack.bridge.http}/docs")  # any page of the bridge's origin
    return opened_page


async def test_the_browser_clients_stop_when_the_jwt_expires(page: Page, stack: Stack) -> None:
    """The JS client ends `closed` after its `error` (4401); an EventSource gets the
    `error` event, reconnects once, is refused 401 and ends CLOSED: neither loops."""
    token, _ = expiring_jwt()
    await page.evaluate(
        """async (token) => {
            const { CollabClient } = await import('/client/collab.js');
            window.hub = new CollabClient({ token, clientId: 'expiring_js', initialBackoff: 100 });
            window.failures = [];
            window.hub.addEventListener('error', (e) => window.failures.push(e.detail));
            window.hub.connect();
            window.source = new EventSource(`/api/v1/collaboration/events?token=${encodeURIComponent(token)}`);
            window.sseErrors = [];
            window.source.addEventListener('error', (e) => { if (e.data) window.sseErrors.push(JSON.parse(e.data)); });
            await new Promise((ready) =>
                window.hub.addEventListener('state', (e) => e.detail.state === 'live' && ready()));
        }""",
        token,
    )
    limit = int(WITHIN * 1000)
    await page.wait_for_function("window.hub.state === 'closed'", timeout=limit)
    # The `error` message, then the close: the client dispatches both as `error`.
    message, close = await page.evaluate("window.failures")
    assert (message["type"], message["code"], message["error"]) == ("error", 4401, "token has expired")
    assert (close["code"], close["reason"]) == (4401, "token has expired")
    await page.wait_for_function("window.source.readyState === EventSource.CLOSED", timeout=limit)
    assert [error["code"] for error in await page.evaluate("window.sseErrors")] == [4401]
