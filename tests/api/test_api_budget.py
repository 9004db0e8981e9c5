"""The call and stream budgets (kvmd.api.budget): per identity, in all, and the reserve that
non-admin callers leave for admins."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from contextlib import AsyncExitStack

import grpc
import pytest
from api_support import DaemonFactory, RunningDaemon
from grpc_health.v1 import health_pb2
from polling import wait_until

from kvmd.api.budget import Budget, reserve_of
from kvmd.core.errors import ResourceExhausted
from kvmd_proto import vmm_pb2 as pb


def test_reserve_is_an_eighth_at_least_one() -> None:
    assert [reserve_of(n) for n in (1, 2, 8, 16, 64)] == [0, 1, 1, 2, 8]


async def hold(budget: Budget, stack: AsyncExitStack, identity: str, admin: bool,
               stream: bool, n: int) -> None:
    for _ in range(n):
        await stack.enter_async_context(budget.held(identity, admin, stream))


def test_calls_per_identity_and_reserve_for_admins() -> None:
    budget = Budget(max_calls=8, max_calls_per_identity=5, max_streams=100,
                    max_streams_per_identity=100)

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            await hold(budget, stack, "op-a", False, False, 5)
            with pytest.raises(ResourceExhausted, match="per identity"):
                await hold(budget, stack, "op-a", False, False, 1)
            # Non-admins together stop at 8 - 1 (the reserve)...
            await hold(budget, stack, "op-b", False, False, 2)
            with pytest.raises(ResourceExhausted, match="non-admin"):
                await hold(budget, stack, "op-c", False, False, 1)
            # ...and an admin still gets a call.
            await hold(budget, stack, "local", True, False, 1)
            assert budget.usage("op-a").calls == 5 and budget.calls == 8
        assert budget.calls == 0 and budget.usage("op-a").calls == 0

    asyncio.run(scenario())


def test_streams_per_identity_in_all_and_reserve() -> None:
    budget = Budget(max_calls=8, max_calls_per_identity=8, max_streams=16,
                    max_streams_per_identity=10)

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            await hold(budget, stack, "viewer", False, True, 10)
            with pytest.raises(ResourceExhausted, match="max_streams_per_identity"):
                await hold(budget, stack, "viewer", False, True, 1)
            await hold(budget, stack, "viewer-2", False, True, 4)  # 14 = 16 - reserve 2
            with pytest.raises(ResourceExhausted, match="open streams"):
                await hold(budget, stack, "viewer-3", False, True, 1)
            await hold(budget, stack, "local", True, True, 2)
            with pytest.raises(ResourceExhausted, match="open streams"):
                await hold(budget, stack, "local", True, True, 1)
            # Streams and calls are separate budgets.
            await hold(budget, stack, "viewer", False, False, 1)
        assert budget.streams == 0 and budget.calls == 0

    asyncio.run(scenario())


@contextlib.contextmanager
def one_call_held(api: RunningDaemon, vm_id: str, duration_ms: int) -> Iterator[None]:
    """A daemon allowing the caller one call, that call taken meanwhile (a MeasureDirtyRate
    of `duration_ms` on a new VM `vm_id`), and waited for afterwards."""
    api.create_vm(vm_id)
    api.add_memory(vm_id, 0, 1 << 16, log_dirty=True)
    held = api.memory.MeasureDirtyRate.future(pb.MeasureDirtyRateRequest(
        vm_id=vm_id, duration_ms=duration_ms))
    try:
        wait_until(lambda: api.daemon.budget.usage("local").calls == 1, 10,
                   "the measurement to hold the caller's one call")
        yield
    finally:
        held.result(timeout=30)


def refused_for_the_budget(api: RunningDaemon, vm_id: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        api.vms.GetVm(pb.GetVmRequest(vm_id=vm_id))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_full_budget_still_answers_the_health_check(daemon_factory: DaemonFactory) -> None:
    """Health.Check is exempt from the call budget: a liveness probe answers while the
    caller's calls are all taken (here the one a MeasureDirtyRate holds for 2 s)."""
    api = daemon_factory(max_calls_per_identity=1)
    with one_call_held(api, "rate", 2000):
        refused_for_the_budget(api, "rate")  # the budget is full
        reply = api.stubs.health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="rate"))


def test_a_call_the_budget_refuses_leaves_the_gate_it_passed(
        daemon_factory: DaemonFactory) -> None:
    """The hand-over gate admits a call before the budget refuses it: the refusal must
    leave the gate too, or a later hand-over waits for a call that no longer exists."""
    api = daemon_factory(max_calls_per_identity=1)
    with one_call_held(api, "gated", 500):
        for _ in range(3):
            refused_for_the_budget(api, "gated")
    assert api.daemon.gate.wait_idle(10, long_lived=False) == {}
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="gated"))


def test_an_identity_leaves_no_entry_once_its_calls_and_streams_end() -> None:
    """The per-identity table holds callers with something open only: it does not grow
    with every identity that ever called."""
    budget = Budget(max_calls=8, max_calls_per_identity=8, max_streams=8,
                    max_streams_per_identity=8)

    async def scenario() -> None:
        for identity in ("a", "b", "c"):
            async with budget.held(identity, False, False), budget.held(identity, False, True):
                assert budget.usage(identity).calls == 1
    asyncio.run(scenario())
    assert budget._usage == {}  # internal, but it is the leak this test is about
