"""Issue 22's fan-out figures, each row measured in the same run as the peers beside it:

- CPU per delivery (server + bridge) at several event rates to 1,000 clients (and to
  5,000), the hub with coalescing as configured by default and with it off;
- deliveries/s and deliveries per CPU-second at saturation (messages back to back) for
  the hub, the raw `websockets.broadcast`, python-socketio and socket.io on Node;
- paced latency (send -> receipt) p50/p99 at 20 and 50 events/s beside the raw peer.

For every row: how much of the machine the target and the load clients each used
(CPU seconds / wall seconds = cores). Run: ``python -m bench.fanout_rates --help``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.fanout import (
    FanoutResult,
    HubTarget,
    LatencyResult,
    NodeSocketIOTarget,
    PeerTarget,
    run_fanout,
    run_paced,
)

__all__ = ["main"]

# Coalescing off: every event its own pass, every frame its own write (as before issue 22).
NO_COALESCING = {"COLLAB_FANOUT_BATCH": "1", "COLLAB_FANOUT_COALESCE_DELAY": "0"}


def hub(workdir: Path, coalescing: bool, store: str = "memory") -> HubTarget:
    name = f"collab hub ({store}{'' if coalescing else ', coalescing off'})"
    return HubTarget(
        workdir,
        name=name,
        server_env={"COLLAB_STORE": store},
        bridge_env={} if coalescing else NO_COALESCING,
    )


def paced_rows(results: list[LatencyResult]) -> list[str]:
    rows = [
        "| clients | events/s | target | delivered / offered | p50 ms | p99 ms | max ms "
        "| after the record p50 / p99 ms | target CPU µs/delivery | target cores | load cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        seconds = r.seconds or 1.0
        after = (
            "-"
            if r.p99_after_record_ms != r.p99_after_record_ms
            else f"{r.p50_after_record_ms:.1f} / {r.p99_after_record_ms:.1f}"
        )
        rows.append(
            f"| {r.clients:,} | {r.rate} | {r.target} | {r.delivered:,} / {r.messages * r.clients:,} | "
            f"{r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.max_ms:.1f} | {after} | {r.cpu_us_per_delivery:.2f} | "
            f"{r.cpu_seconds / seconds:.2f} | {r.load_cpu_seconds / seconds:.2f} |"
        )
    return rows


def saturation_rows(results: list[FanoutResult]) -> list[str]:
    raw = next((r for r in results if "websockets" in r.target), None)
    rows = [
        "| clients | target | delivered / offered | deliveries/s | CPU µs/delivery | deliveries per CPU-second "
        "| vs raw per CPU-second | target cores | load cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        versus = (
            f"{r.deliveries_per_cpu_second / raw.deliveries_per_cpu_second:.2f}x"
            if raw and raw.deliveries_per_cpu_second
            else "-"
        )
        rows.append(
            f"| {r.clients:,} | {r.target} | {r.delivered:,} / {r.messages * r.clients:,} | {r.rate:,.0f} | "
            f"{r.cpu_us_per_delivery:.2f} | {r.deliveries_per_cpu_second:,.0f} | {versus} | "
            f"{r.cpu_seconds / r.seconds:.2f} | {r.load_cpu_seconds / r.seconds:.2f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout_rates", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rates", default="20,50,100,200", help="events/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each paced run")
    parser.add_argument("--many-clients", type=int, default=5000, help="the larger client count (0: skip)")
    parser.add_argument("--many-rates", default="20,200", help="events/s at the larger client count")
    parser.add_argument("--saturation", type=int, default=300, help="messages back to back (0: skip)")
    parser.add_argument("--latency-rates", default="20,50", help="paced p50/p99 beside the raw peer")
    parser.add_argument("--workers", type=int, default=2, help="bridge workers of the workers part (beside 1)")
    parser.add_argument(
        "--only", default="rates,many,saturation,latency,workers", help="which parts to run (comma-separated)"
    )
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "rates" in parts:
            rated: list[LatencyResult] = []
            for rate in [int(r) for r in args.rates.split(",")]:
                for target in (hub(workdir, True), hub(workdir, False), PeerTarget("websockets", workdir)):
                    rated.append(run_paced(target, args.clients, rate, args.seconds))
                    print("\n".join(paced_rows(rated[-1:])[2:]), flush=True)
            figures["rates"] = [asdict(r) for r in rated]
            print("\n## CPU per delivery against the event rate\n\n" + "\n".join(paced_rows(rated)), flush=True)
        if "many" in parts and args.many_clients:
            many: list[LatencyResult] = []
            for rate in [int(r) for r in args.many_rates.split(",")]:
                for target in (hub(workdir, True), hub(workdir, False), PeerTarget("websockets", workdir)):
                    many.append(run_paced(target, args.many_clients, rate, args.seconds))
                    print("\n".join(paced_rows(many[-1:])[2:]), flush=True)
            figures["many"] = [asdict(r) for r in many]
            print(f"\n## {args.many_clients:,} clients\n\n" + "\n".join(paced_rows(many)), flush=True)
        if "saturation" in parts and args.saturation:
            saturated: list[FanoutResult] = []
            for target in (
                PeerTarget("websockets", workdir),
                hub(workdir, True),
                hub(workdir, False),
                PeerTarget("socketio", workdir),
                NodeSocketIOTarget(workdir),
            ):
                saturated.append(run_fanout(target, args.clients, args.saturation))
                print("\n".join(saturation_rows(saturated[-1:])[2:]), flush=True)
            figures["saturation"] = [asdict(r) for r in saturated]
            print("\n## Saturation\n\n" + "\n".join(saturation_rows(saturated)), flush=True)
        if "latency" in parts:
            latency: list[LatencyResult] = []
            for rate in [int(r) for r in args.latency_rates.split(",")]:
                for target in (hub(workdir, True), hub(workdir, True, "sqlite"), PeerTarget("websockets", workdir)):
                    latency.append(run_paced(target, args.clients, rate, args.seconds))
                    print("\n".join(paced_rows(latency[-1:])[2:]), flush=True)
            figures["latency"] = [asdict(r) for r in latency]
            print("\n## Paced latency\n\n" + "\n".join(paced_rows(latency)), flush=True)
        if "workers" in parts and args.workers > 1:
            # The same hub with one bridge process and with --workers N: saturation, then paced.
            def bridge(workers: int) -> HubTarget:
                target = hub(workdir, True)
                target.name = f"collab hub, {workers} bridge worker{'s' if workers > 1 else ''}"
                target.bridge_env = {"COLLAB_BRIDGE_WORKERS": str(workers)}
                return target

            spread_saturation: list[FanoutResult] = []
            spread_paced: list[LatencyResult] = []
            for workers in (1, args.workers):
                spread_saturation.append(run_fanout(bridge(workers), args.clients, args.saturation or 300))
                print("\n".join(saturation_rows(spread_saturation[-1:])[2:]), flush=True)
            for workers in (1, args.workers):
                spread_paced.append(run_paced(bridge(workers), args.clients, 50, args.seconds))
                print("\n".join(paced_rows(spread_paced[-1:])[2:]), flush=True)
            figures["workers"] = {
                "saturation": [asdict(r) for r in spread_saturation],
                "paced": [asdict(r) for r in spread_paced],
            }
            print(
                "\n## Bridge workers\n\n"
                + "\n".join(saturation_rows(spread_saturation))
                + "\n\n"
                + "\n".join(paced_rows(spread_paced)),
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
