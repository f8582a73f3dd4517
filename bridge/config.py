"""collab-bridge's settings: each is a flag and a COLLAB_* environment variable.

Declared once, as the fields of BridgeConfig (collab_grpc/options.py reads them);
precedence: flag, then environment, then default.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bridge.credentials import DEFAULT_MAX_CREDENTIAL_BYTES, MAX_CREDENTIAL_BYTES_LIMIT
from bridge.origins import parse_hosts, parse_origins
from collab_grpc.options import LOG_FORMATS, LOG_LEVELS, comma_list, option, parse, require_together

__all__ = ["BridgeConfig", "parse_bridge_config"]

DESCRIPTION = "The collab bridge: the guide's WebSocket messages and REST routes over collab-server."
# The most bridge worker processes (--workers): each holds its own upstream streams.
MAX_WORKERS = 64


def _host_port(value: str) -> str:
    _host, colon, port = value.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise ValueError("expected host:port")
    return value


def _addresses(raw: str) -> tuple[str, ...]:
    """IPs or networks (uvicorn's forwarded_allow_ips), or ``*``."""
    entries = comma_list(raw)
    for entry in entries:
        if entry != "*":
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network") from None
    return entries


@dataclass(frozen=True)
class BridgeConfig:
    """collab-bridge's settings; each field is a flag and a COLLAB_* variable (collab_grpc/options.py)."""

    bridge_addr: str = option("127.0.0.1:8000", "host:port to serve HTTP and WebSocket on", parse=_host_port)
    grpc_target: str = option("127.0.0.1:50051", "the collab-server to connect to")
    data_dir: Path = option(Path(".collab"), "where the server keeps its generated key")
    # The credential of the bridge's own upstream streams; default: the server's generated key.
    upstream_token: str = option("", "credential of the bridge's own streams", secret=True)
    client_backlog: int = option(1000, "messages a slow client may lag", minimum=1)
    event_buffer: int = option(10_000, "recent events kept to resume clients", minimum=1)
    max_ws_message_bytes: int = option(64 * 1024, "inbound WS cap", minimum=1)
    max_body_bytes: int = option(1024 * 1024, "REST request body cap", minimum=1)
    # An OTLP/HTTP trace export once inflated (gzip); the server takes 4 MiB messages.
    otlp_max_bytes: int = option(
        4 * 1024 * 1024,
        "POST /v1/traces body cap once inflated (gzip); the body as sent is capped by --max-body-bytes",
        minimum=1,
    )
    # A team's pages share a token; 1,000 leaves them room while no one token can take a
    # bridge (which serves a few thousand connections) from everyone else.
    max_connections_per_token: int = option(
        1000, "open WebSocket + SSE connections one token may hold (0: no limit)", minimum=0
    )
    # The browser client sends a ping every 30 s and a subscribe per change.
    ws_messages_per_second: float = option(
        20.0, "messages a WebSocket client may send per second, bursts of twice that (0: no limit)", minimum=0
    )
    rpc_timeout: float = option(10.0, "seconds a REST call waits for the server", above=0)
    # A round asks the server whether the credentials of the open WebSocket/SSE connections
    # are still accepted (a key removed from its configuration): one RPC per distinct
    # credential, at most credential_recheck_concurrency at a time.
    credential_recheck_interval: float = option(
        60.0,
        "seconds between checks that open connections' credentials are still accepted (revoked keys end them)",
        minimum=0.1,
        maximum=24 * 3600,
    )
    credential_recheck_concurrency: int = option(
        8, "credential checks in flight at once during a recheck round", minimum=1, maximum=1000
    )
    log_level: str = option("info", "the least severe log lines written", choices=LOG_LEVELS)
    log_format: str = option("json", "log lines on stderr: a JSON object each, or text", choices=LOG_FORMATS)
    # HTTPS/WSS for browsers (PEM paths, both or neither), and the CA that signed the
    # server's certificate: set, the bridge talks TLS to the server.
    tls_cert: Path | None = option(None, "PEM certificate (chain): serve HTTPS and WSS")
    tls_key: Path | None = option(None, "PEM private key of --tls-cert (unencrypted)")
    grpc_tls_ca: Path | None = option(None, "PEM CA to trust: talk TLS to the server")
    # Normalised; "*": any.
    allowed_origins: tuple[str, ...] = option(
        (),
        "comma-separated browser origins (scheme://host[:port]) allowed besides the bridge's own; * for any",
        parse=parse_origins,
    )
    # GET /metrics is closed unless scrapers get a token of their own or it is made public.
    metrics_token: str = option("", "bearer token scrapers send for GET /metrics", secret=True)
    metrics_public: bool = option(False, "on: GET /metrics needs no token")
    # Off: every client gets the broadcast frame built once (bridge/wire.py), and a
    # connection holds no compression buffers; the guide's messages are a few hundred bytes.
    ws_compression: bool = option(
        False, "on: permessage-deflate for WebSocket clients that offer it (more CPU and memory per client)"
    )
    max_credential_bytes: int = option(
        DEFAULT_MAX_CREDENTIAL_BYTES,
        "longest token accepted; longer: 401 / close 4401",
        minimum=1,
        maximum=MAX_CREDENTIAL_BYTES_LIMIT,
    )
    # The head is timed from the connection's opening or from the end of the previous answer.
    header_timeout: float = option(
        10.0, "seconds a connection may take to send a request's head; then it is closed", above=0
    )
    body_timeout: float = option(30.0, "seconds a request's body may take; then 408", above=0)
    idle_timeout: float = option(5.0, "seconds a keep-alive HTTP connection may wait for its next request", above=0)
    # A connection that never reads could never be closed otherwise, and would hold its
    # place under max_connections for good.
    send_timeout: float = option(
        30.0, "seconds a client may leave what it is sent unread (reading nothing) before it is dropped", above=0
    )
    # Checked at start against the open-file limit (bridge/edge.py).
    max_connections: int = option(
        4096,
        "open connections the bridge holds at once (kept below the open-file limit); over it: 503",
        minimum=1,
    )
    # Flooding far over it closes with 1008.
    ws_frames_per_second: float = option(
        100.0,
        "WebSocket frames (pings, fragments included) a client may send per second, bursts of twice that (0: no limit)",
        minimum=0,
    )
    ws_max_unread_pong_bytes: int = option(
        64 * 1024,
        "bytes of pongs that may pile up for a client that does not read; over it: close 4008",
        minimum=1,
    )
    # bridge/origins.py says how the names match.
    allowed_hosts: tuple[str, ...] = option(
        (),
        "comma-separated Host names requests may use besides the listen address's; .domain for subdomains; * for any",
        parse=parse_hosts,
    )
    trusted_proxies: tuple[str, ...] = option(
        (),
        "comma-separated proxy IPs/networks whose X-Forwarded-For is believed (* for any)",
        parse=_addresses,
    )
    # Memory budgets: characters of JSON text held by the resume buffer and by one slow
    # client's backlog (besides their counts above), and resumes streamed from the server
    # at once (each holds a server stream).
    event_buffer_bytes: int = option(
        32 * 1024 * 1024, "characters of recent events kept to resume clients (the oldest go first)", minimum=1
    )
    client_backlog_bytes: int = option(
        4 * 1024 * 1024,
        "characters of messages a slow client may have waiting before it is closed (4008)",
        minimum=1,
    )
    max_concurrent_resumes: int = option(
        4,
        "clients resumed from the server's log at once (older than the buffer); others wait up to "
        "--rpc-timeout, then WebSocket 1013 / SSE stream ended, to retry",
        minimum=1,
    )
    # A client resuming from a seq the server has reached but this bridge's upstream not
    # yet (it comes from a bridge a few events ahead) waits for it, a bounded number at once.
    resume_wait: float = option(
        2.0,
        "seconds a client resuming from a seq this bridge has not received yet waits for it (0: none); "
        "then it gets a fresh state",
        minimum=0,
        maximum=60,
    )
    max_resume_waiters: int = option(
        1000,
        "clients waiting at once for this bridge to reach their seq; more: WebSocket 1013 / HTTP 503, to retry",
        minimum=1,
    )
    # Coalescing (bridge/hub.py): while the hub is behind, an event waits at most this long
    # for others to share its broadcast pass; a hub that keeps up sends each at once.
    fanout_coalesce_delay: float = option(
        0.005,
        "most seconds an event waits to share a broadcast pass while the hub is behind; one that keeps up waits none",
        minimum=0,
        maximum=1,
    )
    fanout_batch: int = option(256, "most events one broadcast pass takes (1: no hub coalescing)", minimum=1)
    # Processes serving the one listening port (SO_REUSEPORT), each with its own upstream
    # streams, restarted by the supervising process if one dies (bridge/workers.py).
    workers: int = option(
        1,
        "bridge processes sharing the listening port (SO_REUSEPORT); a dead one is restarted",
        minimum=1,
        maximum=MAX_WORKERS,
        variable="COLLAB_BRIDGE_WORKERS",  # COLLAB_WORKERS would not say whose
    )

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


def _check(config: BridgeConfig) -> None:
    """What no single option can say: HTTPS needs both files."""
    require_together(config, "tls_cert", "tls_key")


def parse_bridge_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> BridgeConfig:
    """BridgeConfig from flags (``argv``), then ``env`` (default os.environ), then defaults; exit 2 on a bad one."""
    return parse(BridgeConfig, argv, env, prog="collab-bridge", description=DESCRIPTION, check=_check)
