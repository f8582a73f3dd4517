"""`collab up`: server and bridge on one machine, one command, one Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from tests.support.processes import OutputLines
from tests.support.rpc import Client

pytestmark = pytest.mark.integration

COLLAB = str(Path(sys.executable).parent / "collab")


def start_up(env: dict[str, str]) -> subprocess.Popen[str]:
    """`collab up` in a session of its own, so a signal can reach it as a terminal's would."""
    return subprocess.Popen([COLLAB, "up"], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)


async def test_up_prints_where_to_connect_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "COLLAB_GRPC_ADDR": "127.0.0.1:0",
        "COLLAB_BRIDGE_ADDR": "127.0.0.1:0",
        "COLLAB_DATA_DIR": str(tmp_path / "data"),
    }
    for name in ("COLLAB_API_KEYS", "COLLAB_READ_KEYS", "COLLAB_JWT_SECRET", "COLLAB_AUTH"):
        env.pop(name, None)
    up = start_up(env)
    assert up.stdout is not None
    output = OutputLines(up.stdout)
    try:
        target = output.wait_for("gRPC:").split()[1]
        websocket_url = output.wait_for("WebSocket:").split()[1]
        token = output.wait_for("token:").split()[1]
        assert token == (tmp_path / "data" / "api_key").read_text().strip()
        assert websocket_url.endswith(f"&token={token}")
        async with connect(websocket_url) as ws:
            assert json.loads(await ws.recv())["type"] == "connection_established"
            assert json.loads(await ws.recv())["type"] == "collaboration_state"
            client = Client.connect(target, token)
            try:
                activity_id = await client.record("agent_1")
            finally:
                await client.close()
            while (message := json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] != "agent_activity":
                pass
            assert message["activity"]["activity_id"] == activity_id
        os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert up.wait(20) == 0
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


def test_unknown_command_is_one_clear_error() -> None:
    result = subprocess.run([COLLAB, "upp"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "invalid choice: 'upp'" in result.stderr
