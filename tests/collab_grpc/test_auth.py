"""Authenticator, token_from_headers and ensure_generated_key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from collab_grpc.auth import GENERATED_KEY_FILE, Access, Authenticator, ensure_generated_key, token_from_headers
from collab_grpc.errors import PermissionDenied, Unauthenticated

WRITE_KEY = "write-key-0123456789"
READ_KEY = "read-key-0123456789"
SECRET = "a-test-secret-that-is-long-enough-for-hs256"
FULL = Access.READ | Access.WRITE


def token(claims: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


@pytest.fixture
def auth() -> Authenticator:
    return Authenticator(api_keys=[WRITE_KEY], read_keys=[READ_KEY], jwt_secret=SECRET)


# -- configuration ----------------------------------------------------------------------------


def test_enabled_needs_a_credential() -> None:
    with pytest.raises(ValueError, match="no API key"):
        Authenticator()
    with pytest.raises(ValueError):
        Authenticator(api_keys=["", ""], read_keys=[""])  # empty keys do not count


@pytest.mark.parametrize(
    "kwargs", [{"api_keys": [WRITE_KEY]}, {"read_keys": [READ_KEY]}, {"jwt_secret": SECRET}], ids=str
)
def test_any_one_credential_is_enough(kwargs: dict[str, Any]) -> None:
    assert Authenticator(**kwargs).enabled


def test_disabled_allows_everything() -> None:
    auth = Authenticator(enabled=False)
    assert auth.access(None) == FULL
    assert auth.access("anything") == FULL
    assert auth.require(None, write=True) == FULL
    assert auth.require("", write=False) == FULL


# -- API keys ---------------------------------------------------------------------------------


def test_api_key_reads_and_writes(auth: Authenticator) -> None:
    assert auth.access(WRITE_KEY) == FULL
    assert auth.require(WRITE_KEY, write=True) == FULL
    assert auth.require(WRITE_KEY, write=False) == FULL


def test_several_keys() -> None:
    auth = Authenticator(api_keys=["k1", "k2"], read_keys=["r1", "r2"])
    assert auth.access("k2") == FULL
    assert auth.access("r2") == Access.READ


def test_read_key_only_reads(auth: Authenticator) -> None:
    assert auth.access(READ_KEY) == Access.READ
    assert auth.require(READ_KEY, write=False) == Access.READ
    with pytest.raises(PermissionDenied, match="read-only"):
        auth.require(READ_KEY, write=True)


@pytest.mark.parametrize("presented", [None, ""])
def test_missing_credential(auth: Authenticator, presented: str | None) -> None:
    with pytest.raises(Unauthenticated, match="missing credential"):
        auth.access(presented)
    with pytest.raises(Unauthenticated):
        auth.require(presented, write=False)


@pytest.mark.parametrize("presented", ["wrong", WRITE_KEY + "x", WRITE_KEY[:-1], WRITE_KEY.upper(), " " + WRITE_KEY])
def test_unknown_key(auth: Authenticator, presented: str) -> None:
    with pytest.raises(Unauthenticated, match="invalid credential"):
        auth.access(presented)


# -- JWTs -------------------------------------------------------------------------------------


def test_jwt_read_scope(auth: Authenticator) -> None:
    presented = token({"scope": "read", "sub": "dashboard"})
    assert auth.access(presented) == Access.READ
    with pytest.raises(PermissionDenied):
        auth.require(presented, write=True)


@pytest.mark.parametrize("scope", ["read write", "write read", "  read   write "])
def test_jwt_read_write_scope(auth: Authenticator, scope: str) -> None:
    presented = token({"scope": scope, "exp": int(time.time()) + 300})
    assert auth.access(presented) == FULL
    assert auth.require(presented, write=True) == FULL


def test_jwt_write_only_scope_cannot_read(auth: Authenticator) -> None:
    presented = token({"scope": "write"})
    assert auth.access(presented) == Access.WRITE
    with pytest.raises(PermissionDenied, match="does not allow reads"):
        auth.require(presented, write=False)


def test_jwt_expired(auth: Authenticator) -> None:
    presented = token({"scope": "read write", "exp": int(time.time()) - 600})
    with pytest.raises(Unauthenticated, match="expired"):
        auth.access(presented)


def test_jwt_wrong_signature(auth: Authenticator) -> None:
    presented = token({"scope": "read write"}, secret="another-secret-that-is-also-long-enough")
    with pytest.raises(Unauthenticated, match="invalid token"):
        auth.access(presented)


def test_jwt_tampered_payload(auth: Authenticator) -> None:
    header, _, signature = token({"scope": "read"}).split(".")
    _, forged, _ = token({"scope": "read write"}, secret="x" * 40).split(".")
    with pytest.raises(Unauthenticated, match="invalid token"):
        auth.access(f"{header}.{forged}.{signature}")


def test_jwt_other_algorithm_refused(auth: Authenticator) -> None:
    presented = token(
        {"scope": "read write"}, secret=SECRET + "-for-hs512-needs-more-bytes-than-hs256", algorithm="HS512"
    )
    with pytest.raises(Unauthenticated, match="invalid token"):
        Authenticator(jwt_secret=SECRET + "-for-hs512-needs-more-bytes-than-hs256").access(presented)
    unsigned = token({"scope": "read write"}, secret="", algorithm="none")
    with pytest.raises(Unauthenticated, match="invalid token"):
        auth.access(unsigned)


def test_jwt_missing_scope(auth: Authenticator) -> None:
    with pytest.raises(Unauthenticated, match=r"invalid token.*scope"):
        auth.access(token({"sub": "someone"}))


@pytest.mark.parametrize("scope", ["", "admin", "readwrite", ["read", "write"], 7])
def test_jwt_unusable_scope(auth: Authenticator, scope: object) -> None:
    with pytest.raises(Unauthenticated, match="scope"):
        auth.access(token({"scope": scope}))


def test_jwt_without_configured_secret() -> None:
    auth = Authenticator(api_keys=[WRITE_KEY])
    with pytest.raises(Unauthenticated, match="invalid credential"):
        auth.access(token({"scope": "read write"}))


def test_garbage_with_two_dots(auth: Authenticator) -> None:
    with pytest.raises(Unauthenticated, match="invalid token"):
        auth.access("not.a.jwt")


def _segment(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def hmac_signed_with_header(header: dict[str, Any], claims: dict[str, Any], secret: str = SECRET) -> str:
    """A token whose header names any algorithm, signed with HMAC-SHA256 and ``secret``:
    the algorithm-confusion forgery (an RS256 header on an HMAC signature)."""
    signing_input = f"{_segment(header)}.{_segment(claims)}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def rs256_token(claims: dict[str, Any]) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(claims, key, algorithm="RS256")


REFUSED_JWTS: dict[str, tuple[Callable[[], str], str]] = {
    "expired a second ago": (lambda: token({"scope": "read write", "exp": int(time.time()) - 1}), "expired"),
    "nbf in the future": (
        lambda: token({"scope": "read write", "nbf": int(time.time()) + 600}),
        r"not yet valid \(nbf\)",
    ),
    "iat in the future": (
        lambda: token({"scope": "read write", "iat": int(time.time()) + 600}),
        r"not yet valid \(iat\)",
    ),
    "exp not a number": (lambda: token({"scope": "read write", "exp": "tomorrow"}), r"\(exp\) must be an integer"),
    "signed RS256": (lambda: rs256_token({"scope": "read write"}), "alg value is not allowed"),
    "RS256 header, HMAC signature": (
        lambda: hmac_signed_with_header({"alg": "RS256", "typ": "JWT"}, {"scope": "read write"}),
        "alg value is not allowed",
    ),
    "alg none, secret's signature": (
        lambda: hmac_signed_with_header({"alg": "none", "typ": "JWT"}, {"scope": "read write"}),
        "alg value is not allowed",
    ),
    "no alg": (lambda: hmac_signed_with_header({"typ": "JWT"}, {"scope": "read write"}), "invalid token"),
    "scope claim null": (lambda: token({"scope": None}), "scope"),
    "audience we do not check": (lambda: token({"scope": "read write", "aud": "elsewhere"}), "audience"),
}


@pytest.mark.parametrize("case", REFUSED_JWTS, ids=str)
def test_jwt_refused(auth: Authenticator, case: str) -> None:
    make, reason = REFUSED_JWTS[case]
    presented = make()
    with pytest.raises(Unauthenticated, match=reason):
        auth.access(presented)
    with pytest.raises(Unauthenticated):
        auth.require(presented, write=False)


def test_the_forgery_helper_makes_tokens_that_pass_when_honest(auth: Authenticator) -> None:
    """The refusals above are for the header, not a broken signature: the same helper
    with the true algorithm yields a token that is accepted."""
    honest = hmac_signed_with_header({"alg": "HS256", "typ": "JWT"}, {"scope": "read"})
    assert auth.access(honest) == Access.READ


def test_jwt_within_its_validity_window(auth: Authenticator) -> None:
    now = int(time.time())
    presented = token({"scope": "read", "nbf": now - 5, "iat": now - 5, "exp": now + 300})
    assert auth.require(presented, write=False) == Access.READ


# -- token_from_headers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"authorization": "Bearer abc"}, "abc"),
        ({"authorization": "bearer abc"}, "abc"),
        ({"authorization": "BEARER   abc  "}, "abc"),
        ({"x-api-key": "key-1"}, "key-1"),
        ({"authorization": "Bearer abc", "x-api-key": "key-1"}, "abc"),
        ({}, None),
        ({"x-api-key": ""}, None),
        ({"authorization": "Bearer"}, None),
        ({"authorization": "Bearer    "}, None),
        ({"authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"authorization": "abc"}, None),
        ({"authorization": "", "x-api-key": "key-1"}, "key-1"),
    ],
)
def test_token_from_headers(headers: dict[str, str], expected: str | None) -> None:
    assert token_from_headers(headers) == expected


# -- ensure_generated_key ---------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generated_key_is_created_0600(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "data"
    key, created = ensure_generated_key(data_dir)
    assert created is True
    assert len(key) >= 32
    path = data_dir / GENERATED_KEY_FILE
    assert path.read_text() == key + "\n"
    assert mode(path) == 0o600


def test_generated_key_is_reused(tmp_path: Path) -> None:
    key, _ = ensure_generated_key(tmp_path)
    again, created = ensure_generated_key(tmp_path)
    assert (again, created) == (key, False)
    assert Authenticator(api_keys=[again]).access(key) == FULL


def test_existing_key_file_is_used(tmp_path: Path) -> None:
    (tmp_path / GENERATED_KEY_FILE).write_text("  my-own-key \n")
    assert ensure_generated_key(tmp_path) == ("my-own-key", False)


def test_empty_key_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / GENERATED_KEY_FILE
    path.write_text("\n")
    path.chmod(0o600)
    key, created = ensure_generated_key(tmp_path)
    assert created is True
    assert key
    assert path.read_text() == key + "\n"


def test_two_directories_get_different_keys(tmp_path: Path) -> None:
    first, _ = ensure_generated_key(tmp_path / "a")
    second, _ = ensure_generated_key(tmp_path / "b")
    assert first != second


@pytest.mark.parametrize(("file_mode", "warned"), [(0o600, False), (0o400, False), (0o644, True), (0o640, True)])
def test_a_key_file_others_can_read_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, file_mode: int, warned: bool
) -> None:
    path = tmp_path / GENERATED_KEY_FILE
    path.write_text("their-key\n")
    path.chmod(file_mode)
    with caplog.at_level(logging.WARNING, logger="collab_grpc.auth"):
        assert ensure_generated_key(tmp_path) == ("their-key", False)
    assert mode(path) == file_mode  # reported, never changed behind the operator's back
    messages = [record.getMessage() for record in caplog.records]
    assert bool(messages) == warned
    if warned:
        assert messages == [
            f"other users can access the API key file {path} (mode {file_mode:04o}); run: chmod 600 {path}"
        ]
        assert "their-key" not in messages[0]


def test_key_written_into_existing_file_is_0600(tmp_path: Path) -> None:
    path = tmp_path / GENERATED_KEY_FILE
    path.write_text("")
    path.chmod(0o644)
    _, created = ensure_generated_key(tmp_path)
    assert created is True
    assert mode(path) == 0o600
