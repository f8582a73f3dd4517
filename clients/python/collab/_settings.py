"""Where and how to reach the hub: arguments first, then COLLAB_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Settings"]


@dataclass(frozen=True)
class Settings:
    target: str
    token: str | None
    timeout: float
    retries: int

    @classmethod
    def resolve(
        cls,
        target: str | None = None,
        token: str | None = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> Settings:
        """``target``: COLLAB_GRPC_TARGET, default 127.0.0.1:50051. ``token``:
        COLLAB_TOKEN, else the first of COLLAB_API_KEYS, else the key the server generated
        in COLLAB_DATA_DIR (default ./.collab). ``timeout`` per call in seconds:
        COLLAB_TIMEOUT, default 10. ``retries`` of calls that failed with UNAVAILABLE:
        COLLAB_RETRIES, default 4."""
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
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1, 2, ...): 0.1, 0.2, ... 2."""
        return float(min(2.0, 0.1 * 2 ** (attempt - 1)))
