"""Soak and load: many clients, each on its own channel, cycling VMs on a kvmd process.

    .venv/bin/python benchmarks/soak.py [--duration SECONDS] [--clients N]
                                        [--sample-interval SECONDS] [--json FILE]

The daemon runs as a separate process (`.venv/bin/kvmd --listen unix://... --metrics-listen
off`, with a pool of MAX_RPCS threads and a per-identity budget small enough that clients
meet RESOURCE_EXHAUSTED, which they retry). Each client thread loops, on a VM of its own:

    CreateVm, AddMemoryRegion (64 KiB), WriteGuestMemory (the guest, then a 32 KiB fill in
    8 KiB chunks), CreateVcpu x2 with GetSregs/SetSregs/SetRegs, StartVm, three rounds of
    GetVm/PauseVm/GetRegs/ResumeVm, every fourth cycle StopVm/StartVm, then DeleteVm of the
    running VM;

the guests rotate between one that spins (`jmp $`), one that halts (`cli; hlt`, in the
kernel with the irqchip) and one that loops on an unclaimed port (exits completed in the
daemon's C loop). Every cycle also pauses and resumes one VM shared by all clients, where
ABORTED and FAILED_PRECONDITION are expected (another client got there first).

Throughout, a separate thread polls grpc.health.v1 Check every 50 ms and records every
failure, and a sampler reads the daemon's RSS, fds and threads from /proc. The report: per
RPC the calls, calls/s, p50 and p99 latency (client side, retries included) and the codes;
the health checks; the RSS slope by linear regression over the samples (MiB per minute);
and the invariants: only expected codes, the health check always answered, no VM left, the
daemon's fds and threads back to their baseline (taken after a warm-up that also fills the
RPC thread pool; the two elastic pools, grpc core's and the daemon's call pool, may end
with fewer, or with more by at most the load's concurrency: see ELASTIC_POOLS), the daemon
exiting 0 on SIGTERM. Exits 1 if
an invariant fails.

`make soak` runs it for SOAK_SECONDS (default 600); tests/load/test_load.py runs the same
workload for 40 s in CI. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmd_proto import vmm_pb2 as pb
from kvmd_proto import vmm_pb2_grpc as rpc

Code = grpc.StatusCode
MAX_RPCS = 8               # --max-concurrent-rpcs: the daemon's unary thread pool
CALLS_PER_IDENTITY = 6     # --max-calls-per-identity: below the clients, so budgets bite
CALL_TIMEOUT = 30.0
HEALTH_TIMEOUT = 5.0  # a check slower than this counts as failed
RETRY_PAUSE = 0.005
MAX_RETRIES = 2000
SHARED_VM = "soak-shared"
# grpc core's EventEngine pool (threads named event_engine) adds a thread when all of its
# threads are busy (at most one a second) and ends an extra one only once that thread has
# gone 20 s without taking any work (kIdleThreadLimit in work_stealing_thread_pool.cc).
# In the daemon that may never happen: measured here, a fifth thread added under load
# stayed through 70 s without a call, twice. So the pool keeps its high-water mark, which
# the load's concurrency bounds (a busy thread per call in flight at most); the check
# allows that much above the baseline (threads_returned's pool_slack), where a thread
# leaked per call or per stream would show as hundreds after a soak's calls.
GRPC_POOL_THREAD = "event_engine"
# The daemon's call pool (kvmd.api.pool, threads named kvmd-rpc) starts a worker when none
# is idle and keeps it until shutdown: its high-water mark too is bounded by the calls in
# flight at once, and may rise after the baseline when the load's calls bunch up.
CALL_POOL_THREAD = "kvmd-rpc"
ELASTIC_POOLS = (GRPC_POOL_THREAD, CALL_POOL_THREAD)
# How long the daemon's own threads and fds get to come back (vCPU threads ending, streams
# closing) once the load has stopped.
SETTLE_TIMEOUT = 30.0

CODE_ADDR, FILL_ADDR, MEM_SIZE = 0x1000, 0x4000, 0x10000
SPIN = bytes([0xEB, 0xFE])                              # jmp $
HALT = bytes([0xFA, 0xF4, 0xEB, 0xFD])                  # cli; hlt; jmp back to hlt
PIO = bytes([0xB0, 0x2A, 0xE6, 0x80, 0xEB, 0xFC])       # mov al, 42; out 0x80, al; jmp out
GUESTS = (("spin", SPIN, False), ("halt", HALT, True), ("pio", PIO, False))
FILL = bytes(range(256)) * 128                          # 32 KiB
FILL_CHUNK = 8 << 10

# What a client may see besides OK. Budgets refuse with RESOURCE_EXHAUSTED (retried);
# on the shared VM another client may have paused or resumed it first.
RETRYABLE = {Code.RESOURCE_EXHAUSTED}
SHARED_CODES = {Code.OK, Code.ABORTED, Code.FAILED_PRECONDITION}


# -- the daemon process ---------------------------------------------------------------------

@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    address: str
    socket_path: str

    @classmethod
    def start(cls, directory: str, extra: list[str] | None = None) -> DaemonProcess:
        kvmd = os.path.join(os.path.dirname(sys.executable), "kvmd")
        sock = os.path.join(directory, "kvmd.sock")
        address = f"unix://{sock}"
        args = [kvmd, "--listen", address, "--metrics-listen", "off", "--log-level", "error",
                "--max-concurrent-rpcs", str(MAX_RPCS),
                "--max-calls-per-identity", str(CALLS_PER_IDENTITY), *(extra or [])]
        proc = subprocess.Popen(args)
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"kvmd did not start: {' '.join(args)}")
            time.sleep(0.05)
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
        return cls(proc, address, sock)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> tuple[int, int, int]:
        """(RSS bytes, open fds, threads) of the daemon, from /proc. Threads are the
        daemon's own: not KVM's per-VM workers (kvm-nx-lpage-recovery), which the kernel
        adds to the process at a VM's first KVM_RUN and ends with the VM, so a VM that
        first runs during the load would count as a leaked thread."""
        rss = 0
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        return rss, self.fd_count(), own_threads(self.thread_names())

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def thread_names(self) -> Counter[str]:
        """The process's threads by name (comm: the loop shows as the process's name, the
        call pool as kvmd-rpc, grpc core's own as event_engine, KVM's as kvm-...), to tell
        which kind a changed count was."""
        names: Counter[str] = Counter()
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{tid}/comm") as comm:
                    names[comm.read().strip()] += 1
            except OSError:  # ended meanwhile
                continue
        return names

    def stop(self) -> int:
        """SIGTERM; returns the exit code (killed after 30 s: -9)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9
        return int(self.proc.returncode)


# -- recording ------------------------------------------------------------------------------

@dataclass
class Unexpected:
    method: str
    code: str
    details: str
    at: float


class Recorder:
    """Latencies and codes per RPC, from every client thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.latencies: dict[str, list[float]] = {}
        self.codes: dict[str, dict[str, int]] = {}
        self.retries = 0
        self.unexpected: list[Unexpected] = []
        self.started = time.monotonic()

    def record(self, method: str, seconds: float, code: grpc.StatusCode, retries: int) -> None:
        with self._lock:
            self.latencies.setdefault(method, []).append(seconds)
            per = self.codes.setdefault(method, {})
            per[code.name] = per.get(code.name, 0) + 1
            self.retries += retries

    def bad(self, method: str, code: grpc.StatusCode, details: str) -> None:
        with self._lock:
            self.unexpected.append(Unexpected(method, code.name, details[:300],
                                              time.monotonic() - self.started))


class Failed(Exception):
    """A call ended with an unexpected code (recorded): abandon this cycle."""


class Client:
    """One client thread's channel and stubs, and its timed calls."""

    def __init__(self, address: str, recorder: Recorder) -> None:
        self.channel = grpc.insecure_channel(address)
        self.vms = rpc.VmsStub(self.channel)
        self.memory = rpc.MemoryStub(self.channel)
        self.vcpus = rpc.VcpusStub(self.channel)
        self.recorder = recorder

    def close(self) -> None:
        self.channel.close()

    def call(self, name: str, fn: Callable[..., Any], request: Any,
             expected: set[grpc.StatusCode] | None = None) -> Any:
        """Time one call (retrying budget refusals); record it; raise Failed on a code
        outside `expected` (OK only by default)."""
        expected = expected or {Code.OK}
        retries = 0
        start = time.perf_counter()
        while True:
            try:
                result = fn(request, timeout=CALL_TIMEOUT)
                code = Code.OK
            except grpc.RpcError as err:
                code, result = err.code(), err  # type: ignore[attr-defined]
                if code in RETRYABLE and retries < MAX_RETRIES:
                    retries += 1
                    time.sleep(RETRY_PAUSE)
                    continue
            break
        self.recorder.record(name, time.perf_counter() - start, code, retries)
        if code not in expected:
            details = result.details() if isinstance(result, grpc.RpcError) else ""
            self.recorder.bad(name, code, details or "")
            raise Failed(f"{name}: {code.name}")
        return result


def _writes(vm_id: str, program: bytes) -> Iterator[pb.WriteGuestMemoryRequest]:
    yield pb.WriteGuestMemoryRequest(vm_id=vm_id, guest_addr=CODE_ADDR, data=program)


def _fill(vm_id: str) -> Iterator[pb.WriteGuestMemoryRequest]:
    yield pb.WriteGuestMemoryRequest(vm_id=vm_id, guest_addr=FILL_ADDR,
                                     data=FILL[:FILL_CHUNK])
    for off in range(FILL_CHUNK, len(FILL), FILL_CHUNK):
        yield pb.WriteGuestMemoryRequest(data=FILL[off:off + FILL_CHUNK])


def setup_vcpu(c: Client, vm_id: str, vcpu_id: int) -> None:
    ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=vcpu_id)
    c.call("CreateVcpu", c.vcpus.CreateVcpu, pb.CreateVcpuRequest(vm_id=vm_id,
                                                                    vcpu_id=vcpu_id))
    sregs = c.call("GetSregs", c.vcpus.GetSregs, ref)
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        getattr(sregs, name).base = 0
        getattr(sregs, name).selector = 0
    c.call("SetSregs", c.vcpus.SetSregs, pb.SetSregsRequest(vcpu=ref, sregs=sregs))
    c.call("SetRegs", c.vcpus.SetRegs, pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(
        rip=CODE_ADDR, rflags=2, rsp=0x8000)))


def boot(c: Client, vm_id: str, program: bytes, irqchip: bool, vcpus: int = 2) -> None:
    c.call("CreateVm", c.vms.CreateVm, pb.CreateVmRequest(
        vm_id=vm_id, options=pb.VmOptions(irqchip=irqchip)))
    c.call("AddMemoryRegion", c.memory.AddMemoryRegion, pb.AddMemoryRegionRequest(
        vm_id=vm_id, guest_addr=0, size=MEM_SIZE))
    c.call("WriteGuestMemory", lambda r, timeout: c.memory.WriteGuestMemory(
        r, timeout=timeout), _writes(vm_id, program))
    c.call("WriteGuestMemory", lambda r, timeout: c.memory.WriteGuestMemory(
        r, timeout=timeout), _fill(vm_id))
    for i in range(vcpus):
        setup_vcpu(c, vm_id, i)


def cycle(c: Client, vm_id: str, n: int) -> None:
    """One create/fill/run/pause/resume/delete cycle, plus a pause/resume of the shared VM."""
    _, program, irqchip = GUESTS[n % len(GUESTS)]
    try:
        boot(c, vm_id, program, irqchip)
        ref = pb.VmRef(vm_id=vm_id)
        c.call("StartVm", c.vms.StartVm, ref)
        for _ in range(3):
            c.call("GetVm", c.vms.GetVm, pb.GetVmRequest(vm_id=vm_id))
            c.call("PauseVm", c.vms.PauseVm, ref)
            c.call("GetRegs", c.vcpus.GetRegs, pb.VcpuRef(vm_id=vm_id, vcpu_id=0))
            c.call("ResumeVm", c.vms.ResumeVm, ref)
        if n % 4 == 0:
            c.call("StopVm", c.vms.StopVm, ref)
            c.call("StartVm", c.vms.StartVm, ref)
        shared = pb.VmRef(vm_id=SHARED_VM)
        c.call("PauseVm(shared)", c.vms.PauseVm, shared, SHARED_CODES)
        c.call("ResumeVm(shared)", c.vms.ResumeVm, shared, SHARED_CODES)
    except Failed:
        pass
    finally:
        try:
            c.call("DeleteVm", c.vms.DeleteVm, pb.DeleteVmRequest(vm_id=vm_id),
                   {Code.OK, Code.NOT_FOUND})
        except Failed:
            pass


def client_loop(address: str, index: int, stop: threading.Event, recorder: Recorder,
                tag: str) -> None:
    c = Client(address, recorder)
    try:
        n = index
        while not stop.is_set():
            cycle(c, f"soak-{tag}-{index}-{n}", n)
            n += 1
    finally:
        c.close()


def run_clients(address: str, clients: int, seconds: float, recorder: Recorder,
                tag: str) -> None:
    stop = threading.Event()
    threads = [threading.Thread(target=client_loop, args=(address, i, stop, recorder, tag),
                                name=f"soak-client-{i}", daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(CALL_TIMEOUT * 3)
        if t.is_alive():
            recorder.bad("client", Code.DEADLINE_EXCEEDED, f"{t.name} did not finish")


def prime_pool(address: str, seconds: float = 1.0) -> None:
    """Fill the daemon's RPC thread pool (it grows on demand and never shrinks): many
    callers at once for a while, so the baseline thread count already includes it."""
    stop = threading.Event()

    def hammer() -> None:
        with grpc.insecure_channel(address) as channel:
            stub = rpc.VmsStub(channel)
            while not stop.is_set():
                try:
                    stub.ListVms(pb.ListVmsRequest(), timeout=CALL_TIMEOUT)
                except grpc.RpcError:
                    pass  # budget refusals are the point here
    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(4 * MAX_RPCS)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(CALL_TIMEOUT)


class HealthPoller:
    """grpc.health.v1 Check every `interval` s from its own thread and channel."""

    def __init__(self, address: str, interval: float = 0.05) -> None:
        self.address = address
        self.interval = interval
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.longest_gap = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-health", daemon=True)

    def start(self) -> HealthPoller:
        self._thread.start()
        return self

    def _run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            last_ok = time.monotonic()
            while not self._stop.wait(self.interval):
                start = time.perf_counter()
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(service=""),
                                      timeout=HEALTH_TIMEOUT)
                    if resp.status != health_pb2.HealthCheckResponse.SERVING:
                        self.failures.append(f"status {resp.status}")
                    else:
                        now = time.monotonic()
                        self.longest_gap = max(self.longest_gap, now - last_ok)
                        last_ok = now
                except grpc.RpcError as err:
                    self.failures.append(f"{err.code().name}: {err.details()}")  # type: ignore[attr-defined]
                self.latencies.append(time.perf_counter() - start)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(HEALTH_TIMEOUT * 3)


class Sampler:
    """The daemon's (t, RSS, fds, threads) every `interval` s."""

    def __init__(self, daemon: DaemonProcess, interval: float) -> None:
        self.daemon = daemon
        self.interval = interval
        self.samples: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)
        self._t0 = time.monotonic()

    def start(self) -> Sampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic() - self._t0, *self.daemon.stats()))
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# -- the report -----------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (seconds), per minute."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx * 60


@dataclass
class RpcStats:
    calls: int
    per_second: float
    p50_ms: float
    p99_ms: float
    codes: dict[str, int]


@dataclass
class Report:
    seconds: float
    clients: int
    calls: int
    calls_per_second: float
    retries: int
    rpcs: dict[str, RpcStats]
    health_checks: int
    health_failures: list[str]
    health_p50_ms: float
    health_p99_ms: float
    health_longest_gap_s: float
    rss_start_mib: float
    rss_end_mib: float
    rss_max_mib: float
    rss_slope_mib_per_min: float
    rss_slope_second_half_mib_per_min: float  # without the warm-up's growth
    samples: int
    fds_baseline: int
    fds_end: int
    threads_baseline: int
    threads_end: int
    threads_changed: str  # by name, e.g. "+1 event_engine"; empty if none
    threads_returned: bool  # see threads_returned()
    vms_end: int
    daemon_exit: int
    unexpected: list[Unexpected] = field(default_factory=list)

    def violations(self) -> list[str]:
        """Every invariant the run broke (empty: all held)."""
        out = [f"unexpected {u.code} from {u.method} at {u.at:.1f} s: {u.details}"
               for u in self.unexpected[:20]]
        if self.health_failures:
            out.append(f"{len(self.health_failures)} health checks failed: "
                       f"{self.health_failures[:5]}")
        if not self.health_checks:
            out.append("no health check ran")
        if self.vms_end:
            out.append(f"{self.vms_end} VMs left at the end")
        if self.fds_end != self.fds_baseline:
            out.append(f"daemon fds {self.fds_end}, baseline {self.fds_baseline}")
        if not self.threads_returned:
            out.append(f"daemon threads {self.threads_end}, baseline {self.threads_baseline}"
                       f" ({self.threads_changed or 'the same names'})")
        if self.daemon_exit != 0:
            out.append(f"the daemon exited {self.daemon_exit} on SIGTERM")
        return out

    def table(self) -> str:
        lines = [f"soak: {self.clients} clients, {self.seconds:.0f} s, {self.calls} calls, "
                 f"{self.calls_per_second:.0f} calls/s, {self.retries} budget retries",
                 f"{'RPC':<18} {'calls':>7} {'calls/s':>8} {'p50 ms':>8} {'p99 ms':>8}  codes"]
        for name, s in sorted(self.rpcs.items()):
            codes = " ".join(f"{k}={v}" for k, v in sorted(s.codes.items()))
            lines.append(f"{name:<18} {s.calls:>7} {s.per_second:>8.1f} {s.p50_ms:>8.2f} "
                         f"{s.p99_ms:>8.2f}  {codes}")
        lines += [
            f"health checks: {self.health_checks}, failed {len(self.health_failures)}, "
            f"p50 {self.health_p50_ms:.2f} ms, p99 {self.health_p99_ms:.2f} ms, longest gap "
            f"between answers {self.health_longest_gap_s:.2f} s",
            f"daemon RSS: {self.rss_start_mib:.1f} -> {self.rss_end_mib:.1f} MiB (max "
            f"{self.rss_max_mib:.1f}), slope {self.rss_slope_mib_per_min:+.3f} MiB/min over "
            f"{self.samples} samples ({self.rss_slope_second_half_mib_per_min:+.3f} over the "
            "second half)",
            f"daemon fds {self.fds_baseline} -> {self.fds_end}, threads "
            f"{self.threads_baseline} -> {self.threads_end}"
            f"{f' ({self.threads_changed})' if self.threads_changed else ''}, VMs left "
            f"{self.vms_end}, exit {self.daemon_exit}",
        ]
        bad = self.violations()
        lines.append("invariants: " + ("all held" if not bad else "BROKEN"))
        lines += [f"  - {v}" for v in bad]
        return "\n".join(lines)


def is_daemons_own(thread_name: str) -> bool:
    """Not one of KVM's per-VM workers (kvm-nx-lpage-recovery), which the kernel adds to the
    process at a VM's first KVM_RUN and ends with the VM (see DaemonProcess.stats)."""
    return not thread_name.startswith("kvm-")


def own_threads(names: Counter[str]) -> int:
    """How many of the daemon's own threads a count by name holds."""
    return sum(n for name, n in names.items() if is_daemons_own(name))


def name_changes(before: Counter[str], after: Counter[str]) -> str:
    """What changed between two counts of the daemon's own threads by name: "+1
    event_engine, -1 kvmd"."""
    return ", ".join(f"{after[n] - before[n]:+d} {n}" for n in sorted(before | after)
                     if after[n] != before[n] and is_daemons_own(n))


def threads_returned(before: Counter[str], after: Counter[str], pool_slack: int) -> bool:
    """The daemon's own threads are back: every kind as many as before, except the elastic
    pools (grpc's and the call pool), which may have fewer (reclaimed since the baseline)
    or up to `pool_slack` more each (the load's concurrency: see ELASTIC_POOLS)."""
    return all(after[n] == before[n] or (n in ELASTIC_POOLS and
                                         after[n] <= before[n] + pool_slack)
               for n in before | after if is_daemons_own(n))


def settle(daemon: DaemonProcess, fds0: int, names0: Counter[str], pool_slack: int,
           timeout: float) -> tuple[int, int, Counter[str]]:
    """Wait (bounded) for fds and threads to come back to the baseline; the last seen
    (fds, own threads, threads by name)."""
    deadline = time.monotonic() + timeout
    while True:
        fds, names = daemon.fd_count(), daemon.thread_names()
        if ((fds == fds0 and threads_returned(names0, names, pool_slack))
                or time.monotonic() > deadline):
            return fds, own_threads(names), names
        time.sleep(0.1)


def run(duration: float, clients: int = 8, warmup: float = 5.0,
        sample_interval: float = 5.0, log: Callable[[str], None] = print) -> Report:
    """Start a daemon, warm it up, load it for `duration` s, check it, stop it."""
    with tempfile.TemporaryDirectory(prefix="kvmd-soak-") as tmp:
        daemon = DaemonProcess.start(tmp)
        health = HealthPoller(daemon.address)
        sampler: Sampler | None = None
        try:
            health.start()
            setup = Client(daemon.address, Recorder())
            boot(setup, SHARED_VM, HALT, irqchip=True, vcpus=1)
            setup.call("StartVm", setup.vms.StartVm, pb.VmRef(vm_id=SHARED_VM))
            log(f"soak: warm-up {warmup:.0f} s with {clients} clients (pid {daemon.pid})")
            run_clients(daemon.address, clients, warmup, Recorder(), "warm")
            prime_pool(daemon.address)
            time.sleep(0.5)
            fds0, names0 = daemon.fd_count(), daemon.thread_names()
            threads0 = own_threads(names0)  # from the same walk as the names it is checked by
            log(f"soak: baseline {fds0} fds, {threads0} threads; loading for "
                f"{duration:.0f} s")
            recorder = Recorder()
            sampler = Sampler(daemon, sample_interval).start()
            started = time.monotonic()
            run_clients(daemon.address, clients, duration, recorder, "main")
            elapsed = time.monotonic() - started
            sampler.stop()
            health.stop()  # no traffic while settling
            pool_slack = clients + 1  # every client and the health poller with a call open
            fds1, threads1, names1 = settle(daemon, fds0, names0, pool_slack, SETTLE_TIMEOUT)
            changed = name_changes(names0, names1)
            setup.call("DeleteVm", setup.vms.DeleteVm, pb.DeleteVmRequest(vm_id=SHARED_VM))
            vms_end = len(setup.vms.ListVms(pb.ListVmsRequest(), timeout=CALL_TIMEOUT).vms)
            setup.close()
        finally:
            health.stop()
            if sampler is not None:
                sampler.stop()
            code = daemon.stop()
    samples = sampler.samples if sampler else []
    rss = [(t, r / (1 << 20)) for t, r, _, _ in samples]
    calls = sum(len(v) for v in recorder.latencies.values())
    rpcs = {name: RpcStats(len(v), len(v) / elapsed, percentile(v, 50) * 1e3,
                           percentile(v, 99) * 1e3, recorder.codes[name])
            for name, v in recorder.latencies.items()}
    return Report(
        seconds=elapsed, clients=clients, calls=calls, calls_per_second=calls / elapsed,
        retries=recorder.retries, rpcs=rpcs, health_checks=len(health.latencies),
        health_failures=health.failures,
        health_p50_ms=percentile(health.latencies, 50) * 1e3,
        health_p99_ms=percentile(health.latencies, 99) * 1e3,
        health_longest_gap_s=health.longest_gap,
        rss_start_mib=rss[0][1] if rss else 0.0, rss_end_mib=rss[-1][1] if rss else 0.0,
        rss_max_mib=max((r for _, r in rss), default=0.0),
        rss_slope_mib_per_min=slope_per_minute(rss),
        rss_slope_second_half_mib_per_min=slope_per_minute(rss[len(rss) // 2:]),
        samples=len(rss),
        fds_baseline=fds0, fds_end=fds1, threads_baseline=threads0, threads_end=threads1,
        threads_changed=changed,
        threads_returned=threads_returned(names0, names1, pool_slack),
        vms_end=vms_end, daemon_exit=code, unexpected=recorder.unexpected)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float,
                   default=float(os.environ.get("SOAK_SECONDS", "600")),
                   help="seconds of load after the warm-up (default 600, or $SOAK_SECONDS)")
    p.add_argument("--clients", type=int, default=8, help="client threads (default 8)")
    p.add_argument("--warmup", type=float, default=5.0, help="warm-up seconds (default 5)")
    p.add_argument("--sample-interval", type=float, default=5.0,
                   help="seconds between RSS/fd/thread samples (default 5)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    args = p.parse_args(argv)
    report = run(args.duration, args.clients, args.warmup, args.sample_interval)
    print(report.table())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(asdict(report), fh, indent=2)
    return 1 if report.violations() else 0


if __name__ == "__main__":
    sys.exit(main())
