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

__all__ = ["BridgeProcess", "OutputLines", "ServerProcess"]

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

    def until_closed(self, timeout: float = STARTUP_TIMEOUT) -> str:
        """Everything printed, once the child has closed its output (it exited)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                return "".join(self.lines)
            self.lines.append(line)
        raise AssertionError(f"output still open after {timeout} s")


class _ChildProcess:
    """A hub command run as a child process, ready once it prints ``ready_marker``."""

    ready_marker = ""

    def __init__(self, env: Mapping[str, str] | None, *, capture_stderr: bool = False) -> None:
        self.env = {**os.environ, "COLLAB_LOG_FORMAT": "json", **(env or {})}
        # Off, the logs go to the test run's stderr; on, they are read with stdout (output.lines).
        self.capture_stderr = capture_stderr
        self.process: subprocess.Popen[str] | None = None
        self.output: OutputLines | None = None
        self.port = 0

    def argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def on_ready(self, line: str) -> None:
        """Read what the ready line says (the bound port, ...)."""

    @property
    def banner(self) -> list[str]:
        """What it printed on stdout so far (up to its ready line, at least)."""
        return self.output.lines if self.output else []

    def start(self, port: int = 0) -> _ChildProcess:
        # Another start while it runs would lose the running child, which nothing stops.
        assert self.process is None or self.process.poll() is not None, "already running"
        stderr = subprocess.STDOUT if self.capture_stderr else None
        self.process = subprocess.Popen(self.argv(port), env=self.env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert self.process.stdout is not None
        self.output = OutputLines(self.process.stdout)
        self.on_ready(self.output.wait_for(self.ready_marker))
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

    def __exit__(self, *_: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


class ServerProcess(_ChildProcess):
    """`collab-server` on a free loopback port."""

    ready_marker = "collab-server listening on"

    def __init__(
        self,
        data_dir: Path,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        capture_stderr: bool = False,
    ) -> None:
        super().__init__(env, capture_stderr=capture_stderr)
        self.data_dir = data_dir
        self.args = list(args)
        self.epoch = ""
        self.metrics_url = ""  # where it serves /metrics, as it announced ("" if it does not)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self, port: int) -> list[str]:
        server = [sys.executable, "-m", "collab_grpc.server"]
        # Metrics on a free port (the default, 9464, would be shared by every test server);
        # ``args`` come after, so a test can ask for another address or `off`.
        metrics = [] if "COLLAB_METRICS_ADDR" in self.env else ["--metrics-addr", "127.0.0.1:0"]
        common = ["--grpc-addr", f"127.0.0.1:{port}", "--data-dir", str(self.data_dir)]
        return [*server, *common, *metrics, *self.args]

    def on_ready(self, line: str) -> None:
        address, epoch = line.split("listening on ", 1)[1].split()
        self.port = int(address.rsplit(":", 1)[1])
        self.epoch = epoch.removeprefix("epoch=")
        announced = [entry for entry in self.banner if entry.startswith("collab-server metrics on ")]
        self.metrics_url = announced[-1].split(" on ", 1)[1].strip() if announced else ""

    def start(self, port: int = 0) -> ServerProcess:
        super().start(port)
        return self

    def __enter__(self) -> ServerProcess:
        return self.start()


class BridgeProcess(_ChildProcess):
    """`collab-bridge` on a free loopback port, following the server at ``grpc_target``."""

    ready_marker = "collab-bridge listening on"

    def __init__(
        self,
        grpc_target: str,
        *,
        data_dir: Path,
        env: Mapping[str, str] | None = None,
        capture_stderr: bool = False,
    ) -> None:
        super().__init__(env, capture_stderr=capture_stderr)
        self.grpc_target = grpc_target
        self.data_dir = data_dir
        self.scheme = "http"  # https when it serves TLS (its ready line says)

    @property
    def http(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.http}/metrics"

    @property
    def ws(self) -> str:
        return f"ws{self.scheme.removeprefix('http')}://127.0.0.1:{self.port}/api/v1/collaboration/ws"

    def argv(self, port: int) -> list[str]:
        bridge = [sys.executable, "-m", "bridge.main", "--bridge-addr", f"127.0.0.1:{port}"]
        return [*bridge, "--grpc-target", self.grpc_target, "--data-dir", str(self.data_dir)]

    def on_ready(self, line: str) -> None:
        self.scheme = line.split("listening on ", 1)[1].split("://", 1)[0]
        self.port = int(line.rsplit(":", 1)[1])

    def start(self, port: int = 0) -> BridgeProcess:
        super().start(port)
        return self

    def __enter__(self) -> BridgeProcess:
        return self.start()
