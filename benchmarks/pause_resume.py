"""Pause and resume of a running guest: kvmd's PauseVm+ResumeVm against QEMU's QMP
`stop`+`cont`, driven from this one Python process, in alternating rounds.

- kvmd: the daemon as its own process; a real-mode VM spinning on `jmp $`, paused and
  resumed over gRPC (Unix socket) with the generated stubs.
- QEMU (Debian `qemu-system-x86`): `-machine microvm -accel kvm -S` with a 64 KiB "BIOS"
  whose reset vector is `jmp $`, so its vCPU spins too, driven over QMP (JSON over a Unix
  socket) by a minimal synchronous client. Without QEMU, or when it cannot start with KVM
  here, the reference is reported unavailable.
- Many vCPUs: PauseVm (and the pair) on a VM of 64 spinning vCPUs, a GetVm 20 ms after
  each of its resumes (the 64 threads on their way back into the guest must not stall the
  API), and QEMU `stop`+`cont` with `-smp 64` for information (QEMU's application
  processors wait for a SIPI instead of spinning).

    .venv/bin/python benchmarks/pause_resume.py [--pairs N] [--rounds N] [--quick]

Target (issue 12): the pair's p50 within 1.2x of QEMU's. Not a test: nothing asserts speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

from bench_support import SPIN, Kvmd, load_average, percentile, spread

from kvmd_proto import vmm_pb2 as pb

TARGET = 1.2
MANY = 64


class Qmp:
    """QEMU with a spinning guest, and a blocking QMP client."""

    def __init__(self, tmp: str, cpus: int = 1) -> None:
        qemu = shutil.which("qemu-system-x86_64")
        if qemu is None:
            raise RuntimeError("qemu-system-x86_64 is not installed (Debian qemu-system-x86)")
        bios = os.path.join(tmp, "spin.rom")
        rom = bytearray(0x10000)
        rom[0xFFF0:0xFFF2] = SPIN  # the reset vector, at 0xfffffff0
        with open(bios, "wb") as f:
            f.write(rom)
        sock = os.path.join(tmp, f"qmp-{cpus}.sock")
        self.proc = subprocess.Popen(
            # arch-capabilities off: on some hosts (this one's nested PVM) KVM refuses the
            # MSR QEMU then writes (0x10a) and QEMU aborts; a spinning guest needs none.
            [qemu, "-machine", "microvm", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
             "-m", "16", "-smp", str(cpus), "-nodefaults", "-no-user-config", "-nographic",
             "-display", "none", "-bios", bios, "-S", "-qmp", f"unix:{sock},server=on,wait=off"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                self.proc.kill()
                raise RuntimeError(f"QEMU did not start: {err.strip()}")
            time.sleep(0.02)
        self.sock = socket.socket(socket.AF_UNIX)
        while True:  # the socket file appears (bind) just before QEMU listens
            try:
                self.sock.connect(sock)
                break
            except ConnectionRefusedError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"QEMU did not start: {err.strip()}") from None
                time.sleep(0.02)
        self.file = self.sock.makefile("rwb", buffering=0)
        self.file.readline()  # greeting
        self.command("qmp_capabilities")
        self.command("cont")
        if not self.command("query-status")["return"]["running"]:
            raise RuntimeError("QEMU's guest is not running")

    def command(self, name: str) -> dict:
        self.file.write(json.dumps({"execute": name}).encode() + b"\n")
        while True:  # skip asynchronous events (STOP, RESUME)
            reply = json.loads(self.file.readline())
            if "return" in reply or "error" in reply:
                if "error" in reply:
                    raise RuntimeError(f"QMP {name}: {reply['error']}")
                return reply

    def close(self) -> None:
        try:
            self.command("quit")
        except (OSError, RuntimeError, ValueError):
            pass
        self.sock.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def timed_pairs(pause: Callable[[], object], resume: Callable[[], object], n: int,
                settle: float, probe: Callable[[], object] | None = None,
                probes: list[float] | None = None) -> tuple[list[float], list[float]]:
    """(pair times, pause times) of n pause+resume pairs, `settle` seconds apart so the
    guest spins again before the next pause; with `probe`, it is timed after each settle
    (into `probes`): how soon the daemon answers again after a resume."""
    pairs, pauses = [], []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        pause()
        t1 = clock()
        resume()
        t2 = clock()
        pairs.append(t2 - t0)
        pauses.append(t1 - t0)
        if settle:
            time.sleep(settle)
        if probe is not None and probes is not None:
            t3 = clock()
            probe()
            probes.append(clock() - t3)
    return pairs, pauses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=100, help="pairs per round")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds")
    parser.add_argument("--many-pairs", type=int, default=20, help="pairs per round, 64 vCPUs")
    parser.add_argument("--settle", type=float, default=0.002,
                        help="seconds between pairs (the guest spins again)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and pairs")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.rounds, args.many_pairs = 50, 4, 10

    tmp = tempfile.mkdtemp(prefix="kvmd-bench-")
    d = Kvmd.start(os.path.join(tmp, "kvmd.sock"))
    qemu: Qmp | None = None
    qemu_many: Qmp | None = None
    why_no_qemu = ""
    try:
        try:
            qemu = Qmp(tmp)
        except (RuntimeError, OSError) as exc:
            why_no_qemu = str(exc)
        try:
            qemu_many = Qmp(tmp, MANY) if qemu is not None else None
        except (RuntimeError, OSError):
            qemu_many = None
        d.boot("spin", SPIN)
        d.boot("spin64", SPIN, vcpus=MANY)
        ref, ref64 = pb.VmRef(vm_id="spin"), pb.VmRef(vm_id="spin64")
        d.vms.StartVm(ref, timeout=30)
        d.vms.StartVm(ref64, timeout=30)
        d.vms.PauseVm(ref64, timeout=60)

        def k_pause(r: pb.VmRef = ref) -> None:
            d.vms.PauseVm(r, timeout=60)

        def k_resume(r: pb.VmRef = ref) -> None:
            d.vms.ResumeVm(r, timeout=60)

        # Warm-up.
        timed_pairs(k_pause, k_resume, 20, args.settle)
        if qemu is not None:
            timed_pairs(lambda: qemu.command("stop"), lambda: qemu.command("cont"), 20,
                        args.settle)

        k50, k99, kp99, q50, q99, ratios = [], [], [], [], [], []
        m50, mp50, mp99, qm50, g50, g99 = [], [], [], [], [], []
        get64 = pb.GetVmRequest(vm_id="spin64")
        # Only one guest spins at a time: each side's guest is paused outside its rounds.
        if qemu is not None:
            qemu.command("stop")
        if qemu_many is not None:
            qemu_many.command("stop")
        k_pause()
        for _ in range(args.rounds):
            k_resume()
            time.sleep(args.settle)
            pairs, pauses = timed_pairs(k_pause, k_resume, args.pairs, args.settle)
            k_pause()
            k50.append(percentile(pairs, 50))
            k99.append(percentile(pairs, 99))
            kp99.append(percentile(pauses, 99))
            if qemu is not None:
                qemu.command("cont")
                time.sleep(args.settle)
                qp, _ = timed_pairs(lambda: qemu.command("stop"), lambda: qemu.command("cont"),
                                    args.pairs, args.settle)
                qemu.command("stop")
                q50.append(percentile(qp, 50))
                q99.append(percentile(qp, 99))
                ratios.append(k50[-1] / q50[-1])
            # 64 vCPUs: resumed, given time to spin, then the timed pairs.
            d.vms.ResumeVm(ref64, timeout=60)
            time.sleep(0.05)
            gets: list[float] = []
            pairs, pauses = timed_pairs(lambda: k_pause(ref64), lambda: k_resume(ref64),
                                        args.many_pairs, 0.02,
                                        lambda: d.vms.GetVm(get64, timeout=60), gets)
            d.vms.PauseVm(ref64, timeout=60)
            g50.append(percentile(gets, 50))
            g99.append(percentile(gets, 99))
            m50.append(percentile(pairs, 50))
            mp50.append(percentile(pauses, 50))
            mp99.append(percentile(pauses, 99))
            if qemu_many is not None:
                qemu_many.command("cont")
                time.sleep(0.05)
                qp, _ = timed_pairs(lambda: qemu_many.command("stop"),
                                    lambda: qemu_many.command("cont"), args.many_pairs, 0.02)
                qemu_many.command("stop")
                qm50.append(percentile(qp, 50))
    finally:
        for q in (qemu, qemu_many):
            if q is not None:
                q.close()
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"pause/resume: {os.cpu_count()} CPUs (load average {load_average()}); "
          f"{args.rounds} alternating rounds of {args.pairs} pairs (64 vCPUs: "
          f"{args.many_pairs}); per-round p50, median (min-max), in us")
    rows = [
        ("PauseVm+ResumeVm pair, 1 spinning vCPU, p50", spread(k50, 1e6),
         spread(q50, 1e6) + " (QEMU stop+cont)" if q50 else "unavailable",
         spread(ratios, fmt="{:.2f}") + "x" if ratios else "-", f"<= {TARGET}x"),
        ("  the pair, p99", spread(k99, 1e6),
         spread(q99, 1e6) + " (QEMU)" if q99 else "-", "-", "-"),
        ("PauseVm on a spinning vCPU, p99", spread(kp99, 1e6), "-", "-", "< 5000 us"),
        (f"PauseVm, {MANY} spinning vCPUs, p50", spread(mp50, 1e6), "-", "-", "-"),
        (f"PauseVm, {MANY} spinning vCPUs, p99", spread(mp99, 1e6), "-", "-", "-"),
        (f"GetVm 20 ms after a ResumeVm, {MANY} vCPUs, p50", spread(g50, 1e6), "-", "-",
         "-"),
        (f"GetVm 20 ms after a ResumeVm, {MANY} vCPUs, p99", spread(g99, 1e6), "-", "-",
         "-"),
        (f"the pair, {MANY} vCPUs, p50", spread(m50, 1e6),
         spread(qm50, 1e6) + f" (QEMU -smp {MANY}, info)" if qm50 else "-",
         (f"{statistics.median(m50) / statistics.median(qm50):.2f}x" if qm50 else "-"), "-"),
    ]
    header = ("benchmark", "kvmd", "reference (same run)", "ratio (min-max)", "target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    if why_no_qemu:
        print(f"QEMU reference unavailable: {why_no_qemu}")


if __name__ == "__main__":
    main()
