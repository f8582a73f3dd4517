"""collab-bridge: serves the app with uvicorn, WebSocket by the `websockets` package."""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote_plus

import uvicorn
from fastapi import FastAPI
from pythonjsonlogger.core import RESERVED_ATTRS

from bridge.app import asgi_app, create_app, drain
from bridge.config import parse_bridge_config
from bridge.credentials import QUERY_NAME
from bridge.edge import EdgeLimits, check_open_file_limit, edge_protocols
from bridge.origins import HostCheck, HostPolicy
from bridge.request_id import request_id_filter
from bridge.tls import check_tls_files
from bridge.workers import SUPERVISOR_ENV, WORKER_ENV, end_with_supervisor, reuseport_socket, supervise
from collab_grpc.logs import TEXT_FORMAT

__all__ = ["RedactSecrets", "log_config", "main", "redact"]

# The WebSocket protocol itself refuses (close 1009, never assembled) a message over this
# many times COLLAB_MAX_WS_MESSAGE_BYTES; a message between the limit and this gets an
# `error` reply instead, and the connection stays (the guide's contract for one too large).
WS_HARD_LIMIT_FACTOR = 2
# Seconds a graceful stop waits for REST calls in flight beyond the RPC timeout.
SHUTDOWN_MARGIN = 2.0

# `?token=...` (quoted too), `Bearer ...` and `x-api-key: ...` wherever a log line quotes them.
_SECRET = re.compile(r"(?i)([?&;](?:access_)?token=[\"']?|\bbearer\s+|\bx-api-key[\"']?\s*[:=]\s*[\"']?)[^\s&\"',;]+")
# A URL's query string, wherever a log line quotes one (uvicorn's WebSocket lines do).
_QUERY = re.compile(r"\?([^\s\"'<>]*)")
# Query parameters that carry a credential, compared once percent-decoded and lower-cased,
# so that `?%74oken=` (which the bridge reads as `token`) is redacted too.
_SECRET_PARAMETERS = frozenset({QUERY_NAME, "access_token", "api_key", "x-api-key", "authorization"})
REDACTED = "[redacted]"


def _redact_query(match: re.Match[str]) -> str:
    pairs = []
    for pair in re.split(r"([&;])", match.group(1)):
        name, _, value = pair.partition("=")
        if value and unquote_plus(name).strip().lower() in _SECRET_PARAMETERS:
            pair = f"{name}={REDACTED}"
        pairs.append(pair)
    return "?" + "".join(pairs)


def redact(text: str) -> str:
    """``text`` with every credential it quotes blanked: in a URL's query string however
    its name is encoded, after `Bearer`, after `x-api-key`."""
    return _SECRET.sub(rf"\1{REDACTED}", _QUERY.sub(_redact_query, text))


class RedactSecrets(logging.Filter):
    """Blanks credentials in every record the bridge logs. uvicorn logs each WebSocket
    handshake with its query string, where browsers carry `?token=`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit: logging reports it itself
            return True
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        for name, value in list(vars(record).items()):
            if name != "msg" and isinstance(value, str) and (clean := redact(value)) != value:
                setattr(record, name, clean)
        if record.exc_info:
            # A traceback can quote a URL or header too: one holding a credential is
            # redacted and carried in the message (the formatters would print the raw one).
            trace = logging.Formatter().formatException(record.exc_info)
            if (redacted_trace := redact(trace)) != trace:
                record.msg, record.args = f"{record.getMessage()}\n{redacted_trace}", None
                record.exc_info, record.exc_text = None, None
        return True


def log_config(level: str, fmt: str) -> dict[str, Any]:
    """Logging for the whole process (uvicorn applies it): JSON lines or text on stderr."""
    formatter: dict[str, Any] = (
        {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
            # uvicorn adds an ANSI-coloured copy of its messages; not wanted in JSON.
            "reserved_attrs": [*RESERVED_ATTRS, "color_message"],
        }
        if fmt == "json"
        # Control characters escaped: a client's `%0a` cannot start a line (collab_grpc/logs.py).
        else {"()": "collab_grpc.logs.SafeTextFormatter", "fmt": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "filters": {"redact": {"()": RedactSecrets}, "request_id": {"()": request_id_filter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["request_id", "redact"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {"uvicorn": {"handlers": [], "propagate": True}, "uvicorn.access": {"propagate": False}},
    }


class _Server(uvicorn.Server):
    """Announces the bound address on stdout once listening (port 0 picks a free one), and
    shuts down gracefully (SIGTERM, SIGINT): stop listening; tell every WebSocket client
    to reconnect (1012 with a reason) and end every event stream (bridge.app.drain); let
    REST calls in flight finish, for at most the RPC timeout plus a margin; exit 0.

    The drain comes first because uvicorn's own shutdown closes each WebSocket with a bare
    1012 and then waits, without end, for event streams that never end by themselves."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.bridge_app = app

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        await super().startup(sockets)
        if self.started:
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    scheme = "https" if self.config.is_ssl else "http"
                    print(f"collab-bridge listening on {scheme}://{host}:{port}", flush=True)
                    return

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Not listening first: a client told to reconnect must not come back here.
        for server in self.servers:
            server.close()
        await drain(self.bridge_app)
        await super().shutdown(sockets)


def main(argv: Sequence[str] | None = None) -> None:
    arguments = list(sys.argv[1:] if argv is None else argv)
    config = parse_bridge_config(arguments)
    try:
        check_tls_files(config)
    except ValueError as exc:
        sys.exit(f"collab-bridge: {exc}")
    if config.resolve_upstream_token() is None:
        print(
            "collab-bridge: warning: no COLLAB_UPSTREAM_TOKEN and no key in "
            f"{config.data_dir / 'api_key'}; the upstream streams will be refused unless auth is off",
            file=sys.stderr,
        )
    try:
        max_connections, lowered = check_open_file_limit(config.max_connections)
    except ValueError as exc:
        sys.exit(f"collab-bridge: {exc}")
    if lowered:
        print(f"collab-bridge: warning: {lowered}", file=sys.stderr)
    worker = os.environ.get(WORKER_ENV)
    if config.workers > 1 and worker is None:
        sys.exit(supervise(config, arguments))
    if worker is not None and (supervisor := os.environ.get(SUPERVISOR_ENV)):
        end_with_supervisor(int(supervisor))
    http_protocol, ws_protocol = edge_protocols(EdgeLimits.from_config(config, max_connections))
    app = create_app(config)
    uvicorn_config = uvicorn.Config(
        HostCheck(asgi_app(app), HostPolicy(config.host, config.allowed_hosts)),
        host=config.host,
        port=config.port,
        http=http_protocol,
        ws=ws_protocol,
        ws_max_size=WS_HARD_LIMIT_FACTOR * config.max_ws_message_bytes,
        ws_per_message_deflate=config.ws_compression,
        timeout_keep_alive=config.idle_timeout,  # type: ignore[arg-type]  # a float works: it goes to call_later
        log_config=log_config(config.log_level, config.log_format),
        access_log=False,
        # Client addresses from X-Forwarded-For only when the connection comes from a
        # configured proxy (uvicorn would otherwise believe any local process).
        proxy_headers=bool(config.trusted_proxies),
        forwarded_allow_ips=list(config.trusted_proxies) or None,
        lifespan="on",
        ssl_certfile=config.tls_cert,
        ssl_keyfile=config.tls_key,
        # REST calls in flight wait at most the RPC timeout for the server.
        timeout_graceful_shutdown=math.ceil(config.rpc_timeout + SHUTDOWN_MARGIN),
    )
    # uvicorn re-raises the signal that stopped it once shut down; the handler it then
    # restores is this one, so a graceful stop exits with status 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    # A worker of `--workers N` shares the port with the others (bridge/workers.py).
    sockets = None if worker is None else [reuseport_socket(config.host, config.port)]
    _Server(uvicorn_config, app).run(sockets=sockets)


def _exit_cleanly(_signum: int, _frame: object) -> None:
    sys.exit(0)


if __name__ == "__main__":
    main()
