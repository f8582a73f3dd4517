"""collab-bridge: serves the app with uvicorn, WebSocket by the `websockets` package."""

from __future__ import annotations

import logging
import math
import re
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI
from pythonjsonlogger.core import RESERVED_ATTRS

from bridge.app import asgi_app, create_app, drain
from bridge.config import parse_bridge_config
from bridge.request_id import request_id_filter
from bridge.tls import check_tls_files

__all__ = ["RedactSecrets", "log_config", "main"]

# The hard cap uvicorn enforces by closing with 1009; messages between the configured
# limit and this get an `error` reply instead, and the connection stays up.
WS_HARD_LIMIT = 1024 * 1024
# Seconds a graceful stop waits for REST calls in flight beyond the RPC timeout.
SHUTDOWN_MARGIN = 2.0

# `?token=...` in a URL, `Bearer ...` and `x-api-key: ...` in headers, wherever a log line quotes them.
_SECRET = re.compile(r"(?i)([?&](?:access_)?token=[\"']?|\bbearer\s+|\bx-api-key[\"']?\s*[:=]\s*[\"']?)[^\s&\"',;]+")


class RedactSecrets(logging.Filter):
    """Blanks credentials in every record the bridge logs. uvicorn logs each WebSocket
    handshake with its query string, where browsers carry `?token=`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit: logging reports it itself
            return True
        redacted = _SECRET.sub(r"\1[redacted]", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        for name, value in list(vars(record).items()):
            if name != "msg" and isinstance(value, str) and _SECRET.search(value):
                setattr(record, name, _SECRET.sub(r"\1[redacted]", value))
        if record.exc_info:
            # A traceback can quote a URL or header too: one holding a credential is
            # redacted and carried in the message (the formatters would print the raw one).
            trace = logging.Formatter().formatException(record.exc_info)
            if _SECRET.search(trace):
                redacted_trace = _SECRET.sub(r"\1[redacted]", trace)
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
        else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
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
    config = parse_bridge_config(argv)
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
    app = create_app(config)
    uvicorn_config = uvicorn.Config(
        asgi_app(app),
        host=config.host,
        port=config.port,
        ws="websockets-sansio",
        ws_max_size=max(WS_HARD_LIMIT, config.max_ws_message_bytes),
        ws_per_message_deflate=config.ws_compression,
        log_config=log_config(config.log_level, config.log_format),
        access_log=False,
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
    _Server(uvicorn_config, app).run()


def _exit_cleanly(_signum: int, _frame: object) -> None:
    sys.exit(0)


if __name__ == "__main__":
    main()
