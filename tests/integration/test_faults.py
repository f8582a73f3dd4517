"""Faults with real processes, each bounded in time: kill -9 of the bridge and of the
server in the middle of writes and streams, browsers that never read, browsers that
connect and disconnect in a tight loop, and the disk full under the SQLite store.

After each fault: every acknowledged write is present (exactly once: writes are retried
with their idempotency key until acknowledged), and every browser that resumed received
every event, in order, with no gap and no duplicate. Each test prints its counts."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from bench.wsclient import WebSocketClient
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.faults import (
    Agent,
    Browser,
    RestAgent,
    Writer,
    assert_every_write_once,
    assert_gap_free,
    follow_to_the_end,
    kill_all,
    last_seq,
    rss_mb,
    until_connected,
)
from tests.support.processes import BridgeProcess, ServerProcess
from tests.support.rpc import WRITE_KEY, Client, activity, head_seq
from tests.support.stack import API, AUTH, BRIDGE_ENV, SERVER_ENV, Stack, wait_ready
from tests.support.stalled import StalledClient
from tests.support.tight_store import MAX_PAGES_VARIABLE, ROOM_SIGNAL

pytestmark = pytest.mark.integration


async def test_kill_9_of_a_bridge_in_the_middle_of_writes_and_streams(tmp_path: Path) -> None:
    """Bridge A is killed (no close frames, no drain) while agents write over gRPC and over
    REST (through bridge B, and through A itself: those retry until A is back), and while
    browsers stream from A. A restarts on the same port; its browsers reconnect to it
    with since/epoch. The restarted A no longer buffers what they missed: it fetches
    that from the server."""
    server = ServerProcess(tmp_path / "server", env=SERVER_ENV).start()
    bridge_a = BridgeProcess(server.target, data_dir=tmp_path / "a", env=BRIDGE_ENV).start()
    bridge_b = BridgeProcess(server.target, data_dir=tmp_path / "b", env=BRIDGE_ENV).start()
    try:
        for bridge in (bridge_a, bridge_b):
            await asyncio.to_thread(wait_ready, Stack(server, bridge))
        on_a = [Browser([bridge_a.ws], f"a{n}") for n in range(12)]
        on_b = [Browser([bridge_b.ws], f"b{n}") for n in range(4)]
        browsers = on_a + on_b
        following = [asyncio.create_task(b.follow()) for b in browsers]
        await until_connected(browsers)

        writers = [
            *(Agent(server.target, f"grpc_agent_{n}", pause=0.01) for n in range(3)),
            RestAgent(bridge_b.http, "rest_agent_via_b", pause=0.01),
            RestAgent(bridge_a.http, "rest_agent_via_a", pause=0.01),
        ]
        stop = asyncio.Event()
        writing = [asyncio.create_task(w.write_until(stop)) for w in writers]
        await asyncio.sleep(1.0)
        killed_at = await last_seq(server.target)
        await asyncio.to_thread(bridge_a.kill)
        await asyncio.sleep(0.5)  # writes go on; A's browsers and A's REST agent retry meanwhile
        bridge_a = await asyncio.to_thread(bridge_a.start, bridge_a.port)
        # A browser that comes back the moment A listens again, before A's upstream has
        # caught up with the server, is resumed too (it waits for the upstream).
        resume = f"{bridge_a.ws}?token={WRITE_KEY}&since={killed_at}&epoch={server.epoch}"
        # max_queue=None: what it is sent but does not read must not hold up its close.
        async with connect(resume, max_queue=None) as early:
            assert json.loads(await early.recv())["recovered"] is True
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*writing), 30)
        last = await last_seq(server.target)
        await asyncio.wait_for(follow_to_the_end(browsers, following, last), 60)

        assert killed_at > 0 and last > killed_at + 50, (killed_at, last)
        assert_gap_free(browsers, last)
        assert all(b.resumes >= 1 and 1006 in b.closes for b in on_a), [b.summary() for b in on_a]
        assert all(b.resumes == 0 and not b.closes for b in on_b), [b.summary() for b in on_b]
        assert writers[-1].retries > 0, "the REST agent on A wrote through the fault"
        found = await assert_every_write_once(server.target, server.epoch, writers)
        acknowledged = sum(len(w.acknowledged) for w in writers)
        assert found == acknowledged
        received = sum(len(b.seqs) for b in browsers)
        print(
            f"\nbridge kill -9: 1 fault, writes acknowledged {acknowledged}, found {found}, "
            f"retried {sum(w.retries for w in writers)}; events {last} (killed at seq {killed_at}); "
            f"browsers {len(browsers)} ({len(on_a)} resumed on the restarted bridge), "
            f"events received {received} of {sum(last - (b.start_seq or 0) for b in browsers)} expected"
        )
    finally:
        kill_all(bridge_a, bridge_b, server)


async def test_kill_9_of_the_server_while_browsers_stream_from_two_bridges(tmp_path: Path) -> None:
    """What test_durability's kill -9 leaves out: the browsers' view, and writes in flight.
    Browsers on two bridges stay connected through the outage; others drop their
    connection while the server is down and keep being refused (1013) until it is back.
    Agents retry with the same idempotency key through the outage: a write the server
    committed but could not answer is not recorded twice."""
    server = ServerProcess(tmp_path / "server", env=SERVER_ENV).start()
    bridges = [BridgeProcess(server.target, data_dir=tmp_path / f"b{n}", env=BRIDGE_ENV).start() for n in range(2)]
    try:
        for bridge in bridges:
            await asyncio.to_thread(wait_ready, Stack(server, bridge))
        browsers = [Browser([bridges[n % 2].ws], f"browser_{n}") for n in range(12)]
        following = [asyncio.create_task(b.follow()) for b in browsers]
        await until_connected(browsers)
        writers: list[Writer] = [Agent(server.target, f"agent_{n}", pause=0.01) for n in range(4)]
        writers.append(RestAgent(bridges[0].http, "rest_agent", pause=0.01))
        stop = asyncio.Event()
        writing = [asyncio.create_task(w.write_until(stop)) for w in writers]
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.kill)  # SIGKILL: no drain, no flush
        away = browsers[:4]
        await asyncio.gather(*(b.drop() for b in away))
        await asyncio.sleep(1.0)  # the dropped browsers are refused meanwhile: the server is down
        server = await asyncio.to_thread(ServerProcess(tmp_path / "server", env=SERVER_ENV).start, server.port)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*writing), 30)
        last = await last_seq(server.target)
        await asyncio.wait_for(follow_to_the_end(browsers, following, last), 60)

        assert_gap_free(browsers, last)
        assert all(1013 in b.refusals and b.resumes >= 1 for b in away), [b.summary() for b in away]
        stayed = browsers[4:]
        assert all(not b.closes and b.resumes == 0 for b in stayed), [b.summary() for b in stayed]
        assert all(w.retries > 0 for w in writers), "every agent wrote through the outage"
        found = await assert_every_write_once(server.target, server.epoch, writers)
        acknowledged = sum(len(w.acknowledged) for w in writers)
        received = sum(len(b.seqs) for b in browsers)
        print(
            f"\nserver kill -9: 1 fault, writes acknowledged {acknowledged}, found {found} (each once), "
            f"retried {sum(w.retries for w in writers)}; events {last}; browsers {len(browsers)} on 2 bridges "
            f"({len(away)} away during the outage, refused {sum(len(b.refusals) for b in away)} times), "
            f"events received {received} of {sum(last - (b.start_seq or 0) for b in browsers)} expected"
        )
    finally:
        kill_all(*bridges, server)


STALLED_CLIENTS = 20
FLOOD = 1500  # events of 16 KB: 24 MB for each client that reads them all
# Bridge memory allowed to grow (peak, VmHWM) while 20 clients stall through the flood.
# Measured: ~5 MB. Buffering what each stalled client is sent would take 20 x 24 MB; a
# backlog without bound would keep the flood's 24 MB alive. The socket's flow control
# and the 64-message backlog (COLLAB_CLIENT_BACKLOG in BRIDGE_ENV) bound it.
STALLED_GROWTH_BOUND_MB = 15.0


async def bulk_record(client: Client, agent_id: str, count: int, blob: str) -> None:
    """``count`` activities over one BulkRecordActivities stream, each ~len(blob) bytes."""
    requests = []
    for n in range(count):
        request = activity(agent_id, pb.ACTIVITY_TYPE_MESSAGE_SENT)
        request.metadata.update({"n": n, "blob": blob})
        requests.append(pb.BulkRecordActivitiesRequest(activity=request))
    response = await client.stub.BulkRecordActivities(iter(requests), metadata=client.metadata, timeout=60)
    assert response.recorded == count, response


async def test_browsers_that_never_read_cost_the_bridge_bounded_memory(tmp_path: Path) -> None:
    """The 4008 cut-off is in test_bridge; this adds its memory. Twenty browsers stop
    reading while 1,500 events of 16 KB go out; a healthy browser gets every event."""
    server = ServerProcess(tmp_path / "server", env=SERVER_ENV).start()
    # A small resume buffer, full after the warm-up, so that it does not count as growth.
    bridge_env = {**BRIDGE_ENV, "COLLAB_EVENT_BUFFER": "200"}
    bridge = BridgeProcess(server.target, data_dir=tmp_path / "bridge", env=bridge_env).start()
    assert bridge.process is not None
    stalled: list[StalledClient] = []
    client = Client.connect(server.target)
    try:
        await asyncio.to_thread(wait_ready, Stack(server, bridge))
        healthy = Browser([bridge.ws], "healthy")
        following = asyncio.create_task(healthy.follow())
        blob = "x" * 16_000
        await bulk_record(client, "warm_up", 300, blob)  # fills the buffer and the allocator's pools
        await asyncio.sleep(0.5)
        before = rss_mb(bridge.process.pid)
        stalled = [
            StalledClient(f"{bridge.ws}?client_id=stalled{n}&token={WRITE_KEY}", bridge.port)
            for n in range(STALLED_CLIENTS)
        ]
        await asyncio.sleep(0.5)  # their opening messages are written; they read nothing more
        await bulk_record(client, "flood", FLOOD, blob)
        last = await head_seq(client)
        await asyncio.wait_for(follow_to_the_end([healthy], [following], last), 60)
        peak = rss_mb(bridge.process.pid, peak=True)
        after = rss_mb(bridge.process.pid)

        closes = await asyncio.gather(*(asyncio.to_thread(s.read_until_closed) for s in stalled))
        assert all(close.code == 4008 for _, close in closes), [close for _, close in closes]
        assert all(texts < FLOOD for texts, _ in closes), [texts for texts, _ in closes]
        assert_gap_free([healthy], last)
        assert peak - before < STALLED_GROWTH_BOUND_MB, (before, peak, after)
        print(
            f"\nstalled browsers: {STALLED_CLIENTS} stalled, each cut off with 4008 after "
            f"{min(t for t, _ in closes)}-{max(t for t, _ in closes)} of {FLOOD} messages; healthy browser "
            f"received {len(healthy.seqs)} of {last - (healthy.start_seq or 0)}; bridge RSS {before:.1f} MB before, "
            f"peak {peak:.1f} MB, {after:.1f} MB after (bound: +{STALLED_GROWTH_BOUND_MB:.0f} MB)"
        )
    finally:
        for socket in stalled:
            socket.close()
        await client.close()
        kill_all(bridge, server)


CYCLES = 500
# Bridge RSS allowed to grow from after the first 50 cycles to after the last. Measured: ~1 MB.
FLAPPING_GROWTH_BOUND_MB = 10.0


async def _gauge(url: str, name: str) -> float:
    """One unlabelled sample of a Prometheus scrape."""
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(url)
    assert response.status_code == 200, response.text
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    raise AssertionError(f"no {name} in {url}")


async def _settles(read: Callable[[], Awaitable[float]], wanted: float, within: float = 10.0) -> float:
    """Read until the value is ``wanted`` (a count catching up with closes); the last value."""
    deadline = time.monotonic() + within
    while True:
        value = await read()
        if value == wanted or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


async def _flap(kind: int, url: str, port: int) -> None:
    """One connect-disconnect cycle, of five kinds: a clean close after the opening; a
    close right after the handshake; a reset once accepted; a reset before the bridge
    answers the handshake; a TCP connection with no request at all."""
    if kind == 0:
        async with connect(url) as ws:
            await ws.recv()
            await ws.recv()
    elif kind == 1:
        async with connect(url):
            pass
    elif kind == 2:
        client = await WebSocketClient.connect("127.0.0.1", port, url.split(str(port), 1)[1])
        client.abort()
    else:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        if kind == 3:
            writer.write(b"GET " + url.split(str(port), 1)[1].encode() + b" HTTP/1.1\r\nHost: x\r\n")
            writer.write(b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n")
            writer.write(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            await writer.drain()
            writer.transport.abort()
        else:
            writer.close()
            await writer.wait_closed()


async def test_a_client_connecting_and_disconnecting_in_a_tight_loop_leaks_nothing(tmp_path: Path) -> None:
    """500 connect/disconnect cycles of five kinds while a browser streams and an agent
    writes: the bridge stays up, its connection count and the server's subscriptions come
    back to what they were, its memory stays flat, and the browser gets every event."""
    server = ServerProcess(tmp_path / "server", env=SERVER_ENV).start()
    bridge = BridgeProcess(server.target, data_dir=tmp_path / "bridge", env=BRIDGE_ENV).start()
    assert bridge.process is not None
    try:
        await asyncio.to_thread(wait_ready, Stack(server, bridge))
        healthy = Browser([bridge.ws], "healthy")
        following = asyncio.create_task(healthy.follow())
        await until_connected([healthy])

        async def clients() -> float:
            async with httpx.AsyncClient(timeout=10) as http:
                return float((await http.get(f"{bridge.http}/readyz")).json()["clients"])

        async def subscribers() -> float:
            return await _gauge(server.metrics_url, "collab_stream_subscribers")

        baseline = await subscribers()
        agent = Agent(server.target, "steady_agent", pause=0.02)
        stop = asyncio.Event()
        writing = asyncio.create_task(agent.write_until(stop))
        url = f"{bridge.ws}?client_id=flapper&token={WRITE_KEY}"
        started = time.monotonic()
        warm = 0.0
        for cycle in range(CYCLES):
            await asyncio.wait_for(_flap(cycle % 5, url, bridge.port), 10)
            if cycle == 49:
                await _settles(clients, 1)
                warm = rss_mb(bridge.process.pid)
        flapping = time.monotonic() - started
        assert bridge.process.poll() is None
        assert await _settles(clients, 1) == 1, "the healthy browser is the only connection left"
        assert await _settles(subscribers, baseline) == baseline, "no server subscription left behind"
        grown = rss_mb(bridge.process.pid) - warm
        stop.set()
        await asyncio.wait_for(writing, 30)
        last = await last_seq(server.target)
        await asyncio.wait_for(follow_to_the_end([healthy], [following], last), 30)

        assert grown < FLAPPING_GROWTH_BOUND_MB, grown
        assert_gap_free([healthy], last)
        print(
            f"\nconnect/disconnect loop: {CYCLES} cycles (5 kinds) in {flapping:.1f} s; bridge connections back to 1, "
            f"server subscriptions back to {baseline:.0f}; bridge RSS +{grown:.1f} MB after warm-up "
            f"(bound {FLAPPING_GROWTH_BOUND_MB:.0f}); healthy browser received {len(healthy.seqs)} of "
            f"{last - (healthy.start_seq or 0)} events, {len(agent.acknowledged)} writes acknowledged"
        )
    finally:
        kill_all(bridge, server)


class TightServer(ServerProcess):
    """collab-server through tests/support/tight_store.py: its SQLite file fills up."""

    def argv(self, port: int) -> list[str]:
        python, _, _, *rest = super().argv(port)
        return [python, "-m", "tests.support.tight_store", *rest]


@dataclass
class FullDisk:
    """A data directory that fills up, and how to make room in it again."""

    how: str
    data_dir: Path
    server_class: type[ServerProcess]
    env: dict[str, str]

    def make_room(self, server: ServerProcess) -> None:
        if self.how == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=64m", str(self.data_dir)], check=True, timeout=30)
        else:
            assert server.process is not None
            server.process.send_signal(ROOM_SIGNAL)


@pytest.fixture(params=["tmpfs", "max_page_count"])
def full_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FullDisk]:
    """A 1 MB tmpfs where the machine lets the test mount one (root); everywhere, SQLite's
    page limit, which fails the same way (SQLITE_FULL) without privileges."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if request.param == "max_page_count":
        yield FullDisk("max_page_count", data_dir, TightServer, {MAX_PAGES_VARIABLE: "60"})
        return
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the max_page_count variant covers this machine")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(data_dir)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield FullDisk("tmpfs", data_dir, ServerProcess, {})
    finally:
        subprocess.run(["umount", "-l", str(data_dir)], check=False, timeout=30)


async def test_a_full_disk_refuses_writes_clearly_keeps_reads_and_loses_nothing(
    tmp_path: Path, full_disk: FullDisk
) -> None:
    """Agents write (gRPC and REST) until the store is full: their writes are refused
    with UNAVAILABLE / 503 saying the disk is full (they retry with the same idempotency
    key), reads and streams keep working, and once there is room again the retries
    succeed. After a restart every acknowledged write is there, once."""
    env = {**SERVER_ENV, **full_disk.env}
    server = full_disk.server_class(full_disk.data_dir, env=env).start()
    bridge = BridgeProcess(server.target, data_dir=tmp_path / "bridge", env=BRIDGE_ENV).start()
    try:
        await asyncio.to_thread(wait_ready, Stack(server, bridge))
        browser = Browser([bridge.ws], "watcher")
        following = [asyncio.create_task(browser.follow())]
        await until_connected([browser])
        rest = RestAgent(bridge.http, "rest_agent")
        writers: list[Writer] = [Agent(server.target, f"agent_{n}") for n in range(2)]
        writers.append(rest)
        stop = asyncio.Event()
        writing = [asyncio.create_task(w.write_until(stop)) for w in writers]
        deadline = time.monotonic() + 30
        while not all(w.retries >= 5 for w in writers):  # every writer stuck on a full disk
            assert time.monotonic() < deadline, [(w.agent_id, len(w.acknowledged), w.retries) for w in writers]
            await asyncio.sleep(0.05)
        before_room = sum(len(w.acknowledged) for w in writers)
        for writer in writers:
            assert any("database or disk is full" in error for error in writer.errors), writer.errors
        assert rest.statuses[503] >= 5 and set(rest.statuses) <= {200, 503}

        # Reads keep working: gRPC, REST, and a browser opening now.
        acknowledged_ids = {activity_id for w in writers for activity_id in w.acknowledged}
        client = Client.connect(server.target)
        try:
            status = await client.stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=client.metadata)
            assert status.agent_status.active_activities >= before_room
        finally:
            await client.close()
        async with httpx.AsyncClient(base_url=bridge.http, headers=AUTH, timeout=10) as http:
            feed = await http.get(f"{API}/activity-feed", params={"limit": 500})
        assert feed.status_code == 200
        assert acknowledged_ids <= {activity["activity_id"] for activity in feed.json()["activities"]}
        late = Browser([bridge.ws], "late")
        following.append(asyncio.create_task(late.follow()))
        await until_connected([late])

        full_disk.make_room(server)
        await asyncio.sleep(1.0)  # the retries go through; writes go on
        stop.set()
        await asyncio.wait_for(asyncio.gather(*writing), 30)
        last = await last_seq(server.target)
        await asyncio.wait_for(follow_to_the_end([browser, late], following, last), 30)
        assert_gap_free([browser, late], last)

        assert await asyncio.to_thread(server.stop) == 0
        server = await asyncio.to_thread(full_disk.server_class(full_disk.data_dir, env=env).start, server.port)
        found = await assert_every_write_once(server.target, server.epoch, writers)
        acknowledged = sum(len(w.acknowledged) for w in writers)
        assert found == acknowledged > before_room
        print(
            f"\ndisk full ({full_disk.how}): writes acknowledged {before_room} before the disk filled, "
            f"{acknowledged} in all, found {found} after a restart; refused while full "
            f"{sum(w.retries for w in writers)} (REST 503: {rest.statuses[503]}); "
            f"browser received {len(browser.seqs)} of {last - (browser.start_seq or 0)} events"
        )
    finally:
        kill_all(bridge, server)
