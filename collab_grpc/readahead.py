"""Reading a client stream one message ahead of the code that handles it.

grpc.aio reads a stream's messages one at a time: each read is a batch started in grpc's
core and finished through its completion-queue thread, which wakes the event loop, so a
handler that reads, handles and reads again waits out that round trip (30-40 µs on a
2-core machine) once a message, on top of its own work. ``ReadAhead`` keeps the next
read in flight, in a task of its own, while the handler works on the last message; on a
bulk stream of one activity a message this took the hub with SQLite from 7.8-8.2k to
9.3-11.8k activities a second (docs/BENCHMARKS.md). At most ``depth`` messages wait, read
and not yet handed over: a handler that falls behind stops the reading, and so, by HTTP/2
flow control, its client.

One producer and one consumer on one event loop, so a deque and at most one waiting
future a side do what asyncio.Queue does, at a fraction of its cost a message.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Generic, TypeVar

__all__ = ["READ_AHEAD_DEPTH", "ReadAhead"]

T = TypeVar("T")

# Two keep one read in flight while one message is handled. Small, because each may be
# a whole (up to 4 MB) message: a stream holds at most this many, plus the one handled.
READ_AHEAD_DEPTH = 2


class ReadAhead(Generic[T]):
    """``messages``, read by a task of their own at most ``depth`` messages ahead; the
    task runs inside ``async with``, which cancels it on the way out (a break, an error,
    an abort, a cancellation). An error ``messages`` raises is raised by the iteration
    after the messages before it."""

    def __init__(self, messages: AsyncIterator[T], *, depth: int = READ_AHEAD_DEPTH) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        self._messages = messages
        self._depth = depth
        self._buffer: collections.deque[T] = collections.deque()
        self._ended = False
        self._error: Exception | None = None
        self._arrived: asyncio.Future[None] | None = None  # the handler waits for a message
        self._room: asyncio.Future[None] | None = None  # the reader waits for room
        self._reader: asyncio.Task[None] | None = None
        self._closing = False  # __aexit__ is cancelling the reader

    async def __aenter__(self) -> ReadAhead[T]:
        if self._reader is not None:
            raise RuntimeError("a ReadAhead is entered once")
        self._reader = asyncio.create_task(self._read(), name="collab-read-ahead")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        reader = self._reader
        assert reader is not None
        if reader.done():
            if not reader.cancelled():
                reader.exception()  # retrieved: the handler was told (see _read)
            return
        self._closing = True
        reader.cancel()
        try:
            await reader
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the handler itself is being cancelled, not only its reader

    def __aiter__(self) -> ReadAhead[T]:
        return self

    async def __anext__(self) -> T:
        if self._reader is None:
            raise RuntimeError("a ReadAhead is read inside its async with")
        if self._arrived is not None:
            raise RuntimeError("a ReadAhead has one reader at a time")
        buffer = self._buffer
        while not buffer:
            if self._ended:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._arrived = asyncio.get_running_loop().create_future()
            try:
                await self._arrived
            finally:
                self._arrived = None
        message = buffer.popleft()
        _wake(self._room)
        return message

    async def _read(self) -> None:
        buffer = self._buffer
        messages = aiter(self._messages)
        try:
            async for message in messages:
                buffer.append(message)
                _wake(self._arrived)
                while len(buffer) >= self._depth:
                    self._room = asyncio.get_running_loop().create_future()
                    try:
                        await self._room
                    finally:
                        self._room = None
        except Exception as error:  # raised to the handler, after the messages before it
            self._error = error
        except BaseException as error:
            if self._closing:
                raise
            # A stream stopped by anything else (a cancellation from inside it, an
            # interrupt) must not read as one that ended: the handler would answer OK.
            self._error = RuntimeError(f"reading the stream stopped: {error!r}")
            self._error.__cause__ = error
            raise
        finally:
            self._ended = True
            _wake(self._arrived)
            if isinstance(messages, AsyncGenerator):
                await messages.aclose()  # left waiting for room: its own clean-up runs now


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
