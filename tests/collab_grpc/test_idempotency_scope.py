"""Idempotency keys belong to the caller (issue 17, item 11): B replaying A's key does
not get A's answer, and B using a key first does not take it from A. Scoped answers
survive a restart in the SQLite and Redis stores; an answer stored unscoped by an older
server is still given to a retry until it expires."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import parse_qs, urlsplit

import grpc
import jwt
import pytest
import pytest_asyncio
import redis

from collab_grpc.auth import Access, Grant
from collab_grpc.config import ServerConfig
from collab_grpc.errors import FailedPrecondition
from collab_grpc.idempotency import IdempotencyCache, scoped_key
from collab_grpc.server import RunningServer, start_server
from collab_grpc.store.sqlite import FILE_NAME as SQLITE_FILE
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.rpc import JWT_SECRET, WRITE_KEY, Client, activity
from tests.support.services import redis_store_url

METHOD = "RecordActivity"
SECOND_WRITE_KEY = "second-write-key-of-the-suite"

# -- the cache ------------------------------------------------------------------------------------


def test_one_callers_key_is_not_anothers() -> None:
    cache = IdempotencyCache()
    cache.store(METHOD, "k", b"fp", b"a's answer", 0.0, scope="a")
    assert cache.lookup(METHOD, "k", b"fp", 1.0, scope="a") == b"a's answer"
    assert cache.lookup(METHOD, "k", b"fp", 1.0, scope="b") is None
    # B may use the same key for another request: it is B's own key.
    assert cache.lookup(METHOD, "k", b"other", 1.0, scope="b") is None
    cache.store(METHOD, "k", b"other", b"b's answer", 1.0, scope="b")
    assert cache.lookup(METHOD, "k", b"fp", 2.0, scope="a") == b"a's answer"
    assert cache.lookup(METHOD, "k", b"other", 2.0, scope="b") == b"b's answer"
    with pytest.raises(FailedPrecondition, match="'k' was already used"):
        cache.lookup(METHOD, "k", b"fp", 2.0, scope="b")


def test_stores_are_handed_the_scoped_key() -> None:
    cache = IdempotencyCache()
    stored: list[str] = []
    cache.sink = lambda method, key, fingerprint, answer, now: stored.append(key)
    cache.store(METHOD, "k", b"fp", b"answer", 0.0, scope="abc")
    assert stored == [scoped_key("abc", "k")] == ["abc k"]


def test_an_answer_stored_unscoped_before_the_upgrade_is_still_given() -> None:
    cache = IdempotencyCache(ttl=100.0)
    cache.remember(METHOD, "old-key", b"fp", b"old answer", 0.0)  # as a store restores an old row
    assert cache.lookup(METHOD, "old-key", b"fp", 10.0, scope="anyone") == b"old answer"
    assert cache.lookup(METHOD, "old-key", b"fp", 101.0, scope="anyone") is None  # until it expires


def test_the_scope_names_the_holder_not_the_credential() -> None:
    key_grant = Grant(Access.READ | Access.WRITE, principal="key:" + WRITE_KEY)
    assert WRITE_KEY not in key_grant.idempotency_scope()
    assert WRITE_KEY not in repr(key_grant)  # a grant logged by mistake shows no key
    assert " " not in key_grant.idempotency_scope()
    assert Grant(Access.READ).idempotency_scope() == ""  # auth off: one caller


# -- on a server ----------------------------------------------------------------------------------


def jwt_for(subject: str, lifetime: int) -> str:
    claims = {"scope": "read write", "sub": subject, "exp": int(time.time()) + lifetime}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


@pytest.fixture(params=["sqlite", "redis"])
def store_config(request: pytest.FixtureRequest, server_config: ServerConfig) -> Iterator[ServerConfig]:
    config = dataclasses.replace(server_config, api_keys=(WRITE_KEY, SECOND_WRITE_KEY))
    if request.param == "sqlite":
        yield config
        return
    with redis_store_url() as url:
        yield dataclasses.replace(config, store=url)


class Hub:
    """A server that can be restarted on its store; clients per credential."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.running: RunningServer | None = None
        self.clients: list[Client] = []

    async def start(self) -> None:
        self.running = await start_server(self.config)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def stop(self) -> None:
        for client in self.clients:
            await client.close()
        self.clients.clear()
        if self.running is not None:
            await self.running.stop(0)
            self.running = None

    def client(self, token: str) -> Client:
        assert self.running is not None
        client = Client.connect(f"127.0.0.1:{self.running.port}", token=token)
        self.clients.append(client)
        return client

    async def record(self, token: str, key: str, agent_id: str = "idem_agent") -> str:
        client = self.client(token)
        response = await client.stub.RecordActivity(
            activity(agent_id, idempotency_key=key), metadata=client.metadata, timeout=10
        )
        return response.activity_id


@pytest_asyncio.fixture
async def hub(store_config: ServerConfig) -> AsyncIterator[Hub]:
    running = Hub(store_config)
    await running.start()
    yield running
    await running.stop()


async def test_another_caller_neither_replays_nor_claims_a_key(hub: Hub) -> None:
    first = await hub.record(WRITE_KEY, "shared-key")
    assert await hub.record(WRITE_KEY, "shared-key") == first  # a retry: the first answer
    # B with A's key: its own write, not A's answer.
    second = await hub.record(SECOND_WRITE_KEY, "shared-key")
    assert second != first
    assert await hub.record(SECOND_WRITE_KEY, "shared-key") == second
    # B first with a key A then uses: A is not refused, nor given B's answer.
    claimed = await hub.record(SECOND_WRITE_KEY, "claimed-key", agent_id="other_agent")
    mine = await hub.record(WRITE_KEY, "claimed-key", agent_id="idem_agent")
    assert mine not in (claimed, first, second)
    # Both keep their answers across a restart (the store keeps them scoped).
    await hub.restart()
    assert await hub.record(WRITE_KEY, "shared-key") == first
    assert await hub.record(SECOND_WRITE_KEY, "shared-key") == second
    assert await hub.record(WRITE_KEY, "claimed-key", agent_id="idem_agent") == mine


async def test_a_renewed_jwt_keeps_its_holders_keys(hub: Hub) -> None:
    first = await hub.record(jwt_for("alice", 600), "jwt-key")
    assert await hub.record(jwt_for("alice", 900), "jwt-key") == first  # a new token, the same holder
    assert await hub.record(jwt_for("bob", 600), "jwt-key") != first


async def test_reuse_with_another_request_is_still_refused_for_the_same_caller(hub: Hub) -> None:
    await hub.record(WRITE_KEY, "reused-key", agent_id="agent_a")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await hub.record(WRITE_KEY, "reused-key", agent_id="agent_b")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def store_old_row(config: ServerConfig, fingerprint: bytes, answer: bytes) -> None:
    """Write an idempotency answer into the stopped server's store as a server before
    scoped keys did: the caller's key as it is."""
    row = (METHOD, "legacy-key", fingerprint, answer, time.time())
    if config.store == "sqlite":
        with contextlib.closing(sqlite3.connect(config.data_dir / SQLITE_FILE)) as db, db:
            db.execute(
                "INSERT INTO idempotency (method, key, fingerprint, answer, stored_at) VALUES (?, ?, ?, ?, ?)", row
            )
        return
    url = urlsplit(config.store)
    prefix = parse_qs(url.query)["prefix"][-1]
    value = json.dumps(
        [METHOD, "legacy-key", base64.b64encode(fingerprint).decode(), base64.b64encode(answer).decode(), row[4]]
    )
    redis.Redis.from_url(url._replace(query="").geturl()).hset(
        f"{prefix}:idempotency", f"{METHOD}\x00legacy-key", value
    )


async def test_an_unscoped_answer_from_an_older_server_is_given_after_the_upgrade(hub: Hub) -> None:
    request = activity("legacy_agent", idempotency_key="legacy-key")
    unkeyed = pb.RecordActivityRequest()
    unkeyed.CopyFrom(request)
    unkeyed.ClearField("idempotency_key")
    fingerprint = hashlib.sha256(unkeyed.SerializeToString(deterministic=True)).digest()
    answer = pb.RecordActivityResponse(activity_id="act_recorded_before_the_upgrade")
    await hub.stop()
    store_old_row(hub.config, fingerprint, answer.SerializeToString())
    await hub.start()
    client = hub.client(SECOND_WRITE_KEY)
    retried = await client.stub.RecordActivity(request, metadata=client.metadata, timeout=10)
    assert retried.activity_id == "act_recorded_before_the_upgrade"
    # Never stored unscoped again: a new key of one caller is not another's.
    first = await hub.record(WRITE_KEY, "new-key")
    assert await hub.record(SECOND_WRITE_KEY, "new-key") != first
