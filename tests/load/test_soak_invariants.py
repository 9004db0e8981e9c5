"""The soak's thread invariant (benchmarks/soak.py threads_returned): a leaked thread of any
kind is caught; the elastic pools (grpc core's, the daemon's call pool) may end below their
baseline, or above it by at most the load's concurrency (they keep their high-water mark),
never by more."""

from __future__ import annotations

from collections import Counter

from load_support import soak

BASELINE = Counter({"kvmd": 4, "kvmd-rpc": 8, "event_engine": 9, "kvm-nx-lpage-re": 1})
SLACK = 9  # eight clients and the health poller


def test_the_same_threads_have_returned() -> None:
    assert soak.threads_returned(BASELINE, Counter(BASELINE), SLACK)


def test_grpc_pool_threads_beyond_the_loads_concurrency_are_a_leak() -> None:
    grown = BASELINE + Counter({"event_engine": SLACK + 1})
    assert not soak.threads_returned(BASELINE, grown, SLACK)
    assert not soak.threads_returned(BASELINE, BASELINE + Counter({"event_engine": 1}), 0)


def test_the_grpc_pools_high_water_mark_within_the_loads_concurrency_is_not() -> None:
    assert soak.threads_returned(BASELINE, BASELINE + Counter({"event_engine": 1}), SLACK)
    assert soak.threads_returned(BASELINE, BASELINE + Counter({"event_engine": SLACK}), SLACK)


def test_a_grpc_pool_thread_reclaimed_since_the_baseline_is_not() -> None:
    assert soak.threads_returned(BASELINE, BASELINE - Counter({"event_engine": 1}), SLACK)


def test_one_more_or_one_fewer_of_the_daemons_own_threads_is_caught() -> None:
    assert not soak.threads_returned(BASELINE, BASELINE + Counter({"kvmd": 1}), SLACK)
    assert not soak.threads_returned(BASELINE, BASELINE - Counter({"kvmd": 1}), SLACK)
    assert not soak.threads_returned(BASELINE, BASELINE + Counter({"soak-new-kind": 1}), SLACK)


def test_kvms_own_workers_do_not_count() -> None:
    assert soak.threads_returned(BASELINE, BASELINE + Counter({"kvm-nx-lpage-re": 3}), SLACK)


def test_the_call_pools_high_water_mark_within_the_loads_concurrency_is_not_a_leak() -> None:
    assert soak.threads_returned(BASELINE, BASELINE + Counter({"kvmd-rpc": 1}), SLACK)
    assert soak.threads_returned(BASELINE, BASELINE + Counter({"kvmd-rpc": SLACK}), SLACK)
    assert not soak.threads_returned(BASELINE, BASELINE + Counter({"kvmd-rpc": SLACK + 1}),
                                     SLACK)
