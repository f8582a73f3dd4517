"""The bridge's Prometheus metrics (``GET /metrics``) and its request middleware.

The hot modules (fan-out, WebSocket, SSE, upstream) keep plain integer tallies and know
nothing of Prometheus: a broadcast adds one number per event, never a metrics call per
client. BridgeCollector turns those tallies into metrics when scraped, on the event loop
(so it reads them between two changes, never during one). REST requests are counted and
timed by the Observe middleware, which also gives each request its id.

Each app has a registry of its own: a process that builds several apps (the tests do)
would otherwise register the same names twice.

``/metrics`` is on the bridge's public port, so it is closed unless the operator opens
it: with ``COLLAB_METRICS_TOKEN`` set a scraper sends ``Authorization: Bearer <token>``
(the token is checked here, so metrics stay readable while the server is down); with
``COLLAB_METRICS_PUBLIC=on`` it is open (a port reachable only from inside).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Collection, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from bridge.config import BridgeConfig
from bridge.errors import HubError, hub_error_response
from bridge.fanout import Subscriber
from bridge.request_id import HEADER, REQUEST_ID, request_id_from_headers
from bridge.runtime import BridgeRuntime
from bridge.sse import EventStream
from bridge.websocket import (
    CLOSE_BAD_REQUEST,
    CLOSE_FORBIDDEN,
    CLOSE_TOO_MANY,
    CLOSE_TRY_AGAIN,
    CLOSE_UNAUTHORIZED,
    CollaborationWebSocket,
)

__all__ = ["LATENCY_BUCKETS", "BridgeCollector", "BridgeMetrics", "Observe", "metrics_endpoint"]

log = logging.getLogger("bridge.http")

# `<name>_created` series double every counter and histogram for little use.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Backlog depths, in messages: 0 (never behind) up to beyond the default bound of 1000.
BACKLOG_BUCKETS = (0, 1, 8, 64, 256, 1000, 4096, 16384)
# The close codes a connecting client can be refused with, shown at zero from the start.
REFUSAL_CODES = (CLOSE_BAD_REQUEST, CLOSE_UNAUTHORIZED, CLOSE_FORBIDDEN, CLOSE_TOO_MANY, CLOSE_TRY_AGAIN)
# Methods kept as labels; anything else (a fuzzer's inventions) is counted as "other".
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _route_label(scope: Scope) -> str:
    """Return the route's template (``/activities/{activity_id}``), never the raw path, so
    labels stay bounded whatever paths clients try."""
    # path_format: the template without convertors (`{activity_id:path}` reads `{activity_id}`).
    template: str | None = getattr(scope.get("route"), "path_format", None)  # set by FastAPI's routes
    if template is None and "endpoint" in scope and not scope.get("path_params"):
        template = scope["path"]  # a plain Starlette route without parameters (/metrics)
    return template or "unmatched"


class BridgeCollector(Collector):
    """The tallies of the fan-out, the endpoints and the upstream, as metrics."""

    def __init__(self, runtime: BridgeRuntime, websocket: CollaborationWebSocket, events: EventStream) -> None:
        self.runtime = runtime
        self.websocket = websocket
        self.events = events

    def collect(self) -> Iterator[Metric]:
        fanout = self.runtime.hub.fanout
        upstream = self.runtime.upstream
        websocket = self.websocket
        yield GaugeMetricFamily(
            "collab_bridge_websocket_connections", "WebSocket clients connected", value=len(websocket.connections)
        )
        yield CounterMetricFamily(
            "collab_bridge_websocket_accepted", "WebSocket clients accepted and started", value=websocket.accepted
        )
        refused = CounterMetricFamily(
            "collab_bridge_websocket_refused", "WebSocket connections refused, by close code", labels=["code"]
        )
        for code in sorted({*REFUSAL_CODES, *websocket.refused}):
            refused.add_metric([str(code)], websocket.refused.get(code, 0))
        yield refused
        yield GaugeMetricFamily(
            "collab_bridge_sse_clients", "Server-Sent Events clients connected", value=self.events.clients
        )
        messages = CounterMetricFamily(
            "collab_bridge_fanout_messages",
            "Messages offered to the connected clients by broadcasts, by message type",
            labels=["type"],
        )
        for message_type, count in sorted(fanout.messages_offered.items()):
            messages.add_metric([message_type], count)
        yield messages
        yield CounterMetricFamily(
            "collab_bridge_fanout_passes",
            "Broadcast passes over the clients (fewer than the frames they carried: coalesced)",
            value=fanout.passes,
        )
        yield CounterMetricFamily(
            "collab_bridge_fanout_frames",
            "Frames (events, status updates) the broadcast passes carried",
            value=fanout.frames_passed,
        )
        current = max((subscriber.high_water for subscriber in fanout.subscribers), default=0)
        yield GaugeMetricFamily(
            "collab_bridge_client_backlog_high_water_messages",
            "The deepest backlog any client reached since the bridge started",
            value=max(fanout.peak_backlog, current),
        )
        yield CounterMetricFamily(
            "collab_bridge_slow_client_disconnects",
            "Clients cut off for falling too far behind (WebSocket close code 4008)",
            value=fanout.slow_disconnects,
        )
        reconnects = CounterMetricFamily(
            "collab_bridge_upstream_reconnects",
            "Times an upstream stream to the server was lost (or not reached) and retried, by stream",
            labels=["stream"],
        )
        for stream, count in sorted(upstream.reconnects.items()):
            reconnects.add_metric([stream], count)
        yield reconnects
        waits = CounterMetricFamily(
            "collab_bridge_resume_waits",
            "Resuming clients that waited for the upstream to reach their seq, by how the wait ended "
            "(caught_up; expired: given a fresh state; refused: too many waiting, told to retry)",
            labels=["outcome"],
        )
        for outcome, count in self.runtime.catch_up.outcomes.items():
            waits.add_metric([outcome.value], count)
        yield waits
        skipped = CounterMetricFamily(
            "collab_bridge_events_skipped",
            "Events from the server this bridge cannot show (a newer server's kinds: upgrade the bridge), by kind",
            labels=["kind"],
        )
        for kind, count in sorted(self.runtime.hub.skipped.counts.items()):
            skipped.add_metric([kind], count)
        yield skipped
        yield GaugeMetricFamily(
            "collab_bridge_upstream_last_seq", "The seq of the newest event received from the server", upstream.last_seq
        )
        yield GaugeMetricFamily(
            "collab_bridge_upstream_connected", "1 while both upstream streams are connected", int(upstream.connected)
        )


class BridgeMetrics:
    """One app's registry and its request metrics, served by ``metrics_endpoint``."""

    def __init__(
        self, config: BridgeConfig, runtime: BridgeRuntime, websocket: CollaborationWebSocket, events: EventStream
    ) -> None:
        self.token = config.metrics_token
        self.public = config.metrics_public
        self.registry = CollectorRegistry()
        for standard in (ProcessCollector, PlatformCollector, GCCollector):
            standard(registry=self.registry)
        self.registry.register(BridgeCollector(runtime, websocket, events))
        self.requests = Counter(
            "collab_bridge_http_requests",
            "HTTP requests answered (Server-Sent Events streams aside), by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "collab_bridge_http_request_duration_seconds",
            "Time to answer an HTTP request, by route and method",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.backlog_peaks = Histogram(
            "collab_bridge_client_backlog_peak_messages",
            "The deepest backlog each client reached, observed when it left",
            buckets=BACKLOG_BUCKETS,
            registry=self.registry,
        )
        runtime.hub.fanout.on_leave = self._client_left

    def _client_left(self, subscriber: Subscriber) -> None:
        self.backlog_peaks.observe(subscriber.high_water)

    def observe_request(self, scope: Scope, status: int, seconds: float) -> None:
        """Count and time an answered request, and log it (failures at info and above)."""
        route = _route_label(scope)
        method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
        self.requests.labels(route, method, str(status)).inc()
        self.request_duration.labels(route, method).observe(seconds)
        level = logging.WARNING if status >= 500 else logging.INFO if status >= 400 else logging.DEBUG
        if log.isEnabledFor(level):
            # The path, never the query string: a browser's token may be in it.
            fields = {"method": method, "route": route, "path": scope["path"], "status": status}
            log.log(level, "%s %s %d", method, scope["path"], status, extra={**fields, "duration_ms": seconds * 1e3})

    def refusal(self, request: Request) -> Response | None:
        """Answer a scrape that may not read the metrics (401/403), or None when it may."""
        if self.public:
            return None
        if not self.token:
            detail = (
                "metrics are closed on this port: set COLLAB_METRICS_TOKEN (scrapers send it as a bearer "
                "token) or COLLAB_METRICS_PUBLIC=on"
            )
            return hub_error_response(HubError(403, "PERMISSION_DENIED", detail))
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return hub_error_response(
                HubError(401, "UNAUTHENTICATED", "send the metrics token: `Authorization: Bearer <token>`")
            )
        return None


async def metrics_endpoint(request: Request) -> Response:
    """Answer ``GET /metrics`` with the app's registry (``app.state.metrics``) in the format the scraper asks for."""
    metrics: BridgeMetrics = request.app.state.metrics
    if (refusal := metrics.refusal(request)) is not None:
        return refusal
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(metrics.registry), headers={"Content-Type": content_type})


class Observe:
    """The outermost ASGI layer: a request id for every request and WebSocket connection
    (its log lines, its RPCs, the ``X-Request-ID`` response header), and HTTP requests
    counted, timed and logged. WebSocket messages pass untouched: the fan-out writes
    each frame with the server's own ``send``."""

    def __init__(self, app: Any, metrics: BridgeMetrics, untimed: Collection[str] = ()) -> None:
        self.app = app
        self.metrics = metrics
        # Paths of long-lived streams: their duration is no latency.
        self.untimed = frozenset(untimed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = request_id_from_headers(scope.get("headers", ()))
        token = REQUEST_ID.set(request_id)
        try:
            if scope["type"] == "websocket":
                await self.app(scope, receive, send)
            else:
                await self._http(scope, receive, send, request_id)
        finally:
            REQUEST_ID.reset(token)

    async def _http(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        status = 0  # stays 0 if the client left before an answer started
        header = (HEADER.encode(), request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["path"] not in self.untimed:
                self.metrics.observe_request(scope, status, time.perf_counter() - started)
