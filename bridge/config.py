"""collab-bridge configuration: flags with matching COLLAB_* environment variables."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    rpc_timeout: float = 10.0
    log_level: str = "info"
    log_format: str = "json"

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


_OPTIONS: list[tuple[str, str, str, type, str]] = [
    ("--bridge-addr", "COLLAB_BRIDGE_ADDR", "bridge_addr", str, "host:port to serve HTTP and WebSocket on"),
    ("--grpc-target", "COLLAB_GRPC_TARGET", "grpc_target", str, "the collab-server to connect to"),
    ("--data-dir", "COLLAB_DATA_DIR", "data_dir", Path, "where the server keeps its generated key"),
    ("--upstream-token", "COLLAB_UPSTREAM_TOKEN", "upstream_token", str, "credential of the bridge's own streams"),
    ("--client-backlog", "COLLAB_CLIENT_BACKLOG", "client_backlog", int, "messages a slow client may lag"),
    ("--event-buffer", "COLLAB_EVENT_BUFFER", "event_buffer", int, "recent events kept to resume clients"),
    ("--max-ws-message-bytes", "COLLAB_MAX_WS_MESSAGE_BYTES", "max_ws_message_bytes", int, "inbound WS cap"),
    ("--max-body-bytes", "COLLAB_MAX_BODY_BYTES", "max_body_bytes", int, "REST request body cap"),
    ("--rpc-timeout", "COLLAB_RPC_TIMEOUT", "rpc_timeout", float, "seconds a REST call waits for the server"),
    ("--log-level", "COLLAB_LOG_LEVEL", "log_level", str, "debug, info, warning or error"),
    ("--log-format", "COLLAB_LOG_FORMAT", "log_format", str, "json or text"),
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
    for name in ("client_backlog", "event_buffer", "max_ws_message_bytes", "max_body_bytes"):
        if getattr(config, name) < 1:
            parser.error(f"{name.replace('_', '-')} must be at least 1")
    if config.log_format not in {"json", "text"}:
        parser.error("log-format must be json or text")
    if config.log_level.lower() not in {"debug", "info", "warning", "error"}:
        parser.error(f"log-level must be one of debug, info, warning, error, got {config.log_level!r}")
    return config
