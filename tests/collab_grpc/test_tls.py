"""collab_grpc.tls and the server's --tls-cert/--tls-key options: every bad file is
refused with a message naming it, before the server listens."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest

from collab_grpc.config import ServerConfig, parse_server_config
from collab_grpc.server import start_server
from collab_grpc.tls import TLSConfigError, read_key_pair, server_credentials
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc
from tests.support.rpc import WRITE_KEY, activity, bearer
from tests.support.tls import TLSFiles, make_tls_files


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def test_a_matching_pair_is_read(tls: TLSFiles) -> None:
    cert, key = read_key_pair(tls.cert, tls.key)
    assert cert == tls.cert.read_bytes()
    assert key == tls.key.read_bytes()
    assert isinstance(server_credentials(tls.cert, tls.key), grpc.ServerCredentials)


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        ("missing", "key", r"cannot read the TLS certificate .*missing\.pem"),
        ("cert", "missing", r"cannot read the TLS key .*missing\.pem"),
        ("junk", "key", r"the TLS certificate .*junk\.pem is not PEM"),
        ("cert", "junk", r"the TLS key .*junk\.pem is not PEM"),
        ("key", "key", r"the TLS certificate .*key\.pem is not PEM"),
        ("cert", "cert", r"the TLS key .*cert\.pem is not PEM"),
        ("cert", "other_key", r"cert\.pem with the key .*other-key\.pem: the key does not belong"),
        ("cert", "encrypted_key", r"the TLS key is encrypted"),
        ("directory", "key", r"cannot read the TLS certificate"),
    ],
)
def test_unusable_files_are_refused(tls: TLSFiles, cert: str, key: str, message: str) -> None:
    def path(name: str) -> Path:
        if name == "missing":
            return tls.ca.parent / "missing.pem"
        if name == "directory":
            return tls.ca.parent
        value: Path = getattr(tls, name)
        return value

    with pytest.raises(TLSConfigError, match=message):
        read_key_pair(path(cert), path(key))


@pytest.mark.parametrize(
    "env", [{"COLLAB_TLS_CERT": "cert.pem"}, {"COLLAB_TLS_KEY": "key.pem"}], ids=["cert only", "key only"]
)
def test_cert_and_key_go_together(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_server_config([], env)
    assert exited.value.code == 2
    assert "--tls-cert / COLLAB_TLS_CERT and --tls-key / COLLAB_TLS_KEY must be set together" in capsys.readouterr().err


def test_flags_and_environment(tls: TLSFiles) -> None:
    config = parse_server_config(["--tls-cert", str(tls.cert)], {"COLLAB_TLS_KEY": str(tls.key)})
    assert (config.tls_cert, config.tls_key) == (tls.cert, tls.key)
    assert parse_server_config([], {}).tls_cert is None


async def test_a_bad_file_stops_the_server_before_it_opens_a_store(tls: TLSFiles, server_config: ServerConfig) -> None:
    config = dataclasses.replace(server_config, tls_cert=tls.cert, tls_key=tls.junk)
    with pytest.raises(TLSConfigError, match="not PEM"):
        await start_server(config)
    assert not config.data_dir.exists()


async def test_in_process_server_serves_tls_only(tls: TLSFiles, server_config: ServerConfig) -> None:
    running = await start_server(dataclasses.replace(server_config, tls_cert=tls.cert, tls_key=tls.key))
    target = f"127.0.0.1:{running.port}"
    try:
        trusted = grpc.ssl_channel_credentials(tls.ca.read_bytes())
        async with grpc.aio.secure_channel(target, trusted) as channel:
            reply = await pb_grpc.CollaborationServiceStub(channel).RecordActivity(
                activity("tls_agent"), metadata=bearer(WRITE_KEY), timeout=10
            )
            assert reply.activity_id.startswith("act_")
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.CollaborationServiceStub(channel).RecordActivity(
                    activity("tls_agent"), metadata=bearer(WRITE_KEY), timeout=10
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(0)
