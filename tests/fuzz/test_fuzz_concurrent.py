"""Concurrent random calls on a few shared VMs: run control (VM and vCPU), deletion and
re-creation, memory slots, registers and interrupts from many clients at once, on guests
that halt or spin. Nothing can be predicted about who wins, so only invariants are
checked: every call ends with a documented code (never UNKNOWN, INTERNAL, or a hang of 25 s), the
daemon stays healthy, and once the clients stop, GetInfo's counts equal what the List RPCs
show, no call or stream is left in the budgets, and deleting every VM ends every vCPU
thread.

Seeded per client, but thread timing makes every run different; CI runs it for
CI_SECONDS, `make soak` for KVMD_FUZZ_SOAK_FACTOR times as long.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from fuzz_support import (
    HALT_LOOP,
    PROFILE,
    SOAK_FACTOR,
    SPIN_LOOP,
    FuzzDaemon,
    fd_count,
)
from polling import wait_until

from kvmd_proto import vmm_pb2 as pb
from kvmd_proto import vmm_pb2_grpc as rpc

Code = grpc.StatusCode
CI_SECONDS = 15.0
SECONDS = CI_SECONDS * (SOAK_FACTOR if PROFILE == "soak" else 1)
CLIENTS = 8
VM_IDS = ["c0", "c1", "c2"]
CALL_TIMEOUT = 30.0
SLOW_CALL = 25.0  # a call slower than this is reported as a hang (stops wait 5 s a vCPU)
DOCUMENTED = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS,
              Code.FAILED_PRECONDITION, Code.ABORTED, Code.RESOURCE_EXHAUSTED}
LIMITS = dict(max_vms=6, max_vcpus_per_vm=4, max_memory_per_vm_bytes=1 << 20,
              max_memory_total_bytes=8 << 20, max_concurrent_rpcs=16,
              max_calls_per_identity=16, max_streams=64, max_streams_per_identity=64)
# Creation three times as likely as deletion, so the VMs exist most of the time.
OPS = ["create"] * 3 + ["delete", "start", "stop", "pause", "resume", "vstart", "vstop",
                        "vpause", "vresume", "getregs", "setregs", "addmem", "rmmem",
                        "inject", "getvm", "claim"]


class Chaos:
    """Counts and failures of every client's calls."""

    def __init__(self, fz: FuzzDaemon) -> None:
        self.fz = fz
        self.codes: Counter[str] = Counter()
        self.bad: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def client(self, seed: int) -> None:
        rnd = random.Random(seed)
        with grpc.insecure_channel(self.fz.address) as ch:
            stubs = (rpc.VmsStub(ch), rpc.VcpusStub(ch), rpc.MemoryStub(ch),
                     rpc.ExitHandlersStub(ch))
            while not self.stop.is_set():
                op, vm_id = rnd.choice(OPS), rnd.choice(VM_IDS)
                started = time.monotonic()
                try:
                    self.act(rnd, stubs, op, vm_id)
                    code, details = Code.OK, ""
                except grpc.RpcError as err:
                    code, details = err.code(), err.details()  # type: ignore[attr-defined]
                took = time.monotonic() - started
                with self.lock:
                    self.codes[f"{op} {code.name}"] += 1
                    if code not in DOCUMENTED or took > SLOW_CALL:
                        self.bad.append(f"{op} {vm_id}: {code.name} after {took:.1f} s: "
                                        f"{details}")

    @staticmethod
    def act(rnd: random.Random, stubs: tuple[rpc.VmsStub, rpc.VcpusStub, rpc.MemoryStub,
                                             rpc.ExitHandlersStub], op: str, vm_id: str
            ) -> None:
        vms, vcpus, memory, exits = stubs
        t = CALL_TIMEOUT
        ref = pb.VmRef(vm_id=vm_id)
        vref = pb.VcpuRef(vm_id=vm_id, vcpu_id=rnd.randrange(3))
        if op == "create":
            vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id, options=pb.VmOptions(
                irqchip=rnd.random() < 0.5)), timeout=t)
            memory.AddMemoryRegion(pb.AddMemoryRegionRequest(vm_id=vm_id, guest_addr=0,
                                                             size=0x10000), timeout=t)
            for addr, code in ((0x1000, HALT_LOOP), (0x1100, SPIN_LOOP)):
                memory.WriteGuestMemory(iter([pb.WriteGuestMemoryRequest(
                    vm_id=vm_id, guest_addr=addr, data=code)]), timeout=t)
            for i in range(rnd.randrange(1, 4)):
                vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=i), timeout=t)
                r = pb.VcpuRef(vm_id=vm_id, vcpu_id=i)
                sregs = vcpus.GetSregs(r, timeout=t)
                for name in ("cs", "ds", "es", "fs", "gs", "ss"):
                    getattr(sregs, name).base = 0
                    getattr(sregs, name).selector = 0
                vcpus.SetSregs(pb.SetSregsRequest(vcpu=r, sregs=sregs), timeout=t)
                vcpus.SetRegs(pb.SetRegsRequest(vcpu=r, regs=pb.Regs(
                    rip=rnd.choice([0x1000, 0x1000, 0x1100]), rflags=2)), timeout=t)
        elif op == "delete":
            vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id), timeout=t)
        elif op in ("start", "stop", "pause", "resume"):
            getattr(vms, f"{op.capitalize()}Vm")(ref, timeout=t)
        elif op in ("vstart", "vstop", "vpause", "vresume"):
            getattr(vcpus, f"{op[1:].capitalize()}Vcpu")(vref, timeout=t)
        elif op == "getregs":
            vcpus.GetRegs(vref, timeout=t)
        elif op == "setregs":
            vcpus.SetRegs(pb.SetRegsRequest(vcpu=vref, regs=pb.Regs(rip=0x1000, rflags=2)),
                          timeout=t)
        elif op == "addmem":
            memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
                vm_id=vm_id, guest_addr=0x20000, size=0x2000), timeout=t)
        elif op == "rmmem":
            memory.RemoveMemoryRegion(pb.RemoveMemoryRegionRequest(
                vm_id=vm_id, slot=rnd.choice([1, 1, 1, 0])), timeout=t)
        elif op == "inject":
            vcpus.InjectInterrupt(pb.InjectInterruptRequest(vcpu=vref, vector=0x20),
                                  timeout=t)
        elif op == "getvm":
            vms.GetVm(pb.GetVmRequest(vm_id=vm_id), timeout=t)
        elif op == "claim":  # claim a port for a moment, then go away (or cancel)
            call = exits.HandleExits(iter([pb.ExitHandlerMessage(claim=pb.ClaimRequest(
                vm_id=vm_id, ranges=[pb.AddressRange(space=pb.PIO, base=0x300,
                                                     length=4)]))]), timeout=t)
            if rnd.random() < 0.5:
                call.cancel()
            try:
                for _ in call:
                    pass
            except grpc.RpcError as err:
                if err.code() != Code.CANCELLED:  # type: ignore[attr-defined]
                    raise


@pytest.fixture
def chaos_daemon() -> Iterator[FuzzDaemon]:
    fz = FuzzDaemon.start(**LIMITS)
    try:
        yield fz
    finally:
        fz.stop()


def test_concurrent_random_calls_on_shared_vms(chaos_daemon: FuzzDaemon) -> None:
    fz = chaos_daemon
    fz.assert_healthy()  # the test's own channel is connected before the baseline
    baseline_fds = fd_count()
    chaos = Chaos(fz)
    threads = [threading.Thread(target=chaos.client, args=(seed,), daemon=True,
                                name=f"chaos-{seed}") for seed in range(CLIENTS)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        fz.assert_healthy()  # throughout, not only at the end
        time.sleep(0.5)
    chaos.stop.set()
    for th in threads:
        th.join(CALL_TIMEOUT * 2)
        assert not th.is_alive(), f"{th.name} is stuck"
    print(f"\nconcurrent: {sum(chaos.codes.values())} calls: "
          + ", ".join(f"{k} {n}" for k, n in sorted(chaos.codes.items())))
    assert not chaos.bad, "\n".join(chaos.bad[:20])

    fz.assert_healthy()
    fz.assert_accounted(fz.snapshot())
    fz.delete_all()
    wait_until(lambda: not [t for t in threading.enumerate()
                            if t.name.startswith("vcpu-") and t.is_alive()],
               10, "every vCPU thread to end")
    wait_until(lambda: fd_count() <= baseline_fds, 10,
               f"file descriptors back to {baseline_fds} (now {fd_count()})")
