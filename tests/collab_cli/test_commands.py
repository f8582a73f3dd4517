"""`collab status`, `tail`, `record` and `complete` against a live hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import OutputLines, ServerProcess
from tests.support.rpc import WRITE_KEY

pytestmark = pytest.mark.integration

COLLAB = str(Path(sys.executable).parent / "collab")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A live server; the environment that points `collab` at it."""
    with ServerProcess(
        tmp_path_factory.mktemp("hub"), env={"COLLAB_API_KEYS": WRITE_KEY, "COLLAB_RATE_LIMIT": "0"}
    ) as server:
        yield {**os.environ, "COLLAB_GRPC_TARGET": server.target, "COLLAB_TOKEN": WRITE_KEY}
        server.stop()


def collab(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([COLLAB, *args], env=env, capture_output=True, text=True, timeout=30)


def test_record_complete_and_status(hub: dict[str, str]) -> None:
    recorded = collab(
        hub, "record", "cli_agent", "council_debate", "--department", "research", "--metadata", '{"round": 1}'
    )
    assert recorded.returncode == 0, recorded.stderr
    activity_id = recorded.stdout.strip()
    assert activity_id.startswith("act_") and "cli_agent" in activity_id

    table = collab(hub, "status")
    assert table.returncode == 0, table.stderr
    header, *rows, totals = table.stdout.splitlines()
    assert header.split()[:3] == ["AGENT", "DEPARTMENT", "STATUS"]
    (row,) = [r for r in rows if r.startswith("cli_agent")]
    assert row.split()[:4] == ["cli_agent", "research", "active", activity_id]
    assert "open activities" in totals

    done = collab(hub, "complete", activity_id, "--failed", "--reason", "timeout")
    assert done.returncode == 0 and done.stdout.split() == [activity_id, "failed"]
    raw = json.loads(collab(hub, "status", "--json").stdout)
    (agent,) = [a for a in raw["agents"] if a["agent_id"] == "cli_agent"]
    assert agent["status"] == "AGENT_STATE_IDLE"


def test_complete_merges_metadata_into_the_activity(hub: dict[str, str]) -> None:
    recorded = collab(hub, "record", "cli_llm", "message_sent", "--metadata", '{"gen_ai.request.model": "m-1"}')
    assert recorded.returncode == 0, recorded.stderr
    activity_id = recorded.stdout.strip()

    late = '{"gen_ai.usage.input_tokens": 1234, "gen_ai.request.model": "m-2"}'
    done = collab(hub, "complete", activity_id, "--metadata", late)
    assert done.returncode == 0 and done.stdout.split() == [activity_id, "completed"], done.stderr
    found = collab(hub, "history", "--agent", "cli_llm", "--json")
    assert found.returncode == 0, found.stderr
    (activity,) = [json.loads(line) for line in found.stdout.splitlines()]
    assert activity["activity_id"] == activity_id and activity["status"] == "ACTIVITY_STATUS_COMPLETED"
    # A key given replaces the recorded one; the others are kept.
    assert activity["metadata"] == {"gen_ai.request.model": "m-2", "gen_ai.usage.input_tokens": 1234}


@pytest.mark.parametrize(
    ("metadata", "message"),
    [("{nope", "--metadata is not valid JSON"), ("[1, 2]", "--metadata must be a JSON object")],
)
def test_complete_refuses_metadata_that_is_not_an_object_and_completes_nothing(
    hub: dict[str, str], metadata: str, message: str
) -> None:
    activity_id = collab(hub, "record", "cli_refused", "message_sent").stdout.strip()
    refused = collab(hub, "complete", activity_id, "--metadata", metadata)
    assert refused.returncode == 1 and message in refused.stderr, refused.stderr
    found = collab(hub, "history", "--agent", "cli_refused", "--json").stdout.splitlines()
    (activity,) = [row for row in map(json.loads, found) if row["activity_id"] == activity_id]
    assert activity["status"] == "ACTIVITY_STATUS_ACTIVE"


def test_tail_shows_live_events_with_filters(hub: dict[str, str]) -> None:
    tail = subprocess.Popen(
        [COLLAB, "tail", "--department", "ops", "--count", "2"], env=hub, stdout=subprocess.PIPE, text=True
    )
    assert tail.stdout is not None
    output = OutputLines(tail.stdout)
    try:
        shown = ""
        for _ in range(50):  # until the tail is subscribed, shown by its first line
            collab(hub, "record", "ops_agent", "task_assigned", "--department", "ops")
            collab(hub, "record", "other_agent", "task_assigned", "--department", "sales")
            try:
                shown = output.wait_for("ops_agent", 0.2)
                break
            except AssertionError:
                continue
        assert "activity_recorded" in shown and "task_assigned" in shown and "\033[" not in shown
        collab(hub, "record", "ops_agent", "message_sent", "--department", "ops")
        assert tail.wait(10) == 0, "stops after --count events"
        assert not any("other_agent" in line for line in output.lines)
    finally:
        if tail.poll() is None:
            tail.kill()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["record", "a", "dancing"], 2, "invalid choice: 'dancing'"),
        (["record", "a", "memory_write", "--metadata", "{nope"], 1, "--metadata is not valid JSON"),
        (["complete", "act_missing"], 1, "collab: not found: activity 'act_missing' not found"),
        (["record", "has space", "memory_write"], 1, "collab: invalid argument: agent_id must be printable"),
        (["status", "--token", "wrong"], 1, "collab: unauthenticated: invalid credential"),
    ],
)
def test_errors_are_one_clear_line_and_a_non_zero_exit(
    hub: dict[str, str], args: list[str], code: int, message: str
) -> None:
    result = collab(hub, *args)
    assert result.returncode == code
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_an_unreachable_hub_is_a_clear_error(hub: dict[str, str]) -> None:
    result = collab({**hub, "COLLAB_GRPC_TARGET": "127.0.0.1:1", "COLLAB_RETRIES": "0"}, "status")
    assert result.returncode == 1 and result.stderr.startswith("collab: unavailable:"), result.stderr
