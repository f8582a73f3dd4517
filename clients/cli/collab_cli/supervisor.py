"""Runs the hub's processes together for one machine, and stops them together.

Each child is started with the same environment; the first to exit stops the others,
and Ctrl-C or SIGTERM stops all of them gracefully (SIGTERM, then SIGKILL after a grace).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Child", "Supervisor"]


@dataclass(frozen=True)
class Child:
    name: str
    argv: Sequence[str]
    # The child's stdout line that says it is ready to serve.
    ready_marker: str


class Supervisor:
    def __init__(self, env: Mapping[str, str], grace: float = 10.0) -> None:
        self.env = dict(env)
        self.grace = grace
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self._echo_tasks: set[asyncio.Task[None]] = set()

    async def start(self, child: Child, ready_within: float = 30.0) -> str:
        """Start ``child``; return its ready line once printed, echoing its output."""
        process = await asyncio.create_subprocess_exec(
            *child.argv, env=self.env, stdout=asyncio.subprocess.PIPE, stderr=None
        )
        self.processes[child.name] = process
        assert process.stdout is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ready_within
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RuntimeError(f"{child.name} did not become ready within {ready_within:.0f} s")
            line = (await asyncio.wait_for(process.stdout.readline(), remaining)).decode()
            if not line:
                code = await process.wait()
                raise RuntimeError(f"{child.name} exited with status {code} before it was ready")
            sys.stdout.write(line)
            if child.ready_marker in line:
                self._echo_tasks.add(asyncio.create_task(self._echo(process)))
                return line.strip()

    @staticmethod
    async def _echo(process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            sys.stdout.write(line.decode())
            sys.stdout.flush()

    async def run_until_stopped(self) -> int:
        """Wait for a signal or for any child to exit; then stop every child."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        waiters = {asyncio.create_task(p.wait()): name for name, p in self.processes.items()}
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({stopper, *waiters}, return_when=asyncio.FIRST_COMPLETED)
        status = 0
        for task in done:
            if task in waiters:
                print(f"collab: {waiters[task]} exited with status {task.result()}; stopping", file=sys.stderr)
                status = 1
        await self.stop_all()
        stopper.cancel()
        return status

    async def stop_all(self) -> None:
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for name, process in self.processes.items():
            try:
                await asyncio.wait_for(process.wait(), self.grace)
            except TimeoutError:
                print(f"collab: {name} did not stop within {self.grace:.0f} s; killing it", file=sys.stderr)
                process.kill()
                await process.wait()
