"""The collectors behind /metrics read on their own (no daemon): the gRPC request metrics,
the process metrics, and how kernel statistics are named and scaled. Each value is checked
against what the test did or against the kernel's own figure."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from kvmd.kvm import StatDescriptor
from kvmd.metrics import RPC_BUCKETS, ProcessMetrics, RpcMetrics, _kernel_metric_name


def samples(metrics: Iterator[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in metrics for s in family.samples}


def test_kernel_statistic_units_become_base_units_in_the_name_and_value() -> None:
    """A kernel statistic in bytes or seconds is exported as `<name>_bytes` or
    `<name>_seconds`, its unit suffix replaced and its value scaled to the base unit by the
    descriptor's base (2 or 10) and exponent; unitless ones keep name and value."""
    kib = StatDescriptor("pages_kib", "instant", "bytes", 2, 10, 1, 0, 0)
    assert _kernel_metric_name("vm", kib) == ("kvmd_kvm_vm_pages_kib_bytes", 1024.0)
    mb = StatDescriptor("buffer_bytes", "instant", "bytes", 10, 6, 1, 0, 0)
    assert _kernel_metric_name("vcpu", mb) == ("kvmd_kvm_vcpu_buffer_bytes", 1e6)
    ns = StatDescriptor("halt_wait_ns", "cumulative", "seconds", 10, -9, 1, 0, 0)
    assert _kernel_metric_name("vcpu", ns) == ("kvmd_kvm_vcpu_halt_wait_seconds", 1e-9)
    plain = StatDescriptor("exits", "cumulative", "none", 10, 0, 1, 0, 0)
    assert _kernel_metric_name("vcpu", plain) == ("kvmd_kvm_vcpu_exits", 1.0)


def test_request_durations_add_up_per_method_in_cumulative_buckets() -> None:
    """kvmd_grpc_request_duration_seconds: each method's _sum adds every call's seconds,
    _count counts every call, buckets are cumulative with the last at +Inf; request counts
    are per method and code, every pair listed."""
    rpc = RpcMetrics(CollectorRegistry(auto_describe=False))
    rpc.observe("/kvmd.v1.Vms/GetVm", "OK", 0.001)
    rpc.observe("/kvmd.v1.Vms/GetVm", "OK", 0.3)
    rpc.observe("/kvmd.v1.Vms/GetVm", "NOT_FOUND", 20.0)
    rpc.observe("/kvmd.v1.Vms/CreateVm", "OK", 0.02)
    got = samples(rpc.collect())
    get_vm = (("method", "/kvmd.v1.Vms/GetVm"),)
    assert got[("kvmd_grpc_request_duration_seconds_sum", get_vm)] == pytest.approx(20.301)
    assert got[("kvmd_grpc_request_duration_seconds_count", get_vm)] == 3
    buckets = [(float(dict(labels)["le"]), value) for (name, labels), value in got.items()
               if name == "kvmd_grpc_request_duration_seconds_bucket"
               and dict(labels)["method"] == "/kvmd.v1.Vms/GetVm"]
    assert [le for le, _ in buckets] == [*RPC_BUCKETS, float("inf")]
    assert dict(buckets) == {le: (1 if le < 0.3 else 2 if le < 20 else 3) for le, _ in buckets}
    requests = {dict(labels)["method"].rsplit("/", 1)[1] + ":" + dict(labels)["code"]: value
                for (name, labels), value in got.items()
                if name == "kvmd_grpc_requests_total"}
    assert requests == {"CreateVm:OK": 1, "GetVm:NOT_FOUND": 1, "GetVm:OK": 2}


def test_process_cpu_and_memory_are_this_process_own() -> None:
    """process_cpu_seconds is user plus system time (between the rusage read before and
    after the scrape); resident memory is the resident set, less than the virtual size."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    got = samples(ProcessMetrics().collect())
    after = resource.getrusage(resource.RUSAGE_SELF)
    assert before.ru_stime > 0  # so user time alone would be too little
    cpu = got[("process_cpu_seconds_total", ())]
    assert before.ru_utime + before.ru_stime <= cpu <= after.ru_utime + after.ru_stime
    resident = got[("process_resident_memory_bytes", ())]
    assert 0 < resident < got[("process_virtual_memory_bytes", ())]


def test_process_max_fds_is_the_soft_limit() -> None:
    """process_max_fds is the soft RLIMIT_NOFILE (the one open() hits), not the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft - 1, hard))
    try:
        got = samples(ProcessMetrics().collect())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert got[("process_max_fds", ())] == soft - 1


def test_process_start_time_is_when_the_process_started() -> None:
    """process_start_time_seconds of a process started by the test lies between the moments
    the test started it and saw it answer (to the clock tick)."""
    started = time.time()
    out = subprocess.run([sys.executable, "-c", "from kvmd.metrics import ProcessMetrics; "
                          "print(ProcessMetrics().start_time)"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    answered = time.time()
    assert started - 0.05 <= float(out) <= answered
