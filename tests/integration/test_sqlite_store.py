"""The SQLite store from the outside (real processes): what a subscriber saw survives
kill -9, a start after a crash of the machine tells every browser to start over,
a restarted server resumes from everything its file keeps, retention keeps the file at
its limits under a burst and once writes stop, and a full disk refuses no snapshot."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from collab_grpc.store.sqlite import FILE_NAME
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.integration.test_faults import TightServer
from tests.support.faults import (
    Agent,
    Browser,
    assert_every_write_once,
    assert_gap_free,
    follow_to_the_end,
    kill_all,
    last_seq,
    until_connected,
)
from tests.support.processes import BridgeProcess, ServerProcess
from tests.support.rpc import Client, activity, all_events
from tests.support.stack import BRIDGE_ENV, SERVER_ENV, Stack, wait_ready
from tests.support.tight_store import MAX_PAGES_VARIABLE

pytestmark = pytest.mark.integration


class RebootedServer(ServerProcess):
    """collab-server as started after its machine crashed (tests/support/rebooted.py)."""

    def argv(self, port: int) -> list[str]:
        python, _, _, *rest = super().argv(port)
        return [python, "-m", "tests.support.rebooted", *rest]


def file_query(data_dir: Path, sql: str) -> list[tuple[object, ...]]:
    """Read the store's file beside the running server (WAL: a reader never blocks it)."""
    connection = sqlite3.connect(f"file:{data_dir / FILE_NAME}?mode=ro", uri=True, timeout=10)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


async def bulk_record(target: str, count: int, agent_id: str = "bulk_agent") -> None:
    """``count`` activities in one bulk stream, 100 a message."""
    client = Client.connect(target)
    try:
        messages = [
            pb.BulkRecordActivitiesRequest(activities=[activity(agent_id) for _ in range(min(100, count - start))])
            for start in range(0, count, 100)
        ]
        response = await client.stub.BulkRecordActivities(iter(messages), metadata=client.metadata, timeout=60)
        assert response.recorded == count and not response.incomplete, response
    finally:
        await client.close()


async def test_kill_9_under_load_keeps_every_acknowledged_write_and_every_event_a_browser_saw(tmp_path: Path) -> None:
    """Events reach browsers once committed, before the fsync that acknowledges them:
    after kill -9 (the machine stays up) the file has every event a browser saw and every
    acknowledged write, the history keeps its epoch, and browsers resume without a gap."""
    server = ServerProcess(tmp_path / "server", env=SERVER_ENV).start()
    bridge = BridgeProcess(server.target, data_dir=tmp_path / "bridge", env=BRIDGE_ENV).start()
    try:
        await asyncio.to_thread(wait_ready, Stack(server, bridge))
        browsers = [Browser([bridge.ws], f"watcher_{n}") for n in range(3)]
        following = [asyncio.create_task(browser.follow(within=90)) for browser in browsers]
        await until_connected(browsers)
        writers = [Agent(server.target, f"agent_{n}") for n in range(4)]
        stop = asyncio.Event()
        writing = [asyncio.create_task(writer.write_until(stop, within=90)) for writer in writers]
        while sum(len(w.acknowledged) for w in writers) < 200:  # noqa: ASYNC110 - polling the writers' counts
            await asyncio.sleep(0.05)
        await asyncio.to_thread(server.kill)  # SIGKILL mid-load: no shutdown, no flush
        seen_at_the_crash = max(browser.last_seq for browser in browsers)
        restarted = await asyncio.to_thread(ServerProcess(tmp_path / "server", env=SERVER_ENV).start, server.port)
        server = restarted
        assert restarted.epoch == browsers[0].epoch, "kill -9 takes back nothing: the history keeps its epoch"
        await asyncio.sleep(0.5)  # the writers retry and go on
        stop.set()
        await asyncio.wait_for(asyncio.gather(*writing), 60)
        last = await last_seq(restarted.target)
        assert last >= seen_at_the_crash
        await asyncio.wait_for(follow_to_the_end(browsers, following, last), 60)
        assert_gap_free(browsers, last)  # every event seen before the crash is in the file, in its place
        found = await assert_every_write_once(restarted.target, restarted.epoch, writers)
        print(
            f"\nkill -9 under load: {found} writes acknowledged and found; browsers had seq {seen_at_the_crash} "
            f"at the crash, the file {last} after the writers went on; resumes "
            f"{[browser.resumes for browser in browsers]}, no gap"
        )
    finally:
        kill_all(bridge, server)


async def test_a_start_after_a_crash_of_the_machine_begins_a_new_epoch_and_resets_browsers(tmp_path: Path) -> None:
    """A crash of the machine can lose what was committed but not yet fsynced, which
    browsers may have seen. Simulated: the file as it was some events before the crash
    (a consistent copy), started under another boot id. The server begins a new epoch,
    so a browser that saw the lost events is told to start over rather than keep them
    and drop the new events that reuse their seqs."""
    data_dir = tmp_path / "server"
    server = ServerProcess(data_dir, env=SERVER_ENV).start()
    bridge = BridgeProcess(server.target, data_dir=tmp_path / "bridge", env=BRIDGE_ENV).start()
    try:
        await asyncio.to_thread(wait_ready, Stack(server, bridge))
        browser = Browser([bridge.ws], "watcher")
        following = asyncio.create_task(browser.follow(within=90))
        await until_connected([browser])
        first_epoch = browser.epoch
        await bulk_record(server.target, 50, "before_the_copy")
        on_disk = tmp_path / "on_disk.db"  # what the disk held at the crash
        source = sqlite3.connect(data_dir / FILE_NAME)
        copy = sqlite3.connect(on_disk)
        try:
            source.backup(copy)
        finally:
            copy.close()
            source.close()
        await bulk_record(server.target, 30, "lost_in_the_crash")
        lost_through = await last_seq(server.target)
        deadline = time.monotonic() + 30
        while browser.last_seq < lost_through:  # the browser saw the events the crash loses
            assert time.monotonic() < deadline, browser.summary()
            await asyncio.sleep(0.05)
        seen_before = len(browser.seqs)
        await asyncio.to_thread(server.kill)
        for suffix in ("", "-wal", "-shm"):
            (data_dir / (FILE_NAME + suffix)).unlink(missing_ok=True)
        os.replace(on_disk, data_dir / FILE_NAME)
        os.chmod(data_dir / FILE_NAME, 0o600)

        server = await asyncio.to_thread(RebootedServer(data_dir, env=SERVER_ENV).start, server.port)
        assert server.epoch != first_epoch, "a start after a crash of the machine begins a new epoch"
        await bulk_record(server.target, 40, "after_the_crash")  # the seqs the lost events had
        last = await last_seq(server.target)
        assert last - 40 < lost_through, "the new epoch numbers its events from where the file stopped"
        browser.until = last
        await asyncio.wait_for(following, 60)
        assert browser.epoch == server.epoch
        assert browser.gaps, f"the browser was not told to start over: {browser.summary()}"
        # Its new state (the first seq after the crash), then every event after it, once each.
        since_the_crash = browser.seqs[seen_before:]
        assert since_the_crash == list(range(since_the_crash[0], last + 1)), browser.summary()
        client = Client.connect(server.target)
        try:
            agents = {event.activity_recorded.agent_id for event in await all_events(client, server.epoch)}
        finally:
            await client.close()
        assert agents == {"before_the_copy", "after_the_crash"}
    finally:
        kill_all(bridge, server)


async def test_a_restarted_server_resumes_from_everything_its_file_keeps(tmp_path: Path) -> None:
    """Memory keeps the newest 100 events for resumes; the file keeps them all. After
    kill -9, a subscriber 1,900 events behind resumes (recovered, every event in order),
    streamed from the file, and so does one with a filter."""
    env = {**SERVER_ENV, "COLLAB_EVENT_RETAIN": "100"}
    server = ServerProcess(tmp_path / "server", env=env).start()
    try:
        await bulk_record(server.target, 1_000, "first")
        await bulk_record(server.target, 1_000, "second")
        epoch = server.epoch
        await asyncio.to_thread(server.kill)
        server = await asyncio.to_thread(ServerProcess(tmp_path / "server", env=env).start, server.port)
        assert server.epoch == epoch
        client = Client.connect(server.target)
        try:
            for request, expected in (
                (pb.SubscribeEventsRequest(since_seq=100, epoch=epoch), list(range(101, 2_001))),
                (
                    pb.SubscribeEventsRequest(since_seq=500, epoch=epoch, agent_ids=["first"]),
                    list(range(501, 1_001)),
                ),
            ):
                stream = client.stub.SubscribeEvents(request, metadata=client.metadata)
                first = await asyncio.wait_for(stream.read(), 10)
                assert isinstance(first, pb.SubscribeEventsResponse)
                assert first.resume.recovered, first.resume.reason
                received: list[int] = []
                while len(received) < len(expected):
                    message = await asyncio.wait_for(stream.read(), 10)
                    assert isinstance(message, pb.SubscribeEventsResponse) and message.HasField("event"), message
                    received.append(message.event.seq)
                stream.cancel()
                assert received == expected
            # Older than the file keeps: not recovered, a fresh snapshot instead.
            ahead = client.stub.SubscribeEvents(
                pb.SubscribeEventsRequest(since_seq=0, epoch="another-epoch"), metadata=client.metadata
            )
            refused = await asyncio.wait_for(ahead.read(), 10)
            assert isinstance(refused, pb.SubscribeEventsResponse) and not refused.resume.recovered
            ahead.cancel()
        finally:
            await client.close()
    finally:
        kill_all(server)


async def test_retention_keeps_the_file_at_its_limits_under_a_burst_and_once_writes_stop(tmp_path: Path) -> None:
    """20,000 activities in bulk as fast as the server takes them, each expiring a second
    later (a completion event each): the events and completed activities in the file come
    down to the retention's count, without another write to trigger it, and the file
    stays within what that count needs."""
    data_dir = tmp_path / "server"
    env = {**SERVER_ENV, "COLLAB_RETAIN_COUNT": "2000", "COLLAB_ACTIVITY_TTL": "1"}
    server = ServerProcess(data_dir, env=env).start()
    try:
        for round_number in range(4):
            await bulk_record(server.target, 5_000, f"burst_{round_number}")
        deadline = time.monotonic() + 120
        while True:
            (open_count,) = file_query(data_dir, "SELECT count(*) FROM activities WHERE status = 'active'")[0]
            (events,) = file_query(data_dir, "SELECT count(*) FROM events")[0]
            (completed,) = file_query(data_dir, "SELECT count(*) FROM activities WHERE status != 'active'")[0]
            if open_count == 0 and events == 2_000 and completed == 2_000:
                break
            assert time.monotonic() < deadline, f"{events} events, {completed} completed, {open_count} open"
            await asyncio.sleep(0.5)
        newest = await last_seq(server.target)
        assert file_query(data_dir, "SELECT min(seq), max(seq) FROM events") == [(newest - 1_999, newest)]
        print("\nretention: 20,000 activities and their 20,000 expiries pruned to 2,000 events and 2,000 activities")
    finally:
        kill_all(server)


async def test_snapshots_are_served_while_the_disk_is_full(tmp_path: Path) -> None:
    """Writers keep retrying against a full disk (each retry a commit that fails and
    reloads the state); every snapshot subscription asked for meanwhile is served."""
    data_dir = tmp_path / "server"
    server = TightServer(data_dir, env={**SERVER_ENV, MAX_PAGES_VARIABLE: "60"}).start()
    try:
        writers = [Agent(server.target, f"agent_{n}") for n in range(3)]
        stop = asyncio.Event()
        writing = [asyncio.create_task(writer.write_until(stop, within=60)) for writer in writers]
        deadline = time.monotonic() + 30
        while not all(writer.retries >= 5 for writer in writers):  # every writer stuck on a full disk
            assert time.monotonic() < deadline, [(w.agent_id, len(w.acknowledged), w.retries) for w in writers]
            await asyncio.sleep(0.05)
        client = Client.connect(server.target)
        served = 0
        try:
            for _ in range(40):
                stream = client.stub.SubscribeEvents(
                    pb.SubscribeEventsRequest(include_snapshot=True), metadata=client.metadata
                )
                try:
                    first = await asyncio.wait_for(stream.read(), 10)
                except grpc.aio.AioRpcError as error:
                    raise AssertionError(f"a snapshot was refused during the full disk: {error.details()}") from None
                assert isinstance(first, pb.SubscribeEventsResponse) and first.HasField("snapshot"), first
                assert first.snapshot.agent_status.active_activities >= sum(len(w.acknowledged) for w in writers)
                served += 1
                stream.cancel()
                await asyncio.sleep(0.02)
        finally:
            await client.close()
        retries_meanwhile = sum(writer.retries for writer in writers)
        stop.set()
        for task in writing:
            task.cancel()
        await asyncio.gather(*writing, return_exceptions=True)
        assert served == 40
        print(f"\nfull disk: {served} snapshots served while writers were refused {retries_meanwhile} times")
    finally:
        kill_all(server)
