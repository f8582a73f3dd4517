"""Soak: agents writing at the rate limit while WebSocket clients follow, for a bounded time.

    python -m bench.soak --seconds 300 --clients 500 --agents 4

Starts `collab-server` (the default SQLite store, the default rate limit of 10 records per
agent per second) and `collab-bridge` (the default slow-client bound of 1,000 messages),
connects the clients from separate load processes (the minimal client of
``bench.wsclient``; no subscription: each gets every message), and runs the agents through
the Python SDK: each, at its rate limit, records an activity and completes the previous
one (two events per record). Meanwhile it samples the RSS of both processes every second.

At the end it checks, and prints: every client received every event after its opening
state, in seq order, each once (expected = received); no client was cut off (every
client still connected); the RSS of each process grew less than ``--rss-bound`` MB from
the sample at 25 % of the run to the highest one after it. Exit status 1 if a check fails.

What the hub keeps by count (``--retain``: the events of the server's log and of the
bridge's resume buffer, and the activities of the feed) is sized to fill during the first
quarter, so that the rest of the run measures steady state; the production defaults
(10,000 events, 1,000 activities) fill only after that many. One thing keeps growing by
design: the server's idempotency answers (every SDK write carries a key; ~0.6 KB each,
kept 24 h up to 100,000), about 0.05 MB/s at 4 agents, so 20 MB suits runs up to ~6 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc

from bench.fanout import TOKEN, _start, _stop, free_port, start_server
from bench.memory import rss_kb
from bench.wsclient import WebSocketClient
from collab import AsyncClient, RateLimited
from collab_grpc.eventloop import run
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc

__all__ = ["SoakResult", "main", "run_soak"]

# Messages that are not events: the opening (its state carries the seq to start after)
# and the periodic status, which has no seq.
_ESTABLISHED = b'{"type":"connection_established"'
_STATE = b'{"type":"collaboration_state"'
_STATUS = b'{"type":"agent_status_update"'
_SEQ = b'"seq":'


@dataclass
class ClientsReport:
    """What one load process saw, summed over its clients."""

    clients: int = 0
    opened: int = 0  # clients whose opening state arrived
    expected: int = 0  # events after each client's opening, up to the last one written
    received: int = 0
    out_of_order: int = 0  # events that were not the one after the previous (gap, repeat, reorder)
    cut_off: int = 0  # connections the bridge ended
    problems: list[str] = field(default_factory=list)  # the first few, for the report


class _Follower:
    """One client's position: every event must be the one after the previous."""

    def __init__(self, index: int, report: ClientsReport, all_opened: asyncio.Event) -> None:
        self.index = index
        self.report = report
        self.all_opened = all_opened
        self.start: int | None = None
        self.last = 0

    def on_text(self, payload: bytes) -> None:
        if payload.startswith(_STATE):
            state = json.loads(payload)
            if self.start is not None:  # a reset: the events in between are lost to it
                self._problem(f"client {self.index}: state (reset) at seq {state['seq']} after {self.last}")
            self.start = self.start if self.start is not None else state["seq"]
            self.last = state["seq"]
            self.report.opened += self.start == self.last
            if self.report.opened == self.report.clients:
                self.all_opened.set()
            return
        if payload.startswith((_ESTABLISHED, _STATUS)):
            return
        # Every event message ends with its seq: `...,"seq":123}` (bridge/mapping.py).
        seq = int(payload[payload.rindex(_SEQ) + len(_SEQ) : -1])
        if seq != self.last + 1:
            self._problem(f"client {self.index}: seq {seq} after {self.last}")
        self.last = seq
        self.report.received += 1

    def _problem(self, text: str) -> None:
        self.report.out_of_order += 1
        if len(self.report.problems) < 5:
            self.report.problems.append(text)


async def _follow(port: int, path: str, first: int, count: int, control: Connection) -> None:
    report = ClientsReport(clients=count)
    all_opened = asyncio.Event()
    followers = [_Follower(first + n, report, all_opened) for n in range(count)]
    clients = []
    tasks = []
    for follower in followers:
        client = await WebSocketClient.connect("127.0.0.1", port, path.format(index=follower.index))
        clients.append(client)
        tasks.append(asyncio.create_task(client.run(follower.on_text)))
    with contextlib.suppress(TimeoutError):  # the report says how many opened
        await asyncio.wait_for(all_opened.wait(), 60)
    control.send("ready")
    final: int = await asyncio.get_running_loop().run_in_executor(None, control.recv)
    deadline = time.monotonic() + 60  # to catch up with the last event, at most
    while time.monotonic() < deadline:
        if all(f.last >= final or task.done() for f, task in zip(followers, tasks, strict=True)):
            break
        await asyncio.sleep(0.1)
    report.cut_off = sum(task.done() for task in tasks)
    report.expected = sum(final - f.start for f in followers if f.start is not None)
    control.send(report)
    for client in clients:
        client.close()
    for task in tasks:
        task.cancel()


def _follow_process(port: int, path: str, first: int, count: int, control: Connection) -> None:
    run(_follow(port, path, first, count, control))


@dataclass
class AgentsReport:
    records: int = 0
    completions: int = 0
    rate_limited: int = 0


async def _agents(target: str, agents: int, rate: float, stop: asyncio.Event) -> AgentsReport:
    """Each agent, every 1/rate s: record an activity (a rate-limited write) and complete
    the one before (not rate-limited). The SDK gives each write an idempotency key."""
    report = AgentsReport()

    async def agent(hub: AsyncClient, name: str) -> None:
        previous = ""
        started = time.monotonic()
        tick = 0
        while not stop.is_set():
            tick += 1
            try:
                activity_id = await hub.record_activity(name, "memory_write", department="soak", metadata={"n": tick})
                report.records += 1
            except RateLimited as limited:
                report.rate_limited += 1
                await asyncio.sleep(limited.retry_after or 1 / rate)
                continue
            if previous:
                await hub.complete_activity(previous)
                report.completions += 1
            previous = activity_id
            await asyncio.sleep(max(0.0, started + tick / rate - time.monotonic()))

    async with AsyncClient(target, TOKEN) as hub:
        await asyncio.gather(*(agent(hub, f"soak_agent_{n}") for n in range(agents)))
    return report


async def _last_seq(target: str) -> int:
    """The seq of the newest event the server has stored (its snapshot's)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CollaborationServiceStub(channel)
        call = stub.SubscribeEvents(
            pb.SubscribeEventsRequest(include_snapshot=True), metadata=(("authorization", f"Bearer {TOKEN}"),)
        )
        first = await asyncio.wait_for(call.read(), 10)
        call.cancel()
    assert isinstance(first, pb.SubscribeEventsResponse) and first.HasField("snapshot"), first
    return first.snapshot.seq


@dataclass
class SoakResult:
    seconds: float
    clients: int
    agents: int
    rate: float
    events: int  # the seq of the last event written
    records: int
    completions: int
    rate_limited: int
    opened: int
    expected: int
    received: int
    out_of_order: int
    cut_off: int
    problems: list[str]
    samples: list[tuple[float, float, float]]  # (seconds into the run, server RSS MB, bridge RSS MB)

    def growth(self, column: int) -> float:
        """RSS growth (MB) from the sample at 25 % of the run to the highest one after it."""
        late = [sample for sample in self.samples if sample[0] >= self.seconds / 4]
        if not late:
            return 0.0
        return max(sample[column] for sample in late) - late[0][column]

    @property
    def server_growth(self) -> float:
        return self.growth(1)

    @property
    def bridge_growth(self) -> float:
        return self.growth(2)

    @property
    def lost(self) -> int:
        return self.expected - self.received

    def failures(self, rss_bound: float) -> list[str]:
        failed = []
        if self.opened != self.clients:
            failed.append(f"{self.clients - self.opened} clients never opened")
        if self.lost or self.out_of_order:
            failed.append(f"{self.lost} deliveries lost, {self.out_of_order} out of order: {self.problems}")
        if self.cut_off:
            failed.append(f"{self.cut_off} clients cut off")
        for name, grown in (("server", self.server_growth), ("bridge", self.bridge_growth)):
            if grown >= rss_bound:
                failed.append(f"{name} RSS grew {grown:.1f} MB after warm-up (bound {rss_bound} MB)")
        return failed

    def summary(self) -> str:
        every = max(1, len(self.samples) // 10)
        shown = ", ".join(f"{t:.0f}s {s:.0f}/{b:.0f}" for t, s, b in self.samples[::every])
        return (
            f"soak: {self.seconds:.0f} s, {self.clients} clients, {self.agents} agents at {self.rate:g}/s\n"
            f"  events sent {self.events} ({self.records} records, {self.completions} completions, "
            f"{self.rate_limited} refused by the rate limit)\n"
            f"  deliveries expected {self.expected}, received {self.received}, lost {self.lost}, "
            f"out of order {self.out_of_order}, clients cut off {self.cut_off}\n"
            f"  RSS MB (server/bridge): {shown}\n"
            f"  growth after 25 %: server {self.server_growth:+.1f} MB, bridge {self.bridge_growth:+.1f} MB"
        )


def _wait_ready(port: int, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("the bridge never became ready")


async def _drive(
    target: str, pids: tuple[int, int], seconds: float, agents: int, rate: float
) -> tuple[AgentsReport, list[tuple[float, float, float]], int]:
    stop = asyncio.Event()
    samples: list[tuple[float, float, float]] = []
    writing = asyncio.create_task(_agents(target, agents, rate, stop))
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        samples.append((elapsed, rss_kb(pids[0]) / 1024, rss_kb(pids[1]) / 1024))
        await asyncio.sleep(min(1.0, seconds - elapsed))
    stop.set()
    report = await asyncio.wait_for(writing, 30)
    samples.append((time.monotonic() - started, rss_kb(pids[0]) / 1024, rss_kb(pids[1]) / 1024))
    return report, samples, await _last_seq(target)


def run_soak(
    workdir: Path,
    *,
    seconds: float,
    clients: int,
    agents: int,
    rate: float = 10.0,
    retain: int = 1000,
    load_processes: int = 2,
) -> SoakResult:
    server, target = start_server(
        workdir / "server",
        COLLAB_STORE="sqlite",
        COLLAB_RATE_LIMIT=f"{rate:g}",
        COLLAB_EVENT_RETAIN=str(retain),
        COLLAB_HISTORY_LIMIT=str(retain),
    )
    port = free_port()
    bridge_argv = [sys.executable, "-m", "bridge.main", "--bridge-addr", f"127.0.0.1:{port}", "--grpc-target", target]
    bridge_env = {"COLLAB_UPSTREAM_TOKEN": TOKEN, "COLLAB_LOG_LEVEL": "warning", "COLLAB_EVENT_BUFFER": str(retain)}
    workers: list[Any] = []
    try:
        bridge = _start(bridge_argv, "listening on", bridge_env)
        try:
            _wait_ready(port)
            path = "/api/v1/collaboration/ws?client_id=soak{index}&token=" + TOKEN
            context = multiprocessing.get_context("spawn")
            pipes = []
            for n in range(load_processes):
                share = clients // load_processes + (1 if n < clients % load_processes else 0)
                parent, child = context.Pipe()
                first = sum(clients // load_processes + (1 if m < clients % load_processes else 0) for m in range(n))
                worker = context.Process(target=_follow_process, args=(port, path, first, share, child))
                worker.start()
                pipes.append(parent)
                workers.append(worker)
            for pipe in pipes:
                if not pipe.poll(120) or pipe.recv() != "ready":
                    raise RuntimeError("the load clients did not connect")
            agents_report, samples, events = run(_drive(target, (server.pid, bridge.pid), seconds, agents, rate))
            for pipe in pipes:
                pipe.send(events)
            reports: list[ClientsReport] = [pipe.recv() if pipe.poll(90) else ClientsReport() for pipe in pipes]
        finally:
            _stop(bridge)
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
        _stop(server)
    return SoakResult(
        seconds=seconds,
        clients=clients,
        agents=agents,
        rate=rate,
        events=events,
        records=agents_report.records,
        completions=agents_report.completions,
        rate_limited=agents_report.rate_limited,
        opened=sum(r.opened for r in reports),
        expected=sum(r.expected for r in reports),
        received=sum(r.received for r in reports),
        out_of_order=sum(r.out_of_order for r in reports),
        cut_off=sum(r.cut_off for r in reports),
        problems=[p for r in reports for p in r.problems][:10],
        samples=samples,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="how long the agents write (default 300)")
    parser.add_argument("--clients", type=int, default=500, help="WebSocket clients (default 500)")
    parser.add_argument("--agents", type=int, default=4, help="agents, each at the rate limit (default 4)")
    parser.add_argument("--rate", type=float, default=10.0, help="the per-agent rate limit, records/s (default 10)")
    parser.add_argument("--retain", type=int, default=1000, help="events the resume buffers keep (default 1000)")
    parser.add_argument("--rss-bound", type=float, default=20.0, help="RSS growth allowed after warm-up, MB")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.clients < 1 or args.agents < 1 or args.rate <= 0 or args.retain < 1:
        parser.error("--seconds, --rate must be positive; --clients, --agents, --retain at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        result = run_soak(
            Path(tmp),
            seconds=args.seconds,
            clients=args.clients,
            agents=args.agents,
            rate=args.rate,
            retain=args.retain,
        )
    print(result.summary())
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2))
    failed = result.failures(args.rss_bound)
    for failure in failed:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
