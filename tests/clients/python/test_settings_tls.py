"""The SDK's TLS setting: `tls_ca` / COLLAB_GRPC_TLS_CA (tests/integration/test_security.py
calls a TLS server with it, through the SDK and the CLI)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from collab import AsyncClient, Client, Settings
from tests.support.tls import TLSFiles, make_tls_files


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def test_plaintext_unless_a_ca_is_given(monkeypatch: pytest.MonkeyPatch, tls: TLSFiles) -> None:
    monkeypatch.delenv("COLLAB_GRPC_TLS_CA", raising=False)
    assert Settings.resolve().tls_ca is None
    assert Settings.resolve().channel_credentials() is None
    monkeypatch.setenv("COLLAB_GRPC_TLS_CA", str(tls.ca))
    assert Settings.resolve().tls_ca == tls.ca
    assert isinstance(Settings.resolve().channel_credentials(), grpc.ChannelCredentials)
    assert Settings.resolve(tls_ca=tls.other_ca).tls_ca == tls.other_ca  # the argument wins


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing", r"cannot read the CA file .*missing\.pem \(COLLAB_GRPC_TLS_CA\)"), ("junk", "holds no PEM")],
)
def test_an_unusable_ca_file_is_a_clear_error(tls: TLSFiles, name: str, message: str) -> None:
    path = tls.ca.parent / "missing.pem" if name == "missing" else tls.junk
    with pytest.raises(ValueError, match=message):
        Client("127.0.0.1:1", "token", tls_ca=path)
    with pytest.raises(ValueError, match=message):
        AsyncClient("127.0.0.1:1", "token", tls_ca=str(path))


def test_a_client_given_its_own_channel_does_not_read_the_ca(tmp_path: Path) -> None:
    with grpc.insecure_channel("127.0.0.1:1") as channel, Client(channel=channel, tls_ca=tmp_path / "none") as hub:
        assert hub.settings.tls_ca == tmp_path / "none"
