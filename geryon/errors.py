"""Geryon's domain errors, split into transient and terminal.

Domain code raises these; it never imports grpc. The registry servicer maps
each to the gRPC status code named by its ``code`` (one table, in
``registry_service``), and the client library maps status codes back to these
classes, so a caller on either side handles one set of exceptions.
"""

from __future__ import annotations


class GeryonError(Exception):
    """Base of every Geryon error. ``code`` is the gRPC status code name."""

    code = "UNKNOWN"
    transient = False

    def __init__(self, message: str, *, resume_revision: int = 0) -> None:
        super().__init__(message)
        self.message = message
        # For watch errors: the revision a watcher continues from.
        self.resume_revision = resume_revision

    def __str__(self) -> str:
        return self.message


class Terminal(GeryonError):
    """Retrying the same request will fail the same way."""


class Transient(GeryonError):
    """The request may succeed if retried later."""

    transient = True


class InvalidArgument(Terminal):
    code = "INVALID_ARGUMENT"


class NotFound(Terminal):
    code = "NOT_FOUND"


class AlreadyExists(Terminal):
    code = "ALREADY_EXISTS"


class FailedPrecondition(Terminal):
    code = "FAILED_PRECONDITION"


class PermissionDenied(Terminal):
    code = "PERMISSION_DENIED"


class Unauthenticated(Terminal):
    code = "UNAUTHENTICATED"


class OutOfRange(Terminal):
    """A watch asked for history that was compacted away."""

    code = "OUT_OF_RANGE"


class ResourceExhausted(Terminal):
    """A limit was reached; a slow watcher was cut off."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(Transient):
    code = "UNAVAILABLE"


class DeadlineExceeded(Transient):
    code = "DEADLINE_EXCEEDED"


class Cancelled(Transient):
    """The server gave up on the call (its shutdown grace ran out): try again."""

    code = "CANCELLED"


class Internal(Terminal):
    code = "INTERNAL"


# Status code name -> exception class, for the client's side of the boundary.
BY_CODE: dict[str, type[GeryonError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        OutOfRange,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Internal,
    )
}
