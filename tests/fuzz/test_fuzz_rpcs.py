"""Every RPC, fuzzed: random and boundary requests, one call per example and random call
sequences; each call must end with a documented code, leave the daemon healthy, and (if it
failed, or only reads) change nothing. See fuzz_support for the invariants."""

from __future__ import annotations

from typing import Any

import pytest
from fuzz_support import (
    METHODS,
    NON_MUTATING,
    FuzzDaemon,
    Method,
    fuzz_settings,
    reflected_methods,
    request_strategy,
    settle,
)
from hypothesis import given
from hypothesis import strategies as st

from kvmd_proto import vmm_pb2 as pb

# Examples per RPC in CI; `make soak` runs KVMD_FUZZ_SOAK_FACTOR times as many.
EXAMPLES_PER_RPC = 15
SEQUENCES = 30


def test_reflection_serves_exactly_the_fuzzed_methods(fuzz_daemon: FuzzDaemon) -> None:
    """The fuzzer enumerates RPCs from the generated descriptors; the server, asked through
    reflection, must serve exactly those (so a new RPC is fuzzed without editing a list)."""
    fuzzed = {m.name for m in METHODS}
    assert {s.full_name for s in pb.DESCRIPTOR.services_by_name.values()} <= {
        n.split("/")[0] for n in fuzzed}
    assert reflected_methods(fuzz_daemon.channel) == fuzzed


def _step(fz: FuzzDaemon, method: Method, request: Any, cancel_after: int | None) -> None:
    before = fz.ensure_world(fz.last)
    outcome, after = fz.check_call(method, request, before, cancel_after)
    # A call that succeeded and may have changed something (even invisibly, e.g. a vCPU's
    # registers) gets a fresh world before the next example.
    fz.last = None if outcome.ok and method.name not in NON_MUTATING else after


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.short)
@fuzz_settings(EXAMPLES_PER_RPC)
@given(data=st.data())
def test_rpc_fuzz(fuzz_daemon: FuzzDaemon, method: Method, data: st.DataObject) -> None:
    """One random or boundary request to `method` against the world; server streams are
    sometimes cancelled by the client part way."""
    request = data.draw(request_strategy(method), label="request")
    cancel_after = data.draw(st.one_of(st.none(), st.integers(0, 2)), label="cancel_after") \
        if method.server_streaming else None
    _step(fuzz_daemon, method, request, cancel_after)


CALLS = st.sampled_from(METHODS).flatmap(
    lambda m: st.tuples(st.just(m), request_strategy(m)))


@fuzz_settings(SEQUENCES)
@given(calls=st.lists(CALLS, min_size=2, max_size=8))
def test_random_call_sequences(operator_daemon: FuzzDaemon,
                               calls: list[tuple[Method, Any]]) -> None:
    """Sequences of random calls on one world, without rebuilding it between calls; every
    vCPU left running is paused between calls so no guest acts while a call is checked.
    The caller is an operator here (VM ids outside its prefix: PERMISSION_DENIED)."""
    fz = operator_daemon
    snap = fz.ensure_world(fz.last)
    for method, request in calls:
        snap = settle(fz, snap)
        _, snap = fz.check_call(method, request, snap)
    fz.last = None
