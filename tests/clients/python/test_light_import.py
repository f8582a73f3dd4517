"""`import collab` (the SDK) loads none of the server: only the generated messages and
grpc, checked in a fresh interpreter (issue 18)."""

from __future__ import annotations

import json
import subprocess
import sys

import collab_grpc

GENERATED = ("collab_grpc.v1.collaboration_pb2", "collab_grpc.v1.collaboration_pb2_grpc")
SERVER_PACKAGES = ("bridge", "fastapi", "starlette", "uvicorn", "redis", "jwt", "prometheus_client")


def test_importing_the_sdk_loads_no_server_module() -> None:
    probe = "import sys, json, collab; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    )
    ours = {name for name in loaded if name == "collab_grpc" or name.startswith("collab_grpc.")}
    assert ours == {
        "collab_grpc",
        "collab_grpc.v1",
        "collab_grpc.v1.collaboration_pb2",
        "collab_grpc.v1.collaboration_pb2_grpc",
    }
    assert not [name for name in loaded if name.split(".")[0] in SERVER_PACKAGES]


def test_the_embedding_names_are_still_there_when_asked_for() -> None:
    assert collab_grpc.CollaborationState.__module__ == "collab_grpc.state"
    assert set(collab_grpc.__all__) == set(collab_grpc._EXPORTS)
    try:
        collab_grpc.NoSuchName  # noqa: B018
    except AttributeError as error:
        assert "NoSuchName" in str(error)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
