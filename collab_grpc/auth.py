"""Credentials and what they allow: API keys, read-only keys and HS256 JWTs.

No grpc here: the server's interceptor and tests call it directly. Auth lives in one
place, the server; the bridge forwards each caller's credential.
"""

from __future__ import annotations

import enum
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

import jwt

from collab_grpc.errors import PermissionDenied, Unauthenticated

__all__ = ["Access", "Authenticator", "ensure_generated_key", "token_from_headers"]

GENERATED_KEY_FILE = "api_key"

log = logging.getLogger("collab_grpc.auth")


class Access(enum.Flag):
    NONE = 0
    READ = enum.auto()
    WRITE = enum.auto()


# Made once: combining flags costs a call into enum's Python code each time.
_READ_WRITE = Access.READ | Access.WRITE


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
        self._api_keys = [k.encode() for k in api_keys if k]
        self._read_keys = [k.encode() for k in read_keys if k]
        self._jwt_secret = jwt_secret
        if enabled and not (self._api_keys or self._read_keys or jwt_secret):
            raise ValueError("auth is enabled but no API key, read key or JWT secret is configured")

    @staticmethod
    def _matches(token: bytes, keys: list[bytes]) -> bool:
        # Compare against every key so the time taken does not reveal which one matched.
        found = False
        for key in keys:
            found |= hmac.compare_digest(token, key)
        return found

    def access(self, token: str | None) -> Access:
        """What ``token`` grants; raises Unauthenticated when it grants nothing."""
        if not self.enabled:
            return _READ_WRITE
        if not token:
            raise Unauthenticated("missing credential: send `authorization: Bearer <token>` or `x-api-key`")
        raw = token.encode()
        if self._matches(raw, self._api_keys):
            return _READ_WRITE
        if self._matches(raw, self._read_keys):
            return Access.READ
        if self._jwt_secret and token.count(".") == 2:
            return self._jwt_access(token)
        raise Unauthenticated("invalid credential")

    def require(self, token: str | None, *, write: bool) -> Access:
        granted = self.access(token)
        needed = Access.WRITE if write else Access.READ
        if needed not in granted:
            raise PermissionDenied(
                "this credential is read-only; writes need a read+write key"
                if write
                else "this credential does not allow reads"
            )
        return granted

    def _jwt_access(self, token: str) -> Access:
        try:
            claims = jwt.decode(token, self._jwt_secret, algorithms=["HS256"], options={"require": ["scope"]})
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token has expired") from None
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
        return granted


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
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                # Someone else made or loosened it: say so, but do not change their file.
                log.warning(
                    "other users can access the API key file %s (mode %04o); run: chmod 600 %s",
                    path,
                    mode,
                    path,
                    extra={"path": str(path), "mode": f"{mode:04o}"},
                )
            return key, False
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # the mode above applies only when the file is new
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key, True
