"""The hub as a user installs it: the sdist and the wheel built from this checkout, the
wheel installed into a clean venv outside it, `collab up` run in an empty folder, and
the dashboard watched going live in a headless Chromium (Debian's, driven by Playwright).

The build runs with this venv's setuptools (--no-isolation: no download); installing the
wheel fetches its dependencies as `pip install` does for a user (the configured index,
through pip's cache). Without /usr/bin/chromium the browser test skips, unless
COLLAB_REQUIRE_BROWSER=1, where it fails."""

from __future__ import annotations

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
from tests.support.processes import OutputLines

# Building and installing take most of the time: one build and one venv for the module.
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
# Top-level names that only make sense in the checkout.
NOT_SHIPPED = {"bench", "tests", "scripts"}
BUILD_TIMEOUT = 300
INSTALL_TIMEOUT = 600


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


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
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("packaging")
    dist = work / "dist"
    # The sdist first, then the wheel from it (what `python -m build` does): the sdist must
    # carry every file the wheel needs, and the checkout gets no build/ directory.
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(CHECKOUT)], BUILD_TIMEOUT, work)
    (wheel,) = dist.glob("*.whl")
    venv = work / "venv"
    # Without pip of its own: this venv's pip installs into it (--python), so nothing is fetched for pip.
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], BUILD_TIMEOUT, work)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet"]
    run([*pip, str(wheel)], INSTALL_TIMEOUT, work)
    return Installed(wheel, venv)


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
    top_level = {PurePosixPath(name).parts[0] for name in names}
    assert not top_level & NOT_SHIPPED, sorted(top_level)
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
