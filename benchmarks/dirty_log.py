"""GetDirtyLog of a 4 GiB slot with 1% of its pages dirtied by the guest, against the raw
KVM_GET_DIRTY_LOG ioctl plus one bare grpcio echo of the same answer bytes, in the same run.

Two VMs, each with one 4 GiB dirty-logged slot at guest address 0 (memfd-backed and sparse)
and the same real-mode guest ("unreal" ES with a 4 GiB limit): one pass stores a byte into
every 100th page (10480 pages, 1%), then halts. One VM belongs to kvmd, run as its own
process (as in production) and reached over a Unix socket (the guest is woken for each pass
by InjectInterrupt); the other is made directly with the binding (`kvmd.kvm`), its vCPU run
to the HLT from this process. After every pass, one call is timed: GetDirtyLog (form AUTO:
the pages as ranges, being shorter than the 128 KiB bitmap here; also BITMAP), against the
raw ioctl plus a bare grpcio unary echo of as many bytes as GetDirtyLog's answer carried
(the floor any gRPC answer pays here), served by the other benchmarks' bare grpcio server,
in its own process too. Not a test: it asserts nothing about speed.

    .venv/bin/python benchmarks/dirty_log.py [--passes N] [--slot-gib N]

Target (issue 11): GetDirtyLog within 1.5x of raw ioctl + echo. The harvest rates of the
manual-protect and ring modes beside the bitmap's: benchmarks/dirty_modes.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_support import EchoServer, Kvmd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "state"))

from state_guests import assemble  # noqa: E402

from kvmd.kvm import HltExit, Kvm, Regs  # noqa: E402
from kvmd_proto import vmm_pb2 as pb  # noqa: E402

GiB = 1 << 30
PAGE = 4096
STRIDE_PAGES = 100       # 1% of the pages
FIRST = 1 << 20          # above the code, stack and IVT
TARGET_RATIO = 1.5
CODE_ADDR, CODE_SEGMENT, VECTOR = 0x1000, 0x100, 0x20

GUEST = r"""
    .code16
start:
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0xF000, %sp
    movw $handler, 0x80         # IVT entry 0x20: wake-up only
    movw $0x100, 0x82
again:
    mov $FIRST, %edi
    mov $PAGES, %ecx
1:  addr32 movb $1, %es:(%edi)
    add $STRIDE, %edi
    dec %ecx
    jnz 1b
    incl 0x2000                 # passes done
    sti
    hlt
    cli
    jmp again
handler:
    iret
"""


def guest(pages: int) -> bytes:
    src = GUEST.replace("FIRST", str(FIRST)).replace("PAGES", str(pages)) \
        .replace("STRIDE", str(STRIDE_PAGES * PAGE))
    return assemble(src)


# The timed calls: the streamed GetDirtyLog and the unary PollDirtyLog, each in the AUTO
# form (runs here) and as a bitmap.
CALLS = ("GetDirtyLog auto", "GetDirtyLog bitmap", "PollDirtyLog auto", "PollDirtyLog bitmap")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=15, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slot-gib", type=int, default=4)
    args = parser.parse_args()
    size = args.slot_gib * GiB
    pages = (size - FIRST) // (STRIDE_PAGES * PAGE) - 1
    code = guest(pages)

    with tempfile.TemporaryDirectory(prefix="kvmd-bench-") as tmp, Kvm() as kvm, \
            kvm.create_vm() as raw_vm:
        daemon = Kvmd.start(os.path.join(tmp, "kvmd.sock"))
        echo_server: EchoServer | None = None
        try:
            echo_server = EchoServer(os.path.join(tmp, "echo.sock"))
            vms, memory, vcpus = daemon.vms, daemon.memory, daemon.vcpus
            vms.CreateVm(pb.CreateVmRequest(vm_id="dirty"))
            region = memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
                vm_id="dirty", guest_addr=0, size=size, log_dirty=True))
            memory.WriteGuestMemory(iter([pb.WriteGuestMemoryRequest(
                vm_id="dirty", guest_addr=CODE_ADDR, data=code)]))
            ref = pb.VcpuRef(vm_id="dirty", vcpu_id=0)
            vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id="dirty", vcpu_id=0))
            sregs = vcpus.GetSregs(ref)
            sregs.cs.base, sregs.cs.selector = CODE_ADDR, CODE_SEGMENT
            sregs.es.limit, sregs.es.g = 0xFFFFFFFF, 1
            vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref, sregs=sregs))
            vcpus.SetRegs(pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(rip=0, rsp=0xF000,
                                                                   rflags=2)))

            raw_slot = raw_vm.add_memory_region(0, size, log_dirty=True)
            raw_vm.write(CODE_ADDR, code)
            raw_vcpu = raw_vm.create_vcpu(0)
            s = raw_vcpu.get_sregs()
            s.cs.base, s.cs.selector = CODE_ADDR, CODE_SEGMENT
            for name in ("ds", "ss", "es"):
                seg = getattr(s, name)
                seg.base, seg.selector = 0, 0
            s.es.limit, s.es.g = 0xFFFFFFFF, 1
            raw_vcpu.set_sregs(s)

            def counter() -> int:
                data = b"".join(c.data for c in memory.ReadGuestMemory(
                    pb.ReadGuestMemoryRequest(vm_id="dirty", guest_addr=0x2000, length=4)))
                return int.from_bytes(data, "little")

            def daemon_pass(n: int) -> None:
                if n == 0:
                    vms.StartVm(pb.VmRef(vm_id="dirty"))
                else:
                    vcpus.InjectInterrupt(pb.InjectInterruptRequest(vcpu=ref, vector=VECTOR))
                deadline = time.monotonic() + 120
                while counter() <= n:
                    if time.monotonic() > deadline:
                        raise SystemExit("the daemon's guest did not finish its pass")
                    time.sleep(0.002)
                while vcpus.GetVcpuState(ref).state != "halted":
                    time.sleep(0.001)

            def raw_pass() -> None:
                raw_vcpu.set_regs(Regs(rip=0, rsp=0xF000, rflags=2))
                while not isinstance(raw_vcpu.run(), HltExit):
                    pass

            # Each call returns its answer parsed, as a client gets it; its size (answer
            # bytes) is taken after the clock stops.
            def get_dirty_log(form: int) -> Callable[[], list[Any]]:
                request = pb.GetDirtyLogRequest(vm_id="dirty", slot=region.slot, form=form)
                return lambda: list(memory.GetDirtyLog(request))

            def poll_dirty_log(form: int) -> Callable[[], list[Any]]:
                request = pb.PollDirtyLogRequest(vm_id="dirty", slot=region.slot, form=form)
                return lambda: [memory.PollDirtyLog(request).log]

            echo = echo_server.unary
            forms = dict(zip(CALLS, (
                get_dirty_log(pb.GetDirtyLogRequest.AUTO),
                get_dirty_log(pb.GetDirtyLogRequest.BITMAP),
                poll_dirty_log(pb.GetDirtyLogRequest.AUTO),
                poll_dirty_log(pb.GetDirtyLogRequest.BITMAP)), strict=True))
            answers: dict[str, int] = {}
            rounds: list[dict[str, float]] = []  # per round: the median of each quantity
            n = 0
            # Rounds of every quantity in turn, so that a slow stretch of a shared host
            # hits each alike; a round's ratios use that round's references.
            for _ in range(args.rounds):
                times: dict[str, list[float]] = {}
                for name, call in forms.items():
                    for _ in range(args.passes):
                        daemon_pass(n)
                        n += 1
                        started = time.perf_counter()
                        chunks = call()
                        times.setdefault(name, []).append(time.perf_counter() - started)
                        answers[name] = sum(c.ByteSize() for c in chunks)
                for _ in range(args.passes):
                    raw_pass()
                    started = time.perf_counter()
                    bitmap = raw_vm.get_dirty_log(raw_slot)
                    times.setdefault("raw", []).append(time.perf_counter() - started)
                for answer in sorted(set(answers.values())):
                    payload = bytes(answer)
                    for _ in range(args.passes):
                        started = time.perf_counter()
                        echo(payload)
                        times.setdefault(f"echo {answer}", []).append(
                            time.perf_counter() - started)
                rounds.append({k: statistics.median(v) for k, v in times.items()})
            dirty = sum(bin(b).count("1") for b in bitmap)
        finally:
            if echo_server is not None:
                echo_server.stop()
            daemon.stop()

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    print(f"GetDirtyLog / PollDirtyLog of a {args.slot_gib} GiB slot ({size // PAGE} pages) "
          f"after the guest dirtied {dirty} of them ({100 * dirty / (size // PAGE):.2f}%); "
          f"{args.rounds} rounds of {args.passes} passes of each, medians")
    print(f"  raw KVM_GET_DIRTY_LOG (binding)          {med('raw') * 1e3:8.2f} ms")
    for answer in sorted(set(answers.values())):
        echo_ms = med(f"echo {answer}") * 1e3
        print(f"  bare grpcio echo of {answer:>7} bytes       {echo_ms:8.2f} ms")
    for name in CALLS:
        ratios = [r[name] / (r["raw"] + r[f"echo {answers[name]}"]) for r in rounds]
        ratio = statistics.median(ratios)
        print(f"  {name:<19} ({answers[name]:>7} bytes) {med(name) * 1e3:6.2f} ms = {ratio:.2f}x "
              f"raw + echo of as many bytes (rounds {min(ratios):.2f}-{max(ratios):.2f}x; "
              f"{'within' if ratio <= TARGET_RATIO else 'OUTSIDE'} the {TARGET_RATIO}x target)")


if __name__ == "__main__":
    main()
