"""Domain errors and their gRPC status codes.

Domain code raises these; agent.service maps them to a status in one place. A message names the
offending field or object, e.g. ``OCI.Process.Args: empty``.
"""

from __future__ import annotations

import grpc


class AgentError(Exception):
    """Base of all errors that reach the client with a specific status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AgentError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(AgentError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(AgentError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(AgentError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(AgentError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(AgentError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unimplemented(AgentError):
    code = grpc.StatusCode.UNIMPLEMENTED


class ResourceExhausted(AgentError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Internal(AgentError):
    code = grpc.StatusCode.INTERNAL


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for ``exc``."""
    if isinstance(exc, AgentError):
        return exc.code, exc.message
    if isinstance(exc, OSError):
        name = exc.strerror or type(exc).__name__
        where = f": {exc.filename}" if exc.filename else ""
        return grpc.StatusCode.INTERNAL, f"{name}{where}"
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "timed out"
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
