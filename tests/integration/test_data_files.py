"""The server's data is private (issue 17, item 11): in a data directory it creates,
`collab-server` with the SQLite store makes the directory 0700 and every file 0600 (the
database, its -wal and -shm, the generated key), whatever the umask lets through; a
database someone else made readable is reported, not changed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import ServerProcess
from tests.support.rpc import Client

pytestmark = pytest.mark.integration


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    """The umask the child process starts with (it inherits ours)."""
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


def start(data_dir: Path, *, capture_stderr: bool = False) -> ServerProcess:
    # No key configured: the server generates one into the data dir, as `collab up` does.
    env = {"COLLAB_API_KEYS": "", "COLLAB_READ_KEYS": "", "COLLAB_JWT_SECRET": "", "COLLAB_RATE_LIMIT": "0"}
    with umask(0o022):  # the common default, which leaves new files readable by all
        return ServerProcess(data_dir, env=env, capture_stderr=capture_stderr).start()


async def test_every_file_the_server_creates_is_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh" / "data"
    server = start(data_dir)
    try:
        key = (data_dir / "api_key").read_text().strip()
        client = Client.connect(server.target, token=key)
        try:
            for n in range(20):  # writes: the WAL and its index exist while the server runs
                await client.record(f"files_agent_{n % 3}")
        finally:
            await client.close()
        running_files = sorted(path.name for path in data_dir.iterdir())
        assert {"collab.db", "collab.db-wal", "collab.db-shm", "api_key"} <= set(running_files)
        modes = {name: f"{mode(data_dir / name):04o}" for name in running_files}
        assert modes == dict.fromkeys(running_files, "0600")
    finally:
        assert await asyncio.to_thread(server.stop) == 0
    assert f"{mode(data_dir):04o}" == "0700"
    for path in data_dir.iterdir():  # whatever is left after a clean stop
        assert f"{mode(path):04o}" == "0600", path.name


async def test_a_database_others_can_read_is_reported_not_changed(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    database = data_dir / "collab.db"
    database.touch()
    database.chmod(0o644)  # made by an older server, or by hand
    server = start(data_dir, capture_stderr=True)
    try:
        # Logged while the store opened, before the ready line start() waited for.
        lines = [line for line in server.banner if "other users can access the database file" in line]
        assert len(lines) == 1, server.banner
        record = json.loads(lines[0])
        assert (record["level"], record["path"], record["mode"]) == ("WARNING", str(database), "0644")
        # Served: one call, which also lets the server reach its signal handling before the stop.
        client = Client.connect(server.target, token=(data_dir / "api_key").read_text().strip())
        try:
            await client.record("files_agent")
        finally:
            await client.close()
    finally:
        assert await asyncio.to_thread(server.stop) == 0
    assert mode(database) == 0o644
