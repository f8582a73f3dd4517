"""Credentials and what they allow: API keys, read-only keys and HS256 JWTs.

No grpc here: the server's interceptor and tests call it directly. Auth lives in one
place, the server; the bridge forwards each caller's credential.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import jwt

from collab_grpc.errors import PermissionDenied, Unauthenticated
from collab_grpc.files import make_private_dir, warn_if_shared

__all__ = [
    "KNOWN_DEFAULT_SECRETS",
    "MIN_JWT_SECRET_BYTES",
    "MIN_KEY_CHARS",
    "TOKEN_EXPIRED",
    "Access",
    "Authenticator",
    "Grant",
    "ensure_generated_key",
    "token_from_headers",
    "weak_credentials",
]

GENERATED_KEY_FILE = "api_key"

log = logging.getLogger("collab_grpc.auth")


class Access(enum.Flag):
    NONE = 0
    READ = enum.auto()
    WRITE = enum.auto()


# Made once: combining flags costs a call into enum's Python code each time.
_READ_WRITE = Access.READ | Access.WRITE

TOKEN_EXPIRED = "token has expired"


@dataclass(frozen=True, slots=True)
class Grant:
    """What the caller's credential allows, until when, and whose it is.

    ``principal`` names the credential's holder (an API key, a JWT's subject or the
    token itself; empty with auth off): idempotency keys are scoped to it, so one
    caller can neither read nor claim another's. ``expires_at``: epoch seconds (a JWT's
    ``exp``); None for keys, valid until the configuration drops them."""

    access: Access
    expires_at: float | None = None
    # Holds the key itself for API keys: never in a repr, so never in a log line.
    principal: str = field(default="", repr=False)

    def idempotency_scope(self) -> str:
        """A digest of the principal (never the credential itself, which stores keep)."""
        if not self.principal:
            return ""
        return hashlib.sha256(self.principal.encode()).hexdigest()[:32]


_OPEN_GRANT = Grant(_READ_WRITE)


class Authenticator:
    """Maps a presented token to the access it grants, or refuses it."""

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = (),
        read_keys: Iterable[str] = (),
        jwt_secret: str = "",
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        # Each key with the grant it gives, made once (not per call).
        self._api_keys = [(k.encode(), Grant(_READ_WRITE, principal="key:" + k)) for k in api_keys if k]
        self._read_keys = [(k.encode(), Grant(Access.READ, principal="key:" + k)) for k in read_keys if k]
        self._jwt_secret = jwt_secret
        if enabled and not (self._api_keys or self._read_keys or jwt_secret):
            raise ValueError("auth is enabled but no API key, read key or JWT secret is configured")

    @staticmethod
    def _matching(token: bytes, keys: list[tuple[bytes, Grant]]) -> Grant | None:
        # Compare against every key so the time taken does not reveal which one matched.
        found = None
        for key, grant in keys:
            found = grant if hmac.compare_digest(token, key) else found
        return found

    def access(self, token: str | None) -> Access:
        """What ``token`` grants; raises Unauthenticated when it grants nothing."""
        return self.grant(token).access

    def grant(self, token: str | None) -> Grant:
        """What ``token`` grants and until when; raises Unauthenticated when it grants nothing."""
        if not self.enabled:
            return _OPEN_GRANT
        if not token:
            raise Unauthenticated("missing credential: send `authorization: Bearer <token>` or `x-api-key`")
        raw = token.encode()
        if (granted := self._matching(raw, self._api_keys) or self._matching(raw, self._read_keys)) is not None:
            return granted
        if self._jwt_secret and token.count(".") == 2:
            return self._jwt_grant(token)
        raise Unauthenticated("invalid credential")

    def require(self, token: str | None, *, write: bool) -> Access:
        return self.admit(token, write=write).access

    def admit(self, token: str | None, *, write: bool) -> Grant:
        """The grant of ``token`` if it allows the call (writes need WRITE, reads READ)."""
        granted = self.grant(token)
        needed = Access.WRITE if write else Access.READ
        if needed not in granted.access:
            raise PermissionDenied(
                "this credential is read-only; writes need a read+write key"
                if write
                else "this credential does not allow reads"
            )
        return granted

    def _jwt_grant(self, token: str) -> Grant:
        try:
            claims = jwt.decode(token, self._jwt_secret, algorithms=["HS256"], options={"require": ["scope"]})
        except jwt.ExpiredSignatureError:
            raise Unauthenticated(TOKEN_EXPIRED) from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from None
        scope = claims["scope"]
        words = set(scope.split()) if isinstance(scope, str) else set()
        granted = Access.NONE
        if "read" in words:
            granted |= Access.READ
        if "write" in words:
            granted |= Access.WRITE
        if not granted:
            raise Unauthenticated("token scope must be `read` or `read write`")
        # PyJWT has checked that `exp`, when present, is a number in the future.
        expires = claims.get("exp")
        subject = claims.get("sub")
        # A JWT's holder is its subject: a client that renews its token keeps its
        # idempotency keys. Without one, the token is all there is to go by.
        principal = f"jwt-sub:{subject}" if isinstance(subject, str) and subject else "jwt:" + token
        return Grant(granted, float(expires) if expires is not None else None, principal)


# Values found in examples and default configurations: refused whatever their length.
KNOWN_DEFAULT_SECRETS = frozenset(
    {
        "changeme",
        "change-me",
        "change_me",
        "secret",
        "secret-key",
        "secretkey",
        "your-secret-key",
        "your-256-bit-secret",
        "password",
        "admin",
        "default",
        "test",
        "token",
        "apikey",
        "api-key",
        "collab",
        "example",
        "letmein",
        "123456",
        "12345678",
        "1234567890123456",
        "00000000000000000000000000000000",
    }
)
# HS256 keys shorter than the hash (RFC 7518 section 3.2) can be brute-forced offline
# from one token; a key shorter than 16 characters can be guessed online.
MIN_JWT_SECRET_BYTES = 32
MIN_KEY_CHARS = 16


def weak_credentials(api_keys: Iterable[str], read_keys: Iterable[str], jwt_secret: str) -> list[str]:
    """Why each weak configured credential is weak (naming the setting, never the value)."""
    problems: list[str] = []
    for setting, keys in (("COLLAB_API_KEYS", api_keys), ("COLLAB_READ_KEYS", read_keys)):
        for index, key in enumerate(k for k in keys if k):
            if key.lower() in KNOWN_DEFAULT_SECRETS:
                problems.append(f"{setting} entry {index + 1} is a well-known default value")
            elif len(key) < MIN_KEY_CHARS:
                problems.append(f"{setting} entry {index + 1} is {len(key)} characters; at least {MIN_KEY_CHARS}")
    if jwt_secret:
        size = len(jwt_secret.encode())
        if jwt_secret.lower() in KNOWN_DEFAULT_SECRETS:
            problems.append("COLLAB_JWT_SECRET is a well-known default value")
        elif size < MIN_JWT_SECRET_BYTES:
            problems.append(f"COLLAB_JWT_SECRET is {size} bytes; HS256 needs at least {MIN_JWT_SECRET_BYTES}")
    return problems


def token_from_headers(headers: Mapping[str, str]) -> str | None:
    """The credential from `authorization: Bearer ...` or `x-api-key` (lower-case names)."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key") or None


def ensure_generated_key(data_dir: Path) -> tuple[str, bool]:
    """The key kept in ``data_dir``, made (mode 0600) when there is none; and whether it is new."""
    path = data_dir / GENERATED_KEY_FILE
    try:
        key = path.read_text().strip()
        if key:
            warn_if_shared(path, "the API key file", log)  # someone else made or loosened it: say so, leave their file
            return key, False
    except FileNotFoundError:
        pass
    make_private_dir(data_dir)
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # the mode above applies only when the file is new
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key, True
