"""The one credential parser every endpoint uses (bridge/credentials.py), and what goes
with it: log redaction (query credentials, a Redis password), the Host policy, and what
a caller is told when the server is unreachable."""

from __future__ import annotations

import logging

import pytest

from bridge.credentials import InvalidCredential, credential_from_headers, token_of
from bridge.errors import without_addresses
from bridge.limits import token_key
from bridge.main import RedactSecrets, redact
from bridge.origins import HostPolicy, parse_hosts
from collab_grpc.logs import TEXT_FORMAT, SafeTextFormatter, escape_controls
from collab_grpc.store.redis_store import redacted_netloc

MAX = 64


def parse(headers: dict[str, bytes], query: dict[str, str] | None = None, max_bytes: int = MAX) -> object:
    return credential_from_headers(
        [(name.encode(), value) for name, value in headers.items()], query, max_bytes=max_bytes
    )


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ({}, None, None),
        ({"authorization": b"Bearer abc"}, None, ("authorization", "Bearer abc")),
        ({"authorization": b"bearer   abc  "}, None, ("authorization", "Bearer abc")),
        ({"x-api-key": b"k1"}, None, ("x-api-key", "k1")),
        # Basic from a proxy does not hide X-API-Key, and alone it is no credential.
        ({"authorization": b"Basic dXNlcjpwdw==", "x-api-key": b"k1"}, None, ("x-api-key", "k1")),
        ({"authorization": b"Basic dXNlcjpwdw=="}, None, None),
        # Bearer wins over X-API-Key; ?token= over both, where the endpoint takes it.
        ({"authorization": b"Bearer abc", "x-api-key": b"k1"}, None, ("authorization", "Bearer abc")),
        ({"authorization": b"Bearer abc"}, {"token": "q"}, ("authorization", "Bearer q")),
        # Empty values count as none sent.
        ({"authorization": b"Bearer ", "x-api-key": b"k1"}, {"token": ""}, ("x-api-key", "k1")),
        ({"x-api-key": b""}, None, None),
        # Exactly at the cap.
        ({"x-api-key": b"k" * MAX}, None, ("x-api-key", "k" * MAX)),
    ],
)
def test_where_the_credential_is_found(
    headers: dict[str, bytes], query: dict[str, str] | None, expected: object
) -> None:
    assert parse(headers, query) == expected


@pytest.mark.parametrize(
    ("headers", "query", "said"),
    [
        ({"authorization": b"Bearer ab\x01c"}, None, "a control character"),
        ({"authorization": b"Bearer ab\x7fc"}, None, "a control character"),
        ({"authorization": b"Bearer ab\tc"}, None, "a control character"),
        ({"authorization": b"Bearer ab c"}, None, "a space"),
        ({"authorization": "Bearer abé".encode()}, None, "a non-ASCII character"),
        ({"x-api-key": b"k\x00"}, None, "a control character"),
        ({"x-api-key": b"\xff\xfe"}, None, "a non-ASCII character"),
        ({"x-api-key": b"k" * (MAX + 1)}, None, f"longer than {MAX} bytes"),
        ({"authorization": b"Bearer " + b"k" * (MAX + 1)}, None, f"longer than {MAX} bytes"),
        ({}, {"token": "a\nb"}, "a control character"),
        ({}, {"token": "\ufffd"}, "a non-ASCII character"),
        ({}, {"token": "k" * (MAX + 1)}, f"longer than {MAX} bytes"),
        # A bad X-API-Key is refused even beside a Basic Authorization.
        ({"authorization": b"Basic x", "x-api-key": b"a\x1bb"}, None, "a control character"),
    ],
)
def test_malformed_credentials_are_refused_without_quoting_them(
    headers: dict[str, bytes], query: dict[str, str] | None, said: str
) -> None:
    with pytest.raises(InvalidCredential) as refused:
        parse(headers, query)
    assert said in str(refused.value)
    sent = [value.decode("latin-1") for value in headers.values()] + list((query or {}).values())
    for text in sent:
        assert text.removeprefix("Bearer ") not in str(refused.value)


def test_the_same_token_two_ways_is_one_budget() -> None:
    bearer = parse({"authorization": b"Bearer tok"})
    header = parse({"x-api-key": b"tok"})
    query = parse({}, {"token": "tok"})
    assert token_of(bearer) == token_of(header) == token_of(query) == token_key(query) == "tok"  # type: ignore[arg-type]
    assert token_key(None) == ""


@pytest.mark.parametrize(
    "line",
    [
        '127.0.0.1:5 - "WebSocket /api/v1/collaboration/ws?client_id=a&token=SECRET" [accepted]',
        '"WebSocket /ws?%74oken=SECRET&x=1" 403',
        "/ws?a=1&%54OKEN=SECRET",
        "/ws?tok%65n=SECRET;a=1",
        "/ws?access_token=SECRET",
        "Authorization: Bearer SECRET",
        "X-API-Key: SECRET",
    ],
)
def test_log_redaction_of_every_form_the_bridge_accepts(line: str) -> None:
    assert "SECRET" not in redact(line)
    record = logging.LogRecord("uvicorn.error", logging.INFO, "", 0, "%s", (line,), None)
    assert RedactSecrets().filter(record) and "SECRET" not in record.getMessage()


def test_text_log_lines_escape_control_characters() -> None:
    assert escape_controls("a\nb\r\x1b\x7f\u2028") == "a\\nb\\r\\x1b\\x7f\\u2028"
    formatter = SafeTextFormatter(TEXT_FORMAT)
    record = logging.LogRecord("bridge.http", logging.INFO, "", 0, "GET %s 404", ("/x\n2026 INFO forged",), None)
    assert "\n" not in formatter.format(record)
    try:
        raise ValueError("bad\nforged line")
    except ValueError as error:
        record = logging.LogRecord("x", logging.ERROR, "", 0, "failed", (), (ValueError, error, error.__traceback__))
    lines = formatter.format(record).splitlines()
    assert lines[0].endswith("failed") and all(line.startswith("    ") for line in lines[1:])


@pytest.mark.parametrize(
    ("listen", "allowed", "host", "served"),
    [
        ("127.0.0.1", (), b"127.0.0.1:8000", True),
        ("127.0.0.1", (), b"localhost:8000", True),
        ("127.0.0.1", (), b"[::1]:8000", True),
        ("127.0.0.1", (), b"evil.example:8000", False),
        ("127.0.0.1", (), b"10.0.0.5:8000", False),
        ("127.0.0.1", (), None, True),  # HTTP/1.0 without Host: no browser sends that
        ("127.0.0.1", (), b"", False),
        ("127.0.0.1", ("hub.example",), b"hub.example", True),
        ("127.0.0.1", (".example.com",), b"a.b.example.com:443", True),
        ("127.0.0.1", (".example.com",), b"example.com", True),
        ("127.0.0.1", (".example.com",), b"badexample.com", False),
        ("127.0.0.1", ("*",), b"anything", True),
        ("0.0.0.0", (), b"192.0.2.7:8000", True),
        ("0.0.0.0", (), b"rebind.example:8000", False),
        ("192.0.2.7", (), b"192.0.2.7", True),
        ("192.0.2.7", (), b"127.0.0.1", False),
    ],
)
def test_host_policy(listen: str, allowed: tuple[str, ...], host: bytes | None, served: bool) -> None:
    assert HostPolicy(listen, allowed).allows(host) is served


def test_allowed_hosts_setting() -> None:
    assert parse_hosts("Hub.Example, .corp.example,*,::1, 10.0.0.1") == (
        "hub.example",
        ".corp.example",
        "*",
        "::1",
        "10.0.0.1",
    )
    for bad in ("hub.example:8000", "http://hub.example", "a b"):
        with pytest.raises(ValueError):
            parse_hosts(bad)


@pytest.mark.parametrize(
    ("details", "told"),
    [
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.1.2.3:50051: Connection refused",
            "failed to connect to all addresses; last error: UNKNOWN: [address]: Connection refused",
        ),
        ("ipv6:[fd00::7]:50051: reset", "[address]: reset"),
        ("unix:/run/collab.sock: gone", "[address]: gone"),
        (
            "the Redis store is unavailable: Error 111 connecting to redis.internal:6379.",
            "the Redis store is unavailable: Error 111 connecting to [address].",
        ),
        ("database or disk is full", "database or disk is full"),
    ],
)
def test_unavailable_details_lose_their_addresses(details: str, told: str) -> None:
    assert without_addresses(details) == told


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cr3t@cache:6379/0", ":[redacted]@cache:6379"),
        ("rediss://user:s3cr3t@cache:6380", "user:[redacted]@cache:6380"),
        ("redis://user@cache", "user@cache"),
        ("redis://cache:6379/2", "cache:6379"),
    ],
)
def test_a_redis_url_is_logged_without_its_password(url: str, shown: str) -> None:
    assert redacted_netloc(url) == shown
