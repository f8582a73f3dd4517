"""collab_grpc.extras: the [server] extra's modules agree with pyproject.toml, and a
command run without them exits with the one line that says what to install (issue 18).
The same from an installed wheel: tests/packaging/test_wheel.py."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from collab_grpc import extras
from collab_grpc.store import StoreError, open_store

CHECKOUT = Path(__file__).resolve().parents[2]
# Installed with the extra, and not checked for: the server runs without it.
NOT_CHECKED = {"uvloop"}


def server_extra() -> set[str]:
    project = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(Requirement(line).name) for line in project["optional-dependencies"]["server"]}


def test_the_checked_modules_are_the_server_extras_distributions() -> None:
    assert {canonicalize_name(name) for name in extras.SERVER_MODULES} == server_extra() - NOT_CHECKED
    installed_by = importlib.metadata.packages_distributions()
    for distribution, module in extras.SERVER_MODULES.items():
        owners = {canonicalize_name(name) for name in installed_by.get(module.split(".")[0], [])}
        assert canonicalize_name(distribution) in owners, (distribution, module, owners)
        assert extras._importable(module), module


def test_nothing_is_missing_in_the_dev_venv() -> None:
    assert extras.missing_server_distributions() == []
    extras.require_server("collab up")  # returns


def test_a_missing_module_is_named_with_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(extras.SERVER_MODULES, "no-such-distribution", "no_such_module.sub")
    monkeypatch.setitem(extras.SERVER_MODULES, "another-one", "no_such_module_either")
    with pytest.raises(SystemExit) as stopped:
        extras.require_server("collab-server")
    assert str(stopped.value.code) == (
        "collab-server: the hub's server is not installed (missing no-such-distribution, another-one): "
        "pip install 'collab-hub[server]'"
    )


# A finder ahead of every other that says these modules do not exist: an interpreter
# where an extra is not installed, without building one.
HIDE = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {hidden!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Hide())
"""


def run_without(hidden: set[str], code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", HIDE.format(hidden=hidden) + code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=CHECKOUT,
    )


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ("collab-server", "from collab_grpc.extras import server_command; server_command([])"),
        ("collab-bridge", "from collab_grpc.extras import bridge_command; bridge_command([])"),
        ("collab up", "from collab_cli.main import main; main(['up'])"),
    ],
)
def test_without_the_server_extra_the_commands_print_one_line(command: str, code: str) -> None:
    result = run_without({"fastapi", "grpc_health"}, code)
    assert result.returncode == 1
    assert result.stderr == (
        f"{command}: the hub's server is not installed (missing grpcio-health-checking, fastapi): "
        "pip install 'collab-hub[server]'\n"
    )


def test_without_redis_the_redis_store_says_how_to_install_it() -> None:
    code = (
        "from pathlib import Path\n"
        "from collab_grpc.store import StoreError, open_store\n"
        "try:\n"
        "    open_store('redis://127.0.0.1:1/0', Path('.'))\n"
        "except StoreError as error:\n"
        "    print(error)\n"
        "import collab_grpc.store\n"
        "try:\n"
        "    collab_grpc.store.RedisStore\n"
        "except ModuleNotFoundError as error:\n"
        "    print(error.name, error)\n"
    )
    result = run_without({"redis"}, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "COLLAB_STORE is a Redis URL: the Redis store needs the redis package: pip install 'collab-hub[redis]'",
        "redis the Redis store needs the redis package: pip install 'collab-hub[redis]'",
    ]


def test_an_unknown_store_is_still_refused_without_importing_redis(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="sqlite, memory or redis"):
        open_store("postgres://x", tmp_path)
