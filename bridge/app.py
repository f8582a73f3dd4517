"""The bridge's ASGI app: REST routes, the WebSocket, Server-Sent Events, health."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.routing import Route, WebSocketRoute

from bridge.config import BridgeConfig
from bridge.limits import BodySizeLimit
from bridge.rest import HubError, build_router, hub_error_response
from bridge.runtime import BridgeRuntime
from bridge.sse import EventStream
from bridge.websocket import CLOSE_GOING_AWAY, CollaborationWebSocket, Receive, Scope, Send

__all__ = ["WebSocketFirst", "create_app", "create_asgi_app"]

WS_PATH = "/api/v1/collaboration/ws"
SSE_PATH = "/api/v1/collaboration/events"
STATIC = Path(__file__).resolve().parent / "static"
# The browser client's source lives with the other clients; the bridge serves it as is.
JS_CLIENT = Path(__file__).resolve().parents[1] / "clients" / "js" / "collab.js"


class WebSocketFirst:
    """The ASGI app uvicorn serves: the collaboration WebSocket goes straight to its
    endpoint, everything else (REST, SSE, docs, lifespan) to the FastAPI app.

    Through the framework, every message a client is sent passes Starlette's
    exception-handling ``send`` wrapper: 15 % of the bridge's time in a fan-out profile
    (docs/BENCHMARKS.md). The endpoint handles its own errors, so it does without."""

    def __init__(self, app: FastAPI, websocket: CollaborationWebSocket) -> None:
        self.app = app
        self.websocket = websocket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == WS_PATH:
            await self.websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def create_app(config: BridgeConfig) -> FastAPI:
    runtime = BridgeRuntime(config)
    websocket = CollaborationWebSocket(runtime)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        yield
        websocket.close_all(CLOSE_GOING_AWAY, "the bridge is shutting down; reconnect and resume")
        await runtime.stop()

    app = FastAPI(
        title="collab bridge",
        summary="The Real-Time Collaboration Guide's REST routes, WebSocket and event stream.",
        version="1.0.0",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.websocket = websocket
    app.include_router(build_router(runtime))
    app.router.routes.append(WebSocketRoute(WS_PATH, websocket))
    app.router.routes.append(Route(SSE_PATH, EventStream(runtime), methods=["GET"]))

    @app.exception_handler(HubError)
    async def hub_error(_: Request, error: HubError) -> JSONResponse:
        return hub_error_response(error)

    @app.get("/healthz", tags=["health"], summary="The bridge process is up")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="The upstream streams are connected")
    async def readyz() -> JSONResponse:
        upstream = runtime.upstream
        body = {
            "ready": upstream.connected,
            "epoch": runtime.hub.epoch,
            "seq": runtime.hub.last_seq,
            "clients": len(websocket.connections),
            "error": None if upstream.connected else upstream.last_error or "connecting",
        }
        return JSONResponse(body, status_code=200 if upstream.connected else 503)

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard.js", include_in_schema=False)
    async def dashboard_script() -> FileResponse:
        return FileResponse(
            STATIC / "dashboard.js", media_type="text/javascript", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/client/collab.js", tags=["clients"], summary="The browser client (an ES module)")
    async def js_client() -> FileResponse:
        return FileResponse(JS_CLIENT, media_type="text/javascript", headers={"Cache-Control": "no-cache"})

    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    return app


def create_asgi_app(config: BridgeConfig) -> WebSocketFirst:
    """What uvicorn serves: the FastAPI app, with the WebSocket dispatched before it."""
    app = create_app(config)
    return WebSocketFirst(app, app.state.websocket)
