"""Fan-out: deliveries per second to N WebSocket clients, for the hub and its peers.

The same load clients (``bench.wsclient``, in separate processes) and the same JSON
message size for every target. The hub's events are recorded through gRPC (bulk
stream) and reach clients through the bridge with a subscription filter on and
slow-client protection on, as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc

from bench.wsclient import WebSocketClient
from collab_grpc.eventloop import run
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc

__all__ = ["FanoutResult", "run_fanout"]

TOKEN = "bench-token-not-a-secret"
# A delivery: the hub's and the peers' agent_activity messages (not the `subscribed` reply,
# which names agent_activity among its types).
MARKER = b'"type":"agent_activity"'
# The send time a paced message carries (in the hub's metadata, or the peers' JSON), found
# with bytes.find: a regex without a literal prefix scanned the hub's message, whose key
# comes late, at several times the cost of the peers', whose key comes first, and the
# clients' extra work showed as the hub's latency (docs/BENCHMARKS.md, 2026-12-07).
SENT_KEYS = (b'"sent":', b'\\"sent\\":')  # a socket.io event's JSON is a string in its JSON
NUMBER = re.compile(rb"[0-9.]+")
# When the hub recorded it (the activity's own timestamp, epoch seconds; the message's
# outer timestamp is an ISO string): splits a hub latency into ingest and fan-out.
RECORDED = re.compile(rb'"timestamp":([0-9]+\.[0-9]+)')


@dataclass
class FanoutResult:
    target: str
    clients: int
    messages: int
    delivered: int
    seconds: float
    cpu_seconds: float = 0.0  # used by the target's own processes meanwhile
    load_cpu_seconds: float = 0.0  # used by the load clients' processes meanwhile

    @property
    def deliveries_per_cpu_second(self) -> float:
        """Deliveries per second of one core fully used by the target."""
        return self.delivered / self.cpu_seconds if self.cpu_seconds else 0.0

    @property
    def cpu_us_per_delivery(self) -> float:
        return 1e6 * self.cpu_seconds / self.delivered if self.delivered else 0.0

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _start(
    argv: list[str], marker: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})}, cwd=cwd
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if marker in line:
            return process
        if not line and process.poll() is not None:
            break
    process.kill()
    raise RuntimeError(f"{' '.join(argv[:3])} did not start")


def start_server(data_dir: Path, code_dir: Path | None = None, **env: str) -> tuple[subprocess.Popen[str], str]:
    """`collab-server` for a benchmark on a free port (the bench token, no rate limit,
    the memory store unless ``env`` says otherwise); the process and its target.
    ``code_dir``: run the server of another checkout (its packages come first)."""
    port = free_port()
    settings = {
        "COLLAB_API_KEYS": TOKEN,
        "COLLAB_RATE_LIMIT": "0",
        "COLLAB_STORE": "memory",
        "COLLAB_LOG_LEVEL": "warning",
    }
    argv = [sys.executable, "-m", "collab_grpc.server", "--grpc-addr", f"127.0.0.1:{port}", "--data-dir", str(data_dir)]
    return _start(argv, "listening on", {**settings, **env}, code_dir), f"127.0.0.1:{port}"


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


# -- load processes ---------------------------------------------------------------------


def _sent_time(payload: bytes) -> float | None:
    for key in SENT_KEYS:
        at = payload.find(key)
        if at >= 0:
            number = NUMBER.match(payload, at + len(key))
            return float(number.group()) if number is not None else None
    return None


async def _load(host: str, port: int, path: str, kind: str, clients: int, control: Connection) -> None:
    counts = [0] * clients
    connections: list[WebSocketClient] = []
    last = [0.0]
    latencies: list[float] = []  # for messages that carry the time they were sent
    sent_times: list[float] = []  # each latency's message's sending time: which event it was
    after_record: list[float] = []  # the hub's part from its record to the receipt
    done = asyncio.Event()
    target = [0]

    def counter(index: int) -> Callable[[bytes], None]:
        def on_text(payload: bytes) -> None:
            if (kind == "socketio" and payload.startswith(b"42")) or (kind != "socketio" and MARKER in payload[:64]):
                counts[index] += 1
                last[0] = now = time.time()
                sent_time = _sent_time(payload)
                if sent_time is not None:
                    latencies.append(now - sent_time)
                    sent_times.append(sent_time)
                    # Read for every target (the peers' sample has one too), so that every
                    # target's clients do the same work a message.
                    recorded = RECORDED.search(payload)
                    if recorded is not None and kind == "hub":
                        after_record.append(now - float(recorded.group(1)))
                if target[0] and counts[index] == target[0] and all(c >= target[0] for c in counts):
                    done.set()
            elif kind == "socketio" and payload.startswith(b"0{"):
                connections[index].send_text("40")  # join the default namespace
            elif kind == "socketio" and payload == b"2":
                connections[index].send_text("3")

        return on_text

    tasks = []
    for index in range(clients):
        client = await WebSocketClient.connect(host, port, path.format(index=index))
        connections.append(client)
        if kind == "hub":
            client.send_text(json.dumps({"type": "subscribe", "activity_types": ["agent_activity"]}))
        tasks.append(asyncio.create_task(client.run(counter(index))))
    await asyncio.sleep(0.5)  # opening messages and subscriptions settle
    control.send("ready")
    target[0] = await asyncio.get_running_loop().run_in_executor(None, control.recv)
    # The trigger follows the count at once: on a loaded machine every message may be in
    # before this loop is back from the executor, when no arrival is left to set `done`
    # (the wait then ran to its 60 s end: the smoke run took 90 s instead of 30 s).
    if all(count >= target[0] for count in counts):
        done.set()
    cpu_before = time.process_time()
    with contextlib.suppress(TimeoutError):  # what arrived by then is reported; the rest counts as lost
        await asyncio.wait_for(done.wait(), 60)
    control.send((sum(counts), last[0], latencies, time.process_time() - cpu_before, after_record, sent_times))
    for client in connections:
        client.close()
    for task in tasks:
        task.cancel()


def _load_process(host: str, port: int, path: str, kind: str, clients: int, control: Connection) -> None:
    run(_load(host, port, path, kind, clients, control))


# -- targets ------------------------------------------------------------------------------


def sample_message() -> str:
    """An agent_activity message as the bridge sends it (~300 bytes), for the peers."""
    return json.dumps(
        {
            "type": "agent_activity",
            "activity": {
                "activity_id": "act_1795660000_agent_1_0123abcd",
                "agent_id": "agent_1",
                "department": "engineering",
                "activity_type": "memory_write",
                "timestamp": 1795660000.123456,
                "metadata": {"item_id": "item_123", "size_bytes": 1024},
                "related_agents": ["agent_2"],
                "status": "active",
            },
            "timestamp": "2026-11-26T12:00:00.123456+00:00",
            "seq": 1,
        },
        separators=(",", ":"),
    )


class HubTarget:
    kind = "hub"

    def __init__(
        self,
        workdir: Path,
        store: str = "memory",
        code_dir: Path | None = None,
        label: str = "",
        *,
        name: str | None = None,
        server_env: dict[str, str] | None = None,
        bridge_env: dict[str, str] | None = None,
        pipelined: bool = False,
    ) -> None:
        """``store``: the server's COLLAB_STORE (memory, or sqlite with its file in
        ``workdir``); ``code_dir``: the server of another checkout, named ``label``;
        ``server_env``/``bridge_env``: settings besides the bench's (coalescing...);
        ``pipelined``: how the paced recorder calls (see ``pace``)."""
        self.workdir = workdir
        self.store = store
        self.code_dir = code_dir
        default_name = "collab hub" if store == "memory" else f"collab hub ({store}{label and ', ' + label})"
        self.name = name or default_name + (" pipelined" if pipelined else "")
        self.server_env = server_env or {}
        self.bridge_env = bridge_env or {}
        self.pipelined = pipelined

    def start(self) -> tuple[int, str]:
        http_port = free_port()
        data_dir = Path(tempfile.mkdtemp(prefix="hub-", dir=self.workdir))  # a fresh file each run
        self.server, self.grpc_target = start_server(
            data_dir, self.code_dir, **{"COLLAB_STORE": self.store, **self.server_env}
        )
        env = {"COLLAB_LOG_LEVEL": "warning", **self.bridge_env}
        self.bridge = _start(
            [
                sys.executable,
                "-m",
                "bridge.main",
                "--bridge-addr",
                f"127.0.0.1:{http_port}",
                "--grpc-target",
                self.grpc_target,
            ],
            "listening on",
            # Every load client shares one token: no per-token connection cap here.
            {
                **env,
                "COLLAB_UPSTREAM_TOKEN": TOKEN,
                "COLLAB_CLIENT_BACKLOG": "100000",
                "COLLAB_MAX_CONNECTIONS_PER_TOKEN": "0",
                "COLLAB_MAX_CONNECTIONS": "20000",
            },
        )
        return http_port, "/api/v1/collaboration/ws?client_id=c{index}&token=" + TOKEN

    def trigger(self, count: int) -> None:
        with grpc.insecure_channel(self.grpc_target) as channel:
            stub = pb_grpc.CollaborationServiceStub(channel)
            metadata = pb.RecordActivityRequest().metadata
            metadata.update({"item_id": "item_123", "size_bytes": 1024})
            requests = (
                pb.BulkRecordActivitiesRequest(
                    activity=pb.RecordActivityRequest(
                        agent_id=f"agent_{n % 48}",
                        department="engineering",
                        activity_type=pb.ACTIVITY_TYPE_MEMORY_WRITE,
                        metadata=metadata,
                        related_agents=["agent_2"],
                    )
                )
                for n in range(count)
            )
            stub.BulkRecordActivities(requests, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=120)

    @property
    def pids(self) -> tuple[int, ...]:
        """The server, the bridge and its worker processes (``--workers``), if any."""
        return (self.server.pid, self.bridge.pid, *child_pids(self.bridge.pid))

    def pace(self, rate: int, count: int) -> None:
        """One RecordActivity every 1/rate s, each carrying the time it was due. By
        default each call waits for the previous one's answer (an agent's blocking
        call: a slow acknowledgement makes the next record late, and lateness counts);
        ``pipelined``, calls overlap as an asynchronous recorder's do, so each event's
        latency is its own path only."""
        with grpc.insecure_channel(self.grpc_target) as channel:
            stub = pb_grpc.CollaborationServiceStub(channel)
            auth = (("authorization", f"Bearer {TOKEN}"),)
            in_flight: list[grpc.Future[pb.RecordActivityResponse]] = []
            start, wall = time.monotonic(), time.time()
            for n in range(count):
                delay = start + n / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                request = pb.RecordActivityRequest(
                    agent_id=f"agent_{n % 48}", department="engineering", activity_type=pb.ACTIVITY_TYPE_MESSAGE_SENT
                )
                # When it is due by the schedule (as the peers stamp theirs): lateness counts.
                request.metadata.update({"sent": wall + n / rate})
                if self.pipelined:
                    in_flight.append(stub.RecordActivity.future(request, metadata=auth, timeout=10))
                else:
                    stub.RecordActivity(request, metadata=auth, timeout=10)
            for call in in_flight:
                call.result()  # a refused record fails the run

    def stop(self) -> None:
        _stop(self.bridge)
        _stop(self.server)


class PeerTarget:
    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.name = {"websockets": "websockets.broadcast (limit)", "socketio": "python-socketio (peer)"}[kind]
        self.workdir = workdir

    def start(self) -> tuple[int, str]:
        self.port = free_port()
        message_file = self.workdir / "message.json"
        message_file.write_text(sample_message())
        self.process = _start(
            [sys.executable, "-m", "bench.peers", self.kind, str(self.port), str(message_file)], "ready"
        )
        path = "/socket.io/?EIO=4&transport=websocket" if self.kind == "socketio" else "/"
        return self.port, path

    def trigger(self, count: int) -> None:
        urllib.request.urlopen(f"http://127.0.0.1:{self.port}/go?count={count}", timeout=30).read()

    @property
    def pids(self) -> tuple[int, ...]:
        return (self.process.pid,)

    def pace(self, rate: int, count: int) -> None:
        urllib.request.urlopen(f"http://127.0.0.1:{self.port}/pace?rate={rate}&count={count}", timeout=30).read()
        time.sleep(count / rate)

    def stop(self) -> None:
        _stop(self.process)


NODE_PEER = Path(__file__).parent / "node"


def install_node_peer() -> None:
    """``npm ci`` in bench/node (socket.io as pinned by its package-lock.json), once."""
    if not (NODE_PEER / "node_modules" / "socket.io").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_PEER, check=True, capture_output=True)


class NodeSocketIOTarget(PeerTarget):
    """socket.io on Node.js (bench/node/socketio_peer.js): what a Node.js team would use."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("socketio", workdir)
        self.name = "socket.io on Node (peer)"

    def start(self) -> tuple[int, str]:
        install_node_peer()
        self.port = free_port()
        message_file = self.workdir / "message.json"
        message_file.write_text(sample_message())
        self.process = _start(["node", str(NODE_PEER / "socketio_peer.js"), str(self.port), str(message_file)], "ready")
        return self.port, "/socket.io/?EIO=4&transport=websocket"


@dataclass
class LatencyResult:
    target: str
    clients: int
    rate: int
    messages: int
    delivered: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_seconds: float = 0.0
    load_cpu_seconds: float = 0.0
    seconds: float = 0.0  # from the first message sent to the last received
    # The hub's share from its record (the activity's timestamp) to the receipt: the
    # stream to the bridge and the fan-out, without the agent's call (NaN for the peers).
    p50_after_record_ms: float = float("nan")
    p99_after_record_ms: float = float("nan")
    # Per event, over the events: its first receipt, from when it was due (the path to
    # the start of the broadcast pass), and the time from its first receipt to its last
    # (the pass, with the load clients' own reading, which every target's clients share).
    p50_first_ms: float = float("nan")
    p99_first_ms: float = float("nan")
    p50_first_to_last_ms: float = float("nan")
    p99_first_to_last_ms: float = float("nan")

    @property
    def cpu_us_per_delivery(self) -> float:
        return 1e6 * self.cpu_seconds / self.delivered if self.delivered else 0.0


def run_fanout(target: Any, clients: int, messages: int, processes: int = 2) -> FanoutResult:
    """Connect ``clients`` (over ``processes`` load processes), broadcast ``messages``
    back-to-back, and measure deliveries from the trigger to the last receipt."""
    started, reports, cpu = _run(target, clients, messages, lambda: target.trigger(messages), processes)
    delivered = sum(report[0] for report in reports)
    finished = max(report[1] for report in reports) or time.time()
    load_cpu = sum(report[3] for report in reports)
    return FanoutResult(target.name, clients, messages, delivered, max(1e-6, finished - started), cpu, load_cpu)


def percentile_ms(ordered: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``ordered`` (seconds, sorted) in ms; NaN for none."""
    return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def run_paced(target: Any, clients: int, rate: int, seconds: float, processes: int = 2) -> LatencyResult:
    """``rate`` messages a second for ``seconds`` to ``clients``: the time from sending
    (the agent's gRPC call, for the hub) to receipt by each client."""
    messages = int(rate * seconds)
    started, reports, cpu = _run(target, clients, messages, lambda: target.pace(rate, messages), processes)
    latencies = sorted(value for report in reports for value in report[2])
    after_record = sorted(value for report in reports for value in report[4])
    delivered = sum(report[0] for report in reports)
    load_cpu = sum(report[3] for report in reports)
    finished = max(report[1] for report in reports) or time.time()
    # Each event's first and last receipt, by the time it was sent (one per event).
    receipts: dict[float, tuple[float, float]] = {}
    for report in reports:
        for latency, sent in zip(report[2], report[5], strict=True):
            first, last = receipts.get(sent, (latency, latency))
            receipts[sent] = (min(first, latency), max(last, latency))
    firsts = sorted(first for first, _ in receipts.values())
    first_to_lasts = sorted(last - first for first, last in receipts.values())

    return LatencyResult(
        target.name,
        clients,
        rate,
        messages,
        delivered,
        percentile_ms(latencies, 0.5),
        percentile_ms(latencies, 0.99),
        percentile_ms(latencies, 1.0),
        cpu,
        load_cpu,
        max(1e-6, finished - started),
        percentile_ms(after_record, 0.5),
        percentile_ms(after_record, 0.99),
        percentile_ms(firsts, 0.5),
        percentile_ms(firsts, 0.99),
        percentile_ms(first_to_lasts, 0.5),
        percentile_ms(first_to_lasts, 0.99),
    )


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started (its threads' children), as Linux lists them."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            children.extend(int(child) for child in task.read_text().split())
    return children


def cpu_seconds(*pids: int) -> float:
    """User + system CPU time the processes have used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def _run(
    target: Any, clients: int, messages: int, trigger: Callable[[], None], processes: int
) -> tuple[float, list[tuple[int, float, list[float], float, list[float], list[float]]], float]:
    port, path = target.start()
    context = multiprocessing.get_context("spawn")
    pipes, workers = [], []
    try:
        share = [clients // processes + (1 if n < clients % processes else 0) for n in range(processes)]
        for count in share:
            parent, child = context.Pipe()
            worker = context.Process(target=_load_process, args=("127.0.0.1", port, path, target.kind, count, child))
            worker.start()
            pipes.append(parent)
            workers.append(worker)
        for pipe in pipes:
            if not pipe.poll(120) or pipe.recv() != "ready":
                raise RuntimeError("load clients did not connect")
        for pipe in pipes:
            pipe.send(messages)
        cpu_before = cpu_seconds(*target.pids)
        started = time.time()
        trigger()
        reports = [pipe.recv() if pipe.poll(90) else (0, 0.0, [], 0.0, [], []) for pipe in pipes]
        return started, reports, cpu_seconds(*target.pids) - cpu_before
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
        target.stop()


def targets(workdir: Path) -> list[Any]:
    return [HubTarget(workdir), PeerTarget("websockets", workdir), PeerTarget("socketio", workdir)]


def main() -> None:  # pragma: no cover - quick manual runs
    clients = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    messages = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    with tempfile.TemporaryDirectory() as tmp:
        for target in targets(Path(tmp)):
            result = run_fanout(target, clients, messages)
            print(f"{result.target:32} N={clients:<5} {result.delivered:>8} delivered  {result.rate:>10,.0f}/s")


if __name__ == "__main__":
    main()
