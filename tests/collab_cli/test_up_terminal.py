"""`collab up` as a person runs it: in a terminal (a pseudo-terminal here), where its logs
are text and Ctrl-C stops the bridge before the server; JSON lines when not a terminal."""

from __future__ import annotations

import errno
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from collab_cli.main import choose_log_format
from tests.support.processes import OutputLines

pytestmark = pytest.mark.integration

COLLAB = str(Path(sys.executable).parent / "collab")
TIMEOUT = 30.0
CTRL_C = b"\x03"
# A line the bridge logs as the last of its shutdown, and the server's first.
BRIDGE_FINISHED = "Finished server process"
SERVER_STOPPING = "collab_grpc.server: shutting down"
# What the bridge logs when the server goes away under it.
UPSTREAM_TROUBLE = ("upstream", "rpc failed", "UNAVAILABLE")


def up_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a first `collab up`: no credentials, no log format chosen."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("COLLAB_")}
    # The default metrics port may be another test's; this test does not read metrics.
    env["COLLAB_METRICS_ADDR"] = "off"
    env["COLLAB_DATA_DIR"] = str(tmp_path / "data")
    return env


class Terminal:
    """`collab up` on a pseudo-terminal of its own, as a shell runs it in the foreground:
    what it prints is read on a thread; Ctrl-C is typed, not signalled."""

    def __init__(self, argv: list[str], env: Mapping[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: straight to exec
            os.execve(argv[0], argv, dict(env))
        self.text = ""
        self.closed = threading.Event()
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError as exc:  # EIO: every process holding the terminal has exited
                if exc.errno != errno.EIO:
                    raise
                chunk = b""
            with self._changed:
                if not chunk:
                    self.closed.set()
                    self._changed.notify_all()
                    return
                self.text += chunk.decode(errors="replace").replace("\r\n", "\n")
                self._changed.notify_all()

    def wait_for(self, marker: str) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: marker in self.text or self.closed.is_set(), TIMEOUT):
                raise AssertionError(f"no {marker!r} within {TIMEOUT} s; the terminal shows:\n{self.text}")
            assert marker in self.text, f"closed before {marker!r}; the terminal shows:\n{self.text}"

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def exit_status(self) -> int:
        """Wait for the command to exit and its terminal to close; its exit status."""
        deadline = time.monotonic() + TIMEOUT
        while (result := os.waitpid(self.pid, os.WNOHANG)) == (0, 0):
            assert time.monotonic() < deadline, f"still running after {TIMEOUT} s:\n{self.text}"
            time.sleep(0.05)
        assert self.closed.wait(TIMEOUT), "the terminal stayed open after the command exited"
        return os.waitstatus_to_exitcode(result[1])

    def close(self) -> None:
        """Stop the command if it still runs (gracefully first: its children are in their own
        process groups), and close the terminal."""
        for signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                    break
                os.kill(self.pid, signum)
            except ChildProcessError:
                break
            deadline = time.monotonic() + TIMEOUT
            while os.waitpid(self.pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
                time.sleep(0.05)
        os.close(self.fd)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    argv = [COLLAB, "up", "--grpc-addr", "127.0.0.1:0", "--bridge-addr", "127.0.0.1:0"]
    running = Terminal(argv, up_env(tmp_path))
    yield running
    running.close()


def log_lines(output: str) -> list[str]:
    """The lines the processes logged, of what `collab up` and they printed."""
    return [line for line in output.splitlines() if " INFO " in line or " WARNING " in line or " ERROR " in line]


def test_on_a_terminal_logs_are_text_and_ctrl_c_stops_the_bridge_before_the_server(terminal: Terminal) -> None:
    terminal.wait_for("Ctrl-C stops the hub.")
    terminal.wait_for("upstream event stream connected")
    terminal.type(CTRL_C)
    assert terminal.exit_status() == 0
    output = terminal.text
    assert "collab_grpc.server: serving" in output
    assert not [line for line in output.splitlines() if line.removeprefix("^C").startswith("{")], output
    assert output.index(BRIDGE_FINISHED) < output.index(SERVER_STOPPING), output
    after_ctrl_c = output[output.index("^C") :]
    trouble = [line for line in log_lines(after_ctrl_c) if any(word in line for word in UPSTREAM_TROUBLE)]
    assert not trouble, output
    assert "collab_grpc.server: stopped" in output


def test_ctrl_c_while_starting_leaves_no_process_behind(terminal: Terminal) -> None:
    terminal.wait_for("collab-server listening on ")
    # Typed as soon as the server is up: the bridge is starting, or just started.
    terminal.type(CTRL_C)
    assert terminal.exit_status() == 0, terminal.text
    address = terminal.text.split("collab-server listening on ", 1)[1].split()[0]
    host, port = address.rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host, int(port)), timeout=5):
        pass
    bridge = [line for line in terminal.text.splitlines() if "collab-bridge listening on" in line]
    if bridge:  # it had started: its port is closed too
        url = bridge[0].split("listening on ", 1)[1].removeprefix("http://")
        host, port = url.rsplit(":", 1)
        with pytest.raises(ConnectionRefusedError), socket.create_connection((host, int(port)), timeout=5):
            pass


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP (terminal closed)"])
def test_not_on_a_terminal_logs_are_json_lines_and_a_stop_signal_stops_the_bridge_first(
    tmp_path: Path, stop: signal.Signals
) -> None:
    up = subprocess.Popen(
        [COLLAB, "up", "--grpc-addr", "127.0.0.1:0", "--bridge-addr", "127.0.0.1:0"],
        env=up_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert up.stdout is not None
    output = OutputLines(up.stdout)
    try:
        output.wait_for("upstream event stream connected")
        up.send_signal(stop)
        assert up.wait(TIMEOUT) == 0
        lines = output.until_closed().splitlines()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    messages = [(entry["logger"], entry["message"]) for entry in logged]
    assert ("collab_grpc.server", "serving") in messages
    assert messages.index(("uvicorn.error", BRIDGE_FINISHED + f" [{_bridge_pid(logged)}]")) < messages.index(
        ("collab_grpc.server", "shutting down")
    )
    assert not [entry for entry in logged if entry["level"] != "INFO"], logged


def _bridge_pid(logged: list[dict[str, str]]) -> str:
    started = next(entry["message"] for entry in logged if entry["message"].startswith("Started server process"))
    return started.split("[", 1)[1].rstrip("]")


@pytest.mark.parametrize(
    ("flag", "env", "stderr_is_terminal", "chosen"),
    [
        ("json", {"COLLAB_LOG_FORMAT": "text"}, True, "json"),
        ("text", {}, False, "text"),
        (None, {"COLLAB_LOG_FORMAT": "json"}, True, "json"),
        (None, {"COLLAB_LOG_FORMAT": "text"}, False, "text"),
        (None, {}, True, "text"),
        (None, {}, False, "json"),
    ],
)
def test_the_log_format_is_the_flag_else_the_environment_else_text_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, flag: str | None, env: dict[str, str], stderr_is_terminal: bool, chosen: str
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: stderr_is_terminal)
    assert choose_log_format(flag, env) == chosen
