"""Fixtures shared across the suite."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from collab_grpc.config import ServerConfig
from collab_grpc.server import RunningServer, start_server
from tests.support.processes import ServerProcess
from tests.support.rpc import JWT_SECRET, READ_KEY, WRITE_KEY, Client

# Small, so that tests can overflow a subscriber's queue with little traffic.
SUBSCRIBER_QUEUE = 64

HubFactory = Callable[..., Awaitable[tuple[RunningServer, Client]]]


@pytest.fixture
def server_config(tmp_path: Path) -> ServerConfig:
    """An in-process server's config: free port, test keys, the rate limit off."""
    return ServerConfig(
        grpc_addr="127.0.0.1:0",
        data_dir=tmp_path / "data",
        api_keys=(WRITE_KEY,),
        read_keys=(READ_KEY,),
        jwt_secret=JWT_SECRET,
        rate_limit=0,
        subscriber_queue=SUBSCRIBER_QUEUE,
        log_format="text",
    )


@pytest_asyncio.fixture
async def make_hub(server_config: ServerConfig) -> AsyncIterator[HubFactory]:
    """Start a real grpc.aio server in this event loop; config fields can be overridden."""
    started: list[tuple[RunningServer, Client]] = []

    async def make(**overrides: Any) -> tuple[RunningServer, Client]:
        running = await start_server(dataclasses.replace(server_config, **overrides))
        client = Client.connect(f"127.0.0.1:{running.port}")
        started.append((running, client))
        return running, client

    yield make
    for running, client in started:
        await client.close()
        await running.stop(0)


@pytest_asyncio.fixture
async def hub(make_hub: HubFactory) -> tuple[RunningServer, Client]:
    return await make_hub()


@pytest.fixture(scope="module")
def server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One `collab-server` process per test module, configured like ``server_config``."""
    env = {
        "COLLAB_API_KEYS": WRITE_KEY,
        "COLLAB_READ_KEYS": READ_KEY,
        "COLLAB_JWT_SECRET": JWT_SECRET,
        "COLLAB_RATE_LIMIT": "0",
        "COLLAB_SUBSCRIBER_QUEUE": str(SUBSCRIBER_QUEUE),
    }
    with ServerProcess(tmp_path_factory.mktemp("server"), env=env) as process:
        yield process
        assert process.stop() == 0, "collab-server did not exit cleanly on SIGTERM"


@pytest_asyncio.fixture(params=["in_process", "process"])
async def client(request: pytest.FixtureRequest, make_hub: HubFactory) -> AsyncIterator[Client]:
    """A client of a real server: a grpc.aio server in this process, or `collab-server`
    as a child process. Tests that take it run against both."""
    if request.param == "in_process":
        _, in_process = await make_hub()
        yield in_process
        return
    process: ServerProcess = request.getfixturevalue("server_process")
    remote = Client.connect(process.target)
    yield remote
    await remote.close()
