"""The sync Client against `collab-server` as a real process (SQLite store)."""

from __future__ import annotations

from pathlib import Path

import pytest

from collab import Client, InvalidArgument, NotFound
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.processes import ServerProcess
from tests.support.rpc import WRITE_KEY

pytestmark = pytest.mark.integration
ENV = {"COLLAB_API_KEYS": WRITE_KEY, "COLLAB_RATE_LIMIT": "0"}


def test_every_method_and_the_activity_context_manager(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, env=ENV) as server, Client(server.target, WRITE_KEY) as hub:
        with hub.activity("agent_1", "council_debate", department="engineering", metadata={"round": 1}) as act:
            assert hub.get_activity(act.activity_id).status == pb.ACTIVITY_STATUS_ACTIVE
            session_id = hub.start_collaboration(["agent_1", "agent_2"])
            hub.record_decision(session_id, "agent_1", "go")
            hub.record_memory_update("write", "item_1", "agent_1", metadata={"size_bytes": 1024})
        assert hub.get_activity(act.activity_id).status == pb.ACTIVITY_STATUS_COMPLETED
        with pytest.raises(ZeroDivisionError), hub.activity("agent_1", "task_assigned") as failing:
            1 / 0  # noqa: B018
        assert hub.get_activity(failing.activity_id).failure_reason == "ZeroDivisionError"
        assert hub.get_collaboration(session_id).session.decision_count == 1
        assert [s.session_id for s in hub.active_collaborations()] == [session_id]
        hub.end_collaboration(session_id)
        assert [s.session_id for s in hub.ended_collaborations()] == [session_id]
        [recorded] = hub.memory_updates(agent_id="agent_1")
        assert (recorded.update.item_id, recorded.update.operation) == ("item_1", pb.MEMORY_OPERATION_WRITE)
        assert recorded.seq > 0 and hub.memory_updates(agent_id="agent_2") == []
        assert len(hub.activity_feed(limit=10)) == 2
        assert hub.agent_status().total_agents == 2
        with pytest.raises(NotFound):
            hub.get_activity("act_missing")
        with pytest.raises(InvalidArgument, match="limit"):
            hub.activity_feed(limit=501)
