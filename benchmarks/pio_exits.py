"""Port-IO exits per second: a C KVM_RUN loop against the same guest driven by `Vcpu.run()`.

The guest is a real-mode `out dx, al; jmp` loop, so every iteration is one KVM_EXIT_IO.
The C reference (benchmarks/c/pio_loop.c, compiled here with gcc into benchmarks/.build/)
and the Python binding each run it for a fixed number of exits after a short warm-up, in
alternating rounds on the same machine; the script prints both rates and their ratio. Not a
test: it asserts nothing about speed.

    .venv/bin/python benchmarks/pio_exits.py [--exits N] [--warmup N] [--rounds N]

On these hosts (/dev/kvm is PVM nested virtualization) an exit costs several microseconds
in C, so the Python overhead shows as a ratio; on bare-metal KVM exits are ~1 us and the
ratio grows accordingly.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "c", "pio_loop.c")
BUILD_DIR = os.path.join(HERE, ".build")
BINARY = os.path.join(BUILD_DIR, "pio_loop")

CODE_ADDR = 0x1000
MEM_SIZE = 0x10000
PORT = 0xE9
# The guest, at CODE_ADDR in real mode (CS base 0):
GUEST = bytes([
    0xBA, PORT, 0x00,   # mov dx, PORT
    0xB0, 0x2A,         # mov al, 0x2a
    0xEE,               # loop: out dx, al
    0xEB, 0xFD,         #       jmp loop
])


def build_reference() -> str:
    """Compile the C reference unless an up-to-date binary exists."""
    if os.path.exists(BINARY) and os.path.getmtime(BINARY) >= os.path.getmtime(SOURCE):
        return BINARY
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        sys.exit("pio_exits: no C compiler (gcc) found to build the reference")
    os.makedirs(BUILD_DIR, exist_ok=True)
    subprocess.run([cc, "-O2", "-Wall", "-Werror", "-o", BINARY, SOURCE], check=True)
    return BINARY


def run_reference(exits: int, warmup: int) -> tuple[float, float]:
    """(seconds, exits per second) of the C loop."""
    out = subprocess.run(
        [build_reference(), str(exits), str(warmup), GUEST.hex(), hex(PORT)],
        check=True, capture_output=True, text=True,
    ).stdout
    m = re.search(r"seconds=([\d.]+) exits_per_second=(\d+)", out)
    if m is None:
        sys.exit(f"pio_exits: unexpected output from {BINARY}: {out!r}")
    return float(m.group(1)), float(m.group(2))


def run_python(exits: int, warmup: int) -> tuple[float, float]:
    """(seconds, exits per second) of the same loop through kvmd.kvm's `Vcpu.run()`."""
    from kvmd.kvm import IoExit, Kvm, Regs

    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory_region(0, MEM_SIZE)
        vm.write(CODE_ADDR, GUEST)
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        vcpu.set_sregs(sregs)
        vcpu.set_regs(Regs(rip=CODE_ADDR, rsp=0x8000, rflags=2))
        run = vcpu.run
        checksum = 0
        for _ in range(warmup):
            ex = run()
            checksum += ex.data[0]  # type: ignore[attr-defined]
        start = time.perf_counter()
        for _ in range(exits):
            ex = run()
            if type(ex) is not IoExit or ex.port != PORT or not ex.is_write:
                sys.exit(f"pio_exits: unexpected exit {ex!r}")
            checksum += ex.data[0]
        seconds = time.perf_counter() - start
    return seconds, exits / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exits", type=int, default=200_000, help="timed exits per run")
    parser.add_argument("--warmup", type=int, default=2_000, help="untimed exits first")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating C/Python rounds; the best round of each counts")
    args = parser.parse_args()

    c_runs, py_runs = [], []
    for _ in range(args.rounds):
        c_runs.append(run_reference(args.exits, args.warmup)[0])
        py_runs.append(run_python(args.exits, args.warmup)[0])
    # The fastest round of each is the least disturbed by anything else on the machine.
    c_seconds, py_seconds = min(c_runs), min(py_runs)
    c_rate, py_rate = args.exits / c_seconds, args.exits / py_seconds
    print(f"guest: real-mode `out dx, al; jmp` loop; {args.exits} exits per run after "
          f"{args.warmup} warm-up exits; best of {args.rounds} alternating rounds")
    for label, seconds, rate in (("C KVM_RUN loop:", c_seconds, c_rate),
                                 ("Python Vcpu.run:", py_seconds, py_rate)):
        print(f"{label:18s}{rate:12,.0f} exits/s  {seconds / args.exits * 1e6:7.2f} us/exit")
    print(f"ratio python/C (time per exit): {py_seconds / c_seconds:.2f}x  "
          f"(Python reaches {py_rate / c_rate:.0%} of C's exit rate)")


if __name__ == "__main__":
    main()
