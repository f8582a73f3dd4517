"""collab as a user installs it: the sdist and the wheel built from this checkout, the
wheel installed into clean venvs outside it, one per way of installing it (issue 18):

- `collab-hub` alone (the SDK and the command line's client commands): only protobuf and
  grpcio come with it; `import collab` and `collab record`/`collab history` work against
  a hub run from the checkout, and `collab up`, `collab-server` and `collab-bridge` say
  in one line how to install the server;
- `collab-hub[server]`: `collab up` run in an empty folder, its files served from the
  package, and the dashboard watched going live in a headless Chromium (Debian's, driven
  by Playwright).

The build runs with this venv's setuptools (--no-isolation: no download); installing the
wheel fetches its dependencies as `pip install` does for a user (the configured index,
through pip's cache). Without /usr/bin/chromium the browser test skips, unless
COLLAB_REQUIRE_BROWSER=1, where it fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx
import pytest
from playwright.sync_api import sync_playwright

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, require_chromium
from tests.support.locks import checkout_lock
from tests.support.processes import OutputLines, ServerProcess
from tests.support.rpc import WRITE_KEY

# Building and installing take most of the time: one build for the module, one venv for
# each way of installing.
pytestmark = [pytest.mark.packaging, pytest.mark.integration, pytest.mark.timeout(900)]

CHECKOUT = Path(__file__).resolve().parents[2]
JS_CLIENT_SOURCE = CHECKOUT / "clients" / "js" / "collab.js"
# What the running bridge serves from its package, by URL path and file in the wheel.
SERVED_FILES = {
    "/": "bridge/static/index.html",
    "/dashboard.js": "bridge/static/dashboard.js",
    "/client/collab.js": "bridge/static/collab.js",
    "/static/timeline.js": "bridge/static/timeline.js",
    "/static/graph.js": "bridge/static/graph.js",
    "/static/words.js": "bridge/static/words.js",
    "/static/cockpit.css": "bridge/static/cockpit.css",
    "/static/vendor/cytoscape/cytoscape.esm.min.js": "bridge/static/vendor/cytoscape/cytoscape.esm.min.js",
    "/static/vendor/cytoscape/LICENSE": "bridge/static/vendor/cytoscape/LICENSE",
}
# Every top-level name the wheel installs: collab's packages and its metadata, nothing
# generic (no `bench`, `tests`, `scripts`: they only make sense in the checkout).
TOP_LEVEL = {"collab", "collab_cli", "collab_grpc", "bridge", "collab_hub-0.1.0.dist-info"}
# What `pip install collab-hub` brings: the SDK's two dependencies and typing-extensions,
# grpcio's own.
SDK_DISTRIBUTIONS = {"collab-hub", "grpcio", "protobuf", "typing-extensions"}
SERVER_INSTALL_LINE = "pip install 'collab-hub[server]'"
BUILD_TIMEOUT = 300
INSTALL_TIMEOUT = 600


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def distributions(self) -> set[str]:
        """The distributions installed in the venv, by their normalised names."""
        probe = (
            "import importlib.metadata, json, re; print(json.dumps(sorted("
            "re.sub(r'[-_.]+', '-', d.metadata['Name']).lower() for d in importlib.metadata.distributions())))"
        )
        return set(json.loads(run([str(self.bin / "python"), "-c", probe], 60, self.venv)))


@dataclass(frozen=True)
class RunningHub:
    http: str
    token: str
    folder: Path


def clean_env() -> dict[str, str]:
    """The environment of a user's shell: nothing of this checkout's venv or of the hub's settings."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("COLLAB_") and name not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}
    }


def run(argv: list[str], timeout: float, cwd: Path) -> str:
    result = subprocess.run(argv, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{argv} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    # The sdist first, then the wheel from it (what `python -m build` does): the sdist must
    # carry every file the wheel needs, and the checkout gets no build/ directory.
    # The build writes the checkout's egg-info: one worker at a time.
    with checkout_lock("build"):
        build = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(CHECKOUT)]
        run(build, BUILD_TIMEOUT, dist)
    (built,) = dist.glob("*.whl")
    return built


def install(wheel: Path, requirement: str, work: Path) -> Installed:
    """A clean venv in ``work`` with ``requirement`` (the wheel, with extras or not) installed."""
    venv = work / "venv"
    # Without pip of its own: this venv's pip installs into it (--python), so nothing is fetched for pip.
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], BUILD_TIMEOUT, work)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet"]
    run([*pip, requirement], INSTALL_TIMEOUT, work)
    return Installed(wheel, venv)


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """`pip install 'collab-hub[server]'`: the hub."""
    return install(wheel, f"{wheel}[server]", tmp_path_factory.mktemp("server-install"))


@pytest.fixture(scope="module")
def sdk_installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """`pip install collab-hub`: the SDK and the command line, without the hub."""
    return install(wheel, str(wheel), tmp_path_factory.mktemp("sdk-install"))


@pytest.fixture(scope="module")
def hub(installed: Installed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHub]:
    """`collab up` from the installed wheel, in an empty folder, on free ports."""
    folder = tmp_path_factory.mktemp("empty-folder")
    up = subprocess.Popen(
        [str(installed.bin / "collab"), "up", "--grpc-addr", "127.0.0.1:0", "--bridge-addr", "127.0.0.1:0"],
        cwd=folder,
        # The metrics port too: the default may be another test's.
        env={**clean_env(), "COLLAB_METRICS_ADDR": "127.0.0.1:0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert up.stdout is not None
    output = OutputLines(up.stdout)
    try:
        dashboard = output.wait_for("Dashboard:", timeout=60).split()[1]
        token = output.wait_for("token:").split()[1]
        yield RunningHub(dashboard.split("/?", 1)[0], token, folder)
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0, output.until_closed()
    finally:
        if up.poll() is None:
            up.terminate()
            up.wait(60)


def test_the_wheel_ships_what_the_hub_serves_and_nothing_of_the_checkout(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        assert set(SERVED_FILES.values()) <= names, sorted(names)
        assert wheel.read("bridge/static/collab.js") == JS_CLIENT_SOURCE.read_bytes()
    assert {PurePosixPath(name).parts[0] for name in names} == TOP_LEVEL
    found = run(
        [
            str(installed.bin / "python"),
            "-c",
            "import importlib.util, bridge.app; print(bridge.app.__file__, importlib.util.find_spec('bench'))",
        ],
        60,
        installed.venv,
    ).split()
    assert found[0].startswith(str(installed.venv)), f"the bridge was imported from {found[0]}, not the venv"
    assert found[1] == "None", "a module named bench is installed"


def test_the_sdk_installs_with_protobuf_and_grpcio_only(sdk_installed: Installed) -> None:
    # The venv has no pip of its own (see install), so no pip or setuptools to leave out.
    assert sdk_installed.distributions() - {"pip", "setuptools"} == SDK_DISTRIBUTIONS


def test_the_sdk_and_the_client_commands_work_without_the_hub_installed(
    sdk_installed: Installed, tmp_path: Path
) -> None:
    """`import collab` and `collab record`/`history` from the SDK-only venv, against a hub
    run from the checkout (this venv's)."""
    with ServerProcess(tmp_path / "hub", env={"COLLAB_API_KEYS": WRITE_KEY}) as server:
        env = {**clean_env(), "COLLAB_GRPC_TARGET": server.target, "COLLAB_TOKEN": WRITE_KEY}
        script = (
            "import collab, sys\n"
            "with collab.Client(sys.argv[1], sys.argv[2]) as hub:\n"
            "    print(hub.record_activity('sdk_agent', 'task_assigned', department='sdk'))\n"
            "print(collab.__file__)\n"
        )
        sdk = subprocess.run(
            [str(sdk_installed.bin / "python"), "-c", script, server.target, WRITE_KEY],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sdk.returncode == 0, sdk.stderr
        sdk_activity, sdk_module = sdk.stdout.split()
        assert sdk_module.startswith(str(sdk_installed.venv)), f"collab was imported from {sdk_module}"

        collab = str(sdk_installed.bin / "collab")
        recorded = subprocess.run(
            [collab, "record", "cli_agent", "council_debate", "--department", "sdk"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert recorded.returncode == 0, recorded.stderr
        cli_activity = recorded.stdout.strip()
        history = subprocess.run(
            [collab, "history", "--department", "sdk", "--json"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert history.returncode == 0, history.stderr
        found = {
            (a["activity_id"], a["agent_id"], a["activity_type"])
            for a in map(json.loads, history.stdout.split("\n")[:-1])
        }
        assert found == {
            (sdk_activity, "sdk_agent", "ACTIVITY_TYPE_TASK_ASSIGNED"),
            (cli_activity, "cli_agent", "ACTIVITY_TYPE_COUNCIL_DEBATE"),
        }
        server.stop()


@pytest.mark.parametrize(
    ("argv", "command"),
    [(["collab", "up"], "collab up"), (["collab-server"], "collab-server"), (["collab-bridge"], "collab-bridge")],
)
def test_the_hubs_commands_without_the_server_extra_say_how_to_install_it(
    sdk_installed: Installed, tmp_path: Path, argv: list[str], command: str
) -> None:
    result = subprocess.run(
        [str(sdk_installed.bin / argv[0]), *argv[1:]],
        cwd=tmp_path,  # an empty folder
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{command}: the hub's server is not installed (missing ")
    assert line.endswith(f"): {SERVER_INSTALL_LINE}")
    assert list(tmp_path.iterdir()) == [], "nothing is started, nothing is written"


def test_the_installed_hub_serves_its_files_from_the_package(installed: Installed, hub: RunningHub) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel, httpx.Client(base_url=hub.http, timeout=10) as http:
        for path, packaged in SERVED_FILES.items():
            response = http.get(path)
            assert response.status_code == 200, (path, response.text)
            assert response.content == wheel.read(packaged), path
    assert (hub.folder / ".collab" / "api_key").read_text().strip() == hub.token, "the key lives in the folder"


def test_the_installed_hub_dashboard_goes_live_in_chromium(hub: RunningHub) -> None:
    require_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{hub.http}/?token={hub.token}")
            page.wait_for_selector('#state[data-state="live"]', timeout=10000)
            response = httpx.post(
                f"{hub.http}/api/v1/collaboration/record-activity",
                json={"agent_id": "installed_agent", "activity_type": "council_debate"},
                headers={"Authorization": f"Bearer {hub.token}"},
                timeout=10,
            )
            assert response.status_code == 200, response.text
            activity_id = response.json()["activity_id"]
            page.wait_for_selector(f'#feed [data-activity="{activity_id}"]', timeout=10000)
            page.wait_for_selector('#agents [data-agent="installed_agent"][data-status="active"]', timeout=10000)
            assert not errors, errors
        finally:
            browser.close()
