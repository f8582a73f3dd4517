"""`python -m bench.durable_tail [--clients N] [--seconds S] [--rates 20,50] [--rounds R] [--before DIR]`:
paced record -> WebSocket receipt latency with the durable default (the SQLite store,
synchronous=full) beside the memory store and the raw `websockets.broadcast` peer, run
one after another in each round so that every ratio compares runs of the same moment.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.fanout import HubTarget, LatencyResult, PeerTarget, run_paced

__all__ = ["main"]


def _row(result: LatencyResult, peer: LatencyResult | None, round_number: int) -> str:
    ratio = f"{result.p99_ms / peer.p99_ms:.2f}x" if peer is not None and peer.p99_ms else "-"
    offered = result.clients * result.messages
    return (
        f"| {round_number} | {result.rate} | {result.target} | {result.delivered:,} of {offered:,} "
        f"| {result.p50_ms:.1f} | {result.p99_ms:.1f} | {result.max_ms:.1f} | {ratio} |"
    )


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
    args = parser.parse_args(argv)
    rates = [int(rate) for rate in args.rates.split(",") if rate]
    lines = [
        "| round | events/s | target | delivered | p50 ms | p99 ms | max ms | p99 vs raw peer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lost = False
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for round_number in range(1, args.rounds + 1):
            for rate in rates:
                results = []
                targets = [HubTarget(workdir, "sqlite"), HubTarget(workdir), PeerTarget("websockets", workdir)]
                if args.before is not None:
                    targets.insert(0, HubTarget(workdir, "sqlite", args.before.resolve(), "before"))
                for target in targets:
                    result = run_paced(target, args.clients, rate, args.seconds)
                    print(f"paced {rate}/s {result.target:32} p99 {result.p99_ms:.1f} ms", file=sys.stderr)
                    results.append(result)
                    lost = lost or result.delivered != result.clients * result.messages
                peer = results[-1]
                lines.extend(_row(result, peer, round_number) for result in results)
    print("\n".join(lines))
    if lost:
        print("messages were lost", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
