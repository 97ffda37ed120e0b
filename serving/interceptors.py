"""Server interceptors: API-key auth, and the one place errors become gRPC statuses.

``create_server`` installs them outermost first: :class:`ErrorInterceptor` times every
call, counts it in flight, and maps :class:`~serving.errors.ServingError` (raised by
the servicer or by :class:`AuthInterceptor`) to its status; anything else becomes
INTERNAL with its traceback in the log, never in the reply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from serving.auth import METHOD_ROLES, ApiKeys
from serving.errors import ServingError
from serving.metrics import IN_FLIGHT, REQUEST_SECONDS

log = logging.getLogger(__name__)

Continuation = Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None]


def _replace_behavior(handler: Any, wrap: Callable[[Any, bool], Any]) -> Any:
    """``handler`` with its behavior wrapped (``wrap(behavior, streaming)``)."""
    if handler.unary_unary:
        return handler._replace(unary_unary=wrap(handler.unary_unary, False))
    if handler.unary_stream:
        return handler._replace(unary_stream=wrap(handler.unary_stream, True))
    if handler.stream_unary:
        return handler._replace(stream_unary=wrap(handler.stream_unary, False))
    return handler._replace(stream_stream=wrap(handler.stream_stream, True))


class AuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls of Scoring methods without an API key of a sufficient role."""

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        needed = METHOD_ROLES.get(details.method)
        if handler is None or needed is None:
            return handler
        try:
            self._keys.authorize(details.invocation_metadata, needed)
        except ServingError as exc:
            error = exc
        else:
            return handler
        return _replace_behavior(handler, lambda _, streaming: _raiser(error, streaming))


def _raiser(exc: ServingError, streaming: bool) -> Callable[..., Any]:
    def reject(request: Any, context: grpc.ServicerContext) -> Any:
        raise exc

    def reject_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        raise exc
        yield  # a generator, like the behavior it replaces

    return reject_stream if streaming else reject


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps ServingError to gRPC statuses and records latency by method and status."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _replace_behavior(
            handler, lambda behavior, streaming: _observed(method, behavior, streaming)
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _unexpected(method: str, context: grpc.ServicerContext, exc: Exception) -> str:
    """Status name of a call that raised ``exc``; aborts with INTERNAL if it is a bug."""
    code = context.code()
    if code is not None:  # the behavior aborted the call itself
        return str(code.name)
    log.error("unexpected error method=%s", method, exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
    return "INTERNAL"  # not reached: abort raises


def _observed(method: str, behavior: Any, streaming: bool) -> Callable[..., Any]:
    short = method.rpartition("/")[2] if method.startswith("/crmscore.") else method
    in_flight = IN_FLIGHT.labels(short)
    ok = REQUEST_SECONDS.labels(short, "OK")

    def observe(start: float, code: str) -> None:
        elapsed = time.perf_counter() - start
        (ok if code == "OK" else REQUEST_SECONDS.labels(short, code)).observe(elapsed)

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        in_flight.inc()
        code = "INTERNAL"
        try:
            response = behavior(request, context)
            set_code = context.code()
            code = "OK" if set_code is None else set_code.name
            return response
        except ServingError as exc:
            code = exc.code.name
            context.abort(exc.code, exc.message)
        except Exception as exc:
            code = _unexpected(method, context, exc)
            raise
        finally:
            in_flight.dec()
            observe(start, code)

    def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        start = time.perf_counter()
        in_flight.inc()
        code = "INTERNAL"
        try:
            yield from behavior(request, context)
            code = "OK" if context.is_active() else "CANCELLED"
        except GeneratorExit:
            code = "CANCELLED"
            raise
        except ServingError as exc:
            code = exc.code.name
            context.abort(exc.code, exc.message)
        except Exception as exc:
            code = _unexpected(method, context, exc)
            raise
        finally:
            in_flight.dec()
            observe(start, code)

    return stream if streaming else unary
