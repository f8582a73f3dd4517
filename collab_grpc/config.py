"""collab-server configuration: every flag has a matching COLLAB_* environment variable.

Precedence: flag, then environment, then default.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from collab_grpc.state import RosterEntry
from collab_grpc.validation import Limits, largest_item_bytes

__all__ = ["DEFAULT_METRICS_ADDR", "LOG_LEVELS", "ServerConfig", "load_roster", "parse_server_config"]

LOG_LEVELS = ("debug", "info", "warning", "error")
# The reply budget's bounds: gRPC receivers refuse a message over 4 MiB by default (the
# bridge and every client use that default), less room for the frame around a message;
# and at least the largest single item the input limits let in, with room around it.
MAX_REPLY_BYTES_CEILING = 4 * 1024 * 1024 - 64 * 1024
REPLY_ITEM_MARGIN = 16 * 1024
# Where /metrics is served unless --metrics-addr says otherwise: loopback only, on the
# port OpenTelemetry's Prometheus exporter uses.
DEFAULT_METRICS_ADDR = "127.0.0.1:9464"


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class ServerConfig:
    grpc_addr: str = "127.0.0.1:50051"
    data_dir: Path = Path(".collab")
    store: str = "sqlite"
    sqlite_synchronous: str = "full"
    # Seconds a busy server holds a commit open for more writes (group commit); 0: never.
    sqlite_commit_delay: float = 0.010
    retain_count: int = 100_000
    retain_seconds: float = 7 * 24 * 3600.0
    auth: bool = True
    api_keys: tuple[str, ...] = ()
    read_keys: tuple[str, ...] = ()
    jwt_secret: str = field(default="", repr=False)
    # Accept keys and JWT secrets that are short or well-known defaults (tests, demos).
    allow_weak_credentials: bool = False
    # PEM files; both set: TLS on the gRPC port (add_secure_port), else plaintext.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    roster: Path | None = None
    history_limit: int = 1000
    event_retain: int = 10_000
    activity_ttl: float = 3600.0
    # Seconds an agent stays in the live status once idle, in no active session and not
    # in the roster; then it leaves it (an agent_retired event). An hour, as activity_ttl:
    # the status shows who worked in the last hour, and an ephemeral id per task costs
    # the live status an hour, not forever.
    agent_idle_ttl: float = 3600.0
    # Agents the idle sweep looks at per pass (a pass that used it all is followed at once
    # by the next, after the event loop served others).
    agent_retire_batch: int = 256
    rate_limit: float = 10.0
    max_metadata_bytes: int = 64 * 1024
    # Every message the server sends stays within this many bytes serialised.
    max_reply_bytes: int = 1024 * 1024
    # Rows a history search (QueryActivities) looks at per call in the SQLite store when it
    # filters on department, type or metadata (no index holds them); a page may come back
    # short, with a cursor to go on.
    history_scan_rows: int = 10_000
    # The most agents a status summary lists, and active sessions a snapshot lists.
    max_status_agents: int = 1000
    max_snapshot_sessions: int = 1000
    status_interval: float = 2.0
    # The shortest StreamAgentStatus interval a read-only credential may ask for.
    status_read_min_interval: float = 1.0
    subscriber_queue: int = 10_000
    shutdown_grace: float = 5.0
    log_level: str = "info"
    log_format: str = "json"
    # None: DEFAULT_METRICS_ADDR, where a port already taken only turns metrics off;
    # "off": no metrics port; else host:port, which must be free.
    metrics_addr: str | None = None
    # Spans one OTLP Export may carry (collab_grpc/otlp_servicer.py); more: INVALID_ARGUMENT.
    otlp_max_spans: int = 10_000
    # Spans whose records the OTLP ingest remembers, so a re-exported span records nothing.
    otlp_span_index: int = 100_000
    # Memory budgets, in bytes as events.record_size counts them (serialised metadata and
    # text, plus 512 per record); see StateSettings.
    max_open_activities: int = 100_000
    max_open_activity_bytes: int = 64 * 1024 * 1024
    max_active_session_bytes: int = 64 * 1024 * 1024
    history_bytes: int = 32 * 1024 * 1024
    ended_sessions_bytes: int = 32 * 1024 * 1024
    event_retain_bytes: int = 64 * 1024 * 1024
    idempotency_bytes: int = 64 * 1024 * 1024
    max_db_bytes: int = 4 * 1024 * 1024 * 1024  # 0: no budget


# (flag, environment variable, type, help); the dest is the ServerConfig field.
_OPTIONS: list[tuple[str, str, str, type, str]] = [
    ("--grpc-addr", "COLLAB_GRPC_ADDR", "grpc_addr", str, "host:port to listen on (port 0 picks a free one)"),
    ("--data-dir", "COLLAB_DATA_DIR", "data_dir", Path, "where the generated API key and the SQLite file live"),
    (
        "--store",
        "COLLAB_STORE",
        "store",
        str,
        "sqlite (a file in the data dir), memory, or redis://host:port/db[?prefix=name] for replicas",
    ),
    (
        "--sqlite-synchronous",
        "COLLAB_SQLITE_SYNCHRONOUS",
        "sqlite_synchronous",
        str,
        "full: a write is answered once fsynced (survives power loss); normal: once committed (survives kill -9)",
    ),
    (
        "--sqlite-commit-delay",
        "COLLAB_SQLITE_COMMIT_DELAY",
        "sqlite_commit_delay",
        float,
        "seconds a busy server gathers writes into one commit (0 = commit each batch at once)",
    ),
    ("--retain-count", "COLLAB_RETAIN_COUNT", "retain_count", int, "events and completed activities kept"),
    ("--retain-seconds", "COLLAB_RETAIN_SECONDS", "retain_seconds", float, "age after which they are dropped"),
    ("--auth", "COLLAB_AUTH", "auth", str, "`on` (default) or `off` to accept calls without credentials"),
    ("--api-keys", "COLLAB_API_KEYS", "api_keys", str, "comma-separated read+write API keys"),
    ("--read-keys", "COLLAB_READ_KEYS", "read_keys", str, "comma-separated read-only API keys"),
    ("--jwt-secret", "COLLAB_JWT_SECRET", "jwt_secret", str, "HS256 secret for JWTs with a `scope` claim"),
    (
        "--allow-weak-credentials",
        "COLLAB_ALLOW_WEAK_CREDENTIALS",
        "allow_weak_credentials",
        str,
        "on: start with keys under 16 characters, a JWT secret under 32 bytes or a known default (refused by default)",
    ),
    ("--tls-cert", "COLLAB_TLS_CERT", "tls_cert", Path, "PEM certificate (chain): serve gRPC over TLS"),
    ("--tls-key", "COLLAB_TLS_KEY", "tls_key", Path, "PEM private key of --tls-cert (unencrypted)"),
    ("--roster", "COLLAB_ROSTER", "roster", Path, "JSON or TOML file listing agents (agent_id, department)"),
    ("--history-limit", "COLLAB_HISTORY_LIMIT", "history_limit", int, "newest activities kept for the feed"),
    ("--event-retain", "COLLAB_EVENT_RETAIN", "event_retain", int, "newest events kept for resuming subscribers"),
    ("--activity-ttl", "COLLAB_ACTIVITY_TTL", "activity_ttl", float, "seconds before an open activity expires"),
    (
        "--agent-idle-ttl",
        "COLLAB_AGENT_IDLE_TTL",
        "agent_idle_ttl",
        float,
        "seconds an idle agent (no open activity, no active session, not in the roster) stays in the live status",
    ),
    (
        "--agent-retire-batch",
        "COLLAB_AGENT_RETIRE_BATCH",
        "agent_retire_batch",
        int,
        "agents the idle sweep looks at per pass",
    ),
    ("--rate-limit", "COLLAB_RATE_LIMIT", "rate_limit", float, "records per second per agent (0 = off)"),
    (
        "--history-scan-rows",
        "COLLAB_HISTORY_SCAN_ROWS",
        "history_scan_rows",
        int,
        "rows a history search looks at per call (SQLite) when filtering on department, type or metadata",
    ),
    ("--max-metadata-bytes", "COLLAB_MAX_METADATA_BYTES", "max_metadata_bytes", int, "metadata size cap"),
    (
        "--max-reply-bytes",
        "COLLAB_MAX_REPLY_BYTES",
        "max_reply_bytes",
        int,
        "byte budget of every reply, snapshot and stream message (lists beyond it are paged or counted)",
    ),
    (
        "--max-status-agents",
        "COLLAB_MAX_STATUS_AGENTS",
        "max_status_agents",
        int,
        "agents listed in a status summary (active first; the counts stay exact, ListAgents pages the rest)",
    ),
    (
        "--max-snapshot-sessions",
        "COLLAB_MAX_SNAPSHOT_SESSIONS",
        "max_snapshot_sessions",
        int,
        "active sessions listed in a snapshot (oldest first; ListActiveCollaborations pages the rest)",
    ),
    ("--status-interval", "COLLAB_STATUS_INTERVAL", "status_interval", float, "seconds between status updates"),
    (
        "--status-read-min-interval",
        "COLLAB_STATUS_READ_MIN_INTERVAL",
        "status_read_min_interval",
        float,
        "shortest StreamAgentStatus interval a read-only credential may ask for (seconds, 0.1 to 3600)",
    ),
    ("--subscriber-queue", "COLLAB_SUBSCRIBER_QUEUE", "subscriber_queue", int, "events a subscriber may lag"),
    ("--shutdown-grace", "COLLAB_SHUTDOWN_GRACE", "shutdown_grace", float, "seconds in-flight calls get on stop"),
    ("--log-level", "COLLAB_LOG_LEVEL", "log_level", str, "debug, info, warning or error"),
    ("--log-format", "COLLAB_LOG_FORMAT", "log_format", str, "json or text"),
    (
        "--metrics-addr",
        "COLLAB_METRICS_ADDR",
        "metrics_addr",
        str,
        f"host:port serving Prometheus /metrics (port 0 picks a free one), or off; default {DEFAULT_METRICS_ADDR}",
    ),
    (
        "--otlp-max-spans",
        "COLLAB_OTLP_MAX_SPANS",
        "otlp_max_spans",
        int,
        "spans one OTLP trace export may carry (more: the export is refused)",
    ),
    (
        "--otlp-span-index",
        "COLLAB_OTLP_SPAN_INDEX",
        "otlp_span_index",
        int,
        "spans whose records the hub remembers (24 h), so a re-exported span records nothing twice",
    ),
    (
        "--max-open-activities",
        "COLLAB_MAX_OPEN_ACTIVITIES",
        "max_open_activities",
        int,
        "open activities held at once; beyond it a new one is refused (RESOURCE_EXHAUSTED)",
    ),
    (
        "--max-open-activity-bytes",
        "COLLAB_MAX_OPEN_ACTIVITY_BYTES",
        "max_open_activity_bytes",
        int,
        "bytes (serialised metadata + 512 each) open activities may hold; beyond it a new one is refused",
    ),
    (
        "--max-active-session-bytes",
        "COLLAB_MAX_ACTIVE_SESSION_BYTES",
        "max_active_session_bytes",
        int,
        "bytes active sessions with their decisions may hold; beyond it a new one is refused",
    ),
    ("--history-bytes", "COLLAB_HISTORY_BYTES", "history_bytes", int, "bytes of newest activities kept in memory"),
    (
        "--ended-sessions-bytes",
        "COLLAB_ENDED_SESSIONS_BYTES",
        "ended_sessions_bytes",
        int,
        "bytes of ended sessions (with their decisions) kept in memory",
    ),
    (
        "--event-retain-bytes",
        "COLLAB_EVENT_RETAIN_BYTES",
        "event_retain_bytes",
        int,
        "bytes of newest events kept in memory for resuming subscribers (and a subscriber's most lag)",
    ),
    (
        "--idempotency-bytes",
        "COLLAB_IDEMPOTENCY_BYTES",
        "idempotency_bytes",
        int,
        "bytes of answers kept in memory for retried writes (idempotency keys)",
    ),
    (
        "--max-db-bytes",
        "COLLAB_MAX_DB_BYTES",
        "max_db_bytes",
        int,
        "bytes the SQLite file may use; past it, when retention cannot free enough, new records are refused "
        "(RESOURCE_EXHAUSTED / 507); 0: no budget",
    ),
]


def parse_server_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServerConfig:
    environ = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="collab-server",
        description="The collab gRPC server: owns the hub's state and streams every change.",
        epilog="Every flag can also be set with the environment variable shown.",
    )
    for flag, variable, dest, _kind, text in _OPTIONS:
        parser.add_argument(flag, dest=dest, type=str, default=None, help=f"{text} [{variable}]")
    args = parser.parse_args(argv)
    defaults = ServerConfig()
    values: dict[str, object] = {}
    for flag, variable, dest, kind, _ in _OPTIONS:
        raw = getattr(args, dest)
        if raw is None:
            raw = environ.get(variable)
        if raw is None or raw == "":
            continue
        try:
            if dest in {"auth", "allow_weak_credentials"}:
                if raw.lower() not in {"on", "off", "true", "false", "1", "0"}:
                    raise ValueError("expected on or off")
                values[dest] = raw.lower() in {"on", "true", "1"}
            elif dest in {"api_keys", "read_keys"}:
                values[dest] = _split(raw)
            elif dest == "metrics_addr":
                values[dest] = _metrics_addr(raw)
            else:
                values[dest] = kind(raw)
        except ValueError as exc:
            parser.error(f"{flag} / {variable}: invalid value {raw!r}: {exc}")
    config = ServerConfig(**{**defaults.__dict__, **values})
    for name in (
        "history_limit",
        "event_retain",
        "max_metadata_bytes",
        "subscriber_queue",
        "retain_count",
        "max_status_agents",
        "max_snapshot_sessions",
        "agent_retire_batch",
        "otlp_max_spans",
        "otlp_span_index",
        "history_scan_rows",
        "max_open_activities",
        "max_open_activity_bytes",
        "max_active_session_bytes",
        "history_bytes",
        "ended_sessions_bytes",
        "event_retain_bytes",
        "idempotency_bytes",
    ):
        if getattr(config, name) < 1:
            parser.error(f"{name.replace('_', '-')} must be at least 1")
    if config.max_db_bytes < 0:
        parser.error(f"max-db-bytes must be 0 (no budget) or more, got {config.max_db_bytes}")
    positive = {"activity_ttl", "status_interval", "agent_idle_ttl"}
    for name in ("activity_ttl", "status_interval", "shutdown_grace", "rate_limit", "retain_seconds", "agent_idle_ttl"):
        value = getattr(config, name)
        if not math.isfinite(value) or value < 0 or (value == 0 and name in positive):
            parser.error(
                f"{name.replace('_', '-')} must be a finite number, positive (rate-limit and "
                f"shutdown-grace may be 0), got {value}"
            )
    needed = largest_item_bytes(Limits(max_metadata_bytes=config.max_metadata_bytes)) + REPLY_ITEM_MARGIN
    if not needed <= config.max_reply_bytes <= MAX_REPLY_BYTES_CEILING:
        parser.error(
            f"max-reply-bytes must be between {needed} (the largest item max-metadata-bytes "
            f"{config.max_metadata_bytes} lets in, with room around it) and {MAX_REPLY_BYTES_CEILING} "
            f"(what a gRPC receiver accepts by default), got {config.max_reply_bytes}"
        )
    if not 0.1 <= config.status_read_min_interval <= 3600:  # also refuses NaN
        parser.error(
            f"status-read-min-interval must be between 0.1 and 3600 (seconds), got {config.status_read_min_interval}"
        )
    if (config.tls_cert is None) != (config.tls_key is None):
        parser.error("--tls-cert / COLLAB_TLS_CERT and --tls-key / COLLAB_TLS_KEY must be set together")
    if not 0 <= config.sqlite_commit_delay <= 1:  # also refuses NaN
        parser.error(f"sqlite-commit-delay must be between 0 and 1 (seconds), got {config.sqlite_commit_delay}")
    if config.sqlite_synchronous.lower() not in {"full", "normal"}:
        parser.error(f"sqlite-synchronous must be full or normal, got {config.sqlite_synchronous!r}")
    if config.log_format not in {"json", "text"}:
        parser.error("log-format must be json or text")
    if config.log_level.lower() not in LOG_LEVELS:
        parser.error(f"log-level must be one of {', '.join(LOG_LEVELS)}, got {config.log_level!r}")
    return config


def _metrics_addr(value: str) -> str:
    if value.lower() == "off":
        return "off"
    host, colon, port = value.rpartition(":")
    if not colon or not host.strip("[]") or not port.isdigit() or int(port) > 65535:
        raise ValueError("expected host:port (port 0 picks a free one) or off")
    return value


def load_roster(path: Path) -> list[RosterEntry]:
    """Agents known before they record anything.

    JSON: ``[{"agent_id": "agent_1", "department": "engineering"}, ...]`` or
    ``{"agents": [...]}``; TOML: ``[[agents]]`` tables with the same keys.
    """
    text = path.read_text()
    data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    entries = data.get("agents") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of agents")
    roster = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("agent_id"), str):
            raise ValueError(f"{path}: agent {index} needs a string agent_id")
        department = entry.get("department") or ""
        if not isinstance(department, str):
            raise ValueError(f"{path}: agent {index} department must be a string")
        roster.append(RosterEntry(entry["agent_id"], department))
    return roster
