"""gRPC plumbing for tests: stubs with credentials, and draining streams."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc

from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc

__all__ = [
    "JWT_SECRET",
    "READ_KEY",
    "WRITE_KEY",
    "Client",
    "activity",
    "all_events",
    "bearer",
    "drain",
    "head_seq",
    "take",
    "trailer",
]

EOF: object = getattr(grpc.aio, "EOF")  # noqa: B009 - the type stubs do not declare grpc.aio.EOF
WRITE_KEY = "test-write-key-of-the-suite"
READ_KEY = "test-read-key-of-the-suite"
JWT_SECRET = "test-jwt-secret-that-is-long-enough-for-hs256"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Client:
    """A channel and stub that send one credential on every call."""

    target: str
    channel: grpc.aio.Channel
    stub: pb_grpc.CollaborationServiceAsyncStub
    token: str | None

    @classmethod
    def connect(cls, target: str, token: str | None = WRITE_KEY) -> Client:
        channel = grpc.aio.insecure_channel(target)
        return cls(target, channel, pb_grpc.CollaborationServiceStub(channel), token)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.token) if self.token else ()

    async def record(
        self, agent_id: str = "agent_1", kind: pb.ActivityType.ValueType = pb.ACTIVITY_TYPE_MEMORY_WRITE, **fields: Any
    ) -> str:
        response = await self.stub.RecordActivity(activity(agent_id, kind, **fields), metadata=self.metadata)
        return response.activity_id

    async def subscribe(self, **fields: Any) -> grpc.aio.UnaryStreamCall[Any, pb.SubscribeEventsResponse]:
        """A live subscription, returned once the server has registered it (its snapshot
        has arrived), so every event recorded after this returns is delivered."""
        request = pb.SubscribeEventsRequest(include_snapshot=True, **fields)
        stream = self.stub.SubscribeEvents(request, metadata=self.metadata)
        first = await stream.read()
        assert isinstance(first, pb.SubscribeEventsResponse) and first.HasField("snapshot"), first
        return stream

    async def close(self) -> None:
        await self.channel.close(None)


def activity(
    agent_id: str = "agent_1", kind: pb.ActivityType.ValueType = pb.ACTIVITY_TYPE_MEMORY_WRITE, **fields: Any
) -> pb.RecordActivityRequest:
    request = pb.RecordActivityRequest(agent_id=agent_id, activity_type=kind, department="engineering", **fields)
    return request


async def take(
    stream: grpc.aio.UnaryStreamCall[Any, pb.SubscribeEventsResponse], count: int
) -> list[pb.SubscribeEventsResponse]:
    """The next ``count`` messages of ``stream`` (read with ``read()``, never iterated,
    since grpc forbids mixing the two styles on one call)."""
    messages: list[pb.SubscribeEventsResponse] = []
    while len(messages) < count:
        message = await stream.read()
        assert isinstance(message, pb.SubscribeEventsResponse), f"stream ended after {len(messages)} of {count}"
        messages.append(message)
    return messages


def trailer(error: grpc.aio.AioRpcError, name: str) -> str:
    """One trailing metadata value of a failed call (the type stubs mistype the pairs)."""
    pairs = cast("Sequence[tuple[str, str]]", error.trailing_metadata() or ())
    values = [value for key, value in pairs if key == name]
    assert values, f"no {name!r} trailer in {pairs}"
    return values[0]


def binary_trailer(error: grpc.aio.AioRpcError, name: str) -> bytes:
    """One binary (``-bin``) trailing metadata value of a failed call."""
    pairs = cast("Sequence[tuple[str, bytes]]", error.trailing_metadata() or ())
    values = [value for key, value in pairs if key == name]
    assert values, f"no {name!r} trailer in {[key for key, _ in pairs]}"
    return values[0]


async def drain(stream: grpc.aio.UnaryStreamCall[Any, Any], per_message_timeout: float = 10.0) -> int:
    """Read ``stream`` to its end; the number of messages read. A final error status
    is raised as AioRpcError, as the stream itself raises it."""
    count = 0
    while await asyncio.wait_for(stream.read(), per_message_timeout) is not EOF:
        count += 1
    return count


async def head_seq(client: Client) -> int:
    """The seq of the newest event the server has (its snapshot's)."""
    stream = client.stub.SubscribeEvents(pb.SubscribeEventsRequest(include_snapshot=True), metadata=client.metadata)
    first = await stream.read()
    stream.cancel()
    assert isinstance(first, pb.SubscribeEventsResponse)
    return first.snapshot.seq


async def all_events(client: Client, epoch: str) -> list[pb.Event]:
    """Every retained event, replayed from the start of the history."""
    stream = client.stub.SubscribeEvents(pb.SubscribeEventsRequest(since_seq=0, epoch=epoch), metadata=client.metadata)
    first = await stream.read()
    assert isinstance(first, pb.SubscribeEventsResponse) and first.resume.recovered, first
    events: list[pb.Event] = []
    head = await head_seq(client)
    while not events or events[-1].seq < head:
        message = await asyncio.wait_for(stream.read(), 10)
        assert isinstance(message, pb.SubscribeEventsResponse)
        events.append(message.event)
    stream.cancel()
    return events
