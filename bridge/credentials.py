"""The one place the bridge reads a caller's credential from a request, for REST, the
WebSocket, Server-Sent Events and the per-token connection budget alike.

Where it is looked for, in this order:

- ``?token=`` in the query string, for the WebSocket and the event stream only (browsers
  cannot set headers there); the name is percent-decoded like any query parameter;
- ``Authorization: Bearer <token>``;
- ``X-API-Key: <token>``. An ``Authorization`` header with another scheme (``Basic``
  added by a proxy, say) is not a credential of this hub and does not hide ``X-API-Key``.

An empty value counts as none sent. A token is 1 to ``max_bytes`` visible ASCII
characters (``!`` to ``~``): every key the server makes and every JWT is. Anything
else (a control character, DEL, a tab, a space inside it, a non-ASCII byte, too long)
is refused here as ``InvalidCredential``, which the
endpoints answer with 401 / close 4401: it could never authenticate, and passed on it
would only fail as gRPC metadata.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

__all__ = [
    "DEFAULT_MAX_CREDENTIAL_BYTES",
    "MAX_CREDENTIAL_BYTES_LIMIT",
    "QUERY_NAME",
    "Credential",
    "InvalidCredential",
    "credential_from_headers",
    "credential_from_scope",
    "query_params",
    "token_of",
]

# (metadata name, value) for the RPCs made for the caller, in the form the server reads:
# ("authorization", "Bearer <token>") or ("x-api-key", "<token>"); None: no credential.
Credential = tuple[str, str] | None

QUERY_NAME = "token"
DEFAULT_MAX_CREDENTIAL_BYTES = 4096
# gRPC refuses request metadata over 8 KiB in all; the credential must leave room.
MAX_CREDENTIAL_BYTES_LIMIT = 7 * 1024


# HTTP's optional white space around a header value and between the scheme and the token.
_OWS = " \t"


class InvalidCredential(ValueError):
    """A credential that is malformed whatever the server's keys; the message says how,
    never quoting it."""


def _checked(token: str, where: str, max_bytes: int) -> str:
    """Return ``token`` if it is 1 to ``max_bytes`` visible ASCII characters, else raise InvalidCredential."""
    if not token:
        raise InvalidCredential(f"the {where} is empty")
    if len(token) > max_bytes:
        raise InvalidCredential(f"the {where} is longer than {max_bytes} bytes")
    for char in token:
        if not "!" <= char <= "~":
            kind = "a non-ASCII character" if char > "\x7f" else "a space" if char == " " else "a control character"
            raise InvalidCredential(f"the {where} contains {kind}; a token is visible ASCII only")
    return token


def credential_from_headers(
    headers: Iterable[tuple[bytes, bytes]], query: Mapping[str, str] | None = None, *, max_bytes: int
) -> Credential:
    """Read the caller's credential from ASGI ``headers`` (lower-case names) and, where the
    endpoint takes one, the parsed ``query``; None when none was sent. Raises
    InvalidCredential for one that is malformed."""
    if query is not None and query.get(QUERY_NAME):
        return ("authorization", f"Bearer {_checked(query[QUERY_NAME], '?token= value', max_bytes)}")
    authorization: bytes | None = None
    api_key: bytes | None = None
    for name, value in headers:
        if name == b"authorization" and authorization is None:
            authorization = value
        elif name == b"x-api-key" and api_key is None:
            api_key = value
    if authorization is not None:
        # The server's parser too ignores another scheme (collab_grpc.auth.token_from_headers).
        scheme, _, token = authorization.decode("latin-1").strip(_OWS).partition(" ")
        if scheme.lower() == "bearer" and (token := token.strip(_OWS)):
            return ("authorization", f"Bearer {_checked(token, 'bearer token', max_bytes)}")
    if api_key is not None and (token := api_key.decode("latin-1").strip(_OWS)):
        return ("x-api-key", _checked(token, "X-API-Key value", max_bytes))
    return None


def query_params(scope: Mapping[str, Any]) -> dict[str, str]:
    """Parse the request's query string, the last value of a repeated name winning and empty values dropped."""
    return dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))


def credential_from_scope(
    scope: Mapping[str, Any], query: Mapping[str, str], max_bytes: int = DEFAULT_MAX_CREDENTIAL_BYTES
) -> Credential:
    """Read the credential of a WebSocket or event-stream request: ``?token=`` (browsers
    cannot set headers there), else its headers; raises InvalidCredential for a malformed one."""
    return credential_from_headers(scope.get("headers", ()), query, max_bytes=max_bytes)


def token_of(credential: Credential) -> str:
    """Return the token itself ("" for none): the same token sent two ways is one token."""
    if credential is None:
        return ""
    name, value = credential
    return value.removeprefix("Bearer ") if name == "authorization" else value
