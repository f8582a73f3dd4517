"""Guessable credentials are refused at start (issue 17, item 11): API and read keys under
16 characters, a JWT secret under 32 bytes, or a well-known default such as `changeme`;
`--allow-weak-credentials` / COLLAB_ALLOW_WEAK_CREDENTIALS=on accepts them with a warning.
The message names the setting, never the value."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from collab_grpc.auth import weak_credentials
from collab_grpc.config import parse_server_config
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc
from tests.support.processes import ServerProcess
from tests.support.rpc import JWT_SECRET, READ_KEY, WRITE_KEY, bearer

STRONG_KEY = "a-long-enough-random-looking-key"


def test_strong_credentials_pass() -> None:
    assert weak_credentials([WRITE_KEY, STRONG_KEY], [READ_KEY], JWT_SECRET) == []
    assert weak_credentials([], [], "") == []


@pytest.mark.parametrize(
    ("api_keys", "read_keys", "jwt_secret", "problem"),
    [
        (["k"], [], "", "COLLAB_API_KEYS entry 1 is 1 characters; at least 16"),
        ([STRONG_KEY, "short-key"], [], "", "COLLAB_API_KEYS entry 2 is 9 characters; at least 16"),
        ([], ["r1"], "", "COLLAB_READ_KEYS entry 1 is 2 characters; at least 16"),
        (["changeme"], [], "", "COLLAB_API_KEYS entry 1 is a well-known default value"),
        (["1234567890123456"], [], "", "COLLAB_API_KEYS entry 1 is a well-known default value"),
        ([], [], "changeme", "COLLAB_JWT_SECRET is a well-known default value"),
        ([], [], "Secret", "COLLAB_JWT_SECRET is a well-known default value"),
        ([], [], "x" * 31, "COLLAB_JWT_SECRET is 31 bytes; HS256 needs at least 32"),
    ],
)
def test_weak_credentials_are_named(api_keys: list[str], read_keys: list[str], jwt_secret: str, problem: str) -> None:
    assert weak_credentials(api_keys, read_keys, jwt_secret) == [problem]


def test_the_flag_and_its_variable() -> None:
    assert parse_server_config([], {}).allow_weak_credentials is False
    assert parse_server_config(["--allow-weak-credentials", "on"], {}).allow_weak_credentials is True
    assert parse_server_config([], {"COLLAB_ALLOW_WEAK_CREDENTIALS": "on"}).allow_weak_credentials is True


def run_server(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`collab-server` expected to refuse to start (so it exits by itself)."""
    return subprocess.run(
        [sys.executable, "-m", "collab_grpc.server", "--grpc-addr", "127.0.0.1:0", "--metrics-addr", "off"],
        env={**os.environ, "COLLAB_DATA_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_server_refuses_to_start_with_a_weak_secret(tmp_path: Path) -> None:
    finished = run_server(tmp_path, {"COLLAB_API_KEYS": "changeme", "COLLAB_JWT_SECRET": "not-long-enough"})
    assert finished.returncode == 1
    assert (
        finished.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "collab-server: weak credentials refused: COLLAB_API_KEYS entry 1 is a well-known default value; "
            "COLLAB_JWT_SECRET is 15 bytes; HS256 needs at least 32."
        )
    )
    assert "--allow-weak-credentials / COLLAB_ALLOW_WEAK_CREDENTIALS=on" in finished.stderr
    assert "not-long-enough" not in finished.stderr + finished.stdout
    assert not (tmp_path / "collab.db").exists()  # refused before the store was opened


async def test_allowed_weak_credentials_start_with_a_warning(tmp_path: Path) -> None:
    env = {"COLLAB_API_KEYS": "k1", "COLLAB_ALLOW_WEAK_CREDENTIALS": "on"}
    with ServerProcess(tmp_path, env=env, capture_stderr=True) as server:
        warnings = [line for line in server.banner if "weak credentials accepted" in line]
        assert len(warnings) == 1 and "COLLAB_API_KEYS entry 1 is 2 characters" in warnings[0]
        assert "k1" not in warnings[0].replace("entry 1", "")
        async with grpc.aio.insecure_channel(server.target) as channel:
            reply = await pb_grpc.CollaborationServiceStub(channel).CheckCredential(
                pb.CheckCredentialRequest(), metadata=bearer("k1"), timeout=10
            )
        assert reply.write
        assert await asyncio.to_thread(server.stop) == 0
