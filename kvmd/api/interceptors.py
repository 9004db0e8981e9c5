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


class ErrorInterceptor(grpc.ServerInterceptor):
    """Map DomainError (and anything unexpected, as INTERNAL) to a rich status."""

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method),
                handler.request_deserializer, handler.response_serializer)
        return handler
