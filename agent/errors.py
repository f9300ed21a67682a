"""Domain errors and their status codes.

Domain code raises these; agent.service maps them to a status in one place, for gRPC and ttrpc
alike. A message names the offending field or object, e.g. ``OCI.Process.Args: empty``.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """The status codes of gRPC (google.rpc.Code), which ttrpc carries too: same names, same numbers."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class AgentError(Exception):
    """Base of all errors that reach the client with a specific status code."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AgentError):
    code = Code.INVALID_ARGUMENT


class NotFound(AgentError):
    code = Code.NOT_FOUND


class AlreadyExists(AgentError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(AgentError):
    code = Code.FAILED_PRECONDITION


class DeadlineExceeded(AgentError):
    code = Code.DEADLINE_EXCEEDED


class PermissionDenied(AgentError):
    code = Code.PERMISSION_DENIED


class Unimplemented(AgentError):
    code = Code.UNIMPLEMENTED


class ResourceExhausted(AgentError):
    code = Code.RESOURCE_EXHAUSTED


class Internal(AgentError):
    code = Code.INTERNAL


def status_of(exc: BaseException) -> tuple[Code, str]:
    """The status code and message a client sees for ``exc``."""
    if isinstance(exc, AgentError):
        return exc.code, exc.message
    if isinstance(exc, OSError):
        name = exc.strerror or type(exc).__name__
        where = f": {exc.filename}" if exc.filename else ""
        return Code.INTERNAL, f"{name}{where}"
    if isinstance(exc, TimeoutError):
        return Code.DEADLINE_EXCEEDED, str(exc) or "timed out"
    return Code.INTERNAL, f"{type(exc).__name__}: {exc}"
