"""`python -m bench [--smoke] [--out DIR]`: run the benchmarks, print a markdown table and
write it with a JSON file of the raw figures."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.fanout import FanoutResult, HubTarget, LatencyResult, PeerTarget, run_fanout, run_paced
from bench.ingest import BATCHED, MODES, IngestResult, run_ingest
from bench.memory import MemoryResult, bridge_memory, server_memory

__all__ = ["main"]

FULL: dict[str, Any] = {
    "fanout": [(100, 300), (1000, 100), (5000, 20)],
    "paced": (1000, 20, 10.0),
    "rates": [20, 50, 100],  # the hub alone, at 1,000 clients: cost against event rate
    "ingest": (20_000, 3),  # calls, rounds
    "idle": [1000, 5000],
    "history": 100_000,
}
SMOKE: dict[str, Any] = {
    "fanout": [(20, 20)],
    "paced": (20, 20, 1.0),
    "rates": [20, 40],  # one rate beside the paced run's: the rates' rows are made
    "ingest": (200, 1),
    "idle": [20],
    "history": 1000,
}


def table(results: list[FanoutResult]) -> str:
    lines = [
        "| clients | target | messages | delivered | deliveries/s | vs python-socketio | vs websockets.broadcast "
        "| server CPU µs per delivery |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_n: dict[int, dict[str, FanoutResult]] = {}
    for result in results:
        by_n.setdefault(result.clients, {})[result.target] = result
    for clients, row in sorted(by_n.items()):
        peer = next((r for name, r in row.items() if "socketio" in name), None)
        limit = next((r for name, r in row.items() if "websockets" in name), None)
        for result in row.values():
            ratio_peer = f"{result.rate / peer.rate:.2f}x" if peer and peer.rate else "-"
            ratio_limit = f"{result.rate / limit.rate:.0%}" if limit and limit.rate else "-"
            lines.append(
                f"| {clients:,} | {result.target} | {result.messages:,} | {result.delivered:,} | "
                f"{result.rate:,.0f} | {ratio_peer} | {ratio_limit} | {result.cpu_us_per_delivery:.1f} |"
            )
    return "\n".join(lines)


def latency_table(results: list[LatencyResult]) -> str:
    lines = [
        "| clients | events/s | target | delivered | p50 ms | p99 ms | max ms | server CPU µs per delivery |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.clients:,} | {r.rate} | {r.target} | {r.delivered:,} of {r.messages * r.clients:,} | "
            f"{r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.max_ms:.1f} | {r.cpu_us_per_delivery:.1f} |"
        )
    return "\n".join(lines)


def memory_table(results: list[MemoryResult]) -> str:
    lines = ["| what | count | RSS before (MB) | RSS after (MB) | KB each |", "|---|---|---|---|---|"]
    for r in results:
        before, after = r.rss_before_kb / 1024, r.rss_after_kb / 1024
        lines.append(f"| {r.what} | {r.count:,} | {before:.1f} | {after:.1f} | {r.per_item_kb:.2f} |")
    return "\n".join(lines)


def ingest_ratio(result: IngestResult, limit: IngestResult) -> float:
    """The hub's rate over the limit's: the median of each round's ratio (the two were
    measured back to back in a round), or of the medians if the rounds do not pair up."""
    if len(result.rounds) == len(limit.rounds) and result.calls == limit.calls:
        pairs = zip(result.rounds, limit.rounds, strict=True)
        return statistics.median(theirs / mine if mine else 0.0 for mine, theirs in pairs)
    return result.rate / limit.rate


def ingest_table(results: list[IngestResult]) -> str:
    lines = [
        "| mode | target | calls | calls/s (median round) | vs raw grpcio (median of rounds) | each round's calls/s |",
        "|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        row = [r for r in results if r.mode == mode]
        # Batched bulk has the same limit as bulk: raw client-streaming, message by message.
        limit_mode = "bulk" if mode == BATCHED else mode
        limit = next((r for r in results if r.mode == limit_mode and "raw" in r.target), None)
        for result in row:
            ratio = f"{ingest_ratio(result, limit):.0%}" if limit and limit.rate else "-"
            each = ", ".join(f"{result.calls / seconds:,.0f}" for seconds in result.rounds)
            lines.append(f"| {mode} | {result.target} | {result.calls:,} | {result.rate:,.0f} | {ratio} | {each} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny configuration (seconds): it runs, nothing is lost")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where to write the table and JSON")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    results: list[FanoutResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        for clients, messages in plan["fanout"]:
            for target in (
                HubTarget(Path(tmp)),
                PeerTarget("websockets", Path(tmp)),
                PeerTarget("socketio", Path(tmp)),
            ):
                result = run_fanout(target, clients, messages)
                print(f"fan-out {result.target:32} N={clients:<5} {result.rate:>10,.0f} deliveries/s", file=sys.stderr)
                results.append(result)
        clients, rate, seconds = plan["paced"]
        paced: list[LatencyResult] = []
        for target in (HubTarget(Path(tmp)), PeerTarget("websockets", Path(tmp)), PeerTarget("socketio", Path(tmp))):
            paced.append(run_paced(target, clients, rate, seconds))
            print(f"paced {target.name:32} p99 {paced[-1].p99_ms:.1f} ms", file=sys.stderr)
        for extra_rate in plan["rates"]:
            if extra_rate != rate:
                paced.append(run_paced(HubTarget(Path(tmp)), clients, extra_rate, seconds))
        ingest = run_ingest(Path(tmp), *plan["ingest"])
        memory: list[MemoryResult] = [bridge_memory(Path(tmp), clients) for clients in plan["idle"]]
        memory.append(server_memory(Path(tmp), plan["history"]))
        for item in ingest:
            print(f"ingest {item.mode:5} {item.target:24} {item.rate:>10,.0f} calls/s", file=sys.stderr)
    report = (
        "## Fan-out (one bridge, back-to-back)\n\n"
        + table(results)
        + "\n\n## Paced end-to-end latency\n\n"
        + latency_table(paced)
        + "\n\n## Ingest (unary: 64 calls in flight; bulk: one client stream, one or 100 activities a message)\n\n"
        + ingest_table(ingest)
        + "\n\n## Memory\n\n"
        + memory_table(memory)
        + "\n"
    )
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"{stamp}.md").write_text(report)
    (args.out / f"{stamp}.json").write_text(
        json.dumps(
            {
                "machine": platform.platform(),
                "python": platform.python_version(),
                "fanout": [asdict(r) | {"rate": r.rate, "cpu_us_per_delivery": r.cpu_us_per_delivery} for r in results],
                "paced": [asdict(r) | {"cpu_us_per_delivery": r.cpu_us_per_delivery} for r in paced],
                "ingest": [asdict(r) | {"seconds": r.seconds, "rate": r.rate} for r in ingest],
                "memory": [asdict(r) | {"per_item_kb": r.per_item_kb} for r in memory],
            },
            indent=2,
        )
    )
    lost = [f"{r.target} N={r.clients}" for r in results if r.delivered != r.clients * r.messages]
    lost += [f"{r.target} paced N={r.clients}" for r in paced if r.delivered != r.clients * r.messages]
    if lost:
        print("messages were lost: " + ", ".join(lost), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
