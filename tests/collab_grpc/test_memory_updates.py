"""ListMemoryUpdates: the newest memory updates the event log retains, newest first, by
page; what a dashboard that opens now shows of memory."""

from __future__ import annotations

import grpc
import pytest

from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.validation import encode_cursor
from tests.conftest import HubFactory
from tests.support.rpc import READ_KEY, Client


async def record(
    client: Client, agent_id: str, item_id: str, operation: pb.MemoryOperation.ValueType = pb.MEMORY_OPERATION_WRITE
) -> None:
    request = pb.RecordMemoryUpdateRequest(operation=operation, item_id=item_id, agent_id=agent_id)
    await client.stub.RecordMemoryUpdate(request, metadata=client.metadata)


async def test_pages_newest_first_by_agent_and_only_what_the_log_retains(make_hub: HubFactory) -> None:
    running, client = await make_hub(event_retain=30)
    for n in range(20):
        await record(client, f"agent_{n % 2}", f"item_{n}")
        await client.record(f"agent_{n % 2}")  # other events in between
    stub, meta = client.stub, client.metadata
    # 40 events, 30 retained: the 5 oldest updates (events 1, 3, 5, 7, 9) are gone.
    seen: list[str] = []
    seqs: list[int] = []
    cursor = ""
    while True:
        page = await stub.ListMemoryUpdates(pb.ListMemoryUpdatesRequest(limit=4, cursor=cursor), metadata=meta)
        assert page.epoch == running.servicer.state.epoch and page.oldest_retained_seq == 11
        seen += [u.update.item_id for u in page.updates]
        seqs += [u.seq for u in page.updates]
        if not page.next_cursor:
            break
        cursor = page.next_cursor
    assert seen == [f"item_{n}" for n in range(19, 4, -1)]
    assert seqs == sorted(seqs, reverse=True) and seqs[-1] >= 11
    mine = await stub.ListMemoryUpdates(pb.ListMemoryUpdatesRequest(agent_id="agent_1"), metadata=meta)
    assert [u.update.item_id for u in mine.updates] == [f"item_{n}" for n in range(19, 4, -2)]
    assert not mine.next_cursor
    # Read access is enough: it changes nothing.
    reader = Client.connect(f"127.0.0.1:{running.port}", READ_KEY)
    try:
        assert (
            await reader.stub.ListMemoryUpdates(pb.ListMemoryUpdatesRequest(limit=1), metadata=reader.metadata)
        ).updates
    finally:
        await reader.close()


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"limit": 501}, "limit"),
        ({"limit": -1}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor is not a cursor this listing gave out"),
        ({"cursor": encode_cursor("decisions", 3)}, "cursor is not a cursor this listing gave out"),
        ({"cursor": encode_cursor("memory", 3, "an-older-epoch")}, "epoch changed"),
        ({"agent_id": "has space"}, "agent_id"),
    ],
)
async def test_bad_requests_are_refused_with_a_reason(
    make_hub: HubFactory, request_fields: dict[str, object], message: str
) -> None:
    _, client = await make_hub()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.stub.ListMemoryUpdates(pb.ListMemoryUpdatesRequest(**request_fields), metadata=client.metadata)  # type: ignore[arg-type]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (refused.value.details() or "")
