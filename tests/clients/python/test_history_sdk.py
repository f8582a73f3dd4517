"""The SDK's history search (`query_activities`): an iterator over every page, following
the cursor, on the sync Client (a `collab-server` process, SQLite) and the AsyncClient
(an in-process server), with the same arguments and answers."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from collab import AsyncClient, Client, InvalidArgument
from collab_grpc.convert import seconds_from_timestamp
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.conftest import HubFactory
from tests.support.processes import ServerProcess
from tests.support.rpc import WRITE_KEY

ENV = {"COLLAB_API_KEYS": WRITE_KEY, "COLLAB_RATE_LIMIT": "0"}


@pytest.mark.integration
def test_sync_iterator_follows_the_cursor_through_every_filter(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, env=ENV) as server, Client(server.target, WRITE_KEY) as hub:
        recorded = []
        for n in range(23):
            agent = "ada" if n % 2 else "bob"
            activity_id = hub.record_activity(
                agent, "council_debate" if n % 3 else "message_sent", department="eng", metadata={"round": n % 4}
            )
            recorded.append(activity_id)
            if n % 5 == 0:
                hub.complete_activity(activity_id, success=False, failure_reason="timeout")
        everything = list(hub.query_activities(page_size=5))
        assert [a.activity_id for a in everything] == recorded[::-1]
        assert [a.activity_id for a in hub.query_activities(order="asc", page_size=4)] == recorded
        failed_debates = [
            a.activity_id
            for a in hub.query_activities(
                agent_ids=["ada", "bob"], activity_types=["council_debate"], statuses=["failed"], page_size=1
            )
        ]
        assert failed_debates == [
            a.activity_id
            for a in everything
            if a.status == pb.ACTIVITY_STATUS_FAILED and a.activity_type == pb.ACTIVITY_TYPE_COUNCIL_DEBATE
        ]
        assert failed_debates
        round_two = [a.activity_id for a in hub.query_activities(metadata={"round": 2}, page_size=2)]
        assert round_two == [a.activity_id for a in everything if a.metadata["round"] == 2]
        middle = seconds_from_timestamp(everything[10].timestamp)
        since = [a.activity_id for a in hub.query_activities(since=middle)]
        assert since == [a.activity_id for a in everything[:11]]
        # A datetime holds microseconds: a bound a microsecond or two before the activity.
        as_datetime = datetime.fromtimestamp(middle, UTC) - timedelta(microseconds=2)
        assert [a.activity_id for a in hub.query_activities(since=as_datetime)] == since
        naive = as_datetime.replace(tzinfo=None)
        assert [a.activity_id for a in hub.query_activities(since=naive)] == since
        until = [a.activity_id for a in hub.query_activities(until=middle)]
        assert until == [a.activity_id for a in everything[11:]]
        # Lazy: taking three reads one page.
        assert len(list(itertools.islice(hub.query_activities(page_size=3), 3))) == 3
        with pytest.raises(InvalidArgument, match="limit"):
            list(hub.query_activities(page_size=501))
        with pytest.raises(ValueError, match="status must be one of"):
            list(hub.query_activities(statuses=["running"]))
        with pytest.raises(ValueError, match="order"):
            list(hub.query_activities(order="up"))


async def test_async_iterator_matches_the_sync_shape(make_hub: HubFactory) -> None:
    running, _ = await make_hub(store="memory")
    async with AsyncClient(f"127.0.0.1:{running.port}", WRITE_KEY, timeout=5) as hub:
        root = await hub.record_activity("ada", "agent_started")
        children = [
            await hub.record_activity("ada", "task_assigned", parent_activity_id=root, metadata={"ok": n % 2 == 0})
            for n in range(7)
        ]
        found = [a.activity_id async for a in hub.query_activities(parent_activity_ids=[root], page_size=2)]
        assert found == children[::-1]
        ok = [a.activity_id async for a in hub.query_activities(metadata={"ok": True}, order="asc")]
        assert ok == children[::2]
        with pytest.raises(InvalidArgument, match="agent_ids"):
            [a async for a in hub.query_activities(agent_ids=["has space"])]
