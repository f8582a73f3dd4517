"""Replicas on a Redis of the test's own meeting its faults, as a client meets them:
idempotency answers across a replica's restart and their pruning by age; a Redis that
comes back older than what the replicas served; a Redis that hangs (SIGSTOP)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.processes import ServerProcess
from tests.support.rpc import EOF, Client, activity
from tests.support.services import OwnRedis, require_redis
from tests.support.stack import SERVER_ENV

pytestmark = pytest.mark.integration


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    require_redis()  # the machine has Redis, so redis-server is installed
    own = OwnRedis(tmp_path / "redis").start()
    try:
        yield own
    finally:
        own.stop()


def replica(tmp_path: Path, name: str, own: OwnRedis, **env: str) -> ServerProcess:
    return ServerProcess(tmp_path / name, env={**SERVER_ENV, "COLLAB_STORE": own.url, **env}).start()


async def record_keyed(client: Client, key: str, deadline: float | None = None) -> str:
    request = activity("agent_keyed", idempotency_key=key)
    request.metadata.update({"key": key})
    response = await client.stub.RecordActivity(request, metadata=client.metadata, timeout=deadline)
    return response.activity_id


def recorded_per_key(own: OwnRedis) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, body in own.client().hscan_iter("collab:activity", count=1000):
        key = json.loads(body).get("metadata", {}).get("key")
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
    return counts


async def test_retries_after_a_replica_restarts_get_their_first_answer_from_the_newest_answers(
    tmp_path: Path, own_redis: OwnRedis
) -> None:
    # A cache holding a few dozen answers, against 300 in Redis: a reload must keep the
    # newest (the ones clients still retry), not whichever the hash order gives last.
    env = {"COLLAB_IDEMPOTENCY_BYTES": "12000"}
    first, second = replica(tmp_path, "a", own_redis, **env), replica(tmp_path, "b", own_redis, **env)
    try:
        writer = Client.connect(first.target)
        answered = {f"k{n}": await record_keyed(writer, f"k{n}") for n in range(300)}
        await writer.close()
        second.stop()
        second = replica(tmp_path, "b2", own_redis, **env)
        retrier = Client.connect(second.target)
        newest = [f"k{n}" for n in range(280, 300)]
        retried = {key: await record_keyed(retrier, key) for key in newest}
        assert retried == {key: answered[key] for key in newest}
        # And the first replica, following, answers the same (nothing was recorded anew).
        checker = Client.connect(first.target)
        assert {key: await record_keyed(checker, key) for key in newest[-5:]} == {
            key: answered[key] for key in newest[-5:]
        }
        await retrier.close()
        await checker.close()
        counts = recorded_per_key(own_redis)
        assert len(counts) == 300 and set(counts.values()) == {1}
    finally:
        first.kill()
        second.kill()


async def test_answers_past_the_idempotency_ttl_leave_redis(tmp_path: Path, own_redis: OwnRedis) -> None:
    server = replica(tmp_path, "a", own_redis, COLLAB_IDEMPOTENCY_TTL="1")
    client = Client.connect(server.target)
    try:
        await record_keyed(client, "old")
        await asyncio.sleep(1.5)
        await record_keyed(client, "new")  # the batch that records it prunes what is older than the TTL
        redis_client: Any = own_redis.client()  # replies are bytes (the stubs type them loosely)
        held = [field.decode() for field in redis_client.hkeys("collab:idempotency")]
        indexed = [member.decode() for member in redis_client.zrange("collab:idempotency_at", 0, -1)]
        assert [f for f in held if f.endswith(" new")] and not [f for f in held if f.endswith(" old")], held
        assert sorted(indexed) == sorted(held)
    finally:
        await client.close()
        server.kill()


async def test_a_redis_that_comes_back_older_starts_a_new_epoch_never_reusing_a_seq(
    tmp_path: Path, own_redis: OwnRedis
) -> None:
    server = replica(tmp_path, "a", own_redis)
    client = Client.connect(server.target)
    redis_client: Any = own_redis.client()  # replies are bytes (the stubs type them loosely)
    try:
        for n in range(5):
            await client.record(f"agent_{n}")
        # A backup of every key, taken now (seq 5).
        backup = {key: redis_client.dump(key) for key in redis_client.scan_iter("collab:*")}
        stream = await client.subscribe()
        for n in range(10):
            await client.record(f"agent_after_{n}")
        seen: list[tuple[str, int]] = []
        while len(seen) < 10:
            message = await asyncio.wait_for(stream.read(), 10)
            assert isinstance(message, pb.SubscribeEventsResponse)
            seen.append((message.event.epoch, message.event.seq))
        served_epoch, served_seq = seen[-1]
        assert served_seq == 15
        # Redis comes back from the backup: it has forgotten seqs 6..15. In one transaction,
        # so the running server cannot write a key between the flush and the restores.
        rollback = redis_client.pipeline(transaction=True)
        rollback.flushdb()
        for key, value in backup.items():
            rollback.restore(key, 0, value)
        rollback.execute()
        after = [await client.record(f"agent_restored_{n}") for n in range(3)]
        # The subscriber's stream ended (it resubscribes) rather than carrying seq 6 again.
        rest: list[Any] = []
        with contextlib.suppress(grpc.aio.AioRpcError):
            while (message := await asyncio.wait_for(stream.read(), 10)) is not EOF:
                rest.append(message)
        assert all(m.event.epoch != served_epoch or m.event.seq > served_seq for m in rest if m.HasField("event"))
        # Resuming where it was is refused as another epoch: the client starts from a fresh state.
        resumed = client.stub.SubscribeEvents(
            pb.SubscribeEventsRequest(since_seq=served_seq, epoch=served_epoch, include_snapshot=True),
            metadata=client.metadata,
        )
        first = await asyncio.wait_for(resumed.read(), 10)
        assert isinstance(first, pb.SubscribeEventsResponse) and not first.resume.recovered
        snapshot = first if first.HasField("snapshot") else await asyncio.wait_for(resumed.read(), 10)
        assert isinstance(snapshot, pb.SubscribeEventsResponse)
        assert snapshot.snapshot.epoch != served_epoch and snapshot.snapshot.seq == 8
        resumed.cancel()
        for activity_id in after:
            got = await client.stub.GetActivity(
                pb.GetActivityRequest(activity_id=activity_id), metadata=client.metadata
            )
            assert got.activity.activity_id == activity_id
        assert redis_client.get("collab:epoch").decode() == snapshot.snapshot.epoch
    finally:
        await client.close()
        server.kill()


async def test_a_hung_redis_fails_each_call_within_the_store_timeout_and_writes_resume_after(
    tmp_path: Path, own_redis: OwnRedis
) -> None:
    # 1 s to wait for Redis; the write lease outlives its holder by 2 s, so a lease set by
    # a write that gave up and never released would still refuse the write after SIGCONT.
    server = replica(tmp_path, "a", own_redis, COLLAB_STORE_TIMEOUT="1")
    client = Client.connect(server.target)
    try:
        before = await record_keyed(client, "before")
        own_redis.pause()
        # Writes and reads at once and one after another: each ends with UNAVAILABLE, none
        # waits behind another (the call's own deadline, 4 s, would end it otherwise).
        calls = [record_keyed(client, f"during{n}", deadline=4) for n in range(3)]
        calls.append(
            client.stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=client.metadata, timeout=4)  # type: ignore[arg-type]
        )
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for _ in range(2):
            try:
                await client.stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=client.metadata, timeout=4)
            except grpc.aio.AioRpcError as error:
                outcomes.append(error)
        codes = [o.code() if isinstance(o, grpc.aio.AioRpcError) else o for o in outcomes]
        assert codes == [grpc.StatusCode.UNAVAILABLE] * 6, [
            (o.code(), o.details()) if isinstance(o, grpc.aio.AioRpcError) else o for o in outcomes
        ]
        own_redis.resume()
        # The first write after SIGCONT is recorded (not refused behind a lease nobody holds).
        after = await record_keyed(client, "after", deadline=10)
        again = {key: await record_keyed(client, key, deadline=10) for key in ("during0", "during1", "during2")}
        assert len({before, after, *again.values()}) == 5
        counts = recorded_per_key(own_redis)
        assert set(counts.values()) == {1} and {"before", "after", "during0", "during1", "during2"} <= set(counts)
    finally:
        await client.close()
        server.kill()
