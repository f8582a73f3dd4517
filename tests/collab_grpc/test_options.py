"""collab_grpc.options: settings declared once as dataclass fields, read from flags and COLLAB_* variables."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from bridge.config import BridgeConfig, parse_bridge_config
from collab_grpc.config import ServerConfig, parse_server_config
from collab_grpc.options import option, options_of, parse, require_together

CONFIGS = [ServerConfig, BridgeConfig]


@dataclass(frozen=True)
class Sample:
    count: int = option(3, "how many", minimum=1, maximum=10)
    delay: float = option(0.5, "seconds, 50% of the time", above=0)
    mode: str = option("fast", "fast or slow", choices=("fast", "slow"))
    enabled: bool = option(False, "on or off")
    names: tuple[str, ...] = option((), "comma-separated names")
    file: Path | None = option(None, "a file", shown_default="the data dir's")
    key: Path | None = option(None, "the file's key")
    token: str = option("", "a secret", secret=True, parse=lambda text: int(text) and text)


def _check(config: Sample) -> None:
    require_together(config, "file", "key")


def _parse(argv: list[str], env: dict[str, str] | None = None) -> Sample:
    return parse(Sample, argv, env or {}, prog="sample", description="a sample", check=None)


def _refusal(argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        parse(Sample, argv, env, prog="sample", description="a sample", check=_check)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: sample")
    return err.splitlines()[-1]


# -- the mechanism ----------------------------------------------------------------------------


def test_names_and_types_come_from_the_field() -> None:
    assert [(each.flag, each.variable) for each in options_of(Sample)][:2] == [
        ("--count", "COLLAB_COUNT"),
        ("--delay", "COLLAB_DELAY"),
    ]
    config = _parse(["--count", "4", "--enabled", "ON", "--names", " a, b,,", "--file", "f.pem"], {"COLLAB_DELAY": "2"})
    assert config == Sample(count=4, delay=2.0, enabled=True, names=("a", "b"), file=Path("f.pem"))


def test_flag_beats_variable_beats_default_and_empty_means_default() -> None:
    assert _parse(["--count", "5"], {"COLLAB_COUNT": "6"}).count == 5
    assert _parse([], {"COLLAB_COUNT": "6"}).count == 6
    assert _parse([], {"COLLAB_COUNT": ""}).count == 3
    assert _parse(["--count="], {"COLLAB_COUNT": "6"}).count == 3  # an empty flag still wins
    assert _parse(["--count", "5"], {"COLLAB_COUNT": "many"}).count == 5  # the variable is not read


def test_choices_are_matched_in_any_case_and_kept_in_lower_case() -> None:
    assert _parse(["--mode", "SLOW"]).mode == "slow"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--count", "0"], {}, "--count / COLLAB_COUNT: invalid value '0': must be at least 1 and at most 10"),
        ([], {"COLLAB_COUNT": "11"}, "--count / COLLAB_COUNT: invalid value '11': must be at least 1 and at most 10"),
        (["--count", "2.5"], {}, "--count / COLLAB_COUNT: invalid value '2.5': invalid literal for int()"),
        (["--delay", "0"], {}, "--delay / COLLAB_DELAY: invalid value '0': must be more than 0"),
        (["--delay", "nan"], {}, "--delay / COLLAB_DELAY: invalid value 'nan': must be a finite number"),
        (["--delay", "inf"], {}, "--delay / COLLAB_DELAY: invalid value 'inf': must be a finite number"),
        (["--mode", "medium"], {}, "--mode / COLLAB_MODE: invalid value 'medium': expected one of fast, slow"),
        ([], {"COLLAB_ENABLED": "yes"}, "--enabled / COLLAB_ENABLED: invalid value 'yes': expected on or off"),
        (["--file", "f.pem"], {}, "--file / COLLAB_FILE and --key / COLLAB_KEY must be set together"),
        (["--token", "s3cret-value"], {}, "--token / COLLAB_TOKEN: invalid value (hidden): invalid literal"),
        (["--no-such-flag", "1"], {}, "unrecognized arguments: --no-such-flag 1"),
    ],
)
def test_a_bad_value_names_the_flag_and_variable_and_exits_2(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in _refusal(argv, env, capsys)


def test_a_secret_stays_out_of_the_repr_and_the_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert "12345" not in repr(_parse(["--token", "12345"]))
    assert "s3cret" not in _refusal(["--token", "s3cret"], {}, capsys)


def test_help_shows_each_variable_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _parse(["--help"])
    assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "seconds, 50% of the time [COLLAB_DELAY, default 0.5, more than 0]" in out
    assert "a file [COLLAB_FILE, default the data dir's]" in out
    assert "comma-separated names [COLLAB_NAMES, default none]" in out


def test_a_field_of_a_type_without_a_parser_must_name_one() -> None:
    @dataclass(frozen=True)
    class Odd:
        ratio: complex = option(1j, "a complex number")

    with pytest.raises(TypeError, match=r"Odd\.ratio: no parser for its type"):
        options_of(Odd)


# -- the two processes' declarations ----------------------------------------------------------


@pytest.mark.parametrize("config_type", CONFIGS)
def test_every_field_is_an_option_with_its_own_flag_and_variable(config_type: type[ServerConfig]) -> None:
    declared = options_of(config_type)
    assert [each.name for each in declared] == [each.name for each in fields(config_type)]
    assert len({each.flag for each in declared}) == len({each.variable for each in declared}) == len(declared)


@pytest.mark.parametrize("config_type", CONFIGS)
def test_every_default_is_within_its_own_bounds(config_type: type[ServerConfig]) -> None:
    for each in options_of(config_type):
        each.rules.check(each.default)


@pytest.mark.parametrize("parse_config", [parse_server_config, parse_bridge_config])
def test_help_lists_every_flag_with_its_variable(parse_config: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert callable(parse_config)
    with pytest.raises(SystemExit):
        parse_config(["--help"], {})
    out = capsys.readouterr().out
    unwrapped = "".join(out.split())  # argparse wraps lines at spaces and hyphens
    config_type = ServerConfig if parse_config is parse_server_config else BridgeConfig
    for each in options_of(config_type):
        assert f"  {each.flag} " in out, each.name
        bracket = ", ".join(filter(None, (each.variable, f"default {each.default_text}", each.accepts)))
        assert "".join(f"{each.help} [{bracket}]".split()) in unwrapped, each.name


def test_the_options_module_loads_nothing_of_the_server() -> None:
    code = (
        "import sys, collab_grpc.options, bridge.config\n"
        "loaded = sorted(name for name in sys.modules if name.startswith('collab_grpc.'))\n"
        "print(' '.join(name for name in loaded if not name.startswith('collab_grpc.v1')))\n"
    )
    checkout = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=checkout)
    # names: the enum table beside the generated code (it imports only collab_grpc.v1).
    assert set(result.stdout.split()) <= {"collab_grpc.options", "collab_grpc.names"}
