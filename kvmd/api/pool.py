"""The daemon's call pool: bounded worker threads for blocking handler work.

A `concurrent.futures.Executor` (grpc and anything else may submit to it), with a faster path
for the event loop: `run(fn, *args)` hands the call to a worker through a SimpleQueue and the
worker posts the outcome straight to the awaiting loop future. `loop.run_in_executor` on a
ThreadPoolExecutor also makes a concurrent Future, chains it to an asyncio one and
takes the executor's semaphore and the future's condition on both sides: about 110 us per
hop here, against about 45 us this way (benchmarks/rpc_latency.py times the RPCs).

Workers start on demand, up to `max_workers` (the daemon's max_concurrent_rpcs), and end at
`shutdown`: the pool keeps its high-water mark, which the calls in flight at once bound.
Each shows the prefix as its name to the kernel too (top -H, /proc/PID/task/TID/comm).
A worker counts as idle before its caller hears back, so calls made one after another
share one worker. A call whose awaiting coroutine was cancelled before a worker
took it (its client went away) is skipped, as run_in_executor skips a cancelled future's
work; one that has started runs to its end.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import queue
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

from kvmd.core.sched import name_thread

T = TypeVar("T")

_STOP = object()  # a worker's sentinel: end


class _LoopCall:
    """A `run` call: its outcome goes to a future of the awaiting event loop."""

    __slots__ = ("args", "context", "fn", "future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any],
                 fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.loop, self.future, self.fn, self.args = loop, future, fn, args
        self.context = contextvars.copy_context()

    def __call__(self) -> Callable[[], None] | None:
        if self.future.cancelled():
            return None  # the caller stopped waiting before a worker took it
        try:
            outcome: tuple[bool, Any] = (True, self.context.run(self.fn, *self.args))
        except BaseException as exc:  # handed to the caller
            outcome = (False, exc)
        return functools.partial(self._post, _settle, self.future, *outcome)

    def cancel(self) -> None:
        self._post(self.future.cancel)

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more


class _SubmittedCall:
    """A `submit` call: its outcome goes to a concurrent Future."""

    __slots__ = ("args", "fn", "kwargs", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self.result: futures.Future[Any] = futures.Future()
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def __call__(self) -> Callable[[], None] | None:
        if not self.result.set_running_or_notify_cancel():
            return None
        try:
            value = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # handed to the caller
            return functools.partial(self.result.set_exception, exc)
        return functools.partial(self.result.set_result, value)

    def cancel(self) -> None:
        self.result.cancel()


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    """On the loop: the outcome of a `run`, unless its caller stopped waiting."""
    if not future.done():
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class CallPool(futures.Executor):
    """Worker threads named `<prefix>_<n>`, at most `max_workers` of them."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        if max_workers <= 0:
            raise ValueError("max_workers must be positive")
        self._max = max_workers
        self._prefix = thread_name_prefix
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._numbers = itertools.count()
        self._shut = False

    # -- the event loop's path --------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker, with the caller's context variables; its result or
        exception here."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._put(_LoopCall(loop, future, fn, args))
        return await future

    # -- the Executor interface -------------------------------------------------------------

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> futures.Future[T]:
        call = _SubmittedCall(fn, args, kwargs)
        self._put(call)
        return call.result

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more calls; `cancel_futures` drops the ones no worker has taken (their
        callers see them cancelled, or never hear back if they gave up already). Each worker
        ends after its current call; `wait` joins them."""
        with self._lock:
            self._shut = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                item.cancel()
        for _ in threads:
            self._queue.put(_STOP)
        if wait:
            for thread in threads:
                thread.join()

    # -- inside -------------------------------------------------------------------------------

    def _put(self, call: _LoopCall | _SubmittedCall) -> None:
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new calls after shutdown")
            if self._idle <= 0 and len(self._threads) < self._max:
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f"{self._prefix}_{next(self._numbers)}")
                self._threads.append(thread)
                thread.start()
            else:
                self._idle -= 1  # a waiting worker takes this one
        self._queue.put(call)

    def _work(self) -> None:
        name_thread(self._prefix)
        get = self._queue.get
        while True:
            item = get()
            if item is _STOP:
                return
            deliver = item()  # runs the call; hands its outcome over when called
            del item  # nothing of a finished call outlives it here
            # Idle before the caller can hear back: its next call finds this worker
            # instead of starting another (which it would, racing the outcome).
            with self._lock:
                self._idle += 1
            if deliver is not None:
                deliver()
                del deliver
