"""`collab history` against a live hub (a `collab-server` process, SQLite): the table,
JSON lines, every filter, times as epoch, ISO 8601 and spans ago, and refused input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from collab import Client
from collab_cli.commands import parse_time
from tests.support.processes import ServerProcess
from tests.support.rpc import WRITE_KEY

pytestmark = pytest.mark.integration

COLLAB = str(Path(sys.executable).parent / "collab")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], list[str]]]:
    """A live server with a few recorded activities (newest last); the environment for `collab`."""
    with ServerProcess(
        tmp_path_factory.mktemp("hub"), env={"COLLAB_API_KEYS": WRITE_KEY, "COLLAB_RATE_LIMIT": "0"}
    ) as server:
        with Client(server.target, WRITE_KEY) as client:
            session_id = client.start_collaboration(["ada", "bob"])
            root = client.record_activity("ada", "agent_started", department="eng")
            ids = [root]
            for n in range(12):
                activity_id = client.record_activity(
                    "ada" if n % 2 else "bob",
                    "council_debate" if n % 3 else "message_sent",
                    department="eng" if n % 2 else "ops",
                    metadata={"topic": "budget" if n % 4 == 0 else "hiring"},
                    session_id=session_id if n < 6 else None,
                    parent_activity_id=root if n % 5 == 0 else None,
                )
                ids.append(activity_id)
                if n % 3 == 1:
                    client.complete_activity(activity_id, success=False, failure_reason="timeout")
        yield {**os.environ, "COLLAB_GRPC_TARGET": server.target, "COLLAB_TOKEN": WRITE_KEY, "SESSION": session_id}, ids
        server.stop()


def collab(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([COLLAB, *args], env=env, capture_output=True, text=True, timeout=30)


def json_lines(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    done = collab(env, "history", "--json", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_the_table_lists_the_newest_first(hub: tuple[dict[str, str], list[str]]) -> None:
    env, ids = hub
    done = collab(env, "history")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["TIME", "(UTC)", "AGENT"]
    assert lines[-1] == f"{len(ids)} activities"
    listed = [next(word for word in line.split() if word.startswith("act_")) for line in lines[1:-1]]
    assert listed == ids[::-1]
    assert any("failed (timeout)" in line for line in lines)


def test_filters_and_order(hub: tuple[dict[str, str], list[str]]) -> None:
    env, ids = hub
    every = json_lines(env, "--order", "asc", "--limit", "1000")
    assert [a["activity_id"] for a in every] == ids
    failed = json_lines(
        env, "--status", "failed", "--agent", "ada", "--agent", "bob", "--activity-type", "council_debate"
    )
    assert [a["activity_id"] for a in failed] == [
        a["activity_id"]
        for a in reversed(every)
        if a["status"] == "ACTIVITY_STATUS_FAILED" and a["activity_type"] == "ACTIVITY_TYPE_COUNCIL_DEBATE"
    ]
    assert failed
    ops = json_lines(env, "--department", "ops", "--meta", "topic=budget")
    assert ops and all(a["department"] == "ops" and a["metadata"]["topic"] == "budget" for a in ops)
    in_session = json_lines(env, "--session", env["SESSION"])
    assert len(in_session) == 6
    children = json_lines(env, "--parent", ids[0])
    assert {a["parent_activity_id"] for a in children} == {ids[0]} and len(children) == 3
    assert len(json_lines(env, "--limit", "3")) == 3


def test_time_bounds(hub: tuple[dict[str, str], list[str]]) -> None:
    env, ids = hub
    assert len(json_lines(env, "--since", "1h")) == len(ids)
    assert json_lines(env, "--until", "1h") == []
    future = (datetime.now(UTC) + timedelta(days=365)).isoformat()
    assert json_lines(env, "--since", future) == []
    assert len(json_lines(env, "--since", "0", "--until", future)) == len(ids)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "--since/--until"),
        (["--meta", "novalue"], "--meta must be key=value"),
        (["--limit", "0"], "--limit must be between"),
        (["--status", "running"], "invalid choice"),
        (["--agent", "has space"], "agent_ids"),
    ],
)
def test_bad_input_is_refused(hub: tuple[dict[str, str], list[str]], args: list[str], message: str) -> None:
    env, _ = hub
    done = collab(env, "history", *args)
    assert done.returncode != 0
    assert message in done.stderr


def test_parse_time() -> None:
    assert parse_time("1700000000.5") == 1700000000.5
    assert parse_time("2024-01-02T03:04:05") == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()
    assert parse_time("2024-01-02T03:04:05+01:00") == datetime(2024, 1, 2, 2, 4, 5, tzinfo=UTC).timestamp()
    assert parse_time("15m", now=1000.0) == 100.0
    assert parse_time("2d", now=200_000.0) == 200_000.0 - 172_800
    with pytest.raises(ValueError, match="span ago"):
        parse_time("m")
