"""The call pool: results, exceptions, context variables, the worker bound, cancellation
before a worker takes a call, and shutdown (threads end, queued calls are cancelled)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from concurrent import futures

import pytest

from kvmd.api.pool import CallPool

caller = contextvars.ContextVar("caller", default="")


def test_run_returns_results_and_raises_exceptions_with_the_callers_context() -> None:
    pool = CallPool(2, "t-pool")

    async def main() -> None:
        caller.set("me")
        assert await pool.run(lambda a, b: (a + b, caller.get()), 1, 2) == (3, "me")
        with pytest.raises(KeyError, match="boom"):
            await pool.run(lambda: {}["boom"])
        # submit: the Executor interface grpc may use
        assert pool.submit(pow, 2, 10).result(10) == 1024

    asyncio.run(main())
    pool.shutdown()


def test_at_most_max_workers_run_at_once_and_the_rest_queue() -> None:
    pool = CallPool(3, "t-bound")
    running, peak, lock = [0], [0], threading.Lock()

    def work() -> str:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return threading.current_thread().name

    async def main() -> list[str]:
        return list(await asyncio.gather(*(pool.run(work) for _ in range(12))))

    names = asyncio.run(main())
    assert peak[0] == 3
    assert set(names) <= {"t-bound_0", "t-bound_1", "t-bound_2"}
    pool.shutdown()


def test_idle_workers_are_reused_and_more_start_when_calls_overlap() -> None:
    """Sequential calls need one worker; after them, calls that overlap still get a worker
    each (up to the bound), not a queue behind the one idle worker."""
    pool = CallPool(3, "t-reuse")
    together = threading.Barrier(3, timeout=10)  # broken if the three never run at once

    def meet() -> str:
        together.wait()
        return threading.current_thread().name

    async def main() -> tuple[set[str], set[str]]:
        alone = {await pool.run(lambda: threading.current_thread().name) for _ in range(50)}
        overlapping = set(await asyncio.gather(*(pool.run(meet) for _ in range(3))))
        return alone, overlapping

    alone, overlapping = asyncio.run(main())
    assert alone == {"t-reuse_0"}
    assert overlapping == {"t-reuse_0", "t-reuse_1", "t-reuse_2"}
    pool.shutdown()


def test_a_call_whose_caller_left_while_it_ran_reports_nothing_to_the_loop() -> None:
    """The client went away while a worker ran its call: the outcome is dropped quietly,
    not set on the cancelled future (asyncio would log an InvalidStateError as ERROR)."""
    pool = CallPool(1, "t-left")
    taken, finish = threading.Event(), threading.Event()
    problems: list[dict[str, object]] = []

    def work() -> str:
        taken.set()
        finish.wait(10)
        return "late"

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: problems.append(ctx))
        call = asyncio.ensure_future(pool.run(work))
        while not taken.is_set():
            await asyncio.sleep(0.005)
        call.cancel()
        finish.set()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(0.2)  # the outcome reaches the loop meanwhile

    asyncio.run(main())
    pool.shutdown()
    assert problems == []


def test_a_call_cancelled_before_a_worker_takes_it_never_runs() -> None:
    pool = CallPool(1, "t-cancel")
    gate, ran = threading.Event(), []

    async def main() -> None:
        busy = asyncio.ensure_future(pool.run(gate.wait, 10))
        queued = asyncio.ensure_future(pool.run(ran.append, "queued"))
        await asyncio.sleep(0.05)
        queued.cancel()
        await asyncio.sleep(0.05)
        gate.set()
        assert await busy
        with pytest.raises(asyncio.CancelledError):
            await queued
        await pool.run(ran.append, "after")

    asyncio.run(main())
    assert ran == ["after"]
    pool.shutdown()


def test_shutdown_ends_the_workers_and_cancels_queued_calls() -> None:
    before = set(threading.enumerate())
    pool = CallPool(1, "t-stop")
    gate = threading.Event()
    first = pool.submit(gate.wait, 10)
    deadline = time.monotonic() + 10
    while not first.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = pool.submit(time.sleep, 0)
    stopper = threading.Thread(target=pool.shutdown, kwargs={"cancel_futures": True})
    stopper.start()
    time.sleep(0.05)
    gate.set()
    stopper.join(10)
    assert first.result(1) is True and queued.cancelled()
    assert set(threading.enumerate()) <= before | {threading.current_thread()}
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(time.sleep, 0)
    with pytest.raises(futures.CancelledError):
        queued.result(0)


def test_workers_show_the_prefix_as_their_kernel_name() -> None:
    """Tools that read the kernel's thread names (top -H, the soak's thread invariant) tell
    the pool's workers from the daemon's other threads."""
    pool = CallPool(1, "t-named")

    def comm() -> str:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            return f.read().strip()

    assert pool.submit(comm).result(10) == "t-named"
    pool.shutdown()
