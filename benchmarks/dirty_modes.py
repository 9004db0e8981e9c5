"""Harvest cost of the three dirty-tracking modes, per GiB of fully dirtied guest memory.

One VM per mode, each with one dirty-logged slot (default 512 MiB) that a long-mode guest
dirties completely (one store per page; host writes are never logged), then:

* bitmap: KVM_GET_DIRTY_LOG, which returns and re-protects every page in one call;
* manual: KVM_GET_DIRTY_LOG (read only) + KVM_CLEAR_DIRTY_LOG of the whole slot;
* ring:   the guest's stores fill the vCPU's dirty ring (the largest the kernel offers);
          each DirtyRingFullExit is answered with a harvest (C, into DirtyBitmaps) and
          KVM_RESET_DIRTY_RINGS. The guest exits every 32 stores (see below).

Each mode runs `--rounds` dirty passes; the script prints the median time of the harvest
per GiB (and per page) and, for scale, the guest's own time per pass. References measured
in the same run: for the ring, the same entries harvested by a Python loop over the ring
(what the C helper saves); for the bitmap modes, the bare cost of one ioctl from Python
(KVM_CHECK_EXTENSION), which is all the binding adds to the kernel's work. It also times
the zero-page scan (`nonzero_page_runs`) over the dirtied slot. Not a test: it asserts
nothing about speed.

    .venv/bin/python benchmarks/dirty_modes.py [--mib N] [--rounds N]

On PVM hosts every guest store is emulated and written through the host mapping, so
there are few or no guest page-table entries for KVM to write-protect: the re-protect part
of GET (bitmap mode), CLEAR and RESET costs far less here than with hardware
virtualization, where it walks and write-protects the SPTEs of every dirty page. Compare
the modes' bookkeeping here, not absolute numbers. And a tight store loop overruns a
soft-full dirty ring there (the exit comes late and entries are lost; see
tests/kvm/test_kvm_dirty.py), so the ring guest does `out` after every 32 stores: KVM
re-checks the ring at each exit, and 32 is below its 64 reserved entries.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
from collections.abc import Callable

from kvmd.kvm import (
    PAGE_SIZE,
    DirtyRingFullExit,
    HltExit,
    IoExit,
    Kvm,
    Regs,
    Segment,
    Vcpu,
    Vm,
)
from kvmd.kvm._ffi import ffi, lib

GiB = 1 << 30
CODE_ADDR = 0x1000
PML4_ADDR = 0x9000
GDT_ADDR = 0x8000
SLOT_ADDR = 1 << 30          # the logged slot: guest physical 1 GiB and up (identity mapped)
MAP_GIB = 4                  # the guest's identity map covers 4 GiB (2 MiB pages)
STORES_PER_EXIT = 32


def guest_program(pages: int, out_every: int) -> bytes:
    """64-bit: one store per page of the slot; `out 0xe9, al` after every `out_every`
    stores (0: never), hlt at the end."""
    body = bytes([0xC6, 0x03, 0xDD])                           # loop: mov byte [rbx], 0xdd
    body += bytes([0x48, 0x81, 0xC3]) + struct.pack("<I", PAGE_SIZE)  # add rbx, PAGE_SIZE
    if out_every:
        body += bytes([0xFF, 0xCA,                             #       dec edx
                       0x75, 0x07,                             #       jnz +7
                       0xE6, 0xE9,                             #       out 0xe9, al
                       0xBA]) + struct.pack("<I", out_every)   #       mov edx, out_every
    body += bytes([0xFF, 0xC9])                                #       dec ecx
    return (bytes([0x48, 0xBB]) + struct.pack("<Q", SLOT_ADDR)  # mov rbx, SLOT_ADDR
            + bytes([0xB9]) + struct.pack("<I", pages)          # mov ecx, pages
            + bytes([0xBA]) + struct.pack("<I", out_every or 1)  # mov edx, out_every
            + body + bytes([0x75, -(len(body) + 2) & 0xFF])     #       jnz loop
            + bytes([0xF4]))                                    # hlt


def setup_guest(vm: Vm, code: bytes) -> Vcpu:
    """Code slot at 0, identity map of MAP_GIB GiB, a vCPU in long mode at CODE_ADDR."""
    vm.add_memory_region(0, 0x10000)
    vm.write(CODE_ADDR, code)
    flags = 0x3  # present, writable
    pdpt_addr = PML4_ADDR + PAGE_SIZE
    vm.write(PML4_ADDR, struct.pack("<Q", pdpt_addr | flags))
    pds = [PML4_ADDR + (2 + i) * PAGE_SIZE for i in range(MAP_GIB)]
    vm.write(pdpt_addr, b"".join(struct.pack("<Q", pd | flags) for pd in pds))
    for g, pd in enumerate(pds):
        vm.write(pd, b"".join(struct.pack("<Q", ((g * 512 + i) << 21) | flags | 0x80)
                              for i in range(512)))
    vm.write(GDT_ADDR, struct.pack("<QQQ", 0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF))
    vcpu = vm.create_vcpu(0)
    s = vcpu.get_sregs()
    s.cs = Segment(base=0, limit=0xFFFFFFFF, selector=8, type=11, present=1, s=1, l=1, g=1)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(s, name, Segment(base=0, limit=0xFFFFFFFF, selector=16, type=3, present=1,
                                 db=1, s=1, g=1))
    s.gdt.base, s.gdt.limit = GDT_ADDR, 23
    s.cr0, s.cr3, s.cr4, s.efer = 0x80000031, PML4_ADDR, 0x20, 0x500
    vcpu.set_sregs(s)
    return vcpu


def restart(vcpu: Vcpu) -> None:
    vcpu.set_regs(Regs(rip=CODE_ADDR, rsp=0x8000, rflags=2))


def run_pass(vcpu: Vcpu, on_full: Callable[[], None] | None = None) -> float:
    """Run the guest to its hlt; returns the seconds spent in the guest (not in on_full)."""
    restart(vcpu)
    guest = 0.0
    while True:
        t = time.perf_counter()
        ex = vcpu.run()
        guest += time.perf_counter() - t
        if isinstance(ex, HltExit):
            return guest
        if isinstance(ex, DirtyRingFullExit) and on_full is not None:
            on_full()
            continue
        if not isinstance(ex, IoExit):
            sys.exit(f"dirty_modes: unexpected exit {ex}")


def bench_bitmap(kvm: Kvm, size: int, rounds: int) -> tuple[list[float], list[float]]:
    with kvm.create_vm() as vm:
        vcpu = setup_guest(vm, guest_program(size // PAGE_SIZE, 0))
        slot = vm.add_memory_region(SLOT_ADDR, size, log_dirty=True)
        harvest, guest = [], []
        for _ in range(rounds):
            guest.append(run_pass(vcpu))
            t = time.perf_counter()
            log = vm.get_dirty_log(slot)
            harvest.append(time.perf_counter() - t)
            assert log == b"\xff" * len(log), "not every page was dirty"
        return harvest, guest


def bench_manual(kvm: Kvm, size: int, rounds: int) -> tuple[list[float], list[float]]:
    with kvm.create_vm() as vm:
        vm.enable_manual_dirty_log_protect(initially_set=False)
        vcpu = setup_guest(vm, guest_program(size // PAGE_SIZE, 0))
        slot = vm.add_memory_region(SLOT_ADDR, size, log_dirty=True)
        pages = size // PAGE_SIZE
        harvest, guest = [], []
        for _ in range(rounds):
            guest.append(run_pass(vcpu))
            t = time.perf_counter()
            log = vm.get_dirty_log(slot)
            vm.clear_dirty_log(slot, 0, pages, log)
            harvest.append(time.perf_counter() - t)
            assert log == b"\xff" * len(log), "not every page was dirty"
        return harvest, guest


def bench_ring(kvm: Kvm, size: int, rounds: int) -> tuple[list[float], list[float], float]:
    """(harvest+reset seconds per pass, guest seconds per pass, Python-loop harvest
    seconds per entry)."""
    with kvm.create_vm() as vm:
        vm.enable_dirty_ring(vm.dirty_log_modes().ring_max_bytes)
        vcpu = setup_guest(vm, guest_program(size // PAGE_SIZE, STORES_PER_EXIT))
        vm.add_memory_region(SLOT_ADDR, size, log_dirty=True)
        harvest, guest = [], []
        for _ in range(rounds):
            bitmaps = vm.dirty_bitmaps()
            spent = [0.0]

            def on_full(bitmaps: object = bitmaps, spent: list[float] = spent) -> None:
                t = time.perf_counter()
                vm.harvest_dirty_rings(bitmaps)  # type: ignore[arg-type]
                vm.reset_dirty_rings()
                spent[0] += time.perf_counter() - t

            guest.append(run_pass(vcpu, on_full))
            on_full()
            harvest.append(spent[0])
            assert bitmaps.count() == size // PAGE_SIZE, bitmaps.count()
        # Reference: the same harvest as a Python loop over the entries of one ring (a
        # pass run until the ring is full or the guest halts).
        restart(vcpu)
        while not isinstance(vcpu.run(), DirtyRingFullExit | HltExit):
            pass
        ring = vcpu._dirty_ring
        assert ring is not None
        gfns, entries = ring._gfns, ring.entries
        words: dict[int, bytearray] = {}
        t = time.perf_counter()
        index, n = ring.fetch_index, 0
        while True:
            gfn = gfns[index % entries]
            if gfn.flags != lib.KVM_DIRTY_GFN_F_DIRTY:
                break
            page = int(gfn.offset)
            bm = words.setdefault(int(gfn.slot), bytearray(size // PAGE_SIZE // 8))
            bm[page >> 3] |= 1 << (page & 7)
            gfn.flags = lib.KVM_DIRTY_GFN_F_RESET
            index += 1
            n += 1
        per_entry = (time.perf_counter() - t) / max(n, 1)
        ring._fetch_index[0] = index
        vm.reset_dirty_rings()
        return harvest, guest, per_entry


def bench_scan(kvm: Kvm, size: int) -> tuple[float, float, float]:
    """(populated_ranges seconds, nonzero_page_runs seconds, memcpy seconds) over `size`
    bytes, of which one page in 64 holds data (host-written) and the rest zeros. The memcpy
    of the whole slot into a buffer already faulted in is the reference: reading the memory
    once, in C."""
    with kvm.create_vm() as vm:
        slot = vm.add_memory_region(SLOT_ADDR, size)
        chunk = bytearray(64 * PAGE_SIZE)
        chunk[5] = 1
        for off in range(0, size, len(chunk)):
            vm.write(SLOT_ADDR + off, chunk)
        t = time.perf_counter()
        vm.populated_ranges(slot)
        populated = time.perf_counter() - t
        t = time.perf_counter()
        runs = vm.nonzero_page_runs(slot)
        scan = time.perf_counter() - t
        assert len(runs) == size // len(chunk)
        src = vm._regions[slot].ptr
        dst = ffi.new("uint8_t[]", size)
        ffi.memmove(dst, src, size)   # fault the destination in first
        t = time.perf_counter()
        ffi.memmove(dst, src, size)
        copy = time.perf_counter() - t
        return populated, scan, copy


def ioctl_floor(kvm: Kvm) -> float:
    fd, cap = kvm.fileno(), ffi.cast("unsigned long", 0)
    n = 20000
    t = time.perf_counter()
    for _ in range(n):
        lib.ioctl(fd, lib.KVM_CHECK_EXTENSION, cap)
    return (time.perf_counter() - t) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="logged slot size in MiB")
    parser.add_argument("--rounds", type=int, default=3, help="dirty passes per mode")
    args = parser.parse_args()
    size = args.mib << 20
    pages = size // PAGE_SIZE
    if size > (MAP_GIB - 1) * GiB:
        sys.exit(f"dirty_modes: at most {(MAP_GIB - 1) * 1024} MiB")
    with Kvm() as kvm:
        modes = kvm.dirty_log_modes()
        if not (modes.manual_protect and modes.ring):
            sys.exit(f"dirty_modes: this kernel lacks a mode: {modes}")
        start = time.perf_counter()
        bitmap, bitmap_guest = bench_bitmap(kvm, size, args.rounds)
        manual, manual_guest = bench_manual(kvm, size, args.rounds)
        ring, ring_guest, py_entry = bench_ring(kvm, size, args.rounds)
        populated, scan, copy = bench_scan(kvm, size)
        floor = ioctl_floor(kvm)
        total = time.perf_counter() - start

    gib = size / GiB
    print(f"{args.mib} MiB slot, {pages} pages, every page dirtied by the guest, "
          f"median of {args.rounds} passes; ring {modes.ring_max_bytes >> 10} KiB per vCPU")
    header = (f"{'mode':<44} {'ms/pass':>9} {'ms/GiB':>9} {'ns/page':>8} "
              f"{'guest ms/pass':>14}")
    print(header)
    print("-" * len(header))
    rows = [
        ("bitmap: GET_DIRTY_LOG (returns + re-protects)", bitmap, bitmap_guest),
        ("manual: GET_DIRTY_LOG + CLEAR_DIRTY_LOG", manual, manual_guest),
        ("ring: harvest (C) + RESET_DIRTY_RINGS", ring, ring_guest),
    ]
    for name, times, guest in rows:
        med = statistics.median(times)
        print(f"{name:<44} {med * 1e3:>9.2f} {med / gib * 1e3:>9.2f} "
              f"{med / pages * 1e9:>8.1f} {statistics.median(guest) * 1e3:>14.0f}")
    ring_med = statistics.median(ring)
    print(f"{'reference: ring harvest as a Python loop':<44} {py_entry * pages * 1e3:>9.2f} "
          f"{py_entry * pages / gib * 1e3:>9.2f} {py_entry * 1e9:>8.1f}   "
          f"({py_entry * pages / ring_med:.0f}x the C harvest + reset)")
    print(f"{'reference: one bare ioctl from Python':<44} {floor * 1e3:>9.4f}")
    print(f"zero-page scan of {args.mib} MiB (1 page in 64 non-zero): populated_ranges "
          f"{populated * 1e3:.2f} ms, nonzero_page_runs {scan * 1e3:.1f} ms "
          f"({gib / scan:.1f} GiB/s); reference: memcpy of the slot "
          f"{copy * 1e3:.1f} ms ({gib / copy:.1f} GiB/s)")
    print(f"total {total:.1f} s")


if __name__ == "__main__":
    main()
