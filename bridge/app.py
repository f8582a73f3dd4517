"""The bridge's ASGI app: REST routes, the WebSocket, Server-Sent Events, health."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from bridge import otlp, rest
from bridge.config import BridgeConfig
from bridge.errors import CompactJSONResponse, HubError, ServerUnavailable, hub_error_response
from bridge.limits import BodySizeLimit
from bridge.metrics import BridgeMetrics, Observe, metrics_endpoint
from bridge.runtime import BridgeRuntime
from bridge.schemas import HealthBody, ReadyBody
from bridge.sse import EventStream
from bridge.websocket import CLOSE_SERVICE_RESTART, CollaborationWebSocket

__all__ = ["SHUTDOWN_REASON", "WebSocketFirst", "asgi_app", "create_app", "create_asgi_app", "drain"]

WS_PATH = "/api/v1/collaboration/ws"
_KNOWN = frozenset(status.value for status in HTTPStatus)
SSE_PATH = "/api/v1/collaboration/events"
STATIC = Path(__file__).resolve().parent / "static"
SHUTDOWN_REASON = "the bridge is restarting; reconnect and resume with since/epoch"
# How long a shutdown waits for the close frames and the ends of event streams to go out.
DRAIN_TIMEOUT = 2.0
# The browser client's source is clients/js/collab.js; static/collab.js is a symbolic link
# to it, which the build turns into a copy, so an installed bridge serves its own package data.
JS_CLIENT = STATIC / "collab.js"


class WebSocketFirst:
    """The ASGI app uvicorn serves: the collaboration WebSocket goes straight to its
    endpoint, everything else (REST, SSE, docs, lifespan) to the FastAPI app.

    Through the framework, every message a client is sent passes Starlette's
    exception-handling ``send`` wrapper: a large share of the bridge's time in a fan-out
    profile (docs/BENCHMARKS.md). The endpoint handles its own errors, so it does without."""

    def __init__(self, app: FastAPI, websocket: CollaborationWebSocket) -> None:
        self.app = app
        self.websocket = websocket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == WS_PATH:
            await self.websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def hub_error(_: Request, error: HubError) -> Response:
    """Answer a HubError raised by a route in the error shape."""
    return hub_error_response(error)


async def server_unavailable(_: Request, error: ServerUnavailable) -> Response:
    """Answer a ServerUnavailable raised by a route: 503, with Retry-After when known."""
    return hub_error_response(HubError.unavailable(error))


async def http_error(_: Request, error: StarletteHTTPException) -> Response:
    """Answer what the framework refuses itself (a body that is not UTF-8, an unknown
    path, a wrong method) in the same error shape as everything else."""
    status = error.status_code
    code = "INVALID_ARGUMENT" if status == 400 else HTTPStatus(status).name if status in _KNOWN else "ERROR"
    response = hub_error_response(HubError(status, code, str(error.detail)))
    response.headers.update(error.headers or {})
    return response


# The health checks, the dashboard and the browser client: module-level routes that read
# the bridge's runtime from the app's state, as the REST routes (bridge/rest.py) do.
site = APIRouter()


@site.get(
    "/healthz",
    tags=["health"],
    summary="The bridge process is up",
    response_model=None,
    responses={200: {"model": HealthBody}},
)
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@site.get(
    "/readyz",
    tags=["health"],
    summary="The upstream streams are connected",
    responses={
        200: {"model": ReadyBody},
        503: {"model": ReadyBody, "description": "The upstream streams are not connected (yet)"},
    },
)
async def readyz(request: Request) -> Response:
    runtime: BridgeRuntime = request.app.state.runtime
    websocket: CollaborationWebSocket = request.app.state.websocket
    upstream = runtime.upstream
    body = {
        "ready": upstream.connected,
        "epoch": runtime.hub.epoch,
        "seq": runtime.hub.last_seq,
        "clients": len(websocket.connections),
        # Why it is not connected names internal addresses: in the log (bridge.upstream), not here.
        "error": None if upstream.connected else "upstream unavailable" if upstream.last_error else "connecting",
    }
    return CompactJSONResponse(body, status_code=200 if upstream.connected else 503)


@site.get("/", include_in_schema=False)
async def dashboard() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@site.get("/dashboard.js", include_in_schema=False)
async def dashboard_script() -> FileResponse:
    return FileResponse(STATIC / "dashboard.js", media_type="text/javascript", headers={"Cache-Control": "no-cache"})


@site.get(
    "/client/collab.js",
    tags=["clients"],
    summary="The browser client (an ES module)",
    response_class=FileResponse,
    responses={200: {"content": {"text/javascript": {"schema": {"type": "string"}}}}},
)
async def js_client() -> FileResponse:
    return FileResponse(JS_CLIENT, media_type="text/javascript", headers={"Cache-Control": "no-cache"})


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the app's runtime; at shutdown, let its clients know and stop it."""
    runtime: BridgeRuntime = app.state.runtime
    await runtime.start()
    yield
    await drain(app)  # collab-bridge drains before this (bridge/main.py); other servers may not
    await runtime.stop()


def create_app(config: BridgeConfig) -> FastAPI:
    """Build the bridge's FastAPI app for ``config``: its runtime, endpoints and metrics on
    ``app.state``, its routes, error handlers and middleware."""
    runtime = BridgeRuntime(config)
    websocket = CollaborationWebSocket(runtime)
    events = EventStream(runtime)
    metrics = BridgeMetrics(config, runtime, websocket, events)
    app = FastAPI(
        title="collab bridge",
        summary="The Real-Time Collaboration Guide's REST routes, WebSocket and event stream.",
        version="1.0.0",
        lifespan=lifespan,
        default_response_class=CompactJSONResponse,
        exception_handlers={
            HubError: hub_error,
            ServerUnavailable: server_unavailable,
            StarletteHTTPException: http_error,
        },
    )
    app.state.runtime = runtime
    app.state.websocket = websocket
    app.state.metrics = metrics
    app.include_router(rest.router)
    app.router.routes.append(WebSocketRoute(WS_PATH, websocket))
    app.router.routes.append(Route(SSE_PATH, events, methods=["GET"]))
    # OTLP/HTTP trace ingest (bridge/otlp.py); not in the OpenAPI document: it speaks OTLP.
    app.router.routes.append(Route(otlp.PATH, otlp.export_traces, methods=["POST"]))
    # Not in the OpenAPI document: it is for scrapers, with a token of its own (bridge/metrics.py).
    app.router.routes.append(Route("/metrics", metrics_endpoint, methods=["GET"]))
    app.include_router(site)
    # The dashboard's other modules, styles and vendored libraries (static/vendor, with their
    # licences): all package data, so an installed bridge serves them with no CDN.
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    if config.allowed_origins:
        # Pages on the listed origins may call REST and SSE from their scripts too (same
        # list as the WebSocket's Origin check). Tokens travel in headers, never cookies.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Idempotency-Key", "Content-Type", "Last-Event-ID"],
            expose_headers=["Retry-After"],
            max_age=600,
        )
    return app


def create_asgi_app(config: BridgeConfig) -> Observe:
    """Build what uvicorn serves: the FastAPI app, with the WebSocket dispatched before it,
    and request ids and request metrics around both."""
    return asgi_app(create_app(config))


def asgi_app(app: FastAPI) -> Observe:
    """Wrap ``app`` (from create_app) as uvicorn serves it; see create_asgi_app."""
    return Observe(WebSocketFirst(app, app.state.websocket), app.state.metrics, untimed={SSE_PATH})


async def drain(app: FastAPI, within: float = DRAIN_TIMEOUT) -> None:
    """Let every client of ``app`` know the bridge is going: each WebSocket is closed with
    1012 and a reason (clients reconnect, to another bridge behind a load balancer, and
    resume with since/epoch) and each Server-Sent Events stream is ended (its client
    reconnects with Last-Event-ID). Waits at most ``within`` seconds for that to be written."""
    runtime: BridgeRuntime = app.state.runtime
    await runtime.hub.fanout.close_all(CLOSE_SERVICE_RESTART, SHUTDOWN_REASON, within)
