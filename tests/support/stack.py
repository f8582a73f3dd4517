"""Server + bridge as real processes, and the WebSocket/REST helpers tests drive them with."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection

from tests.support.contract import validate_rest, validate_ws
from tests.support.processes import BridgeProcess, ServerProcess
from tests.support.rpc import READ_KEY, WRITE_KEY

__all__ = [
    "API",
    "AUTH",
    "BRIDGE_ENV",
    "SERVER_ENV",
    "Stack",
    "is_event",
    "opened",
    "record",
    "recv",
    "recv_until",
    "running_stack",
    "start_stack",
    "stop_stack",
    "wait_ready",
]

API = "/api/v1/collaboration"
AUTH = {"Authorization": f"Bearer {WRITE_KEY}"}
SERVER_ENV = {"COLLAB_API_KEYS": WRITE_KEY, "COLLAB_READ_KEYS": READ_KEY, "COLLAB_RATE_LIMIT": "0"}
BRIDGE_ENV = {"COLLAB_UPSTREAM_TOKEN": WRITE_KEY, "COLLAB_CLIENT_BACKLOG": "64"}


@dataclass
class Stack:
    server: ServerProcess
    bridge: BridgeProcess

    def ws_url(self, token: str | None = WRITE_KEY, **params: object) -> str:
        query = {"client_id": "test", **params}
        if token:
            query["token"] = token
        return self.bridge.ws + "?" + "&".join(f"{key}={value}" for key, value in query.items())


def start_stack(
    tmp: Path,
    server_env: dict[str, str] | None = None,
    port: int = 0,
    *,
    bridge_env: dict[str, str] | None = None,
    capture_stderr: bool = False,
) -> Stack:
    """``capture_stderr``: the processes' logs are read with their output (``output.lines``)."""
    server_env = {**SERVER_ENV, **(server_env or {})}
    server = ServerProcess(tmp / "server", env=server_env, capture_stderr=capture_stderr).start(port)
    bridge_env = {**BRIDGE_ENV, **(bridge_env or {})}
    bridge = BridgeProcess(server.target, data_dir=tmp / "bridge", env=bridge_env, capture_stderr=capture_stderr)
    return Stack(server, bridge.start())


@contextmanager
def running_stack(
    tmp: Path,
    server_env: dict[str, str] | None = None,
    port: int = 0,
    *,
    bridge_env: dict[str, str] | None = None,
    capture_stderr: bool = False,
) -> Iterator[Stack]:
    """``start_stack``, ready to serve; stopped (cleanly) on exit."""
    stack = start_stack(tmp, server_env, port, bridge_env=bridge_env, capture_stderr=capture_stderr)
    try:
        wait_ready(stack)
        yield stack
    finally:
        stop_stack(stack)


def stop_stack(stack: Stack) -> None:
    for process in (stack.bridge, stack.server):
        if process.process is not None and process.process.poll() is None:
            assert process.stop() == 0


def wait_ready(stack: Stack, timeout: float = 15.0, verify: ssl.SSLContext | bool = True) -> None:
    """Until the bridge's upstream streams are up; ``verify``: the TLS context of an HTTPS bridge."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(stack.bridge.http + "/readyz", verify=verify).status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("the bridge never became ready")


async def recv(ws: ClientConnection, within: float = 10.0) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), within))
    return message


async def recv_until(
    ws: ClientConnection, wanted: Callable[[dict[str, Any]], bool], within: float = 10.0
) -> dict[str, Any]:
    """The next message ``wanted`` accepts, skipping status ticks and the like."""
    deadline = time.monotonic() + within
    while True:
        message = await recv(ws, max(0.01, deadline - time.monotonic()))
        if wanted(message):
            return message


async def opened(ws: ClientConnection) -> tuple[dict[str, Any], dict[str, Any]]:
    established = validate_ws(await recv(ws))
    state = validate_ws(await recv(ws))
    assert (established["type"], state["type"]) == ("connection_established", "collaboration_state")
    return established, state


async def record(http: httpx.AsyncClient, agent_id: str, activity_type: str = "memory_write", **body: Any) -> str:
    response = await http.post(
        f"{API}/record-activity", json={"agent_id": agent_id, "activity_type": activity_type, **body}
    )
    assert response.status_code == 200, response.text
    activity_id: str = validate_rest("record-activity", response.json())["activity_id"]
    return activity_id


def is_event(kind: str) -> Callable[[dict[str, Any]], bool]:
    return lambda message: message["type"] == kind
