"""`import collab` (the SDK) loads none of the server: only the generated messages, the
table of the guide's names beside them (collab_grpc.names) and grpc, checked in a fresh
interpreter (issue 18). The same for the table alone and for the `collab` command line."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import collab_grpc

GENERATED = {"collab_grpc", "collab_grpc.v1", "collab_grpc.v1.collaboration_pb2"}
GENERATED_GRPC = {"collab_grpc.v1.collaboration_pb2_grpc"}
# The distributions of the [server] and [redis] extras, by the names they are imported as;
# not grpc_health and grpc_reflection: `import grpc` imports them itself where installed.
SERVER_PACKAGES = {
    "bridge",
    "fastapi",
    "starlette",
    "uvicorn",
    "websockets",
    "redis",
    "jwt",
    "prometheus_client",
    "pythonjsonlogger",
    "orjson",
    "uvloop",
    "opentelemetry",
}


def loaded_by(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded once it ran ``statement``."""
    probe = f"{statement}; import sys, json; print(json.dumps(sorted(sys.modules)))"
    return set(
        json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    )


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("import collab", GENERATED | GENERATED_GRPC | {"collab_grpc.names"}),
        ("import collab_grpc.names", GENERATED | {"collab_grpc.names"}),
        ("import collab_grpc.v1.collaboration_pb2_grpc", GENERATED | GENERATED_GRPC),
        # The command line: its client commands run with the SDK's dependencies only.
        ("import collab_cli.main", GENERATED | GENERATED_GRPC | {"collab_grpc.names", "collab_grpc.extras"}),
    ],
)
def test_importing_the_sdk_loads_no_server_module(statement: str, expected: set[str]) -> None:
    loaded = loaded_by(statement)
    assert {name for name in loaded if name == "collab_grpc" or name.startswith("collab_grpc.")} == expected
    assert not sorted(name for name in loaded if name.split(".")[0] in SERVER_PACKAGES)


def test_the_generated_package_imports_nothing() -> None:
    """As Temporal's temporalio/api: importing a generated module loads only what it needs."""
    init = Path(collab_grpc.__file__).parent / "v1" / "__init__.py"
    assert not [node for node in ast.walk(ast.parse(init.read_text())) if isinstance(node, ast.Import | ast.ImportFrom)]


def test_the_embedding_names_are_still_there_when_asked_for() -> None:
    assert collab_grpc.CollaborationState.__module__ == "collab_grpc.state"
    assert set(collab_grpc.__all__) == set(collab_grpc._EXPORTS)
    try:
        collab_grpc.NoSuchName  # noqa: B018
    except AttributeError as error:
        assert "NoSuchName" in str(error)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
