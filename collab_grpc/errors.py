"""Errors of the domain core; the servicer maps each to one gRPC status code."""

from __future__ import annotations

__all__ = [
    "BUDGET_TRAILER",
    "BudgetExhausted",
    "CollabError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "Unauthenticated",
]


class CollabError(Exception):
    """A request the hub refuses; the message says what is wrong, for the caller."""


class InvalidArgument(CollabError):
    """The request itself is malformed: missing ids, unknown types, oversize input."""


class NotFound(CollabError):
    """The request names an activity or session the hub does not know."""


class FailedPrecondition(CollabError):
    """The request is valid but the state forbids it (already completed, ended...)."""


class RateLimited(CollabError):
    """An agent recorded faster than its allowance; retry after ``retry_after`` s."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unauthenticated(CollabError):
    """No credential, or one the hub does not accept."""


class PermissionDenied(CollabError):
    """A valid credential without the scope the call needs (a read-only key on a write)."""


# The trailing metadata key naming the budget a RESOURCE_EXHAUSTED refusal is about
# (a rate limit's refusal carries `retry-after` instead).
BUDGET_TRAILER = "collab-budget"


class BudgetExhausted(CollabError):
    """A memory or storage budget is full: the write would take it past its setting.
    Not a rate: retrying soon does not help until something is freed (RESOURCE_EXHAUSTED,
    told apart from RateLimited by carrying ``budget`` instead of a retry delay)."""

    def __init__(self, message: str, budget: str) -> None:
        super().__init__(message)
        self.budget = budget  # the setting's name, e.g. "max-open-activity-bytes"
