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

The `Host` check (HostPolicy, HostCheck) comes first, on every request: a page on a
name its owner points at 127.0.0.1 (DNS rebinding) is same-origin with itself, so its
`Origin` passes the check above; its `Host` still names the attacker's domain. Allowed
are the listen address's own names (for a loopback address: `localhost` and loopback
IPs; for a wildcard address: any IP, `localhost` and the machine's host name), the names
in `COLLAB_ALLOWED_HOSTS` (`.example.com`: the domain and its subdomains; `*`: any), and
requests without `Host` (HTTP/1.0; browsers always send it). The port is not compared.
Refused: HTTP 400, or WebSocket close 4403 after an `error` message.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from bridge.limits import ThrottledLog
from bridge.protocol import error

__all__ = ["HostCheck", "HostPolicy", "OriginPolicy", "normalise_origin", "parse_hosts", "parse_origins"]

log = logging.getLogger("bridge.origins")
CLOSE_FORBIDDEN = 4403
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")

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


def parse_hosts(raw: str) -> tuple[str, ...]:
    """The value of ``--allowed-hosts``: comma-separated host names or IPs (no port),
    ``.domain`` for a domain and its subdomains, or ``*``."""
    hosts: list[str] = []
    for part in (piece.strip().lower() for piece in raw.split(",")):
        if not part:
            continue
        name = part.removeprefix(".").strip("[]")
        if part != "*" and not _is_ip(name) and not _HOST_NAME.fullmatch(name):
            raise ValueError(f"{part!r} is not a host: expected a name or IP without a port, .domain, or *")
        hosts.append(part if part.startswith(".") or part == "*" else name)
    return tuple(hosts)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class HostPolicy:
    """Which ``Host`` headers the bridge answers (see the module's docstring)."""

    def __init__(self, listen_host: str, allowed: Iterable[str] = ()) -> None:
        allowed = tuple(allowed)
        self.any = "*" in allowed
        self.names = {host.rstrip(".") for host in allowed if not host.startswith(".") and host != "*"}
        self.domains = tuple(host for host in allowed if host.startswith("."))
        listen = listen_host.strip("[]").lower()
        self.any_ip = listen in ("", "0.0.0.0", "::")
        self.loopback_ips = False
        if self.any_ip:
            self.names |= {"localhost", socket.gethostname().lower()}
        elif listen == "localhost" or (_is_ip(listen) and ipaddress.ip_address(listen).is_loopback):
            self.names |= {"localhost", listen}
            self.loopback_ips = True
        else:
            self.names.add(listen)

    def allows(self, host_header: bytes | None) -> bool:
        if self.any or host_header is None:
            return True
        parsed = _host_and_port(host_header.decode("latin-1"), "http")
        if parsed is None or not parsed[0]:
            return False
        host = parsed[0].lower().rstrip(".")
        if host in self.names or any(host == domain[1:] or host.endswith(domain) for domain in self.domains):
            return True
        if _is_ip(host):
            return self.any_ip or (self.loopback_ips and ipaddress.ip_address(host).is_loopback)
        return False


class HostCheck:
    """ASGI middleware refusing requests addressed to a host the bridge does not serve."""

    def __init__(self, app: Any, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy
        self.refusals = ThrottledLog(log, "requests refused for their Host header")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = next((value for name, value in scope.get("headers", ()) if name == b"host"), None)
            if not self.policy.allows(host):
                if scope["type"] == "websocket" and (await receive())["type"] != "websocket.connect":
                    return
                await self._refuse(scope, send, (host or b"")[:100].decode("latin-1"))
                return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Any, send: Any, host: str) -> None:
        detail = f"the Host {host!r} is not served here; the operator can allow it with COLLAB_ALLOWED_HOSTS"
        self.refusals.record(host=host, path=scope.get("path", ""))
        if scope["type"] == "websocket":
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": json.dumps(error(detail, code=CLOSE_FORBIDDEN))})
            await send({"type": "websocket.close", "code": CLOSE_FORBIDDEN, "reason": detail[:120]})
            return
        body = json.dumps({"detail": detail, "code": "INVALID_ARGUMENT"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": body})
