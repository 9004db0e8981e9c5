"""The control plane under guest load: GetVm latency with 16 guests spinning (`jmp $`, one
vCPU each) against the same daemon with those guests paused, in alternating rounds.

On a 2-core host 16 spinning vCPU threads want 8 times the CPUs there are; the API's event
loop and call threads must still answer promptly (vCPU threads run at a lower scheduling
priority: see `vcpu_nice` in the README).

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

from bench_support import SPIN, Kvmd, load_average, percentile, spread

from kvmd_proto import vmm_pb2 as pb

TARGET = 3.0


def get_vm_times(d: Kvmd, n: int) -> list[float]:
    request = pb.GetVmRequest(vm_id="probe")
    out = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        d.vms.GetVm(request, timeout=30)
        out.append(clock() - t0)
        time.sleep(0.001)  # a client polling, not a flood
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="GetVm calls per round")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds")
    parser.add_argument("--guests", type=int, default=16, help="spinning guests")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    parser.add_argument("daemon_args", nargs="*", metavar="-- KVMD-ARG",
                        help="extra daemon arguments (e.g. -- --vcpu-policy idle)")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.rounds = 200, 3

    with tempfile.TemporaryDirectory(prefix="kvmd-bench-") as tmp:
        d = Kvmd.start(os.path.join(tmp, "kvmd.sock"), *args.daemon_args)
        try:
            d.vms.CreateVm(pb.CreateVmRequest(vm_id="probe"), timeout=30)
            guests = [pb.VmRef(vm_id=f"spin-{i}") for i in range(args.guests)]
            for ref in guests:
                d.boot(ref.vm_id, SPIN)
                d.vms.StartVm(ref, timeout=30)
                d.vms.PauseVm(ref, timeout=60)
            get_vm_times(d, 100)  # warm-up
            idle50, idle99, busy50, busy99 = [], [], [], []
            for _ in range(args.rounds):
                t = get_vm_times(d, args.calls)
                idle50.append(percentile(t, 50))
                idle99.append(percentile(t, 99))
                for ref in guests:
                    d.vms.ResumeVm(ref, timeout=60)
                time.sleep(0.2)
                t = get_vm_times(d, args.calls)
                busy50.append(percentile(t, 50))
                busy99.append(percentile(t, 99))
                for ref in guests:
                    d.vms.PauseVm(ref, timeout=60)
            for ref in guests:
                d.delete(ref.vm_id)
        finally:
            d.stop()

    ratios = [b / i for b, i in zip(busy99, idle99, strict=True)]
    print(f"GetVm under guest load: {os.cpu_count()} CPUs (load average {load_average()}); "
          f"{args.rounds} alternating rounds of {args.calls} calls; per-round percentiles, "
          "median (min-max), in us")
    print(f"  idle (guests paused)        p50 {spread(idle50, 1e6)}   p99 {spread(idle99, 1e6)}")
    print(f"  {args.guests} guests spinning         p50 {spread(busy50, 1e6)}   "
          f"p99 {spread(busy99, 1e6)}")
    print(f"  p99 loaded/idle: {spread(ratios, fmt='{:.2f}')}x "
          f"(median of the medians {statistics.median(busy99) / statistics.median(idle99):.2f}x)"
          f"; target <= {TARGET}x")


if __name__ == "__main__":
    main()
