"""ReadAhead over hand-made async streams: order, errors, the depth bound, and that the
reading task never outlives its ``async with``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from collab_grpc.readahead import ReadAhead


class Source:
    """An async stream of 0..count-1 that says which reads were asked for and how it ended."""

    def __init__(
        self, count: int, *, fail_after: int | None = None, failure: BaseException | None = None, endless: bool = False
    ) -> None:
        self.count = count
        self.fail_after = fail_after
        self.failure = failure or ConnectionError(f"stream broke after {fail_after}")
        self.endless = endless
        self.asked = 0  # reads started
        self.closed = asyncio.Event()

    async def stream(self) -> AsyncIterator[int]:
        try:
            n = 0
            while self.endless or n < self.count:
                self.asked += 1
                await asyncio.sleep(0)  # a read that goes through the loop, as grpc's does
                if self.fail_after is not None and n == self.fail_after:
                    raise self.failure
                yield n
                n += 1
        finally:
            self.closed.set()


async def test_every_message_arrives_in_order_and_the_stream_ends() -> None:
    source = Source(50)
    async with ReadAhead(source.stream(), depth=3) as messages:
        received = [message async for message in messages]
        with pytest.raises(StopAsyncIteration):  # and stays ended
            await messages.__anext__()
    assert received == list(range(50))


async def test_the_next_read_is_in_flight_while_a_message_is_handled() -> None:
    source = Source(10)
    async with ReadAhead(source.stream(), depth=2) as messages:
        async for message in messages:
            # No await between receiving the message and this check: the reading task
            # asked for the next one before handing this one over.
            assert source.asked == min(message + 2, 10)


async def test_an_error_is_raised_after_the_messages_before_it() -> None:
    source = Source(10, fail_after=4)
    received: list[int] = []
    with pytest.raises(ConnectionError, match="after 4"):
        async with ReadAhead(source.stream()) as messages:
            async for message in messages:
                received.append(message)
    assert received == [0, 1, 2, 3]


async def test_reading_stops_depth_messages_ahead_of_a_handler_that_falls_behind() -> None:
    source = Source(0, endless=True)
    async with ReadAhead(source.stream(), depth=3) as messages:
        first = await messages.__anext__()
        for _ in range(20):
            await asyncio.sleep(0)
        # 1 handed over, 3 waiting, and no read in flight until there is room
        assert (first, source.asked) == (0, 4)
        await messages.__anext__()
        for _ in range(20):
            await asyncio.sleep(0)
        assert source.asked == 5


async def test_a_stream_stopped_by_a_cancellation_from_inside_it_does_not_read_as_ended() -> None:
    """A BaseException that is not the reader's own cancellation must not look like the
    stream's end, or a bulk stream cut short would be answered as complete."""
    source = Source(10, fail_after=2, failure=asyncio.CancelledError())
    received: list[int] = []
    with pytest.raises(RuntimeError, match="reading the stream stopped") as caught:
        async with ReadAhead(source.stream()) as messages:
            async for message in messages:
                received.append(message)
    assert received == [0, 1]
    assert isinstance(caught.value.__cause__, asyncio.CancelledError)


async def test_a_source_left_waiting_for_room_is_closed_on_the_way_out() -> None:
    source = Source(0, endless=True)
    async with ReadAhead(source.stream(), depth=2) as messages:
        await messages.__anext__()
        for _ in range(20):  # the reading task fills the buffer and waits for room
            await asyncio.sleep(0)
        assert not source.closed.is_set()
    assert source.closed.is_set()


@pytest.mark.parametrize("leave", ["break", "error"])
async def test_leaving_early_cancels_the_reading(leave: str) -> None:
    source = Source(0, endless=True)

    async def consume() -> None:
        async with ReadAhead(source.stream()) as messages:
            async for message in messages:
                if message == 2:
                    if leave == "error":
                        raise RuntimeError("handler failed")
                    break

    if leave == "error":
        with pytest.raises(RuntimeError):
            await consume()
    else:
        await consume()
    assert source.closed.is_set()
    assert not [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]


async def test_cancelling_the_handler_cancels_the_reading() -> None:
    source = Source(0, endless=True)
    handling = asyncio.Event()

    async def consume() -> None:
        async with ReadAhead(source.stream()) as messages:
            async for _ in messages:
                handling.set()
                await asyncio.sleep(3600)

    task = asyncio.create_task(consume())
    await handling.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.closed.is_set()
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_a_handler_cancelled_while_its_reader_winds_down_stays_cancelled() -> None:
    """__aexit__ swallows the reader's cancellation, not the handler's own."""
    winding_down = asyncio.Event()

    async def slow_to_close() -> AsyncIterator[int]:
        try:
            while True:
                await asyncio.sleep(0)
                yield 0
        finally:
            winding_down.set()
            await asyncio.sleep(0.05)  # clean-up that takes a while

    async def consume() -> str:
        async with ReadAhead(slow_to_close()) as messages:
            async for _ in messages:
                break
        return "returned"

    task = asyncio.create_task(consume())
    await winding_down.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ReadAhead(Source(1).stream(), depth=0)
    ahead = ReadAhead(Source(1).stream())
    with pytest.raises(RuntimeError, match="inside its async with"):
        await ahead.__anext__()
    async with ahead:
        with pytest.raises(RuntimeError, match="entered once"):
            await ahead.__aenter__()
        first = asyncio.create_task(ahead.__anext__())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="one reader at a time"):
            await ahead.__anext__()
        assert await first == 0
