"""collab: the Python SDK of the collab hub.

    from collab import Client

    with Client() as hub:                      # COLLAB_GRPC_TARGET / COLLAB_TOKEN
        with hub.activity("agent_1", "council_debate", department="engineering") as act:
            ...                                # completed on exit, failed on exception
        for event in hub.events(types=["activity_recorded"]):
            ...                                # reconnects and resumes by itself

`AsyncClient` is the same over asyncio.
"""

from collab._async_client import AsyncBatchRecorder, AsyncClient
from collab._client import BatchRecorder, Client
from collab._core import ActivityHandle, RecordFailure
from collab._errors import (
    CollabError,
    Conflict,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    ResumeFailed,
    Unauthenticated,
    Unavailable,
)
from collab._requests import ACTIVITY_TYPES, EVENT_KINDS, MEMORY_OPERATIONS
from collab._settings import Settings

__all__ = [
    "ACTIVITY_TYPES",
    "EVENT_KINDS",
    "MEMORY_OPERATIONS",
    "ActivityHandle",
    "AsyncBatchRecorder",
    "AsyncClient",
    "BatchRecorder",
    "Client",
    "CollabError",
    "Conflict",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "RecordFailure",
    "ResumeFailed",
    "Settings",
    "Unauthenticated",
    "Unavailable",
]
