"""`python -m bench.durable_tail [--clients N] [--seconds S] [--rates 20,50] [--rounds R] [--before DIR]
[--workers N] [--sync-normal] [--control] [--direct]`: paced record -> WebSocket receipt latency with the durable
default (the SQLite store, synchronous=full) beside the memory store and the raw
`websockets.broadcast` peer, run one after another in each round so that every ratio
compares runs of the same moment; then each target's median ratio over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from bench.fanout import (
    TOKEN,
    HubTarget,
    LatencyResult,
    PeerTarget,
    _start,
    _stop,
    free_port,
    percentile_ms,
    run_paced,
    start_server,
)
from collab_grpc.eventloop import run
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc

__all__ = ["main"]


def _row(result: LatencyResult, peer: LatencyResult | None, round_number: int) -> str:
    ratio = f"{result.p99_ms / peer.p99_ms:.2f}x" if peer is not None and peer.p99_ms else "-"
    offered = result.clients * result.messages
    after = result.p99_after_record_ms
    after_text = "-" if after != after else f"{result.p50_after_record_ms:.1f} / {after:.1f}"
    return (
        f"| {round_number} | {result.rate} | {result.target} | {result.delivered:,} of {offered:,} "
        f"| {result.p50_ms:.1f} | {result.p99_ms:.1f} | {result.max_ms:.1f} | {ratio} | {after_text} "
        f"| {result.p50_first_ms:.1f} / {result.p99_first_ms:.1f} "
        f"| {result.p50_first_to_last_ms:.1f} / {result.p99_first_to_last_ms:.1f} |"
    )


class PeerBesideHub(PeerTarget):
    """The raw peer while a hub with no WebSocket clients runs beside it on the same
    machine, taking the same paced records: its server (SQLite), its agent's calls and
    its bridge's upstream read, but no pass. The hub's p99 against this one's says what
    its fan-out costs when the machine carries the same work, apart from the CPU its
    other processes take from the pass on a machine with few cores."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("websockets", workdir)
        self.name = "websockets.broadcast, the hub beside it"
        self.hub = HubTarget(workdir, "sqlite")

    def start(self) -> tuple[int, str]:
        self.hub.start()
        return super().start()

    def pace(self, rate: int, count: int) -> None:
        failures: list[BaseException] = []

        def record() -> None:
            try:
                self.hub.pace(rate, count)
            except BaseException as error:  # the control is void without its load: fail the run
                failures.append(error)

        recorder = threading.Thread(target=record, daemon=True)
        recorder.start()
        super().pace(rate, count)
        recorder.join(30)
        if recorder.is_alive():
            raise RuntimeError("the hub beside the raw peer did not finish its records")
        if failures:
            raise RuntimeError("the hub beside the raw peer refused a record") from failures[0]

    def stop(self) -> None:
        super().stop()
        self.hub.stop()


# The `--direct` server that is gRPC alone (bench/grpc_floor.py), not a store.
GRPC_FLOOR = "grpc floor"


def direct_paced(workdir: Path, store: str, code_dir: Path | None, rate: int, seconds: float) -> tuple[float, float]:
    """The server's part alone: one gRPC subscriber on the server (no bridge, no load
    clients, so little CPU), ``rate`` RecordActivity calls a second; (p50, p99) ms from
    each call to its event's receipt. ``store`` GRPC_FLOOR: the same calls against
    grpc.aio with nothing behind it (bench/grpc_floor.py)."""
    if store == GRPC_FLOOR:
        port = free_port()
        server = _start([sys.executable, "-m", "bench.grpc_floor", str(port)], "listening on")
        target = f"127.0.0.1:{port}"
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="direct-", dir=workdir))
        server, target = start_server(data_dir, code_dir, COLLAB_STORE=store)
    auth = (("authorization", f"Bearer {TOKEN}"),)
    count = int(rate * seconds)
    latencies: list[float] = []
    subscribed = threading.Event()

    async def follow() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.CollaborationServiceStub(channel)
            stream = stub.SubscribeEvents(pb.SubscribeEventsRequest(), metadata=auth)
            async for message in stream:
                if message.event.HasField("activity_recorded"):
                    fields = message.event.activity_recorded.metadata.fields
                    if "sent" not in fields:  # a warm-up record: the stream is live
                        subscribed.set()
                        continue
                    latencies.append(time.time() - fields["sent"].number_value)
                    if len(latencies) == count:
                        return

    follower = threading.Thread(target=run, args=(follow(),))
    try:
        follower.start()
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.CollaborationServiceStub(channel)
            # Records without a send time until one reaches the subscriber, so that no
            # measured event can be sent before its stream is live.
            for _ in range(50):
                stub.RecordActivity(
                    pb.RecordActivityRequest(agent_id="warm_up", activity_type=pb.ACTIVITY_TYPE_MESSAGE_SENT),
                    metadata=auth,
                    timeout=10,
                )
                if subscribed.wait(0.2):
                    break
            else:
                raise RuntimeError(f"{store}: no warm-up event reached the subscriber in 10 s")
            time.sleep(0.2)
            start = time.monotonic()
            for n in range(count):
                delay = start + n / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                request = pb.RecordActivityRequest(
                    agent_id=f"agent_{n % 48}", activity_type=pb.ACTIVITY_TYPE_MESSAGE_SENT
                )
                request.metadata.update({"sent": time.time()})
                stub.RecordActivity(request, metadata=auth, timeout=10)
        follower.join(30)
    finally:
        _stop(server)
    if len(latencies) != count:
        raise RuntimeError(f"{store}: {len(latencies)} of {count} events reached the subscriber")
    ordered = sorted(latencies)
    return percentile_ms(ordered, 0.5), percentile_ms(ordered, 0.99)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.durable_tail", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rates", default="20,50", help="comma-separated events/s")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--before",
        type=Path,
        help="a checkout of an earlier version: its server (SQLite) runs beside this one's in every round",
    )
    parser.add_argument(
        "--direct",
        action="store_true",
        help="the server's part alone: one gRPC subscriber on the server, no bridge; beside grpc.aio with nothing "
        "behind it (the floor)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="beside the one-process bridge, the SQLite hub's bridge with this many worker processes (--workers)",
    )
    parser.add_argument(
        "--sync-normal",
        action="store_true",
        help="also the SQLite hub with COLLAB_SQLITE_SYNCHRONOUS=normal (no fsync per commit)",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="also the raw peer with a hub beside it taking the same records but serving no client (see PeerBesideHub)",
    )
    parser.add_argument(
        "--pipelined",
        action="store_true",
        help="the hubs' paced recorder does not wait for an answer before its next call (as an async recorder)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    rates = [int(rate) for rate in args.rates.split(",") if rate]
    if args.direct:
        return _direct(args, rates)
    lines = [
        "| round | events/s | target | delivered | p50 ms | p99 ms | max ms | p99 vs raw peer "
        "| after the record p50 / p99 ms | first receipt p50 / p99 ms | first to last receipt p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    control_lines = [
        "| round | events/s | target | p99 ms | p99 vs the raw peer with the hub beside it |",
        "|---|---|---|---|---|",
    ]
    # Each target's p99 over the raw peer's, round by round: (rate, target) -> ratios.
    ratios: dict[tuple[int, str], list[float]] = {}
    lost = False
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for round_number in range(1, args.rounds + 1):
            for rate in rates:
                targets = _paced_targets(args, workdir)
                results = []
                for target in targets:
                    result = run_paced(target, args.clients, rate, args.seconds)
                    print(f"paced {rate}/s {result.target:32} p99 {result.p99_ms:.1f} ms", file=sys.stderr)
                    results.append(result)
                    lost = lost or result.delivered != result.clients * result.messages
                peer = next(
                    result for result, target in zip(results, targets, strict=True) if type(target) is PeerTarget
                )
                lines.extend(_row(result, peer, round_number) for result in results)
                for result in results:
                    if result is not peer:
                        ratios.setdefault((rate, result.target), []).append(result.p99_ms / peer.p99_ms)
                if args.control:
                    control = results[-1]
                    control_lines.extend(
                        f"| {round_number} | {rate} | {result.target} | {result.p99_ms:.1f} "
                        f"| {result.p99_ms / control.p99_ms:.2f}x |"
                        for result in results[:-1]
                    )
    print("\n".join(lines))
    if args.control:
        print("\n" + "\n".join(control_lines))
    print("\n" + "\n".join(_ratio_summary(ratios)))
    if lost:
        print("messages were lost", file=sys.stderr)
        return 1
    return 0


def _paced_targets(args: argparse.Namespace, workdir: Path) -> list[Any]:
    """One round's targets, in the order they run: the raw peer after the hubs, the
    control (``--control``) last."""
    targets: list[Any] = [
        HubTarget(workdir, "sqlite", pipelined=args.pipelined),
        HubTarget(workdir, pipelined=args.pipelined),
        PeerTarget("websockets", workdir),
    ]
    if args.before is not None:
        targets.insert(0, HubTarget(workdir, "sqlite", args.before.resolve(), "before"))
    if args.sync_normal:
        normal = HubTarget(
            workdir,
            "sqlite",
            name="collab hub (sqlite, synchronous normal)",
            server_env={"COLLAB_SQLITE_SYNCHRONOUS": "normal"},
            pipelined=args.pipelined,
        )
        targets.insert(1 if args.before is None else 2, normal)
    if args.workers > 1:
        workers = HubTarget(
            workdir,
            "sqlite",
            name=f"collab hub (sqlite), {args.workers} bridge workers",
            bridge_env={"COLLAB_BRIDGE_WORKERS": str(args.workers)},
            pipelined=args.pipelined,
        )
        targets.insert(1 if args.before is None else 2, workers)
    if args.control:
        targets.append(PeerBesideHub(workdir))
    return targets


# Issue 22's bound on a hub's paced p99, as a multiple of the raw peer's in the same run.
P99_BOUND = 1.5


def _ratio_summary(ratios: dict[tuple[int, str], list[float]]) -> list[str]:
    """Per rate and target, its p99 over the raw peer's across the rounds: the median,
    the range, and in how many rounds it was within P99_BOUND. One round's ratio swings
    with whether either side's passes fit between events on a busy machine; the median
    over rounds is the figure that does not."""
    lines = [
        f"| events/s | target | rounds | median p99 vs raw peer | range | rounds within {P99_BOUND}x |",
        "|---|---|---|---|---|---|",
    ]
    for (rate, target), values in ratios.items():
        within = sum(value <= P99_BOUND for value in values)
        lines.append(
            f"| {rate} | {target} | {len(values)} | {statistics.median(values):.2f}x "
            f"| {min(values):.2f}-{max(values):.2f}x | {within} of {len(values)} |"
        )
    return lines


def _direct(args: argparse.Namespace, rates: list[int]) -> int:
    print("| round | events/s | server | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for round_number in range(1, args.rounds + 1):
            for rate in rates:
                servers: list[tuple[str, str, Path | None]] = [
                    ("sqlite", "sqlite", None),
                    ("memory", "memory", None),
                    (GRPC_FLOOR, GRPC_FLOOR, None),
                ]
                if args.before is not None:
                    servers.insert(0, ("sqlite, before", "sqlite", args.before.resolve()))
                for name, store, code_dir in servers:
                    p50, p99 = direct_paced(Path(tmp), store, code_dir, rate, args.seconds)
                    print(f"| {round_number} | {rate} | {name} | {p50:.1f} | {p99:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
