"""The SDK's shared core (collab/_core.py) on its own, without a hub: the methods both
clients take from it, the retry rule, the paging of a search, the event cursor that
resumes a stream, the recorders' buffer and the bulk progress of a batch."""

from __future__ import annotations

import inspect
from typing import Any

import grpc
import pytest

from collab import (
    AsyncClient,
    Client,
    InvalidArgument,
    RateLimited,
    ResumeFailed,
    Settings,
    Unauthenticated,
    Unavailable,
)
from collab import _core as core
from collab import _requests as requests
from collab_grpc.v1 import collaboration_pb2 as pb

NOWHERE = "127.0.0.1:1"  # channels connect lazily: nothing is dialled in these tests


def rpc_error(code: grpc.StatusCode, details: str = "") -> grpc.RpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


def settings(retries: int = 2) -> Settings:
    return Settings(target=NOWHERE, token=None, timeout=1.0, retries=retries)


# -- the methods ------------------------------------------------------------------------------


def public_methods(cls: type) -> dict[str, Any]:
    return {name: getattr(cls, name) for name in dir(cls) if not name.startswith("_") and callable(getattr(cls, name))}


def test_both_clients_have_the_same_methods_with_the_same_parameters() -> None:
    sync, asynchronous = public_methods(Client), public_methods(AsyncClient)
    assert set(sync) == set(asynchronous)
    assert {"record_activity", "query_activities", "events", "get_collaboration"} < set(sync)
    for name in sync:
        assert inspect.signature(sync[name]).parameters == inspect.signature(asynchronous[name]).parameters, name
        # On AsyncClient every call is awaited or iterated with `async for`, and says so to
        # frameworks that check before awaiting a callback.
        if name not in ("recorder", "activity"):
            assert inspect.iscoroutinefunction(asynchronous[name]) or inspect.isasyncgenfunction(asynchronous[name])
            assert not inspect.iscoroutinefunction(sync[name]) and not inspect.isasyncgenfunction(sync[name])


def test_a_method_has_its_builders_parameters_and_docstring() -> None:
    hub = Client(NOWHERE, "token")
    try:
        bound = inspect.signature(hub.record_activity)
        assert bound.parameters == inspect.signature(requests.record_activity).parameters
        assert bound.return_annotation == "str"
        assert hub.record_activity.__doc__ == requests.record_activity.__doc__
        assert Client.record_activity.__qualname__ == "ClientBase.record_activity"
        with pytest.raises(TypeError, match="departmnt"):
            hub.record_activity("agent_1", "memory_write", departmnt="eng")  # type: ignore[call-arg]
        with pytest.raises(ValueError, match="activity_type must be one of"):
            hub.record_activity("agent_1", "dancing")
    finally:
        hub.close()


# -- retries --------------------------------------------------------------------------------


def test_unavailable_is_tried_again_with_backoff_as_often_as_the_settings_say() -> None:
    retries = core.Retries(settings(retries=2))
    assert retries.delay_after(rpc_error(grpc.StatusCode.UNAVAILABLE)) == 0.1
    assert retries.delay_after(rpc_error(grpc.StatusCode.CANCELLED)) == 0.2  # a server shutting down
    with pytest.raises(Unavailable, match="still down"):
        retries.delay_after(rpc_error(grpc.StatusCode.UNAVAILABLE, "still down"))


@pytest.mark.parametrize(
    ("code", "kind"),
    [(grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument), (grpc.StatusCode.RESOURCE_EXHAUSTED, RateLimited)],
)
def test_any_other_error_is_raised_at_once(code: grpc.StatusCode, kind: type[Exception]) -> None:
    with pytest.raises(kind, match="no"):
        core.Retries(settings()).delay_after(rpc_error(code, "no"))


# -- the history search -----------------------------------------------------------------------


def test_pages_follow_the_cursor_until_the_hub_answers_without_one() -> None:
    pages = core.Pages(requests.query_activities(page_size=2))
    first = pb.QueryActivitiesResponse(activities=[pb.Activity(activity_id="a"), pb.Activity(activity_id="b")])
    first.next_cursor = "after-b"
    assert [a.activity_id for a in pages.take(first)] == ["a", "b"]
    assert not pages.done and pages.request.cursor == "after-b" and pages.request.limit == 2
    assert [
        a.activity_id for a in pages.take(pb.QueryActivitiesResponse(activities=[pb.Activity(activity_id="c")]))
    ] == ["c"]
    assert pages.done


# -- the event cursor -------------------------------------------------------------------------


def snapshot(epoch: str, seq: int) -> pb.SubscribeEventsResponse:
    return pb.SubscribeEventsResponse(snapshot=pb.Snapshot(epoch=epoch, seq=seq))


def event(epoch: str, seq: int) -> pb.SubscribeEventsResponse:
    return pb.SubscribeEventsResponse(event=pb.Event(epoch=epoch, seq=seq))


def test_the_cursor_resubscribes_after_the_last_event_it_gave() -> None:
    cursor = core.events(types=["activity_recorded"], agent_ids=["agent_1"])
    first = cursor.request()
    assert first.include_snapshot and not first.epoch and first.since_seq == 0
    assert list(first.kinds) == [pb.EVENT_KIND_ACTIVITY_RECORDED] and list(first.agent_ids) == ["agent_1"]
    assert cursor.take(snapshot("e1", 7)) is None
    taken = cursor.take(event("e1", 8))
    assert taken is not None and taken.seq == 8
    again = cursor.request()
    assert (again.epoch, again.since_seq, again.include_snapshot) == ("e1", 8, False)
    assert list(again.kinds) == [pb.EVENT_KIND_ACTIVITY_RECORDED] and list(again.agent_ids) == ["agent_1"]


def test_the_cursor_waits_longer_after_each_break_and_resets_once_messages_flow() -> None:
    cursor = core.events()
    config = settings()
    assert cursor.delay_after(rpc_error(grpc.StatusCode.UNAVAILABLE), config) == 0.1
    assert cursor.delay_after(None, config) == 0.2  # the stream ended without an error
    assert cursor.delay_after(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED), config) == 0.4  # fell behind
    cursor.take(snapshot("e1", 0))
    assert cursor.delay_after(rpc_error(grpc.StatusCode.UNAVAILABLE), config) == 0.1
    with pytest.raises(Unauthenticated, match="bad token"):
        cursor.delay_after(rpc_error(grpc.StatusCode.UNAUTHENTICATED, "bad token"), config)


def test_a_resume_the_hub_could_not_make_is_resume_failed() -> None:
    cursor = core.events(since=3, epoch="e1")
    assert not cursor.needs_epoch and cursor.request().since_seq == 3
    refused = pb.SubscribeEventsResponse(resume=pb.ResumeResult(recovered=False, reason="epoch changed"))
    with pytest.raises(ResumeFailed, match="epoch changed"):
        cursor.take(refused)


def test_since_without_an_epoch_starts_in_the_hubs_current_one() -> None:
    cursor = core.events(since=5)
    assert cursor.needs_epoch
    cursor.start_in(snapshot("e9", 40))
    request = cursor.request()
    assert not cursor.needs_epoch and (request.epoch, request.since_seq) == ("e9", 5)


def test_an_unknown_filter_is_refused_before_any_call() -> None:
    with pytest.raises(ValueError, match="types must be one of"):
        core.events(types=["activity_exploded"])
    with pytest.raises(ValueError, match="activity_type must be one of"):
        core.events(activity_types=["dancing"])


# -- the recorders ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "limits",
    [
        {"max_batch": 0},
        {"max_buffer": 0},
        {"max_delay": 0.0},
        {"max_delay": -1.0},
    ],
)
async def test_both_recorders_refuse_limits_that_cannot_work(limits: dict[str, float]) -> None:
    async with AsyncClient(NOWHERE, "token") as async_hub:
        with (
            Client(NOWHERE, "token") as hub,
            pytest.raises(ValueError, match="max_batch and max_buffer must be at least 1"),
        ):
            hub.recorder(**limits)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_batch and max_buffer must be at least 1"):
            async_hub.recorder(**limits)  # type: ignore[arg-type]


def batch_of(count: int) -> list[pb.RecordActivityRequest]:
    return [requests.record_activity(f"agent_{n}", "message_sent") for n in range(count)]


def test_the_buffer_sets_a_batch_aside_and_puts_it_back_in_front_when_sending_fails() -> None:
    recorder = core.Batching(object(), max_batch=3, max_delay=1.0, max_buffer=4)
    first, second, third, fourth, fifth = batch_of(5)
    assert not recorder._add(first) and not recorder._add(second)
    assert recorder._add(third)  # a batch is due at max_batch
    with pytest.raises(Unavailable), recorder._flushing() as batch:
        assert batch == [first, second, third] and recorder.pending == 0
        recorder._add(fourth)  # recorded while the batch was on its way
        raise Unavailable("down")
    assert recorder._waiting == [first, second, third, fourth] and recorder._full()
    with recorder._flushing() as batch:
        recorder._settle(
            batch,
            [
                pb.BulkRecordResult(activity_id="act_1"),
                pb.BulkRecordResult(error_code="INVALID_ARGUMENT", error_message="agent_id is empty"),
                pb.BulkRecordResult(activity_id="act_3"),
                pb.BulkRecordResult(activity_id="act_4"),
            ],
        )
    assert recorder.recorded == ["act_1", "act_3", "act_4"] and recorder.pending == 0
    (failure,) = recorder.failures
    assert (failure.request, failure.code) == (second, "INVALID_ARGUMENT")
    assert not recorder._add(fifth)


def test_a_bulk_answer_that_covers_part_of_the_batch_sends_the_rest_on_a_new_stream() -> None:
    batch = batch_of(250)
    progress = core.BulkProgress(batch)
    assert [len(m.activities) for m in progress.messages] == [100, 100, 50]
    partial = pb.BulkRecordActivitiesResponse(
        results=[pb.BulkRecordResult(activity_id=f"act_{n}") for n in range(120)], incomplete=True
    )
    assert not progress.take(partial)
    assert [a for m in progress.messages for a in m.activities] == batch[120:]
    rest = pb.BulkRecordActivitiesResponse(
        results=[pb.BulkRecordResult(activity_id=f"act_{n}") for n in range(120, 250)]
    )
    assert progress.take(rest)
    assert [r.activity_id for r in progress.results] == [f"act_{n}" for n in range(250)]
