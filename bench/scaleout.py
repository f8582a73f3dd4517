"""Scale-out: write throughput of replicas sharing a Redis store, beside one SQLite server,
and what clients see when a replica is killed mid-load.

`python -m bench.scaleout [--seconds S] [--writers N] [--latency 200x50] [--smoke]`

- throughput: ``writers`` keyed writers (each call carries an idempotency key, as the
  SDK sends), each sending `RecordActivity` one call at a time for ``seconds``, spread
  evenly over the replicas; acks/s, p50/p99 and how the acks split between replicas.
  Targets: one SQLite server, then 1, 2 and 3 replicas on a private `redis-server` the
  bench starts (no persistence), measured in one run so the ratios hold on a busy machine.
- latency (``--latency CLIENTSxRATE``): record -> WebSocket receipt when the agent
  records on one replica and the clients read through a bridge following the other,
  beside one SQLite server, alternating in each round (bench.fanout's paced run).
- failover: two replicas under the same load; one is killed with SIGKILL halfway. A
  writer whose call fails retries it on the other replica with the same key (as the SDK
  does). Reported: the longest time without an ack after the kill, then a check of every
  acknowledged id against Redis (lost) and of every key against the activities Redis
  holds (recorded twice).

The load runs in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import redis

from bench.fanout import TOKEN, HubTarget, LatencyResult, _stop, free_port, run_paced, start_server
from collab_grpc.eventloop import run
from collab_grpc.v1 import collaboration_pb2 as pb

__all__ = [
    "CrossReplicaTarget",
    "FailoverResult",
    "ThroughputResult",
    "main",
    "run_failover",
    "run_latency",
    "run_throughput",
]

METHOD = "/collab.v1.CollaborationService/RecordActivity"
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
CALL_TIMEOUT = 10.0


@dataclass
class ThroughputResult:
    target: str
    round: int
    replicas: int
    writers: int
    seconds: float
    acks: int
    errors: int
    per_replica: list[int]
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.acks / self.seconds if self.seconds else 0.0

    @property
    def split(self) -> float:
        """The busiest replica's acks over the idlest's (1.0: even)."""
        low = min(self.per_replica)
        return max(self.per_replica) / low if low else float("inf")


@dataclass
class FailoverResult:
    writers: int
    seconds: float
    acks: int
    retried: int
    # The longest time without any ack, from the kill on (ms).
    stall_ms: float
    killed_lease_holder: bool  # the killed replica held the write lease at that moment
    lost: list[str] = field(default_factory=list)  # acknowledged ids Redis does not hold
    twice: list[str] = field(default_factory=list)  # keys recorded more than once


# -- the private Redis --------------------------------------------------------------------


class PrivateRedis:
    """A `redis-server` of the bench's own, on a free port, keeping nothing on disk."""

    def __init__(self, directory: Path) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise SystemExit("redis-server is not installed; the scale-out bench needs it")
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)

    def url(self, prefix: str) -> str:
        return f"redis://127.0.0.1:{self.port}/0?prefix={prefix}"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


# -- load -----------------------------------------------------------------------------------


def _request(writer: int, n: int) -> bytes:
    key = f"w{writer}-{n}"
    request = pb.RecordActivityRequest(
        agent_id=f"agent_{writer}",
        department="engineering",
        activity_type=pb.ACTIVITY_TYPE_MEMORY_WRITE,
        idempotency_key=key,
    )
    request.metadata.update({"bench_key": key, "size_bytes": 1024})
    return request.SerializeToString()


async def _load(targets: list[str], writers: int, seconds: float) -> dict[str, Any]:
    """Each writer sends one call at a time to its replica (writer % replicas); a failed
    call is retried with the same key on the next replica."""
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    channels = [grpc.aio.insecure_channel(target) for target in targets]
    calls = [channel.unary_unary(METHOD, None, pb.RecordActivityResponse.FromString) for channel in channels]
    per_replica = [0] * len(targets)
    latencies: list[float] = []
    ack_times: list[float] = []
    acked: dict[str, str] = {}  # key -> activity id
    errors = retried = 0
    started = time.perf_counter()
    stop_at = started + seconds

    async def writer(index: int) -> None:
        nonlocal errors, retried
        n = 0
        while time.perf_counter() < stop_at:
            payload = _request(index, n)
            replica = index % len(targets)
            sent = time.perf_counter()
            while True:
                try:
                    answer = await calls[replica](payload, metadata=metadata, timeout=CALL_TIMEOUT)
                    break
                except grpc.aio.AioRpcError as error:
                    errors += 1
                    if error.code() not in RETRYABLE or time.perf_counter() > stop_at + 30:
                        raise
                    retried += 1
                    replica = (replica + 1) % len(targets)
                    await asyncio.sleep(0.01)
            now = time.perf_counter()
            latencies.append(now - sent)
            ack_times.append(now - started)
            per_replica[replica] += 1
            acked[f"w{index}-{n}"] = answer.activity_id
            n += 1

    try:
        await asyncio.gather(*(writer(i) for i in range(writers)))
    finally:
        for channel in channels:
            await channel.close(None)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "seconds": elapsed,
        "acks": len(latencies),
        "errors": errors,
        "retried": retried,
        "per_replica": per_replica,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else 0.0,
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else 0.0,
        "ack_times": ack_times,
        "acked": acked,
    }


def _load_process(targets: list[str], writers: int, seconds: float, report: Connection) -> None:
    report.send(run(_load(targets, writers, seconds)))


def _start_load(targets: list[str], writers: int, seconds: float) -> tuple[Any, Connection]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_load_process, args=(targets, writers, seconds, child))
    process.start()
    return process, parent


def _finish_load(process: Any, parent: Connection, seconds: float) -> dict[str, Any]:
    if not parent.poll(seconds + 120):
        process.kill()
        raise RuntimeError("the load process did not report")
    figures: dict[str, Any] = parent.recv()
    process.join(10)
    return figures


def _replicas(workdir: Path, count: int, store: str) -> list[tuple[subprocess.Popen[str], str]]:
    return [start_server(workdir / f"replica{n}", COLLAB_STORE=store) for n in range(count)]


TARGETS = ("sqlite", "1", "2", "3")


def run_throughput(
    workdir: Path,
    private: PrivateRedis,
    writers: int,
    seconds: float,
    targets: tuple[str, ...] = TARGETS,
    rounds: int = 1,
) -> list[ThroughputResult]:
    """``targets``: "sqlite" (one SQLite server), or a number of replicas on Redis. Each
    round measures every target back to back, so a drift in the machine's speed (shared
    with other work) moves them together; the table gives each round's ratio."""
    plans = [("sqlite server", 1, "sqlite") if t == "sqlite" else (f"{t} on redis", int(t), "redis") for t in targets]
    results = []
    runs = [(round_number, plan) for round_number in range(rounds) for plan in plans]
    for number, (round_number, (name, count, kind)) in enumerate(runs):
        store = private.url(f"bench{number}") if kind == "redis" else "sqlite"
        servers = _replicas(workdir / f"throughput{number}", count, store)
        try:
            process, parent = _start_load([target for _, target in servers], writers, seconds)
            figures = _finish_load(process, parent, seconds)
        finally:
            for server, _ in servers:
                _stop(server)
        result = ThroughputResult(
            name,
            round_number, count, writers, figures["seconds"], figures["acks"], figures["errors"],
            figures["per_replica"], figures["p50_ms"], figures["p99_ms"],
        )  # fmt: skip
        print(f"scale-out {name:14} {result.rate:>8,.0f} acks/s p99 {result.p99_ms:.0f} ms", file=sys.stderr)
        results.append(result)
    return results


def run_failover(workdir: Path, private: PrivateRedis, writers: int, seconds: float) -> FailoverResult:
    prefix = "failover"
    servers = _replicas(workdir / "failover", 2, private.url(prefix))
    try:
        process, parent = _start_load([target for _, target in servers], writers, seconds)
        time.sleep(seconds / 2)
        killed_at = seconds / 2  # as the load counts it, give or take its start-up
        # The replica holding the write lease (its token names its process), else the first.
        raw: Any = private.client().get(f"{prefix}:lease")
        holder = raw.decode() if raw else ""
        pids = [server.pid for server, _ in servers]
        pid = int(holder.split(":")[1]) if holder.count(":") == 2 else 0
        victim = pids.index(pid) if pid in pids else 0
        servers[victim][0].send_signal(signal.SIGKILL)
        figures = _finish_load(process, parent, seconds)
    finally:
        for server, _ in servers:
            _stop(server)
    ack_times = sorted(figures["ack_times"])
    after = [t for t in ack_times if t >= killed_at - 0.5]
    gaps = [b - a for a, b in itertools.pairwise(after)]
    stall = max(gaps, default=0.0)
    client = private.client()
    acked: dict[str, str] = figures["acked"]
    ids = list(acked.values())
    held = client.hmget(f"{prefix}:activity", ids) if ids else []
    lost = [activity_id for activity_id, body in zip(ids, held, strict=True) if body is None]
    recorded: dict[str, int] = {}
    for _, body in client.hscan_iter(f"{prefix}:activity", count=1000):
        key = json.loads(body).get("metadata", {}).get("bench_key")
        if key is not None:
            recorded[key] = recorded.get(key, 0) + 1
    twice = sorted(key for key, count in recorded.items() if count > 1)
    result = FailoverResult(
        writers,
        figures["seconds"],
        figures["acks"],
        figures["retried"],
        1000 * stall,
        pid in pids,
        lost,
        twice,
    )
    print(
        f"failover: stall {result.stall_ms:.0f} ms, {len(lost)} lost, {len(twice)} twice, {result.retried} retried",
        file=sys.stderr,
    )
    return result


class CrossReplicaTarget(HubTarget):
    """Two replicas on the private Redis: the agent records on the first, the clients read
    through a bridge that follows the second, so every event crosses replicas (Redis,
    the second replica's follower) before it reaches a browser."""

    def __init__(self, workdir: Path, private: PrivateRedis) -> None:
        super().__init__(workdir, name="collab hub (2 replicas on Redis: recorded on one, read on the other)")
        self.private = private
        self.runs = itertools.count()

    def start(self) -> tuple[int, str]:
        self.store = self.private.url(f"across{next(self.runs)}")  # a history of its own per run
        reader = super().start()  # the second replica and the bridge that follows it
        self.recorder, self.grpc_target = start_server(
            Path(tempfile.mkdtemp(prefix="recorder-", dir=self.workdir)), COLLAB_STORE=self.store
        )
        return reader

    @property
    def pids(self) -> tuple[int, ...]:
        return (self.recorder.pid, *super().pids)

    def stop(self) -> None:
        super().stop()
        _stop(self.recorder)


def run_latency(
    workdir: Path, private: PrivateRedis, clients: int, rate: int, seconds: float, rounds: int
) -> list[LatencyResult]:
    """Record -> WebSocket receipt at ``rate`` events/s to ``clients``: one SQLite server,
    and across two replicas on Redis, alternating in each round."""
    results = []
    for _ in range(rounds):
        for target in (HubTarget(workdir, "sqlite"), CrossReplicaTarget(workdir, private)):
            results.append(run_paced(target, clients, rate, seconds))
            print(f"latency: {json.dumps(asdict(results[-1]))}", flush=True)
    return results


def latency_table(results: list[LatencyResult]) -> str:
    """Medians over the rounds; the p99 ratio to one SQLite server is the median of each round's."""
    lines = [
        "| target | delivered | p50 ms (median) | p99 ms (median) | p99 vs one SQLite server (median of rounds) "
        "| each round's p99 |",
        "|---|---|---|---|---|---|",
    ]
    names = list(dict.fromkeys(r.target for r in results))
    base = [r for r in results if r.target == names[0]]
    for name in names:
        runs = [r for r in results if r.target == name]
        ratios = [r.p99_ms / b.p99_ms for r, b in zip(runs, base, strict=False) if b.p99_ms]
        lines.append(
            f"| {name} | {sum(r.delivered for r in runs):,} of {sum(r.messages * r.clients for r in runs):,} "
            f"| {statistics.median(r.p50_ms for r in runs):.1f} | {statistics.median(r.p99_ms for r in runs):.1f} "
            f"| {statistics.median(ratios):.2f}x | {', '.join(f'{r.p99_ms:.1f}' for r in runs)} |"
        )
    return "\n".join(lines)


def throughput_table(results: list[ThroughputResult]) -> str:
    """Medians over the rounds; the ratio to one SQLite server is the median of each
    round's ratio (the two measured minutes apart at most)."""
    base = {r.round: r.rate for r in results if r.target.startswith("sqlite")}
    lines = [
        "| target | acks/s (median) | vs one SQLite server (median of rounds) | p50 ms | p99 ms (median) "
        "| split (median) | each round's acks/s | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = list(dict.fromkeys(r.target for r in results))
    for name in names:
        runs = [r for r in results if r.target == name]
        ratios = [r.rate / base[r.round] for r in runs if base.get(r.round)]
        ratio = f"{statistics.median(ratios):.2f}x" if ratios else "-"
        split = f"{statistics.median(r.split for r in runs):.2f} : 1" if runs[0].replicas > 1 else "-"
        lines.append(
            f"| {name} | {statistics.median(r.rate for r in runs):,.0f} | {ratio} "
            f"| {statistics.median(r.p50_ms for r in runs):.1f} | {statistics.median(r.p99_ms for r in runs):.1f} "
            f"| {split} | {', '.join(f'{r.rate:,.0f}' for r in runs)} | {sum(r.errors for r in runs)} |"
        )
    return "\n".join(lines)


def failover_table(result: FailoverResult) -> str:
    return (
        "| writers | seconds | acks | killed | calls retried | longest time without an ack after the kill (ms) "
        "| acknowledged, not in Redis | keys recorded twice |\n|---|---|---|---|---|---|---|---|\n"
        f"| {result.writers} | {result.seconds:.1f} | {result.acks:,} | "
        f"{'the lease holder' if result.killed_lease_holder else 'a replica'} | {result.retried} | "
        f"{result.stall_ms:.0f} "
        f"| {len(result.lost)} | {len(result.twice)} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="each throughput run (and the failover run)")
    parser.add_argument("--writers", type=int, default=32, help="keyed writers, one call in flight each")
    parser.add_argument("--smoke", action="store_true", help="2 s runs, 8 writers: it runs, nothing is lost")
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help="comma-separated: sqlite and/or numbers of replicas on Redis"
    )
    parser.add_argument("--rounds", type=int, default=3, help="every target is measured once a round")
    parser.add_argument("--no-failover", action="store_true", help="no failover run")
    parser.add_argument("--no-throughput", action="store_true", help="no throughput runs")
    parser.add_argument(
        "--latency",
        metavar="CLIENTSxRATE",
        help="also record -> WebSocket receipt across replicas beside one SQLite server, e.g. 200x50",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where to write the table and JSON")
    args = parser.parse_args(argv)
    seconds, writers, rounds = (2.0, 8, 1) if args.smoke else (args.seconds, args.writers, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        private = PrivateRedis(Path(tmp) / "redis")
        try:
            targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
            throughput = (
                [] if args.no_throughput else run_throughput(Path(tmp), private, writers, seconds, targets, rounds)
            )
            latency: list[LatencyResult] = []
            if args.latency:
                clients, rate = (int(part) for part in args.latency.split("x"))
                latency = run_latency(Path(tmp), private, clients, rate, seconds, rounds)
            failover = None if args.no_failover else run_failover(Path(tmp), private, writers, max(seconds, 4.0))
        finally:
            private.stop()
    report = ""
    if throughput:
        report += f"## Scale-out ({writers} keyed writers, {seconds:g} s each, {rounds} rounds)\n\n"
        report += throughput_table(throughput) + "\n"
    if latency:
        report += f"\n## Record -> WebSocket receipt ({args.latency}, {seconds:g} s each, {rounds} rounds)\n\n"
        report += latency_table(latency) + "\n"
    if failover is not None:
        report += "\n## Failover (two replicas, one killed with SIGKILL halfway)\n\n" + failover_table(failover) + "\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"scaleout-{stamp}.md").write_text(report)
    (args.out / f"scaleout-{stamp}.json").write_text(
        json.dumps(
            {
                "throughput": [asdict(r) | {"rate": r.rate, "split": r.split} for r in throughput],
                "latency": [asdict(r) for r in latency],
                "failover": asdict(failover) if failover else None,
            },
            indent=2,
        )
    )
    if failover is not None and (failover.lost or failover.twice):
        print(f"failover lost {len(failover.lost)} and recorded {len(failover.twice)} twice", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
