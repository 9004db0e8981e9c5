"""The control plane under guest load: GetVm latency with 16 guests spinning (`jmp $`, one
vCPU each) against the same daemon with those guests paused, in alternating rounds.

On a 2-core host 16 spinning vCPU threads want 8 times the CPUs there are; the API's event
loop and call threads must still answer promptly. Two layouts, one after the other:

- shared: the guests may run on every CPU (the default). vCPU threads run at a lower
  scheduling priority and the daemon's other threads with a shorter slice (`vcpu_nice`,
  `api_slice_us` in the README). Interleaved with each GetVm, under the same load, two
  references: the same call to a second daemon started with `--api-slice-us 0` (the
  kernel's default slice: what the short slice gains) and a bare grpcio echo server (its
  own process, at the kernel's default slice: what the platform gives any server).
- housekeeping CPU: the guests run on every CPU but the first (`--vcpu-cpus 1-N`), which is
  left to the control plane; the echo server again beside it. Guests then have one CPU
  fewer, the price of this layout.

    .venv/bin/python benchmarks/api_load.py [--calls N] [--rounds N] [--guests N] [--quick]

Target (issue 12): GetVm p99 with 16 spinning guests within 3x of its idle p99. Not a
test: nothing asserts speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

from bench_support import SPIN, EchoServer, Kvmd, load_average, percentile, spread

from kvmd.core.sched import format_cpu_list
from kvmd_proto import vmm_pb2 as pb

TARGET = 3.0


ECHO_BYTES = 200  # about a GetVm answer


def timed_calls(calls: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    """`n` latencies of each call, interleaved, 1 ms apart (a client polling, not a flood)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    clock = time.perf_counter
    for _ in range(n):
        for name, call in calls.items():
            t0 = clock()
            call()
            times[name].append(clock() - t0)
            time.sleep(0.001)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="GetVm calls per round")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds")
    parser.add_argument("--guests", type=int, default=16, help="spinning guests")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    parser.add_argument("daemon_args", nargs="*", metavar="-- KVMD-ARG",
                        help="extra arguments of the measured daemons (e.g. -- --vcpu-nice 19)")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.rounds = 200, 3

    # Per-round p50 and p99 of each call, idle and busy.
    p50: dict[str, list[float]] = {}
    p99: dict[str, list[float]] = {}

    def record(phase: str, times: dict[str, list[float]]) -> None:
        for name, t in times.items():
            p50.setdefault(f"{name} {phase}", []).append(percentile(t, 50))
            p99.setdefault(f"{name} {phase}", []).append(percentile(t, 99))

    def under_load(guest_host: Kvmd, calls: dict[str, Callable[[], object]]) -> None:
        """Boot the guests on `guest_host`, then alternate idle and busy rounds of `calls`."""
        guests = [pb.VmRef(vm_id=f"spin-{i}") for i in range(args.guests)]
        for ref in guests:
            guest_host.boot(ref.vm_id, SPIN)
            guest_host.vms.StartVm(ref, timeout=30)
            guest_host.vms.PauseVm(ref, timeout=60)
        timed_calls(calls, 100)  # warm-up
        for _ in range(args.rounds):
            record("idle", timed_calls(calls, args.calls))
            for ref in guests:
                guest_host.vms.ResumeVm(ref, timeout=60)
            time.sleep(0.2)
            record("busy", timed_calls(calls, args.calls))
            for ref in guests:
                guest_host.vms.PauseVm(ref, timeout=60)
        for ref in guests:
            guest_host.delete(ref.vm_id)

    cpus = sorted(os.sched_getaffinity(0))
    guest_cpus = format_cpu_list(frozenset(cpus[1:]))
    with tempfile.TemporaryDirectory(prefix="kvmd-bench-") as tmp:
        d = Kvmd.start(os.path.join(tmp, "kvmd.sock"), *args.daemon_args)
        plain = Kvmd.start(os.path.join(tmp, "plain.sock"), "--api-slice-us", "0",
                           *args.daemon_args)
        echo = EchoServer(os.path.join(tmp, "echo.sock"))
        kept = None
        try:
            probe = pb.GetVmRequest(vm_id="probe")
            for daemon in (d, plain):
                daemon.vms.CreateVm(pb.CreateVmRequest(vm_id="probe"), timeout=30)
            payload = bytes(ECHO_BYTES)
            under_load(d, {"kvmd": lambda: d.vms.GetVm(probe, timeout=30),
                           "plain": lambda: plain.vms.GetVm(probe, timeout=30),
                           "echo": lambda: echo.unary(payload, timeout=30)})
            if guest_cpus:
                kept = Kvmd.start(os.path.join(tmp, "kept.sock"), "--vcpu-cpus", guest_cpus,
                                  *args.daemon_args)
                kept.vms.CreateVm(pb.CreateVmRequest(vm_id="probe"), timeout=30)
                under_load(kept, {"kept": lambda: kept.vms.GetVm(probe, timeout=30),
                                  "kept echo": lambda: echo.unary(payload, timeout=30)})
        finally:
            if kept is not None:
                kept.stop()
            echo.stop()
            plain.stop()
            d.stop()

    print(f"GetVm under guest load: {os.cpu_count()} CPUs (load average {load_average()}); "
          f"{args.rounds} alternating rounds of {args.calls} calls of each, interleaved; "
          "per-round percentiles, median (min-max), in us")
    labels = {"kvmd": "GetVm", "plain": "GetVm, --api-slice-us 0", "echo": "bare echo"}
    if guest_cpus:
        labels |= {"kept": f"GetVm, guests on CPUs {guest_cpus} (--vcpu-cpus)",
                   "kept echo": f"bare echo, guests on CPUs {guest_cpus}"}
    else:
        print("  one CPU: no housekeeping layout to measure")
    for name, label in labels.items():
        for phase, what in (("idle", "idle (guests paused)"),
                            ("busy", f"{args.guests} guests spinning")):
            key = f"{name} {phase}"
            print(f"  {label + ', ' + what:<66} p50 {spread(p50[key], 1e6)}   "
                  f"p99 {spread(p99[key], 1e6)}")
    for name, label in labels.items():
        busy, idle = p99[f"{name} busy"], p99[f"{name} idle"]
        ratios = [b / i for b, i in zip(busy, idle, strict=True)]
        target = f"; target <= {TARGET}x" if name in ("kvmd", "kept") else ""
        print(f"  {label} p99 loaded/idle: {spread(ratios, fmt='{:.2f}')}x (median of the "
              f"medians {statistics.median(busy) / statistics.median(idle):.2f}x){target}")


if __name__ == "__main__":
    main()
