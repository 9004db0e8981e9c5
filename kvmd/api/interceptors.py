"""The server's one interceptor, and the one place exceptions become statuses.

Every handler the server sees is async. Each call goes through `CallChain`, one coroutine
(or async generator, for streams) that does in order what used to be four nested
interceptors, with every per-method decision made once and cached with the wrapped handler:

    metrics (count and time the call) -> errors (domain errors become statuses)
        -> stages (authorization, then the caller's budget) -> dispatch -> servicer

Dispatch: unary servicer methods are plain functions. By default they run in the daemon's
bounded thread pool (they may take VM locks, do ioctls, copy memory). Methods marked
`@on_loop` run directly on the event loop, saving two thread hand-offs: only cheap ones that
never block and take no lock that can be held long (reads of state the core publishes
without locks, run control that only flips a vCPU's state). Streaming methods are async
generators or coroutines and run on the loop, so an idle stream costs no thread.

A handler may answer with a message it has already serialized (bytes, where the method's
answer is a message): it is sent as is. For big answers built faster as bytes than through
protobuf's API (GetDirtyLog's packed page runs).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio

from kvmd.api.errors import to_status
from kvmd.api.pool import CallPool
from kvmd.core.errors import EXHAUSTION_ERRNOS, DomainError, KernelError, from_os_error

log = logging.getLogger("kvmd.api")

Behavior = Callable[..., Any]
F = TypeVar("F", bound=Callable[..., Any])

# The four kinds of handler behavior and the constructor of each.
_KINDS = (("unary_unary", grpc.unary_unary_rpc_method_handler),
          ("unary_stream", grpc.unary_stream_rpc_method_handler),
          ("stream_unary", grpc.stream_unary_rpc_method_handler),
          ("stream_stream", grpc.stream_stream_rpc_method_handler))

# Seconds of slack between the client's deadline and the server's view of it.
DEADLINE_SLACK_SECONDS = 0.1


def on_loop(fn: F) -> F:
    """Mark a sync unary servicer method to run on the event loop instead of the pool. Only
    for methods that never block: no ioctl that can wait, no lock that can be held long."""
    fn.__kvmd_on_loop__ = True  # type: ignore[attr-defined]
    return fn


def rewrap(handler: Any, wrap: Callable[[str, Behavior], Behavior]) -> Any:
    """A copy of `handler` whose behavior is `wrap(kind, behavior)`; kind is one of
    unary_unary, unary_stream, stream_unary, stream_stream."""
    if handler is None:
        return None
    for kind, make in _KINDS:
        behavior = getattr(handler, kind)
        if behavior:
            return make(wrap(kind, behavior), handler.request_deserializer,
                        serialized_as_is(handler.response_serializer))
    return handler


def serialized_as_is(serializer: Callable[[Any], bytes] | None
                     ) -> Callable[[Any], bytes] | None:
    """`serializer`, except that an answer already serialized (bytes) goes as it is."""
    if serializer is None:
        return None
    serialize = serializer

    def serialize_unless_bytes(message: Any) -> bytes:
        return message if type(message) is bytes else serialize(message)
    return serialize_unless_bytes


def streams_responses(kind: str) -> bool:
    return kind.endswith("_stream")


def is_abort(exc: BaseException) -> bool:
    """A status already sent by context.abort (or a client that went away)."""
    return isinstance(exc, grpc.aio.AbortError | asyncio.CancelledError | GeneratorExit)


class Stage(Protocol):
    """One admission step of every call (authorization, budgets): plain synchronous
    methods, no per-call generator or context manager."""

    def applies(self, method: str, kind: str) -> bool:
        """Whether the stage acts on calls of this method at all (asked once per method)."""
        ...

    def enter(self, method: str, kind: str, request: Any, context: Any) -> Any:
        """Admit the call (raise a DomainError to refuse it); returns what `leave` needs.
        For request streams `request` is the first message (None if there is none)."""
        ...

    def leave(self, token: Any) -> None:
        """The call is over, however it ended (only called if `enter` returned)."""
        ...


class HandlerRegistry(Protocol):
    """Where services are added: a grpc.aio server, or a view of one (see
    kvmd.server.GenericHandlersOnly)."""

    def add_generic_rpc_handlers(self, handlers: Any) -> None: ...


class Observer(Protocol):
    def observe(self, method: str, code: str, seconds: float) -> None: ...


def status_code_name(exc: BaseException | None, context: grpc.aio.ServicerContext) -> str:
    """The status code a call ended with, by how it ended (for metrics)."""
    if exc is None:
        return "OK"
    if isinstance(exc, grpc.aio.AbortError):
        status = context.code()
        return status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        # The client went away: its deadline passed, or it cancelled. The server's view of
        # the deadline can lag the client's by a few ms.
        remaining = context.time_remaining()
        return ("DEADLINE_EXCEEDED" if remaining is not None
                and remaining < DEADLINE_SLACK_SECONDS else "CANCELLED")
    return "UNKNOWN"


async def abort_with_status(method: str, exc: Exception,
                            context: grpc.aio.ServicerContext) -> None:
    """Map a DomainError (anything else is INTERNAL) to a rich status and abort the call
    with it: the single place where exceptions become gRPC statuses."""
    if isinstance(exc, OSError) and exc.errno in EXHAUSTION_ERRNOS:
        # The host ran out (memory, descriptors) in a call the core did not wrap: a limit
        # for the caller, not a daemon bug with a traceback.
        exc = from_os_error(exc)
    status = to_status(exc)
    if isinstance(exc, DomainError) and not isinstance(exc, KernelError):
        log.info("rpc failed", extra={"method": method, "code": status.code.name,
                                      "error": exc.message})
    else:
        log.error("rpc failed", exc_info=exc, extra={"method": method,
                                                      "code": status.code.name})
    await context.abort(status.code, status.details, status.trailing_metadata)


@dataclass(frozen=True)
class Plan:
    """What happens to calls of one method, decided once."""

    method: str
    kind: str
    stages: tuple[Stage, ...]
    dispatch: str  # "loop" (sync, on the event loop), "async", "pool"


class CallChain(grpc.aio.ServerInterceptor):
    """The server's only interceptor (see the module's docstring). Wrapped handlers are
    cached per method, so after the first call of a method the server's handler lookup and
    the wrapping cost nothing."""

    def __init__(self, pool: CallPool, stages: list[Stage],
                 metrics: Observer | None = None) -> None:
        self.pool = pool
        self.stages = list(stages)
        self.metrics = metrics
        self._handlers: dict[str, Any] = {}

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
            handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None  # unknown methods are not cached: their names are the caller's
            handler = rewrap(handler, lambda kind, behavior: self.wrap(method, kind, behavior))
            self._handlers[method] = handler
        return handler

    def plan(self, method: str, kind: str, behavior: Behavior) -> Plan:
        if inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior):
            dispatch = "async"
        elif kind != "unary_unary":
            raise TypeError(f"{method}: a {kind} method must be async (async def)")
        elif getattr(behavior, "__kvmd_on_loop__", False):
            dispatch = "loop"
        else:
            dispatch = "pool"
        stages = tuple(s for s in self.stages if s.applies(method, kind))
        return Plan(method, kind, stages, dispatch)

    def wrap(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        plan = self.plan(method, kind, behavior)
        if streams_responses(kind):
            return self._streaming(plan, behavior)
        return self._unary(plan, behavior)

    # -- the parts of one call --------------------------------------------------------------

    def _enter(self, plan: Plan, request: Any, context: Any) -> list[tuple[Stage, Any]]:
        entered: list[tuple[Stage, Any]] = []
        try:
            for stage in plan.stages:
                entered.append((stage, stage.enter(plan.method, plan.kind, request, context)))
        except BaseException:
            self._leave(entered)
            raise
        return entered

    @staticmethod
    def _leave(entered: list[tuple[Stage, Any]]) -> None:
        for stage, token in reversed(entered):
            stage.leave(token)

    @staticmethod
    async def _first_message(request: Any) -> tuple[Any, AsyncIterator[Any]]:
        """A request stream's first message (None if there is none) and the whole stream
        (that message again, then the rest): stages admit on the first message, which
        names the VM."""
        iterator = request.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            first = None
        return first, _prepend(first, iterator)

    def _observe(self, plan: Plan, exc: BaseException | None, context: Any,
                 started: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(plan.method, status_code_name(exc, context),
                                 time.perf_counter() - started)

    def _unary(self, plan: Plan, behavior: Behavior) -> Behavior:
        pool, dispatch = self.pool, plan.dispatch
        request_stream = plan.kind.startswith("stream_")

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            failure: BaseException | None = None
            try:
                try:
                    admitted = request
                    if request_stream:
                        admitted, request = await self._first_message(request)
                    entered = self._enter(plan, admitted, context)
                    try:
                        if dispatch == "loop":
                            return behavior(request, context)
                        if dispatch == "async":
                            return await behavior(request, context)
                        return await pool.run(behavior, request, context)
                    finally:
                        self._leave(entered)
                except Exception as exc:
                    if is_abort(exc):
                        raise
                    await abort_with_status(plan.method, exc, context)
                    raise  # abort raised already; for the type checker
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._observe(plan, failure, context, started)
        return unary

    def _streaming(self, plan: Plan, behavior: Behavior) -> Behavior:
        if not inspect.isasyncgenfunction(behavior):
            # A coroutine that sends with context.write (grpc's own servicers: health's
            # Watch): wrapped as a coroutine too, as grpc tells the two kinds apart.
            return self._unary(plan, behavior)
        request_stream = plan.kind.startswith("stream_")

        async def streaming(request: Any, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[Any]:
            started = time.perf_counter()
            failure: BaseException | None = None
            try:
                try:
                    admitted = request
                    if request_stream:
                        admitted, request = await self._first_message(request)
                    entered = self._enter(plan, admitted, context)
                    try:
                        async for item in behavior(request, context):
                            yield item
                    finally:
                        self._leave(entered)
                except Exception as exc:
                    if is_abort(exc):
                        raise
                    await abort_with_status(plan.method, exc, context)
                    raise
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._observe(plan, failure, context, started)
        return streaming


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is not None:
        yield first
        async for item in rest:
            yield item


async def run_blocking(pool: CallPool, fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking core work from an async handler in the pool, with the caller's context
    variables."""
    return await pool.run(fn, *args)
