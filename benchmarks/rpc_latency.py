"""Control-RPC latency against what cannot be avoided: a bare grpcio echo plus the same
kernel work done in C, measured in the same run.

The daemon and a bare grpcio echo server (no interceptors, raw bytes) each run as their own
process; the C reference (benchmarks/c/control_cycle.c) does each RPC's ioctls directly:
create a VM, add a 64 MiB slot, create a vCPU with its kvm_run mapping, remove a slot,
destroy. Each round's p50 is taken, and the table shows
the median over rounds with the spread (min-max) of the per-round ratios. Within a round
short batches of calls are interleaved, so slow drifts of a shared host hit all alike.

- Read-only RPCs (GetVm, ListVms, GetVcpuState, GetInfo) against one echo.
- Each step of the cycle CreateVm / AddMemoryRegion (64 MiB) / CreateVcpu / DeleteVm, and
  RemoveMemoryRegion, against an echo plus that step in C.
- The whole cycle against four echoes plus the C cycle.

    .venv/bin/python benchmarks/rpc_latency.py [--calls N] [--rounds N] [--quick]

Targets (issue 12): each RPC within 1.1x of (echo + its ioctls in C), the cycle within
1.15x. Not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench_support import EchoServer, Kvmd, build_c, load_average, percentile, spread

from kvmd_proto import vmm_pb2 as pb

SLOT_BYTES = 64 << 20
BATCH = 20
STEP_TARGET = 1.10
CYCLE_TARGET = 1.15
CYCLE_STEPS = ("CreateVm", "AddMemoryRegion", "CreateVcpu", "DeleteVm")
C_STEP = {"CreateVm": "create", "AddMemoryRegion": "add", "CreateVcpu": "vcpu",
          "DeleteVm": "destroy", "RemoveMemoryRegion": "remove", "cycle": "cycle"}


@dataclass
class Row:
    """One measured quantity: its per-round p50s (seconds) and its reference's."""

    name: str
    rpcs: int
    c_part: str = ""  # the C step (or cycle) in its reference, if any
    p50s: list[float] = field(default_factory=list)
    p99s: list[float] = field(default_factory=list)
    refs: list[float] = field(default_factory=list)

    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.p50s, self.refs, strict=True)]


def run_c(cycles: int) -> dict[str, float]:
    """Per-step medians of the C reference, in seconds."""
    out = subprocess.run([build_c("control_cycle"), str(cycles), str(SLOT_BYTES)],
                         check=True, capture_output=True, text=True).stdout
    values = dict(re.findall(r"(\w+)=([\d.]+)", out))
    return {k: float(v) * 1e-6 for k, v in values.items()}


def timed(fn: Callable[[], None], n: int) -> list[float]:
    clock = time.perf_counter
    out = []
    for _ in range(n):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.rounds = 100, 4

    with tempfile.TemporaryDirectory(prefix="kvmd-bench-") as tmp:
        daemon = Kvmd.start(os.path.join(tmp, "kvmd.sock"), "--max-vms", "1024")
        echo = EchoServer(os.path.join(tmp, "echo.sock"))
        try:
            rows = measure(daemon, echo, args.calls, args.rounds)
        finally:
            echo.stop()
            daemon.stop()
    report(rows, args)


def measure(d: Kvmd, echo: EchoServer, calls: int, rounds: int) -> list[Row]:
    d.vms.CreateVm(pb.CreateVmRequest(vm_id="bench"), timeout=30)
    d.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id="bench", vcpu_id=0), timeout=30)
    get_vm = pb.GetVmRequest(vm_id="bench")
    payload = get_vm.SerializeToString()  # the echo moves as many bytes as GetVm's request
    ref = pb.VcpuRef(vm_id="bench", vcpu_id=0)
    simple: list[tuple[str, Callable[[], None]]] = [
        ("GetVm", lambda: d.vms.GetVm(get_vm, timeout=30)),
        ("ListVms", lambda: d.vms.ListVms(pb.ListVmsRequest(), timeout=30)),
        ("GetVcpuState", lambda: d.vcpus.GetVcpuState(ref, timeout=30)),
        ("GetInfo", lambda: d.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=30)),
    ]
    echo_row = Row("bare grpcio echo", 1)
    rows = {name: Row(name, 1) for name, _ in simple}
    for step in (*CYCLE_STEPS, "RemoveMemoryRegion"):
        rows[step] = Row(step, 1, C_STEP[step])
    cycle = Row("cycle: CreateVm, AddMemoryRegion 64 MiB, CreateVcpu, DeleteVm", 4, "cycle")
    counter = [0]

    def one_cycle(steps: dict[str, list[float]]) -> float:
        vm_id = f"cycle-{counter[0]}"
        counter[0] += 1
        clock = time.perf_counter
        t0 = clock()
        d.vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id), timeout=30)
        t1 = clock()
        d.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
            vm_id=vm_id, guest_addr=0, size=SLOT_BYTES), timeout=30)
        t2 = clock()
        d.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=0), timeout=30)
        t3 = clock()
        d.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
            vm_id=vm_id, guest_addr=SLOT_BYTES, size=SLOT_BYTES), timeout=30)
        t4 = clock()
        d.memory.RemoveMemoryRegion(pb.RemoveMemoryRegionRequest(vm_id=vm_id, slot=1),
                                    timeout=30)
        t5 = clock()
        d.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id), timeout=30)
        t6 = clock()
        for name, dt in (("CreateVm", t1 - t0), ("AddMemoryRegion", t2 - t1),
                         ("CreateVcpu", t3 - t2), ("RemoveMemoryRegion", t5 - t4),
                         ("DeleteVm", t6 - t5)):
            steps[name].append(dt)
        return (t3 - t0) + (t6 - t5)

    # Warm-up: connections, code paths, the C binary.
    run_c(20)
    timed(lambda: echo.unary(payload, timeout=30), 100)
    for _name, fn in simple:
        timed(fn, 50)
    for _ in range(20):
        one_cycle({k: [] for k in rows})

    # Each round interleaves short batches (BATCH echoes, BATCH of each read, BATCH/4 whole
    # cycles), so every operation sees the same conditions on a shared host while each
    # server stays warm within its batch (as under steady use); the C reference runs
    # BATCH/4 cycles after each batch (the median of its batch medians counts).
    clock = time.perf_counter
    for _ in range(rounds):
        e: list[float] = []
        reads: dict[str, list[float]] = {name: [] for name, _ in simple}
        steps: dict[str, list[float]] = {k: [] for k in rows}
        totals: list[float] = []
        c_batches: list[dict[str, float]] = []
        for _ in range(max(1, calls // BATCH)):
            for _ in range(BATCH):
                t0 = clock()
                echo.unary(payload, timeout=30)
                e.append(clock() - t0)
            for name, fn in simple:
                for _ in range(BATCH):
                    t0 = clock()
                    fn()
                    reads[name].append(clock() - t0)
            for _ in range(BATCH // 4):
                totals.append(one_cycle(steps))
            c_batches.append(run_c(BATCH // 4))
        c = {k: statistics.median(b[k] for b in c_batches) for k in c_batches[0]}
        e50 = percentile(e, 50)
        echo_row.p50s.append(e50)
        echo_row.p99s.append(percentile(e, 99))
        echo_row.refs.append(e50)
        for name, _fn in simple:
            rows[name].p50s.append(percentile(reads[name], 50))
            rows[name].p99s.append(percentile(reads[name], 99))
            rows[name].refs.append(e50)
        for name in (*CYCLE_STEPS, "RemoveMemoryRegion"):
            rows[name].p50s.append(percentile(steps[name], 50))
            rows[name].p99s.append(percentile(steps[name], 99))
            rows[name].refs.append(e50 + c[C_STEP[name]])
        cycle.p50s.append(percentile(totals, 50))
        cycle.p99s.append(percentile(totals, 99))
        cycle.refs.append(4 * e50 + c["cycle"])
        rows.setdefault("_c", Row("C", 0)).p50s.append(c["cycle"])
    c_cycles = rows.pop("_c").p50s
    print(f"C cycle per round (us): {spread(c_cycles, 1e6)}")
    return [echo_row, *rows.values(), cycle]


def report(rows: list[Row], args: argparse.Namespace) -> None:
    print(f"kvmd control-RPC latency: {os.cpu_count()} CPUs (load average {load_average()}); "
          f"{args.rounds} alternating rounds of {args.calls} calls; daemon and echo server "
          "in their own processes")
    header = (f"{'operation':<62} {'p50 us, median (min-max)':>26} {'p99 us':>8} "
              f"{'reference p50 us':>17} {'ratio (min-max)':>18} {'target':>7}")
    print(header)
    print("-" * len(header))
    for row in rows:
        ratios = row.ratios()
        if row.rpcs == 1 and not row.c_part and row.name.startswith("bare"):
            ref, ratio, target = "-", "-", ""
        else:
            ref_name = "echo" if not row.c_part else (
                f"{row.rpcs} echoes + C" if row.rpcs > 1 else "echo + C")
            ref = f"{statistics.median(row.refs) * 1e6:.0f} ({ref_name})"
            ratio = spread(ratios, fmt="{:.2f}") + "x"
            target = f"{CYCLE_TARGET if row.rpcs > 1 else STEP_TARGET:.2f}x"
        print(f"{row.name:<62} {spread(row.p50s, 1e6):>26} "
              f"{statistics.median(row.p99s) * 1e6:>8.0f} {ref:>17} {ratio:>18} {target:>7}")


if __name__ == "__main__":
    main()
