"""What runs around every method: API-key auth, metrics, and the one place errors become
gRPC statuses.

These are not ``grpc.ServerInterceptor`` s: grpcio's sync server runs interceptors on its
single polling thread, for every call, and under load that thread is the bottleneck
(the auth and metrics interceptors held ~12% of the server's GIL time there). Instead,
:class:`Registrar` wraps each method's behavior once, when a service is registered, so
the work runs on the worker thread that answers the call.

A wrapped call times itself, counts itself in flight, checks the API key when the method
needs a role, and maps :class:`~serving.errors.ServingError` to its status; anything
else becomes INTERNAL with its traceback in the log, never in the reply.

The request decoder is wrapped too: bytes that are not the request message reach the
wrapped call as :data:`UNDECODABLE`, so such a call is authenticated first, counted, and
answered INVALID_ARGUMENT. (grpc's own decoder answers INTERNAL before any key is
checked and logs a traceback per call: a log flood open to anyone.) The reply encoder
lets a behavior answer its reply already serialized, as cached scores are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from serving.auth import METHOD_ROLES, ApiKeys
from serving.errors import InvalidArgument, ServingError
from serving.metrics import IN_FLIGHT, REQUEST_SECONDS
from serving.threads import long_lived

log = logging.getLogger(__name__)


class Registrar:
    """Stands in for the grpc.Server in ``add_*Servicer_to_server`` and registers every
    method handler wrapped; ``keys`` None turns auth off."""

    def __init__(self, server: grpc.Server, keys: ApiKeys | None) -> None:
        self._server = server
        self._keys = keys
        self._wrapped: dict[str, tuple[Any, Any]] = {}  # method -> (handler, wrapped)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: self.wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        )

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_Generic(h, self) for h in handlers))

    def wrap(self, method: str, handler: Any) -> Any:
        """``handler`` with its behavior wrapped, built once per method."""
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        needed = METHOD_ROLES.get(method)
        keys = self._keys if needed is not None else None
        wrapped = _replace_behavior(
            handler, lambda behavior, streaming: _guarded(method, behavior, streaming, keys,
                                                          needed or "")
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class _Generic(grpc.GenericRpcHandler):
    """A generic handler whose method handlers come out wrapped (a dict hit per call)."""

    def __init__(self, inner: grpc.GenericRpcHandler, registrar: Registrar) -> None:
        self._inner = inner
        self._registrar = registrar

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(details)
        if handler is None:
            return None
        return self._registrar.wrap(details.method, handler)  # type: ignore[no-any-return]


UNDECODABLE = object()  # the request of a call whose bytes are not its message


def _tolerant(decode: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if decode is None:
        return None

    def tolerant_decode(raw: bytes) -> Any:
        try:
            return decode(raw)
        except Exception:  # protobuf's DecodeError, or a str field that is not UTF-8
            return UNDECODABLE

    return tolerant_decode


def _passthrough(encode: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """``encode``, except that a reply already serialized (bytes) goes out as it is."""
    if encode is None:
        return None

    def passthrough_encode(reply: Any) -> bytes:
        return reply if reply.__class__ is bytes else encode(reply)

    return passthrough_encode


def _replace_behavior(handler: Any, wrap: Callable[[Any, bool], Any]) -> Any:
    """``handler`` with its behavior wrapped (``wrap(behavior, streaming)``) and its request
    decoder made tolerant."""
    handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer),
                               response_serializer=_passthrough(handler.response_serializer))
    if handler.unary_unary:
        return handler._replace(unary_unary=wrap(handler.unary_unary, False))
    if handler.unary_stream:
        return handler._replace(unary_stream=wrap(handler.unary_stream, True))
    if handler.stream_unary:
        return handler._replace(stream_unary=wrap(handler.stream_unary, False))
    return handler._replace(stream_stream=wrap(handler.stream_stream, True))


def _check_decoded(request: Any) -> None:
    if request is UNDECODABLE:
        raise InvalidArgument("the request is not a valid message of this method's type")


def _unexpected(method: str, context: grpc.ServicerContext, exc: Exception) -> str:
    """Status name of a call that raised ``exc``; aborts with INTERNAL if it is a bug."""
    code = context.code()
    if code is not None:  # the behavior aborted the call itself
        return str(code.name)
    log.error("unexpected error method=%s", method, exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
    return "INTERNAL"  # not reached: abort raises


def _guarded(
    method: str, behavior: Any, streaming: bool, keys: ApiKeys | None, needed: str
) -> Callable[..., Any]:
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
            if keys is not None:
                keys.authorize(context.invocation_metadata(), needed)
            _check_decoded(request)
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
            if keys is not None:
                keys.authorize(context.invocation_metadata(), needed)
            _check_decoded(request)
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

    return long_lived(stream) if streaming else unary
