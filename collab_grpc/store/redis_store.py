"""Redis store: several collab-server replicas share one state and one event log.

- The log is a Redis stream (entry id ``<seq>-0``); the state is kept in hashes and sets
  (full JSON of each changed activity, session, decision and agent), so a replica
  rebuilds from Redis when it starts.
- Writes are serialised across replicas by a lock in Redis. Holding it, a replica first
  takes in the events other replicas appended (so it decides on the current state),
  decides with the domain core, then appends the event and its state changes with one
  script that checks the lock is still held and the seq is the next one: all or nothing.
- Each replica follows the stream and applies other replicas' events, so every
  subscriber on every replica sees one seq order. Reads first take in what is new.
- While Redis is unreachable every call fails with UNAVAILABLE; nothing half-written
  exists (the script is atomic) and a replica whose state may hold a refused change
  reloads it from Redis before serving again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from time import perf_counter  # its own name: tests stand in for the `time` module
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from collab_grpc.extras import REDIS_INSTALL

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError
except ModuleNotFoundError as missing:  # the [redis] extra is not installed
    raise ModuleNotFoundError(f"the Redis store needs the redis package: {REDIS_INSTALL}", name=missing.name) from None

from collab_grpc import metrics
from collab_grpc.history import ActivityQuery, Found, query_held
from collab_grpc.model import (
    Activity,
    ActivityCompletion,
    ActivityStatus,
    AgentRetirement,
    Decision,
    Event,
    EventKind,
    Session,
)
from collab_grpc.state import CollaborationState, new_epoch
from collab_grpc.store.base import StoreError, StoreUnavailable
from collab_grpc.store.codec import decode_activity, decode_payload, decode_session, dumps, encode

__all__ = ["RedisStore"]

log = logging.getLogger("collab_grpc.store.redis")

LOCK_TTL_MS = 5_000
# Entries of agents never retired (idle past the TTL while no replica ran) removed per load.
STALE_AGENTS_PER_LOAD = 10_000
LOCK_WAIT = 5.0  # seconds a write waits for the lock before UNAVAILABLE
# How long the follower blocks on one read of the log, in milliseconds. A store that
# closes lets the read in flight end by itself (at most this long) rather than cancelling
# it: redis-py's client, cancelled in a blocking read, could leave the cancellation
# waiting for ever, and the server's shutdown with it.
FOLLOW_BLOCK_MS = 1000

# KEYS: lock, seq, events. ARGV: lock token, expected seq, new seq, event (JSON),
# idempotency answers (JSON), state changes (JSON list of commands).
APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('LOCK lost the write lock') end
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[2] then return redis.error_reply('SEQ the log moved on') end
redis.call('XADD', KEYS[3], ARGV[3] .. '-0', 'e', ARGV[4], 'a', ARGV[5])
for _, op in ipairs(cjson.decode(ARGV[6])) do redis.call(unpack(op)) end
redis.call('SET', KEYS[2], ARGV[3])
return 1
"""
# KEYS: agent hash, agent_seen. ARGV: cutoff, agent ids. Each id still unseen since the
# cutoff (checked here: a replica may have just written it) is removed.
FORGET_STALE_AGENTS = """
local cutoff = tonumber(ARGV[1])
for i = 2, #ARGV do
  local seen = redis.call('ZSCORE', KEYS[2], ARGV[i])
  if seen and tonumber(seen) < cutoff then
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
  end
end
return 1
"""
# KEYS: lock. ARGV: token.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def redacted_netloc(url: str) -> str:
    """``url``'s user, host and port, the password (if any) blanked: for log lines."""
    parts = urlsplit(url)
    user_info, at, host = parts.netloc.rpartition("@")
    if not at:
        return host
    user, colon, _password = user_info.partition(":")
    return f"{user}{colon and ':[redacted]'}@{host}" if user or colon else f"@{host}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class RedisStore:
    @property
    def failure_marks(self) -> Sequence[int]:
        return ()  # a write that cannot be stored fails before it is decided

    def __init__(self, url: str, *, retain: int = 100_000) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self.prefix = query.pop("prefix", ["collab"])[-1]
        self.url = urlunsplit(parts._replace(query="&".join(f"{k}={v[-1]}" for k, v in query.items())))
        self.retain = retain
        # redis-py's replies are loosely typed (bytes | str | None ...); this module reads them as bytes.
        self._client: Any = None
        self._state: CollaborationState | None = None
        self._local = asyncio.Lock()
        self._token = ""
        self._staged: list[Event] = []
        self._answers: dict[int, list[list[Any]]] = {}
        self._durable_seq = 0
        self._stale = False
        self._appending = False
        self._follower: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def description(self) -> str:
        return f"redis ({redacted_netloc(self.url)}, prefix {self.prefix!r})"

    def _key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    # -- opening --------------------------------------------------------------------

    async def attach(self, state: CollaborationState) -> None:
        """Connect and continue the shared history in ``state``; then follow it."""
        self._state = state
        state.log.sink = self._staged.append
        state.idempotency.sink = self._stage_answer
        try:
            await self._load(self._redis())
        except StoreUnavailable as error:
            raise StoreError(f"{error}; is Redis running at {redacted_netloc(self.url)}?") from None

    def _redis(self) -> Any:
        if self._client is None:
            self._client = aioredis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)
        return self._client

    def _stage_answer(self, method: str, key: str, fingerprint: bytes, answer: bytes, stored_at: float) -> None:
        assert self._state is not None
        entry = [method, key, _b64(fingerprint), _b64(answer), stored_at]
        self._answers.setdefault(self._state.log.last_seq, []).append(entry)

    async def _load(self, client: Any) -> None:
        """Read the shared state into memory, replacing what is there."""
        state = self._state
        assert state is not None
        try:
            await client.set(self._key("epoch"), new_epoch(), nx=True)
            epoch = (await client.get(self._key("epoch"))).decode()
            last_seq = int(await client.get(self._key("seq")) or 0)
            settings = state.settings
            newest = await client.zrevrange(self._key("activity_seq"), 0, settings.history_limit - 1)
            open_ids = await client.smembers(self._key("open"))
            ids = list(dict.fromkeys([*newest, *open_ids]))
            bodies = await client.hmget(self._key("activity"), ids) if ids else []
            activities = sorted((decode_activity(json.loads(b)) for b in bodies if b), key=lambda a: a.timestamp)
            active_ids = list(await client.smembers(self._key("active_sessions")))
            ended_ids = await client.zrevrange(self._key("ended_sessions"), 0, settings.ended_sessions_limit - 1)
            session_ids = [*active_ids, *reversed(ended_ids)]
            sessions = [
                decode_session(json.loads(b))
                for b in (await client.hmget(self._key("session"), session_ids) if session_ids else [])
                if b
            ]
            decisions: list[Decision] = []
            for session in sessions:
                decision_ids = await client.lrange(self._key(f"session_decisions:{session.session_id}"), 0, -1)
                if decision_ids:
                    found = await client.hmget(self._key("decision"), decision_ids)
                    decisions.extend(Decision(**json.loads(b)) for b in found if b)
            agents = await self._live_agents(client, activities, sessions)
            entries = await client.xrevrange(self._key("events"), count=settings.event_log_retain)
            events = [_decode_entry(epoch, entry_id, fields) for entry_id, fields in reversed(entries)]
            answers = await client.hgetall(self._key("idempotency"))
        except RedisError as error:
            self._stale = True
            raise StoreUnavailable(f"the Redis store is unavailable: {error}") from None
        state.restore(
            epoch=epoch,
            last_seq=last_seq,
            agents=agents,
            activities=activities,
            sessions=sessions,
            decisions=decisions,
            events=events,
        )
        state.idempotency.clear()
        oldest = state.clock() - state.idempotency.ttl
        for value in answers.values():
            method, key, fingerprint, answer, stored_at = json.loads(value)
            if stored_at > oldest:
                state.idempotency.remember(
                    method, key, base64.b64decode(fingerprint), base64.b64decode(answer), stored_at
                )
        self._durable_seq = last_seq
        self._staged.clear()
        self._answers.clear()
        self._stale = False
        log.info("state loaded from redis", extra={"epoch": epoch, "seq": last_seq, "prefix": self.prefix})

    async def _live_agents(
        self, client: Any, activities: list[Activity], sessions: list[Session]
    ) -> list[tuple[str, str, str | None, float]]:
        """The agents still live (not every id ever seen): seen within the idle TTL (the
        ``agent_seen`` sorted set, scored by when each was last seen), or with an open
        activity, in an active session or in the roster."""
        state = self._state
        assert state is not None
        seen_key = self._key("agent_seen")
        if not await client.exists(seen_key) and await client.hlen(self._key("agent")):
            # Written before agents had a lifecycle: every agent kept is taken as seen
            # now (once), so each is retired with its event after one idle TTL.
            now = state.clock()
            await client.zadd(seen_key, {agent_id: now for agent_id in await client.hkeys(self._key("agent"))})
        cutoff = state.clock() - state.settings.agent_idle_ttl
        recent = dict(await client.zrangebyscore(seen_key, cutoff, "+inf", withscores=True))
        needed = {a.agent_id.encode() for a in activities if a.status is ActivityStatus.ACTIVE}
        needed.update(member.encode() for s in sessions if s.ended_at is None for member in s.participants)
        needed.update(agent_id.encode() for agent_id in state.roster_ids)
        # Agents that went idle while every replica was down were never retired: their
        # entries go now, a bounded number per start.
        stale = await client.zrangebyscore(seen_key, "-inf", f"({cutoff}", start=0, num=STALE_AGENTS_PER_LOAD)
        stale = [agent_id for agent_id in stale if agent_id not in needed]
        if stale:
            await client.eval(FORGET_STALE_AGENTS, 2, self._key("agent"), seen_key, repr(cutoff), *stale)
        ids = list(dict.fromkeys([*recent, *needed]))
        bodies = await client.hmget(self._key("agent"), ids) if ids else []
        agents = []
        for agent_id, body in zip(ids, bodies, strict=True):
            if body:
                department, last_activity_id, last_seen = _agent_fields(body)
                agents.append((agent_id.decode(), department, last_activity_id, recent.get(agent_id, last_seen)))
        return agents

    # -- following other replicas -----------------------------------------------------

    def start(self) -> None:
        self._follower = asyncio.create_task(self._follow())

    async def _catch_up(self) -> None:
        """Take in every event other replicas appended (under the local lock)."""
        state = self._state
        assert state is not None
        client = self._redis()
        if not self._stale:
            try:
                async with client.pipeline(transaction=False) as pipe:
                    pipe.mget(self._key("epoch"), self._key("seq"))
                    pipe.xrange(self._key("events"), min=f"{state.log.last_seq + 1}-0")
                    (epoch, seq), entries = await pipe.execute()
            except RedisError as error:
                raise StoreUnavailable(f"the Redis store is unavailable: {error}") from None
            # Redis lost or replaced the history (restarted without its data, say).
            self._stale = epoch is None or epoch.decode() != state.epoch or int(seq or 0) < state.log.last_seq
        if self._stale:
            await self._load(client)
            self._appending = False
            state.log.close_all("the state was reloaded from the store; resubscribe with since_seq")
            return
        for entry_id, fields in entries:
            event = _decode_entry(state.epoch, entry_id, fields)
            if event.seq <= state.log.last_seq:
                continue
            if event.seq != state.log.last_seq + 1:  # trimmed past us: start again from the state
                self._stale = True
                await self._catch_up()
                return
            state.apply(event)
            for method, key, fingerprint, answer, stored_at in json.loads(fields.get(b"a", b"[]")):
                state.idempotency.remember(
                    method, key, base64.b64decode(fingerprint), base64.b64decode(answer), stored_at
                )
            self._durable_seq = event.seq

    async def _follow(self) -> None:
        """Apply other replicas' events as they are appended, so subscribers here see them."""
        backoff = 0.05
        while not self._closing:
            try:
                assert self._state is not None
                await self._redis().xread(
                    {self._key("events"): f"{self._state.log.last_seq}-0"}, block=FOLLOW_BLOCK_MS, count=1
                )
                if self._closing:
                    return
                async with self._local:
                    await self._catch_up()
                backoff = 0.05
            except (StoreUnavailable, RedisError, OSError) as error:
                log.warning("following the redis log failed; retrying", extra={"error": str(error)})
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)

    async def fresh(self) -> None:
        async with self._local:
            await self._catch_up()

    # -- writing --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        async with self._local:
            client = self._redis()
            self._token = secrets.token_hex(8)
            await self._acquire(client)
            try:
                await self._catch_up()
                before = self._state.log.last_seq if self._state else 0
                try:
                    yield
                    await self._append(client, before)
                except BaseException:
                    # Cancelled, or failed, with the state already changed here: that change
                    # is not (surely) in Redis, so the state is reloaded before it is used.
                    if self._staged or self._answers or self._appending:
                        self._stale = True
                    self._staged.clear()
                    self._answers.clear()
                    raise
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await client.eval(RELEASE, 1, self._key("lock"), self._token)

    async def _acquire(self, client: Any) -> None:
        deadline = time.monotonic() + LOCK_WAIT
        delay = 0.001
        while True:
            try:
                if await client.set(self._key("lock"), self._token, nx=True, px=LOCK_TTL_MS):
                    return
            except RedisError as error:
                raise StoreUnavailable(f"the Redis store is unavailable: {error}") from None
            if time.monotonic() > deadline:
                raise StoreUnavailable("the Redis write lock stayed taken; try again")
            await asyncio.sleep(delay)
            delay = min(0.05, delay * 2)

    async def _append(self, client: Any, before: int) -> None:
        """Append what the write staged, all or nothing; on failure the write is refused
        and the state reloaded before it is used again."""
        state = self._state
        assert state is not None
        events, self._staged[:] = list(self._staged), []
        answers, self._answers = self._answers, {}
        expected = before
        self._appending = True
        try:
            for event in events:
                body = dumps(
                    {"kind": event.kind.value, "time": event.time, "payload": json.loads(encode(event.payload))}
                )
                fields = answers.get(event.seq, [])
                started = perf_counter()
                await client.eval(
                    APPEND, 3, self._key("lock"), self._key("seq"), self._key("events"),
                    self._token, str(expected), str(event.seq), body, dumps(fields), dumps(self._ops(event, fields)),
                )  # fmt: skip
                metrics.committed("redis", perf_counter() - started, 1)
                expected = event.seq
                self._durable_seq = event.seq
                state.log.publish_through(event.seq)
        except (RedisError, OSError) as error:
            metrics.commit_failed("redis")
            self._stale = True
            raise StoreUnavailable(f"the Redis store could not write ({error}); the write was not recorded") from None
        self._appending = False

    def _ops(self, event: Event, answers: list[list[Any]]) -> list[list[Any]]:
        """The state changes of ``event``, as Redis commands (full JSON of what changed)."""
        state = self._state
        assert state is not None
        key = self._key
        payload = event.payload
        ops: list[list[Any]] = []

        def agent(agent_id: str) -> None:
            known = state.find_agent(agent_id)
            if known is not None:
                body = dumps([known.department, known.last_activity_id, known.last_seen])
                ops.append(["HSET", key("agent"), agent_id, body])
                ops.append(["ZADD", key("agent_seen"), known.last_seen, agent_id])

        def session(session_id: str) -> None:
            found = state.find_session(session_id)
            if found is not None:
                ops.append(["HSET", key("session"), session_id, encode(found)])

        if isinstance(payload, Activity):
            ops += [
                ["HSET", key("activity"), payload.activity_id, encode(payload)],
                ["ZADD", key("activity_seq"), event.seq, payload.activity_id],
                ["SADD", key("open"), payload.activity_id],
            ]
            if payload.session_id:
                session(payload.session_id)
        elif isinstance(payload, ActivityCompletion):
            ops += [
                ["HSET", key("activity"), payload.activity.activity_id, encode(payload.activity)],
                ["SREM", key("open"), payload.activity.activity_id],
            ]
        elif isinstance(payload, Session) and event.kind is EventKind.COLLABORATION_STARTED:
            ops += [
                ["HSET", key("session"), payload.session_id, encode(payload)],
                ["SADD", key("active_sessions"), payload.session_id],
            ]
        elif isinstance(payload, Session):
            ops += [
                ["HSET", key("session"), payload.session_id, encode(payload)],
                ["SREM", key("active_sessions"), payload.session_id],
                ["ZADD", key("ended_sessions"), payload.ended_at or event.time, payload.session_id],
            ]
        elif isinstance(payload, Decision):
            ops += [
                ["HSET", key("decision"), payload.decision_id, encode(payload)],
                ["RPUSH", key(f"session_decisions:{payload.session_id}"), payload.decision_id],
            ]
            session(payload.session_id)
        if isinstance(payload, AgentRetirement):
            # The agents hash holds the live agents; the retired one's history stays.
            ops += [["HDEL", key("agent"), payload.agent_id], ["ZREM", key("agent_seen"), payload.agent_id]]
        else:
            for agent_id in event.agent_ids:  # each marked seen (a completion, a session's end too)
                agent(agent_id)
        for method, idem_key, *rest in answers:
            ops.append(["HSET", key("idempotency"), f"{method}\x00{idem_key}", dumps([method, idem_key, *rest])])
        ops.append(["XTRIM", key("events"), "MAXLEN", "~", self.retain])
        return ops

    async def query_activities(self, query: ActivityQuery, count: int) -> Found:
        """From this replica's state (caught up by the caller's ``fresh``): the newest
        ``history_limit`` activities and every open one, as the memory store. Redis keeps
        more (``retain``) only as bodies in a hash without the indexes a search needs, so
        older activities are not searched; the SQLite store searches its whole retention."""
        if self._state is None:
            return Found([])
        return query_held(self._state.held_activities(), query, count)

    async def durable(self, seq: int) -> None:
        """Appends happen inside ``writing``; by now ``seq`` is stored or refused."""
        if seq > self._durable_seq:
            raise StoreUnavailable("the write was not stored; it was not recorded")

    async def close(self) -> None:
        self._closing = True
        follower = self._follower
        if follower is not None:
            # The read in flight ends within FOLLOW_BLOCK_MS; cancelled only past that (a hung Redis).
            await asyncio.wait({follower}, timeout=2 * FOLLOW_BLOCK_MS / 1000)
            if not follower.done():
                follower.cancel()
                await asyncio.wait({follower}, timeout=FOLLOW_BLOCK_MS / 1000)
        if self._client is not None:
            await self._client.aclose()


def _agent_fields(body: bytes) -> tuple[str, str | None, float]:
    # [department, last_activity_id, last_seen]; without last_seen when written before
    # agents had a lifecycle.
    department, last_activity_id, *rest = json.loads(body)
    return department, last_activity_id, float(rest[0]) if rest else 0.0


def _decode_entry(epoch: str, entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
    body = json.loads(fields[b"e"])
    kind = EventKind(body["kind"])
    seq = int(entry_id.decode().split("-", 1)[0])
    return Event(seq, epoch, body["time"], kind, decode_payload(kind, dumps(body["payload"])))
