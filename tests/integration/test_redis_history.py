"""The history search on the Redis store, with real processes: a replica answers from the
activities it holds in memory (the newest `--history-limit` and every open one), kept
current with what other replicas wrote, with every filter and the cursor; older
activities, which Redis keeps only as bodies in a hash without the indexes a search
needs, are not searched (the SQLite store searches its whole retention).

Redis at 127.0.0.1:6379 is the machine's; without it these tests skip, unless
COLLAB_REQUIRE_REDIS=1 (as in CI), where they fail."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.processes import ServerProcess
from tests.support.rpc import Client
from tests.support.services import redis_store_url
from tests.support.stack import SERVER_ENV

pytestmark = pytest.mark.integration

HISTORY_LIMIT = 10


@pytest.fixture
def redis_store() -> Iterator[str]:
    with redis_store_url() as url:
        yield url


async def search(client: Client, **fields: object) -> list[str]:
    ids: list[str] = []
    cursor = ""
    while True:
        reply = await client.stub.QueryActivities(
            pb.QueryActivitiesRequest(cursor=cursor, **fields),  # type: ignore[arg-type]
            metadata=client.metadata,
        )
        ids.extend(a.activity_id for a in reply.activities)
        if not reply.next_cursor:
            return ids
        cursor = reply.next_cursor


async def test_a_replica_searches_what_it_holds_including_other_replicas_writes(
    tmp_path: Path, redis_store: str
) -> None:
    env = {**SERVER_ENV, "COLLAB_STORE": redis_store, "COLLAB_HISTORY_LIMIT": str(HISTORY_LIMIT)}
    servers = [ServerProcess(tmp_path / f"server{n}", env=env).start() for n in range(2)]
    writer, reader = (Client.connect(s.target) for s in servers)
    try:
        kept_open = await writer.record("ada", pb.ACTIVITY_TYPE_COUNCIL_DEBATE)
        completed = []
        for n in range(25):
            activity_id = await writer.record("ada" if n % 2 else "bob")
            await writer.stub.CompleteActivity(
                pb.CompleteActivityRequest(activity_id=activity_id, success=n % 3 != 0), metadata=writer.metadata
            )
            completed.append(activity_id)
        # The other replica holds the newest ten and the open one, older than all of them.
        held = [*completed[-HISTORY_LIMIT:][::-1], kept_open]
        assert await search(reader, limit=3) == held
        assert await search(reader, oldest_first=True) == held[::-1]
        assert await search(reader, agent_ids=["ada"]) == [a for a in held if "_ada_" in a]
        assert await search(reader, statuses=[pb.ACTIVITY_STATUS_ACTIVE]) == [kept_open]
        failed = await search(reader, statuses=[pb.ACTIVITY_STATUS_FAILED])
        assert failed == [completed[n] for n in range(24, 14, -1) if n % 3 == 0]
        # What it does not hold is not found, on either replica.
        assert await search(reader, agent_ids=["bob"], limit=500) == [a for a in held if "_bob_" in a]
        assert len(await search(writer, limit=500)) == HISTORY_LIMIT + 1
    finally:
        for client in (writer, reader):
            await client.close()
        for server in servers:
            assert server.stop() == 0
