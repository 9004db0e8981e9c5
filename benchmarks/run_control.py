"""Run-control benchmarks for kvmd (issue 4), each against a reference measured in this run.

    .venv/bin/python benchmarks/run_control.py [--seconds S] [--rounds N] [--quick]

1. In-daemon handled PIO exits: one VM, one vCPU looping `out 0x80, al; jmp` on an
   unclaimed port (completed in C by the daemon's run loop and counted); exits/s from
   GetExitStats over a fixed interval, vs the C KVM_RUN loop (benchmarks/c/pio_loop.c) on
   the same guest. For information: the same loop on the UART (every exit handled in
   Python).
2. Two VMs at once: aggregate exits/s vs two C loops at once.
3. Remote-handled exit round trip over the Unix socket: a guest loops OUT on a claimed port
   and this script answers on HandleExits; time from sending a reply to receiving the next
   exit, vs a bare grpcio bidirectional ping-pong (generic handler, raw bytes) on another
   Unix socket, with the same client code.
4. Pause latency against a spinning guest (`jmp $`): PauseVm round trip over ~100
   pause/resume cycles.

The daemon and the ping-pong server each run as a separate process (as in production).
Not a test: nothing here asserts on speed; it prints the numbers and their ratios. Targets
(issues 4 and 12): (1) >= 0.90x, UART >= 0.90x, (2) >= 0.85x, (3) p50 <= 1.2x,
(4) p99 < 5 ms.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench_support import kvmd_command  # noqa: E402

from kvmd_proto import vmm_pb2 as pb  # noqa: E402
from kvmd_proto import vmm_pb2_grpc as rpc  # noqa: E402

C_SOURCE = os.path.join(HERE, "c", "pio_loop.c")
BUILD_DIR = os.path.join(HERE, ".build")
C_BINARY = os.path.join(BUILD_DIR, "pio_loop_run_control")

CODE_ADDR = 0x1000
PIO_PORT = 0x80       # unclaimed: the daemon completes these exits in C
CLAIM_PORT = 0x300    # claimed by this script for the remote round trip
UART_PORT = 0x3F8

# Real-mode guests at CODE_ADDR (CS base 0).
PIO_LOOP = bytes([
    0xB0, 0x2A,         # mov al, 0x2a
    0xE6, PIO_PORT,     # loop: out 0x80, al
    0xEB, 0xFC,         #       jmp loop
])
UART_LOOP = bytes([
    0xBA, 0xF8, 0x03,   # mov dx, 0x3f8
    0xB0, 0x2E,         # mov al, '.'
    0xEE,               # loop: out dx, al
    0xEB, 0xFD,         #       jmp loop
])
CLAIMED_LOOP = bytes([
    0xBA, 0x00, 0x03,   # mov dx, 0x300
    0xB0, 0x2A,         # mov al, 0x2a
    0xEE,               # loop: out dx, al
    0xEB, 0xFD,         #       jmp loop
])
SPIN = bytes([
    0xEB, 0xFE,         # jmp $
])

ECHO_METHOD = "/bench.Echo/PingPong"


# -- helpers ------------------------------------------------------------------------------

def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def build_reference() -> str:
    """Compile helper A's C reference (read-only) into benchmarks/.build/."""
    if not os.path.exists(C_SOURCE):
        sys.exit(f"run_control: {C_SOURCE} is missing (the C reference loop)")
    if os.path.exists(C_BINARY) and os.path.getmtime(C_BINARY) >= os.path.getmtime(C_SOURCE):
        return C_BINARY
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        sys.exit("run_control: no C compiler found to build the reference loop")
    os.makedirs(BUILD_DIR, exist_ok=True)
    subprocess.run([cc, "-O2", "-Wall", "-o", C_BINARY, C_SOURCE], check=True)
    return C_BINARY


# The C loops run at the daemon's vCPU nice value (vcpu_nice, default 10), so both compete
# alike with whatever else the host runs: the rows compare exit paths, not priorities.
REFERENCE_NICE = [10]


def c_loop_start(exits: int) -> subprocess.Popen[str]:
    # `nice` (coreutils), not a preexec_fn: this process has gRPC threads.
    prefix = ["nice", "-n", str(REFERENCE_NICE[0])] if REFERENCE_NICE[0] else []
    return subprocess.Popen([*prefix, build_reference(), str(exits), "20000", PIO_LOOP.hex(),
                             hex(PIO_PORT)], stdout=subprocess.PIPE, text=True)


def c_loop_finish(proc: subprocess.Popen[str]) -> float:
    out, _ = proc.communicate(timeout=120)
    m = re.search(r"exits_per_second=(\d+)", out)
    if proc.returncode != 0 or m is None:
        sys.exit(f"run_control: the C reference failed: {out!r}")
    return float(m.group(1))


def c_rates(copies: int, exits: int) -> list[float]:
    """Run `copies` C loops at once; each one's exits/s."""
    procs = [c_loop_start(exits) for _ in range(copies)]
    return [c_loop_finish(p) for p in procs]


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    address: str
    channel: grpc.Channel
    vms: rpc.VmsStub
    vcpus: rpc.VcpusStub
    memory: rpc.MemoryStub
    exits: rpc.ExitHandlersStub

    @classmethod
    def start(cls, sock: str) -> Daemon:
        address = f"unix://{sock}"
        proc = subprocess.Popen(kvmd_command(address))
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("run_control: the daemon did not start")
            time.sleep(0.05)
        channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(channel).result(timeout=20)
        return cls(proc, address, channel, rpc.VmsStub(channel), rpc.VcpusStub(channel),
                   rpc.MemoryStub(channel), rpc.ExitHandlersStub(channel))

    def stop(self) -> None:
        self.channel.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def boot(self, vm_id: str, code: bytes) -> None:
        """A real-mode VM: 64 KiB of RAM at 0, `code` at CODE_ADDR, vCPU 0 there."""
        self.vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id), timeout=10)
        self.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
            vm_id=vm_id, guest_addr=0, size=0x10000), timeout=10)
        self.memory.WriteGuestMemory(iter([pb.WriteGuestMemoryRequest(
            vm_id=vm_id, guest_addr=CODE_ADDR, data=code)]), timeout=10)
        self.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=0), timeout=10)
        ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=0)
        sregs = self.vcpus.GetSregs(ref, timeout=10)
        sregs.cs.base, sregs.cs.selector = 0, 0
        self.vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref, sregs=sregs), timeout=10)
        self.vcpus.SetRegs(pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(
            rip=CODE_ADDR, rsp=0x8000, rflags=2)), timeout=10)

    def io_out(self, vm_id: str) -> int:
        return int(self.vms.GetExitStats(pb.VmRef(vm_id=vm_id), timeout=10).total["io_out"])

    def delete(self, vm_id: str) -> None:
        self.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id), timeout=30)


def daemon_rates(d: Daemon, vm_ids: list[str], seconds: float) -> list[float]:
    """Exits/s of each (already running) VM over the same interval, from GetExitStats."""
    time.sleep(0.3)  # warm-up
    before = [d.io_out(v) for v in vm_ids]
    t0 = time.perf_counter()
    time.sleep(seconds)
    after = [d.io_out(v) for v in vm_ids]
    elapsed = time.perf_counter() - t0
    return [(a - b) / elapsed for a, b in zip(after, before, strict=True)]


def run_vms(d: Daemon, code: bytes, count: int, seconds: float, tag: str) -> list[float]:
    ids = [f"{tag}-{i}" for i in range(count)]
    for vm_id in ids:
        d.boot(vm_id, code)
    for vm_id in ids:
        d.vms.StartVm(pb.VmRef(vm_id=vm_id), timeout=10)
    try:
        return daemon_rates(d, ids, seconds)
    finally:
        for vm_id in ids:
            d.delete(vm_id)


# -- bidirectional streams, client side (the same code for both round trips) -------------

class Stream:
    """A bidi call fed from a queue, its responses read on the calling thread."""

    def __init__(self, start: Callable[[Iterator[Any]], Any], first: Any) -> None:
        self._out: queue.Queue[Any] = queue.Queue()
        self._out.put(first)
        self.call = start(self._requests())
        self.responses = iter(self.call)

    def _requests(self) -> Iterator[Any]:
        while True:
            msg = self._out.get()
            if msg is None:
                return
            yield msg

    def send(self, msg: Any) -> None:
        self._out.put(msg)

    def close(self) -> None:
        self._out.put(None)
        self.call.cancel()


def remote_round_trips(d: Daemon, n: int) -> list[float]:
    """Seconds from sending each reply to receiving the next exit (n samples)."""
    d.boot("remote", CLAIMED_LOOP)
    stream = Stream(d.exits.HandleExits, pb.ExitHandlerMessage(claim=pb.ClaimRequest(
        vm_id="remote", ranges=[pb.AddressRange(space=pb.PIO, base=CLAIM_PORT, length=1)],
        deadline_ms=5000)))
    first = next(stream.responses)
    assert first.WhichOneof("event") == "claimed", first
    d.vms.StartVm(pb.VmRef(vm_id="remote"), timeout=10)
    samples: list[float] = []
    warmup = 200
    event = next(stream.responses)
    for i in range(n + warmup):
        sent = time.perf_counter()
        stream.send(pb.ExitHandlerMessage(reply=pb.ExitReply(exit_id=event.exit.exit_id)))
        event = next(stream.responses)
        if i >= warmup:
            samples.append(time.perf_counter() - sent)
    stream.close()
    d.delete("remote")
    return samples


def echo_server_main(sock: str) -> None:
    """The bare grpcio ping-pong server (run in its own process)."""
    def ping_pong(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        yield from requests

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Echo", {"PingPong": grpc.stream_stream_rpc_method_handler(ping_pong)})])
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    server.wait_for_termination()


def ping_pong_round_trips(sock: str, n: int) -> list[float]:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--echo-server", sock])
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("run_control: the echo server did not start")
            time.sleep(0.05)
        channel = grpc.insecure_channel(f"unix://{sock}")
        grpc.channel_ready_future(channel).result(timeout=20)
        start = channel.stream_stream(ECHO_METHOD, request_serializer=None,
                                      response_deserializer=None)  # raw bytes both ways
        payload = b"x" * 32  # about the size of an ExitRequest
        stream = Stream(start, payload)
        next(stream.responses)
        samples: list[float] = []
        warmup = 200
        for i in range(n + warmup):
            sent = time.perf_counter()
            stream.send(payload)
            next(stream.responses)
            if i >= warmup:
                samples.append(time.perf_counter() - sent)
        stream.close()
        channel.close()
        return samples
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def pause_latencies(d: Daemon, cycles: int) -> list[float]:
    d.boot("spin", SPIN)
    d.vms.StartVm(pb.VmRef(vm_id="spin"), timeout=10)
    ref = pb.VmRef(vm_id="spin")
    samples: list[float] = []
    time.sleep(0.05)
    for _ in range(cycles):
        t0 = time.perf_counter()
        vm = d.vms.PauseVm(ref, timeout=30)
        samples.append(time.perf_counter() - t0)
        assert vm.state == "paused", vm.state
        d.vms.ResumeVm(ref, timeout=10)
        time.sleep(0.005)  # let the guest spin again
    d.delete("spin")
    return samples


def ratios(ours: list[float], reference: list[float]) -> str:
    """best/best, and the median of the per-round ratios (each round ran back to back)."""
    per_round = [o / r for o, r in zip(ours, reference, strict=True)]
    return f"{max(ours) / max(reference):.2f}x (rounds median {statistics.median(per_round):.2f}x)"


# -- main --------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="measurement interval of each exit-rate run")
    parser.add_argument("--rounds", type=int, default=4,
                        help="alternating reference/daemon rounds; the best of each counts")
    parser.add_argument("--round-trips", type=int, default=3000)
    parser.add_argument("--pause-cycles", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--reference-nice", type=int, default=10,
                        help="nice value of the C loops: the daemon's vcpu_nice (0 for a "
                             "daemon without it)")
    parser.add_argument("--echo-server", metavar="SOCK", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        echo_server_main(args.echo_server)
        return
    if args.quick:
        args.seconds, args.rounds, args.round_trips, args.pause_cycles = 0.5, 1, 300, 20
    REFERENCE_NICE[0] = args.reference_nice

    build_reference()
    tmp = tempfile.mkdtemp(prefix="kvmd-bench-")
    d = Daemon.start(os.path.join(tmp, "kvmd.sock"))
    # The C loop does a fixed number of exits: size it to about --seconds at 7.5 us/exit.
    c_exits = int(args.seconds / 7.5e-6)
    rows: list[tuple[str, str, str, str, str]] = []
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"kvmd run-control benchmark: {os.cpu_count()} CPUs (load average {load}); "
              f"best of {args.rounds} alternating rounds of {args.seconds:g} s", flush=True)

        # 1. One VM, in-daemon (C path) PIO exits vs the C reference.
        c1: list[float] = []
        d1: list[float] = []
        for _ in range(args.rounds):
            c1.append(c_rates(1, c_exits)[0])
            d1.append(run_vms(d, PIO_LOOP, 1, args.seconds, "pio")[0])
        best_c1, best_d1 = max(c1), max(d1)
        rows.append(("1 in-daemon PIO exits, 1 VM", f"{best_d1:,.0f} exits/s",
                     f"{best_c1:,.0f} exits/s (C loop)", ratios(d1, c1), ">= 0.90x"))
        cu: list[float] = []
        du: list[float] = []
        for _ in range(args.rounds):
            cu.append(c_rates(1, c_exits)[0])
            du.append(run_vms(d, UART_LOOP, 1, args.seconds, "uart")[0])
        rows.append(("1 UART (COM1) output exits, 1 VM", f"{max(du):,.0f} exits/s",
                     f"{max(cu):,.0f} exits/s (C loop)", ratios(du, cu), ">= 0.90x"))

        # 2. Two VMs at once vs two C loops at once.
        c2: list[float] = []
        d2: list[float] = []
        for _ in range(args.rounds):
            c2.append(sum(c_rates(2, c_exits)))
            d2.append(sum(run_vms(d, PIO_LOOP, 2, args.seconds, "pio2")))
        best_c2, best_d2 = max(c2), max(d2)
        rows.append(("2 two VMs at once, aggregate", f"{best_d2:,.0f} exits/s",
                     f"{best_c2:,.0f} exits/s (2 C loops)", ratios(d2, c2), ">= 0.85x"))

        # 3. Remote-handled exit round trip vs a bare grpcio ping-pong.
        # Alternating rounds; each round's p50 (and p99) counts.
        remote: list[float] = []
        echo: list[float] = []
        rr50, ee50, rr99, ee99 = [], [], [], []
        per_round = max(100, args.round_trips // args.rounds)
        for i in range(args.rounds):
            r = remote_round_trips(d, per_round)
            e = ping_pong_round_trips(os.path.join(tmp, f"echo{i}.sock"), per_round)
            remote += r
            echo += e
            rr50.append(percentile(r, 50))
            ee50.append(percentile(e, 50))
            rr99.append(percentile(r, 99))
            ee99.append(percentile(e, 99))
        r50, e50 = statistics.median(rr50) * 1e6, statistics.median(ee50) * 1e6
        r99, e99 = statistics.median(rr99) * 1e6, statistics.median(ee99) * 1e6
        per_ratio = [a / b for a, b in zip(rr50, ee50, strict=True)]
        rows.append(("3 remote exit round trip p50", f"{r50:,.0f} us", f"{e50:,.0f} us "
                     "(grpc ping-pong)", f"{statistics.median(per_ratio):.2f}x "
                     f"({min(per_ratio):.2f}-{max(per_ratio):.2f})", "<= 1.2x"))
        rows.append(("  remote exit round trip p99", f"{r99:,.0f} us",
                     f"{e99:,.0f} us (grpc ping-pong)", f"{r99 / e99:.2f}x", "-"))

        # 4. Pause latency against a spinning guest.
        pauses = pause_latencies(d, args.pause_cycles)
        p50, p99 = percentile(pauses, 50) * 1e3, percentile(pauses, 99) * 1e3
        rows.append(("4 PauseVm round trip p50", f"{p50:.2f} ms", "-", "-", "-"))
        rows.append((f"  PauseVm round trip p99 ({len(pauses)} cycles)", f"{p99:.2f} ms",
                     "5 ms (target)", f"{p99 / 5:.2f}x", "< 5 ms"))
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    header = ("benchmark", "kvmd", "reference (same run)", "ratio", "target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print()
    print("rounds: C 1 loop " + ", ".join(f"{r:,.0f}" for r in c1)
          + " | daemon 1 VM " + ", ".join(f"{r:,.0f}" for r in d1))
    print("rounds: C 1 loop " + ", ".join(f"{r:,.0f}" for r in cu)
          + " | daemon UART " + ", ".join(f"{r:,.0f}" for r in du))
    print("rounds: C 2 loops " + ", ".join(f"{r:,.0f}" for r in c2)
          + " | daemon 2 VMs " + ", ".join(f"{r:,.0f}" for r in d2))
    print(f"remote exit round trip: mean {statistics.mean(remote) * 1e6:,.0f} us over "
          f"{len(remote)}; ping-pong mean {statistics.mean(echo) * 1e6:,.0f} us")


if __name__ == "__main__":
    main()
