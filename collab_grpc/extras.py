"""What the hub's commands need beyond the SDK's dependencies, and the line that says how
to install it.

``pip install collab-hub`` brings the SDK and the command line's client commands
(protobuf and grpcio only); ``collab-hub[server]`` adds what the server and the bridge
import, ``collab-hub[redis]`` the Redis store's driver (pyproject.toml). `collab-server`,
`collab-bridge` and `collab up` check for the server's modules before importing any, so
that without them a user reads one line naming the missing distributions and the command
to install them, not an ImportError's traceback.

Imports only the standard library: the command line imports it with the SDK's
dependencies alone.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

__all__ = [
    "REDIS_INSTALL",
    "SERVER_INSTALL",
    "SERVER_MODULES",
    "bridge_command",
    "missing_server_distributions",
    "require_server",
    "server_command",
]

SERVER_INSTALL = "pip install 'collab-hub[server]'"
REDIS_INSTALL = "pip install 'collab-hub[redis]'"

# Each distribution of the [server] extra (pyproject.toml) and a module it installs, the
# one the hub imports (tests/collab_grpc/test_extras.py checks the two agree). uvloop is
# not here: the server runs without it (collab_grpc/eventloop.py).
SERVER_MODULES: dict[str, str] = {
    "grpcio-health-checking": "grpc_health",
    "grpcio-reflection": "grpc_reflection",
    "PyJWT": "jwt",
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "websockets": "websockets",
    "python-json-logger": "pythonjsonlogger",
    "prometheus-client": "prometheus_client",
    "orjson": "orjson",
    "opentelemetry-proto": "opentelemetry.proto",
    "googleapis-common-protos": "google.rpc",
}


def _importable(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (only its parent package)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing (opentelemetry, google)
        return False


def missing_server_distributions() -> list[str]:
    """The distributions of the [server] extra whose module cannot be imported here."""
    return [distribution for distribution, module in SERVER_MODULES.items() if not _importable(module)]


def require_server(command: str) -> None:
    """Exit (status 1) with one line on stderr when the server's dependencies are missing."""
    missing = missing_server_distributions()
    if missing:
        raise SystemExit(
            f"{command}: the hub's server is not installed (missing {', '.join(missing)}): {SERVER_INSTALL}"
        )


def server_command(argv: Sequence[str] | None = None) -> None:
    """`collab-server`: the gRPC server, once its dependencies are there."""
    require_server("collab-server")
    from collab_grpc.server import main

    main(argv)


def bridge_command(argv: Sequence[str] | None = None) -> None:
    """`collab-bridge`: the bridge, once its dependencies are there."""
    require_server("collab-bridge")
    from bridge.main import main

    main(argv)
