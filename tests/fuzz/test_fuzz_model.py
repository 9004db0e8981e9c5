"""A model of the daemon, checked after every step of random rule sequences (hypothesis
RuleBasedStateMachine): VMs, memory slots (KVM's rules: page aligned, no overlaps, the
lowest free slot number reused first, and the daemon's limits; host writes and discards
of data slots, whose discard credits the budget's charge leaves out), irqfds, ioevents (KVM's
collision rule), remote exit claims (HandleExits streams kept open in the model) and vCPU
run states, with guests that halt or spin.

After every step GetVm, ListVms, ListMemoryRegions, ListIrqfds, ListIoevents, ListVcpus,
GetVcpuState and GetInfo's counts must equal the model (a vCPU's transient state, e.g.
running on its way to HLT, is waited for, with a bound), the daemon must be healthy, and the
claims it holds must be the model's.

Ids come from small pools that include absent ones, so NOT_FOUND, ALREADY_EXISTS and every
limit are reached; where several errors apply to one request, any of their codes is
accepted, but it must be an error, and nothing may change.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from fuzz_support import CALL_TIMEOUT, FuzzDaemon, fuzz_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from polling import wait_until

from kvmd_proto import vmm_pb2 as pb
from kvmd_proto import vmm_pb2_grpc as rpc

Code = grpc.StatusCode
OK = Code.OK
IA, NF, AE = Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS
FP, RE = Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED

PAGE = 0x1000
LIMITS = dict(max_vms=3, max_vcpus_per_vm=2, max_memory_per_vm_bytes=96 << 10,
              max_memory_total_bytes=160 << 10, max_memory_slots_per_vm=4,
              max_irqfds_per_vm=2, max_ioevents_per_vm=3, max_streams=64,
              max_streams_per_identity=32)
# CI: state-machine runs and steps per run; `make soak` multiplies the runs.
RUNS = 12
STEPS = 30

# Every VM the model creates gets a code slot first: 16 KiB at 0 with two programs.
CODE_SLOT_SIZE = 0x4000
HALT_ADDR, SPIN_ADDR = 0x1000, 0x1100
HALT_LOOP = bytes([0xFA, 0xF4, 0xEB, 0xFD])   # cli; hlt; jmp short -3 (back to hlt)
SPIN_LOOP = bytes([0xEB, 0xFE])               # jmp $

VM_IDS = ["m0", "m1", "m2", "m3"]
VCPU_IDS = [0, 1, 2]
SLOTS = [0, 1, 2, 3, 4, 5]
IRQFD_IDS = ["i0", "i1", "i2"]
IOEVENT_IDS = ["e0", "e1", "e2", "e3"]
REGION_ADDRS = [0x0, 0x2000, 0x4000, 0x4800, 0x5000, 0x6000, 0x8000, 0x10000, 0x14000,
                0x18000]
REGION_SIZES = [0, 0x1000, 0x1800, 0x2000, 0x4000, 0x8000, 0x10000, 0x20000]
GSIS = [3, 5, 9]
IOEVENT_ADDRS = [(pb.PIO, 0x600), (pb.PIO, 0x601), (pb.PIO, 0x604),
                 (pb.MMIO, 0xD0000000), (pb.MMIO, 0xD0000004)]
IOEVENT_LENGTHS = [0, 1, 2, 4, 8]
DATAMATCHES = [None, 0, 1, 0x100]
# (space, base, length): overlapping pairs, the UART's ports and the debug-exit port.
CLAIM_RANGES = [(pb.PIO, 0x300, 1), (pb.PIO, 0x300, 4), (pb.PIO, 0x302, 2),
                (pb.PIO, 0x3F8, 1), (pb.PIO, 0x501, 1), (pb.PIO, 0x700, 0x10),
                (pb.MMIO, 0xD0000000, 0x1000), (pb.MMIO, 0xD0000800, 0x1000),
                (pb.MMIO, 0xE0000000, 0x100)]
DEVICE_PORTS = [(0x3F8, 8), (0x501, 1)]  # COM1 UART, debug exit (default port)
STATE_WAIT = 10.0
# Rules name things by a small integer: below EXISTING, one that exists (when any does).
PICK = st.integers(0, 9)
EXISTING = 7
OUTCOMES: dict[str, int] = {}  # "rule CODE" -> count, printed at the end


# The states each run-control action accepts (start is handled on its own).
ALLOWED_FROM = {"pause": ("running", "halted"), "resume": ("paused", "halted"),
                "stop": ("created", "running", "halted", "paused", "crashed")}


def vm_state(vcpus: dict[int, Vcpu]) -> str:
    """A VM's state from its vCPUs' (proto: created, running, paused, stopped, crashed)."""
    states = {v.state for v in vcpus.values()}
    if not states:
        return "created"
    if "crashed" in states:
        return "crashed"
    if states & {"running", "halted"}:
        return "running"
    if "paused" in states:
        return "paused"
    if states == {"created"}:
        return "created"
    return "stopped"


@dataclass
class Vcpu:
    state: str = "created"
    program: str = "halt"  # where its RIP is: the halt loop or the spin loop
    prepared: bool = True  # real-mode registers set up on a code slot
    reason: str = ""


@dataclass
class Vm:
    irqchip: bool
    regions: dict[int, tuple[int, int, bool, bool]] = field(default_factory=dict)
    irqfds: dict[str, list[Any]] = field(default_factory=dict)  # id -> [gsi, resample, n]
    ioevents: dict[str, tuple[int, int, int, int | None]] = field(default_factory=dict)
    vcpus: dict[int, Vcpu] = field(default_factory=dict)
    code: bool = False
    # Data slots' pages the memfd holds (host writes; discards punch holes) and their
    # discard credits in pages, as MemoryBudget keeps them: only data slots of a VM with its
    # code slot are written or discarded, so the model knows every page the guest has.
    pages: dict[int, set[int]] = field(default_factory=dict)
    credit: dict[int, int] = field(default_factory=dict)

    @property
    def memory(self) -> int:
        return sum(r[1] for r in self.regions.values())

    @property
    def charged(self) -> int:
        """What the memory budget charges: the slots' sizes less their discard credits."""
        return self.memory - PAGE * sum(self.credit.values())

    def data_slots(self) -> list[int]:
        return sorted(s for s in self.regions if s) if self.code else []

    def touch(self, slot: int, pages: set[int]) -> None:
        """Pages allocated in a slot's memfd: its credit shrinks to what is still free."""
        held = self.pages.setdefault(slot, set())
        held |= pages
        free = self.regions[slot][1] // PAGE - len(held)
        self.credit[slot] = min(self.credit.get(slot, 0), free)

    def running_program(self, v: Vcpu) -> str:
        """The state a started or resumed vCPU settles in."""
        if v.program == "spin" or self.irqchip:
            return "running"  # spinning, or blocked in the kernel's own HLT
        return "halted"


class ClaimStream:
    """A HandleExits stream the model keeps open: sends the claim, reads events."""

    def __init__(self, channel: grpc.Channel, vm_id: str,
                 ranges: list[tuple[int, int, int]]) -> None:
        self._out: queue.Queue[pb.ExitHandlerMessage | None] = queue.Queue()
        self._out.put(pb.ExitHandlerMessage(claim=pb.ClaimRequest(vm_id=vm_id, ranges=[
            pb.AddressRange(space=s, base=b, length=n) for s, b, n in ranges])))
        self.call = rpc.ExitHandlersStub(channel).HandleExits(self._outgoing(), timeout=900)
        self.events: queue.Queue[pb.ExitHandlerEvent | None] = queue.Queue()
        self.ended = threading.Event()
        self.code: grpc.StatusCode | None = None
        self.vm_id = vm_id
        self.ranges = ranges
        self.handler_id = ""
        threading.Thread(target=self._read, daemon=True, name="model-claim").start()

    def _outgoing(self) -> Iterator[pb.ExitHandlerMessage]:
        while (msg := self._out.get()) is not None:
            yield msg

    def _read(self) -> None:
        code = OK
        try:
            for event in self.call:
                self.events.put(event)
        except grpc.RpcError as err:
            code = err.code()  # type: ignore[attr-defined]
        self.code = code
        self.ended.set()
        self.events.put(None)

    def first(self) -> grpc.StatusCode:
        """OK once claimed, else the stream's error code."""
        event = self.events.get(timeout=CALL_TIMEOUT)
        if event is None:
            assert self.code is not None and self.code != OK, "stream ended unclaimed"
            return self.code
        assert event.WhichOneof("event") == "claimed", event
        self.handler_id = event.claimed.handler_id
        return OK

    def close(self) -> grpc.StatusCode | None:
        """End our side; the daemon ends the stream (and frees the claims) first."""
        self._out.put(None)
        assert self.ended.wait(CALL_TIMEOUT), "HandleExits did not end after the client did"
        return self.code


def overlaps(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    return a[0] == b[0] and a[1] < b[1] + b[2] and b[1] < a[1] + a[2]


def ioevent_collides(a: tuple[int, int, int, int | None],
                     b: tuple[int, int, int, int | None]) -> bool:
    """KVM's ioeventfd_check_collision: same bus and address, and either length is 0, or
    the same length and either is a wildcard or the datamatches are equal."""
    (sa, aa, la, da), (sb, ab, lb, db) = a, b
    return sa == sb and aa == ab and (
        la == 0 or lb == 0 or (la == lb and (da is None or db is None or da == db)))


class DaemonModel(RuleBasedStateMachine):
    """Rules act on the daemon and on the model alike; invariants compare them."""

    fz: FuzzDaemon  # set by the test before the machine runs

    def __init__(self) -> None:
        super().__init__()
        self.vms: dict[str, Vm] = {}
        self.claims: list[ClaimStream] = []
        self.steps = 0

    # -- plumbing -------------------------------------------------------------------------

    @staticmethod
    def pick(choice: int, existing: list[Any], pool: list[Any]) -> Any:
        """Mostly something that exists (a choice below EXISTING), else anything from the
        pool (which may be absent)."""
        if existing and choice < EXISTING:
            return sorted(existing)[choice % len(existing)]
        return pool[choice % len(pool)]

    def pick_vm(self, choice: int) -> str:
        return str(self.pick(choice, list(self.vms), VM_IDS))

    @property
    def ch(self) -> grpc.Channel:
        return self.fz.channel

    def call(self, fn: Callable[..., Any], request: Any) -> tuple[grpc.StatusCode, Any]:
        try:
            return OK, fn(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as err:
            return err.code(), err  # type: ignore[attr-defined]

    def expect(self, code: grpc.StatusCode, errors: set[grpc.StatusCode], what: str,
               got: Any = None) -> bool:
        """With no applicable error the call must succeed; else fail with one of them.
        Returns True when it succeeded."""
        detail = got.details() if isinstance(got, grpc.RpcError) else ""
        key = f"{what.split()[0]} {code.name}"
        OUTCOMES[key] = OUTCOMES.get(key, 0) + 1
        if errors:
            assert code in errors, (f"{what}: expected one of "
                                    f"{sorted(c.name for c in errors)}, got {code.name} "
                                    f"{detail}")
            return False
        assert code == OK, f"{what}: expected OK, got {code.name}: {detail}"
        return True

    def total_memory(self) -> int:
        """GetInfo.memory_in_use_bytes: what the budget charges, discard credits left out."""
        return sum(vm.charged for vm in self.vms.values())

    def region_errors(self, vm: Vm, addr: int, size: int) -> set[grpc.StatusCode]:
        errors: set[grpc.StatusCode] = set()
        if size <= 0 or addr % PAGE:
            errors.add(IA)
        rounded = -(-size // PAGE) * PAGE
        if (len(vm.regions) >= LIMITS["max_memory_slots_per_vm"]
                or vm.memory + rounded > LIMITS["max_memory_per_vm_bytes"]
                or self.total_memory() + rounded > LIMITS["max_memory_total_bytes"]):
            errors.add(RE)
        if size > 0 and any(addr < a + s and a < addr + rounded
                            for a, s, _, _ in vm.regions.values()):
            errors.add(AE)
        return errors

    @staticmethod
    def lowest_free_slot(vm: Vm) -> int:
        return min(set(range(len(vm.regions) + 1)) - set(vm.regions))

    def vm_ref(self, vm_id: str) -> pb.VmRef:
        return pb.VmRef(vm_id=vm_id)

    @property
    def vms_stub(self) -> rpc.VmsStub:
        return rpc.VmsStub(self.ch)

    @property
    def vcpus_stub(self) -> rpc.VcpusStub:
        return rpc.VcpusStub(self.ch)

    @property
    def memory_stub(self) -> rpc.MemoryStub:
        return rpc.MemoryStub(self.ch)

    # -- VMs ------------------------------------------------------------------------------

    @initialize(irqchip=st.booleans(), vcpus=st.integers(1, 2))
    def two_vms(self, irqchip: bool, vcpus: int) -> None:
        """Start from two VMs (one with the in-kernel irqchip) with vCPUs, so most rules
        act on something that exists."""
        for index, chip in ((0, irqchip), (1, not irqchip)):
            self.create_vm(index, chip)
            for i in range(vcpus):
                self.create_vcpu(index, i)

    @rule(vm=PICK, irqchip=st.booleans())
    def create_vm(self, vm: int, irqchip: bool) -> None:
        vm_id = self.pick(vm, [], VM_IDS)
        errors = {AE} if vm_id in self.vms else set()
        if len(self.vms) >= LIMITS["max_vms"]:
            errors.add(RE)
        code, got = self.call(self.vms_stub.CreateVm, pb.CreateVmRequest(
            vm_id=vm_id, options=pb.VmOptions(irqchip=irqchip)))
        if not self.expect(code, errors, f"CreateVm {vm_id}", got):
            return
        vm = self.vms[vm_id] = Vm(irqchip)
        # The code slot, if the limits allow it.
        errors = self.region_errors(vm, 0, CODE_SLOT_SIZE)
        code, got = self.call(self.memory_stub.AddMemoryRegion, pb.AddMemoryRegionRequest(
            vm_id=vm_id, guest_addr=0, size=CODE_SLOT_SIZE))
        if self.expect(code, errors, "code slot", got):
            assert got.slot == 0, got
            vm.regions[0] = (0, CODE_SLOT_SIZE, False, False)
            for addr, program in ((HALT_ADDR, HALT_LOOP), (SPIN_ADDR, SPIN_LOOP)):
                self.memory_stub.WriteGuestMemory(iter([pb.WriteGuestMemoryRequest(
                    vm_id=vm_id, guest_addr=addr, data=program)]), timeout=CALL_TIMEOUT)
            vm.code = True

    @rule(vm=PICK)
    def delete_vm(self, vm: int) -> None:
        vm_id = self.pick_vm(vm)
        code, got = self.call(self.vms_stub.DeleteVm, pb.DeleteVmRequest(vm_id=vm_id))
        if self.expect(code, set() if vm_id in self.vms else {NF}, f"DeleteVm {vm_id}", got):
            del self.vms[vm_id]
            # Its claims died with it: their streams end.
            for c in [c for c in self.claims if c.vm_id == vm_id]:
                assert c.ended.wait(CALL_TIMEOUT), "a claim outlived its VM's deletion"
                self.claims.remove(c)

    # -- memory ---------------------------------------------------------------------------

    @rule(vm=PICK, addr=st.sampled_from(REGION_ADDRS),
          size=st.sampled_from(REGION_SIZES), read_only=st.booleans(),
          log_dirty=st.booleans())
    def add_region(self, vm: int, addr: int, size: int, read_only: bool,
                   log_dirty: bool) -> None:
        vm_id = self.pick_vm(vm)
        vm = self.vms.get(vm_id)
        errors = {NF} if vm is None else self.region_errors(vm, addr, size)
        code, got = self.call(self.memory_stub.AddMemoryRegion, pb.AddMemoryRegionRequest(
            vm_id=vm_id, guest_addr=addr, size=size, read_only=read_only,
            log_dirty=log_dirty))
        if self.expect(code, errors, f"AddMemoryRegion {vm_id} {addr:#x}+{size:#x}", got):
            assert vm is not None
            slot = self.lowest_free_slot(vm)
            rounded = -(-size // PAGE) * PAGE
            assert (got.slot, got.guest_addr, got.size) == (slot, addr, rounded), (
                f"expected slot {slot} at {addr:#x}+{rounded:#x}, got {got}")
            vm.regions[slot] = (addr, rounded, read_only, log_dirty)

    @rule(vm=PICK, slot=PICK)
    def remove_region(self, vm: int, slot: int) -> None:
        vm_id = self.pick_vm(vm)
        vm = self.vms.get(vm_id)
        slot = self.pick(slot, [s for s in vm.regions if s] if vm else [], SLOTS[1:])
        errors = {NF} if vm is None or slot not in vm.regions else set()
        code, got = self.call(self.memory_stub.RemoveMemoryRegion,
                              pb.RemoveMemoryRegionRequest(vm_id=vm_id, slot=slot))
        if self.expect(code, errors, f"RemoveMemoryRegion {vm_id} {slot}", got):
            assert vm is not None
            del vm.regions[slot]
            vm.pages.pop(slot, None)
            vm.credit.pop(slot, None)  # a removed slot leaves no credit

    def data_range(self, vm: int, slot: int, first: int, count: int
                   ) -> tuple[str, Vm, int, set[int]] | None:
        """A page range inside a data slot of an existing VM (None if there is none)."""
        vm_id = self.pick_vm(vm)
        model = self.vms.get(vm_id)
        slots = model.data_slots() if model else []
        if model is None or not slots:
            return None
        s = slots[slot % len(slots)]
        npages = model.regions[s][1] // PAGE
        first %= npages
        return vm_id, model, s, set(range(first, min(npages, first + count)))

    @rule(vm=PICK, slot=PICK, first=st.integers(0, 31), count=st.integers(1, 8))
    def write_pages(self, vm: int, slot: int, first: int, count: int) -> None:
        picked = self.data_range(vm, slot, first, count)
        if picked is None:
            return
        vm_id, model, s, pages = picked
        addr = model.regions[s][0] + min(pages) * PAGE
        self.memory_stub.WriteGuestMemory(iter([pb.WriteGuestMemoryRequest(
            vm_id=vm_id, guest_addr=addr, data=b"\x5a" * (len(pages) * PAGE))]),
            timeout=CALL_TIMEOUT)
        model.touch(s, pages)

    @rule(vm=PICK, slot=PICK, first=st.integers(0, 31), count=st.integers(1, 8))
    def discard_pages(self, vm: int, slot: int, first: int, count: int) -> None:
        picked = self.data_range(vm, slot, first, count)
        if picked is None:
            return
        vm_id, model, s, pages = picked
        addr = model.regions[s][0] + min(pages) * PAGE
        code, got = self.call(self.memory_stub.DiscardGuestMemory,
                              pb.DiscardGuestMemoryRequest(vm_id=vm_id, guest_addr=addr,
                                                           size=len(pages) * PAGE))
        if self.expect(code, set(), f"DiscardGuestMemory {vm_id} {addr:#x}", got):
            held = model.pages.setdefault(s, set())
            freed = held & pages
            assert got.released_bytes == len(freed) * PAGE
            model.touch(s, set())      # the credit as it stood before the discard
            held -= freed              # then what the discard freed, while still free
            model.credit[s] += len(freed)
            model.touch(s, set())

    # -- irqfds ---------------------------------------------------------------------------

    @rule(vm=PICK, irqfd=PICK,
          gsi=st.sampled_from(GSIS), resample=st.booleans())
    def register_irqfd(self, vm: int, irqfd: int, gsi: int, resample: bool) -> None:
        vm_id = self.pick_vm(vm)
        vm = self.vms.get(vm_id)
        irqfd_id = self.pick(irqfd, [], IRQFD_IDS)
        errors: set[grpc.StatusCode] = set()
        if vm is None:
            errors.add(NF)
        elif not vm.irqchip:
            errors.add(FP)
        else:
            if irqfd_id in vm.irqfds:
                errors.add(AE)
            if len(vm.irqfds) >= LIMITS["max_irqfds_per_vm"]:
                errors.add(RE)
            # Several resample irqfds may share a GSI (KVM's one resampler).
        code, got = self.call(rpc.InterruptsStub(self.ch).RegisterIrqfd,
                              pb.RegisterIrqfdRequest(vm_id=vm_id, irqfd_id=irqfd_id, gsi=gsi,
                                                      resample=resample))
        if self.expect(code, errors, f"RegisterIrqfd {vm_id}/{irqfd_id}", got):
            assert vm is not None
            vm.irqfds[irqfd_id] = [gsi, resample, 0]

    @rule(vm=PICK, irqfd=PICK,
          unregister=st.booleans())
    def trigger_or_unregister_irqfd(self, vm: int, irqfd: int, unregister: bool) -> None:
        vm_id = self.pick_vm(vm)
        vm = self.vms.get(vm_id)
        irqfd_id = self.pick(irqfd, list(vm.irqfds) if vm else [], IRQFD_IDS)
        errors = {NF} if vm is None or irqfd_id not in vm.irqfds else set()
        stub = rpc.InterruptsStub(self.ch)
        if unregister:
            code, got = self.call(stub.UnregisterIrqfd, pb.UnregisterIrqfdRequest(
                vm_id=vm_id, irqfd_id=irqfd_id))
        else:
            code, got = self.call(stub.TriggerIrqfd, pb.TriggerIrqfdRequest(
                vm_id=vm_id, irqfd_id=irqfd_id))
        if self.expect(code, errors, f"{'Unregister' if unregister else 'Trigger'}Irqfd "
                       f"{vm_id}/{irqfd_id}", got):
            assert vm is not None
            if unregister:
                del vm.irqfds[irqfd_id]
            else:
                vm.irqfds[irqfd_id][2] += 1

    # -- ioevents -------------------------------------------------------------------------

    @rule(vm=PICK, ioevent=PICK,
          where=st.sampled_from(IOEVENT_ADDRS), length=st.sampled_from(IOEVENT_LENGTHS),
          datamatch=st.sampled_from(DATAMATCHES))
    def register_ioevent(self, vm: int, ioevent: int, where: tuple[int, int],
                         length: int, datamatch: int | None) -> None:
        vm_id = self.pick_vm(vm)
        vm = self.vms.get(vm_id)
        ioevent_id = self.pick(ioevent, [], IOEVENT_IDS)
        errors: set[grpc.StatusCode] = set()
        if datamatch is not None and (length == 0 or datamatch >= 1 << (8 * length)):
            errors.add(IA)
        if vm is None:
            errors.add(NF)
        else:
            if ioevent_id in vm.ioevents:
                errors.add(AE)
            if len(vm.ioevents) >= LIMITS["max_ioevents_per_vm"]:
                errors.add(RE)
            wanted = (where[0], where[1], length, datamatch)
            if any(ioevent_collides(wanted, e) for e in vm.ioevents.values()):
                errors.add(AE)
            # One owner per address: not a device's, nor a claim's.
            taken = (where[0], where[1], max(1, length))
            if any(overlaps(taken, (pb.PIO, base, n)) for base, n in DEVICE_PORTS) or any(
                    overlaps(taken, held) for c in self.claims if c.vm_id == vm_id
                    for held in c.ranges):
                errors.add(AE)
        request = pb.RegisterIoeventRequest(vm_id=vm_id, ioevent_id=ioevent_id,
                                            space=where[0], address=where[1], length=length)
        if datamatch is not None:
            request.datamatch = datamatch
        code, got = self.call(rpc.IoEventsStub(self.ch).RegisterIoevent, request)
        if self.expect(code, errors, f"RegisterIoevent {vm_id}/{ioevent_id} {where} "
                       f"len {length} dm {datamatch}", got):
            assert vm is not None
            vm.ioevents[ioevent_id] = (where[0], where[1], length, datamatch)

    @rule(vm=PICK, ioevent=PICK)
    def unregister_ioevent(self, vm: int, ioevent: int) -> None:
        vm_id = self.pick_vm(vm)
        vm = self.vms.get(vm_id)
        ioevent_id = self.pick(ioevent, list(vm.ioevents) if vm else [], IOEVENT_IDS)
        errors = {NF} if vm is None or ioevent_id not in vm.ioevents else set()
        code, got = self.call(rpc.IoEventsStub(self.ch).UnregisterIoevent,
                              pb.UnregisterIoeventRequest(vm_id=vm_id, ioevent_id=ioevent_id))
        if self.expect(code, errors, f"UnregisterIoevent {vm_id}/{ioevent_id}", got):
            assert vm is not None
            del vm.ioevents[ioevent_id]

    # -- vCPUs ----------------------------------------------------------------------------

    def set_program(self, vm_id: str, vcpu_id: int, program: str) -> None:
        ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=vcpu_id)
        regs = self.vcpus_stub.GetRegs(ref, timeout=CALL_TIMEOUT)
        regs.rip = HALT_ADDR if program == "halt" else SPIN_ADDR
        regs.rflags = 2
        self.vcpus_stub.SetRegs(pb.SetRegsRequest(vcpu=ref, regs=regs), timeout=CALL_TIMEOUT)

    @rule(vm=PICK, vcpu=PICK)
    def create_vcpu(self, vm: int, vcpu: int) -> None:
        vm_id = self.pick_vm(vm)
        vm = self.vms.get(vm_id)
        vcpu_id = self.pick(vcpu, [], VCPU_IDS)
        errors: set[grpc.StatusCode] = set()
        if vm is None:
            errors.add(NF)
        else:
            if vcpu_id in vm.vcpus:
                errors.add(AE)
            if len(vm.vcpus) >= LIMITS["max_vcpus_per_vm"]:
                errors.add(RE)
        code, got = self.call(self.vcpus_stub.CreateVcpu,
                              pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=vcpu_id))
        if not self.expect(code, errors, f"CreateVcpu {vm_id}/{vcpu_id}", got):
            return
        assert vm is not None
        vm.vcpus[vcpu_id] = Vcpu(prepared=vm.code)
        if vm.code:
            ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=vcpu_id)
            sregs = self.vcpus_stub.GetSregs(ref, timeout=CALL_TIMEOUT)
            for name in ("cs", "ds", "es", "fs", "gs", "ss"):
                getattr(sregs, name).base = 0
                getattr(sregs, name).selector = 0
            self.vcpus_stub.SetSregs(pb.SetSregsRequest(vcpu=ref, sregs=sregs),
                                     timeout=CALL_TIMEOUT)
            self.set_program(vm_id, vcpu_id, "halt")

    def spinning(self) -> int:
        return sum(1 for vm in self.vms.values() for v in vm.vcpus.values()
                   if v.program == "spin" and v.state == "running")

    @rule(vm=PICK, vcpu=PICK,
          action=st.sampled_from(["start", "pause", "resume", "stop"]),
          program=st.sampled_from(["halt", "halt", "spin"]))
    def vcpu_run_control(self, vm: int, vcpu: int, action: str, program: str) -> None:
        vm_id = self.pick_vm(vm)
        vm = self.vms.get(vm_id)
        vcpu_id = self.pick(vcpu, list(vm.vcpus) if vm else [], VCPU_IDS)
        v = vm.vcpus.get(vcpu_id) if vm is not None else None
        if v is not None and not v.prepared and action == "start":
            return  # a vCPU without code would crash at a time nobody can model
        if program == "spin" and self.spinning() >= 2:
            program = "halt"  # two spinning guests are enough for two cores
        errors: set[grpc.StatusCode] = set()
        if vm is None or v is None:
            errors.add(NF)
        elif action == "start":
            if v.state not in ("created", "stopped", "crashed"):
                errors.add(FP)
            else:
                self.set_program(vm_id, vcpu_id, program)
                v.program = program
        elif v.state not in ALLOWED_FROM[action]:
            errors.add(FP)
        fn = getattr(self.vcpus_stub, f"{action.capitalize()}Vcpu")
        code, got = self.call(fn, pb.VcpuRef(vm_id=vm_id, vcpu_id=vcpu_id))
        if self.expect(code, errors, f"{action} vcpu {vm_id}/{vcpu_id}", got):
            assert vm is not None and v is not None
            self.apply(vm, v, action)

    def apply(self, vm: Vm, v: Vcpu, action: str) -> None:
        if action in ("start", "resume"):
            v.state = vm.running_program(v)
            if action == "start":
                v.reason = ""
        elif action == "pause":
            v.state = "paused"
        else:
            v.state, v.reason = "stopped", "stopped by request"

    @rule(vm=PICK,
          action=st.sampled_from(["start", "pause", "resume", "stop"]))
    def vm_run_control(self, vm: int, action: str) -> None:
        vm_id = self.pick_vm(vm)
        vm = self.vms.get(vm_id)
        if vm is not None and action == "start" and not all(
                v.prepared for v in vm.vcpus.values()):
            return
        errors: set[grpc.StatusCode] = set()
        targets: list[Vcpu] = []
        if vm is None:
            errors.add(NF)
        else:
            states = {i: v.state for i, v in vm.vcpus.items()}
            if action == "start":
                targets = list(vm.vcpus.values())
                if not targets or any(s not in ("created", "stopped", "crashed")
                                      for s in states.values()):
                    errors.add(FP)
            else:
                targets = [v for v in vm.vcpus.values() if v.state in ALLOWED_FROM[action]]
                if not targets:
                    errors.add(FP)
        fn = getattr(self.vms_stub, f"{action.capitalize()}Vm")
        code, got = self.call(fn, pb.VmRef(vm_id=vm_id))
        if self.expect(code, errors, f"{action} vm {vm_id}", got):
            assert vm is not None
            for v in targets:
                self.apply(vm, v, action)

    # -- remote exit claims ---------------------------------------------------------------

    @precondition(lambda self: len(self.claims) < 6)
    @rule(vm=PICK,
          ranges=st.lists(st.sampled_from(CLAIM_RANGES), min_size=1, max_size=2))
    def open_claim(self, vm: int, ranges: list[tuple[int, int, int]]) -> None:
        vm_id = self.pick_vm(vm)
        errors: set[grpc.StatusCode] = set()
        if vm_id not in self.vms:
            errors.add(NF)
        else:
            if any(overlaps(a, b) for i, a in enumerate(ranges) for b in ranges[i + 1:]):
                errors.add(IA)
            if any(overlaps(r, (pb.PIO, base, n)) for r in ranges for base, n in DEVICE_PORTS):
                errors.add(AE)
            if any(overlaps(r, held) for r in ranges for c in self.claims
                   if c.vm_id == vm_id for held in c.ranges):
                errors.add(AE)
            if any(overlaps(r, (e[0], e[1], max(1, e[2]))) for r in ranges
                   for e in self.vms[vm_id].ioevents.values()):
                errors.add(AE)  # one owner per address: not an ioevent's
        stream = ClaimStream(self.ch, vm_id, ranges)
        code = stream.first()
        if self.expect(code, errors, f"claim {vm_id} {ranges}"):
            self.claims.append(stream)
        else:
            assert stream.ended.wait(CALL_TIMEOUT)

    @precondition(lambda self: self.claims)
    @rule(index=st.integers(0, 5), cancel=st.booleans())
    def close_claim(self, index: int, cancel: bool) -> None:
        stream = self.claims.pop(index % len(self.claims))
        if cancel:  # as a client that dies: the daemon notices and frees the claims
            stream.call.cancel()
            vm = self.fz.daemon.host.get_vm(stream.vm_id)  # type: ignore[union-attr]
            wait_until(lambda: all(h.id != stream.handler_id for h in vm.claims.handlers()),
                       CALL_TIMEOUT, "a cancelled claim to be released")
        else:
            assert stream.close() == OK

    # -- the checks -----------------------------------------------------------------------

    @invariant()
    def daemon_equals_model(self) -> None:
        self.steps += 1
        fz = self.fz
        fz.assert_healthy()
        t = CALL_TIMEOUT
        listed = fz.vms.ListVms(pb.ListVmsRequest(), timeout=t).vms
        assert sorted(v.vm_id for v in listed) == sorted(self.vms)
        info = fz.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=t)
        assert info.vm_count == len(self.vms)
        assert info.memory_in_use_bytes == self.total_memory()
        host = fz.daemon.host
        assert host is not None
        for vm_id, vm in self.vms.items():
            self.check_vcpus(vm_id, vm)
            got = fz.vms.GetVm(pb.GetVmRequest(vm_id=vm_id), timeout=t)
            assert got.options.irqchip == vm.irqchip
            assert got.vcpu_count == len(vm.vcpus)
            assert got.memory_slot_count == len(vm.regions)
            assert got.memory_bytes == vm.memory
            assert got.state == vm_state(vm.vcpus), (got.state, vm.vcpus)
            assert dict(got.vcpu_states) == {i: v.state for i, v in vm.vcpus.items()}
            regions = fz.memory.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm_id=vm_id),
                                                  timeout=t).regions
            assert [(r.slot, r.guest_addr, r.size, r.read_only, r.log_dirty)
                    for r in regions] == sorted(((s, *r) for s, r in vm.regions.items()),
                                                key=lambda x: x[1])
            irqfds = fz.interrupts.ListIrqfds(pb.ListIrqfdsRequest(vm_id=vm_id),
                                              timeout=t).irqfds
            assert {e.irqfd_id: [e.gsi, e.resample, e.triggers] for e in irqfds} == \
                vm.irqfds
            ioevents = fz.ioevents.ListIoevents(pb.ListIoeventsRequest(vm_id=vm_id),
                                                timeout=t).ioevents
            assert {e.ioevent_id: (e.space, e.address, e.length,
                                   e.datamatch if e.HasField("datamatch") else None)
                    for e in ioevents} == vm.ioevents
            claimed = sorted((r.space.value, r.base, r.length)
                             for h in host.get_vm(vm_id).claims.handlers() for r in h.ranges)
            modeled = sorted(("pio" if s == pb.PIO else "mmio", b, n) for c in self.claims
                             if c.vm_id == vm_id for s, b, n in c.ranges)
            assert claimed == modeled
        for c in self.claims:
            assert not c.ended.is_set(), f"claim stream ended: {c.code}"

    def check_vcpus(self, vm_id: str, vm: Vm) -> None:
        """ListVcpus and GetVcpuState equal the model, once transient states settle."""
        want = {i: (v.state, v.reason if v.state == "stopped" else None)
                for i, v in vm.vcpus.items()}

        def seen() -> dict[int, tuple[str, str | None]]:
            got = self.fz.vcpus.ListVcpus(pb.ListVcpusRequest(vm_id=vm_id),
                                          timeout=CALL_TIMEOUT).vcpus
            return {v.vcpu_id: (v.state, v.reason if v.state == "stopped" else None)
                    for v in got}
        last: list[Any] = []

        def settled() -> bool:
            last[:] = [seen()]
            return bool(last[0] == want)
        try:
            wait_until(settled, STATE_WAIT, f"vcpus of {vm_id}")
        except AssertionError:
            raise AssertionError(f"vcpus of {vm_id}: daemon {last[0]}, model {want}") from None
        for i, (state, _) in want.items():
            got = self.fz.vcpus.GetVcpuState(pb.VcpuRef(vm_id=vm_id, vcpu_id=i),
                                             timeout=CALL_TIMEOUT)
            assert got.state == state

    def teardown(self) -> None:
        for c in self.claims:
            c.call.cancel()
        self.fz.delete_all()


@pytest.fixture(scope="module")
def model_daemon() -> Iterator[FuzzDaemon]:
    fz = FuzzDaemon.start(**LIMITS)
    try:
        yield fz
    finally:
        fz.stop()


def test_daemon_matches_model(model_daemon: FuzzDaemon) -> None:
    DaemonModel.fz = model_daemon
    model_daemon.delete_all()
    OUTCOMES.clear()
    run_state_machine_as_test(DaemonModel, settings=fuzz_settings(
        RUNS, stateful_step_count=STEPS))
    print(f"\nmodel: {sum(OUTCOMES.values())} checked calls: "
          + ", ".join(f"{k} {n}" for k, n in sorted(OUTCOMES.items())))
