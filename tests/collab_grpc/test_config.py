"""parse_server_config (flag, then environment, then default) and load_roster."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from collab_grpc.config import ServerConfig, load_roster, parse_server_config
from collab_grpc.servicer import CollaborationServicer
from collab_grpc.state import RosterEntry, StateSettings

# -- parse_server_config ----------------------------------------------------------------------


def test_defaults() -> None:
    config = parse_server_config([], {})
    assert config == ServerConfig()
    assert config.grpc_addr == "127.0.0.1:50051"
    assert config.data_dir == Path(".collab")
    assert config.auth is True
    assert config.rate_limit == 10.0
    assert config.roster is None


def test_every_option_from_environment() -> None:
    env = {
        "COLLAB_GRPC_ADDR": "0.0.0.0:6000",
        "COLLAB_DATA_DIR": "/var/lib/collab",
        "COLLAB_AUTH": "off",
        "COLLAB_API_KEYS": "k1, k2 ,,",
        "COLLAB_READ_KEYS": "r1",
        "COLLAB_JWT_SECRET": "s3cret",
        "COLLAB_ROSTER": "roster.toml",
        "COLLAB_HISTORY_LIMIT": "20",
        "COLLAB_EVENT_RETAIN": "30",
        "COLLAB_ACTIVITY_TTL": "1.5",
        "COLLAB_RATE_LIMIT": "0",
        "COLLAB_MAX_METADATA_BYTES": "1024",
        "COLLAB_STATUS_INTERVAL": "0.5",
        "COLLAB_SUBSCRIBER_QUEUE": "7",
        "COLLAB_SHUTDOWN_GRACE": "0",
        "COLLAB_LOG_LEVEL": "debug",
        "COLLAB_LOG_FORMAT": "text",
        "COLLAB_SQLITE_COMMIT_DELAY": "0.05",
    }
    assert parse_server_config([], env) == ServerConfig(
        grpc_addr="0.0.0.0:6000",
        data_dir=Path("/var/lib/collab"),
        auth=False,
        api_keys=("k1", "k2"),
        read_keys=("r1",),
        jwt_secret="s3cret",
        roster=Path("roster.toml"),
        history_limit=20,
        event_retain=30,
        activity_ttl=1.5,
        rate_limit=0.0,
        max_metadata_bytes=1024,
        status_interval=0.5,
        subscriber_queue=7,
        shutdown_grace=0.0,
        log_level="debug",
        log_format="text",
        sqlite_commit_delay=0.05,
    )


def test_every_option_from_flags() -> None:
    argv = [
        "--grpc-addr=127.0.0.1:0",
        "--data-dir",
        "d",
        "--auth",
        "false",
        "--api-keys",
        "a",
        "--read-keys",
        "b,c",
        "--jwt-secret",
        "j",
        "--roster",
        "r.json",
        "--history-limit",
        "5",
        "--event-retain",
        "26",
        "--activity-ttl",
        "7",
        "--rate-limit",
        "2.5",
        "--max-metadata-bytes",
        "8",
        "--status-interval",
        "9",
        "--subscriber-queue",
        "10",
        "--shutdown-grace",
        "11",
        "--log-level",
        "warning",
        "--log-format",
        "json",
        "--sqlite-commit-delay",
        "0",
    ]
    assert parse_server_config(argv, {}) == ServerConfig(
        grpc_addr="127.0.0.1:0",
        data_dir=Path("d"),
        auth=False,
        api_keys=("a",),
        read_keys=("b", "c"),
        jwt_secret="j",
        roster=Path("r.json"),
        history_limit=5,
        event_retain=26,
        activity_ttl=7.0,
        rate_limit=2.5,
        max_metadata_bytes=8,
        status_interval=9.0,
        subscriber_queue=10,
        shutdown_grace=11.0,
        log_level="warning",
        log_format="json",
        sqlite_commit_delay=0.0,
    )


def test_flag_beats_env_beats_default() -> None:
    env = {"COLLAB_HISTORY_LIMIT": "200", "COLLAB_EVENT_RETAIN": "300", "COLLAB_API_KEYS": "env-key"}
    config = parse_server_config(["--history-limit", "100", "--api-keys", "flag-key"], env)
    assert config.history_limit == 100  # flag over env
    assert config.event_retain == 300  # env over default
    assert config.api_keys == ("flag-key",)
    assert config.activity_ttl == 3600.0  # default


def test_empty_env_value_means_default() -> None:
    config = parse_server_config([], {"COLLAB_HISTORY_LIMIT": "", "COLLAB_GRPC_ADDR": ""})
    assert config.history_limit == 1000
    assert config.grpc_addr == "127.0.0.1:50051"


def test_other_environment_variables_ignored() -> None:
    assert parse_server_config([], {"HISTORY_LIMIT": "5", "COLLAB_UNKNOWN": "x"}) == ServerConfig()


def test_process_environment_when_env_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLLAB_SUBSCRIBER_QUEUE", "33")
    assert parse_server_config([]).subscriber_queue == 33
    assert parse_server_config([], {}).subscriber_queue_size == 5_000  # an explicit env replaces os.environ


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("on", True), ("ON", True), ("true", True), ("1", True), ("off", False), ("False", False), ("0", False)],
)
def test_auth_values(raw: str, expected: bool) -> None:
    assert parse_server_config(["--auth", raw], {}).auth is expected
    assert parse_server_config([], {"COLLAB_AUTH": raw}).auth is expected


def test_secret_not_in_repr() -> None:
    config = parse_server_config(["--jwt-secret", "very-secret-value"], {})
    assert "very-secret-value" not in repr(config)


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--auth", "maybe"], {}),
        ([], {"COLLAB_AUTH": "yes"}),
        (["--history-limit", "many"], {}),
        (["--history-limit", "1.5"], {}),
        ([], {"COLLAB_EVENT_RETAIN": "x"}),
        (["--activity-ttl", "soon"], {}),
        ([], {"COLLAB_RATE_LIMIT": "fast"}),
        (["--history-limit", "0"], {}),
        (["--event-retain", "-1"], {}),
        (["--max-metadata-bytes", "0"], {}),
        (["--subscriber-queue", "-1"], {}),
        (["--activity-ttl", "0"], {}),
        (["--activity-ttl", "-5"], {}),
        (["--status-interval", "0"], {}),
        ([], {"COLLAB_SHUTDOWN_GRACE": "-0.1"}),
        (["--log-format", "xml"], {}),
        (["--sqlite-commit-delay", "-0.01"], {}),
        ([], {"COLLAB_SQLITE_COMMIT_DELAY": "2"}),
        (["--sqlite-commit-delay", "soon"], {}),
        (["--store-timeout", "0"], {}),
        ([], {"COLLAB_STORE_TIMEOUT": "120"}),
        (["--idempotency-ttl", "0.5"], {}),
        ([], {"COLLAB_IDEMPOTENCY_TTL": "forever"}),
        (["--no-such-flag"], {}),
        (["--history-limit"], {}),
    ],
)
def test_invalid_values_exit(argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_server_config(argv, env)
    assert info.value.code == 2
    assert "collab-server: error:" in capsys.readouterr().err


def test_invalid_env_names_flag_and_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_server_config([], {"COLLAB_HISTORY_LIMIT": "lots"})
    err = capsys.readouterr().err
    assert "--history-limit / COLLAB_HISTORY_LIMIT" in err
    assert "'lots'" in err


def test_valid_flag_overrides_invalid_env() -> None:
    assert parse_server_config(["--history-limit", "5"], {"COLLAB_HISTORY_LIMIT": "lots"}).history_limit == 5


@pytest.mark.parametrize(
    "flag",
    [
        "--activity-ttl",
        "--status-interval",
        "--shutdown-grace",
        "--rate-limit",
        "--sqlite-commit-delay",
        "--store-timeout",
        "--idempotency-ttl",
    ],
)
def test_nan_is_invalid(flag: str) -> None:
    with pytest.raises(SystemExit):
        parse_server_config([flag, "nan"], {})


def test_unknown_log_level_is_invalid() -> None:
    with pytest.raises(SystemExit):
        parse_server_config(["--log-level", "verbose"], {})


# -- load_roster ------------------------------------------------------------------------------


def test_roster_json_list(tmp_path: Path) -> None:
    path = tmp_path / "roster.json"
    path.write_text('[{"agent_id": "agent_1", "department": "engineering"}, {"agent_id": "agent_2"}]')
    assert load_roster(path) == [RosterEntry("agent_1", "engineering"), RosterEntry("agent_2", "")]


def test_roster_json_object(tmp_path: Path) -> None:
    path = tmp_path / "roster.json"
    path.write_text('{"agents": [{"agent_id": "agent_1", "department": "ops", "extra": 1}]}')
    assert load_roster(path) == [RosterEntry("agent_1", "ops")]


def test_roster_empty_list(tmp_path: Path) -> None:
    path = tmp_path / "roster.json"
    path.write_text("[]")
    assert load_roster(path) == []


def test_roster_toml(tmp_path: Path) -> None:
    path = tmp_path / "roster.toml"
    path.write_text('[[agents]]\nagent_id = "agent_1"\ndepartment = "research"\n\n[[agents]]\nagent_id = "agent_2"\n')
    assert load_roster(path) == [RosterEntry("agent_1", "research"), RosterEntry("agent_2", "")]


def test_roster_any_other_suffix_is_json(tmp_path: Path) -> None:
    path = tmp_path / "roster.txt"
    path.write_text('[{"agent_id": "a"}]')
    assert load_roster(path) == [RosterEntry("a")]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("bad.json", "{not json"),
        ("bad.toml", "[[agents]\nagent_id = "),
        ("empty.json", ""),
        ("object.json", '{"people": []}'),
        ("scalar.json", "42"),
        ("agents-not-list.json", '{"agents": {"agent_id": "a"}}'),
        ("entry-not-object.json", '["agent_1"]'),
        ("no-id.json", '[{"department": "ops"}]'),
        ("id-not-string.json", '[{"agent_id": 7}]'),
        ("toml-no-agents.toml", 'title = "x"\n'),
        ("toml-table.toml", '[agents]\nagent_id = "a"\n'),
    ],
)
def test_bad_roster(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError):
        load_roster(path)


def test_missing_roster_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_roster(tmp_path / "absent.json")


def test_roster_null_department(tmp_path: Path) -> None:
    path = tmp_path / "roster.json"
    path.write_text('[{"agent_id": "agent_1", "department": null}]')
    try:
        roster = load_roster(path)
    except ValueError:
        return  # refusing the entry is also acceptable
    assert roster == [RosterEntry("agent_1", "")]


def test_a_subscriber_cut_for_lag_can_resume_with_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """The subscriber queue is at most half of the retained events, by default and when
    either is set: a subscriber cut for lagging resumes from what is still retained."""
    defaults = parse_server_config([], {})
    assert defaults == ServerConfig()
    assert defaults.subscriber_queue_size * 2 <= defaults.event_retain
    servicer_queue = inspect.signature(CollaborationServicer).parameters["subscriber_queue"].default
    assert servicer_queue * 2 <= StateSettings().event_log_retain
    assert parse_server_config(["--event-retain", "4000"], {}).subscriber_queue_size == 2000  # derived
    assert (
        parse_server_config(["--event-retain", "4000", "--subscriber-queue", "2000"], {}).subscriber_queue_size == 2000
    )
    with pytest.raises(SystemExit):
        parse_server_config(["--event-retain", "4000", "--subscriber-queue", "2001"], {})
    assert "must be at most half of event-retain (4000)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_server_config(["--event-retain", "1"], {})


def test_store_timeout_and_idempotency_ttl_reach_the_config() -> None:
    config = parse_server_config(["--store-timeout", "0.5"], {"COLLAB_IDEMPOTENCY_TTL": "3600"})
    assert config.store_timeout == 0.5 and config.idempotency_ttl == 3600.0
