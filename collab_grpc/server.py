"""collab-server: assembles the state, servicer, auth, health and reflection, and runs
them until SIGTERM/SIGINT, then shuts down gracefully."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # the asyncio servicer (health.aio)
from grpc_reflection.v1alpha import reflection

from collab_grpc.auth import Authenticator, ensure_generated_key, weak_credentials
from collab_grpc.config import DEFAULT_METRICS_ADDR, ServerConfig, load_roster, parse_server_config
from collab_grpc.errors import CollabError
from collab_grpc.eventloop import run
from collab_grpc.interceptors import CallInterceptor
from collab_grpc.logs import configure_logging
from collab_grpc.metrics import MetricsEndpoint, event_recorded, serve_metrics
from collab_grpc.otlp_servicer import TRACE_SERVICE, OtlpTraceServicer, add_trace_servicer
from collab_grpc.ratelimit import RateLimiter
from collab_grpc.servicer import CollaborationServicer
from collab_grpc.state import CollaborationState, StateSettings
from collab_grpc.store import Retention, Store, StoreError, open_store
from collab_grpc.tls import server_credentials
from collab_grpc.v1 import collaboration_pb2, collaboration_pb2_grpc
from collab_grpc.validation import Limits

__all__ = ["RunningServer", "main", "start_server"]

log = logging.getLogger("collab_grpc.server")

SERVICE_NAME = collaboration_pb2.DESCRIPTOR.services_by_name["CollaborationService"].full_name


@dataclass
class RunningServer:
    server: grpc.aio.Server
    servicer: CollaborationServicer
    health: HealthServicer
    port: int
    expiry: asyncio.Task[None]
    store: Store

    async def stop(self, grace: float) -> None:
        """Stop taking calls, end every stream with UNAVAILABLE, let in-flight calls
        finish, then store what is pending and close the store."""
        await self.health.enter_graceful_shutdown()
        self.servicer.begin_shutdown()
        self.expiry.cancel()
        await self.server.stop(grace)
        await self.store.close()


def _authenticator(config: ServerConfig) -> Authenticator:
    if not config.auth:
        return Authenticator(enabled=False)
    api_keys = config.api_keys
    if not (api_keys or config.read_keys or config.jwt_secret):
        key, created = ensure_generated_key(config.data_dir)
        api_keys = (key,)
        key_file = config.data_dir / "api_key"
        if created:
            # Shown once, when made, so the operator can copy it; later starts name the file only.
            print(f"collab-server: generated API key (saved in {key_file}): {key}", flush=True)
        else:
            print(f"collab-server: using the API key saved in {key_file}", flush=True)
    _check_strength(config)
    return Authenticator(api_keys=api_keys, read_keys=config.read_keys, jwt_secret=config.jwt_secret)


def _check_strength(config: ServerConfig) -> None:
    """Refuse to start with guessable credentials unless told to accept them."""
    problems = weak_credentials(config.api_keys, config.read_keys, config.jwt_secret)
    if not problems:
        return
    if config.allow_weak_credentials:
        log.warning("weak credentials accepted (--allow-weak-credentials): %s", "; ".join(problems))
        return
    raise ValueError(
        "weak credentials refused: "
        + "; ".join(problems)
        + ". Use long random values (python3 -c 'import secrets; print(secrets.token_urlsafe(32))'), "
        "or start with --allow-weak-credentials / COLLAB_ALLOW_WEAK_CREDENTIALS=on to accept them"
    )


# The pause before the next pass when the idle sweep used its whole batch: the rest of
# the backlog follows soon, with the event loop free for other calls in between.
BACKLOG_PAUSE = 0.05
# Open activities one pass expires at most: a burst of abandoned ones (a crashed fleet)
# is failed in passes with the event loop free for other calls between them.
EXPIRE_BATCH = 1000
# Expired activity ids named in a pass's log line (the count is always exact).
LOGGED_IDS = 5


def expiry_period(settings: StateSettings) -> float:
    """How often open activities expire and idle agents retire: a tenth of the shorter
    TTL, between 50 ms and 30 s."""
    return min(30.0, max(0.05, min(settings.activity_ttl, settings.agent_idle_ttl) / 10))


async def _expire_loop(state: CollaborationState, store: Store, every: float) -> None:
    pause = every
    while True:
        await asyncio.sleep(pause)
        pause = every
        try:
            async with store.writing():
                expired = state.expire_stale_activities(EXPIRE_BATCH)
                retired = state.retire_idle_agents()
                seq = state.log.last_seq
            await store.durable(seq)
        except CollabError as error:  # the store is unavailable: try again next round
            log.warning("expiry skipped: %s", error)
            continue
        if expired:  # one line a pass, however many: a burst must not flood the log
            log.info(
                "activities expired",
                extra={"count": len(expired), "activity_ids": [a.activity_id for a in expired[:LOGGED_IDS]]},
            )
        if retired:
            log.info("idle agents retired", extra={"count": len(retired), "live_agents": state.live_agent_count})
        if state.idle_backlog or len(expired) == EXPIRE_BATCH:
            pause = min(every, BACKLOG_PAUSE)


async def start_server(config: ServerConfig) -> RunningServer:
    # TLS files first: a bad one must stop the server before it opens (or creates) a store.
    credentials = server_credentials(config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key else None
    authenticator = _authenticator(config)
    roster = load_roster(config.roster) if config.roster else []
    settings = StateSettings(
        history_limit=config.history_limit,
        event_log_retain=config.event_retain,
        activity_ttl=config.activity_ttl,
        status_agents_limit=config.max_status_agents,
        snapshot_sessions_limit=config.max_snapshot_sessions,
        agent_idle_ttl=config.agent_idle_ttl,
        agent_retire_batch=config.agent_retire_batch,
        history_bytes=config.history_bytes,
        ended_sessions_bytes=config.ended_sessions_bytes,
        event_log_retain_bytes=config.event_retain_bytes,
        max_open_activities=config.max_open_activities,
        max_open_activity_bytes=config.max_open_activity_bytes,
        max_active_session_bytes=config.max_active_session_bytes,
        idempotency_bytes=config.idempotency_bytes,
        idempotency_ttl=config.idempotency_ttl,
        limits=Limits(max_metadata_bytes=config.max_metadata_bytes),
    )
    state = CollaborationState(settings, roster=roster, rate_limiter=RateLimiter(config.rate_limit))
    store = open_store(
        config.store,
        config.data_dir,
        synchronous=config.sqlite_synchronous,
        commit_delay=config.sqlite_commit_delay,
        retention=Retention(count=config.retain_count, seconds=config.retain_seconds, max_bytes=config.max_db_bytes),
        history_scan_rows=config.history_scan_rows,
        timeout=config.store_timeout,
    )
    await store.attach(state)
    store.start()
    servicer = CollaborationServicer(
        state,
        store=store,
        status_interval=config.status_interval,
        subscriber_queue=config.subscriber_queue_size,
        max_reply_bytes=config.max_reply_bytes,
        status_read_min_interval=config.status_read_min_interval,
    )
    state.log.on_recorded = event_recorded
    interceptor = CallInterceptor(authenticator, per_item=frozenset({f"/{SERVICE_NAME}/BulkRecordActivities"}))
    server = grpc.aio.server(interceptors=[interceptor])
    collaboration_pb2_grpc.add_CollaborationServiceServicer_to_server(servicer, server)
    otlp_servicer = OtlpTraceServicer(
        state,
        store,
        max_spans=config.otlp_max_spans,
        span_index=config.otlp_span_index,
        waiting_children=config.otlp_waiting_children,
    )
    add_trace_servicer(otlp_servicer, server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            TRACE_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        if credentials is None:
            port = server.add_insecure_port(config.grpc_addr)
        else:
            port = server.add_secure_port(config.grpc_addr, credentials)
    except RuntimeError as exc:
        raise SystemExit(f"collab-server: cannot listen on {config.grpc_addr}: {exc}") from None
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    expiry = asyncio.create_task(_expire_loop(state, store, expiry_period(settings)))
    if not authenticator.enabled:
        log.warning("AUTH IS OFF: anyone who can reach port %d can read and write everything", port)
        print("collab-server: WARNING: COLLAB_AUTH=off, every call is accepted without a credential", flush=True)
    return RunningServer(server, servicer, health_servicer, port, expiry, store)


async def _serve_metrics(config: ServerConfig, running: RunningServer) -> MetricsEndpoint | None:
    """The metrics port, announced before the "listening" line (which tells a supervisor,
    and the tests, that everything announced is up)."""
    if config.metrics_addr == "off":
        return None
    store_kind = running.store.description.split(" ", 1)[0]
    addr = config.metrics_addr or DEFAULT_METRICS_ADDR
    try:
        metrics = serve_metrics(addr, running.servicer.state, store_kind, strict=config.metrics_addr is not None)
    except SystemExit:
        await running.stop(0)  # close the store before refusing to run
        raise
    if metrics is not None:
        print(f"collab-server metrics on {metrics.url}", flush=True)
    return metrics


async def _serve(config: ServerConfig) -> None:
    running = await start_server(config)
    metrics = await _serve_metrics(config, running)
    # The signal handlers first: a supervisor may stop the server as soon as it reads the
    # "listening" line, and a SIGTERM before them would kill it without a clean stop.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    host = config.grpc_addr.rsplit(":", 1)[0]
    print(f"collab-server listening on {host}:{running.port} epoch={running.servicer.state.epoch}", flush=True)
    log.info(
        "serving",
        extra={
            "addr": f"{host}:{running.port}",
            "epoch": running.servicer.state.epoch,
            "store": running.store.description,
            "tls": config.tls_cert is not None,
        },
    )
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": config.shutdown_grace})
    await running.stop(config.shutdown_grace)
    if metrics is not None:
        metrics.close()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_server_config(argv)
    configure_logging(config.log_level, config.log_format)
    try:
        run(_serve(config))
    except (OSError, ValueError, StoreError) as exc:
        sys.exit(f"collab-server: {exc}")


if __name__ == "__main__":
    main()
