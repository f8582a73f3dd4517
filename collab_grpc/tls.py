"""TLS for collab-server: the certificate and key named by ``--tls-cert``/``--tls-key``.

Both files are read and checked once, at start, so that a wrong path, an unreadable
file, something that is not PEM or a key that belongs to another certificate stops the
server with a message naming the file, instead of every client failing its handshake.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

__all__ = ["TLSConfigError", "read_key_pair", "server_credentials"]


class TLSConfigError(ValueError):
    """A TLS file named in the configuration cannot be used; the message says why."""


def _read(path: Path, what: str, marker: bytes) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from None
    if marker not in data:
        raise TLSConfigError(f"the TLS {what} {path} is not PEM (no {marker.decode()!r} line)")
    return data


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise TLSConfigError("the TLS key is encrypted; give an unencrypted PEM key (readable by this user only)")


def read_key_pair(cert: Path, key: Path) -> tuple[bytes, bytes]:
    """The PEM certificate chain and private key, checked to be PEM and to belong together."""
    cert_pem = _read(cert, "certificate", b"-----BEGIN CERTIFICATE-----")
    key_pem = _read(key, "key", b"PRIVATE KEY-----")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        reason = (
            "the key does not belong to the certificate"
            if exc.reason == "KEY_VALUES_MISMATCH"
            else f"OpenSSL cannot load them ({exc.reason or exc})"
        )
        raise TLSConfigError(f"cannot use the TLS certificate {cert} with the key {key}: {reason}") from None
    return cert_pem, key_pem


def server_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    """Credentials for ``add_secure_port``: server-side TLS, no client certificates."""
    cert_pem, key_pem = read_key_pair(cert, key)
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])
