"""Guest memory at seed parity, over gRPC on real /dev/kvm: DiscardGuestMemory (balloon
inflate; deflate is the guest touching the range again) with the daemon's RSS and the memfd's
allocated size measured, the memory budget across a discard (credited while the pages stay
free, charged again once the guest touches them), file-backed slots and files mapped over
slots from the images directory (guest writes reach the file after SyncGuestMemory; a
read-only file makes guest writes exit as MMIO), and every bad input with its exact status
code, nothing mapped and no fd left behind.
"""

from __future__ import annotations

import os
import struct
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from api_support import DaemonFactory, RunningDaemon
from guests import (
    CODE_ADDR,
    GDT_ADDR,
    GUEST_MEM_SIZE,
    PML4_ADDR,
    STACK_TOP,
    flat_gdt,
    identity_page_tables,
)
from polling import wait_until
from prometheus_client.parser import text_string_to_metric_families

from kvmd.core.errors import Reason
from kvmd.core.images import FileIdentity
from kvmd.server import Config, ConfigError, Daemon
from kvmd_proto import vmm_pb2 as pb

P = 4096
MiB = 1 << 20
DATA = 0x400000  # the data slot: inside the identity map, above the code slot
DEBUG_EXIT = 0x501
Code = grpc.StatusCode


# -- guests (64-bit) ---------------------------------------------------------------------


def load_or(addr: int) -> bytes:
    """`mov al, [addr]; or bl, al` (addr < 2 GiB)."""
    return bytes([0x8A, 0x04, 0x25]) + struct.pack("<I", addr) + bytes([0x08, 0xC3])


def store(addr: int, value: int) -> bytes:
    """`mov byte [addr], value`."""
    return bytes([0xC6, 0x04, 0x25]) + struct.pack("<I", addr) + bytes([value])


def program(*body: bytes) -> bytes:
    """`xor ebx, ebx`, the body, then the debug exit with BL as the exit code."""
    return (bytes([0x31, 0xDB])                                    # xor ebx, ebx
            + b"".join(body)
            + bytes([0x88, 0xD8])                                  # mov al, bl
            + bytes([0xBA]) + struct.pack("<I", DEBUG_EXIT)        # mov edx, 0x501
            + bytes([0xEE, 0xF4]))                                 # out dx, al; hlt


def long_mode_vm(api: RunningDaemon, vm_id: str, code: bytes) -> None:
    """A VM with a 64 KiB code slot at 0 (slot 0): page tables, GDT, `code` at CODE_ADDR,
    one vCPU in 64-bit mode at it. All over gRPC."""
    api.create_vm(vm_id)
    api.add_memory(vm_id, 0, GUEST_MEM_SIZE)
    for addr, page in identity_page_tables().items():
        api.write(vm_id, addr, page)
    api.write(vm_id, GDT_ADDR, flat_gdt())
    api.write(vm_id, CODE_ADDR, code)
    api.create_vcpu(vm_id)
    set_program(api, vm_id, code)


def set_program(api: RunningDaemon, vm_id: str, code: bytes) -> None:
    api.write(vm_id, CODE_ADDR, code)
    ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=0)
    sregs = api.vcpus.GetSregs(ref)
    sregs.cs.CopyFrom(pb.Segment(base=0, limit=0xFFFFFFFF, selector=0x08, type=11,
                                 present=1, dpl=0, db=0, s=1, l=1, g=1))
    for name in ("ds", "es", "fs", "gs", "ss"):
        getattr(sregs, name).CopyFrom(pb.Segment(base=0, limit=0xFFFFFFFF, selector=0x10,
                                                 type=3, present=1, dpl=0, db=1, s=1, l=0,
                                                 g=1))
    sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, len(flat_gdt()) - 1
    sregs.cr0 = 0x80000031      # PE | ET | NE | PG
    sregs.cr3 = PML4_ADDR
    sregs.cr4 = 0x20            # PAE
    sregs.efer = 0x500          # LME | LMA
    api.vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref, sregs=sregs))
    api.vcpus.SetRegs(pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(rip=CODE_ADDR, rsp=STACK_TOP,
                                                                rflags=2)))


def run_to_exit(api: RunningDaemon, vm_id: str) -> int:
    """StartVm and wait for the guest's debug exit; returns its exit code."""
    api.vms.StartVm(pb.VmRef(vm_id=vm_id))
    vm = wait_until(lambda: (lambda v: v if v.state in ("stopped", "crashed") else None)(
        api.vms.GetVm(pb.GetVmRequest(vm_id=vm_id))), 60, f"vm {vm_id} to stop")
    assert vm.state == "stopped" and vm.HasField("exit_code"), vm
    return int(vm.exit_code)


# -- measuring ---------------------------------------------------------------------------


def vm_rss() -> int:
    """This process's resident set (the daemon is in-process here), in bytes. Pages the
    guest touched are mapped in the daemon (KVM maps guest memory through the daemon's own
    mapping); pages the daemon writes from the host go into the memfd without it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def fill_loop(addr: int, pages: int, value: int = 0xA5) -> bytes:
    """`value` into the first byte of each of `pages` pages from `addr` (< 2 GiB)."""
    body = (bytes([0xC6, 0x03, value])                                 # mov byte [rbx], v
            + bytes([0x48, 0x81, 0xC3]) + struct.pack("<I", P)         # add rbx, 4096
            + bytes([0xFF, 0xC9]))                                     # dec ecx
    return (bytes([0xBB]) + struct.pack("<I", addr)                    # mov ebx, addr
            + bytes([0xB9]) + struct.pack("<I", pages)                 # mov ecx, pages
            + body + bytes([0x75, -(len(body) + 2) & 0xFF]))           # jnz loop


def regions(api: RunningDaemon, vm_id: str) -> list[pb.MemoryRegion]:
    return list(api.memory.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm_id=vm_id)).regions)


def region(api: RunningDaemon, vm_id: str, slot: int) -> pb.MemoryRegion:
    return next(r for r in regions(api, vm_id) if r.slot == slot)


def get_vm(api: RunningDaemon, vm_id: str) -> pb.Vm:
    return api.vms.GetVm(pb.GetVmRequest(vm_id=vm_id))


def scrape(api: RunningDaemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    server = api.daemon.metrics_server
    assert server is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def fill(api: RunningDaemon, vm_id: str, addr: int, size: int, byte: int = 0xA5) -> None:
    """Write `size` bytes of `byte` at `addr`, streamed in 1 MiB chunks of one buffer (so
    the test itself does not hold `size` bytes)."""
    chunk = bytes([byte]) * MiB

    def requests() -> Iterator[pb.WriteGuestMemoryRequest]:
        yield pb.WriteGuestMemoryRequest(vm_id=vm_id, guest_addr=addr, data=chunk)
        for _ in range(1, size // MiB):
            yield pb.WriteGuestMemoryRequest(data=chunk)

    assert api.memory.WriteGuestMemory(requests()).bytes_written == size


def file_dirty_kib(path: str) -> int:
    """Dirty KiB of this process's mappings of `path` (/proc/self/smaps): guest and host
    writes make the file's pages dirty; msync writes them back and cleans them."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if not head.endswith(":"):
                inside = line.rstrip().endswith(path)
            elif inside and head in ("Shared_Dirty:", "Private_Dirty:"):
                total += int(line.split()[1])
    return total


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """The images directory: disk.img (16 pages, page i filled with 0x40+i), small.img (one
    page), a subdirectory with rom.bin, and symlinks in and out."""
    root = tmp_path / "images"
    root.mkdir(mode=0o750)
    (root / "disk.img").write_bytes(b"".join(bytes([0x40 + i]) * P for i in range(16)))
    (root / "small.img").write_bytes(b"\x01" * P)
    (root / "roms").mkdir()
    (root / "roms" / "rom.bin").write_bytes(b"\x7f" * (4 * P))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.img").write_bytes(b"\x55" * (16 * P))
    (root / "escape.img").symlink_to("../outside/secret.img")
    (root / "escape-abs.img").symlink_to(outside / "secret.img")
    (root / "roms" / "out").symlink_to("../../outside")
    (root / "alias.img").symlink_to("disk.img")
    return root


@pytest.fixture
def gm(daemon_factory: DaemonFactory, images: Path) -> RunningDaemon:
    return daemon_factory(images_dir=str(images), metrics_listen="127.0.0.1:0")


def memory_file(name: str, offset: int = 0, read_only: bool = False) -> pb.MemoryFile:
    return pb.MemoryFile(name=name, offset=offset, read_only=read_only)


def add_file(api: RunningDaemon, vm_id: str, addr: int, size: int, name: str,
             offset: int = 0, read_only: bool = False, **kw: bool) -> pb.MemoryRegion:
    return api.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id=vm_id, guest_addr=addr, size=size, file=memory_file(name, offset, read_only),
        **kw))


# -- discard -----------------------------------------------------------------------------


def test_discard_64_mib_drops_rss_and_allocation_and_the_guest_sees_zeros(
        gm: RunningDaemon, record_property: pytest.RecordProperty) -> None:
    api, size = gm, 64 * MiB
    marks = [DATA + 5 * P, DATA + 40 * MiB + 3, DATA + size - 1]
    # The guest fills 64 MiB (a byte in every page), then exits.
    long_mode_vm(api, "balloon", program(fill_loop(DATA, size // P)))
    slot = api.add_memory("balloon", DATA, size).slot
    assert run_to_exit(api, "balloon") == 0
    before = region(api, "balloon", slot).allocated_bytes
    assert before >= size
    assert get_vm(api, "balloon").memory_allocated_bytes >= size
    rss_before = vm_rss()

    released = api.memory.DiscardGuestMemory(pb.DiscardGuestMemoryRequest(
        vm_id="balloon", guest_addr=DATA, size=size)).released_bytes

    rss_after = vm_rss()
    after = region(api, "balloon", slot).allocated_bytes
    print(f"\n64 MiB discard: released {released} bytes; memfd allocated {before} -> {after}; "
          f"daemon VmRSS {rss_before} -> {rss_after} (-{(rss_before - rss_after) / MiB:.1f} "
          "MiB)")
    record_property("rss_drop_bytes", rss_before - rss_after)
    record_property("allocated_drop_bytes", before - after)
    assert released == before - after
    assert released >= size - MiB
    assert after < MiB
    assert rss_before - rss_after >= size - 4 * MiB
    vm = get_vm(api, "balloon")
    assert vm.discarded_bytes == released
    assert vm.memory_allocated_bytes == sum(r.allocated_bytes for r in regions(api, "balloon"))
    samples = scrape(api)
    assert samples[("kvmd_guest_memory_discarded_bytes_total", (("vm", "balloon"),))] == \
        released
    assert samples[("kvmd_guest_memory_allocated_bytes", (("vm", "balloon"),))] < 2 * MiB

    # The guest reads zeros there (exit code = the OR of what it read) and writes again.
    set_program(api, "balloon", program(*(load_or(a) for a in marks), store(marks[1], 0x22)))
    assert run_to_exit(api, "balloon") == 0
    assert api.read("balloon", marks[1], 1) == b"\x22"
    assert api.read("balloon", DATA, 16) == bytes(16)
    touched = region(api, "balloon", slot).allocated_bytes
    assert P <= touched < MiB          # the pages touched since, not the 64 MiB
    # Discarding again releases only what was touched since.
    again = api.memory.DiscardGuestMemory(pb.DiscardGuestMemoryRequest(
        vm_id="balloon", guest_addr=DATA, size=size)).released_bytes
    assert again == touched
    assert get_vm(api, "balloon").discarded_bytes == released + again


def test_discard_spans_adjacent_slots_and_counts_what_was_freed(gm: RunningDaemon) -> None:
    api = gm
    api.create_vm("two")
    a = api.add_memory("two", DATA, 8 * P).slot
    b = api.add_memory("two", DATA + 8 * P, 8 * P).slot
    api.write("two", DATA, b"\x01" * (16 * P))
    released = api.memory.DiscardGuestMemory(pb.DiscardGuestMemoryRequest(
        vm_id="two", guest_addr=DATA + 6 * P, size=4 * P)).released_bytes
    assert released == 4 * P
    assert (region(api, "two", a).allocated_bytes, region(api, "two", b).allocated_bytes) \
        == (6 * P, 6 * P)
    assert api.read("two", DATA + 5 * P, 5 * P) == b"\x01" * P + bytes(4 * P)


# The memory budget across a discard (README "Budget policy"): a slot is charged its size
# less what a discard released from its memfd, while the memfd still does not hold it.
ONE_VM = GUEST_MEM_SIZE + 64 * MiB  # a long-mode VM's code slot and a 64 MiB data slot


def in_use(api: RunningDaemon) -> int:
    return api.hypervisor.GetInfo(pb.GetInfoRequest()).memory_in_use_bytes


def credited(api: RunningDaemon) -> float:
    return scrape(api)[("kvmd_guest_memory_discard_credit_bytes", ())]


def filled_vm(api: RunningDaemon, vm_id: str) -> int:
    """A long-mode VM whose guest filled its 64 MiB data slot (a byte in every page)."""
    long_mode_vm(api, vm_id, program(fill_loop(DATA, 64 * MiB // P)))
    slot = api.add_memory(vm_id, DATA, 64 * MiB).slot
    assert run_to_exit(api, vm_id) == 0
    assert region(api, vm_id, slot).allocated_bytes >= 64 * MiB
    return slot


def discard(api: RunningDaemon, vm_id: str, addr: int = DATA, size: int = 64 * MiB) -> int:
    return api.memory.DiscardGuestMemory(pb.DiscardGuestMemoryRequest(
        vm_id=vm_id, guest_addr=addr, size=size)).released_bytes


@pytest.fixture
def one_vm(daemon_factory: DaemonFactory, images: Path) -> RunningDaemon:
    """A daemon whose total limit fits one filled VM (and 1 MiB more), not two."""
    return daemon_factory(max_memory_total_bytes=ONE_VM + MiB, images_dir=str(images),
                          metrics_listen="127.0.0.1:0")


def test_a_discard_makes_room_for_another_vm(one_vm: RunningDaemon) -> None:
    api = one_vm
    filled_vm(api, "idle")
    api.create_vm("next")
    assert in_use(api) == ONE_VM
    api.assert_code(lambda: api.add_memory("next", 0, 64 * MiB), Code.RESOURCE_EXHAUSTED,
                    reason=Reason.LIMIT_GUEST_MEMORY)
    # The balloon inflates: what the memfd gave back is not charged any more.
    released = discard(api, "idle")
    assert released >= 64 * MiB - MiB
    assert in_use(api) == ONE_VM - released
    assert credited(api) == released
    api.add_memory("next", 0, 64 * MiB)                # refused before the discard
    assert in_use(api) == ONE_VM - released + 64 * MiB
    vm = get_vm(api, "idle")                            # GetVm's counters are as before
    assert (vm.memory_bytes, vm.discarded_bytes) == (ONE_VM, released)
    assert vm.memory_allocated_bytes < 2 * MiB


def test_touching_discarded_memory_again_charges_it_again(one_vm: RunningDaemon) -> None:
    api = one_vm
    filled_vm(api, "idle")
    released = discard(api, "idle")
    api.create_vm("next")
    api.add_memory("next", 0, 64 * MiB)
    # The guest touches half of its range again (deflate, without asking): that half is
    # charged again; the rest stays credited.
    set_program(api, "idle", program(fill_loop(DATA, 32 * MiB // P, 0x11)))
    assert run_to_exit(api, "idle") == 0
    half = in_use(api) - (ONE_VM - released + 64 * MiB)
    assert abs(half - 32 * MiB) < MiB
    assert credited(api) == released - half
    # All of it: the credit is gone and the total is past the limit (the overcommit that
    # the admission of "next" took on), so nothing more is admitted.
    set_program(api, "idle", program(fill_loop(DATA, 64 * MiB // P, 0x22)))
    assert run_to_exit(api, "idle") == 0
    assert in_use(api) == ONE_VM + 64 * MiB > ONE_VM + MiB
    assert credited(api) == 0
    api.assert_code(lambda: api.add_memory("next", 64 * MiB, P), Code.RESOURCE_EXHAUSTED,
                    reason=Reason.LIMIT_GUEST_MEMORY)
    # A credit never grows back by itself (the reports recompute it): a new discard is
    # what gives one again, and then admits again.
    assert (in_use(api), credited(api)) == (ONE_VM + 64 * MiB, 0)
    again = discard(api, "idle")
    assert (in_use(api), credited(api)) == (ONE_VM + 64 * MiB - again, again)
    api.add_memory("next", 64 * MiB, P)


def test_removing_the_slot_or_deleting_the_vm_leaves_no_credit(one_vm: RunningDaemon) -> None:
    api = one_vm
    slot = filled_vm(api, "a")
    released = discard(api, "a")
    assert credited(api) == released
    api.memory.RemoveMemoryRegion(pb.RemoveMemoryRegionRequest(vm_id="a", slot=slot))
    assert (in_use(api), credited(api)) == (GUEST_MEM_SIZE, 0)
    # The slot number comes back for a new slot: it starts without a credit.
    assert api.add_memory("a", DATA, 64 * MiB).slot == slot
    assert (in_use(api), credited(api)) == (ONE_VM, 0)
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="a"))
    filled_vm(api, "b")
    discard(api, "b")
    assert credited(api) > 0
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="b"))
    assert (in_use(api), credited(api)) == (0, 0)


def test_the_per_vm_limit_and_file_backed_slots_ignore_credits(
        daemon_factory: DaemonFactory, images: Path) -> None:
    # max_memory_per_vm_bytes bounds what one guest can have with its balloon deflated,
    # which a discard does not change; a file-backed slot is never discarded, never credited.
    api = daemon_factory(max_memory_per_vm_bytes=16 * MiB, images_dir=str(images),
                         metrics_listen="127.0.0.1:0")
    api.create_vm("vm")
    api.add_memory("vm", DATA, 16 * MiB)
    fill(api, "vm", DATA, 16 * MiB)
    assert discard(api, "vm", DATA, 16 * MiB) >= 15 * MiB
    api.assert_code(lambda: api.add_memory("vm", 0, P), Code.RESOURCE_EXHAUSTED,
                    reason=Reason.LIMIT_VM_MEMORY)
    api.create_vm("files")
    before = in_use(api)
    add_file(api, "files", 0, 16 * P, "disk.img")
    api.assert_code(lambda: discard(api, "files", 0, 16 * P), Code.FAILED_PRECONDITION)
    assert in_use(api) == before + 16 * P


def test_discard_bad_inputs(gm: RunningDaemon) -> None:
    api = gm
    api.create_vm("bad")
    api.add_memory("bad", DATA, 8 * P)
    api.add_memory("bad", DATA + 16 * P, 8 * P)
    add_file(api, "bad", DATA + 24 * P, 4 * P, "disk.img")
    api.write("bad", DATA, b"\x01" * (8 * P))
    before = (regions(api, "bad"), get_vm(api, "bad").memory_allocated_bytes)

    def discard(vm_id: str, addr: int, size: int) -> object:
        return api.memory.DiscardGuestMemory(pb.DiscardGuestMemoryRequest(
            vm_id=vm_id, guest_addr=addr, size=size))

    for vm_id, addr, size, code in (
        ("bad", DATA + 1, P, Code.INVALID_ARGUMENT),              # unaligned address
        ("bad", DATA, P + 1, Code.INVALID_ARGUMENT),              # unaligned size
        ("bad", DATA, 0, Code.INVALID_ARGUMENT),                  # empty
        ("bad", DATA + 4 * P, 8 * P, Code.INVALID_ARGUMENT),      # runs into the hole
        ("bad", DATA + 8 * P, P, Code.INVALID_ARGUMENT),          # in the hole: no memory
        ("bad", 1 << 50, P, Code.INVALID_ARGUMENT),               # far outside
        ("bad", DATA + 20 * P, 8 * P, Code.FAILED_PRECONDITION),  # runs into a file slot
        ("bad", DATA + 24 * P, P, Code.FAILED_PRECONDITION),      # a file's memory
        ("nope", DATA, P, Code.NOT_FOUND),
        ("", DATA, P, Code.INVALID_ARGUMENT),
    ):
        api.assert_code(lambda v=vm_id, a=addr, s=size: discard(v, a, s), code)
    # Ranges not all inside guest memory are the daemon's own refusal, saying so (not a
    # kernel error from the binding's re-check).
    for addr, size in ((DATA + 4 * P, 8 * P), (DATA + 8 * P, P), (DATA + 20 * P, 16 * P)):
        api.assert_code(lambda a=addr, s=size: discard("bad", a, s), Code.INVALID_ARGUMENT,
                        reason=Reason.RANGE_OUTSIDE_MEMORY)
    assert (regions(api, "bad"), get_vm(api, "bad").memory_allocated_bytes) == before
    assert api.read("bad", DATA, 8 * P) == b"\x01" * (8 * P)
    assert get_vm(api, "bad").discarded_bytes == 0


# -- file-backed slots -------------------------------------------------------------------


def test_file_backed_slot_guest_writes_reach_the_file_after_sync(
        gm: RunningDaemon, images: Path) -> None:
    api = gm
    path = str(images / "disk.img")
    long_mode_vm(api, "filevm", program(load_or(DATA + 7 * P), store(DATA + 10, 0x99),
                                        store(DATA + 3 * P, 0x98)))
    r = add_file(api, "filevm", DATA, 8 * P, "disk.img", offset=4 * P, log_dirty=True)
    assert (r.file.name, r.file.offset, r.file.read_only, r.read_only) == (
        "disk.img", 4 * P, False, False)
    assert r.allocated_bytes == 0      # its pages are the file's, not the daemon's memory
    listed = region(api, "filevm", r.slot)
    assert listed.file == r.file and listed.size == 8 * P
    assert api.read("filevm", DATA, 1) == b"\x44"
    # The guest read page 7 of the slot (file page 11: 0x4b), then wrote twice.
    assert run_to_exit(api, "filevm") == 0x4B
    assert file_dirty_kib(path) > 0
    synced = api.memory.SyncGuestMemory(pb.SyncGuestMemoryRequest(
        vm_id="filevm", slot=r.slot)).synced_bytes
    assert synced == 8 * P
    assert file_dirty_kib(path) == 0   # written back
    with open(path, "rb") as f:
        data = f.read()
    assert data[4 * P + 10] == 0x99 and data[7 * P] == 0x98
    assert data[4 * P + 11 : 4 * P + 12] == b"\x44"
    # What the snapshot code reads: the range, its file and the file's identity.
    [record] = api.daemon.host.get_vm("filevm").file_backed_ranges()
    st = os.stat(path)
    assert (record.slot, record.guest_addr, record.offset, record.size, record.image,
            record.file_offset, record.writable, record.whole_slot) == (
        r.slot, DATA, 0, 8 * P, "disk.img", 4 * P, True, True)
    assert record.identity.same_file(st)
    assert isinstance(record.identity, FileIdentity) and record.identity.size == 16 * P
    # A host write goes to the file too; removing the slot msyncs and leaves the file.
    api.write("filevm", DATA + 5 * P, b"host write")
    removed = api.memory.RemoveMemoryRegion(pb.RemoveMemoryRegionRequest(
        vm_id="filevm", slot=r.slot)).region
    assert removed.file.name == "disk.img"
    with open(path, "rb") as f:
        f.seek(9 * P)
        assert f.read(10) == b"host write"
    assert api.daemon.host.get_vm("filevm").file_backed_ranges() == []


def test_a_file_shares_memory_between_two_vms_of_one_owner(gm: RunningDaemon) -> None:
    """The same image mapped read-write into two VMs is one memory: what the first guest
    writes, the second guest reads (both mappings are the file's pages; nothing copied)."""
    api = gm
    long_mode_vm(api, "writer", program(store(DATA + 2 * P + 5, 0x5A)))
    long_mode_vm(api, "reader", program(load_or(DATA + 2 * P + 5)))
    for vm_id in ("writer", "reader"):
        add_file(api, vm_id, DATA, 4 * P, "disk.img")
    assert api.read("reader", DATA + 2 * P + 5, 1) == b"\x42"  # the file's own byte
    assert run_to_exit(api, "writer") == 0
    assert api.read("reader", DATA + 2 * P + 5, 1) == b"\x5a"  # seen through the host too
    assert run_to_exit(api, "reader") == 0x5A  # and by the second guest


def test_read_only_file_slot_guest_writes_exit_as_mmio(gm: RunningDaemon,
                                                       images: Path) -> None:
    api = gm
    long_mode_vm(api, "romvm", program(load_or(DATA + P), store(DATA, 0x5A)))
    r = add_file(api, "romvm", DATA, 4 * P, "roms/rom.bin", read_only=True)
    assert r.read_only and r.file.read_only and r.file.name == "roms/rom.bin"
    assert run_to_exit(api, "romvm") == 0x7F      # it read the file
    stats = api.vms.GetExitStats(pb.VmRef(vm_id="romvm")).total
    # The store became an MMIO write exit nobody claimed: counted and dropped.
    assert stats["mmio_write"] == 1 and stats["unclaimed_mmio"] == 1
    assert (images / "roms" / "rom.bin").read_bytes() == b"\x7f" * (4 * P)
    # Host writes there are refused too: the file is mapped read-only.
    api.assert_code(lambda: api.write("romvm", DATA, b"x"), Code.FAILED_PRECONDITION)
    assert api.memory.SyncGuestMemory(pb.SyncGuestMemoryRequest(
        vm_id="romvm", slot=r.slot)).synced_bytes == 0


def test_symlink_inside_the_directory_is_followed(gm: RunningDaemon, images: Path) -> None:
    api = gm
    api.create_vm("alias")
    r = add_file(api, "alias", DATA, 2 * P, "alias.img", read_only=True)
    assert r.file.name == "alias.img"
    assert api.read("alias", DATA + P, 1) == b"\x41"
    [record] = api.daemon.host.get_vm("alias").file_backed_ranges()
    assert record.identity.same_file(os.stat(images / "disk.img"))


# -- files mapped over part of a slot ----------------------------------------------------


def test_map_sync_unmap_a_file_over_part_of_a_slot(gm: RunningDaemon, images: Path) -> None:
    api = gm
    path = str(images / "disk.img")
    long_mode_vm(api, "overlay", program(load_or(DATA + 4 * P), store(DATA + 4 * P + 1, 0x61)))
    slot = api.add_memory("overlay", DATA, 16 * P).slot
    api.write("overlay", DATA, b"own memory" * 4096)
    own = api.read("overlay", DATA + 4 * P, 2 * P)
    m = api.memory.MapGuestMemory(pb.MapGuestMemoryRequest(
        vm_id="overlay", slot=slot, offset=4 * P, size=2 * P,
        file=memory_file("disk.img", 8 * P)))
    assert (m.slot, m.offset, m.size, m.guest_addr, m.file.name, m.file.offset) == (
        slot, 4 * P, 2 * P, DATA + 4 * P, "disk.img", 8 * P)
    listed = region(api, "overlay", slot)
    assert list(listed.mappings) == [m] and listed.file.name == ""
    assert api.read("overlay", DATA + 4 * P, 1) == b"\x48"
    assert run_to_exit(api, "overlay") == 0x48      # the guest sees the file
    assert api.memory.SyncGuestMemory(pb.SyncGuestMemoryRequest(
        vm_id="overlay", slot=slot, offset=4 * P, size=P)).synced_bytes == P
    assert api.memory.SyncGuestMemory(pb.SyncGuestMemoryRequest(
        vm_id="overlay", slot=slot)).synced_bytes == 2 * P
    with open(path, "rb") as f:
        f.seek(8 * P)
        assert f.read(2) == b"\x48\x61"
    # Discarding the mapped range is refused; the rest of the slot can be discarded.
    api.assert_code(lambda: api.memory.DiscardGuestMemory(pb.DiscardGuestMemoryRequest(
        vm_id="overlay", guest_addr=DATA, size=16 * P)), Code.FAILED_PRECONDITION)
    removed = api.memory.UnmapGuestMemory(pb.UnmapGuestMemoryRequest(
        vm_id="overlay", slot=slot, offset=4 * P, size=2 * P)).mapping
    assert removed == m
    assert api.read("overlay", DATA + 4 * P, 2 * P) == own     # the slot's own memory again
    assert list(region(api, "overlay", slot).mappings) == []
    assert api.daemon.host.get_vm("overlay").file_backed_ranges() == []
    api.assert_code(lambda: api.memory.SyncGuestMemory(pb.SyncGuestMemoryRequest(
        vm_id="overlay", slot=slot)), Code.FAILED_PRECONDITION)


def test_read_only_file_over_a_read_only_slot(gm: RunningDaemon, images: Path) -> None:
    api = gm
    long_mode_vm(api, "rorom", program(load_or(DATA + 8), store(DATA + 8, 0x5A)))
    slot = api.add_memory("rorom", DATA, 8 * P, read_only=True).slot
    api.memory.MapGuestMemory(pb.MapGuestMemoryRequest(
        vm_id="rorom", slot=slot, offset=0, size=P, file=memory_file("small.img",
                                                                     read_only=True)))
    assert api.read("rorom", DATA, 2) == b"\x01\x01"
    assert run_to_exit(api, "rorom") == 0x01      # read the file; the store exited as MMIO
    stats = api.vms.GetExitStats(pb.VmRef(vm_id="rorom")).total
    assert stats["mmio_write"] == 1 and stats["unclaimed_mmio"] == 1
    api.assert_code(lambda: api.write("rorom", DATA, b"x"), Code.FAILED_PRECONDITION)
    api.write("rorom", DATA + P, b"own")               # the slot's own memory: fine
    assert (images / "small.img").read_bytes() == b"\x01" * P


# -- bad input: exact codes, nothing mapped, nothing leaked ------------------------------


def test_file_bad_inputs_map_nothing(gm: RunningDaemon, images: Path) -> None:
    api = gm
    api.create_vm("files")
    slot = api.add_memory("files", DATA, 16 * P).slot
    os.mkfifo(images / "fifo")
    before_regions, before_fds = regions(api, "files"), fd_count()
    in_use = api.hypervisor.GetInfo(pb.GetInfoRequest()).memory_in_use_bytes
    cases = [
        ("/etc/passwd", 0, False, Code.INVALID_ARGUMENT),         # an absolute host path
        (str(images / "disk.img"), 0, False, Code.INVALID_ARGUMENT),  # absolute, even inside
        ("../outside/secret.img", 0, False, Code.INVALID_ARGUMENT),   # ..
        ("roms/../disk.img", 0, False, Code.INVALID_ARGUMENT),
        ("", 0, False, Code.INVALID_ARGUMENT),                    # no name
        (".", 0, False, Code.INVALID_ARGUMENT),                   # the directory itself
        ("escape.img", 0, False, Code.PERMISSION_DENIED),         # symlink out
        ("escape-abs.img", 0, True, Code.PERMISSION_DENIED),      # absolute symlink out
        ("roms/out/secret.img", 0, False, Code.PERMISSION_DENIED),  # a directory symlink out
        ("missing.img", 0, False, Code.NOT_FOUND),
        ("roms", 0, False, Code.INVALID_ARGUMENT),                # a directory
        ("roms", 0, True, Code.INVALID_ARGUMENT),
        ("fifo", 0, False, Code.INVALID_ARGUMENT),                # not a regular file
        ("small.img", 0, False, Code.INVALID_ARGUMENT),           # shorter than the region
        ("disk.img", 12 * P, False, Code.INVALID_ARGUMENT),       # offset + size past its end
        ("disk.img", 1, False, Code.INVALID_ARGUMENT),            # unaligned file offset
    ]
    for name, offset, ro, code in cases:
        too_short = name in ("small.img", "disk.img") and offset % P == 0
        api.assert_code(lambda n=name, o=offset, r=ro: add_file(
            api, "files", DATA + 32 * P, 8 * P, n, o, r), code,
            reason=Reason.RANGE_OUTSIDE_MEMORY if too_short else None)
        # The same file over part of a (writable) slot, opened read-write.
        api.assert_code(lambda n=name, o=offset: api.memory.MapGuestMemory(
            pb.MapGuestMemoryRequest(vm_id="files", slot=slot, offset=0, size=8 * P,
                                     file=memory_file(n, o))), code)
    # Region arguments are checked as for any slot.
    for addr, size, code in ((DATA + 32 * P + 1, P, Code.INVALID_ARGUMENT),
                             (DATA + 32 * P, 0, Code.INVALID_ARGUMENT),
                             (DATA + 8 * P, P, Code.ALREADY_EXISTS)):      # overlaps slot 0
        api.assert_code(lambda a=addr, s=size: add_file(api, "files", a, s, "disk.img"), code)
    assert regions(api, "files") == before_regions
    assert api.hypervisor.GetInfo(pb.GetInfoRequest()).memory_in_use_bytes == in_use
    assert api.daemon.host.get_vm("files").file_backed_ranges() == []
    assert fd_count() == before_fds
    assert (images.parent / "outside" / "secret.img").read_bytes() == b"\x55" * (16 * P)


def test_mapping_bad_inputs_map_nothing(gm: RunningDaemon) -> None:
    api = gm
    api.create_vm("maps")
    slot = api.add_memory("maps", DATA, 16 * P).slot
    ro_slot = api.add_memory("maps", DATA + 16 * P, 4 * P, read_only=True).slot
    file_slot = add_file(api, "maps", DATA + 32 * P, 4 * P, "disk.img").slot
    api.memory.MapGuestMemory(pb.MapGuestMemoryRequest(
        vm_id="maps", slot=slot, offset=8 * P, size=2 * P, file=memory_file("disk.img")))
    before_regions, before_fds = regions(api, "maps"), fd_count()

    def map_(slot: int, offset: int, size: int, file: pb.MemoryFile | None,
             vm_id: str = "maps") -> object:
        request = pb.MapGuestMemoryRequest(vm_id=vm_id, slot=slot, offset=offset, size=size)
        if file is not None:
            request.file.CopyFrom(file)
        return api.memory.MapGuestMemory(request)

    disk = memory_file("disk.img")
    for args, code in (
        ((slot + 9, 0, P, disk), Code.NOT_FOUND),                 # no such slot
        ((slot, 0, P, disk, "nope"), Code.NOT_FOUND),             # no such VM
        ((slot, 1, P, disk), Code.INVALID_ARGUMENT),              # unaligned offset
        ((slot, 0, P + 1, disk), Code.INVALID_ARGUMENT),          # unaligned size
        ((slot, 0, 0, disk), Code.INVALID_ARGUMENT),              # empty
        ((slot, 15 * P, 2 * P, disk), Code.INVALID_ARGUMENT),     # past the slot's end
        ((slot, 0, P, None), Code.INVALID_ARGUMENT),              # no file
        ((slot, 9 * P, P, disk), Code.ALREADY_EXISTS),            # overlaps the mapped file
        ((file_slot, 0, P, disk), Code.FAILED_PRECONDITION),      # a file-backed slot
        ((slot, 0, P, memory_file("disk.img", read_only=True)),   # read-only file over a
         Code.FAILED_PRECONDITION),                               # writable slot
    ):
        api.assert_code(lambda a=args: map_(*a), code)
    # No file at all names the missing field (not the empty name of a default file).
    api.assert_code(lambda: map_(slot, 0, P, None), Code.INVALID_ARGUMENT,
                    reason=Reason.FIELD_REQUIRED, field="file")
    for args, code in (((slot, 8 * P, P), Code.NOT_FOUND),       # not exactly as mapped
                       ((slot, 0, P), Code.NOT_FOUND),            # nothing there
                       ((file_slot, 0, 4 * P), Code.NOT_FOUND),   # a whole-slot file
                       ((slot + 9, 0, P), Code.NOT_FOUND)):       # no such slot
        api.assert_code(lambda a=args: api.memory.UnmapGuestMemory(pb.UnmapGuestMemoryRequest(
            vm_id="maps", slot=a[0], offset=a[1], size=a[2])), code)
    for args, code in (((ro_slot, 0, 0), Code.FAILED_PRECONDITION),   # no file in it
                       ((slot, 0, 4 * P), Code.FAILED_PRECONDITION),  # none in that range
                       ((slot, 1, 0), Code.INVALID_ARGUMENT),
                       ((slot, 0, P + 1), Code.INVALID_ARGUMENT),
                       ((slot, 16 * P, 0), Code.INVALID_ARGUMENT),     # outside the slot
                       ((slot, 8 * P, 16 * P), Code.INVALID_ARGUMENT),
                       ((slot + 9, 0, 0), Code.NOT_FOUND)):
        api.assert_code(lambda a=args: api.memory.SyncGuestMemory(pb.SyncGuestMemoryRequest(
            vm_id="maps", slot=a[0], offset=a[1], size=a[2])), code)
    assert regions(api, "maps") == before_regions
    assert fd_count() == before_fds
    assert len(api.daemon.host.get_vm("maps").file_backed_ranges()) == 2


def test_without_an_images_directory_files_are_refused(daemon_factory: DaemonFactory,
                                                        tmp_path: Path) -> None:
    # The default directory may be absent: the daemon starts, file-backed memory is off.
    # (An in-process daemon with a directory that vanished after start behaves the same.)
    images = tmp_path / "gone"
    images.mkdir()
    api = daemon_factory(images_dir=str(images))
    images.rmdir()
    api.create_vm("noimg")
    api.assert_code(lambda: add_file(api, "noimg", 0, P, "disk.img"),
                    Code.FAILED_PRECONDITION)
    assert regions(api, "noimg") == []
    api.add_memory("noimg", 0, P)
    assert api.memory.DiscardGuestMemory(pb.DiscardGuestMemoryRequest(
        vm_id="noimg", guest_addr=0, size=P)).released_bytes == 0


def test_deleting_a_vm_releases_its_files(gm: RunningDaemon, images: Path) -> None:
    api = gm
    api.assert_healthy()   # the channel is connected (its sockets exist) before counting
    before = fd_count()
    api.create_vm("gone")
    slot = api.add_memory("gone", DATA, 16 * P).slot
    add_file(api, "gone", DATA + 16 * P, 4 * P, "disk.img")
    api.memory.MapGuestMemory(pb.MapGuestMemoryRequest(
        vm_id="gone", slot=slot, offset=0, size=P, file=memory_file("disk.img", 4 * P)))
    api.write("gone", DATA, b"through the overlay")
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="gone"))
    assert fd_count() == before
    with open(images / "disk.img", "rb") as f:
        f.seek(4 * P)
        assert f.read(19) == b"through the overlay"


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("setup", ["relative", "missing", "a-file", "world-writable"])
def test_bad_images_dir_is_refused_before_serving(tmp_path: Path, setup: str) -> None:
    path = {"relative": "images", "missing": str(tmp_path / "missing"),
            "a-file": str(tmp_path / "file"), "world-writable": str(tmp_path / "ww")}[setup]
    if setup == "a-file":
        (tmp_path / "file").write_bytes(b"")
    if setup == "world-writable":
        (tmp_path / "ww").mkdir()
        os.chmod(tmp_path / "ww", 0o777)
    with pytest.raises(ConfigError, match="images_dir"):
        Daemon(Config(listen=[f"unix://{tmp_path}/k.sock"], images_dir=path,
                      log_level="warning"))
    assert not (tmp_path / "k.sock").exists()
