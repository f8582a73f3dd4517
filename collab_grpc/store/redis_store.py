"""Redis store: several collab-server replicas share one state and one event log.

- The log is a Redis stream (entry id ``<seq>-0``); the state is kept in hashes and sets
  (full JSON of each changed activity, session, decision and agent), so a replica
  rebuilds from Redis when it starts.
- Writes are serialised across replicas by a **write lease**: a key in Redis holding one
  replica's token, with a TTL (LEASE_TTL_MS) that every append renews. A replica that
  takes the lease first takes in the events other replicas appended, then decides its
  writes in memory as a single server does, and appends them in batches (group commit:
  one script per batch, checking the lease token and the seq, all or nothing, the events
  with their state changes and idempotency answers). While a batch is in flight the next
  one is decided, and while writes keep coming a batch waits a little for more (as the
  SQLite store's group commit), so a busy replica pays one round trip per batch.
- The lease is handed over, not raced for: a replica that wants it queues its token in
  Redis; the holder, after its current batch and once it has held the lease LEASE_HOLD,
  gives it to the first live waiter (the release script sets the lease to that token and
  publishes it with the log's seq), so replicas take turns and none starves. A holder with
  nothing to write releases at once.
  A holder that dies leaves the lease to expire (LEASE_TTL_MS): the failover time.
- Each replica follows the stream and applies other replicas' events, so every
  subscriber on every replica sees one seq order. Reads first take in what is new
  (nothing to do while this replica holds the lease).
- A failed batch refuses its writes and every write decided after them (failure_marks),
  and the state is reloaded from Redis. A replica that finds Redis behind what it had
  already served in the same epoch (Redis restarted without its data, a failover to a
  lagging Redis replica, a restore from backup) starts a new epoch in Redis, so every
  client resets instead of seeing a seq number twice.
- Every call waits at most ``timeout`` seconds for Redis (a hung Redis: UNAVAILABLE
  after that, never longer); a lease request abandoned that way is released once Redis
  answers again, so it is not held for its TTL.
- Idempotency answers are kept with the time they were stored (a sorted set): a reload
  takes the newest first and the oldest past the TTL are pruned with every batch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from time import perf_counter  # its own name: tests stand in for the `time` module
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import orjson

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
    ActivityLink,
    ActivityStatus,
    AgentRetirement,
    Decision,
    Event,
    EventKind,
    Session,
)
from collab_grpc.state import CollaborationState, new_epoch
from collab_grpc.store.base import (
    STORE_TIMEOUT,
    StoreError,
    StoreUnavailable,
    Waiters,
    check_read_count,
    release_waiters,
)
from collab_grpc.store.codec import decode_activity, decode_payload_data, decode_session, dumps, encode

__all__ = ["STORE_TIMEOUT", "RedisStore"]

log = logging.getLogger("collab_grpc.store.redis")

# How long a lease outlives its holder's last append or renewal: the longest a dead
# holder keeps the other replicas from writing.
LEASE_TTL_MS = 2_000
# A queued waiter not heard from for this long is skipped by the hand-over (it died or
# gave up); waiters refresh their place every LEASE_POLL.
WAITER_TTL_MS = 400
LEASE_POLL = 0.1  # seconds between a waiter's checks, besides the hand-over message
# Lease requests given up and still to release (see _release_abandoned); past this many
# (a long outage, with writes arriving all along) the oldest are forgotten: their lease,
# if Redis ever set it, expires by itself within LEASE_TTL_MS.
MAX_ABANDONED = 1_000
# Entries of agents never retired (idle past the TTL while no replica ran) removed per load.
STALE_AGENTS_PER_LOAD = 10_000
# How long the follower blocks on one read of the log, in milliseconds (below the
# socket timeout). A store that closes lets the read in flight end by itself (at most this
# long) rather than cancelling it.
FOLLOW_BLOCK_MS = 500
MAX_BATCH = 1_000  # events per append script
# A holder that others wait for hands the lease over after its current batch once it has
# held it this long (seconds): long enough to amortise a hand-over over several batches,
# short enough that the others' writes wait little.
LEASE_HOLD = 0.005
# While writes keep coming, a batch waits for more (see _gather): seconds.
GATHER_DELAY = 0.004
GATHER_QUIET = 0.001
# Idempotency answers past the TTL removed per batch (more than a batch adds, so it keeps up).
PRUNE_PER_BATCH = 2_000

# KEYS: lease, seq, events, idempotency, idempotency_at, waiting.
# ARGV: token, expected seq, new seq, lease TTL ms, prune cutoff, prune count, retain,
# entry count n, then n times (seq, event JSON, answers JSON), then the state changes (JSON
# list of commands). Returns how many replicas wait for the lease.
APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('LEASE lost the write lease') end
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[2] then return redis.error_reply('SEQ the log moved on') end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local n = tonumber(ARGV[8])
for i = 0, n - 1 do
  local base = 9 + 3 * i
  redis.call('XADD', KEYS[3], ARGV[base] .. '-0', 'e', ARGV[base + 1], 'a', ARGV[base + 2])
end
for _, op in ipairs(cjson.decode(ARGV[9 + 3 * n])) do redis.call(unpack(op)) end
if n > 0 then redis.call('SET', KEYS[2], ARGV[3]) end
local old = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', '(' .. ARGV[5], 'LIMIT', 0, tonumber(ARGV[6]))
if #old > 0 then
  redis.call('HDEL', KEYS[4], unpack(old))
  redis.call('ZREM', KEYS[5], unpack(old))
end
redis.call('XTRIM', KEYS[3], 'MAXLEN', '~', ARGV[7])
return redis.call('HLEN', KEYS[6])
"""
# KEYS: lease, queue (list of waiting tokens, in order), waiting (token -> deadline ms),
# seq. ARGV: token, lease TTL ms, waiter TTL ms. The seq of the log when the lease is this
# token's; false when queued.
ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) or redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('HDEL', KEYS[3], ARGV[1])
  return redis.call('GET', KEYS[4]) or '0'
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('HSET', KEYS[3], ARGV[1], now + tonumber(ARGV[3])) == 1 then redis.call('RPUSH', KEYS[2], ARGV[1]) end
return false
"""
# KEYS: lease, queue, waiting, channel, seq. ARGV: token, lease TTL ms. Gives the lease
# held by ``token`` to the first live waiter (2; the message names it and the log's seq),
# or frees it (1); 0 when it was not held. A token that gave up waiting is taken out of
# the queue too.
RELEASE = """
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('LREM', KEYS[2], 0, ARGV[1])
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
while true do
  local waiter = redis.call('LPOP', KEYS[2])
  if not waiter then break end
  local deadline = tonumber(redis.call('HGET', KEYS[3], waiter) or '0')
  redis.call('HDEL', KEYS[3], waiter)
  if deadline > now then
    redis.call('SET', KEYS[1], waiter, 'PX', ARGV[2])
    redis.call('PUBLISH', KEYS[4], waiter .. ' ' .. (redis.call('GET', KEYS[5]) or '0'))
    return 2
  end
end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', KEYS[4], '')
return 1
"""
# KEYS: epoch, seq. ARGV: the epoch this replica served, the seq it served up to, a new
# epoch. Redis behind what was served in that epoch: the new epoch replaces it (1).
NEW_EPOCH_IF_BEHIND = """
if redis.call('GET', KEYS[1]) == ARGV[1] and tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[3])
  return 1
end
return 0
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


def _unavailable(error: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"the Redis store is unavailable: {error or type(error).__name__}")


@dataclass(slots=True)
class _Staged:
    """A decided event as the append script takes it, encoded when it was decided (the
    state changes are those of that moment, not of a later write's)."""

    seq: int
    body: str
    answers: list[list[Any]]
    ops: list[list[Any]] = field(default_factory=list)


class RedisStore:
    def __init__(self, url: str, *, retain: int = 100_000, timeout: float = STORE_TIMEOUT) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self.prefix = query.pop("prefix", ["collab"])[-1]
        self.url = urlunsplit(parts._replace(query="&".join(f"{k}={v[-1]}" for k, v in query.items())))
        self.retain = retain
        self.timeout = timeout
        # redis-py's replies are loosely typed (bytes | str | None ...); this module reads them as bytes.
        self._client: Any = None
        self._state: CollaborationState | None = None
        # Held while deciding a write or taking in other replicas' events.
        self._local = asyncio.Lock()
        self._queued = 0  # writers waiting for _local
        self._events: list[Event] = []  # appended to the log, not yet encoded (inside `writing`)
        self._answers: dict[int, list[list[Any]]] = {}
        self._staged: list[_Staged] = []  # decided, to append
        self._durable_seq = 0
        # The newest seq this replica served (made durable or took in) in ``_served_epoch``.
        self._served_epoch = ""
        self._served_seq = 0
        self._stale = False
        self._failure_marks: list[int] = []
        self._waiters: Waiters = []
        # The lease: the token while held; ``_handing_over`` while the last batch goes out.
        self._lease: str | None = None
        self._handing_over = False
        self._lease_wait: asyncio.Future[str] | None = None  # the one request in flight
        self._lease_changed = asyncio.Event()
        self._handed_to = b""  # the last hand-over message: the token, and the seq of the log
        self._lease_seq = 0  # the seq of the log when the lease was taken
        self._needs_catch_up = False  # the lease was taken with events of others to take in
        self._lease_taken = 0.0
        self._append_lock = asyncio.Lock()  # held while a batch is in flight
        self._abandoned: dict[str, float] = {}  # lease tokens given up, as of when
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._follower: asyncio.Task[None] | None = None
        self._closing = False
        self.batches = 0

    @property
    def description(self) -> str:
        return f"redis ({redacted_netloc(self.url)}, prefix {self.prefix!r})"

    @property
    def failure_marks(self) -> Sequence[int]:
        return self._failure_marks

    def _key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    @contextlib.contextmanager
    def _redis_errors(self) -> Iterator[None]:
        try:
            yield
        except (RedisError, OSError) as error:
            raise _unavailable(error) from None

    @contextlib.asynccontextmanager
    async def _deadline(self) -> AsyncIterator[None]:
        """At most ``timeout`` for what the block waits on (Redis, the lease, the local lock)."""
        try:
            async with asyncio.timeout(self.timeout):
                yield
        except TimeoutError:
            raise StoreUnavailable(
                f"the Redis store did not answer within {self.timeout:g} s (COLLAB_STORE_TIMEOUT); "
                "the write, if any, may not have been recorded: retry it with the same idempotency key"
            ) from None

    # -- opening --------------------------------------------------------------------

    async def attach(self, state: CollaborationState) -> None:
        """Connect and continue the shared history in ``state``; then follow it."""
        self._state = state
        state.log.sink = self._events.append
        state.idempotency.sink = self._stage_answer
        try:
            async with self._deadline():
                await self._load(self._redis())
        except StoreUnavailable as error:
            raise StoreError(f"{error}; is Redis running at {redacted_netloc(self.url)}?") from None

    def _redis(self) -> Any:
        if self._client is None:
            self._client = aioredis.Redis.from_url(
                self.url, socket_timeout=max(self.timeout, 2 * FOLLOW_BLOCK_MS / 1000), socket_connect_timeout=2
            )
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
            # Redis behind what this replica served in the same epoch: the seqs after
            # Redis's would be numbered again, so the history takes a new epoch.
            if self._served_epoch and await client.eval(
                NEW_EPOCH_IF_BEHIND, 2, self._key("epoch"), self._key("seq"),
                self._served_epoch, str(self._served_seq), new_epoch(),
            ):  # fmt: skip
                log.warning(
                    "redis is behind what this replica served; a new epoch starts",
                    extra={"epoch": self._served_epoch, "seq": self._served_seq},
                )
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
            answers = await self._newest_answers(client)
        except (RedisError, OSError) as error:
            self._stale = True
            raise _unavailable(error) from None
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
        for method, key, fingerprint, answer, stored_at in answers:  # oldest first: the cache keeps the newest
            state.idempotency.remember(method, key, base64.b64decode(fingerprint), base64.b64decode(answer), stored_at)
        self._durable_seq = last_seq
        self._served(epoch, last_seq)
        self._events.clear()
        self._answers.clear()
        self._staged.clear()
        self._stale = False
        log.info("state loaded from redis", extra={"epoch": epoch, "seq": last_seq, "prefix": self.prefix})

    def _served(self, epoch: str, seq: int) -> None:
        if epoch != self._served_epoch:
            self._served_epoch, self._served_seq = epoch, seq
        else:
            self._served_seq = max(self._served_seq, seq)

    async def _newest_answers(self, client: Any) -> list[list[Any]]:
        """The idempotency answers within the TTL, the newest the cache can hold (its
        capacity), oldest first."""
        state = self._state
        assert state is not None
        cache = state.idempotency
        index = self._key("idempotency_at")
        if not await client.exists(index) and await client.hlen(self._key("idempotency")):
            await self._index_answers(client)
        oldest = state.clock() - cache.ttl
        keys = await client.zrevrangebyscore(index, "+inf", f"({oldest!r}", start=0, num=cache.capacity)
        answers: list[list[Any]] = []
        for start in range(0, len(keys), 10_000):
            chunk = keys[start : start + 10_000]
            answers.extend(json.loads(body) for body in await client.hmget(self._key("idempotency"), chunk) if body)
        answers.reverse()
        return answers

    async def _index_answers(self, client: Any) -> None:
        """Answers stored before they were indexed by time: indexed now, once."""
        async for key, body in client.hscan_iter(self._key("idempotency"), count=1000):
            await client.zadd(self._key("idempotency_at"), {key: float(json.loads(body)[4])})

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
        self._tasks = [
            asyncio.create_task(self._flush_loop()),
            asyncio.create_task(self._listen()),
            asyncio.create_task(self._release_abandoned()),
        ]

    async def _catch_up(self) -> None:
        """Take in every event other replicas appended (under the local lock, with
        nothing staged: this replica does not hold the lease, or just took it)."""
        state = self._state
        assert state is not None
        client = self._redis()
        durable = self._durable_seq  # as of the read (a batch of this replica's may land meanwhile)
        if not self._stale:
            with self._redis_errors():
                async with client.pipeline(transaction=False) as pipe:
                    pipe.mget(self._key("epoch"), self._key("seq"))
                    pipe.xrange(self._key("events"), min=f"{self._durable_seq + 1}-0")
                    (epoch, seq), entries = await pipe.execute()
            # Redis lost or replaced the history (restarted without its data, say).
            self._stale = epoch is None or epoch.decode() != state.epoch or int(seq or 0) < durable
        if self._stale:
            await self._reload("the state was reloaded from the store; resubscribe with since_seq")
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
            self._served(state.epoch, event.seq)

    async def _reload(self, reason: str) -> None:
        """Replace the state by Redis's (under _local); writes decided here and not yet
        appended are refused (a batch in flight ends first)."""
        assert self._state is not None
        epoch = self._state.epoch
        async with self._append_lock:
            if self._staged or self._waiters:
                self._staged.clear()
                self._refuse(self._durable_seq, "the state was reloaded from the store; the write was not recorded")
            await self._load(self._redis())
        # Subscribers resume from the new state: in a new epoch they start over.
        self._state.log.close_all(reason if epoch == self._state.epoch else "the history restarted in a new epoch")

    async def _follow(self) -> None:
        """Apply other replicas' events as they are appended, so subscribers here see them."""
        backoff = 0.05
        while not self._closing:
            try:
                assert self._state is not None
                await self._redis().xread(
                    {self._key("events"): f"{self._durable_seq}-0"}, block=FOLLOW_BLOCK_MS, count=1
                )
                if self._closing:
                    return
                if self._lease is None or self._stale:
                    async with self._deadline(), self._local:
                        if self._lease is None or self._stale:
                            await self._catch_up()
                backoff = 0.05
            except (StoreUnavailable, RedisError, OSError) as error:
                log.warning("following the redis log failed; retrying", extra={"error": str(error)})
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)

    async def fresh(self) -> None:
        if self._lease is not None and not self._stale:
            return  # nothing is appended but by this replica
        async with self._deadline():
            self._queued += 1
            try:
                await self._local.acquire()
            finally:
                self._queued -= 1
            try:
                if self._lease is None or self._stale:
                    await self._catch_up()
            finally:
                self._local.release()

    # -- the lease ------------------------------------------------------------------

    async def _listen(self) -> None:
        """Hand-over messages: the token the lease was given to, or '' when it was freed."""
        channel = self._key("lease_handover")
        while not self._closing:
            pubsub = self._redis().pubsub()
            try:
                await pubsub.subscribe(channel)
                while not self._closing:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=FOLLOW_BLOCK_MS / 1000)
                    if message is not None:
                        self._handed_to = message["data"]
                        self._lease_changed.set()
            except (RedisError, OSError) as error:
                log.debug("the lease channel failed; listening again", extra={"error": str(error)})
                await asyncio.sleep(LEASE_POLL)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    async def _obtain_lease(self) -> None:
        """Wait until this replica holds the lease (one request for every writer here)."""
        if self._lease_wait is None:
            self._lease_wait = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._request_lease(self._lease_wait))
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)
        await asyncio.shield(self._lease_wait)

    async def _request_lease(self, done: asyncio.Future[str]) -> None:
        client = self._redis()
        # Who holds the lease shows in Redis (`GET <prefix>:lease`): host and process.
        token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"
        keys = (self._key("lease"), self._key("lease_queue"), self._key("lease_waiting"), self._key("seq"))
        changed = self._lease_changed
        handed = f"{token} ".encode()
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                changed.clear()
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        held = await client.eval(ACQUIRE, 4, *keys, token, LEASE_TTL_MS, WAITER_TTL_MS)
                except TimeoutError:
                    raise StoreUnavailable(
                        f"the Redis store did not answer within {self.timeout:g} s (COLLAB_STORE_TIMEOUT)"
                    ) from None
                if held is not None:
                    self._lease_seq = int(held)
                    break
                if self._handed_to.startswith(handed):
                    self._lease_seq = int(self._handed_to[len(handed) :])
                    break  # handed over while the script ran
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailable("the Redis write lease stayed taken; try again")
                # Woken by a hand-over or a release, else checking again after LEASE_POLL.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(LEASE_POLL, left)):
                        await changed.wait()
                if self._handed_to.startswith(handed):
                    self._lease_seq = int(self._handed_to[len(handed) :])
                    break  # the hand-over names this token: the lease is ours without asking
        except (RedisError, OSError, StoreUnavailable, asyncio.CancelledError) as error:
            self._abandon(token)  # released once Redis answers (it may have set it)
            self._lease_wait = None
            if not done.done():
                done.set_exception(error if isinstance(error, StoreUnavailable) else _unavailable(error))
                done.exception()  # retrieved: no writer may be waiting for it
            if isinstance(error, asyncio.CancelledError):
                raise
            return
        self._lease = token
        self._lease_wait = None
        self._handing_over = False
        self._lease_taken = perf_counter()
        self._needs_catch_up = self._lease_seq != self._durable_seq
        done.set_result(token)
        self._wakeup.set()  # the flusher frees the lease if no writer came for it (they gave up)

    async def _release_abandoned(self) -> None:
        """Free leases requested by calls that gave up (a hung Redis): Redis may set one
        when it answers again, and nobody would use it until its TTL ran out. A token is
        watched for one lease TTL after Redis first answers again."""
        client = self._redis()
        keys = (
            self._key("lease"), self._key("lease_queue"), self._key("lease_waiting"),
            self._key("lease_handover"), self._key("seq"),
        )  # fmt: skip
        while not self._closing:
            await asyncio.sleep(LEASE_POLL if self._abandoned else 0.5)
            now = time.monotonic()
            for token, answered_at in list(self._abandoned.items()):
                try:
                    async with asyncio.timeout(self.timeout):
                        released = await client.eval(RELEASE, 5, *keys, token, LEASE_TTL_MS)
                except (RedisError, OSError, TimeoutError):
                    continue
                if released or (answered_at and now - answered_at > LEASE_TTL_MS / 1000):
                    del self._abandoned[token]
                elif not answered_at:
                    self._abandoned[token] = now

    async def _release_lease(self) -> None:
        """Give the lease to the next waiter, or free it (under _local, nothing staged)."""
        token, self._lease = self._lease, None
        self._handing_over = False
        if token is None:
            return
        keys = (
            self._key("lease"), self._key("lease_queue"), self._key("lease_waiting"),
            self._key("lease_handover"), self._key("seq"),
        )  # fmt: skip
        try:
            async with asyncio.timeout(self.timeout):
                await self._redis().eval(RELEASE, 5, *keys, token, LEASE_TTL_MS)
        except (RedisError, OSError, TimeoutError):
            self._abandon(token)

    def _abandon(self, token: str) -> None:
        self._abandoned[token] = 0.0
        while len(self._abandoned) > MAX_ABANDONED:
            del self._abandoned[next(iter(self._abandoned))]

    # -- writing --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        async with self._deadline():
            # Counted from here: a lease just taken is not freed while writers here wait for it.
            self._queued += 1
            try:
                while True:
                    if self._handing_over:
                        await self._await_release()
                        continue
                    if self._lease is None:
                        await self._obtain_lease()
                    await self._local.acquire()
                    if self._lease is not None and not self._handing_over:
                        break
                    self._local.release()
            finally:
                self._queued -= 1
            try:
                # Other replicas appended since this replica last took in the log.
                if self._stale or self._needs_catch_up:
                    await self._catch_up()
                    self._needs_catch_up = False
            except BaseException:
                self._local.release()
                raise
        state = self._state
        assert state is not None
        try:
            yield
        except BaseException:
            # Failed with the state perhaps changed here: that change is not in Redis,
            # so the state is reloaded before it is used again.
            if self._events or self._answers:
                self._stale = True
                self._events.clear()
                self._answers.clear()
            raise
        else:
            self._stage()
        finally:
            self._local.release()
            self._wakeup.set()  # to append what was staged, or to free the lease

    async def _await_release(self) -> None:
        changed = self._lease_changed
        while self._handing_over:
            changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LEASE_POLL):
                    await changed.wait()

    def _stage(self) -> None:
        """Encode what the write decided, with the state changes as they are now."""
        events, self._events[:] = list(self._events), []
        answers, self._answers = self._answers, {}
        for event in events:
            payload = encode(event.payload)  # once: in the log entry and in the state's hash
            body = f'{{"kind":{dumps(event.kind.value)},"time":{dumps(event.time)},"payload":{payload}}}'
            fields = answers.pop(event.seq, [])
            self._staged.append(_Staged(event.seq, body, fields, self._ops(event, fields, payload)))
        if answers:
            # Answers of writes that appended nothing: stored with the batch's changes.
            leftover = [entry for entries in answers.values() for entry in entries]
            if self._staged:
                self._staged[-1].ops.extend(self._answer_ops(leftover))
            else:
                self._staged.append(_Staged(0, "", [], self._answer_ops(leftover)))

    async def _flush_loop(self) -> None:
        busy = False  # writes were staged while the last batch was in flight
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if busy:
                await self._gather()
            try:
                await self._flush()
            except Exception:
                log.exception("the redis append loop failed")
                self._stale = True
            busy = bool(self._staged)
            if busy:
                self._wakeup.set()

    async def _gather(self) -> None:
        """Group commit: a batch costs Redis and this process about as much for one write
        as for dozens, so while writes keep coming (they came during the last batch) the
        next batch waits for more: while they keep arriving (none for GATHER_QUIET: go),
        at most GATHER_DELAY, or MAX_BATCH events. A write after a quiet spell goes at once."""
        deadline = perf_counter() + GATHER_DELAY
        staged = len(self._staged)
        while staged < MAX_BATCH and (left := deadline - perf_counter()) > 0:
            await asyncio.sleep(min(GATHER_QUIET, left))
            if len(self._staged) == staged and not self._queued:
                return
            staged = len(self._staged)

    async def _flush(self) -> None:
        batch, self._staged = self._staged[:MAX_BATCH], self._staged[MAX_BATCH:]
        token = self._lease
        state = self._state
        assert state is not None
        if batch and token is None:  # the lease was lost with these staged (a reload): refused
            self._refuse(self._durable_seq, "the write lease was lost; the write was not recorded")
            return
        failure: BaseException | None = None
        if batch:
            events = [entry for entry in batch if entry.seq]
            async with self._append_lock:
                last = events[-1].seq if events else self._durable_seq
                args: list[Any] = [
                    token, str(self._durable_seq), str(last), LEASE_TTL_MS,
                    repr(state.clock() - state.idempotency.ttl), PRUNE_PER_BATCH, self.retain, len(events),
                ]  # fmt: skip
                for entry in events:
                    args += [entry.seq, entry.body, dumps(entry.answers)]
                args.append(orjson.dumps([op for entry in batch for op in entry.ops]).decode())
                names = ("lease", "seq", "events", "idempotency", "idempotency_at", "lease_waiting")
                keys = [self._key(name) for name in names]
                started = perf_counter()
                try:
                    waiting = await self._redis().eval(APPEND, len(keys), *keys, *args)
                except (RedisError, OSError, asyncio.CancelledError) as error:
                    task = asyncio.current_task()
                    if isinstance(error, asyncio.CancelledError) and task is not None and task.cancelling():
                        raise  # the store closes
                    metrics.commit_failed("redis")
                    failure = error
                else:
                    self.batches += 1
                    metrics.committed("redis", perf_counter() - started, len(events))
                    self._durable_seq = last
                    self._served(state.epoch, last)
                    state.log.publish_through(last)
                    self._release_waiters(lambda seq: seq <= last, None)
                    if waiting and not self._handing_over and perf_counter() - self._lease_taken >= LEASE_HOLD:
                        self._handing_over = True  # no new write decides here; the staged ones go first
            if failure is not None:
                await self._failed(failure)
                return
        if token is not None and not self._staged and (self._handing_over or not self._queued):
            async with self._local:
                if not self._staged and self._lease == token and (self._handing_over or not self._queued):
                    await self._release_lease()
            self._lease_changed.set()

    async def _failed(self, error: BaseException) -> None:
        """Refuse the batch and every write decided after it; reload from Redis."""
        message = f"the Redis store could not write ({error}); the write was not recorded"
        self._stale = True  # no write decides on this state until it is reloaded
        log.error("append failed; reloading the state from redis", extra={"error": str(error)})
        self._staged.clear()
        self._refuse(self._durable_seq, message)
        async with self._local:
            self._staged.clear()
            self._stale = True
            await self._release_lease()
            with contextlib.suppress(StoreUnavailable, RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self.timeout):
                    await self._reload("the store failed; resubscribe with since_seq set to the last seq received")
        self._lease_changed.set()

    def _refuse(self, durable: int, message: str) -> None:
        self._failure_marks.append(durable)
        self._release_waiters(lambda seq: seq > durable, StoreUnavailable(message))

    def _release_waiters(self, ready: Callable[[int], bool], error: BaseException | None) -> None:
        self._waiters = release_waiters(self._waiters, ready, error)

    def _answer_ops(self, answers: list[list[Any]]) -> list[list[Any]]:
        ops: list[list[Any]] = []
        for method, idem_key, *rest in answers:
            field_name = f"{method}\x00{idem_key}"
            ops.append(["HSET", self._key("idempotency"), field_name, dumps([method, idem_key, *rest])])
            ops.append(["ZADD", self._key("idempotency_at"), rest[2], field_name])
        return ops

    def _ops(self, event: Event, answers: list[list[Any]], payload_json: str) -> list[list[Any]]:
        """The state changes of ``event``, as Redis commands (full JSON of what changed;
        ``payload_json`` is the event's payload's)."""
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
                ["HSET", key("activity"), payload.activity_id, payload_json],
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
        elif isinstance(payload, ActivityLink):
            # Its state when linked: the events before it included (they are written in order).
            ops.append(["HSET", key("activity"), payload.activity_id, encode(payload.activity)])
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
        ops += self._answer_ops(answers)
        return ops

    async def query_activities(self, query: ActivityQuery, count: int) -> Found:
        """From this replica's state (caught up by the caller's ``fresh``): the newest
        ``history_limit`` activities and every open one, as the memory store. Redis keeps
        more (``retain``) only as bodies in a hash without the indexes a search needs, so
        older activities are not searched; the SQLite store searches its whole retention."""
        if self._state is None:
            return Found([])
        return query_held(self._state.held_activities(), query, count)

    async def read_activities(self, ids: Sequence[str]) -> list[Activity]:
        """The activities among ``ids`` in Redis's activity hash (which keeps every body,
        in its latest state), as of the last append (Store)."""
        check_read_count(ids)
        if not ids:
            return []
        wanted = list(dict.fromkeys(ids))
        with self._redis_errors():
            async with self._deadline():
                bodies = await self._redis().hmget(self._key("activity"), wanted)
        return [decode_activity(json.loads(body)) for body in bodies if body]

    async def durable(self, seq: int) -> None:
        """Return once every change up to ``seq`` is appended; StoreUnavailable if it was
        refused, or not known within ``timeout``."""
        if seq <= self._durable_seq:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, waiter))
        self._wakeup.set()
        try:
            async with self._deadline():
                await asyncio.shield(waiter)
        finally:
            if not waiter.done():
                waiter.cancel()
            self._waiters = [(s, w) for s, w in self._waiters if w is not waiter]

    async def close(self) -> None:
        # What is staged goes out first, by the append loop (writers are waiting for it);
        # at most the store's timeout (a hung Redis).
        give_up = perf_counter() + self.timeout
        while (self._staged or self._append_lock.locked()) and perf_counter() < give_up:
            self._wakeup.set()
            await asyncio.sleep(0.01)
        self._closing = True
        if self._lease is not None:
            await self._release_lease()
        for task in self._tasks:
            task.cancel()
        follower = self._follower
        if follower is not None:
            # The read in flight ends within FOLLOW_BLOCK_MS; cancelled only past that (a hung Redis).
            await asyncio.wait({follower}, timeout=2 * FOLLOW_BLOCK_MS / 1000)
            if not follower.done():
                follower.cancel()
                await asyncio.wait({follower}, timeout=FOLLOW_BLOCK_MS / 1000)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=FOLLOW_BLOCK_MS / 1000)
        if self._client is not None:
            await self._client.aclose()


def _agent_fields(body: bytes) -> tuple[str, str | None, float]:
    # [department, last_activity_id, last_seen]; without last_seen when written before
    # agents had a lifecycle.
    department, last_activity_id, *rest = json.loads(body)
    return department, last_activity_id, float(rest[0]) if rest else 0.0


def _decode_entry(epoch: str, entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
    try:
        body = orjson.loads(fields[b"e"])
    except orjson.JSONDecodeError:  # what orjson does not read (an integer beyond 64 bits)
        body = json.loads(fields[b"e"])
    kind = EventKind(body["kind"])
    seq = int(entry_id.decode().split("-", 1)[0])
    return Event(seq, epoch, body["time"], kind, decode_payload_data(kind, body["payload"]))
