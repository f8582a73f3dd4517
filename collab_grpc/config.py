"""collab-server's settings: each is a flag and a COLLAB_* environment variable.

Declared once, as the fields of ServerConfig (collab_grpc/options.py reads them);
precedence: flag, then environment, then default.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from collab_grpc.options import LOG_FORMATS, LOG_LEVELS, names, option, parse, require_together
from collab_grpc.state import RosterEntry
from collab_grpc.validation import Limits, largest_item_bytes

__all__ = ["DEFAULT_METRICS_ADDR", "LOG_LEVELS", "ServerConfig", "load_roster", "parse_server_config"]

# The reply budget's bounds: gRPC receivers refuse a message over 4 MiB by default (the
# bridge and every client use that default), less room for the frame around a message;
# and at least the largest single item the input limits let in, with room around it.
MAX_REPLY_BYTES_CEILING = 4 * 1024 * 1024 - 64 * 1024
REPLY_ITEM_MARGIN = 16 * 1024
# Where /metrics is served unless --metrics-addr says otherwise: loopback only, on the
# port OpenTelemetry's Prometheus exporter uses.
DEFAULT_METRICS_ADDR = "127.0.0.1:9464"

DESCRIPTION = "The collab gRPC server: owns the hub's state and streams every change."


def _metrics_addr(value: str) -> str:
    if value.lower() == "off":
        return "off"
    host, colon, port = value.rpartition(":")
    if not colon or not host.strip("[]") or not port.isdigit() or int(port) > 65535:
        raise ValueError("expected host:port (port 0 picks a free one) or off")
    return value


@dataclass(frozen=True)
class ServerConfig:
    """collab-server's settings; each field is a flag and a COLLAB_* variable (collab_grpc/options.py)."""

    grpc_addr: str = option("127.0.0.1:50051", "host:port to listen on (port 0 picks a free one)")
    data_dir: Path = option(Path(".collab"), "where the generated API key and the SQLite file live")
    store: str = option(
        "sqlite", "sqlite (a file in the data dir), memory, or redis://host:port/db[?prefix=name] for replicas"
    )
    sqlite_synchronous: str = option(
        "full",
        "full: a write is answered once fsynced (survives power loss); normal: once committed (survives kill -9)",
        choices=("full", "normal"),
    )
    # Seconds a busy server holds a commit open for more writes (group commit); 0: never.
    sqlite_commit_delay: float = option(
        0.010,
        "seconds a busy server gathers writes into one commit (0 = commit each batch at once)",
        minimum=0,
        maximum=1,
    )
    # A hung or unreachable shared store fails calls within this, not one after another.
    store_timeout: float = option(
        2.0,
        "seconds a call waits for a Redis store (hung or unreachable) before UNAVAILABLE (REST 503)",
        minimum=0.1,
        maximum=60,
    )
    retain_count: int = option(100_000, "events and completed activities kept", minimum=1)
    retain_seconds: float = option(7 * 24 * 3600.0, "seconds after which they are dropped", minimum=0)
    auth: bool = option(True, "off: accept calls without credentials")
    api_keys: tuple[str, ...] = option((), "comma-separated read+write API keys")
    read_keys: tuple[str, ...] = option((), "comma-separated read-only API keys")
    jwt_secret: str = option("", "HS256 secret for JWTs with a `scope` claim", secret=True)
    # Accept keys and JWT secrets that are short or well-known defaults (tests, demos).
    allow_weak_credentials: bool = option(
        False,
        "on: start with keys under 16 characters, a JWT secret under 32 bytes or a known default (refused by default)",
    )
    # PEM files; both set: TLS on the gRPC port (add_secure_port), else plaintext.
    tls_cert: Path | None = option(None, "PEM certificate (chain): serve gRPC over TLS")
    tls_key: Path | None = option(None, "PEM private key of --tls-cert (unencrypted)")
    roster: Path | None = option(None, "JSON or TOML file listing agents (agent_id, department)")
    history_limit: int = option(1000, "newest activities kept for the feed", minimum=1)
    event_retain: int = option(10_000, "newest events kept for resuming subscribers", minimum=1)
    activity_ttl: float = option(3600.0, "seconds before an open activity expires", above=0)
    # An hour, as activity_ttl: the status shows who worked in the last hour, and an
    # ephemeral id per task costs the live status an hour, not forever.
    agent_idle_ttl: float = option(
        3600.0,
        "seconds an idle agent (no open activity, no active session, not in the roster) stays in the live status",
        above=0,
    )
    # A pass that used it all is followed at once by the next, after the event loop served others.
    agent_retire_batch: int = option(256, "agents the idle sweep looks at per pass", minimum=1)
    rate_limit: float = option(10.0, "records per second per agent (0 = off)", minimum=0)
    # The SQLite store filters on department, type or metadata without an index; a page
    # may come back short, with a cursor to go on.
    history_scan_rows: int = option(
        10_000,
        "rows a history search looks at per call (SQLite) when filtering on department, type or metadata",
        minimum=1,
    )
    max_metadata_bytes: int = option(64 * 1024, "metadata size cap", minimum=1)
    # Every message the server sends stays within this many bytes serialised (bounds: _check).
    max_reply_bytes: int = option(
        1024 * 1024, "byte budget of every reply, snapshot and stream message (lists beyond it are paged or counted)"
    )
    max_status_agents: int = option(
        1000,
        "agents listed in a status summary (active first; the counts stay exact, ListAgents pages the rest)",
        minimum=1,
    )
    max_snapshot_sessions: int = option(
        1000,
        "active sessions listed in a snapshot (oldest first; ListActiveCollaborations pages the rest)",
        minimum=1,
    )
    status_interval: float = option(2.0, "seconds between status updates", above=0)
    status_read_min_interval: float = option(
        1.0,
        "shortest StreamAgentStatus interval a read-only credential may ask for, in seconds",
        minimum=0.1,
        maximum=3600,
    )
    # Past its queue a subscriber reads on from the retained events, which must then still
    # reach well back past its position (what was in flight to it, what came meanwhile).
    subscriber_queue: int = option(
        0,
        "events queued for a subscriber; past it the subscriber reads on from the retained events, its stream "
        "ending only once they no longer reach back to it; at most half of --event-retain (0: half of it)",
        minimum=0,
        shown_default="half of --event-retain",
    )
    shutdown_grace: float = option(5.0, "seconds in-flight calls get on stop", minimum=0)
    log_level: str = option("info", "the least severe log lines written", choices=LOG_LEVELS)
    log_format: str = option("json", "log lines on stderr: a JSON object each, or text", choices=LOG_FORMATS)
    # None: DEFAULT_METRICS_ADDR, where a port already taken only turns metrics off;
    # "off": no metrics port; else host:port, which must be free.
    metrics_addr: str | None = option(
        None,
        "host:port serving Prometheus /metrics (port 0 picks a free one), or off",
        parse=_metrics_addr,
        shown_default=DEFAULT_METRICS_ADDR,
    )
    # collab_grpc/otlp_servicer.py refuses an Export with more (INVALID_ARGUMENT).
    otlp_max_spans: int = option(
        10_000, "spans one OTLP trace export may carry (more: the export is refused)", minimum=1
    )
    otlp_span_index: int = option(
        100_000, "spans whose records the hub remembers (24 h), so a re-exported span records nothing twice", minimum=1
    )
    otlp_waiting_children: int = option(
        100_000,
        "OTLP spans recorded before their parent span that wait, in memory, to be linked to it when it comes "
        "(oldest dropped first)",
        minimum=1,
    )
    # Memory budgets, in bytes as events.record_size counts them (serialised metadata and
    # text, plus 512 per record); see StateSettings.
    max_open_activities: int = option(
        100_000, "open activities held at once; beyond it a new one is refused (RESOURCE_EXHAUSTED)", minimum=1
    )
    max_open_activity_bytes: int = option(
        64 * 1024 * 1024,
        "bytes (serialised metadata + 512 each) open activities may hold; beyond it a new one is refused",
        minimum=1,
    )
    max_active_session_bytes: int = option(
        64 * 1024 * 1024,
        "bytes active sessions with their decisions may hold; beyond it a new one is refused",
        minimum=1,
    )
    history_bytes: int = option(32 * 1024 * 1024, "bytes of newest activities kept in memory", minimum=1)
    ended_sessions_bytes: int = option(
        32 * 1024 * 1024, "bytes of ended sessions (with their decisions) kept in memory", minimum=1
    )
    event_retain_bytes: int = option(
        64 * 1024 * 1024,
        "bytes of newest events kept in memory for resuming subscribers (and a subscriber's most lag)",
        minimum=1,
    )
    idempotency_bytes: int = option(
        64 * 1024 * 1024, "bytes of answers kept in memory for retried writes (idempotency keys)", minimum=1
    )
    idempotency_ttl: float = option(
        24 * 3600.0,
        "seconds a retried write's answer is kept (every store prunes older answers)",
        minimum=1,
        maximum=30 * 24 * 3600,
    )
    max_db_bytes: int = option(
        4 * 1024 * 1024 * 1024,
        "bytes the SQLite file may use; past it, when retention cannot free enough, new records are refused "
        "(RESOURCE_EXHAUSTED / 507); 0: no budget",
        minimum=0,
    )

    @property
    def subscriber_queue_size(self) -> int:
        """The subscriber queue in effect: as set, or half of what the event log retains."""
        return self.subscriber_queue or max(1, self.event_retain // 2)


def _check(config: ServerConfig) -> None:
    """What no single option can say: the reply budget holds the largest item; TLS needs both files."""
    needed = largest_item_bytes(Limits(max_metadata_bytes=config.max_metadata_bytes)) + REPLY_ITEM_MARGIN
    if not needed <= config.max_reply_bytes <= MAX_REPLY_BYTES_CEILING:
        raise ValueError(
            f"{names(ServerConfig, 'max_reply_bytes')}: invalid value {config.max_reply_bytes}: must be between "
            f"{needed} (the largest item --max-metadata-bytes {config.max_metadata_bytes} lets in, with room "
            f"around it) and {MAX_REPLY_BYTES_CEILING} (what a gRPC receiver accepts by default)"
        )
    require_together(config, "tls_cert", "tls_key")
    if config.subscriber_queue_size > config.event_retain // 2:
        raise ValueError(
            f"{names(ServerConfig, 'subscriber_queue')}: {config.subscriber_queue_size} must be at most half of "
            f"event-retain ({config.event_retain}): a subscriber whose queue fills reads on from the retained "
            "events, which must reach well back past it; lower it or raise --event-retain"
        )


def parse_server_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServerConfig:
    """ServerConfig from flags (``argv``), then ``env`` (default os.environ), then defaults; exit 2 on a bad one."""
    return parse(ServerConfig, argv, env, prog="collab-server", description=DESCRIPTION, check=_check)


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
