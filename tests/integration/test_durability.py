"""The SQLite store with real processes: kill -9 in the middle of writes loses nothing
acknowledged, a graceful restart continues the same history, bad files are refused."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from websockets.asyncio.client import connect

from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.processes import BridgeProcess, ServerProcess
from tests.support.rpc import WRITE_KEY, Client, activity, all_events, head_seq
from tests.support.stack import BRIDGE_ENV, SERVER_ENV, Stack, opened, recv, recv_until, wait_ready

pytestmark = pytest.mark.integration


async def test_kill_9_in_the_middle_of_writes_loses_nothing_acknowledged(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server", env=SERVER_ENV).start()
    bridge = BridgeProcess(server.target, data_dir=tmp_path / "bridge", env=BRIDGE_ENV).start()
    stack = Stack(server, bridge)
    try:
        await asyncio.to_thread(wait_ready, stack)
        acknowledged: dict[str, int] = {}
        refused = 0

        async def writer(name: str) -> None:
            nonlocal refused
            client = Client.connect(server.target)
            try:
                while True:
                    try:
                        response = await client.stub.RecordActivity(activity(name), metadata=client.metadata, timeout=5)
                    except grpc.aio.AioRpcError as error:
                        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                        refused += 1
                        return
                    acknowledged[response.activity_id] = 1
            finally:
                await client.close()

        async with connect(stack.ws_url(client_id="watcher")) as ws:
            established, _ = await opened(ws)
            await ws.send(json.dumps({"type": "subscribe", "activity_types": ["agent_activity"]}))
            await recv_until(ws, lambda m: m["type"] == "subscribed")
            writers = [asyncio.create_task(writer(f"writer_{n}")) for n in range(4)]
            await asyncio.sleep(1.0)
            await asyncio.to_thread(server.kill)  # SIGKILL: no shutdown, no flush
            await asyncio.wait_for(asyncio.gather(*writers), 20)
            assert len(acknowledged) > 20 and refused == 4

            restarted = await asyncio.to_thread(ServerProcess(tmp_path / "server", env=SERVER_ENV).start, server.port)
            stack.server = restarted
            assert restarted.epoch == established["epoch"], "the history continues: same epoch"
            client = Client.connect(restarted.target)
            try:
                for activity_id in acknowledged:
                    got = await client.stub.GetActivity(
                        pb.GetActivityRequest(activity_id=activity_id), metadata=client.metadata
                    )
                    assert got.activity.activity_id == activity_id
                # Nothing half-present: an activity exists exactly when its event does.
                events = await all_events(client, restarted.epoch)
                seqs = [event.seq for event in events]
                assert seqs == list(range(1, len(seqs) + 1))
                recorded = {event.activity_recorded.activity_id for event in events}
                assert set(acknowledged) <= recorded
                status = await client.stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=client.metadata)
                assert status.agent_status.active_activities == len(recorded)
                # seq continues where the file stopped.
                after = await client.stub.RecordActivity(activity("after_restart"), metadata=client.metadata)
                assert (await head_seq(client)) == seqs[-1] + 1
            finally:
                await client.close()

            # The watcher stayed connected; the bridge resumed its upstream, so it has every
            # event, in order, with no gap and no duplicate.
            received: list[dict[str, object]] = []
            while not received or received[-1]["activity"]["activity_id"] != after.activity_id:  # type: ignore[index]
                message = await recv(ws, 20)
                if message["type"] == "agent_activity":
                    received.append(message)
            assert [m["seq"] for m in received] == list(range(established["seq"] + 1, seqs[-1] + 2))
            assert set(acknowledged) <= {m["activity"]["activity_id"] for m in received}  # type: ignore[index]

        # A client that was away resumes from an early seq and gets the rest.
        async with connect(stack.ws_url(since=5, epoch=established["epoch"])) as ws:
            resumed = await recv(ws)
            assert resumed["recovered"] is True
            replay = [await recv_until(ws, lambda m: "seq" in m) for _ in range(seqs[-1] + 1 - 5)]
            assert [m["seq"] for m in replay] == list(range(6, seqs[-1] + 2))
    finally:
        for process in (stack.bridge, stack.server):
            if process.process is not None and process.process.poll() is None:
                process.kill()


async def test_a_graceful_restart_keeps_the_epoch_and_the_state(tmp_path: Path) -> None:
    data = tmp_path / "server"
    with ServerProcess(data, env=SERVER_ENV) as first:
        client = Client.connect(first.target)
        try:
            started = await client.stub.StartCollaboration(
                pb.StartCollaborationRequest(participants=["a", "b"]), metadata=client.metadata
            )
            open_id = await client.record("a", session_id=started.session_id)
            keyed = await client.stub.RecordActivity(activity("b", idempotency_key="k1"), metadata=client.metadata)
        finally:
            await client.close()
        assert first.stop() == 0
    with ServerProcess(data, env=SERVER_ENV) as second:
        assert second.epoch == first.epoch
        client = Client.connect(second.target)
        try:
            got = await client.stub.GetActivity(pb.GetActivityRequest(activity_id=open_id), metadata=client.metadata)
            assert got.activity.status == pb.ACTIVITY_STATUS_ACTIVE
            detail = await client.stub.GetCollaboration(
                pb.GetCollaborationRequest(session_id=started.session_id), metadata=client.metadata
            )
            assert detail.session.activity_count == 1
            again = await client.stub.RecordActivity(activity("b", idempotency_key="k1"), metadata=client.metadata)
            assert again == keyed, "an idempotent retry after a restart records nothing new"
            await client.stub.CompleteActivity(
                pb.CompleteActivityRequest(activity_id=open_id, success=True), metadata=client.metadata
            )
            assert await head_seq(client) == 4
        finally:
            await client.close()


def run_server(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collab_grpc.server", "--grpc-addr", "127.0.0.1:0", "--data-dir", str(data_dir)],
        env={**os.environ, "COLLAB_API_KEYS": WRITE_KEY},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_corrupted_or_foreign_file_is_refused_at_start(tmp_path: Path) -> None:
    corrupted = tmp_path / "corrupted"
    corrupted.mkdir()
    garbage = b"this is not a database" * 100
    (corrupted / "collab.db").write_bytes(garbage)
    result = run_server(corrupted)
    assert result.returncode != 0 and "cannot be read as a collab store" in result.stderr, result.stderr
    assert (corrupted / "collab.db").read_bytes() == garbage

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with sqlite3.connect(foreign / "collab.db") as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    result = run_server(foreign)
    assert result.returncode != 0 and "is not a collab store" in result.stderr, result.stderr


async def test_memory_store_is_there_for_throwaway_runs(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, env={**SERVER_ENV, "COLLAB_STORE": "memory"}) as server:
        client = Client.connect(server.target)
        try:
            assert await client.record("a")
        finally:
            await client.close()
    assert not (tmp_path / "collab.db").exists()
