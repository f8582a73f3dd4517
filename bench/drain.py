"""`python -m bench.drain [--events N] [--rounds R]`: how fast one SubscribeEvents reader
takes a backlog, one Event a message against EventBatches (``max_batch``), beside the
rate a bulk ingest records at, all against one `collab-server` (SQLite store) in one run.

A reader behind a burst (a bulk ingest, the bridge's upstream after a pause) must take
events faster than they are recorded or it never catches up: the issue-19 bulk ingest
cut the bridge's upstream because a stream of single events drained slower than bulk
streams recorded. The backlog is replayed from the retained events (a resume from seq 0),
the path a subscriber behind takes; each round reads it once per mode, modes alternating.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from bench.fanout import TOKEN, _stop, start_server
from collab_grpc.eventloop import run
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc

__all__ = ["main"]

METADATA = (("authorization", f"Bearer {TOKEN}"),)
PER_MESSAGE = 500  # activities per bulk message, as the SDK's recorder sends
PER_STREAM = 5_000  # activities per bulk stream (its answer stays within the reply budget)


async def _ingest(stub: pb_grpc.CollaborationServiceAsyncStub, count: int) -> float:
    """Record ``count`` activities in bulk; activities per second."""
    started = time.perf_counter()
    for first in range(0, count, PER_STREAM):
        items = [
            pb.RecordActivityRequest(agent_id=f"bulk_{n % 50}", activity_type=pb.ACTIVITY_TYPE_MEMORY_WRITE)
            for n in range(first, min(count, first + PER_STREAM))
        ]
        messages = [
            pb.BulkRecordActivitiesRequest(activities=items[at : at + PER_MESSAGE])
            for at in range(0, len(items), PER_MESSAGE)
        ]
        reply = await stub.BulkRecordActivities(iter(messages), metadata=METADATA, timeout=300)
        assert reply.recorded == len(items), reply
    return count / (time.perf_counter() - started)


async def _drain(stub: pb_grpc.CollaborationServiceAsyncStub, epoch: str, count: int, max_batch: int) -> float:
    """Replay ``count`` events from seq 0; events per second."""
    request = pb.SubscribeEventsRequest(since_seq=0, epoch=epoch, max_batch=max_batch)
    stream = stub.SubscribeEvents(request, metadata=METADATA)
    first = await stream.read()
    assert isinstance(first, pb.SubscribeEventsResponse) and first.resume.recovered, first
    started = time.perf_counter()
    taken = 0
    while taken < count:
        message = await stream.read()
        assert isinstance(message, pb.SubscribeEventsResponse)
        taken += len(message.events.events) if message.HasField("events") else 1
    seconds = time.perf_counter() - started
    stream.cancel()
    return count / seconds


async def measure(target: str, events: int, rounds: int) -> dict[str, list[float]]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub: pb_grpc.CollaborationServiceAsyncStub = pb_grpc.CollaborationServiceStub(channel)
        figures: dict[str, list[float]] = {"ingest": [await _ingest(stub, events)], "single": [], "batch500": []}
        head = stub.SubscribeEvents(pb.SubscribeEventsRequest(include_snapshot=True), metadata=METADATA)
        first = await head.read()
        head.cancel()
        assert isinstance(first, pb.SubscribeEventsResponse), first
        snapshot = first.snapshot
        for _ in range(rounds):
            figures["single"].append(await _drain(stub, snapshot.epoch, events, 0))
            figures["batch500"].append(await _drain(stub, snapshot.epoch, events, 500))
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        process, target = start_server(
            Path(workdir), COLLAB_STORE="sqlite", COLLAB_EVENT_RETAIN=str(args.events), COLLAB_SUBSCRIBER_QUEUE="1000"
        )
        try:
            figures = run(measure(target, args.events, args.rounds))
        finally:
            _stop(process)
    ingest = figures["ingest"][0]
    print(f"| measure ({args.events:,} events) | events/s (median of {args.rounds}) | ratio to bulk ingest |")
    print("|---|---|---|")
    print(f"| bulk ingest (SQLite, 500 a message) | {ingest:,.0f} | 1.00 |")
    for name, label in (("single", "replay, one Event a message"), ("batch500", "replay, max_batch 500")):
        rate = statistics.median(figures[name])
        print(f"| {label} | {rate:,.0f} | {rate / ingest:.2f} |")


if __name__ == "__main__":
    main()
