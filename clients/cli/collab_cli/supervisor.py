"""Runs the hub's processes together for one machine, and stops them together.

Each child is started with the same environment; the first to exit stops the others,
and Ctrl-C, SIGTERM or a closed terminal (SIGHUP) stops all of them gracefully, in the
reverse of the order they started (the bridge before the server it follows): SIGTERM,
then SIGKILL after a grace.

Each child runs in a process group of its own, so the terminal's Ctrl-C reaches only the
supervisor, which then stops the children one at a time. Were they in the terminal's
group, every process would get the SIGINT at once, the server would stop under the
bridge, and the bridge would log its lost upstream streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["STOP_SIGNALS", "Child", "StopRequested", "Supervisor"]

# What stops the hub gracefully: Ctrl-C, a service manager's stop, the terminal closing.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# What a terminal sends its foreground group (Ctrl-C, Ctrl-backslash, a hang-up).
TERMINAL_SIGNALS = frozenset({signal.SIGINT, signal.SIGQUIT, signal.SIGHUP})
# Seconds to wait, once the children have exited, for the last of their output to be echoed.
ECHO_DRAIN = 1.0


@dataclass(frozen=True)
class Child:
    name: str
    argv: Sequence[str]
    # The child's stdout line that says it is ready to serve.
    ready_marker: str


class StopRequested(Exception):
    """A stop signal arrived while a child was starting."""


class Supervisor:
    def __init__(self, env: Mapping[str, str], grace: float = 10.0) -> None:
        self.env = dict(env)
        self.grace = grace
        # In the order started; stopped in the reverse order.
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self._echo_tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()

    def handle_stop_signals(self) -> None:
        """From now on, a stop signal asks for a graceful stop instead of ending this process
        (which would leave the children, in their own process groups, running)."""
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._stop.set)

    async def start(self, child: Child, ready_within: float = 30.0) -> str:
        """Start ``child``; return its ready line once printed, echoing its output.

        Raises StopRequested if a stop signal comes first, RuntimeError if the child exits
        or is not ready within ``ready_within`` seconds."""
        process = await asyncio.create_subprocess_exec(
            *child.argv,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,
            process_group=0,
        )
        self.processes[child.name] = process
        ready = asyncio.create_task(self._ready_line(child, process, ready_within))
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait({ready, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if ready.done() and isinstance(ready.exception(), StopRequested):
            self._stop.set()
        if not ready.done():
            ready.cancel()
            await asyncio.gather(ready, return_exceptions=True)  # done reading before the echo reads
            self._echo_tasks.add(asyncio.create_task(self._echo(process)))
            raise StopRequested(f"stopped while {child.name} was starting")
        line = ready.result()
        self._echo_tasks.add(asyncio.create_task(self._echo(process)))
        return line

    @staticmethod
    async def _ready_line(child: Child, process: asyncio.subprocess.Process, ready_within: float) -> str:
        assert process.stdout is not None
        try:
            async with asyncio.timeout(ready_within):
                while line := (await process.stdout.readline()).decode():
                    sys.stdout.write(line)
                    if child.ready_marker in line:
                        return line.strip()
        except TimeoutError:
            raise RuntimeError(f"{child.name} did not become ready within {ready_within:.0f} s") from None
        code = await process.wait()
        if -code in TERMINAL_SIGNALS:
            # The terminal's signal reached the child in the instant between its fork and
            # its move to a group of its own: the same Ctrl-C (or hang-up) stops us all.
            raise StopRequested(f"{child.name} was stopped by signal {-code} while starting")
        raise RuntimeError(f"{child.name} exited with status {code} before it was ready")

    @staticmethod
    async def _echo(process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            sys.stdout.write(line.decode())
            sys.stdout.flush()

    async def run_until_stopped(self) -> int:
        """Wait for a stop signal or for any child to exit; then stop every child."""
        waiters = {asyncio.create_task(p.wait()): name for name, p in self.processes.items()}
        stopper = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait({stopper, *waiters}, return_when=asyncio.FIRST_COMPLETED)
        status = 0
        for task in done:
            if task in waiters:
                print(f"collab: {waiters[task]} exited with status {task.result()}; stopping", file=sys.stderr)
                status = 1
        await self.stop_all()
        stopper.cancel()
        for waiter in waiters:
            waiter.cancel()
        return status

    async def stop_all(self) -> None:
        """Stop the children one at a time, the last started first, each within the grace."""
        for name, process in reversed(self.processes.items()):
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):  # exited, not yet reaped
                    process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self.grace)
            except TimeoutError:
                print(f"collab: {name} did not stop within {self.grace:.0f} s; killing it", file=sys.stderr)
                process.kill()
                await process.wait()
        # The children's output ends with them; let what they last printed through.
        if self._echo_tasks:
            _, pending = await asyncio.wait(self._echo_tasks, timeout=ECHO_DRAIN)
            for task in pending:
                task.cancel()
