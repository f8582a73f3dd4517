"""The Node.js client (clients/node) against a real `collab-server`: its own `node --test`
suite and its example, both using only the .proto file, through @grpc/proto-loader."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.locks import checkout_lock
from tests.support.processes import ServerProcess
from tests.support.rpc import WRITE_KEY

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NODE_CLIENT = ROOT / "clients" / "node"
NPM_CI_TIMEOUT = 240.0
NODE_TIMEOUT = 120.0


def run(
    argv: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end (stdout and stderr together); fail if it outlives ``timeout``."""
    try:
        return subprocess.run(
            argv,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as expired:
        output = expired.output if isinstance(expired.output, str) else (expired.output or b"").decode()
        pytest.fail(f"{' '.join(argv)} did not finish within {timeout:.0f} s; output so far:\n{output}")


@pytest.fixture(scope="module")
def node() -> str:
    """The `node` executable, with the client's dependencies installed from its lock file."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("`node` is not on PATH: the Node client's tests need Node.js 18+ and npm")
    # npm ci empties node_modules first: one worker at a time, and only where it is missing.
    with checkout_lock("node-client-npm-ci"):
        if not (NODE_CLIENT / "node_modules" / "@grpc" / "proto-loader").is_dir():
            npm = shutil.which("npm")
            if npm is None:
                pytest.fail(f"`npm` is not on PATH: it is needed to install {NODE_CLIENT / 'node_modules'} (npm ci)")
            installed = run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_CLIENT, timeout=NPM_CI_TIMEOUT)
            assert installed.returncode == 0, f"npm ci failed in {NODE_CLIENT}:\n{installed.stdout}"
    return node


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"COLLAB_API_KEYS": WRITE_KEY, "COLLAB_RATE_LIMIT": "0"}
    with ServerProcess(tmp_path_factory.mktemp("node-client-server"), env=env) as process:
        yield process
        assert process.stop() == 0, "collab-server did not exit cleanly on SIGTERM"


def client_env(server: ServerProcess) -> dict[str, str]:
    return {"COLLAB_GRPC_TARGET": server.target, "COLLAB_TOKEN": WRITE_KEY}


@pytest.mark.timeout(NPM_CI_TIMEOUT + NODE_TIMEOUT + 60)
def test_node_client_suite_passes_against_a_real_server(node: str, server: ServerProcess) -> None:
    # The test files are named, not their directory: `node --test DIR` searches DIR only
    # on Node 20 (from 21 on, arguments are glob patterns and a directory is not one).
    test_files = sorted(str(path) for path in (NODE_CLIENT / "test").glob("*.test.js"))
    assert test_files, f"no *.test.js files in {NODE_CLIENT / 'test'}"
    argv = [node, "--test", "--test-reporter=tap", *test_files]
    result = run(argv, cwd=ROOT, env=client_env(server), timeout=NODE_TIMEOUT)
    assert result.returncode == 0, f"node --test failed ({result.returncode}):\n{result.stdout}"
    passed = re.search(r"^# pass (\d+)$", result.stdout, re.MULTILINE)
    assert passed and int(passed.group(1)) > 0, f"no test passed:\n{result.stdout}"
    assert re.search(r"^# fail 0$", result.stdout, re.MULTILINE), result.stdout


@pytest.mark.timeout(NPM_CI_TIMEOUT + NODE_TIMEOUT + 60)
def test_node_example_prints_both_events(node: str, server: ServerProcess) -> None:
    example = NODE_CLIENT / "example.js"
    result = run([node, str(example)], cwd=ROOT, env=client_env(server), timeout=NODE_TIMEOUT)
    assert result.returncode == 0, f"node {example} failed ({result.returncode}):\n{result.stdout}"
    for kind in ("activity_recorded", "activity_completed"):
        assert kind in result.stdout, f"no {kind} event printed:\n{result.stdout}"
