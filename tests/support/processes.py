"""Start the hub's real processes on free loopback ports, and stop them."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

__all__ = ["OutputLines", "ServerProcess"]

STARTUP_TIMEOUT = 20.0


class OutputLines:
    """Reads a child's output on a thread, so the pipe never fills and lines can be
    awaited with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, marker: str, timeout: float = STARTUP_TIMEOUT) -> str:
        """The next line containing ``marker``; fail with everything printed so far."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if marker in line:
                return line.strip()
        raise AssertionError(f"no line with {marker!r}; output was:\n{''.join(self.lines)}")


class ServerProcess:
    """`collab-server` as a child process on a free loopback port."""

    def __init__(
        self,
        data_dir: Path,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.args = list(args)
        self.env = {**os.environ, "COLLAB_LOG_FORMAT": "json", **(env or {})}
        self.process: subprocess.Popen[str] | None = None
        self.output: OutputLines | None = None
        self.port = 0
        self.epoch = ""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def banner(self) -> list[str]:
        """What it printed on stdout so far (up to its "listening on" line, at least)."""
        return self.output.lines if self.output else []

    def start(self, port: int = 0) -> ServerProcess:
        argv = [
            sys.executable,
            "-m",
            "collab_grpc.server",
            "--grpc-addr",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(self.data_dir),
            *self.args,
        ]
        self.process = subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.output = OutputLines(self.process.stdout)
        ready = self.output.wait_for("collab-server listening on")
        address, epoch = ready.split("listening on ", 1)[1].split()
        self.port = int(address.rsplit(":", 1)[1])
        self.epoch = epoch.removeprefix("epoch=")
        return self

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait: the graceful path. Returns the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()
