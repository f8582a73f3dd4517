"""RedisStore's recovery paths against the machine's Redis (keys of the test's own)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from collab_grpc.model import ActivityType
from collab_grpc.state import CollaborationState
from collab_grpc.store import RedisStore, StoreUnavailable
from collab_grpc.store.redis_store import APPEND
from tests.support.services import SHARED_REDIS, redis_store_url


@pytest.fixture
def url() -> Iterator[str]:
    with redis_store_url() as store_url:
        yield store_url


async def replica(url: str) -> tuple[CollaborationState, RedisStore]:
    state = CollaborationState()
    store = RedisStore(url)
    await store.attach(state)
    store.start()
    return state, store


async def record(state: CollaborationState, store: RedisStore, agent_id: str) -> str:
    async with store.writing():
        activity = state.record_activity(agent_id=agent_id, activity_type=ActivityType.TASK_ASSIGNED)
        seq = state.log.last_seq
    await store.durable(seq)
    return activity.activity_id


async def test_a_write_whose_append_fails_is_not_kept(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a_state, a = await replica(url)
    b_state, b = await replica(url)
    try:
        await record(a_state, a, "first")
        client: Any = a._redis()
        real_eval = client.eval

        async def cancelled(*args: Any) -> Any:
            if args[0] == APPEND:
                raise asyncio.CancelledError  # the append was cut off (its outcome unknown to A)
            return await real_eval(*args)

        monkeypatch.setattr(client, "eval", cancelled)
        with pytest.raises(StoreUnavailable):
            await record(a_state, a, "phantom")
        monkeypatch.setattr(client, "eval", real_eval)
        other = await record(b_state, b, "other")  # takes seq 2 in Redis
        await a.fresh()  # A notices its state may hold the refused write, and reloads
        agents = {view.agent_id for view in a_state.agent_status().agents}
        assert agents == {"first", "other"}
        assert a_state.get_activity(other) is not None and a_state.log.last_seq == 2
    finally:
        await a.close()
        await b.close()


async def test_a_replica_notices_redis_lost_its_history(url: str) -> None:
    state, store = await replica(url)
    try:
        await record(state, store, "before")
        old_epoch = state.epoch
        client = redis.Redis.from_url(SHARED_REDIS)
        client.delete(*client.scan_iter(f"{store.prefix}:*"))  # Redis restarted without its data
        await store.fresh()
        assert state.epoch != old_epoch and state.agent_status().total_agents == 0
        await record(state, store, "after")
        assert state.log.last_seq == 1
    finally:
        await store.close()
