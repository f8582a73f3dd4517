"""`collab`: the hub's command line: `up`, `status`, `tail`, `history`, `record`, `complete`.

`collab up` starts the gRPC server and the bridge for one machine with no
configuration, prints where to connect and with which token, and stops everything on
Ctrl-C (the bridge first, then the server). Their logs are text on a terminal, JSON lines
otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from collab_cli import commands
from collab_cli.supervisor import Child, StopRequested, Supervisor
from collab_grpc.extras import require_server

__all__ = ["choose_log_format", "main"]


SERVER = Child("collab-server", [sys.executable, "-m", "collab_grpc.server"], "collab-server listening on")
BRIDGE = Child("collab-bridge", [sys.executable, "-m", "bridge.main"], "collab-bridge listening on")


def _address(ready_line: str) -> str:
    """What a child's ready line says it listens on."""
    return ready_line.split("listening on ", 1)[1].split()[0]


def _token(env: dict[str, str], data_dir: Path) -> str | None:
    """The read+write token a local user should use, as the server will accept it."""
    if env.get("COLLAB_AUTH", "on").lower() in {"off", "false", "0"}:
        return None
    keys = [k.strip() for k in env.get("COLLAB_API_KEYS", "").split(",") if k.strip()]
    if keys:
        return keys[0]
    key_file = data_dir / "api_key"
    return key_file.read_text().strip() if key_file.exists() else None


def choose_log_format(requested: str | None, env: Mapping[str, str]) -> str:
    """--log-format, else COLLAB_LOG_FORMAT, else text for a person reading a terminal
    and JSON lines for anything else (a file, a pipe, a log collector)."""
    if requested:
        return requested
    if env.get("COLLAB_LOG_FORMAT"):
        return env["COLLAB_LOG_FORMAT"]
    # The children log on the stderr they inherit from this process.
    return "text" if sys.stderr.isatty() else "json"


async def _up(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    env["COLLAB_LOG_FORMAT"] = choose_log_format(args.log_format, env)
    if args.grpc_addr:
        env["COLLAB_GRPC_ADDR"] = args.grpc_addr
    if args.data_dir:
        env["COLLAB_DATA_DIR"] = str(args.data_dir)
    if args.bridge_addr:
        env["COLLAB_BRIDGE_ADDR"] = args.bridge_addr
    data_dir = Path(env.get("COLLAB_DATA_DIR", ".collab"))
    tls = bool(env.get("COLLAB_TLS_CERT"))
    if tls and not env.get("COLLAB_GRPC_TLS_CA"):
        # Both processes serve TLS with that certificate; the bridge must be able to verify the server's.
        print("collab: COLLAB_TLS_CERT is set: set COLLAB_GRPC_TLS_CA to the CA file that signed it", file=sys.stderr)
        return 2
    supervisor = Supervisor(env)
    supervisor.handle_stop_signals()
    try:
        target = _address(await supervisor.start(SERVER))
        # The bridge follows the server it just started, whatever port that got.
        supervisor.env["COLLAB_GRPC_TARGET"] = target
        http = _address(await supervisor.start(BRIDGE))
    except StopRequested:
        await supervisor.stop_all()
        return 0
    except RuntimeError as exc:
        print(f"collab: {exc}", file=sys.stderr)
        await supervisor.stop_all()
        return 1
    ws = "ws" + http.removeprefix("http")  # http://... -> ws://..., https://... -> wss://...
    token = _token(env, data_dir)
    query = f"&token={token}" if token else ""
    print()
    print(f"  gRPC:      {target}  ({'TLS, ' if tls else ''}service collab.v1.CollaborationService, reflection on)")
    print(f"  Dashboard: {http}/?token={token}" if token else f"  Dashboard: {http}/")
    print(f"  REST:      {http}/api/v1/collaboration/agent-status  (API docs: {http}/docs)")
    print(f"  WebSocket: {ws}/api/v1/collaboration/ws?client_id=me{query}")
    print(f"  token:     {token}" if token else "  token:     none needed (COLLAB_AUTH=off)")
    print("  Ctrl-C stops the hub.")
    print(flush=True)
    return await supervisor.run_until_stopped()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="collab", description="The collab hub's command line.")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = subcommands.add_parser("up", help="run the hub on this machine until Ctrl-C")
    up.add_argument("--grpc-addr", help="gRPC listen address [COLLAB_GRPC_ADDR, default 127.0.0.1:50051]")
    up.add_argument("--data-dir", type=Path, help="data directory [COLLAB_DATA_DIR, default ./.collab]")
    up.add_argument("--bridge-addr", help="HTTP/WebSocket listen address [COLLAB_BRIDGE_ADDR, default 127.0.0.1:8000]")
    up.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="the processes' log lines on stderr [COLLAB_LOG_FORMAT, default text on a terminal, else json]",
    )
    commands.add_commands(subcommands)
    args = parser.parse_args(argv)
    if args.command == "up":
        require_server("collab up")  # before any child starts: one line, not two tracebacks
        sys.exit(asyncio.run(_up(args)))
    sys.exit(commands.run(args))
