"""GetDirtyLog of a 4 GiB slot with 1% of its pages dirtied by the guest, against the raw
KVM_GET_DIRTY_LOG ioctl plus one bare grpcio echo of the same answer bytes, in the same run.

Two VMs, each with one 4 GiB dirty-logged slot at guest address 0 (memfd-backed and sparse)
and the same real-mode guest ("unreal" ES with a 4 GiB limit): one pass stores a byte into
every 100th page (10480 pages, 1%), then halts. One VM belongs to an in-process kvmd reached
over a Unix socket (the guest is woken for each pass by InjectInterrupt); the other is made
directly with the binding (`kvmd.kvm`), its vCPU run to the HLT from Python. After every
pass, one call is timed: GetDirtyLog (form AUTO: the pages as ranges, being shorter than the
128 KiB bitmap here; also BITMAP), against the raw ioctl plus a bare grpcio unary echo of as
many bytes as GetDirtyLog's answer carried (the floor any gRPC answer pays here). Not a
test: it asserts nothing about speed.

    .venv/bin/python benchmarks/dirty_log.py [--passes N] [--slot-gib N]

Target (issue 11): GetDirtyLog within 1.5x of raw ioctl + echo. The harvest rates of the
manual-protect and ring modes beside the bitmap's: benchmarks/dirty_modes.py.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from rpc_latency import ECHO_METHOD, start_echo_server

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "state"))

from state_guests import assemble  # noqa: E402

from kvmd.kvm import HltExit, Kvm, Regs  # noqa: E402
from kvmd.server import Config, Daemon  # noqa: E402
from kvmd_proto import vmm_pb2 as pb  # noqa: E402
from kvmd_proto import vmm_pb2_grpc as rpc  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=15)
    parser.add_argument("--slot-gib", type=int, default=4)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    size = args.slot_gib * GiB
    pages = (size - FIRST) // (STRIDE_PAGES * PAGE) - 1
    code = guest(pages)

    with tempfile.TemporaryDirectory(prefix="kvmd-bench-") as tmp, Kvm() as kvm:
        address = f"unix://{tmp}/kvmd.sock"
        daemon = Daemon(Config(listen=[address], log_level="warning",
                               max_memory_per_vm_bytes=2 * size,
                               max_memory_total_bytes=3 * size))
        daemon.start()
        echo_server = start_echo_server(f"unix://{tmp}/echo.sock")
        options = [("grpc.max_receive_message_length", 16 << 20)]
        echo_channel = grpc.insecure_channel(f"unix://{tmp}/echo.sock", options=options)
        channel = grpc.insecure_channel(address, options=options)
        raw_vm = kvm.create_vm()
        try:
            vms, memory, vcpus = (rpc.VmsStub(channel), rpc.MemoryStub(channel),
                                  rpc.VcpusStub(channel))
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

            def get_dirty_log(form: int) -> Callable[[], int]:
                request = pb.GetDirtyLogRequest(vm_id="dirty", slot=region.slot, form=form)

                def call() -> int:
                    return sum(len(c.SerializeToString())
                               for c in memory.GetDirtyLog(request))
                return call

            echo = echo_channel.unary_unary(ECHO_METHOD)
            timings: dict[str, list[float]] = {"auto": [], "bitmap": [], "raw": [],
                                               "echo": []}
            answers: dict[str, int] = {}
            n = 0
            for form, name in ((pb.GetDirtyLogRequest.AUTO, "auto"),
                               (pb.GetDirtyLogRequest.BITMAP, "bitmap")):
                call = get_dirty_log(form)
                for _ in range(args.passes):
                    daemon_pass(n)
                    n += 1
                    started = time.perf_counter()
                    answers[name] = call()
                    timings[name].append(time.perf_counter() - started)
            for _ in range(args.passes):
                raw_pass()
                started = time.perf_counter()
                bitmap = raw_vm.get_dirty_log(raw_slot)
                timings["raw"].append(time.perf_counter() - started)
            dirty = sum(bin(b).count("1") for b in bitmap)
            payload = bytes(answers["auto"])
            for _ in range(args.passes):
                started = time.perf_counter()
                echo(payload)
                timings["echo"].append(time.perf_counter() - started)
        finally:
            echo_channel.close()
            echo_server.stop(None)
            channel.close()
            daemon.stop()
            raw_vm.close()

    med = {k: statistics.median(v) for k, v in timings.items()}
    floor = med["raw"] + med["echo"]
    print(f"GetDirtyLog of a {args.slot_gib} GiB slot ({size // PAGE} pages) after the guest "
          f"dirtied {dirty} of them ({100 * dirty / (size // PAGE):.2f}%), median of "
          f"{args.passes} passes each")
    print(f"  raw KVM_GET_DIRTY_LOG (binding)      {med['raw'] * 1e3:8.2f} ms")
    print(f"  bare grpcio echo of {answers['auto']:>7} bytes   {med['echo'] * 1e3:8.2f} ms")
    print(f"  reference: raw + echo                {floor * 1e3:8.2f} ms")
    for name in ("auto", "bitmap"):
        ratio = med[name] / floor
        print(f"  GetDirtyLog {name:<6} ({answers[name]:>7} bytes) {med[name] * 1e3:8.2f} ms "
              f"= {ratio:.2f}x ({'within' if ratio <= TARGET_RATIO else 'OUTSIDE'} the "
              f"{TARGET_RATIO}x target)")


if __name__ == "__main__":
    main()
