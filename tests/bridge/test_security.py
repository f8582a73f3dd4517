"""The bridge's security options without processes: the Origin policy, the TLS file
checks and the log redaction. tests/integration/test_security.py runs them for real."""

from __future__ import annotations

import logging
import sys
from typing import Any

import pytest

from bridge.config import parse_bridge_config
from bridge.main import RedactSecrets
from bridge.origins import OriginPolicy, normalise_origin, parse_origins
from bridge.tls import check_tls_files, upstream_channel
from tests.support.tls import TLSFiles, make_tls_files


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


# -- origins ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://dash.example.com", "https://dash.example.com"),
        ("HTTPS://Dash.Example.COM/", "https://dash.example.com"),
        ("https://dash.example.com:443", "https://dash.example.com"),
        ("http://localhost:80", "http://localhost"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("http://[::1]:8000", "http://[::1]:8000"),
        ("chrome-extension://abcdef", "chrome-extension://abcdef"),
        ("dash.example.com", None),
        ("https://dash.example.com/app", None),
        ("https://dash.example.com?x=1", None),
        ("https://user:pw@dash.example.com", None),
        ("https://dash.example.com:99999", None),
        ("https://dash.example.com:port", None),
        ("https://", None),
        ("null", None),
        ("", None),
    ],
)
def test_normalise_origin(raw: str, expected: str | None) -> None:
    assert normalise_origin(raw) == expected


def test_parse_origins() -> None:
    assert parse_origins("https://a.example, http://b.example:8080 ,,") == (
        "https://a.example",
        "http://b.example:8080",
    )
    assert parse_origins("*") == ("*",)
    assert parse_origins("") == ()
    with pytest.raises(ValueError, match=r"'https://a.example/path' is not an origin"):
        parse_origins("https://b.example,https://a.example/path")


def test_a_bad_allowed_origin_stops_the_bridge(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_bridge_config([], {"COLLAB_ALLOWED_ORIGINS": "dash.example.com"})
    assert exited.value.code == 2
    assert "--allowed-origins / COLLAB_ALLOWED_ORIGINS: invalid value 'dash.example.com'" in capsys.readouterr().err
    config = parse_bridge_config(["--allowed-origins", "https://Dash.example.com:443"], {})
    assert config.allowed_origins == ("https://dash.example.com",)
    assert parse_bridge_config([], {}).allowed_origins == ()


def scope(origin: str | None, host: str | None = "127.0.0.1:8000") -> dict[str, Any]:
    headers = [(b"host", host.encode())] if host is not None else []
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return {"type": "websocket", "headers": headers}


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        (None, "127.0.0.1:8000", True),  # curl, the SDKs, agents
        ("http://127.0.0.1:8000", "127.0.0.1:8000", True),  # the dashboard the bridge serves
        ("https://127.0.0.1:8000", "127.0.0.1:8000", True),  # the same, over TLS
        ("http://hub.example.com", "hub.example.com", True),  # behind a proxy on port 80
        ("https://hub.example.com", "hub.example.com", True),  # behind a TLS-terminating proxy
        ("https://hub.example.com", "hub.example.com:443", True),
        ("http://hub.example.com", "hub.example.com:443", False),  # port 80 is another origin
        ("http://127.0.0.1:8001", "127.0.0.1:8000", False),  # another port is another origin
        ("http://localhost:8000", "127.0.0.1:8000", False),  # another name, though the same machine
        ("https://evil.example", "127.0.0.1:8000", False),
        ("https://evil.example", None, False),  # no Host to compare with
        ("http://127.0.0.1:8000.evil.example", "127.0.0.1:8000", False),
        ("null", "127.0.0.1:8000", False),  # sandboxed frames and file:// pages
        ("not an origin", "127.0.0.1:8000", False),
    ],
)
def test_default_policy_allows_only_the_bridges_own_pages(origin: str | None, host: str | None, allowed: bool) -> None:
    refusal = OriginPolicy(()).refusal(scope(origin, host))
    assert (refusal is None) == allowed
    if not allowed:
        assert refusal is not None and "is not allowed" in refusal


def test_listed_origins_are_allowed_besides_the_bridges_own() -> None:
    policy = OriginPolicy(parse_origins("https://dash.example.com,http://localhost:3000"))
    assert policy.refusal(scope("https://dash.example.com")) is None
    assert policy.refusal(scope("https://DASH.example.com:443")) is None
    assert policy.refusal(scope("http://localhost:3000")) is None
    assert policy.refusal(scope("http://127.0.0.1:8000")) is None
    assert policy.refusal(scope("http://dash.example.com")) is not None
    assert policy.refusal(scope("https://evil.example")) is not None


def test_star_allows_any_origin() -> None:
    policy = OriginPolicy(parse_origins("*"))
    for origin in ("https://evil.example", "null", "not an origin", None):
        assert policy.refusal(scope(origin)) is None


# -- TLS files ------------------------------------------------------------------------------------


def test_tls_files_pass_when_usable(tls: TLSFiles) -> None:
    config = parse_bridge_config(
        ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--grpc-tls-ca", str(tls.ca)], {}
    )
    check_tls_files(config)
    check_tls_files(parse_bridge_config([], {}))


@pytest.mark.parametrize(
    ("cert", "key", "ca", "message"),
    [
        ("cert", "key", "junk", r"--grpc-tls-ca / COLLAB_GRPC_TLS_CA .*junk\.pem holds no PEM CA certificate"),
        ("cert", "key", "key", r"key\.pem holds no PEM CA certificate"),
        ("cert", "key", "missing", r"cannot read --grpc-tls-ca / COLLAB_GRPC_TLS_CA .*missing\.pem"),
        ("missing", "key", None, r"missing\.pem is not a readable file"),
        ("cert", "junk", None, r"not a PEM certificate and PEM private key"),
        ("junk", "key", None, r"not a PEM certificate and PEM private key"),
        ("cert", "other_key", None, r"the key does not belong to the certificate"),
        ("cert", "encrypted_key", None, r"the key is encrypted"),
    ],
)
def test_unusable_tls_files_are_refused(tls: TLSFiles, cert: str, key: str, ca: str | None, message: str) -> None:
    def path(name: str) -> str:
        return str(tls.ca.parent / "missing.pem") if name == "missing" else str(getattr(tls, name))

    argv = ["--tls-cert", path(cert), "--tls-key", path(key)]
    if ca is not None:
        argv += ["--grpc-tls-ca", path(ca)]
    with pytest.raises(ValueError, match=message):
        check_tls_files(parse_bridge_config(argv, {}))


def test_https_needs_cert_and_key(tls: TLSFiles, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_bridge_config([], {"COLLAB_TLS_CERT": str(tls.cert)})
    assert exited.value.code == 2
    assert "must be set together" in capsys.readouterr().err


def test_an_empty_ca_file_is_refused(tls: TLSFiles) -> None:
    """ssl loads an empty file as "no certificates" without complaint; it would trust nothing."""
    empty = tls.ca.parent / "empty.pem"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pem holds no PEM CA certificate"):
        check_tls_files(parse_bridge_config(["--grpc-tls-ca", str(empty)], {}))


async def test_upstream_channel_refuses_an_unusable_ca(tls: TLSFiles) -> None:
    channel = upstream_channel("127.0.0.1:1", tls.ca)
    await channel.close(None)
    with pytest.raises(ValueError, match="holds no PEM CA certificate"):
        upstream_channel("127.0.0.1:1", tls.junk)


# -- secrets in logs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "args", "expected"),
    [
        (
            '%s - "WebSocket %s" [accepted]',
            ("127.0.0.1:5", "/api/v1/collaboration/ws?client_id=a&token=s3cr3t&since=4"),
            '127.0.0.1:5 - "WebSocket /api/v1/collaboration/ws?client_id=a&token=[redacted]&since=4" [accepted]',
        ),
        ("GET %s", ("/?token=s3cr3t",), "GET /?token=[redacted]"),
        ("< authorization: Bearer %s", ("s3cr3t",), "< authorization: Bearer [redacted]"),
        ("< x-api-key: %s", ("s3cr3t",), "< x-api-key: [redacted]"),
        ("nothing secret in %s", ("here",), "nothing secret in here"),
        ('GET /ws?token="%s"', ("s3cr3t",), 'GET /ws?token="[redacted]"'),
    ],
)
def test_redact_secrets(template: str, args: tuple[str, ...], expected: str) -> None:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, template, args, None)
    record.__dict__["url"] = "ws://h/ws?token=s3cr3t"  # an `extra` field
    assert RedactSecrets().filter(record) is True
    assert record.getMessage() == expected
    assert record.__dict__["url"] == "ws://h/ws?token=[redacted]"


def test_a_traceback_quoting_a_credential_is_redacted() -> None:
    try:
        raise ValueError("cannot open ws://h/ws?client_id=a&token=s3cr3t")
    except ValueError:
        record = logging.LogRecord("bridge", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert RedactSecrets().filter(record) is True
    text = logging.Formatter().format(record)
    assert "s3cr3t" not in text and "token=[redacted]" in text and "ValueError" in text


def test_a_traceback_without_secrets_is_left_to_the_formatter() -> None:
    try:
        raise ValueError("nothing secret")
    except ValueError:
        record = logging.LogRecord("bridge", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert RedactSecrets().filter(record) is True
    assert record.exc_info is not None and record.getMessage() == "failed"


def test_redaction_leaves_malformed_records_to_logging() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d token=%s", ("not a number", "a"), None)
    assert RedactSecrets().filter(record) is True  # logging itself reports the bad arguments
