"""Cost of metrics on the exit path: exits/s of a PIO-loop guest while /metrics is scraped
every 100 ms, against the same guest with metrics off (Config(metrics_listen="off")).

Two in-process daemons run side by side, each holding one paused one-vCPU guest doing
`out 0x80, al; jmp` (port 0x80 is unclaimed: the C run loop completes every access and counts
it as an io_out exit). In each round the two guests run in turn (order alternating between
rounds), one at a time: ResumeVm, a short warm-up, then io_out exits counted over a fixed
window (GetExitStats before and after), then PauseVm. While the metrics-on guest runs, a
separate scraper process fetches its /metrics every 100 ms with Prometheus's Accept header
(OpenMetrics), so the scrapes compete for the machine as a real Prometheus would. The exit
counters themselves are plain per-vCPU C words in both daemons (GetExitStats reads them
too); what "metrics on" adds is the HTTP endpoint and everything a scrape reads: exit
counters, daemon state and the kernel's binary statistics of every vCPU.

Prints per-round rates and ratios, and the median of the per-round ratios (each round's two
runs are adjacent in time, so load from other processes on the machine mostly cancels out),
with the load average before and after: on a busy machine, rerun. Not a test: it asserts
nothing about speed.

    .venv/bin/python benchmarks/metrics_overhead.py [--rounds N] [--window SECONDS]

Target: at least 0.97x.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kvmd.server import Config, Daemon
from kvmd_proto import vmm_pb2 as pb
from kvmd_proto import vmm_pb2_grpc as rpc

TARGET_RATIO = 0.97
SCRAPE_INTERVAL = 0.1
CODE_ADDR = 0x1000
RAM_SIZE = 0x10000
PIO_LOOP = bytes([
    0xE6, 0x80,  # loop: out 0x80, al
    0xEB, 0xFC,  #       jmp loop
])
VM_ID = "bench"
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")

# Runs in its own process: scrape URL every INTERVAL s until stdin closes; print a line when
# the first scrape is done, and "scrapes mean_seconds max_seconds bytes" at the end.
SCRAPER = r"""
import sys, threading, time, urllib.request
url, interval, accept = sys.argv[1], float(sys.argv[2]), sys.argv[3]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
took, size, first = [], 0, True
next_at = time.monotonic()
while not stop.is_set():
    t0 = time.perf_counter()
    req = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=10) as resp:
        size = len(resp.read())
    took.append(time.perf_counter() - t0)
    if first:
        print("ready", flush=True)
        first = False
    next_at += interval
    stop.wait(max(0.0, next_at - time.monotonic()))
print(len(took), sum(took) / len(took), max(took), size, flush=True)
"""


@dataclass
class Bench:
    """One daemon with one paused PIO-loop guest."""

    name: str
    daemon: Daemon
    channel: grpc.Channel
    vms: rpc.VmsStub
    rates: list[float] = field(default_factory=list)
    scrape_stats: list[tuple[int, float, float, int]] = field(default_factory=list)

    @classmethod
    def start(cls, name: str, directory: Path, metrics_listen: str) -> Bench:
        address = f"unix://{directory / name}.sock"
        daemon = Daemon(Config(listen=[address], metrics_listen=metrics_listen,
                               log_level="warning"))
        daemon.start()
        channel = grpc.insecure_channel(address)
        bench = cls(name, daemon, channel, rpc.VmsStub(channel))
        bench._create_guest(channel)
        return bench

    def _create_guest(self, channel: grpc.Channel) -> None:
        memory, vcpus = rpc.MemoryStub(channel), rpc.VcpusStub(channel)
        self.vms.CreateVm(pb.CreateVmRequest(vm_id=VM_ID))
        memory.AddMemoryRegion(pb.AddMemoryRegionRequest(vm_id=VM_ID, guest_addr=0,
                                                         size=RAM_SIZE))
        memory.WriteGuestMemory(iter([pb.WriteGuestMemoryRequest(
            vm_id=VM_ID, guest_addr=CODE_ADDR, data=PIO_LOOP)]))
        vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=VM_ID, vcpu_id=0))
        ref = pb.VcpuRef(vm_id=VM_ID, vcpu_id=0)
        sregs = vcpus.GetSregs(ref)
        sregs.cs.base = 0
        sregs.cs.selector = 0
        vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref, sregs=sregs))
        vcpus.SetRegs(pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(rip=CODE_ADDR, rflags=2)))
        self.vms.StartVm(pb.VmRef(vm_id=VM_ID))
        self.vms.PauseVm(pb.VmRef(vm_id=VM_ID))

    def io_out(self) -> int:
        return int(self.vms.GetExitStats(pb.VmRef(vm_id=VM_ID)).total["io_out"])

    def measure(self, warmup: float, window: float) -> float:
        """Resume the guest, warm up, count io_out exits over `window` s, pause it."""
        scraper = None
        if self.daemon.metrics_server is not None:
            url = f"http://127.0.0.1:{self.daemon.metrics_server.port}/metrics"
            scraper = subprocess.Popen(
                [sys.executable, "-c", SCRAPER, url, str(SCRAPE_INTERVAL), PROMETHEUS_ACCEPT],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert scraper.stdout is not None and scraper.stdout.readline().strip() == "ready"
        self.vms.ResumeVm(pb.VmRef(vm_id=VM_ID))
        try:
            time.sleep(warmup)
            t0, c0 = time.perf_counter(), self.io_out()
            time.sleep(window)
            t1, c1 = time.perf_counter(), self.io_out()
        finally:
            self.vms.PauseVm(pb.VmRef(vm_id=VM_ID))
            if scraper is not None:
                out, _ = scraper.communicate("", timeout=30)
                n, mean, worst, size = out.split()
                self.scrape_stats.append((int(n), float(mean), float(worst), int(size)))
        rate = (c1 - c0) / (t1 - t0)
        self.rates.append(rate)
        return rate

    def close(self) -> None:
        self.vms.DeleteVm(pb.DeleteVmRequest(vm_id=VM_ID))
        self.channel.close()
        self.daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12, help="measurements of each mode")
    parser.add_argument("--window", type=float, default=1.0, help="seconds counted per run")
    parser.add_argument("--warmup", type=float, default=0.3, help="seconds before counting")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="kvmd-bench-") as tmp:
        off = Bench.start("metrics-off", Path(tmp), "off")
        on = Bench.start("metrics-on", Path(tmp), "127.0.0.1:0")
        try:
            print(f"{'round':>5}  {'metrics off':>14}  {'on, scraped/100ms':>18}  "
                  f"{'ratio':>6}")
            for r in range(args.rounds):
                order = (off, on) if r % 2 == 0 else (on, off)
                for bench in order:
                    bench.measure(args.warmup, args.window)
                print(f"{r + 1:>5}  {off.rates[-1]:>11,.0f}/s  {on.rates[-1]:>15,.0f}/s  "
                      f"{on.rates[-1] / off.rates[-1]:>6.3f}")
        finally:
            on.close()
            off.close()

    med_off, med_on = statistics.median(off.rates), statistics.median(on.rates)
    ratios = [a / b for a, b in zip(on.rates, off.rates, strict=True)]
    ratio = statistics.median(ratios)
    scrapes = sum(s[0] for s in on.scrape_stats)
    mean_scrape = sum(s[0] * s[1] for s in on.scrape_stats) / scrapes
    worst_scrape = max(s[2] for s in on.scrape_stats)
    print()
    print(f"median exits/s, metrics off:                {med_off:>12,.0f}")
    print(f"median exits/s, metrics on, scraped/100 ms: {med_on:>12,.0f}")
    print(f"scrapes: {scrapes}, mean {mean_scrape * 1e3:.2f} ms, worst "
          f"{worst_scrape * 1e3:.2f} ms, {on.scrape_stats[-1][3]:,} bytes (OpenMetrics)")
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"({os.cpu_count()} CPUs)")
    print(f"ratio of medians: {med_on / med_off:.3f}x; per-round ratios "
          f"{min(ratios):.3f}..{max(ratios):.3f}")
    verdict = "meets" if ratio >= TARGET_RATIO else "misses"
    print(f"ratio on/off (median of rounds): {ratio:.3f}x ({verdict} the {TARGET_RATIO}x "
          "target)")


if __name__ == "__main__":
    main()
