"""`python -m bench.retention [--rate 1000] [--seconds 60] [--retain 10000]`: does the
SQLite store's retention keep up? A collab-server (SQLite, ``--retain-count``) takes
``rate`` activities a second in bulk, each expiring a second later (its completion is a
second event: 2 x ``rate`` events a second), for ``seconds``; every second the file is
read beside it (rows of events and completed activities, bytes of the file and its WAL),
then again once writes stop, until the rows are at the count.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from bench.fanout import TOKEN, _stop, start_server
from collab_grpc.store.sqlite import FILE_NAME
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc

__all__ = ["main"]


def _sample(data_dir: Path) -> tuple[int, int, int]:
    """(events, completed activities, bytes of the file and its WAL)."""
    path = data_dir / FILE_NAME
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        (events,) = connection.execute("SELECT count(*) FROM events").fetchone()
        (completed,) = connection.execute("SELECT count(*) FROM activities WHERE status != 'active'").fetchone()
    finally:
        connection.close()
    size = sum(os.path.getsize(f"{path}{suffix}") for suffix in ("", "-wal") if os.path.exists(f"{path}{suffix}"))
    return int(events), int(completed), size


def _write(target: str, rate: int, seconds: float, sent: list[int]) -> None:
    """``rate`` activities a second, 100 a message, for ``seconds``; a new bulk stream
    every 5,000 (a stream's answer holds a bounded number of results)."""
    per_message, per_stream = 100, 50
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.CollaborationServiceStub(channel)
        start = time.monotonic()
        messages = int(rate * seconds / per_message)

        def requests(first: int) -> Iterator[pb.BulkRecordActivitiesRequest]:
            for n in range(first, min(messages, first + per_stream)):
                delay = start + n * per_message / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                sent[0] += per_message
                yield pb.BulkRecordActivitiesRequest(
                    activities=[
                        pb.RecordActivityRequest(
                            agent_id=f"agent_{(n + i) % 48}",
                            department="engineering",
                            activity_type=pb.ACTIVITY_TYPE_MESSAGE_SENT,
                        )
                        for i in range(per_message)
                    ]
                )

        for first in range(0, messages, per_stream):
            answer = stub.BulkRecordActivities(
                requests(first), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=seconds + 120
            )
            assert not answer.incomplete and answer.failed == 0, answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.retention", description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=1000, help="activities a second (events: twice that)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--retain", type=int, default=10_000, help="the server's --retain-count")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # on the disk the store would use
        data_dir = Path(tmp)
        server, target = start_server(
            data_dir, COLLAB_STORE="sqlite", COLLAB_RETAIN_COUNT=str(args.retain), COLLAB_ACTIVITY_TTL="1"
        )
        try:
            sent = [0]
            writer = threading.Thread(target=_write, args=(target, args.rate, args.seconds, sent))
            started = time.monotonic()
            writer.start()
            most = (0, 0, 0)
            print("| s | activities sent | event rows | completed activity rows | file + WAL MB |")
            print("|---|---|---|---|---|")
            while writer.is_alive():
                time.sleep(1.0)
                events, completed, size = _sample(data_dir)
                most = (max(most[0], events), max(most[1], completed), max(most[2], size))
                elapsed = time.monotonic() - started
                print(f"| {elapsed:.0f} | {sent[0]:,} | {events:,} | {completed:,} | {size / 1e6:.1f} |")
            writer.join()
            stopped = time.monotonic()
            while True:
                time.sleep(1.0)
                events, completed, size = _sample(data_dir)
                if (events, completed) == (args.retain, args.retain) or time.monotonic() - stopped > 120:
                    break
            print(
                f"\nwriting: at most {most[0]:,} event rows, {most[1]:,} completed activity rows, "
                f"{most[2] / 1e6:.1f} MB (retain {args.retain:,}); {time.monotonic() - stopped:.0f} s after the writes "
                f"stopped: {events:,} event rows, {completed:,} completed, {size / 1e6:.1f} MB"
            )
        finally:
            _stop(server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
