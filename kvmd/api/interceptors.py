"""Server interceptors: the single place where exceptions become gRPC statuses."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from kvmd.api.errors import to_status
from kvmd.core.errors import DomainError, KernelError

log = logging.getLogger("kvmd.api")

Behavior = Callable[[Any, grpc.ServicerContext], Any]


def _abort(exc: BaseException, method: str, context: grpc.ServicerContext) -> None:
    status = to_status(exc)
    if isinstance(exc, DomainError) and not isinstance(exc, KernelError):
        log.info("rpc failed", extra={"method": method, "code": status.code.name,
                                      "error": exc.message})
    else:
        log.error("rpc failed", exc_info=exc, extra={"method": method,
                                                      "code": status.code.name})
    context.abort_with_status(status)


def _wrap_unary(behavior: Behavior, method: str) -> Behavior:
    def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except Exception as exc:
            if isinstance(exc, grpc.RpcError) or _is_abort(exc):
                raise
            _abort(exc, method, context)
    return wrapper


def _wrap_stream(behavior: Behavior, method: str) -> Behavior:
    def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behavior(request, context)
        except Exception as exc:
            if isinstance(exc, grpc.RpcError) or _is_abort(exc):
                raise
            _abort(exc, method, context)
    return wrapper


def _is_abort(exc: BaseException) -> bool:
    # grpc raises a bare Exception from context.abort(); let it through untouched.
    return type(exc) is Exception and not exc.args


# The four kinds of handler behavior and the constructor of each.
_KINDS = (("unary_unary", grpc.unary_unary_rpc_method_handler),
          ("unary_stream", grpc.unary_stream_rpc_method_handler),
          ("stream_unary", grpc.stream_unary_rpc_method_handler),
          ("stream_stream", grpc.stream_stream_rpc_method_handler))


def rewrap(handler: Any, wrap: Callable[[str, Behavior], Behavior]) -> Any:
    """A copy of `handler` whose behavior is `wrap(kind, behavior)`; kind is one of
    unary_unary, unary_stream, stream_unary, stream_stream. Shared by every interceptor."""
    if handler is None:
        return None
    for kind, make in _KINDS:
        behavior = getattr(handler, kind)
        if behavior:
            return make(wrap(kind, behavior), handler.request_deserializer,
                        handler.response_serializer)
    return handler


class ErrorInterceptor(grpc.ServerInterceptor):
    """Map DomainError (and anything unexpected, as INTERNAL) to a rich status."""

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method

        def wrap(kind: str, behavior: Behavior) -> Behavior:
            streams_out = kind.endswith("_stream")
            return _wrap_stream(behavior, method) if streams_out else _wrap_unary(behavior,
                                                                                  method)
        return rewrap(continuation(handler_call_details), wrap)
