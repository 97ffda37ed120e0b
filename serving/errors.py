"""The serving errors: one root, and each error knows its gRPC status.

Servicer code raises these; :class:`serving.interceptors.ErrorInterceptor` is the one
place that turns them into gRPC statuses (and metrics), so no handler calls
``context.abort`` itself.

>>> err = InvalidArgument("customer_id is empty")
>>> err.code.name, str(err)
('INVALID_ARGUMENT', 'customer_id is empty')
"""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """Root of every error the API reports to its callers."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServingError):
    """The request is malformed: an empty or over-long id, too many ids."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    """The customer (or document) does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(ServingError):
    """No API key, or one the server does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServingError):
    """A known API key whose role may not call this method."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(ServingError):
    """Redis did not answer in time or refused the connection: retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServingError):
    """The caller's deadline passed before the work was done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(ServingError):
    """A server limit is reached (e.g. concurrent watchers)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DataError(ServingError):
    """A document in Redis cannot be read: a bug or a foreign writer, not the caller's fault."""

    code = grpc.StatusCode.INTERNAL
