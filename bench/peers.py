"""The peers the hub is measured against, each a process that broadcasts the same JSON
message to every connected WebSocket client when told to (GET /go?count=N):

- ``websockets``: the raw library's ``broadcast()`` (the limit);
- ``socketio``: python-socketio on aiohttp, ``emit`` to everyone (what a Python team
  would otherwise use).

Run: ``python -m bench.peers websockets|socketio PORT MESSAGE_FILE``; prints "ready".
"""

from __future__ import annotations

import asyncio
import sys
import time
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from collab_grpc.eventloop import run

__all__ = ["main", "stamped"]


def stamped(message: str, due: float | None = None) -> str:
    """``message`` (a JSON object) carrying the time it is due to be sent (by the pacing
    schedule; default now), for latency: a sender that falls behind its schedule shows it."""
    return f'{{"sent":{time.time() if due is None else due},{message[1:]}'


async def serve_websockets(port: int, message: str) -> None:
    from websockets.asyncio.server import ServerConnection, broadcast, serve
    from websockets.datastructures import Headers
    from websockets.http11 import Request, Response

    clients: set[ServerConnection] = set()

    async def blast(count: int) -> None:
        for n in range(count):
            broadcast(clients, message)
            if n % 50 == 49:
                await asyncio.sleep(0)  # let the transports write, as a real server would

    async def pace(rate: int, count: int) -> None:
        start, wall = asyncio.get_running_loop().time(), time.time()
        for n in range(count):
            await asyncio.sleep(max(0.0, start + n / rate - asyncio.get_running_loop().time()))
            broadcast(clients, stamped(message, wall + n / rate))

    def trigger(connection: ServerConnection, request: Request) -> Response | None:
        query = parse_qs(urlsplit(request.path).query)
        if request.path.startswith("/go"):
            asyncio.get_running_loop().create_task(blast(int(query["count"][0])))
        elif request.path.startswith("/pace"):
            asyncio.get_running_loop().create_task(pace(int(query["rate"][0]), int(query["count"][0])))
        else:
            return None
        return Response(HTTPStatus.OK, "OK", Headers([("Content-Length", "2")]), b"ok")

    async def handler(connection: ServerConnection) -> None:
        clients.add(connection)
        try:
            await connection.wait_closed()
        finally:
            clients.discard(connection)

    async with serve(handler, "127.0.0.1", port, process_request=trigger, max_queue=None):
        print("ready", flush=True)
        await asyncio.Future()


async def serve_socketio(port: int, message: str) -> None:
    import socketio
    from aiohttp import web

    sio = socketio.AsyncServer(async_mode="aiohttp")
    app = web.Application()
    sio.attach(app)

    async def blast(count: int) -> None:
        for _ in range(count):
            await sio.emit("message", message)

    async def go(request: web.Request) -> web.Response:
        asyncio.get_running_loop().create_task(blast(int(request.query["count"])))
        return web.Response(text="ok")

    async def pace(rate: int, count: int) -> None:
        start, wall = asyncio.get_running_loop().time(), time.time()
        for n in range(count):
            await asyncio.sleep(max(0.0, start + n / rate - asyncio.get_running_loop().time()))
            await sio.emit("message", stamped(message, wall + n / rate))

    async def paced(request: web.Request) -> web.Response:
        asyncio.get_running_loop().create_task(pace(int(request.query["rate"]), int(request.query["count"])))
        return web.Response(text="ok")

    app.router.add_get("/go", go)
    app.router.add_get("/pace", paced)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Future()


def main() -> None:
    kind, port, message_file = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    message = message_file.read_text()
    server = {"websockets": serve_websockets, "socketio": serve_socketio}[kind]
    run(server(port, message))


if __name__ == "__main__":
    main()
