"""Self-signed TLS material for tests, made by `trustme`: a CA, a certificate for the
loopback names it signed, and the broken files the configuration checks must refuse."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography.hazmat.primitives import serialization

__all__ = ["TLSFiles", "make_tls_files"]


@dataclass(frozen=True)
class TLSFiles:
    ca: Path  # the CA that signed ``cert``
    cert: Path  # for 127.0.0.1 and localhost
    key: Path
    other_ca: Path  # a CA that signed nothing here
    other_key: Path  # a valid key of another certificate
    encrypted_key: Path  # ``key``, encrypted with a password
    junk: Path  # not PEM at all

    def client_context(self) -> ssl.SSLContext:
        """What a client trusting ``ca`` verifies the servers with (httpx, websockets)."""
        return ssl.create_default_context(cafile=self.ca)


def make_tls_files(directory: Path) -> TLSFiles:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    other = trustme.CA()
    files = TLSFiles(
        ca=directory / "ca.pem",
        cert=directory / "cert.pem",
        key=directory / "key.pem",
        other_ca=directory / "other-ca.pem",
        other_key=directory / "other-key.pem",
        encrypted_key=directory / "encrypted-key.pem",
        junk=directory / "junk.pem",
    )
    ca.cert_pem.write_to_path(str(files.ca))
    issued.cert_chain_pems[0].write_to_path(str(files.cert))
    issued.private_key_pem.write_to_path(str(files.key))
    other.cert_pem.write_to_path(str(files.other_ca))
    other.issue_cert("elsewhere.example").private_key_pem.write_to_path(str(files.other_key))
    private_key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), password=None)
    files.encrypted_key.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"a password"),
        )
    )
    files.junk.write_text("this is not a certificate\n")
    return files
