"""Prometheus metrics for kvmd, read at scrape time from the core's own counters.

Exit counters live in plain per-vCPU C words (incremented by the run loop, no lock, no
allocation); the collector below reads them when Prometheus scrapes. The kernel's binary
statistics (KVM_GET_STATS_FD) are read the same way. Series of a deleted VM disappear with it.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import resource
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kvmd.core.host import Host
from kvmd.core.vcpu import CRASHED, CREATED, HALTED, PAUSED, RUNNING, STOPPED
from kvmd.core.vm import VM_STATES
from kvmd.kvm import KvmError, StatDescriptor, StatsReader
from kvmd.metrics_http import MetricsHttpServer
from kvmd.migration.precopy import Direction, Result

log = logging.getLogger(__name__)

DEFAULT_METRICS_LISTEN = "127.0.0.1:9474"
VCPU_STATES = (CREATED, RUNNING, PAUSED, HALTED, STOPPED, CRASHED)
# Exit-counter names that are not exit reasons, or are split by direction instead.
_SPLIT = {"io": ("io_in", "io_out"), "mmio": ("mmio_read", "mmio_write")}
_NOT_REASONS = {"unclaimed_pio", "unclaimed_mmio"}
_UNIT_SUFFIX = re.compile(r"_(ns|us|ms|sec|seconds|cycles|bytes)$")
# Whole-VM operations and the counter name of each; their kinds.
OPERATIONS = (("snapshot", "snapshots"), ("restore", "restores"))
OPERATION_KINDS = {"snapshot": ("full", "diff"), "restore": ("full", "diff")}
# Live migrations: (direction label, operation recorded by the core), and their results.
MIGRATION_OPERATIONS = ((Direction.OUTGOING, "migration_out"), (Direction.INCOMING, "migration_in"))
MIGRATION_RESULTS = tuple(Result)


def exit_reasons(counts: dict[str, int]) -> Iterator[tuple[str, int]]:
    """(reason, count) with io and mmio replaced by their direction splits."""
    split_parts = {p for parts in _SPLIT.values() for p in parts}
    for name, value in counts.items():
        if name in _SPLIT or name in _NOT_REASONS or name in split_parts:
            continue
        yield name, value
    for parts in _SPLIT.values():
        for part in parts:
            yield part, counts.get(part, 0)


def _kernel_metric_name(scope: str, desc: StatDescriptor) -> tuple[str, float]:
    """Prometheus name and value scale for a kernel statistic (seconds in base units)."""
    name = desc.name
    scale = 1.0
    if desc.unit == "seconds":
        name = _UNIT_SUFFIX.sub("", name) + "_seconds"
        scale = (2.0 if desc.base == 2 else 10.0) ** desc.exponent
    elif desc.unit == "bytes":
        name = _UNIT_SUFFIX.sub("", name) + "_bytes"
        scale = (2.0 if desc.base == 2 else 10.0) ** desc.exponent
    return f"kvmd_kvm_{scope}_{name}", scale


class KvmdCollector(Collector):
    """Everything kvmd knows about its VMs, read at scrape time."""

    def __init__(self, host: Host, vcpu_label: bool = False) -> None:
        self.host = host
        self.vcpu_label = vcpu_label

    def describe(self) -> list[Metric]:
        return []  # labels depend on the VMs present at scrape time

    def collect(self) -> Iterator[Metric]:
        host = self.host
        vms = host.list_vms()
        labels = ["vm", "reason"] + (["vcpu"] if self.vcpu_label else [])
        exits = CounterMetricFamily("kvmd_vcpu_exits", "vCPU exits by reason (io and mmio "
                                    "split by direction)", labels=labels)
        cpu = CounterMetricFamily("kvmd_vcpu_cpu_seconds", "CPU time of the VM's vCPU "
                                  "threads: guest code and the host side of its exits "
                                  "(carried with the VM's saved state, as exit counts are)",
                                  labels=["vm"] + (["vcpu"] if self.vcpu_label else []))
        unclaimed = CounterMetricFamily("kvmd_unclaimed_accesses", "Guest port/MMIO accesses "
                                        "no device or handler claimed", labels=["vm", "space"])
        memory = GaugeMetricFamily("kvmd_guest_memory_bytes", "Guest memory mapped per VM",
                                   labels=["vm"])
        slots = GaugeMetricFamily("kvmd_memory_slots", "Memory slots per VM", labels=["vm"])
        dirty = CounterMetricFamily("kvmd_dirty_pages", "Dirty pages reported by dirty-log "
                                    "fetches", labels=["vm"])
        dirty_rate = GaugeMetricFamily("kvmd_dirty_pages_per_second", "The VM's last measured "
                                       "dirty rate (MeasureDirtyRate or a migration round)",
                                       labels=["vm"])
        console = CounterMetricFamily("kvmd_console_bytes", "Bytes through the guest console",
                                      labels=["vm", "direction"])
        overruns = CounterMetricFamily("kvmd_console_rx_overruns", "Bytes the UART's receive "
                                       "FIFO dropped (full, in loopback mode)", labels=["vm"])
        vm_state = GaugeMetricFamily("kvmd_vm_state", "1 for the state each VM is in",
                                     labels=["vm", "state"])
        discarded = CounterMetricFamily("kvmd_guest_memory_discarded_bytes", "Host memory "
                                        "released by DiscardGuestMemory", labels=["vm"])
        allocated = GaugeMetricFamily("kvmd_guest_memory_allocated_bytes", "Host memory the "
                                      "VM's own guest memory holds now (memfd blocks; "
                                      "file-backed slots excluded)", labels=["vm"])
        vcpus = {state: 0 for state in VCPU_STATES}
        kernel: dict[str, Any] = {}
        for vm in vms:
            per_vcpu: list[tuple[int, dict[str, int], float]] = []
            for v in vm.vcpus():
                vcpus[v.state] = vcpus.get(v.state, 0) + 1
                per_vcpu.append((v.id, v.exit_counts(), v.cpu_seconds()))
            if self.vcpu_label:
                for vid, counts, seconds in per_vcpu:
                    for reason, n in exit_reasons(counts):
                        exits.add_metric([vm.id, reason, str(vid)], n)
                    cpu.add_metric([vm.id, str(vid)], seconds)
            else:
                cpu.add_metric([vm.id], sum(seconds for _vid, _c, seconds in per_vcpu))
                total: dict[str, int] = {}
                for _vid, counts, _seconds in per_vcpu:
                    for name, n in counts.items():
                        total[name] = total.get(name, 0) + n
                if not per_vcpu:  # zero from VM creation, every known reason
                    total = {name: 0 for name in _zero_counts()}
                for reason, n in exit_reasons(total):
                    exits.add_metric([vm.id, reason], n)
            for space in ("pio", "mmio"):
                unclaimed.add_metric([vm.id, space], sum(
                    c.get(f"unclaimed_{space}", 0) for _vid, c, _seconds in per_vcpu))
            regions = vm.memory_regions()
            memory.add_metric([vm.id], sum(r.size for r in regions))
            slots.add_metric([vm.id], len(regions))
            dirty.add_metric([vm.id], vm.dirty_pages_total)
            dirty_rate.add_metric([vm.id], vm.dirty.rate)
            vm.console.flush()  # bytes still in the UART's ring count too
            console.add_metric([vm.id, "out"], vm.console.bytes_out)
            console.add_metric([vm.id, "in"], vm.console.bytes_in)
            overruns.add_metric([vm.id], vm.uart.rx_overruns)
            for state in VM_STATES:
                vm_state.add_metric([vm.id, state], 1 if vm.state == state else 0)
            discarded.add_metric([vm.id], vm.discarded_bytes_total)
            allocated.add_metric([vm.id], vm.memory_allocated_bytes())
            self._kernel_stats(vm, kernel)
        yield exits
        yield cpu
        yield unclaimed
        yield memory
        yield slots
        yield dirty
        yield dirty_rate
        yield console
        yield overruns
        yield vm_state
        yield discarded
        yield allocated
        yield GaugeMetricFamily("kvmd_vms", "VMs held by the daemon", value=len(vms))
        vcpu_gauge = GaugeMetricFamily("kvmd_vcpus", "vCPUs by state", labels=["state"])
        for state, n in vcpus.items():
            vcpu_gauge.add_metric([state], n)
        yield vcpu_gauge
        crashes = CounterMetricFamily("kvmd_vm_crashes", "VM crashes by reason",
                                      labels=["reason"])
        for reason, n in sorted(host.crashes.items()):
            crashes.add_metric([reason], n)
        yield crashes
        yield GaugeMetricFamily("kvmd_guest_memory_in_use_bytes", "Guest memory charged to "
                                "max_memory_total_bytes across all VMs (slot sizes less "
                                "discard credits)", value=host.budget.in_use)
        yield GaugeMetricFamily("kvmd_guest_memory_discard_credit_bytes", "Discarded guest "
                                "memory not charged while its pages stay free: how far the "
                                "charge can grow back past the limit (overcommit)",
                                value=host.budget.credited)
        yield GaugeMetricFamily("kvmd_vm_fds", "File descriptors VM objects hold, across "
                                "all VMs (of kvmd_vm_fds_limit)", value=host.fds.in_use)
        yield GaugeMetricFamily("kvmd_vm_fds_limit", "File descriptors VM objects may hold "
                                "(max_fds, under RLIMIT_NOFILE)", value=host.fds.limit)
        buckets, total_sum, _count = host.remote_wait.snapshot()
        remote = HistogramMetricFamily(
            "kvmd_remote_exit_seconds", "Time a vCPU waited for a remote exit handler")
        remote.add_metric([], [(_bound(b), n) for b, n in buckets], total_sum)
        yield remote
        yield from self._operations()
        yield from self._migrations(vms)
        yield from kernel.values()

    def _operations(self) -> Iterator[Metric]:
        """Whole-VM operations (snapshots, restores, migrations): counts by kind and
        result, bytes moved, durations. Zero from the start for every known operation."""
        counts, nbytes, seconds = self.host.shared.operations.snapshot()
        for op, noun in OPERATIONS:
            total = CounterMetricFamily(f"kvmd_{noun}", f"VM {op}s by kind and result",
                                        labels=["kind", "result"])
            mine = {(k, r): n for (o, k, r), n in counts.items() if o == op}
            for kind in OPERATION_KINDS[op]:
                for result in ("ok", "error"):
                    mine.setdefault((kind, result), 0)
            for (kind, result), n in sorted(mine.items()):
                total.add_metric([kind, result], n)
            yield total
            yield CounterMetricFamily(f"kvmd_{op}_bytes", f"Bytes of VM {op}s",
                                      value=nbytes.get(op, 0))
            hist = HistogramMetricFamily(f"kvmd_{op}_seconds", f"Duration of VM {op}s")
            h = seconds.get(op)
            if h is None:
                hist.add_metric([], [("+Inf", 0)], 0.0)
            else:
                buckets, total_sum, _count = h.snapshot()
                hist.add_metric([], [(_bound(b), n) for b, n in buckets], total_sum)
            yield hist

    def _migrations(self, vms: list[Any]) -> Iterator[Metric]:
        """Live migrations, out of and into this daemon: counts by result, bytes, total
        durations; downtime and pre-copy rounds of the completed outgoing ones."""
        counts, nbytes, seconds = self.host.shared.operations.snapshot()
        total = CounterMetricFamily("kvmd_migrations", "Live migrations by direction and result",
                                    labels=["direction", "result"])
        sent = CounterMetricFamily("kvmd_migration_bytes", "Bytes of live migration streams",
                                   labels=["direction"])
        hist = HistogramMetricFamily("kvmd_migration_seconds",
                                     "Duration of live migrations, connect to completion",
                                     labels=["direction"])
        for direction, op in MIGRATION_OPERATIONS:
            mine: dict[str, int] = dict.fromkeys(MIGRATION_RESULTS, 0)
            for (o, _kind, result), n in counts.items():
                if o == op:
                    key = Result.FAILED if result == "error" else result
                    mine[key] = mine.get(key, 0) + n
            for result, n in mine.items():
                total.add_metric([direction, result], n)
            sent.add_metric([direction], nbytes.get(op, 0))
            h = seconds.get(op)
            if h is None:
                hist.add_metric([direction], [("+Inf", 0)], 0.0)
            else:
                buckets, total_sum, _count = h.snapshot()
                hist.add_metric([direction], [(_bound(b), n) for b, n in buckets], total_sum)
        yield total
        yield sent
        yield hist
        stats = self.host.shared.migration
        buckets, total_sum, _count = stats.downtime.snapshot()
        downtime = HistogramMetricFamily(
            "kvmd_migration_downtime_seconds",
            "How long completed outgoing migrations paused their VM (the switch-over)")
        downtime.add_metric([], [(_bound(b), n) for b, n in buckets], total_sum)
        yield downtime
        yield CounterMetricFamily("kvmd_migration_rounds",
                                  "Pre-copy rounds of completed outgoing migrations",
                                  value=stats.rounds_total)
        yield GaugeMetricFamily("kvmd_migrations_in_progress",
                                "Outgoing live migrations running now",
                                value=sum(1 for vm in vms if vm.migrating_to))

    def _kernel_stats(self, vm: Any, out: dict[str, Any]) -> None:
        """The kernel's per-VM and per-vCPU binary statistics for one VM; vCPU values are
        summed per VM (peaks: the maximum)."""
        try:
            readers: list[tuple[str, StatsReader]] = [("vm", vm.vm.stats())]
            readers += [("vcpu", v.vcpu.stats()) for v in vm.vcpus()]
        except KvmError:
            return  # no binary stats on this kernel, or the VM is going away
        scalars: dict[tuple[str, str], float] = {}
        hists: dict[tuple[str, str], list[int]] = {}
        descs: dict[tuple[str, str], StatDescriptor] = {}
        for scope, reader in readers:
            try:
                values = reader.read()
            except OSError:
                continue
            for desc in reader.descriptors:
                key = (scope, desc.name)
                descs[key] = desc
                value = values[desc.name]
                if isinstance(value, tuple):
                    prev = hists.get(key)
                    hists[key] = ([a + b for a, b in zip(prev, value, strict=True)]
                                  if prev is not None else list(value))
                elif desc.kind == "peak":
                    scalars[key] = max(scalars.get(key, 0.0), float(value))
                else:
                    scalars[key] = scalars.get(key, 0.0) + value
        for key, desc in descs.items():
            scope, kname = key
            name, scale = _kernel_metric_name(scope, desc)
            help_text = f"KVM {scope} statistic {kname} ({desc.kind})"
            if key in hists:
                if name not in out:
                    out[name] = HistogramMetricFamily(name, help_text, labels=["vm"])
                out[name].add_metric([vm.id], _hist_buckets(desc, hists[key], scale), None)
            elif key in scalars:
                if name not in out:
                    cls = CounterMetricFamily if desc.kind == "cumulative" else GaugeMetricFamily
                    out[name] = cls(name, help_text, labels=["vm"])
                out[name].add_metric([vm.id], scalars[key] * scale)


def _bound(b: float) -> str:
    return "+Inf" if b == float("inf") else repr(float(f"{b:.6g}"))


def _hist_buckets(desc: StatDescriptor, counts: list[int], scale: float) -> list[tuple[str, int]]:
    """Cumulative Prometheus buckets of a kernel linear or log2 histogram."""
    out, running = [], 0
    for i, n in enumerate(counts):
        running += n
        if i == len(counts) - 1:
            bound = float("inf")
        elif desc.kind == "log_hist":
            bound = float((1 << i) - 1) * scale if i else 0.0  # bucket i: [2^(i-1), 2^i)
        else:
            bound = float((i + 1) * desc.bucket_size) * scale
        out.append((_bound(bound), running))
    return out


def _zero_counts() -> dict[str, int]:
    from kvmd.kvm._names import COUNTER_SLOTS, X86_EXIT_REASONS

    names = [n.removeprefix("KVM_EXIT_").lower() for n in X86_EXIT_REASONS]
    return {n: 0 for n in [*names, *COUNTER_SLOTS, "other"] if n != "first_extra"}


# The request-duration buckets (prometheus_client's defaults, as before).
RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0)


class RpcMetrics(Collector):
    """gRPC request counts and latencies, filled by MetricsInterceptor for every call.

    Plain dicts and lists, no lock and no prometheus_client object per call: `observe` runs
    on the event loop (the one writer, so increments cannot race), and the collector copies
    them when Prometheus scrapes (a dict copy is atomic under the GIL)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        # method -> [count per bucket (the last: +Inf), sum of seconds]
        self.durations: dict[str, tuple[list[int], list[float]]] = {}
        self.denials = Counter("kvmd_authorization_denials", "Calls refused by authentication "
                               "or authorization", ["method", "reason"], registry=registry)
        registry.register(self)

    def count_denial(self, method: str, reason: str) -> None:
        self.denials.labels(method, reason).inc()

    def observe(self, method: str, code: str, seconds: float) -> None:
        key = (method, code)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        entry = self.durations.get(method)
        if entry is None:
            entry = self.durations[method] = ([0] * (len(RPC_BUCKETS) + 1), [0.0])
        entry[0][bisect.bisect_left(RPC_BUCKETS, seconds)] += 1
        entry[1][0] += seconds

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("kvmd_grpc_requests", "gRPC requests by method and "
                                       "status code", labels=["method", "code"])
        for (method, code), n in sorted(dict(self.counts).items()):
            requests.add_metric([method, code], n)
        yield requests
        duration = HistogramMetricFamily("kvmd_grpc_request_duration_seconds", "gRPC request "
                                         "duration (streams: until the stream ends)",
                                         labels=["method"])
        for method, (buckets, total) in sorted(dict(self.durations).items()):
            running, cumulative = 0, []
            for bound, n in zip((*RPC_BUCKETS, float("inf")), list(buckets), strict=True):
                running += n
                cumulative.append((_bound(bound), running))
            duration.add_metric([method], cumulative, total[0])
        yield duration


class MetricsInterceptor:
    """Counts every RPC by method and final status code and times it, streams included: the
    observer of the server's CallChain (which decides the code, see
    kvmd.api.interceptors.status_code_name)."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self.metrics = metrics

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.metrics.observe(method, code, seconds)


class MetricsServer(MetricsHttpServer):
    """The /metrics endpoint (Prometheus text, or OpenMetrics when asked by Accept header).

    `MetricsServer(registry, "host:port")` serves plain HTTP; keyword arguments add TLS
    (`tls_cert=`, `tls_key=`), client certificates (`tls_client_ca=`), and bound the
    connections (`max_connections=`, `idle_timeout=`). One thread serves every connection;
    see kvmd.metrics_http. `.port` is the bound port, `.close()` stops it.
    """


class ProcessMetrics(Collector):
    """process_* metrics that need only this process's own /proc entries, so they survive
    systemd's ProcSubset=pid (which hides /proc/stat, where prometheus-client's collector
    reads the boot time)."""

    def __init__(self) -> None:
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.start_time = self._start_time()

    def _start_time(self) -> float:
        try:
            with open("/proc/self/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            started_after_boot = int(fields[19]) / self._ticks  # field 22: starttime
            boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
            return boot + started_after_boot
        except (OSError, IndexError, ValueError):
            return time.time()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        yield CounterMetricFamily("process_cpu_seconds", "User and system CPU time in seconds",
                                  value=usage.ru_utime + usage.ru_stime)
        try:
            with open("/proc/self/statm", "rb") as fh:
                size, resident = (int(x) for x in fh.read().split()[:2])
            yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size",
                                    value=size * self._page)
            yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size",
                                    value=resident * self._page)
        except (OSError, ValueError):
            pass
        try:
            yield GaugeMetricFamily("process_open_fds", "Open file descriptors",
                                    value=len(os.listdir("/proc/self/fd")))
        except OSError:
            pass
        yield GaugeMetricFamily("process_max_fds", "Maximum open file descriptors",
                                value=resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        yield GaugeMetricFamily("process_start_time_seconds", "Start time since the epoch",
                                value=self.start_time)


def build_registry(host: Host, vcpu_label: bool = False) -> tuple[CollectorRegistry, RpcMetrics]:
    """A registry of its own: kvmd metrics, gRPC metrics and process metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KvmdCollector(host, vcpu_label))
    registry.register(ProcessMetrics())
    rpc = RpcMetrics(registry)
    return registry, rpc

