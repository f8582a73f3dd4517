"""The bridge's TLS: HTTPS/WSS for browsers (`--tls-cert`/`--tls-key`, served by uvicorn)
and TLS to the server (`--grpc-tls-ca`).

The files are checked before uvicorn starts, so a bad one stops the bridge with a
message that names it (uvicorn would print a traceback, or OpenSSL prompt for the
password of an encrypted key).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from bridge.config import BridgeConfig

__all__ = ["check_tls_files", "upstream_channel"]


def _ca_pem(path: Path) -> bytes:
    try:
        pem = path.read_bytes()
        # An empty file loads as "no certificates" without an error; it would trust nothing.
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            raise ssl.SSLError("no certificate")
        ssl.create_default_context(cadata=pem.decode("ascii", errors="replace"))
    except ssl.SSLError:  # before OSError, of which it is a subclass
        raise ValueError(f"--grpc-tls-ca / COLLAB_GRPC_TLS_CA {path} holds no PEM CA certificate") from None
    except OSError as exc:
        raise ValueError(f"cannot read --grpc-tls-ca / COLLAB_GRPC_TLS_CA {path}: {exc.strerror or exc}") from None
    return pem


def upstream_channel(target: str, ca: Path | None) -> grpc.aio.Channel:
    """The channel to the server: TLS trusting ``ca`` when given, else plaintext."""
    if ca is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=_ca_pem(ca)))


def _refuse_password() -> bytes:
    raise ValueError("the key is encrypted; uvicorn is given no password, so use an unencrypted PEM key")


def check_tls_files(config: BridgeConfig) -> None:
    """Raise ValueError saying what is wrong with the configured TLS files, if anything."""
    if config.grpc_tls_ca is not None:
        _ca_pem(config.grpc_tls_ca)
    if config.tls_cert is not None and config.tls_key is not None:
        _check_key_pair(config.tls_cert, config.tls_key)


def _check_key_pair(cert: Path, key: Path) -> None:
    pair = f"--tls-cert {cert} / --tls-key {key}"
    for path in (cert, key):
        if not path.is_file():
            raise ValueError(f"{pair}: {path} is not a readable file")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_refuse_password)
    except OSError as exc:  # ssl.SSLError is an OSError too
        if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"{pair}: the key does not belong to the certificate") from None
        if isinstance(exc, ssl.SSLError):
            raise ValueError(f"{pair}: not a PEM certificate and PEM private key ({exc.reason or exc})") from None
        raise ValueError(f"{pair}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{pair}: {exc}") from None
