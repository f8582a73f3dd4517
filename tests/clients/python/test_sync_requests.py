"""The sync client's request building and error mapping, against grpc_testing's
in-memory channel (no server): what it sends, and what each status becomes."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import grpc_testing
import pytest

from collab import Client, Conflict, InvalidArgument, NotFound, RateLimited, Unauthenticated, Unavailable
from collab_grpc.v1 import collaboration_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["CollaborationService"]


@pytest.fixture
def channel() -> Any:
    return grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        yield executor


def answer(
    channel: Any,
    method: str,
    response: Any,
    code: grpc.StatusCode = grpc.StatusCode.OK,
    details: str = "",
    trailers: Any = (),
) -> Any:
    """Take the next call of ``method``, answer it, and return the request it carried."""
    metadata, request, rpc = channel.take_unary_unary(SERVICE.methods_by_name[method])
    rpc.terminate(response, trailers, code, details)
    assert ("authorization", "Bearer t0ken") in metadata
    return request


def client(channel: Any, retries: int = 2) -> Client:
    return Client(token="t0ken", channel=channel, retries=retries, timeout=5)


def run(pool: concurrent.futures.ThreadPoolExecutor, call: Callable[[], Any]) -> concurrent.futures.Future[Any]:
    return pool.submit(call)


def test_record_activity_builds_the_request_with_an_idempotency_key(channel: Any, pool: Any) -> None:
    hub = client(channel)
    pending = run(
        pool,
        lambda: hub.record_activity(
            "agent_1", "council_debate", department="eng", metadata={"round": 2}, related_agents=["agent_2"]
        ),
    )
    request = answer(channel, "RecordActivity", pb.RecordActivityResponse(activity_id="act_1_agent_1_x"))
    assert pending.result(5) == "act_1_agent_1_x"
    assert request.agent_id == "agent_1" and request.activity_type == pb.ACTIVITY_TYPE_COUNCIL_DEBATE
    assert request.department == "eng" and list(request.related_agents) == ["agent_2"]
    assert request.metadata["round"] == 2 and len(request.idempotency_key) == 32


def test_an_unknown_activity_type_is_refused_before_any_call(channel: Any) -> None:
    with pytest.raises(ValueError, match="activity_type must be one of"):
        client(channel).record_activity("agent_1", "dancing")


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.FAILED_PRECONDITION, Conflict),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
    ],
)
def test_statuses_become_exception_types_with_the_servers_message(
    channel: Any, pool: Any, code: grpc.StatusCode, kind: type[Exception]
) -> None:
    pending = run(pool, lambda: client(channel).complete_activity("act_x"))
    answer(channel, "CompleteActivity", pb.CompleteActivityResponse(), code, "what is wrong")
    with pytest.raises(kind, match="what is wrong"):
        pending.result(5)


def test_rate_limited_carries_retry_after(channel: Any, pool: Any) -> None:
    pending = run(pool, lambda: client(channel).record_activity("a", "memory_read"))
    answer(
        channel,
        "RecordActivity",
        pb.RecordActivityResponse(),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "over its rate limit",
        (("retry-after", "2"),),
    )
    with pytest.raises(RateLimited) as limited:
        pending.result(5)
    assert limited.value.retry_after == 2.0


def test_unavailable_is_retried_with_the_same_idempotency_key(channel: Any, pool: Any) -> None:
    """The first attempt may have been recorded before the connection broke; the retry
    carries the same key, so the server answers it without recording twice."""
    pending = run(pool, lambda: client(channel).record_activity("a", "memory_read"))
    first = answer(channel, "RecordActivity", pb.RecordActivityResponse(), grpc.StatusCode.UNAVAILABLE, "gone")
    second = answer(channel, "RecordActivity", pb.RecordActivityResponse(activity_id="act_1_a_k"))
    assert pending.result(5) == "act_1_a_k"
    assert first.idempotency_key == second.idempotency_key != ""


def test_a_call_the_server_cancelled_is_retried_with_the_same_idempotency_key(channel: Any, pool: Any) -> None:
    """A server shutting down cancels calls that reached it but no handler yet."""
    pending = run(pool, lambda: client(channel).record_activity("a", "memory_read"))
    first = answer(channel, "RecordActivity", pb.RecordActivityResponse(), grpc.StatusCode.CANCELLED)
    second = answer(channel, "RecordActivity", pb.RecordActivityResponse(activity_id="act_1_a_k"))
    assert pending.result(5) == "act_1_a_k"
    assert first.idempotency_key == second.idempotency_key != ""


def test_retries_stop_after_the_configured_number(channel: Any, pool: Any) -> None:
    pending = run(pool, lambda: client(channel, retries=1).agent_status())
    for _ in range(2):
        _metadata, _request, rpc = channel.take_unary_unary(SERVICE.methods_by_name["GetAgentStatus"])
        rpc.terminate(pb.GetAgentStatusResponse(), (), grpc.StatusCode.UNAVAILABLE, "still gone")
    with pytest.raises(Unavailable, match="still gone"):
        pending.result(5)


def test_a_batch_goes_out_as_messages_of_a_hundred_activities_in_order() -> None:
    from collab import _requests as requests

    batch = [requests.record_activity(f"agent_{n}", "message_sent") for n in range(250)]
    messages = requests.bulk_messages(batch)
    assert [len(m.activities) for m in messages] == [100, 100, 50]
    assert not any(m.HasField("activity") for m in messages)
    assert [a.agent_id for m in messages for a in m.activities] == [f"agent_{n}" for n in range(250)]
    assert requests.bulk_messages([]) == []


def test_messages_stay_under_a_mebibyte_and_a_large_activity_goes_alone() -> None:
    from collab import _requests as requests

    batch = [requests.record_activity("agent", "message_sent", metadata={"blob": "x" * 50_000}) for _ in range(100)]
    batch.insert(3, requests.record_activity("agent", "message_sent", metadata={"blob": "y" * 2_000_000}))
    messages = requests.bulk_messages(batch)
    assert [a for m in messages for a in m.activities] == batch
    assert all(m.ByteSize() <= requests.BYTES_PER_MESSAGE for m in messages if len(m.activities) > 1)
    assert any(len(m.activities) == 1 and m.ByteSize() > requests.BYTES_PER_MESSAGE for m in messages)


def test_a_batch_answered_unpaired_goes_again_one_a_message_and_then_no_more() -> None:
    from collab import CollabError
    from collab import _requests as requests

    batch = [requests.record_activity(f"agent_{n}", "message_sent") for n in range(150)]
    again = requests.messages_to_resend(batch, requests.bulk_messages(batch), answered=51)
    assert [m.activity for m in again] == batch and not any(m.activities for m in again)
    with pytest.raises(CollabError, match="answered 149 results for 150 activities"):
        requests.messages_to_resend(batch, again, answered=149)
