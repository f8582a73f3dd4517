"""collab-server's Prometheus metrics: the metric objects, and the HTTP port serving them.

The domain core (state, events, model) never imports this module. The interceptor, the
servicer and the stores call the functions here; what the state holds (the event log's
position, its subscribers) is read only when scraped, so it costs nothing between
scrapes. Everything lives in prometheus_client's process-wide default registry, which
also brings the standard ``process_*`` and ``python_*`` metrics.

Exported (``collab_`` prefix, units in the names):

- ``collab_events_recorded_total{kind, activity_type}``: events this server recorded,
  counted once published (stored: for SQLite, committed), events a Redis replica takes in
  from the others not counted again, so a sum over replicas is the hub's total;
- ``collab_rpcs_total{method, code}``, ``collab_rpc_duration_seconds{method}`` (unary and
  client-streaming calls; a server stream's lifetime is not a latency),
  ``collab_rpcs_in_flight{method}`` (open server streams included);
- ``collab_rate_limited_total``: records refused because the agent was over its rate;
- ``collab_store_commit_duration_seconds{store}``, ``collab_store_commit_events{store}``
  (events per commit: the SQLite store commits in groups),
  ``collab_store_commit_failures_total{store}``;
- at scrape time: ``collab_event_log_seq``, ``collab_event_log_retained_events``,
  ``collab_stream_subscribers``, ``collab_stream_subscribers_behind``,
  ``collab_server_info{epoch, store}``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from collab_grpc.errors import CollabError, RateLimited
from collab_grpc.model import ActivityType, Event, EventKind
from collab_grpc.state import CollaborationState

__all__ = [
    "EVENTS_RECORDED",
    "LATENCY_BUCKETS",
    "RATE_LIMITED",
    "RPCS",
    "RPCS_IN_FLIGHT",
    "RPC_DURATION",
    "STORE_COMMIT_DURATION",
    "STORE_COMMIT_EVENTS",
    "STORE_COMMIT_FAILURES",
    "MetricsEndpoint",
    "RpcSeries",
    "StateCollector",
    "commit_failed",
    "committed",
    "event_recorded",
    "refused",
    "rpc_series",
    "serve_metrics",
]

log = logging.getLogger("collab_grpc.metrics")

# `<name>_created` series double every counter and histogram for little use.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client

# From half a millisecond (a commit without fsync) to ten seconds (the REST timeout).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

EVENTS_RECORDED = Counter(
    "collab_events_recorded",
    "Events this server recorded, counted once published to subscribers, by event kind and activity type",
    ["kind", "activity_type"],
)
RPCS = Counter("collab_rpcs", "RPCs finished, by method and gRPC status code", ["method", "code"])
RPC_DURATION = Histogram(
    "collab_rpc_duration_seconds",
    "Time to answer a unary or client-streaming RPC, by method",
    ["method"],
    buckets=LATENCY_BUCKETS,
)
RPCS_IN_FLIGHT = Gauge("collab_rpcs_in_flight", "RPCs being handled (open server streams included)", ["method"])
RATE_LIMITED = Counter("collab_rate_limited", "Records refused because their agent was over its rate limit")
STORE_COMMIT_DURATION = Histogram(
    "collab_store_commit_duration_seconds",
    "Time a store commit took, as the writes waiting on it saw it",
    ["store"],
    buckets=LATENCY_BUCKETS,
)
STORE_COMMIT_EVENTS = Histogram(
    "collab_store_commit_events",
    "Events made durable by one store commit (writes share a commit while one runs)",
    ["store"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
STORE_COMMIT_FAILURES = Counter("collab_store_commit_failures", "Store commits that failed", ["store"])


def _event_series() -> dict[tuple[EventKind, ActivityType | None], Counter]:
    """Every (kind, activity type) pair that can occur, at zero from the start, so that
    rates are right from the first event and dashboards show every type."""
    with_type = (EventKind.ACTIVITY_RECORDED, EventKind.ACTIVITY_COMPLETED)
    series: dict[tuple[EventKind, ActivityType | None], Counter] = {}
    for kind in EventKind:
        for activity_type in ActivityType if kind in with_type else (None,):
            series[kind, activity_type] = EVENTS_RECORDED.labels(kind.value, activity_type or "")
    return series


# The children looked up once: recording an event costs one increment.
_EVENT_SERIES = _event_series()


def event_recorded(event: Event) -> None:
    """The event log's ``on_recorded`` hook: count one published event of this server."""
    _EVENT_SERIES[event.kind, event.activity_type].inc()


class RpcSeries:
    """One method's series, looked up once: observing a call costs a few increments,
    not a label lookup (a lock and a dict) for each."""

    __slots__ = ("_finished", "duration", "in_flight", "method")

    def __init__(self, method: str) -> None:
        self.method = method
        self.in_flight = RPCS_IN_FLIGHT.labels(method)
        self.duration = RPC_DURATION.labels(method)
        self._finished: dict[grpc.StatusCode, Counter] = {}

    def finished(self, code: grpc.StatusCode) -> Counter:
        counter = self._finished.get(code)
        if counter is None:
            counter = self._finished[code] = RPCS.labels(self.method, code.name)
        return counter


# By method: only methods the server has reach here, so it stays small.
_RPC_SERIES: dict[str, RpcSeries] = {}


def rpc_series(method: str) -> RpcSeries:
    series = _RPC_SERIES.get(method)
    if series is None:
        series = _RPC_SERIES[method] = RpcSeries(method)
    return series


def refused(error: CollabError) -> None:
    """Count a refusal the metrics single out (rate-limit rejections)."""
    if isinstance(error, RateLimited):
        RATE_LIMITED.inc()


def committed(store: str, seconds: float, events: int) -> None:
    STORE_COMMIT_DURATION.labels(store).observe(seconds)
    STORE_COMMIT_EVENTS.labels(store).observe(events)


def commit_failed(store: str) -> None:
    STORE_COMMIT_FAILURES.labels(store).inc()


class StateCollector(Collector):
    """Gauges of the state, read when scraped.

    A scrape runs on prometheus_client's HTTP thread while the event loop changes the
    state; each value is one read of an int or a container's length (atomic under the
    GIL), and a read that loses a race reports the log as empty rather than failing."""

    def __init__(self, state: CollaborationState, store: str) -> None:
        self.state = state
        self.store = store

    def collect(self) -> Iterator[Metric]:
        event_log = self.state.log
        seq = event_log.published_seq
        try:
            retained = max(0, seq - event_log.first_retained_seq + 1)
        except IndexError:  # emptied (a reload) between the check and the read
            retained = 0
        yield GaugeMetricFamily("collab_event_log_seq", "The seq of the newest event published", value=seq)
        yield GaugeMetricFamily(
            "collab_event_log_retained_events", "Events kept in memory to resume subscribers from", value=retained
        )
        yield GaugeMetricFamily(
            "collab_stream_subscribers", "Open event subscriptions (SubscribeEvents)", value=event_log.subscriber_count
        )
        yield GaugeMetricFamily(
            "collab_stream_subscribers_behind",
            "Event subscriptions whose queue filled, reading on from the retained events",
            value=event_log.subscribers_behind,
        )
        info = GaugeMetricFamily("collab_server_info", "This server's epoch and store kind", labels=["epoch", "store"])
        info.add_metric([self.state.epoch, self.store], 1)
        yield info


@dataclass
class MetricsEndpoint:
    """The HTTP server answering scrapes (prometheus_client's, on a thread of its own)."""

    url: str
    server: WSGIServer
    thread: threading.Thread
    collector: StateCollector

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        REGISTRY.unregister(self.collector)


def serve_metrics(addr: str, state: CollaborationState, store: str, *, strict: bool) -> MetricsEndpoint | None:
    """Serve ``/metrics`` on ``addr`` (``host:port``; port 0 picks a free one).

    ``strict``: the address was asked for, and failing to bind it stops the server. The
    default address is only tried: a second server on one machine (the scale-out
    example) runs without metrics and says so, instead of refusing to start."""
    host, port = addr.rsplit(":", 1)
    host = host.strip("[]")
    for store_metric in (STORE_COMMIT_DURATION, STORE_COMMIT_EVENTS, STORE_COMMIT_FAILURES):
        store_metric.labels(store)  # shown (at zero) before the first commit, or failure
    collector = StateCollector(state, store)
    REGISTRY.register(collector)
    try:
        server, thread = start_http_server(int(port), addr=host)
    except OSError as error:
        REGISTRY.unregister(collector)
        if strict:
            raise SystemExit(f"collab-server: cannot serve metrics on {addr}: {error}") from None
        log.warning("metrics off: cannot listen on the default %s: %s", addr, error, extra={"addr": addr})
        print(
            f"collab-server: warning: metrics off, cannot listen on {addr} ({error.strerror}); set --metrics-addr",
            flush=True,
        )
        return None
    bound_port = server.server_port
    shown = f"[{host}]" if ":" in host else host
    return MetricsEndpoint(f"http://{shown}:{bound_port}/metrics", server, thread, collector)
