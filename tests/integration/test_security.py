"""Security, end to end with real `collab-server` and `collab-bridge` processes.

- Every REST route, the WebSocket, the event stream and every RPC of the service, with
  each kind of credential: none, wrong, expired or forged JWTs (refused: 401 /
  UNAUTHENTICATED / close 4401), read-only ones (reads allowed, writes 403 /
  PERMISSION_DENIED and nothing recorded), write-only and read+write ones. The lists
  come from the app itself and the generated service descriptor, and the public routes
  are listed here: a new route or RPC fails the walk until it is given a category.
- The WebSocket and SSE `Origin` check, and CORS for the configured origins.
- TLS on the gRPC port and on the bridge (certificates made by trustme), and the
  configuration errors that stop a process before it serves.
- No credential in any line the processes print, with debug logging on.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
import pytest_asyncio
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin

import collab
from bridge.app import SSE_PATH, WS_PATH, create_app
from bridge.config import BridgeConfig
from collab_grpc.servicer import WRITE_METHODS
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.processes import BridgeProcess, OutputLines, ServerProcess
from tests.support.rpc import EOF, JWT_SECRET, READ_KEY, WRITE_KEY, activity, bearer
from tests.support.stack import API, AUTH, BRIDGE_ENV, SERVER_ENV, Stack, recv, running_stack, start_stack, wait_ready
from tests.support.tls import TLSFiles, make_tls_files

pytestmark = pytest.mark.integration

SERVICE = pb.DESCRIPTOR.services_by_name["CollaborationService"]
COLLAB = str(Path(sys.executable).parent / "collab")

# Anyone may fetch these, by design: the dashboard and its scripts (the page holds no
# data; it asks for a token), health for load balancers, the API's description.
PUBLIC_ROUTES = frozenset(
    {
        ("GET", "/"),
        ("GET", "/dashboard.js"),
        ("GET", "/client/collab.js"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/docs/oauth2-redirect"),
        ("GET", "/redoc"),
    }
)
# The dashboard's modules, styles and vendored libraries: files, public as the page is.
STATIC_ROUTES = frozenset({("GET", "/static/{path}")})
# Not in the OpenAPI document; checked below with the same credentials as REST.
STREAM_ROUTES = frozenset({("WEBSOCKET", WS_PATH), ("GET", SSE_PATH)})
# Closed by a token of its own (COLLAB_METRICS_TOKEN), not by the hub's credentials.
METRICS_ROUTES = frozenset({("GET", "/metrics")})
# OTLP/HTTP trace ingest: a write that speaks OTLP, not in the OpenAPI document; its
# credentials are walked in tests/integration/test_otlp.py.
OTLP_ROUTES = frozenset({("POST", "/v1/traces")})

READ_RPCS = frozenset(
    {
        "GetAgentStatus",
        "GetActivityFeed",
        "GetActivity",
        "ListActiveCollaborations",
        "GetCollaboration",
        "ListEndedCollaborations",
        "SubscribeEvents",
        "StreamAgentStatus",
        "ListAgents",
        "ListDecisions",
        "ListMemoryUpdates",
        "QueryActivities",
        "CheckCredential",
    }
)
WRITE_RPCS = frozenset(
    {
        "RecordActivity",
        "BulkRecordActivities",
        "CompleteActivity",
        "StartCollaboration",
        "EndCollaboration",
        "RecordDecision",
        "RecordMemoryUpdate",
    }
)

METRICS_TOKEN = f"metrics-{secrets.token_hex(8)}"
OTHER_SECRET = "another-secret-that-is-long-enough-for-hs256"


def signed(claims: dict[str, Any], secret: str = JWT_SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


@dataclass(frozen=True)
class Credential:
    """A token and the HTTP status its reads and writes get: 200, 401 or 403."""

    name: str
    token: str | None
    reads: int
    writes: int


def credentials() -> list[Credential]:
    # Made when the tests are collected: a day's margin, so a long run (the whole suite on a
    # loaded machine) reaches them with the future still in the future.
    now = int(time.time())
    return [
        Credential("none", None, 401, 401),
        Credential("unknown key", f"wrong-{secrets.token_hex(8)}", 401, 401),
        Credential("jwt, other secret", signed({"scope": "read write"}, OTHER_SECRET), 401, 401),
        Credential("jwt, expired", signed({"scope": "read write", "exp": now - 60}), 401, 401),
        Credential("jwt, nbf in the future", signed({"scope": "read write", "nbf": now + 86_400}), 401, 401),
        Credential("jwt, alg none", jwt.encode({"scope": "read write"}, "", algorithm="none"), 401, 401),
        Credential("jwt, no scope", signed({"sub": "someone"}), 401, 401),
        Credential("read key", READ_KEY, 200, 403),
        Credential("jwt, scope read", signed({"scope": "read", "exp": now + 86_400}), 200, 403),
        Credential("jwt, scope write", signed({"scope": "write"}), 403, 200),
        Credential("write key", WRITE_KEY, 200, 200),
        Credential("jwt, scope read write", signed({"scope": "read write"}), 200, 200),
    ]


CREDENTIALS = credentials()
GRPC_CODE = {200: grpc.StatusCode.OK, 401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED}
ERROR_CODE = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}
WS_OUTCOME = {200: "open", 401: 4401, 403: 4403}


def headers_for(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("security"), server_env={"COLLAB_JWT_SECRET": JWT_SECRET}) as running:
        yield running


@pytest.fixture(scope="module")
def listed_origin_bridge(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeProcess]:
    """A second bridge on the same server, with an allow-list and a metrics token."""
    env = {**BRIDGE_ENV, "COLLAB_ALLOWED_ORIGINS": "https://dash.example.com", "COLLAB_METRICS_TOKEN": METRICS_TOKEN}
    bridge = BridgeProcess(stack.server.target, data_dir=tmp_path_factory.mktemp("bridge2"), env=env).start()
    try:
        wait_ready(Stack(stack.server, bridge))
        yield bridge
    finally:
        assert bridge.stop() == 0


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest_asyncio.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.bridge.http, timeout=10) as client:
        yield client


async def fresh_ids(http: httpx.AsyncClient) -> dict[str, Any]:
    """An open activity and an active session, made with the write key, for one call."""
    recorded = await http.post(
        f"{API}/record-activity", json={"agent_id": "sec_agent", "activity_type": "task_assigned"}, headers=AUTH
    )
    started = await http.post(f"{API}/start-collaboration", json={"participants": ["sec_agent"]}, headers=AUTH)
    assert recorded.status_code == started.status_code == 200, (recorded.text, started.text)
    return {
        "activity_id": recorded.json()["activity_id"],
        "session_id": started.json()["session_id"],
        "agent_id": "sec_agent",
        "participants": ["sec_agent"],
    }


async def server_seq(target: str) -> int:
    """The seq of the server's newest event: unchanged when nothing was recorded."""
    async with grpc.aio.insecure_channel(target) as channel:
        stream = channel.unary_stream(
            f"/{SERVICE.full_name}/SubscribeEvents",
            request_serializer=pb.SubscribeEventsRequest.SerializeToString,
            response_deserializer=pb.SubscribeEventsResponse.FromString,
        )(pb.SubscribeEventsRequest(include_snapshot=True), metadata=bearer(WRITE_KEY), timeout=10)
        first = await stream.read()
        stream.cancel()
    assert isinstance(first, pb.SubscribeEventsResponse) and first.HasField("snapshot")
    return first.snapshot.seq


# -- the routes ---------------------------------------------------------------------------------


def _flatten(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    for route in routes:
        # FastAPI keeps an included router as one entry that lists its routes on demand.
        nested = getattr(route, "effective_candidates", None)
        yield from _flatten(nested()) if nested is not None else (route,)


def app_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the bridge's app has, WebSocket ones as WEBSOCKET."""
    found: set[tuple[str, str]] = set()
    for route in _flatten(create_app(BridgeConfig()).routes):
        if isinstance(route, WebSocketRoute):
            found.add(("WEBSOCKET", route.path))
            continue
        if isinstance(route, Mount) and isinstance(route.app, StaticFiles):  # files only, never data
            found.add(("GET", f"{route.path}/{{path}}"))
            continue
        methods = getattr(route, "methods", None)
        assert isinstance(route, Route) or methods is not None, f"a route of an unknown kind: {route!r}"
        # path_format: the template as OpenAPI writes it (`{activity_id:path}` as `{activity_id}`).
        template = str(getattr(route, "path_format", getattr(route, "path", "")))
        found |= {(method, template) for method in methods or () if method != "HEAD"}
    return found


def spec_operations(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in spec["paths"].items() for method in item}


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def example(spec: dict[str, Any], name: str, schema: dict[str, Any], known: dict[str, Any]) -> Any:
    """A valid value for a body field: a real id where the name says so, else from the schema."""
    if name in known:
        return known[name]
    schema = _resolve(spec, schema)
    if "enum" in schema:
        return schema["enum"][0]
    if "anyOf" in schema:
        return example(spec, name, next(s for s in schema["anyOf"] if s.get("type") != "null"), known)
    simple = {"string": f"sec_{name}", "boolean": True, "integer": 1, "number": 1.0, "object": {}}
    return simple[schema["type"]]


def request_for(spec: dict[str, Any], method: str, path: str, known: dict[str, Any]) -> tuple[str, Any]:
    """The URL and JSON body of a valid call of one operation (only its required fields)."""
    operation = spec["paths"][path][method.lower()]
    url = path.format(**{name: known[name] for name in ("activity_id", "session_id") if f"{{{name}}}" in path})
    content = operation.get("requestBody", {}).get("content", {})
    if not content:
        return url, None
    schema = _resolve(spec, content["application/json"]["schema"])
    body = {name: example(spec, name, schema["properties"][name], known) for name in schema.get("required", [])}
    return url, body


def test_every_route_is_public_protected_or_a_stream(stack: Stack) -> None:
    """The app's routes are exactly: the public ones, the two streams, metrics, and the
    OpenAPI operations, which the walk below calls with every credential."""
    spec = httpx.get(stack.bridge.http + "/openapi.json").json()
    protected = spec_operations(spec) - PUBLIC_ROUTES
    assert app_routes() == PUBLIC_ROUTES | STATIC_ROUTES | STREAM_ROUTES | METRICS_ROUTES | OTLP_ROUTES | protected
    assert {method for method, _ in protected} <= {"GET", "POST"}, "decide whether a new method reads or writes"
    assert all(path.startswith(API + "/") for _, path in protected)
    for _, path in [*sorted(PUBLIC_ROUTES), ("GET", "/static/cockpit.css")]:
        response = httpx.get(stack.bridge.http + path)
        assert response.status_code == 200, (path, response.text)
    print(f"routes: {len(PUBLIC_ROUTES)} public, {len(protected)} protected REST, 2 streams, /metrics")


@pytest.mark.parametrize("credential", CREDENTIALS, ids=lambda credential: credential.name)
async def test_rest_routes_check_the_credential(stack: Stack, http: httpx.AsyncClient, credential: Credential) -> None:
    spec = (await http.get("/openapi.json")).json()
    protected = sorted(spec_operations(spec) - PUBLIC_ROUTES)
    ids = await fresh_ids(http)
    seq_before = await server_seq(stack.server.target)
    for method, path in protected:
        expected = credential.reads if method == "GET" else credential.writes
        # A write that succeeds changes its ids' state; each gets its own.
        known = await fresh_ids(http) if (method, expected) == ("POST", 200) else ids
        url, body = request_for(spec, method, path, known)
        response = await http.request(method, url, json=body, headers=headers_for(credential.token))
        assert response.status_code == expected, (method, path, response.text)
        if expected in ERROR_CODE:
            assert response.json()["code"] == ERROR_CODE[expected]
        if expected == 401:
            assert response.headers["www-authenticate"] == "Bearer"
    if credential.writes != 200:
        # Every refused write changed nothing (fresh_ids above ran before seq_before).
        assert await server_seq(stack.server.target) == seq_before


@pytest.mark.parametrize("credential", [c for c in CREDENTIALS if c.token], ids=lambda credential: credential.name)
async def test_x_api_key_header_is_checked_the_same(http: httpx.AsyncClient, credential: Credential) -> None:
    assert credential.token is not None
    for method, path in (("GET", f"{API}/agent-status"), ("POST", f"{API}/end-collaboration")):
        body = {"session_id": "collab_0_none"} if method == "POST" else None
        response = await http.request(method, path, json=body, headers={"X-API-Key": credential.token})
        # A permitted write reaches validation: the unknown session is a 404, not a refusal.
        expected = credential.reads if method == "GET" else (404 if credential.writes == 200 else credential.writes)
        assert response.status_code == expected, (method, response.text)


async def ws_outcome(url: str, origin: str | None = None, **kwargs: Any) -> int | str:
    """The outcome of connecting: `open` when the socket gives connection_established and
    collaboration_state, else the close code that follows the `error` message."""
    async with connect(url, origin=Origin(origin) if origin else None, **kwargs) as ws:
        first = await recv(ws)
        if first["type"] == "error":
            with pytest.raises(ConnectionClosed) as closed:
                await recv(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.reason == first["error"][:120]
            return closed.value.rcvd.code
        second = await recv(ws)
        assert (first["type"], second["type"]) == ("connection_established", "collaboration_state")
        return "open"


@pytest.mark.parametrize("credential", CREDENTIALS, ids=lambda credential: credential.name)
async def test_websocket_checks_the_credential(stack: Stack, credential: Credential) -> None:
    assert await ws_outcome(stack.ws_url(credential.token)) == WS_OUTCOME[credential.reads]
    # The same credential in a header (non-browser clients) is checked the same way.
    header = await ws_outcome(stack.ws_url(None), additional_headers=headers_for(credential.token))
    assert header == WS_OUTCOME[credential.reads]


async def sse_outcome(http: httpx.AsyncClient, **params: str) -> tuple[int, str]:
    """The status of the event stream, and its first `event:` line when it opens."""
    async with http.stream("GET", SSE_PATH, params=params) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, response.json()["code"]
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                return 200, line
    raise AssertionError("the event stream ended before its first event")


@pytest.mark.parametrize("credential", CREDENTIALS, ids=lambda credential: credential.name)
async def test_event_stream_checks_the_credential(http: httpx.AsyncClient, credential: Credential) -> None:
    expected = (200, "event: connection_established") if credential.reads == 200 else (credential.reads,)
    status = await sse_outcome(http, **({"token": credential.token} if credential.token else {}))
    assert status[: len(expected)] == expected


# -- the RPCs ------------------------------------------------------------------------------------


def rpc_requests(known: dict[str, Any]) -> dict[str, Message]:
    """A valid request for every RPC (valid for the write key: see the walk)."""
    activity_id, session_id = known["activity_id"], known["session_id"]
    return {
        "RecordActivity": activity("sec_agent"),
        "BulkRecordActivities": pb.BulkRecordActivitiesRequest(activity=activity("sec_agent")),
        "CompleteActivity": pb.CompleteActivityRequest(activity_id=activity_id, success=True),
        "StartCollaboration": pb.StartCollaborationRequest(participants=["sec_agent"]),
        "EndCollaboration": pb.EndCollaborationRequest(session_id=session_id),
        "RecordDecision": pb.RecordDecisionRequest(session_id=session_id, agent_id="sec_agent", decision="ship"),
        "RecordMemoryUpdate": pb.RecordMemoryUpdateRequest(
            operation=pb.MEMORY_OPERATION_WRITE, item_id="item_1", agent_id="sec_agent"
        ),
        "GetAgentStatus": pb.GetAgentStatusRequest(),
        "GetActivityFeed": pb.GetActivityFeedRequest(limit=10),
        "GetActivity": pb.GetActivityRequest(activity_id=activity_id),
        "ListActiveCollaborations": pb.ListActiveCollaborationsRequest(),
        "GetCollaboration": pb.GetCollaborationRequest(session_id=session_id),
        "ListEndedCollaborations": pb.ListEndedCollaborationsRequest(limit=10),
        "SubscribeEvents": pb.SubscribeEventsRequest(include_snapshot=True),
        "StreamAgentStatus": pb.StreamAgentStatusRequest(),
        "ListAgents": pb.ListAgentsRequest(limit=10),
        "ListDecisions": pb.ListDecisionsRequest(session_id=session_id),
        "ListMemoryUpdates": pb.ListMemoryUpdatesRequest(limit=10),
        "QueryActivities": pb.QueryActivitiesRequest(agent_ids=["sec_agent"]),
        "CheckCredential": pb.CheckCredentialRequest(),
    }


async def call_rpc(
    channel: grpc.aio.Channel, method: MethodDescriptor, request: Message, token: str | None
) -> grpc.StatusCode:
    """Call ``method`` by its descriptor (any of the four shapes); the status it ends with
    (a server stream: OK once its first message arrives)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    reply = message_factory.GetMessageClass(method.output_type)
    options: dict[str, Any] = {"request_serializer": type(request).SerializeToString}
    options["response_deserializer"] = reply.FromString
    metadata = bearer(token) if token else ()
    try:
        if method.client_streaming:
            await channel.stream_unary(path, **options)(iter([request]), metadata=metadata, timeout=10)
        elif method.server_streaming:
            stream = channel.unary_stream(path, **options)(request, metadata=metadata, timeout=10)
            first = await stream.read()
            stream.cancel()
            assert first is not EOF, f"{method.name} ended without a message"
        else:
            await channel.unary_unary(path, **options)(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_the_rpc_lists_cover_the_service() -> None:
    names = {method.name for method in SERVICE.methods}
    assert names == READ_RPCS | WRITE_RPCS, "a new RPC: decide whether it reads or writes"
    assert not READ_RPCS & WRITE_RPCS
    assert frozenset(WRITE_METHODS) == WRITE_RPCS, "the interceptor's list of writes"
    assert set(rpc_requests({"activity_id": "a", "session_id": "s"})) == names


@pytest.mark.parametrize("credential", CREDENTIALS, ids=lambda credential: credential.name)
async def test_every_rpc_checks_the_credential(stack: Stack, http: httpx.AsyncClient, credential: Credential) -> None:
    ids = await fresh_ids(http)
    seq_before = await server_seq(stack.server.target)
    async with grpc.aio.insecure_channel(stack.server.target) as channel:
        for method in SERVICE.methods:
            expected = GRPC_CODE[credential.writes if method.name in WRITE_RPCS else credential.reads]
            fresh = method.name in WRITE_RPCS and expected == grpc.StatusCode.OK
            request = rpc_requests(await fresh_ids(http) if fresh else ids)[method.name]
            assert await call_rpc(channel, method, request, credential.token) == expected, method.name
    if credential.writes != 200:
        assert await server_seq(stack.server.target) == seq_before


async def test_only_health_and_reflection_are_open(stack: Stack) -> None:
    """The services the server offers: any new one must be added to the auth decision."""
    with grpc.insecure_channel(stack.server.target) as sync_channel:
        services = await asyncio.to_thread(lambda: set(ProtoReflectionDescriptorDatabase(sync_channel).get_services()))
    # TraceService/Export (OTLP ingest) is a write: its credentials are walked in test_otlp.py.
    otlp = "opentelemetry.proto.collector.trace.v1.TraceService"
    assert services == {SERVICE.full_name, otlp, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    async with grpc.aio.insecure_channel(stack.server.target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_metrics_need_their_own_token(listed_origin_bridge: BridgeProcess, stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=listed_origin_bridge.http, timeout=10) as client:
        for token in (None, WRITE_KEY, READ_KEY, "wrong"):
            response = await client.get("/metrics", headers=headers_for(token))
            assert response.status_code == 401, token
        assert (await client.get("/metrics", headers=headers_for(METRICS_TOKEN))).status_code == 200
    # Without a metrics token configured, /metrics is closed to every credential.
    async with httpx.AsyncClient(base_url=stack.bridge.http, timeout=10) as client:
        assert (await client.get("/metrics", headers=AUTH)).status_code == 403


# -- origins --------------------------------------------------------------------------------------


async def test_websocket_origin_default_is_the_bridges_own(stack: Stack) -> None:
    own = stack.bridge.http
    assert await ws_outcome(stack.ws_url(), origin=own) == "open"  # the dashboard at /
    assert await ws_outcome(stack.ws_url()) == "open"  # no Origin: not a browser
    for foreign in ("https://evil.example", own.replace("127.0.0.1", "localhost"), "null"):
        assert await ws_outcome(stack.ws_url(), origin=foreign) == 4403, foreign
    # Refused before the token is looked at: a foreign page learns nothing about it.
    assert await ws_outcome(stack.ws_url("wrong"), origin="https://evil.example") == 4403


async def test_event_stream_origin(stack: Stack, http: httpx.AsyncClient) -> None:
    http.headers["Origin"] = "https://evil.example"
    assert await sse_outcome(http, token=WRITE_KEY) == (403, "PERMISSION_DENIED")
    http.headers["Origin"] = stack.bridge.http
    assert await sse_outcome(http, token=WRITE_KEY) == (200, "event: connection_established")


async def test_rest_has_no_cors_by_default(http: httpx.AsyncClient) -> None:
    """Decision: REST does not check Origin (a page elsewhere cannot put the token in a
    header without CORS, and cannot read answers); with no COLLAB_ALLOWED_ORIGINS there is
    no CORS at all, so a foreign page's script can neither send a credential nor read."""
    response = await http.get(f"{API}/agent-status", headers={**AUTH, "Origin": "https://evil.example"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    preflight = await http.options(
        f"{API}/record-activity",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


async def test_listed_origins(listed_origin_bridge: BridgeProcess) -> None:
    url = f"{listed_origin_bridge.ws}?client_id=t&token={WRITE_KEY}"
    assert await ws_outcome(url, origin="https://dash.example.com") == "open"
    assert await ws_outcome(url, origin=listed_origin_bridge.http) == "open"  # its own still
    assert await ws_outcome(url, origin="https://evil.example") == 4403
    async with httpx.AsyncClient(base_url=listed_origin_bridge.http, timeout=10) as client:
        preflight = await client.options(
            f"{API}/record-activity",
            headers={
                "Origin": "https://dash.example.com",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://dash.example.com"
        assert "access-control-allow-credentials" not in preflight.headers  # tokens, never cookies
        answer = await client.get(f"{API}/agent-status", headers={**AUTH, "Origin": "https://dash.example.com"})
        assert answer.headers["access-control-allow-origin"] == "https://dash.example.com"
        refused = await client.options(
            f"{API}/record-activity",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers


# -- TLS -----------------------------------------------------------------------------------------


def tls_env(tls: TLSFiles) -> dict[str, str]:
    return {"COLLAB_TLS_CERT": str(tls.cert), "COLLAB_TLS_KEY": str(tls.key)}


async def record_over(channel: grpc.aio.Channel, token: str = WRITE_KEY) -> grpc.StatusCode:
    method = SERVICE.methods_by_name["RecordActivity"]
    return await call_rpc(channel, method, activity("tls_agent"), token)


async def test_tls_server_and_bridge(tmp_path: Path, tls: TLSFiles) -> None:
    server = ServerProcess(tmp_path / "server", env={**SERVER_ENV, **tls_env(tls)}).start()
    bridge_env = {**BRIDGE_ENV, **tls_env(tls), "COLLAB_GRPC_TLS_CA": str(tls.ca)}
    bridge = BridgeProcess(server.target, data_dir=tmp_path / "bridge", env=bridge_env)
    try:
        # gRPC: plaintext and a client trusting another CA are refused; one trusting the CA works.
        async with grpc.aio.insecure_channel(server.target) as channel:
            assert await record_over(channel) == grpc.StatusCode.UNAVAILABLE
        untrusting = grpc.ssl_channel_credentials(tls.other_ca.read_bytes())
        async with grpc.aio.secure_channel(server.target, untrusting) as channel:
            assert await record_over(channel) == grpc.StatusCode.UNAVAILABLE
        async with collab.AsyncClient(server.target, WRITE_KEY, tls_ca=tls.ca, retries=0) as sdk:
            assert (await sdk.record_activity("tls_agent", "memory_write")).startswith("act_")
        cli = await asyncio.to_thread(
            subprocess.run,
            [COLLAB, "status", "--target", server.target, "--token", WRITE_KEY, "--tls-ca", str(tls.ca)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0 and "tls_agent" in cli.stdout, cli.stderr

        # The bridge: TLS to the server, HTTPS and WSS to browsers.
        bridge.start()
        assert bridge.http.startswith("https://") and bridge.ws.startswith("wss://")
        context = tls.client_context()
        wait_ready(Stack(server, bridge), verify=context)
        async with httpx.AsyncClient(base_url=bridge.http, verify=context, headers=AUTH, timeout=10) as client:
            url = f"{bridge.ws}?client_id=tls&token={WRITE_KEY}"
            async with connect(url, ssl=context) as ws:
                assert (await recv(ws))["type"] == "connection_established"
                assert (await recv(ws))["type"] == "collaboration_state"
                recorded = await client.post(
                    f"{API}/record-activity", json={"agent_id": "tls_agent", "activity_type": "memory_write"}
                )
                assert recorded.status_code == 200, recorded.text
                while (message := await recv(ws))["type"] != "agent_activity":
                    pass
                assert message["activity"]["activity_id"] == recorded.json()["activity_id"]
        async with httpx.AsyncClient(timeout=5) as untrusting_client:
            with pytest.raises(httpx.HTTPError):  # plaintext to the TLS port
                await untrusting_client.get(f"http://127.0.0.1:{bridge.port}/healthz")
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # not trusting the CA
                await untrusting_client.get(f"{bridge.http}/healthz")
    finally:
        for process in (bridge, server):
            if process.process is not None:
                assert process.stop() == 0


def run_until_exit(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def start_collab_up(env: dict[str, str]) -> subprocess.Popen[str]:
    """`collab up` in a session of its own, so that SIGINT reaches it as Ctrl-C would."""
    return subprocess.Popen([COLLAB, "up"], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.parametrize(
    ("process", "files", "status", "message"),
    [
        ("server", {"COLLAB_TLS_CERT": "cert"}, 2, "must be set together"),
        ("server", {"COLLAB_TLS_CERT": "junk", "COLLAB_TLS_KEY": "key"}, 1, "junk.pem is not PEM"),
        ("bridge", {"COLLAB_GRPC_TLS_CA": "missing"}, 1, "No such file or directory"),
        ("bridge", {"COLLAB_TLS_CERT": "cert", "COLLAB_TLS_KEY": "encrypted_key"}, 1, "the key is encrypted"),
    ],
)
def test_bad_tls_config_stops_the_process(
    tmp_path: Path, tls: TLSFiles, process: str, files: dict[str, str], status: int, message: str
) -> None:
    env = {name: str(tmp_path / "missing.pem") if f == "missing" else str(getattr(tls, f)) for name, f in files.items()}
    child: ServerProcess | BridgeProcess = (
        ServerProcess(tmp_path / "data", env={**SERVER_ENV, **env})
        if process == "server"
        else BridgeProcess("127.0.0.1:1", data_dir=tmp_path / "data", env={**BRIDGE_ENV, **env})
    )
    result = run_until_exit(child.argv(0), child.env)
    assert result.returncode == status, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # nothing made before the refusal


async def test_collab_up_with_tls(tmp_path: Path, tls: TLSFiles) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("COLLAB_")},
        "COLLAB_GRPC_ADDR": "127.0.0.1:0",
        "COLLAB_BRIDGE_ADDR": "127.0.0.1:0",
        "COLLAB_DATA_DIR": str(tmp_path / "data"),
        **tls_env(tls),
    }
    missing_ca = await asyncio.to_thread(run_until_exit, [COLLAB, "up"], env)
    assert missing_ca.returncode == 2 and "set COLLAB_GRPC_TLS_CA" in missing_ca.stderr
    env["COLLAB_GRPC_TLS_CA"] = str(tls.ca)
    up = start_collab_up(env)
    assert up.stdout is not None
    try:
        output = OutputLines(up.stdout)
        assert "TLS" in output.wait_for("gRPC:")
        assert output.wait_for("Dashboard:").split()[1].startswith("https://127.0.0.1:")
        websocket_url = output.wait_for("WebSocket:").split()[1]
        assert websocket_url.startswith("wss://127.0.0.1:")
        assert await ws_outcome(websocket_url, ssl=tls.client_context()) == "open"
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(20) == 0
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


# -- secrets in logs -----------------------------------------------------------------------------


async def test_no_secret_in_any_log_line(tmp_path: Path) -> None:
    """Debug logging on both processes; every kind of call and refusal; then not one of
    the configured keys, the JWT secret, a JWT or a wrong token may appear in what they
    printed (stdout and stderr)."""
    write_key, read_key, jwt_secret = (f"{name}-{secrets.token_hex(12)}" for name in ("write", "read", "jwtsecret"))
    metrics_token, wrong = f"metrics-{secrets.token_hex(12)}", f"wrong-{secrets.token_hex(12)}"
    read_jwt = jwt.encode({"scope": "read"}, jwt_secret, algorithm="HS256")
    expired_jwt = jwt.encode({"scope": "read write", "exp": int(time.time()) - 60}, jwt_secret, algorithm="HS256")
    debug = {"COLLAB_LOG_LEVEL": "debug", "GRPC_VERBOSITY": "debug"}
    stack = start_stack(
        tmp_path,
        {"COLLAB_API_KEYS": write_key, "COLLAB_READ_KEYS": read_key, "COLLAB_JWT_SECRET": jwt_secret, **debug},
        bridge_env={"COLLAB_UPSTREAM_TOKEN": write_key, "COLLAB_METRICS_TOKEN": metrics_token, **debug},
        capture_stderr=True,
    )
    server, bridge = stack.server, stack.bridge
    stopped = False
    try:
        wait_ready(stack)
        calls = 0
        async with httpx.AsyncClient(base_url=bridge.http, timeout=10) as client:
            body = {"agent_id": "quiet_agent", "activity_type": "memory_write"}
            for token in (None, wrong, read_key, write_key, read_jwt, expired_jwt):
                for header in ({"Authorization": f"Bearer {token}"}, {"X-API-Key": str(token)}):
                    headers = header if token else {}
                    await client.get(f"{API}/agent-status", headers=headers)
                    await client.post(f"{API}/record-activity", json=body, headers=headers)
                    calls += 2
            await client.get("/metrics", headers={"Authorization": f"Bearer {metrics_token}"})
            await client.get("/", params={"token": write_key})
            for token in (read_key, wrong):
                await sse_outcome(client, token=token)
            calls += 4
        for token in (write_key, wrong, read_jwt, expired_jwt):
            await ws_outcome(f"{bridge.ws}?client_id=quiet&token={token}")
            await ws_outcome(f"{bridge.ws}?client_id=quiet&token={token}", origin="https://evil.example")
            calls += 2
        async with grpc.aio.insecure_channel(server.target) as channel:
            for token in (wrong, read_key, expired_jwt):
                await record_over(channel, token)
                calls += 1
        stopped = True
        assert bridge.stop() == 0 and server.stop() == 0
        assert bridge.output is not None and server.output is not None
        printed = bridge.output.until_closed() + server.output.until_closed()
    finally:
        if not stopped:
            bridge.kill()
            server.kill()
    secret_values = {
        "write key": write_key,
        "read key": read_key,
        "JWT secret": jwt_secret,
        "metrics token": metrics_token,
        "wrong token": wrong,
        "read JWT": read_jwt,
        "expired JWT": expired_jwt,
    }
    lines = printed.splitlines()
    leaks = {name: [line for line in lines if value in line][:3] for name, value in secret_values.items()}
    assert not any(leaks.values()), leaks
    # The logs did record these requests (uvicorn's handshake lines, with the token blanked).
    assert "token=[redacted]" in printed
    assert any("refused" in line for line in lines)
    print(f"secrets in logs: {calls} calls, {len(lines)} lines printed, {len(secret_values)} secrets, 0 found")
