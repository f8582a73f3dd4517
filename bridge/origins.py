"""Which browser pages may open the WebSocket and the event stream: the `Origin` check.

A browser sends `Origin` with every WebSocket handshake and every cross-origin request,
and a page cannot forge it. Allowed are:

- requests without `Origin` (curl, the SDKs, agents: non-browser clients send none);
- the bridge's own pages (the dashboard at `/`): the `Origin` names the host the request
  was sent to (the `Host` header; when that carries a port, the same port). The scheme is
  not compared, so a TLS-terminating proxy in front of the bridge changes nothing;
- the origins listed in `COLLAB_ALLOWED_ORIGINS`, or any origin when it holds `*`.

The token still decides what a connection may do; this check keeps a page from another
origin from using a token it obtained (a leaked dashboard link, say) through a visitor's
browser.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

__all__ = ["OriginPolicy", "normalise_origin", "parse_origins"]

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalise_origin(value: str) -> str | None:
    """``scheme://host[:port]`` in the form browsers send (lower case, no default port,
    no trailing slash); None when ``value`` is not such an origin."""
    try:
        url = urlsplit(value.strip())
        port = url.port
    except ValueError:  # a port that is not a number, or out of range
        return None
    if not url.scheme or not url.hostname or url.username or url.password:
        return None
    if url.path not in ("", "/") or url.query or url.fragment:
        return None
    scheme = url.scheme.lower()
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    if port is None or port == DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def parse_origins(raw: str) -> tuple[str, ...]:
    """The value of ``--allowed-origins``: comma-separated origins, or ``*``."""
    origins: list[str] = []
    for part in (piece.strip() for piece in raw.split(",")):
        if not part:
            continue
        normalised = "*" if part == "*" else normalise_origin(part)
        if normalised is None:
            raise ValueError(f"{part!r} is not an origin: expected scheme://host[:port] (no path), or *")
        origins.append(normalised)
    return tuple(origins)


def _host_and_port(netloc: str, scheme: str) -> tuple[str, int | None] | None:
    try:
        url = urlsplit(f"{scheme}://{netloc}")
        return (url.hostname or "", url.port)
    except ValueError:
        return None


class OriginPolicy:
    def __init__(self, allowed: Iterable[str]) -> None:
        allowed = tuple(allowed)
        self.any = "*" in allowed
        self.allowed = frozenset(origin for origin in allowed if origin != "*")

    def refusal(self, scope: Any) -> str | None:
        """None when the request's origin is allowed, else the reason it is not."""
        if self.any:
            return None
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        raw = headers.get(b"origin")
        if raw is None:
            return None
        origin = raw.decode("latin-1")
        normalised = normalise_origin(origin)
        if normalised is not None and (normalised in self.allowed or self._same_host(normalised, headers)):
            return None
        return f"origin {origin[:100]!r} is not allowed (the bridge's own and COLLAB_ALLOWED_ORIGINS are)"

    @staticmethod
    def _same_host(origin: str, headers: dict[bytes, bytes]) -> bool:
        host_header = headers.get(b"host")
        if not host_header:
            return False
        scheme = origin.split("://", 1)[0]
        theirs = _host_and_port(origin.split("://", 1)[1], scheme)
        ours = _host_and_port(host_header.decode("latin-1"), scheme)
        if theirs is None or ours is None or theirs[0] != ours[0]:
            return False
        # A Host without a port (a proxy on 80/443 in front) matches on the name alone.
        return ours[1] is None or (theirs[1] or DEFAULT_PORTS.get(scheme)) == ours[1]
