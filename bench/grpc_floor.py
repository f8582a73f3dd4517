"""The least a gRPC server on grpc.aio can take for the hub's path: `RecordActivity`
answered at once and its activity written to every `SubscribeEvents` stream, with no
state, store, validation, credentials or metrics. `bench.durable_tail --direct` runs it
beside the real server, so the server's own share of a record -> event latency is what
it takes above this floor, measured in the same run.

Run: ``python -m bench.grpc_floor PORT``; prints "listening on" once it serves.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator

import grpc

from collab_grpc.eventloop import run
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc

__all__ = ["FloorServicer", "main"]

# Events a subscriber that does not read may have waiting before the floor server drops
# it (a benchmark's subscriber reads; the bound only keeps the process finite).
MAX_WAITING = 10_000


class FloorServicer(pb_grpc.CollaborationServiceServicer):
    """The two RPCs of the hub's path; every other is UNIMPLEMENTED (the generated base)."""

    def __init__(self) -> None:
        self.subscribers: set[asyncio.Queue[pb.Event | None]] = set()
        self.seq = 0

    async def RecordActivity(  # noqa: N802 - the generated servicer's name
        self, request: pb.RecordActivityRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.RecordActivityResponse:
        self.seq += 1
        activity = pb.Activity(
            activity_id=f"act_{self.seq}",
            agent_id=request.agent_id,
            activity_type=request.activity_type,
            metadata=request.metadata,
        )
        event = pb.Event(seq=self.seq, activity_recorded=activity)
        event.time.FromNanoseconds(time.time_ns())
        for queue in tuple(self.subscribers):
            if queue.qsize() >= MAX_WAITING:
                self.subscribers.discard(queue)
                queue.put_nowait(None)  # its stream ends once it reads this far
            else:
                queue.put_nowait(event)
        return pb.RecordActivityResponse(activity_id=activity.activity_id, activity=activity)

    async def SubscribeEvents(  # noqa: N802 - the generated servicer's name
        self, request: pb.SubscribeEventsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.SubscribeEventsResponse]:
        queue: asyncio.Queue[pb.Event | None] = asyncio.Queue()
        self.subscribers.add(queue)
        try:
            while (event := await queue.get()) is not None:
                yield pb.SubscribeEventsResponse(event=event)
        finally:
            self.subscribers.discard(queue)


async def serve(port: int) -> None:
    server = grpc.aio.server()
    # Registered as collab-server registers its servicer, so both take the same path in grpc.
    # (The stubs mark the other methods abstract; at run time the base answers UNIMPLEMENTED.)
    floor = FloorServicer()  # type: ignore[abstract]
    pb_grpc.add_CollaborationServiceServicer_to_server(floor, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
