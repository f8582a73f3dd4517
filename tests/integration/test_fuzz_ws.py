"""Bad input over a real WebSocket to a real `collab-bridge` (over a real `collab-server`):
hypothesis sends text frames of random and malformed JSON, huge and deeply nested
messages, binary frames of random bytes (not UTF-8, mostly). Every frame gets exactly one
reply (`error` unless it happened to be a valid `ping`/`subscribe`), the connection stays
usable (a `ping` afterwards gets `pong`), and the hub is as it was: its seq and what the
REST reads show are equal before and after. A text frame that is not UTF-8 breaks the
WebSocket protocol itself: the bridge closes with 1007 (RFC 6455), and the next
connection is served as usual.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.support.fuzz import run_property, ws_texts
from tests.support.stack import API, AUTH, Stack, running_stack

pytestmark = pytest.mark.integration

MAX_BYTES = 64 * 1024
TIMEOUT = 10.0
EXAMPLES = 500


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # The message rate is tested in test_limits.py; here it would drop the fuzzer's frames.
    bridge_env = {"COLLAB_WS_MESSAGES_PER_SECOND": "0"}
    with running_stack(tmp_path_factory.mktemp("fuzz-ws"), bridge_env=bridge_env) as running:
        yield running


def hub_state(stack: Stack) -> tuple[Any, ...]:
    with httpx.Client(base_url=stack.bridge.http, headers=AUTH, timeout=TIMEOUT) as http:
        return (
            http.get("/readyz").json()["seq"],
            http.get(f"{API}/agent-status").json(),
            http.get(f"{API}/activity-feed?limit=500").json(),
            http.get(f"{API}/active-collaborations").json(),
            http.get(f"{API}/ended-collaborations?limit=500").json(),
        )


def reply(ws: ClientConnection) -> dict[str, Any]:
    """The next message that is not a status tick (they come every 2 s whatever is sent)."""
    while True:
        message: dict[str, Any] = json.loads(ws.recv(timeout=TIMEOUT))
        if message["type"] != "agent_status_update":
            return message


@contextmanager
def open_connection(stack: Stack, client_id: str) -> Iterator[ClientConnection]:
    with connect(stack.ws_url(client_id=client_id), max_size=None, open_timeout=TIMEOUT) as ws:
        opening = [json.loads(ws.recv(timeout=TIMEOUT)) for _ in range(2)]
        assert [m["type"] for m in opening] == ["connection_established", "collaboration_state"]
        yield ws


def frames() -> st.SearchStrategy[list[str | bytes]]:
    # A text frame is UTF-8: lone surrogates (which no client can send) become "?".
    texts = ws_texts(MAX_BYTES).map(lambda text: text.encode("utf-8", "replace").decode("utf-8"))
    # Over twice the limit the WebSocket protocol closes with 1009 (test_edge_abuse.py);
    # up to that every frame gets a reply and the connection stays.
    texts = texts.filter(lambda text: len(text.encode()) <= 2 * MAX_BYTES)
    return st.lists(texts | st.binary(max_size=2048), min_size=1, max_size=3)


def test_random_frames_get_replies_and_change_nothing(stack: Stack) -> None:
    before = hub_state(stack)
    replies: Counter[str] = Counter()
    with open_connection(stack, "fuzzer") as ws:

        def check(sent: list[str | bytes]) -> None:
            for frame in sent:
                ws.send(frame)  # str: a text frame, bytes: a binary one
            for frame in sent:
                answer = reply(ws)
                replies[answer["type"]] += 1
                assert answer["type"] in {"error", "pong", "subscribed"}, answer
                if answer["type"] == "error":
                    assert isinstance(answer["error"], str) and answer["error"], answer
                if isinstance(frame, bytes):
                    assert answer["type"] == "error" and "binary" in answer["error"], answer

        count = run_property("WebSocket frames to a real bridge", frames(), check, EXAMPLES)
        ws.send(json.dumps({"type": "subscribe", "activity_types": []}))  # whatever the fuzzer subscribed to
        assert reply(ws)["type"] == "subscribed"
        ws.send(json.dumps({"type": "ping"}))
        assert reply(ws)["type"] == "pong", "the connection is still served"
    print(f"  {count} examples, replies: {dict(replies)}")
    assert replies["error"] > replies["pong"] + replies["subscribed"]
    assert hub_state(stack) == before, "bad input changed the hub"


def test_a_text_frame_that_is_not_utf8_closes_with_1007_and_the_next_connection_is_served(stack: Stack) -> None:
    before = hub_state(stack)
    with open_connection(stack, "not_utf8") as ws:
        ws.send(b'{"type": "ping", "x": "\xff\xfe"}', text=True)  # sent as text, not UTF-8
        with pytest.raises(ConnectionClosed) as closed:
            reply(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
    with open_connection(stack, "after_not_utf8") as ws:
        ws.send(json.dumps({"type": "ping"}))
        assert reply(ws)["type"] == "pong"
    assert hub_state(stack) == before
