"""Memory: bridge RSS per idle WebSocket connection, and server RSS with a long history."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import grpc

from bench.fanout import TOKEN, HubTarget, _stop, start_server
from bench.ingest import _activity
from bench.wsclient import WebSocketClient
from collab_grpc.eventloop import run
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc

__all__ = ["MemoryResult", "bridge_memory", "server_memory"]


@dataclass
class MemoryResult:
    what: str
    count: int
    rss_before_kb: int
    rss_after_kb: int

    @property
    def per_item_kb(self) -> float:
        return (self.rss_after_kb - self.rss_before_kb) / self.count if self.count else 0.0


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """The process's resident memory now, or ``field="VmHWM"``: its peak so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


async def _hold(port: int, path: str, clients: int, control: Connection) -> None:
    connections = []
    tasks = []
    for index in range(clients):
        client = await WebSocketClient.connect("127.0.0.1", port, path.format(index=index))
        connections.append(client)
        tasks.append(asyncio.create_task(client.run(lambda payload: None)))
    await asyncio.sleep(1.0)
    control.send("connected")
    await asyncio.get_running_loop().run_in_executor(None, control.recv)
    for client in connections:
        client.close()


def _hold_process(port: int, path: str, clients: int, control: Connection) -> None:
    run(_hold(port, path, clients, control))


def bridge_memory(workdir: Path, clients: int, processes: int = 2) -> MemoryResult:
    """Bridge RSS with ``clients`` idle connections (opened, state received, then quiet)."""
    target = HubTarget(workdir)
    port, path = target.start()
    context = multiprocessing.get_context("spawn")
    try:
        time.sleep(1.0)
        before = rss_kb(target.bridge.pid)
        pipes, workers = [], []
        for n in range(processes):
            parent, child = context.Pipe()
            share = clients // processes + (1 if n < clients % processes else 0)
            worker = context.Process(target=_hold_process, args=(port, path, share, child))
            worker.start()
            pipes.append(parent)
            workers.append(worker)
        for pipe in pipes:
            pipe.poll(180)
            pipe.recv()
        time.sleep(1.0)
        after = rss_kb(target.bridge.pid)
        for pipe in pipes:
            pipe.send("done")
        for worker in workers:
            worker.join(20)
        return MemoryResult("bridge, per idle WebSocket connection", clients, before, after)
    finally:
        target.stop()


def server_memory(workdir: Path, activities: int) -> MemoryResult:
    """Server RSS after recording ``activities`` (all kept: history limit raised to match)."""
    server, target = start_server(workdir / "rss", COLLAB_HISTORY_LIMIT=str(activities))
    try:
        time.sleep(0.5)
        before = rss_kb(server.pid)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.CollaborationServiceStub(channel)
            auth = (("authorization", f"Bearer {TOKEN}"),)
            for start in range(0, activities, 10_000):
                batch = (
                    pb.BulkRecordActivitiesRequest(activity=_activity(n))
                    for n in range(start, min(activities, start + 10_000))
                )
                stub.BulkRecordActivities(batch, metadata=auth, timeout=300)
        after = rss_kb(server.pid)
        return MemoryResult("server, per activity of history", activities, before, after)
    finally:
        _stop(server)
