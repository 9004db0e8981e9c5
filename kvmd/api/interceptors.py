"""Server interceptors for the grpc.aio server, and the one place exceptions become statuses.

Every handler the server sees is async. Unary servicer methods are plain functions: the
innermost interceptor (`BlockingAdapter`) runs them in the daemon's bounded thread pool.
Streaming methods are async generators or coroutines and run on the event loop, so an idle
stream costs no thread. Each other interceptor wraps a call in one async *scope* (an async
context manager around the whole call, a stream's every message included):

    MetricsInterceptor -> ErrorInterceptor -> AuthInterceptor -> BudgetInterceptor
        -> BlockingAdapter -> servicer
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent import futures
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc
import grpc.aio

from kvmd.api.errors import to_status
from kvmd.core.errors import EXHAUSTION_ERRNOS, DomainError, KernelError, from_os_error

log = logging.getLogger("kvmd.api")

Behavior = Callable[..., Any]
# (method, kind, request, context) -> a scope yielding the request the inner behavior gets
# (an interceptor may replace a request stream, e.g. after reading its first message).
Scope = Callable[[str, str, Any, grpc.aio.ServicerContext], AbstractAsyncContextManager[Any]]

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


def streams_responses(kind: str) -> bool:
    return kind.endswith("_stream")


def scoped(method: str, kind: str, behavior: Behavior, scope: Scope) -> Behavior:
    """An async behavior that runs `behavior` (async) inside `scope`."""
    if streams_responses(kind):
        async def streaming(request: Any, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[Any]:
            async with scope(method, kind, request, context) as inner_request:
                async for item in behavior(inner_request, context):
                    yield item
        return streaming

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with scope(method, kind, request, context) as inner_request:
            return await behavior(inner_request, context)
    return unary


class ScopedInterceptor(grpc.aio.ServerInterceptor):
    """Base of the interceptors below: wraps every behavior in `self.scope`."""

    def scope(self, method: str, kind: str, request: Any,
              context: grpc.aio.ServicerContext) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
            handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        return rewrap(handler, lambda kind, behavior: scoped(method, kind, behavior,
                                                             self.scope))


def is_abort(exc: BaseException) -> bool:
    """A status already sent by context.abort (or a client that went away)."""
    return isinstance(exc, grpc.aio.AbortError | asyncio.CancelledError | GeneratorExit)


class ErrorInterceptor(ScopedInterceptor):
    """Map DomainError (and anything unexpected, as INTERNAL) to a rich status: the single
    place where exceptions become gRPC statuses."""

    @asynccontextmanager
    async def scope(self, method: str, kind: str, request: Any,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            yield request
        except Exception as exc:
            if is_abort(exc):
                raise
            if isinstance(exc, OSError) and exc.errno in EXHAUSTION_ERRNOS:
                # The host ran out (memory, descriptors) in a call the core did not wrap:
                # a limit for the caller, not a daemon bug with a traceback.
                exc = from_os_error(exc)
            status = to_status(exc)
            if isinstance(exc, DomainError) and not isinstance(exc, KernelError):
                log.info("rpc failed", extra={"method": method, "code": status.code.name,
                                              "error": exc.message})
            else:
                log.error("rpc failed", exc_info=exc, extra={"method": method,
                                                              "code": status.code.name})
            await context.abort(status.code, status.details, status.trailing_metadata)


class BlockingAdapter(grpc.aio.ServerInterceptor):
    """Runs plain (sync) unary servicer methods in the daemon's bounded thread pool, with the
    caller's context variables (identity, quota). Streaming methods must be async: a sync
    stream would hold a thread for its whole life, which is what this server avoids."""

    def __init__(self, pool: futures.ThreadPoolExecutor) -> None:
        self.pool = pool

    def adapt(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        if inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior):
            return behavior
        if kind != "unary_unary":
            raise TypeError(f"{method}: a {kind} method must be async (async def)")
        pool = self.pool

        async def in_pool(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = contextvars.copy_context()
            return await asyncio.get_running_loop().run_in_executor(
                pool, call.run, behavior, request, context)
        return in_pool

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
            handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        return rewrap(handler, lambda kind, behavior: self.adapt(method, kind, behavior))


async def run_blocking(pool: futures.Executor, fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking core work from an async handler in the pool, with the caller's context
    variables."""
    call = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(pool, call.run, fn, *args)
