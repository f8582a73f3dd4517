"""Reading a client stream one message ahead of the code that handles it.

grpc.aio reads a stream's messages one at a time: each read is a batch started in grpc's
core and finished through its completion-queue thread, which wakes the event loop, so a
handler that reads, handles and reads again waits out that round trip (30-40 µs on a
2-core machine) once a message, on top of its own work. ``ReadAhead`` keeps the next
read in flight, in a task of its own, while the handler works on the last message; on a
bulk stream of one activity a message this took the hub from 8-10k to 12-15k activities
a second (docs/BENCHMARKS.md). At most ``depth`` messages wait in the queue (and one more
in the reading task): a handler that falls behind stops the reading, and so, by HTTP/2
flow control, its client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

__all__ = ["READ_AHEAD_DEPTH", "ReadAhead"]

T = TypeVar("T")

# Two keep one read in flight while one message is handled; a few more absorb the
# handler's pauses. Small, because each may be a whole (up to 4 MB) message.
READ_AHEAD_DEPTH = 4


class _End:
    """What ends the stream in the queue: its end, or the error that ended it."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


async def _read(messages: AsyncIterator[T], queue: asyncio.Queue[T | _End]) -> None:
    try:
        async for message in messages:
            await queue.put(message)
    except Exception as error:  # handed to the reader of the queue, who raises it
        await queue.put(_End(error))
    else:
        await queue.put(_End())


class ReadAhead(Generic[T]):
    """``messages``, read by a task of their own at most ``depth`` messages ahead; the
    task runs inside ``async with``, which cancels it on the way out (a break, an error,
    an abort, a cancellation). An error ``messages`` raises is raised by the iteration
    after the messages before it."""

    def __init__(self, messages: AsyncIterator[T], *, depth: int = READ_AHEAD_DEPTH) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        self._messages = messages
        self._queue: asyncio.Queue[T | _End] = asyncio.Queue(depth)
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ReadAhead[T]:
        if self._reader is not None:
            raise RuntimeError("a ReadAhead is entered once")
        self._reader = asyncio.create_task(_read(self._messages, self._queue))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._reader is not None
        if not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    def __aiter__(self) -> ReadAhead[T]:
        return self

    async def __anext__(self) -> T:
        if self._reader is None:
            raise RuntimeError("a ReadAhead is read inside its async with")
        item = await self._queue.get()
        if isinstance(item, _End):
            self._queue.put_nowait(item)  # the end again for a later __anext__
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        return item
