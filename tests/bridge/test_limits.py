"""The bridge's per-client limits without I/O: the connection budget per token, the
WebSocket message rate (a token bucket, then closing a flooder), and their settings."""

from __future__ import annotations

import pytest

from bridge.config import BridgeConfig, parse_bridge_config
from bridge.credentials import credential_from_headers
from bridge.limits import FLOOD_FACTOR, FLOOD_SECONDS, Admission, ConnectionLimit, MessageRate, token_key

# -- settings ---------------------------------------------------------------------


def test_defaults_and_knobs() -> None:
    config = parse_bridge_config([], env={})
    assert config.max_connections_per_token == BridgeConfig().max_connections_per_token == 1000
    assert config.ws_messages_per_second == 20.0
    from_env = parse_bridge_config(
        [], env={"COLLAB_MAX_CONNECTIONS_PER_TOKEN": "3", "COLLAB_WS_MESSAGES_PER_SECOND": "2.5"}
    )
    assert (from_env.max_connections_per_token, from_env.ws_messages_per_second) == (3, 2.5)
    flags = ["--max-connections-per-token", "0", "--ws-messages-per-second", "0"]
    unlimited = parse_bridge_config(flags, env={"COLLAB_MAX_CONNECTIONS_PER_TOKEN": "3"})
    assert (unlimited.max_connections_per_token, unlimited.ws_messages_per_second) == (0, 0)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-connections-per-token", "-1"),
        ("--max-connections-per-token", "many"),
        ("--ws-messages-per-second", "-0.5"),
        ("--ws-messages-per-second", "nan"),
        ("--ws-messages-per-second", "inf"),
    ],
)
def test_bad_settings_stop_the_bridge_with_a_message(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_bridge_config([flag, value], env={})
    assert exited.value.code == 2
    assert flag.removeprefix("--") in capsys.readouterr().err


# -- connections per token -----------------------------------------------------------


def test_the_same_token_is_one_budget_however_it_is_sent() -> None:
    def key(name: bytes, value: bytes) -> str:
        return token_key(credential_from_headers([(name, value)], max_bytes=64))

    assert key(b"authorization", b"Bearer tok") == key(b"authorization", b"bearer  tok ") == "tok"
    assert key(b"x-api-key", b"tok") == "tok"
    assert token_key(None) == ""
    assert key(b"authorization", b"Basic dXNlcg==") == "", "not a credential of the hub"


def test_n_connections_then_refused_until_one_closes() -> None:
    limit = ConnectionLimit(3)
    slots = [limit.take("tok") for _ in range(3)]
    assert all(slots) and limit.open_for("tok") == 3
    assert limit.take("tok") is None and limit.refused == 1
    assert "3 are open" in limit.refusal()
    other = limit.take("other")  # another token has a budget of its own
    assert other is not None
    first = slots[0]
    assert first is not None
    first.release()
    first.release()  # released once, however often the connection's ends run
    assert limit.open_for("tok") == 2
    assert limit.take("tok") is not None
    for slot in (*slots[1:], other):
        assert slot is not None
        slot.release()
    assert limit.open_for("other") == 0


def test_zero_means_no_connection_limit() -> None:
    limit = ConnectionLimit(0)
    assert all(limit.take("tok") is not None for _ in range(5000))
    assert limit.refused == 0


# -- messages per second -------------------------------------------------------------


def test_a_burst_of_twice_the_rate_then_the_rate() -> None:
    rate = MessageRate(20, now=0.0)
    assert [rate.admit(0.0) for _ in range(40)] == [Admission.ACCEPT] * 40
    assert rate.admit(0.0) is Admission.DROP
    assert rate.retry_after == pytest.approx(1 / 20)
    assert "more than 20 messages per second" in rate.refusal() and "retry in 0.05 s" in rate.refusal()
    assert rate.admit(0.05) is Admission.ACCEPT  # one message's worth refilled
    assert rate.admit(0.05) is Admission.DROP
    # A second later: 20 more, not 40 (the burst refills at the rate).
    assert [rate.admit(1.05) for _ in range(21)].count(Admission.ACCEPT) == 20


def test_a_client_that_keeps_flooding_is_closed() -> None:
    rate = MessageRate(20, now=0.0)
    flood = int(FLOOD_FACTOR * 20 * FLOOD_SECONDS)  # 1,000 dropped within 5 s
    admissions: list[Admission] = []
    for i in range(10 * flood):  # 1,000 messages a second, until it is closed
        admissions.append(rate.admit(i * 0.001))
        if admissions[-1] is Admission.CLOSE:
            break
    assert admissions[-1] is Admission.CLOSE, "never closed"
    assert admissions.count(Admission.DROP) + 1 == flood  # closed at the 1,000th dropped message
    assert "1000 messages over the rate of 20 per second were dropped within 5 s" in rate.flood_reason()


def test_dropping_slowly_never_closes() -> None:
    """Drops spread over more than the window (a client retrying too eagerly, but not
    flooding) are answered, never closed for."""
    rate = MessageRate(1, now=0.0)
    now = 0.0
    for _ in range(200):  # 4 messages a second for 50 s: three of four dropped
        now += 0.25
        assert rate.admit(now) is not Admission.CLOSE


def test_zero_means_no_message_rate() -> None:
    rate = MessageRate(0, now=0.0)
    assert all(rate.admit(0.0) is Admission.ACCEPT for _ in range(10_000))


def test_connections_without_a_credential_are_counted_but_never_refused() -> None:
    """With the server's auth off every connection has no token: one shared budget would
    be a cap on the whole bridge, so none is applied to them."""
    limit = ConnectionLimit(2)
    slots = [limit.take(token_key(None)) for _ in range(5)]
    assert all(slot is not None for slot in slots) and limit.open_for("") == 5
    for slot in slots:
        assert slot is not None
        slot.release()
    assert limit.open_for("") == 0 and limit.refused == 0
