"""collab-bridge configuration: flags with matching COLLAB_* environment variables."""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bridge.credentials import DEFAULT_MAX_CREDENTIAL_BYTES, MAX_CREDENTIAL_BYTES_LIMIT
from bridge.origins import parse_hosts, parse_origins

__all__ = ["BridgeConfig", "parse_bridge_config"]


@dataclass(frozen=True)
class BridgeConfig:
    bridge_addr: str = "127.0.0.1:8000"
    grpc_target: str = "127.0.0.1:50051"
    data_dir: Path = Path(".collab")
    # The credential of the bridge's own upstream streams; default: the server's generated key.
    upstream_token: str = field(default="", repr=False)
    client_backlog: int = 1000
    event_buffer: int = 10_000
    max_ws_message_bytes: int = 64 * 1024
    max_body_bytes: int = 1024 * 1024
    # An OTLP/HTTP trace export once inflated (gzip); the server takes 4 MiB messages.
    otlp_max_bytes: int = 4 * 1024 * 1024
    # Open WebSocket + SSE connections one token may hold (0: no limit). A team's pages
    # share a token; 1,000 leaves them room while no one token can take a bridge (which
    # serves a few thousand connections) from everyone else.
    max_connections_per_token: int = 1000
    # Messages one WebSocket connection may send per second, in bursts of twice that
    # (0: no limit). The browser client sends a ping every 30 s and a subscribe per change.
    ws_messages_per_second: float = 20.0
    rpc_timeout: float = 10.0
    # Seconds between two rounds of asking the server whether the credentials of the open
    # WebSocket/SSE connections are still accepted (a key removed from its configuration);
    # one RPC per distinct credential per round, at most this many at a time.
    credential_recheck_interval: float = 60.0
    credential_recheck_concurrency: int = 8
    log_level: str = "info"
    log_format: str = "json"
    # HTTPS/WSS for browsers (PEM paths, both or neither), and the CA that signed the
    # server's certificate: set, the bridge talks TLS to the server.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    grpc_tls_ca: Path | None = None
    # Browser origins allowed besides the bridge's own (normalised; "*": any).
    allowed_origins: tuple[str, ...] = ()
    # GET /metrics is closed unless scrapers get a token of their own or it is made public.
    metrics_token: str = field(default="", repr=False)
    metrics_public: bool = False
    # permessage-deflate for WebSocket clients that offer it (browsers do). Off: every
    # client then gets the broadcast frame built once (bridge/wire.py), and a connection
    # holds no compression buffers; the guide's messages are a few hundred bytes.
    ws_compression: bool = False
    # The longest credential (token) accepted; longer ones get 401 / close 4401.
    max_credential_bytes: int = DEFAULT_MAX_CREDENTIAL_BYTES
    # Seconds a connection may take to send a request's head (from its opening, or from
    # the end of the previous answer), and a request's body after its head; over them
    # it is closed (408 when a request was begun). Idle: seconds a keep-alive HTTP
    # connection may wait for its next request.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 5.0
    # Seconds a client may leave what it is sent unread (its socket full, nothing taken)
    # before its connection is dropped: a connection that never reads can never be
    # closed otherwise, and would hold its place under max_connections for good.
    send_timeout: float = 30.0
    # Open connections of every kind the bridge holds at once; one more is answered 503
    # and closed. Checked at start against the open-file limit (bridge/edge.py).
    max_connections: int = 4096
    # WebSocket frames (pings, pongs and fragments included) one connection may send per
    # second, bursts of twice that; flooding far over it closes with 1008.
    ws_frames_per_second: float = 100.0
    # Bytes of pongs that may pile up for a client that does not read; over it the client
    # is cut off like a slow reader (4008).
    ws_max_unread_pong_bytes: int = 64 * 1024
    # Host names (and IPs) requests may be addressed to besides the listen address's
    # own; "*": any; ".example.com": the domain and its subdomains (bridge/origins.py).
    allowed_hosts: tuple[str, ...] = ()
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (IPs or networks; "*": any).
    trusted_proxies: tuple[str, ...] = ()
    # Memory budgets: characters of JSON text held by the resume buffer and by one slow
    # client's backlog (besides their counts above), and resumes streamed from the server
    # at once (each holds a server stream; more wait up to rpc_timeout for a turn).
    event_buffer_bytes: int = 32 * 1024 * 1024
    client_backlog_bytes: int = 4 * 1024 * 1024
    max_concurrent_resumes: int = 4
    # Coalescing (bridge/hub.py): while the hub is busy, an event waits at most this many
    # seconds for others to share its broadcast pass (0: a pass per loop turn), and a pass
    # takes at most fanout_batch events. An idle hub broadcasts a lone event at once.
    fanout_coalesce_delay: float = 0.005
    fanout_batch: int = 256
    # Processes serving the one listening port (SO_REUSEPORT), each with its own
    # upstream streams, restarted by the supervising process if one dies (bridge/workers.py).
    workers: int = 1

    @property
    def host(self) -> str:
        return self.bridge_addr.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.bridge_addr.rsplit(":", 1)[1])

    def resolve_upstream_token(self) -> str | None:
        if self.upstream_token:
            return self.upstream_token
        key_file = self.data_dir / "api_key"
        return key_file.read_text().strip() if key_file.exists() else None


def _on_off(value: str) -> bool:
    if value.lower() not in {"on", "off", "true", "false", "1", "0"}:
        raise ValueError("expected on or off")
    return value.lower() in {"on", "true", "1"}


def _addresses(raw: str) -> tuple[str, ...]:
    """IPs or networks (uvicorn's forwarded_allow_ips), or ``*``."""
    entries = tuple(part.strip() for part in raw.split(",") if part.strip())
    for entry in entries:
        if entry != "*":
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network") from None
    return entries


# The most bridge worker processes (--workers): each holds its own upstream streams.
MAX_WORKERS = 64

# (flag, environment variable, field, parser of the text, help)
_OPTIONS: list[tuple[str, str, str, Callable[[str], object], str]] = [
    ("--bridge-addr", "COLLAB_BRIDGE_ADDR", "bridge_addr", str, "host:port to serve HTTP and WebSocket on"),
    ("--grpc-target", "COLLAB_GRPC_TARGET", "grpc_target", str, "the collab-server to connect to"),
    ("--data-dir", "COLLAB_DATA_DIR", "data_dir", Path, "where the server keeps its generated key"),
    ("--upstream-token", "COLLAB_UPSTREAM_TOKEN", "upstream_token", str, "credential of the bridge's own streams"),
    ("--client-backlog", "COLLAB_CLIENT_BACKLOG", "client_backlog", int, "messages a slow client may lag"),
    ("--event-buffer", "COLLAB_EVENT_BUFFER", "event_buffer", int, "recent events kept to resume clients"),
    ("--max-ws-message-bytes", "COLLAB_MAX_WS_MESSAGE_BYTES", "max_ws_message_bytes", int, "inbound WS cap"),
    ("--max-body-bytes", "COLLAB_MAX_BODY_BYTES", "max_body_bytes", int, "REST request body cap"),
    (
        "--otlp-max-bytes",
        "COLLAB_OTLP_MAX_BYTES",
        "otlp_max_bytes",
        int,
        "POST /v1/traces body cap once inflated (gzip); the body as sent is capped by --max-body-bytes",
    ),
    (
        "--max-connections-per-token",
        "COLLAB_MAX_CONNECTIONS_PER_TOKEN",
        "max_connections_per_token",
        int,
        "open WebSocket + SSE connections one token may hold (0: no limit)",
    ),
    (
        "--ws-messages-per-second",
        "COLLAB_WS_MESSAGES_PER_SECOND",
        "ws_messages_per_second",
        float,
        "messages a WebSocket client may send per second, bursts of twice that (0: no limit)",
    ),
    ("--rpc-timeout", "COLLAB_RPC_TIMEOUT", "rpc_timeout", float, "seconds a REST call waits for the server"),
    (
        "--credential-recheck-interval",
        "COLLAB_CREDENTIAL_RECHECK_INTERVAL",
        "credential_recheck_interval",
        float,
        "seconds between checks that open connections' credentials are still accepted (revoked keys end them)",
    ),
    (
        "--credential-recheck-concurrency",
        "COLLAB_CREDENTIAL_RECHECK_CONCURRENCY",
        "credential_recheck_concurrency",
        int,
        "credential checks in flight at once during a recheck round",
    ),
    ("--log-level", "COLLAB_LOG_LEVEL", "log_level", str, "debug, info, warning or error"),
    ("--log-format", "COLLAB_LOG_FORMAT", "log_format", str, "json or text"),
    ("--tls-cert", "COLLAB_TLS_CERT", "tls_cert", Path, "PEM certificate (chain): serve HTTPS and WSS"),
    ("--tls-key", "COLLAB_TLS_KEY", "tls_key", Path, "PEM private key of --tls-cert (unencrypted)"),
    ("--grpc-tls-ca", "COLLAB_GRPC_TLS_CA", "grpc_tls_ca", Path, "PEM CA to trust: talk TLS to the server"),
    (
        "--allowed-origins",
        "COLLAB_ALLOWED_ORIGINS",
        "allowed_origins",
        parse_origins,
        "comma-separated browser origins (scheme://host[:port]) allowed besides the bridge's own; * for any",
    ),
    ("--metrics-token", "COLLAB_METRICS_TOKEN", "metrics_token", str, "bearer token scrapers send for GET /metrics"),
    ("--metrics-public", "COLLAB_METRICS_PUBLIC", "metrics_public", _on_off, "on: GET /metrics needs no token"),
    (
        "--ws-compression",
        "COLLAB_WS_COMPRESSION",
        "ws_compression",
        _on_off,
        "on: permessage-deflate for WebSocket clients that offer it (more CPU and memory per client)",
    ),
    (
        "--max-credential-bytes",
        "COLLAB_MAX_CREDENTIAL_BYTES",
        "max_credential_bytes",
        int,
        f"longest token accepted (at most {MAX_CREDENTIAL_BYTES_LIMIT}); longer: 401 / close 4401",
    ),
    (
        "--header-timeout",
        "COLLAB_HEADER_TIMEOUT",
        "header_timeout",
        float,
        "seconds a connection may take to send a request's head; then it is closed",
    ),
    ("--body-timeout", "COLLAB_BODY_TIMEOUT", "body_timeout", float, "seconds a request's body may take; then 408"),
    (
        "--idle-timeout",
        "COLLAB_IDLE_TIMEOUT",
        "idle_timeout",
        float,
        "seconds a keep-alive HTTP connection may wait for its next request",
    ),
    (
        "--send-timeout",
        "COLLAB_SEND_TIMEOUT",
        "send_timeout",
        float,
        "seconds a client may leave what it is sent unread (reading nothing) before it is dropped",
    ),
    (
        "--max-connections",
        "COLLAB_MAX_CONNECTIONS",
        "max_connections",
        int,
        "open connections the bridge holds at once (kept below the open-file limit); over it: 503",
    ),
    (
        "--ws-frames-per-second",
        "COLLAB_WS_FRAMES_PER_SECOND",
        "ws_frames_per_second",
        float,
        "WebSocket frames (pings, fragments included) a client may send per second, bursts of twice that (0: no limit)",
    ),
    (
        "--ws-max-unread-pong-bytes",
        "COLLAB_WS_MAX_UNREAD_PONG_BYTES",
        "ws_max_unread_pong_bytes",
        int,
        "bytes of pongs that may pile up for a client that does not read; over it: close 4008",
    ),
    (
        "--allowed-hosts",
        "COLLAB_ALLOWED_HOSTS",
        "allowed_hosts",
        parse_hosts,
        "comma-separated Host names requests may use besides the listen address's; .domain for subdomains; * for any",
    ),
    (
        "--trusted-proxies",
        "COLLAB_TRUSTED_PROXIES",
        "trusted_proxies",
        _addresses,
        "comma-separated proxy IPs/networks whose X-Forwarded-For is believed (default: none; * for any)",
    ),
    (
        "--event-buffer-bytes",
        "COLLAB_EVENT_BUFFER_BYTES",
        "event_buffer_bytes",
        int,
        "characters of recent events kept to resume clients (the oldest go first)",
    ),
    (
        "--client-backlog-bytes",
        "COLLAB_CLIENT_BACKLOG_BYTES",
        "client_backlog_bytes",
        int,
        "characters of messages a slow client may have waiting before it is closed (4008)",
    ),
    (
        "--max-concurrent-resumes",
        "COLLAB_MAX_CONCURRENT_RESUMES",
        "max_concurrent_resumes",
        int,
        "clients resumed from the server's log at once (older than the buffer); others wait up to "
        "--rpc-timeout, then WebSocket 1013 / SSE stream ended, to retry",
    ),
    (
        "--fanout-coalesce-delay",
        "COLLAB_FANOUT_COALESCE_DELAY",
        "fanout_coalesce_delay",
        float,
        "most seconds (0 to 1) an event waits to share a broadcast pass while the hub is busy; an idle hub waits none",
    ),
    (
        "--fanout-batch",
        "COLLAB_FANOUT_BATCH",
        "fanout_batch",
        int,
        "most events one broadcast pass takes (1: no hub coalescing)",
    ),
    (
        "--workers",
        "COLLAB_BRIDGE_WORKERS",
        "workers",
        int,
        f"bridge processes sharing the listening port (SO_REUSEPORT), 1 to {MAX_WORKERS}; a dead one is restarted",
    ),
]


def parse_bridge_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> BridgeConfig:
    environ = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="collab-bridge",
        description="The collab bridge: the guide's WebSocket messages and REST routes over collab-server.",
        epilog="Every flag can also be set with the environment variable shown.",
    )
    for flag, variable, dest, _kind, text in _OPTIONS:
        parser.add_argument(flag, dest=dest, type=str, default=None, help=f"{text} [{variable}]")
    args = parser.parse_args(argv)
    values: dict[str, object] = {}
    for flag, variable, dest, kind, _ in _OPTIONS:
        raw = getattr(args, dest)
        if raw is None:
            raw = environ.get(variable)
        if raw is None or raw == "":
            continue
        try:
            values[dest] = kind(raw)
        except ValueError as exc:
            parser.error(f"{flag} / {variable}: invalid value {raw!r}: {exc}")
    config = BridgeConfig(**{**BridgeConfig().__dict__, **values})
    try:
        config.port  # noqa: B018 - validates the address
    except (IndexError, ValueError):
        parser.error(f"--bridge-addr / COLLAB_BRIDGE_ADDR: expected host:port, got {config.bridge_addr!r}")
    for name in (
        "client_backlog",
        "event_buffer",
        "max_ws_message_bytes",
        "max_body_bytes",
        "otlp_max_bytes",
        "event_buffer_bytes",
        "client_backlog_bytes",
        "max_concurrent_resumes",
        "fanout_batch",
    ):
        if getattr(config, name) < 1:
            parser.error(f"{name.replace('_', '-')} must be at least 1")
    if not 1 <= config.max_credential_bytes <= MAX_CREDENTIAL_BYTES_LIMIT:
        parser.error(f"max-credential-bytes must be 1 to {MAX_CREDENTIAL_BYTES_LIMIT}")
    for name in ("header_timeout", "body_timeout", "idle_timeout", "send_timeout"):
        if not 0 < getattr(config, name) < float("inf"):
            parser.error(f"{name.replace('_', '-')} must be more than 0 seconds")
    for name in ("max_connections", "ws_max_unread_pong_bytes"):
        if getattr(config, name) < 1:
            parser.error(f"{name.replace('_', '-')} must be at least 1")
    for name in ("max_connections_per_token", "ws_messages_per_second", "ws_frames_per_second"):
        if not 0 <= getattr(config, name) < float("inf"):
            parser.error(f"{name.replace('_', '-')} must be 0 (no limit) or more")
    recheck = config.credential_recheck_interval
    if not 0.1 <= recheck <= 24 * 3600.0:  # also refuses NaN
        parser.error(f"credential-recheck-interval must be between 0.1 and 86400 seconds, got {recheck}")
    if not 1 <= config.credential_recheck_concurrency <= 1000:
        parser.error(
            f"credential-recheck-concurrency must be between 1 and 1000, got {config.credential_recheck_concurrency}"
        )
    if not 0 <= config.fanout_coalesce_delay <= 1:  # also refuses NaN
        parser.error(f"fanout-coalesce-delay must be between 0 and 1 seconds, got {config.fanout_coalesce_delay}")
    if not 1 <= config.workers <= MAX_WORKERS:
        parser.error(f"workers must be between 1 and {MAX_WORKERS}, got {config.workers}")
    if (config.tls_cert is None) != (config.tls_key is None):
        parser.error("--tls-cert / COLLAB_TLS_CERT and --tls-key / COLLAB_TLS_KEY must be set together")
    if config.log_format not in {"json", "text"}:
        parser.error("log-format must be json or text")
    if config.log_level.lower() not in {"debug", "info", "warning", "error"}:
        parser.error(f"log-level must be one of debug, info, warning, error, got {config.log_level!r}")
    return config
