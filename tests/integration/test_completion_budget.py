"""Metadata at completion against the database's byte budget, through real
`collab-server` (SQLite, a tiny COLLAB_MAX_DB_BYTES) and `collab-bridge` processes:
while the file is over its budget, a completion adding metadata is refused (507 /
RESOURCE_EXHAUSTED, saying a plain completion is still accepted) and changes nothing;
a completion without metadata is taken; the SDK's ``activity()`` block falls back to it."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest

from collab import Client
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.rpc import WRITE_KEY
from tests.support.stack import API, Stack, record, running_stack

pytestmark = pytest.mark.integration

BUDGET = 400_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("full"), server_env={"COLLAB_MAX_DB_BYTES": str(BUDGET)}) as running:
        yield running


async def fill(http: httpx.AsyncClient) -> None:
    """Open activities with big metadata until the file is over its budget (open ones
    are never pruned): a record is then refused with 507."""
    for _ in range(200):
        response = await http.post(
            f"{API}/record-activity",
            json={"agent_id": "filler", "activity_type": "memory_write", "metadata": {"blob": "x" * 50_000}},
        )
        if response.status_code == 507:
            assert "COLLAB_MAX_DB_BYTES" in response.json()["detail"]
            return
        assert response.status_code == 200, response.text
    raise AssertionError("the database never reached its budget")


async def test_a_full_database_refuses_metadata_at_completion_but_takes_the_completion(
    stack: Stack, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    kept = await record(http, "full_agent", "message_sent", metadata={"step": 1})
    with Client(stack.server.target, WRITE_KEY) as hub, caplog.at_level(logging.WARNING, logger="collab"):
        with hub.activity("full_sdk_agent", "message_sent") as handle:
            await fill(http)
            handle.metadata["gen_ai.usage.input_tokens"] = 1200

        refused = await http.post(
            f"{API}/complete-activity", json={"activity_id": kept, "metadata": {"gen_ai.usage.input_tokens": 5}}
        )
        assert refused.status_code == 507, refused.text
        detail = refused.json()["detail"]
        assert f"over its budget of {BUDGET} bytes" in detail
        assert "a completion without metadata is still accepted" in detail
        unchanged = (await http.get(f"{API}/activities/{kept}")).json()["activity"]
        assert unchanged["status"] == "active" and unchanged["metadata"] == {"step": 1}

        plain = await http.post(f"{API}/complete-activity", json={"activity_id": kept})
        assert plain.status_code == 200, plain.text
        done = (await http.get(f"{API}/activities/{kept}")).json()["activity"]
        assert done["status"] == "completed" and done["metadata"] == {"step": 1}

        block = hub.get_activity(handle.activity_id)
        assert block.status == pb.ACTIVITY_STATUS_COMPLETED and dict(block.metadata) == {}
    (warning,) = [entry.getMessage() for entry in caplog.records]
    assert handle.activity_id in warning and "(gen_ai.usage.input_tokens, not kept)" in warning
    assert "a completion without metadata is still accepted" in warning
