"""Where and how to reach the hub: arguments first, then COLLAB_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["Settings"]

_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class Settings:
    target: str
    token: str | None
    timeout: float
    retries: int
    # PEM file of the CA(s) that signed the server's certificate; set, calls use TLS.
    tls_ca: Path | None = None

    @classmethod
    def resolve(
        cls,
        target: str | None = None,
        token: str | None = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        tls_ca: str | Path | None = None,
    ) -> Settings:
        """``target``: COLLAB_GRPC_TARGET, default 127.0.0.1:50051. ``token``:
        COLLAB_TOKEN, else the first of COLLAB_API_KEYS, else the key the server generated
        in COLLAB_DATA_DIR (default ./.collab). ``timeout`` per call in seconds:
        COLLAB_TIMEOUT, default 10. ``retries`` of calls that failed with UNAVAILABLE:
        COLLAB_RETRIES, default 4. ``tls_ca``: COLLAB_GRPC_TLS_CA, default none (plaintext)."""
        environ = os.environ
        if token is None:
            token = environ.get("COLLAB_TOKEN") or next(
                (key.strip() for key in environ.get("COLLAB_API_KEYS", "").split(",") if key.strip()), None
            )
        if token is None:
            key_file = Path(environ.get("COLLAB_DATA_DIR", ".collab")) / "api_key"
            token = key_file.read_text().strip() if key_file.exists() else None
        return cls(
            target=target or environ.get("COLLAB_GRPC_TARGET", "127.0.0.1:50051"),
            token=token or None,
            timeout=timeout if timeout is not None else float(environ.get("COLLAB_TIMEOUT", "10")),
            retries=retries if retries is not None else int(environ.get("COLLAB_RETRIES", "4")),
            tls_ca=Path(ca) if (ca := tls_ca or environ.get("COLLAB_GRPC_TLS_CA")) else None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS trusting ``tls_ca``; None for plaintext. Raises ValueError, naming the
        file, when it cannot be read or holds no PEM certificate."""
        if self.tls_ca is None:
            return None
        try:
            pem = self.tls_ca.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read the CA file {self.tls_ca} (COLLAB_GRPC_TLS_CA): {exc.strerror}") from None
        if _PEM_CERTIFICATE not in pem:
            raise ValueError(f"the CA file {self.tls_ca} (COLLAB_GRPC_TLS_CA) holds no PEM certificate")
        return grpc.ssl_channel_credentials(root_certificates=pem)

    def channel(self) -> grpc.Channel:
        """A channel to ``target``: TLS when ``tls_ca`` is set."""
        credentials = self.channel_credentials()
        if credentials is None:
            return grpc.insecure_channel(self.target)
        return grpc.secure_channel(self.target, credentials)

    def aio_channel(self) -> grpc.aio.Channel:
        """The same, for grpc.aio."""
        credentials = self.channel_credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(self.target)
        return grpc.aio.secure_channel(self.target, credentials)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1, 2, ...): 0.1, 0.2, ... 2."""
        return float(min(2.0, 0.1 * 2 ** (attempt - 1)))
