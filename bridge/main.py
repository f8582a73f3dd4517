"""collab-bridge: serves the app with uvicorn, WebSocket by the `websockets` package."""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
from pythonjsonlogger.core import RESERVED_ATTRS

from bridge.app import create_asgi_app
from bridge.config import parse_bridge_config

__all__ = ["log_config", "main"]

# The hard cap uvicorn enforces by closing with 1009; messages between the configured
# limit and this get an `error` reply instead, and the connection stays up.
WS_HARD_LIMIT = 1024 * 1024


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
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {"uvicorn": {"handlers": [], "propagate": True}, "uvicorn.access": {"propagate": False}},
    }


class _Server(uvicorn.Server):
    """Announces the bound address on stdout once listening (port 0 picks a free one)."""

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        await super().startup(sockets)
        if self.started:
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    print(f"collab-bridge listening on http://{host}:{port}", flush=True)
                    return


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_bridge_config(argv)
    if config.resolve_upstream_token() is None:
        print(
            "collab-bridge: warning: no COLLAB_UPSTREAM_TOKEN and no key in "
            f"{config.data_dir / 'api_key'}; the upstream streams will be refused unless auth is off",
            file=sys.stderr,
        )
    uvicorn_config = uvicorn.Config(
        create_asgi_app(config),
        host=config.host,
        port=config.port,
        ws="websockets-sansio",
        ws_max_size=max(WS_HARD_LIMIT, config.max_ws_message_bytes),
        log_config=log_config(config.log_level, config.log_format),
        access_log=False,
        lifespan="on",
    )
    # uvicorn re-raises the signal that stopped it once shut down; the handler it then
    # restores is this one, so a graceful stop exits with status 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    _Server(uvicorn_config).run()


def _exit_cleanly(_signum: int, _frame: object) -> None:
    sys.exit(0)


if __name__ == "__main__":
    main()
