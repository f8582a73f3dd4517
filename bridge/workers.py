"""`collab-bridge --workers N`: N bridge processes serving one listening port.

Each worker is a whole bridge (its own upstream streams, buffer of recent events and
clients) listening on the same address with SO_REUSEPORT, so the kernel spreads new
connections over the workers. Every worker follows the same server stream, so every
client gets every event in order whichever worker it landed on, and a client resumes
(``since``/``epoch``: the server's positions, the same in every worker) on any of them.

The supervising process (this module) starts the workers, restarts one that dies (a
worker killed with -9 costs its clients a reconnect, which lands on a live worker), and
on SIGTERM/SIGINT stops them all gracefully. It holds the port bound (not listening) for
its lifetime, so that ``:0`` picks one port for every worker and a restarted worker gets
the same one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence

from bridge.config import BridgeConfig
from collab_grpc.eventloop import run

__all__ = ["SUPERVISOR_ENV", "WORKER_ENV", "end_with_supervisor", "reuseport_socket", "supervise"]

log = logging.getLogger("bridge.workers")

# Set in a worker's environment (to its number): bind with SO_REUSEPORT, report to the supervisor.
WORKER_ENV = "COLLAB_BRIDGE_WORKER_INDEX"
SUPERVISOR_ENV = "COLLAB_BRIDGE_SUPERVISOR_PID"
LISTENING = "collab-bridge listening on "
# A worker that dies this soon after starting is restarted after a growing pause
# (up to MAX_RESTART_DELAY), so one that cannot start does not spin.
STABLE_AFTER = 10.0
MAX_RESTART_DELAY = 30.0
# Seconds a stopping worker is given beyond its own graceful shutdown before it is killed.
STOP_MARGIN = 5.0


def end_with_supervisor(supervisor_pid: int) -> None:
    """In a worker: be sent SIGTERM when the supervisor dies, even by SIGKILL (Linux
    PR_SET_PDEATHSIG), so no worker outlives it holding the port; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor_pid:  # it died before the call took effect
        os.kill(os.getpid(), signal.SIGTERM)


def reuseport_socket(host: str, port: int, *, listen: bool = True) -> socket.socket:
    """A TCP socket bound to ``host:port`` with SO_REUSEPORT (and listening, unless not asked)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        if listen:
            sock.listen(2048)
        sock.set_inheritable(False)
    except OSError:
        sock.close()
        raise
    return sock


class Supervisor:
    def __init__(self, config: BridgeConfig, argv: Sequence[str], port: int) -> None:
        self.config = config
        self.argv = list(argv)
        self.port = port
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = asyncio.Event()
        self.listening: set[int] = set()
        self.announced = False
        self.restarts = 0

    def _command(self) -> list[str]:
        # Flags given later win (argparse): the same settings, one process each, this port.
        host = self.config.host
        address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        return [sys.executable, "-m", "bridge.main", *self.argv, "--workers", "1", "--bridge-addr", address]

    async def _start(self, index: int) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            *self._command(),
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, WORKER_ENV: str(index), SUPERVISOR_ENV: str(os.getpid())},
        )
        self.processes[index] = process
        print(f"collab-bridge: worker {index} pid {process.pid}", flush=True)
        return process

    async def _relay(self, index: int, process: asyncio.subprocess.Process) -> None:
        """Pass on what the worker prints; announce the port once every worker listens."""
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(LISTENING):
                self.listening.add(index)
                if not self.announced and len(self.listening) == self.config.workers:
                    self.announced = True
                    print(f"collab-bridge: {self.config.workers} workers, supervisor pid {os.getpid()}", flush=True)
                    print(line, flush=True)
                continue
            print(line, flush=True)

    async def _keep(self, index: int) -> None:
        """Run worker ``index``; restart it whenever it exits, until stopping."""
        delay = 0.5
        while not self.stopping.is_set():
            started = time.monotonic()
            process = await self._start(index)
            relay = asyncio.create_task(self._relay(index, process))
            code = await process.wait()
            await relay
            self.listening.discard(index)
            if self.stopping.is_set():
                return
            self.restarts += 1
            delay = 0.5 if time.monotonic() - started > STABLE_AFTER else min(MAX_RESTART_DELAY, delay * 2)
            print(
                f"collab-bridge: worker {index} (pid {process.pid}) exited with {code}; restarting in {delay:g} s",
                file=sys.stderr,
                flush=True,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        keepers = [asyncio.create_task(self._keep(index)) for index in range(self.config.workers)]
        await self.stopping.wait()
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        grace = self.config.rpc_timeout + STOP_MARGIN + 5
        try:
            await asyncio.wait_for(asyncio.gather(*keepers), grace)
        except TimeoutError:
            for process in self.processes.values():
                if process.returncode is None:
                    process.kill()
            await asyncio.gather(*keepers, return_exceptions=True)
        return 0


def supervise(config: BridgeConfig, argv: Sequence[str]) -> int:
    """Run ``config.workers`` bridge workers on ``config.bridge_addr`` until stopped."""
    try:
        # Held (bound, not listening) while the supervisor lives: `:0` becomes one port for all.
        reserved = reuseport_socket(config.host, config.port, listen=False)
    except OSError as error:
        print(f"collab-bridge: cannot bind {config.bridge_addr}: {error}", file=sys.stderr)
        return 1
    with reserved:
        port = reserved.getsockname()[1]
        return run(Supervisor(config, argv, port).run())
