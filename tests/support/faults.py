"""What the fault, soak and shutdown tests share: browsers that reconnect and resume as
clients/js/collab.js does, agents that write through a fault as the SDK does, and the
checks made after every fault (every acknowledged write present exactly once, every
resuming client gap-free)."""

from __future__ import annotations

import abc
import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlencode

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bench.memory import rss_kb
from bridge.upstream import Backoff
from collab import AsyncClient, Unavailable
from tests.support.processes import BridgeProcess, ServerProcess
from tests.support.rpc import WRITE_KEY, Client, all_events, head_seq
from tests.support.stack import API, AUTH

__all__ = [
    "Agent",
    "Browser",
    "RestAgent",
    "Writer",
    "assert_every_write_once",
    "assert_gap_free",
    "follow_to_the_end",
    "kill_all",
    "last_seq",
    "rss_mb",
    "until_connected",
]

# The close codes after which clients/js/collab.js stops instead of reconnecting.
FATAL_CLOSE_CODES = frozenset({4400, 4401, 4403})
# No close frame at all (the bridge was killed): what browsers report as 1006.
ABNORMAL_CLOSURE = 1006


def kill_all(*processes: ServerProcess | BridgeProcess) -> None:
    """SIGKILL whatever still runs: a test's clean-up, whatever state it failed in."""
    for process in processes:
        if process.process is not None and process.process.poll() is None:
            process.kill()


async def last_seq(target: str) -> int:
    """The seq of the newest event the server at ``target`` has."""
    client = Client.connect(target)
    try:
        return await head_seq(client)
    finally:
        await client.close()


def rss_mb(pid: int, *, peak: bool = False) -> float:
    """Resident memory of a process now (or its peak so far), in MB."""
    return rss_kb(pid, "VmHWM" if peak else "VmRSS") / 1024


class Browser:
    """A browser following the hub over WebSocket the way clients/js/collab.js does:
    after any disconnect but a refusal of its request (4400/4401/4403) it reconnects
    with backoff and jitter and resumes with ``?since=<last seq>&epoch=<epoch>``; given
    several bridges it moves on to the next one, as behind a load balancer. It records
    the seq of every event it receives, so a test can check that it got each one, in
    order, once."""

    def __init__(self, bridges: Sequence[str], client_id: str, *, token: str = WRITE_KEY) -> None:
        self.bridges = list(bridges)  # ws:// URLs of the endpoint, without a query
        self.client_id = client_id
        self.token = token
        self.epoch = ""
        self.start_seq: int | None = None  # the seq of the first collaboration_state
        self.seqs: list[int] = []
        self.resumes = 0  # reconnections the bridge filled (recovered: true)
        self.closes: list[int] = []  # the close code of each connection that ended
        self.refusals: list[int] = []  # the code of each connection attempt refused
        self.gaps: list[str] = []  # each time the hub said it could not fill a gap
        self.until: int | None = None  # done once every event up to this seq is in
        self._bridge = 0
        self._ws: ClientConnection | None = None

    @property
    def last_seq(self) -> int:
        return self.seqs[-1] if self.seqs else (self.start_seq or 0)

    @property
    def done(self) -> bool:
        return self.until is not None and self.start_seq is not None and self.last_seq >= self.until

    @property
    def connected(self) -> bool:
        return self._ws is not None

    def url(self) -> str:
        query = {"client_id": self.client_id, "token": self.token}
        if self.epoch:
            query |= {"since": str(self.last_seq), "epoch": self.epoch}
        return f"{self.bridges[self._bridge]}?{urlencode(query)}"

    async def follow(self, within: float = 60.0) -> None:
        """Stay connected (reconnecting as needed) until ``until`` is reached."""
        deadline = time.monotonic() + within
        backoff = Backoff(initial=0.05, maximum=1.0)
        while not self.done:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.client_id}: not done within {within} s; {self.summary()}")
            try:
                # max_queue=None: messages it no longer reads, once done, never hold up its close.
                async with connect(self.url(), open_timeout=5, close_timeout=2, max_size=None, max_queue=None) as ws:
                    self._ws = ws
                    if await self._open(ws):
                        backoff.reset()
                        await self._read(ws, deadline)
            except ConnectionClosed as closed:
                self.closes.append(closed.rcvd.code if closed.rcvd else ABNORMAL_CLOSURE)
            except (OSError, TimeoutError, InvalidHandshake):
                pass  # the bridge is down or not listening yet: try again
            finally:
                self._ws = None
            if not self.done:
                self._bridge = (self._bridge + 1) % len(self.bridges)
                await asyncio.sleep(backoff.delay())

    async def drop(self) -> None:
        """Go away for a moment (a laptop lid, a flaky network): close the connection;
        ``follow`` reconnects and resumes."""
        if self._ws is not None:
            await self._ws.close()

    async def _open(self, ws: ClientConnection) -> bool:
        """Read the opening; False if the bridge refused the connection."""
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if first["type"] == "error":
            self.refusals.append(first["code"])
            assert first["code"] not in FATAL_CLOSE_CODES, f"{self.client_id} refused: {first}"
            return False
        assert first["type"] == "connection_established", first
        if self.epoch:
            if first["recovered"]:
                self.resumes += 1
                return True
            self.gaps.append(f"not recovered: {first.get('reason')}")
        state = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert state["type"] == "collaboration_state", state
        self._restart(state)
        return True

    def _restart(self, state: dict[str, Any]) -> None:
        """Start from a state: the first, or one the hub sent because it could not resume
        this client (then the check that follows fails on the gap it recorded)."""
        self.epoch = state["epoch"]
        if self.start_seq is None:
            self.start_seq = state["seq"]
        else:
            self.seqs.append(state["seq"])

    async def _read(self, ws: ClientConnection, deadline: float) -> None:
        while not self.done and time.monotonic() < deadline:
            try:
                message = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
            except TimeoutError:
                continue  # look at ``done`` again: the test may have set ``until``
            if message["type"] == "collaboration_state":
                self.gaps.append("reset: a fresh state replaced the events in between")
                self._restart(message)
            elif "seq" in message:
                self.seqs.append(message["seq"])

    def summary(self) -> str:
        return (
            f"start {self.start_seq}, {len(self.seqs)} events, last {self.last_seq}, until {self.until}, "
            f"{self.resumes} resumes, closes {self.closes}, refusals {self.refusals}, gaps {self.gaps}"
        )


async def until_connected(browsers: Iterable[Browser], within: float = 20.0) -> None:
    """Until every browser has its opening state and is connected."""
    waiting = list(browsers)
    deadline = time.monotonic() + within
    while not all(b.connected and b.start_seq is not None for b in waiting):
        assert time.monotonic() < deadline, [b.summary() for b in waiting if not b.connected]
        await asyncio.sleep(0.05)


async def follow_to_the_end(browsers: Iterable[Browser], tasks: Iterable[asyncio.Task[None]], last_seq: int) -> None:
    """Tell every browser the seq of the last event and wait until each has it all."""
    for browser in browsers:
        browser.until = last_seq
    await asyncio.gather(*tasks)


def assert_gap_free(browsers: Iterable[Browser], last_seq: int) -> None:
    """Each browser received every event after its opening state up to ``last_seq``,
    in order, each once, and was never told of a gap."""
    for browser in browsers:
        assert browser.start_seq is not None, f"{browser.client_id} never opened"
        assert not browser.gaps, f"{browser.client_id}: {browser.summary()}"
        expected = list(range(browser.start_seq + 1, last_seq + 1))
        if browser.seqs != expected:
            missing = sorted(set(expected) - set(browser.seqs))
            repeated = sorted(seq for seq, n in Counter(browser.seqs).items() if n > 1)
            disordered = next(
                (i for i, (a, b) in enumerate(zip(browser.seqs, browser.seqs[1:], strict=False)) if b <= a), None
            )
            raise AssertionError(
                f"{browser.client_id}: {len(missing)} missing (first {missing[:5]}), repeated {repeated[:5]}, "
                f"out of order at index {disordered}; {browser.summary()}"
            )


class Writer(abc.ABC):
    """An agent that records activities one after another until told to stop. Each write
    has its own idempotency key and is retried with that key while the hub cannot be
    reached (as the SDK does), so a write in flight at a fault ends up recorded once, and
    acknowledged, whatever happened to the first attempt."""

    def __init__(self, agent_id: str, *, pause: float = 0.0) -> None:
        self.agent_id = agent_id
        self.pause = pause  # seconds between writes: paces the load
        self.acknowledged: list[str] = []
        self.retries = 0
        self.errors: Counter[str] = Counter()  # what the failed attempts said

    @abc.abstractmethod
    async def attempt(self, key: str) -> str | None:
        """One try: the activity id, or None when the hub could not be reached."""

    async def write_until(self, stop: asyncio.Event, within: float = 60.0) -> None:
        """Write until ``stop`` is set (or ``within`` seconds have passed); a write begun
        is seen through to its acknowledgement."""
        deadline = time.monotonic() + within
        while not stop.is_set() and time.monotonic() < deadline:
            key = f"{self.agent_id}-{len(self.acknowledged)}"
            give_up = time.monotonic() + within
            while (activity_id := await self.attempt(key)) is None:
                self.retries += 1
                assert time.monotonic() < give_up, f"{self.agent_id}: write {key} not acknowledged in {within} s"
                await asyncio.sleep(0.05)
            self.acknowledged.append(activity_id)
            await asyncio.sleep(self.pause)


class Agent(Writer):
    """Writes over gRPC with the Python SDK (its own retries off: this class retries, and
    counts them)."""

    def __init__(self, target: str, agent_id: str, *, pause: float = 0.0) -> None:
        super().__init__(agent_id, pause=pause)
        self.hub = AsyncClient(target, WRITE_KEY, timeout=3, retries=0)

    async def attempt(self, key: str) -> str | None:
        try:
            return await self.hub.record_activity(
                self.agent_id, "memory_write", department="engineering", idempotency_key=key
            )
        except Unavailable as failure:
            self.errors[str(failure)] += 1
            return None

    async def write_until(self, stop: asyncio.Event, within: float = 60.0) -> None:
        try:
            await super().write_until(stop, within)
        finally:
            await self.hub.close()


class RestAgent(Writer):
    """Writes over REST through a bridge, with the ``Idempotency-Key`` header; retried
    when the bridge cannot be reached or answers 503 (the server unreachable)."""

    def __init__(self, bridge_http: str, agent_id: str, *, pause: float = 0.0) -> None:
        super().__init__(agent_id, pause=pause)
        self.bridge_http = bridge_http
        self.statuses: Counter[int] = Counter()

    async def attempt(self, key: str) -> str | None:
        body = {"agent_id": self.agent_id, "activity_type": "memory_write", "department": "engineering"}
        try:
            async with httpx.AsyncClient(base_url=self.bridge_http, headers=AUTH, timeout=5) as http:
                response = await http.post(f"{API}/record-activity", json=body, headers={"Idempotency-Key": key})
        except httpx.TransportError:
            return None
        self.statuses[response.status_code] += 1
        if response.status_code == 503:
            self.errors[response.json()["detail"]] += 1
            return None
        assert response.status_code == 200, response.text
        activity_id: str = response.json()["activity_id"]
        return activity_id


async def assert_every_write_once(target: str, epoch: str, writers: Iterable[Writer]) -> int:
    """Every acknowledged write is in the server's log, once, and nothing else of these
    agents is (every write was retried until acknowledged); the number found."""
    client = Client.connect(target)
    try:
        events = await all_events(client, epoch)
    finally:
        await client.close()
    recorded: dict[str, list[str]] = {}
    for event in events:
        if event.WhichOneof("payload") == "activity_recorded":
            activity = event.activity_recorded
            recorded.setdefault(activity.agent_id, []).append(activity.activity_id)
    found = 0
    for writer in writers:
        mine = recorded.get(writer.agent_id, [])
        assert sorted(mine) == sorted(writer.acknowledged), (
            f"{writer.agent_id}: {len(writer.acknowledged)} acknowledged, {len(mine)} recorded, "
            f"{len(set(writer.acknowledged) - set(mine))} acknowledged but missing"
        )
        found += len(mine)
    return found
