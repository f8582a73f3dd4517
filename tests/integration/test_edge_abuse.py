"""One client must not take the bridge from everyone else (issue 17, items 6, 7, 9, 10,
and the bridge's side of 11), tried from the outside with raw sockets against real
processes:

- sockets that send nothing, half a request head or half a body are closed once the
  header / body timeout is over (408 when a request was begun), while a normal client is
  served; a keep-alive connection idle past its timeout is closed too;
- past COLLAB_MAX_CONNECTIONS a connection is answered 503 and closed, with a log line;
  the cap is kept below the open-file limit at start;
- a message sent as 1-byte fragments, and a ping flood, are cut with 1008 while another
  client's pings are answered; pongs left unread are cut off (4008);
- every malformed credential gets 401 / close 4401 and one short log line;
- no log line holds a credential, however it was encoded, or a line break a client sent;
- the Host header is checked; X-Forwarded-For is not believed without configured proxies;
  /readyz and the REST 503 do not name the server's address.

The bridge here has timeouts of 1 s and a budget of 50 frames a second, logs as text,
and the server takes JWTs (for a `crit` header with a line break in it).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import jwt
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support.processes import BridgeProcess, ServerProcess
from tests.support.rpc import READ_KEY, WRITE_KEY
from tests.support.stack import API, Stack, opened, recv_until, running_stack

pytestmark = pytest.mark.integration

TIMEOUT = 1.0  # header, body and idle timeouts of the bridge under test
FRAMES_PER_SECOND = 50  # closed for flooding at 10 x 50 x 5 s = 2,500 frames over the rate
JWT_SECRET = secrets.token_hex(32)
# "Closed within a generous bound": the timeouts are 1 s; the machine may be busy.
CLOSED_WITHIN = 15.0
LOGGED_WITHIN = 25.0  # a kind of event is logged at most every 10 s (bridge/limits.ThrottledLog)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    bridge_env = {
        "COLLAB_HEADER_TIMEOUT": str(TIMEOUT),
        "COLLAB_BODY_TIMEOUT": str(TIMEOUT),
        "COLLAB_IDLE_TIMEOUT": str(TIMEOUT),
        "COLLAB_SEND_TIMEOUT": str(TIMEOUT),
        "COLLAB_WS_FRAMES_PER_SECOND": str(FRAMES_PER_SECOND),
        "COLLAB_LOG_FORMAT": "text",
    }
    server_env = {"COLLAB_JWT_SECRET": JWT_SECRET, "COLLAB_LOG_FORMAT": "text"}
    with running_stack(
        tmp_path_factory.mktemp("edge"), server_env, bridge_env=bridge_env, capture_stderr=True
    ) as running:
        yield running


def logged(process: ServerProcess | BridgeProcess, marker: str, within: float = LOGGED_WITHIN) -> str:
    """The log line with ``marker`` (already printed, or printed within ``within`` s)."""
    assert process.output is not None
    for line in process.output.lines:
        if marker in line:
            return line.strip()
    return process.output.wait_for(marker, within)


def bridge_lines(stack: Stack) -> list[str]:
    """Everything the bridge printed so far: a request with a path of its own is logged
    (404), and every line up to that one is read."""
    marker = f"/drain-{uuid.uuid4().hex}"
    httpx.get(stack.bridge.http + marker)
    logged(stack.bridge, marker)
    assert stack.bridge.output is not None
    return stack.bridge.output.lines


async def raw_connection(stack: Stack) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", stack.bridge.port)


async def read_to_end(reader: asyncio.StreamReader, within: float = CLOSED_WITHIN) -> bytes:
    """Everything the bridge sends until it closes the connection (a reset counts as closed)."""
    data = b""
    deadline = time.monotonic() + within
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - time.monotonic()))
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def http_request(stack: Stack, path: str = "/healthz", headers: dict[str, str] | None = None) -> bytes:
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{stack.bridge.port}\r\nConnection: close\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return (head + "\r\n").encode("latin-1")


# -- item 6: timeouts --------------------------------------------------------------------------------


async def test_silent_and_half_sent_requests_are_closed_while_others_are_served(stack: Stack) -> None:
    silent = [await raw_connection(stack) for _ in range(20)]
    half_head = [await raw_connection(stack) for _ in range(20)]
    for _, writer in half_head:
        writer.write(b"GET /api/v1/collaboration/agent-status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Partial: ye")
    half_body = [await raw_connection(stack) for _ in range(5)]
    for _, writer in half_body:
        writer.write(
            b"POST /api/v1/collaboration/record-activity HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer " + WRITE_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
            b'Content-Length: 200\r\n\r\n{"agent_id": '
        )
    # Idle after one answer (keep-alive), and half of a second request after one.
    kept_alive = await raw_connection(stack)
    second_half = await raw_connection(stack)
    for _, writer in (kept_alive, second_half):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    for reader, _ in (kept_alive, second_half):
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await reader.readuntil(b'"ok"}')
    second_half[1].write(b"GET /healthz HTTP/1.1\r\nHo")

    # Meanwhile everyone else is served.
    async with httpx.AsyncClient(base_url=stack.bridge.http, timeout=10) as http:
        for _ in range(5):
            assert (await http.get("/healthz")).status_code == 200

    started = time.monotonic()
    answers = await asyncio.gather(
        *(read_to_end(reader) for reader, _ in (*silent, *half_head, *half_body, kept_alive, second_half))
    )
    assert time.monotonic() - started < CLOSED_WITHIN
    silent_answers = answers[: len(silent)]
    begun_answers = answers[len(silent) : len(silent) + len(half_head) + len(half_body)]
    assert all(answer == b"" for answer in silent_answers), "nothing asked, nothing answered: just closed"
    for answer in begun_answers:
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"did not arrive within 1 s" in answer
    assert answers[-2] == b"", "an idle keep-alive connection is closed"
    assert answers[-1].startswith(b"HTTP/1.1 408 "), answers[-1][:200]
    for _, writer in (*silent, *half_head, *half_body, kept_alive, second_half):
        writer.close()
    line = logged(stack.bridge, "connections closed for sending a request too slowly")
    assert "WARNING" in line


async def test_a_client_that_reads_nothing_it_is_sent_is_dropped(stack: Stack) -> None:
    """Many pipelined requests whose answers are never read: once writing has stayed
    blocked for the send timeout, the connection is dropped (closing would wait for the
    client to read, for ever)."""
    async with httpx.AsyncClient(base_url=stack.bridge.http, timeout=10) as http:
        one_answer = len((await http.get("/openapi.json")).content)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", stack.bridge.port))
    requests = 300
    sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * requests)
    assert "WARNING" in logged(stack.bridge, "connections dropped for reading nothing they were sent")
    async with httpx.AsyncClient(base_url=stack.bridge.http, timeout=10) as http:
        assert (await http.get("/healthz")).status_code == 200
    received = 0
    sock.settimeout(CLOSED_WITHIN)
    try:
        while chunk := sock.recv(65536):
            received += len(chunk)
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    assert received < requests * one_answer / 2, "cut off long before every answer was taken"


# -- item 6: the connection cap ---------------------------------------------------------------------


async def test_connections_over_the_cap_are_refused_with_an_answer(stack: Stack, tmp_path: Path) -> None:
    cap = 30
    env = {
        "COLLAB_UPSTREAM_TOKEN": WRITE_KEY,
        "COLLAB_MAX_CONNECTIONS": str(cap),
        "COLLAB_HEADER_TIMEOUT": "60",
        "COLLAB_LOG_FORMAT": "text",
    }
    with BridgeProcess(stack.server.target, data_dir=tmp_path, env=env, capture_stderr=True) as bridge:
        held = [await asyncio.open_connection("127.0.0.1", bridge.port) for _ in range(cap)]
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient(base_url=bridge.http, timeout=10) as http:
            refused = await http.get("/healthz")
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert "COLLAB_MAX_CONNECTIONS" in refused.json()["detail"]
            assert refused.json()["code"] == "UNAVAILABLE"
            assert "WARNING" in logged(bridge, "connections refused: the bridge holds its most open connections")
            for _, writer in held:
                writer.close()
            deadline = time.monotonic() + CLOSED_WITHIN
            while (await http.get("/healthz")).status_code != 200:
                assert time.monotonic() < deadline, "served again once connections closed"
                await asyncio.sleep(0.1)


def _bridge_with_file_limit(limit: int, tmp_path: Path) -> subprocess.Popen[str]:
    start = (
        f"import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit})); "
        "from bridge.main import main; main(sys.argv[1:])"
    )
    argv = [sys.executable, "-c", start, "--bridge-addr", "127.0.0.1:0", "--grpc-target", "127.0.0.1:9"]
    env = {**os.environ, "COLLAB_DATA_DIR": str(tmp_path), "COLLAB_MAX_CONNECTIONS": "4096"}
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_cap_is_kept_below_the_open_file_limit(tmp_path: Path) -> None:
    too_few = _bridge_with_file_limit(100, tmp_path)
    output, _ = too_few.communicate(timeout=30)
    assert too_few.returncode != 0
    assert "the open-file limit (100, hard 100) leaves no room for connections" in output

    lowered = _bridge_with_file_limit(400, tmp_path)
    try:
        assert lowered.stdout is not None
        lines = []
        for line in lowered.stdout:
            lines.append(line)
            if "listening on" in line:
                break
        assert any("max-connections lowered from 4096 to 272: the open-file limit is 400" in line for line in lines)
    finally:
        lowered.terminate()
        lowered.wait(30)


# -- item 7: frames count against the budget ------------------------------------------------------------


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame (with a zero mask, so the payload goes as it is)."""
    first = (0x80 if fin else 0) | opcode
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", first, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, length)
    return head + b"\0\0\0\0" + payload


async def raw_websocket(
    stack: Stack, token: str = READ_KEY, host: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await raw_connection(stack)
    writer.write(
        f"GET /api/v1/collaboration/ws?client_id=raw&token={token} HTTP/1.1\r\nHost: {host}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def read_server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(length)


async def close_code(reader: asyncio.StreamReader, within: float = CLOSED_WITHIN) -> int:
    """Read (pongs, messages) until the close frame; its code."""
    while True:
        opcode, payload = await asyncio.wait_for(read_server_frame(reader), within)
        if opcode == 0x8:
            code: int = struct.unpack("!H", payload[:2])[0]
            return code


async def answered(ws: ClientConnection) -> None:
    """A WebSocket ping and an application ping, both answered."""
    await asyncio.wait_for(await ws.ping(), 5)
    await ws.send(json.dumps({"type": "ping"}))
    await recv_until(ws, lambda message: message["type"] == "pong", within=5)


async def test_one_byte_fragments_are_cut_with_1008_while_others_are_answered(stack: Stack) -> None:
    async with connect(stack.ws_url(token=READ_KEY, client_id="bystander")) as bystander:
        await opened(bystander)
        await answered(bystander)
        reader, writer = await raw_websocket(stack)
        # One 60 KiB message (under the size limit) as 1-byte fragments.
        fragments = client_frame(0x1, b"{", fin=False) + client_frame(0x0, b" ", fin=False) * (60 * 1024)
        sending = asyncio.ensure_future(_send_until_closed(writer, fragments))
        assert await close_code(reader) == 1008
        sending.cancel()
        await answered(bystander)
        writer.close()
    assert "closed for flooding frames" in logged(stack.bridge, "closed for flooding frames")


async def _send_until_closed(writer: asyncio.StreamWriter, data: bytes, chunk: int = 16 * 1024) -> None:
    try:
        for start in range(0, len(data), chunk):
            writer.write(data[start : start + chunk])
            await writer.drain()
    except (ConnectionError, OSError):
        pass  # the bridge closed it


async def test_a_message_over_twice_the_limit_is_refused_by_the_protocol(stack: Stack) -> None:
    """Just over the 64 KiB limit: an `error`, the connection stays (the guide's contract);
    over twice it, the WebSocket protocol closes with 1009 without assembling it."""
    limit = 64 * 1024
    async with connect(stack.ws_url(token=READ_KEY, client_id="big"), max_size=None) as ws:
        await opened(ws)
        await ws.send("x" * (limit + 1))
        assert (await recv_until(ws, lambda message: message["type"] == "error"))["error"]
        await ws.send(json.dumps({"type": "ping"}))
        await recv_until(ws, lambda message: message["type"] == "pong")
        await ws.send("x" * (2 * limit + 1))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_a_ping_flood_is_cut_with_1008_while_others_are_answered(stack: Stack) -> None:
    async with connect(stack.ws_url(token=READ_KEY, client_id="bystander")) as bystander:
        await opened(bystander)
        reader, writer = await raw_websocket(stack)
        sending = asyncio.ensure_future(_send_until_closed(writer, client_frame(0x9, b"p" * 16) * 100_000))
        assert await close_code(reader) == 1008
        sending.cancel()
        await answered(bystander)
        writer.close()


async def test_unread_pongs_are_cut_off_like_a_slow_reader(stack: Stack, tmp_path: Path) -> None:
    """With no frame budget at all, a client that pings and never reads is still cut off
    once its unread pongs pass the bound."""
    env = {
        "COLLAB_UPSTREAM_TOKEN": WRITE_KEY,
        "COLLAB_WS_FRAMES_PER_SECOND": "0",
        "COLLAB_WS_MAX_UNREAD_PONG_BYTES": "4096",
        "COLLAB_LOG_FORMAT": "text",
    }
    with BridgeProcess(stack.server.target, data_dir=tmp_path, env=env, capture_stderr=True) as bridge:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", bridge.port))
        sock.sendall(
            f"GET /api/v1/collaboration/ws?client_id=deaf&token={READ_KEY} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        sock.settimeout(10.0)
        head = b""
        while b"\r\n\r\n" not in head:  # the handshake's answer first (RFC 6455 4.1)
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        sock.settimeout(2.0)
        pings = client_frame(0x9, b"p" * 120) * 1000
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:  # never reads: its pongs pile up at the bridge
                sock.sendall(pings)
        except (TimeoutError, ConnectionError, OSError):
            pass  # the bridge stopped reading (it closed the connection), or reset it
        assert "cut off for leaving their pongs unread" in logged(bridge, "cut off for leaving their pongs unread")
        sock.close()


async def test_frames_before_the_handshakes_answer_drop_the_connection(stack: Stack) -> None:
    """A client sends nothing after its opening handshake until it has the answer
    (RFC 6455 4.1); one that does is dropped, and others are served."""
    reader, writer = await raw_connection(stack)
    writer.write(
        f"GET /api/v1/collaboration/ws?client_id=eager&token={READ_KEY} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        + client_frame(0x9, b"early") * 100
    )
    assert await read_to_end(reader) == b"", "dropped before any answer: the frames came with the request"
    writer.close()
    assert "dropped for sending before the handshake's answer" in logged(
        stack.bridge, "dropped for sending before the handshake's answer"
    )
    async with connect(stack.ws_url(token=READ_KEY, client_id="after_eager")) as ws:
        await opened(ws)
        await answered(ws)


# -- item 9: malformed credentials ---------------------------------------------------------------------

MALFORMED = {
    "control character": "ab\x01cd",
    "DEL": "ab\x7fcd",
    "tab": "ab\tcd",
    "non-ASCII": "abécd",
    "over the cap": "k" * 5_000,  # COLLAB_MAX_CREDENTIAL_BYTES: 4096
    "over 16 KB": "k" * 17_000,
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_every_malformed_credential_gets_401_or_4401(stack: Stack, name: str) -> None:
    token = MALFORMED[name]
    for header in ("Authorization", "X-API-Key"):
        value = f"Bearer {token}" if header == "Authorization" else token
        for path in (f"{API}/agent-status", f"{API}/events"):
            reader, writer = await raw_connection(stack)
            writer.write(http_request(stack, path, {header: value}))
            answer = await read_to_end(reader)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 401 "), (name, header, path, answer[:300])
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert body["code"] == "UNAUTHENTICATED" and body["detail"].startswith("invalid credential: ")
            assert len(body["detail"]) < 200 and token not in body["detail"]
    url = f"{stack.bridge.ws}?client_id=bad&token={quote(token)}"
    if len(url) > 8192:
        # Over what the WebSocket handshake reads in a request line: refused before the app.
        with pytest.raises(InvalidStatus) as too_long:
            await connect(url)
        assert too_long.value.response.status_code == 414
        return
    async with connect(url) as ws:
        first = json.loads(await ws.recv())
        assert first["type"] == "error" and first["error"].startswith("invalid credential: ")
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


async def test_x_api_key_is_honoured_beside_a_basic_authorization(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.bridge.http, timeout=10) as http:
        beside = {"Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": READ_KEY}
        assert (await http.get(f"{API}/agent-status", headers=beside)).status_code == 200
        alone = await http.get(f"{API}/agent-status", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert alone.status_code == 401


async def test_a_refused_credential_is_one_short_log_line(stack: Stack) -> None:
    marker = uuid.uuid4().hex
    async with httpx.AsyncClient(base_url=stack.bridge.http, timeout=10) as http:
        refused = await http.get(f"{API}/agent-status?{marker}", headers={b"X-API-Key": ("é" * 10).encode()})
    assert refused.status_code == 401
    lines = bridge_lines(stack)
    about = [line for line in lines if "credential refused" in line]
    assert about and all(len(line) < 300 for line in about)
    assert not any("Traceback" in line for line in lines)


# -- item 10: logs --------------------------------------------------------------------------------------


async def test_no_credential_and_no_forged_line_in_the_logs(stack: Stack) -> None:
    forged = f"FORGED-{uuid.uuid4().hex}"
    # ?%74oken= is ?token= to the bridge: it authenticates, and must be redacted as such.
    encoded = stack.bridge.ws + f"?client_id=enc&%74oken={READ_KEY}"
    async with connect(encoded) as ws:
        await opened(ws)
    async with connect(stack.bridge.ws + f"?client_id=enc&%54OKEN={WRITE_KEY}&tok%65n={READ_KEY}") as ws:
        await opened(ws)
    crit = jwt.encode({"scope": "read"}, JWT_SECRET, algorithm="HS256", headers={"crit": [f"x\n{forged} INFO x"]})
    with pytest.raises(ConnectionClosed):
        async with connect(f"{stack.bridge.ws}?client_id=crit&token={crit}") as ws:
            while True:
                await ws.recv()
    async with httpx.AsyncClient(base_url=stack.bridge.http, timeout=10) as http:
        await http.get(f"/api/v1/x%0a{forged}%0d%0aINFO%20bridge.http:%20GET")
        await http.get(f"{API}/agent-status", headers={"Authorization": f"Bearer {crit}"})
    server_line = logged(stack.server, forged)
    assert not server_line.startswith(forged) and "\\n" in server_line
    lines = bridge_lines(stack)
    assert any("token=[redacted]" in line for line in lines)
    assert not any(line.startswith(forged) for line in lines)
    assert not any(line.startswith(forged) for line in stack.server.output.lines)  # type: ignore[union-attr]
    for secret in (READ_KEY, WRITE_KEY, crit):
        assert not any(secret in line for line in lines), secret


def test_a_redis_password_is_never_logged(tmp_path: Path) -> None:
    """Neither at start (the store's description) nor in the start-up error."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.skip("no redis-server on this machine")
    password = f"pw-{secrets.token_hex(8)}"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password]
    redis = subprocess.Popen([*argv, "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        env = {"COLLAB_API_KEYS": WRITE_KEY, "COLLAB_STORE": f"redis://:{password}@127.0.0.1:{port}/0"}
        with ServerProcess(tmp_path / "up", env=env, capture_stderr=True) as server:
            line = logged(server, '"serving"')
            assert f"127.0.0.1:{port}" in line and password not in line
            server.stop()
            assert server.output is not None
            assert password not in server.output.until_closed()
    finally:
        redis.terminate()
        redis.wait(10)
    # Nothing listens there now: the server cannot start, and says why without the password.
    env = {"COLLAB_API_KEYS": WRITE_KEY, "COLLAB_STORE": f"redis://user:{password}@127.0.0.1:{port}/0"}
    server = ServerProcess(tmp_path / "down", env=env, capture_stderr=True)
    failed = subprocess.run(server.argv(0), env=server.env, capture_output=True, text=True, timeout=60)
    assert failed.returncode != 0 and f"user:[redacted]@127.0.0.1:{port}" in failed.stderr
    assert password not in failed.stdout + failed.stderr


# -- item 11: Host, proxies, what unauthenticated callers learn -----------------------------------------


async def test_the_host_header_is_checked(stack: Stack) -> None:
    for host, served in ((f"127.0.0.1:{stack.bridge.port}", True), ("localhost", True), ("rebind.example", False)):
        reader, writer = await raw_connection(stack)
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        answer = await read_to_end(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 " if served else b"HTTP/1.1 400 "), (host, answer[:300])
        if not served:
            assert b"COLLAB_ALLOWED_HOSTS" in answer
    reader, writer = await raw_websocket(stack, host="rebind.example")
    opcode, payload = await read_server_frame(reader)
    first = json.loads(payload)
    assert opcode == 0x1 and first["type"] == "error" and "rebind.example" in first["error"]
    assert await close_code(reader) == 4403
    writer.close()


async def test_x_forwarded_for_is_not_believed_from_an_unconfigured_proxy(stack: Stack) -> None:
    spoofed = "203.0.113.77"
    async with connect(
        stack.ws_url(token=READ_KEY, client_id="spoof"), additional_headers={"X-Forwarded-For": spoofed}
    ) as ws:
        await opened(ws)
    accepted = [line for line in bridge_lines(stack) if "client_id=spoof" in line and "[accepted]" in line]
    assert accepted and all(spoofed not in line and "127.0.0.1" in line for line in accepted)


async def test_an_unreachable_server_is_not_named_to_callers(tmp_path: Path) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # nothing listens there once closed
    env = {"COLLAB_UPSTREAM_TOKEN": WRITE_KEY, "COLLAB_RPC_TIMEOUT": "2"}
    with BridgeProcess(f"127.0.0.1:{port}", data_dir=tmp_path, env=env) as bridge:
        async with httpx.AsyncClient(base_url=bridge.http, timeout=10) as http:
            await asyncio.sleep(0.5)
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["error"] in ("upstream unavailable", "connecting")
            answer = await http.get(f"{API}/agent-status", headers={"Authorization": f"Bearer {READ_KEY}"})
            assert answer.status_code == 503, answer.text
            assert answer.json()["detail"].startswith("the collab server is unavailable: ")
            for text in (ready.text, answer.text):
                assert str(port) not in text and "127.0.0.1" not in text
        with pytest.raises((ConnectionClosed, InvalidStatus)) as refused:
            async with connect(f"{bridge.ws}?token={READ_KEY}") as ws:
                while True:
                    await ws.recv()
        if isinstance(refused.value, ConnectionClosed):
            assert refused.value.rcvd is not None and str(port) not in refused.value.rcvd.reason
