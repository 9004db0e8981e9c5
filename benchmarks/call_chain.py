"""What the server's call chain costs per call, stage by stage, without a network: the
wrapped handler of kvmd.api.interceptors.CallChain awaited in a loop with a stand-in
context, as the grpc.aio server would call it (a GetVm-like unary call, policy off).

    .venv/bin/python benchmarks/call_chain.py [--calls N] [--rounds N]

Rows add one part at a time: bare dispatch (on the loop, or through the thread pool),
then metrics, authorization, budget. The best round of each is shown (the least disturbed
by other work on the host). Not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from bench_support import load_average
from prometheus_client import CollectorRegistry

from kvmd.api.auth import AuthInterceptor, Authorizer, Policy
from kvmd.api.budget import Budget, BudgetInterceptor
from kvmd.api.interceptors import CallChain, on_loop
from kvmd.api.pool import CallPool
from kvmd.metrics import MetricsInterceptor, RpcMetrics

METHOD = "/kvmd.v1.Vms/GetVm"


class Context:
    """The parts of a grpc.aio ServicerContext the chain touches."""

    def peer(self) -> str:
        return "unix:/run/kvmd/kvmd.sock"

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def time_remaining(self) -> float:
        return 10.0

    def code(self) -> None:
        return None


def handler(request: Any, context: Any) -> Any:
    return request


@on_loop
def loop_handler(request: Any, context: Any) -> Any:
    return request


async def measure(calls: int, rounds: int) -> list[tuple[str, float]]:
    pool = CallPool(4, "bench-pool")  # the daemon's call pool
    metrics = MetricsInterceptor(RpcMetrics(CollectorRegistry()))
    auth = AuthInterceptor(Authorizer(Policy(), None))  # type: ignore[arg-type]
    budget = BudgetInterceptor(Budget(64, 16, 4096, 256))
    variants = [
        ("bare", [], None),
        ("+ metrics", [], metrics),
        ("+ metrics, auth", [auth], metrics),
        ("+ metrics, auth, budget (the daemon's chain)", [auth, budget], metrics),
    ]
    out = []
    context = Context()
    for dispatch, fn in (("on the loop", loop_handler), ("in the pool", handler)):
        for name, stages, observer in variants:
            chain = CallChain(pool, stages, observer)
            call = chain.wrap(METHOD, "unary_unary", fn)
            for _ in range(min(calls, 1000)):
                await call(1, context)
            best = float("inf")
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(calls):
                    await call(1, context)
                best = min(best, (time.perf_counter() - t0) / calls)
            out.append((f"{dispatch}: {name}", best))
    pool.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = asyncio.run(measure(args.calls, args.rounds))
    print(f"CallChain cost per call (load average {load_average()}), best of {args.rounds} "
          f"rounds of {args.calls} calls:")
    for name, seconds in rows:
        print(f"  {name:<60} {seconds * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
