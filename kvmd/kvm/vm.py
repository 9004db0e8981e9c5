"""Vm: one KVM VM fd, its guest memory, vCPUs, irqfds, ioeventfds and devices."""

from __future__ import annotations

import bisect
import errno
import os
import threading
from dataclasses import dataclass
from typing import Literal, overload

from kvmd.kvm._ffi import ffi, ioctl, lib
from kvmd.kvm.errors import KvmError, check, invalid
from kvmd.kvm.eventfd import HasFileno, fd_of
from kvmd.kvm.memory import (
    PAGE_SIZE,
    GuestMemoryRegion,
    MemoryRegionInfo,
    dirty_log_bitmap_size,
    round_up_to_page,
)
from kvmd.kvm.state_types import (
    PIC_STATE_FIELDS,
    PIT_CHANNEL_FIELDS,
    XSAVE_LEGACY_SIZE,
    ClockData,
    IoapicState,
    PicState,
    PitChannelState,
    PitState,
)
from kvmd.kvm.stats import StatsReader
from kvmd.kvm.types import (
    Datamatch,
    IoEventAddress,
    IoSpace,
    IrqChip,
    IrqChipRoute,
    IrqRoute,
    MsiRoute,
)
from kvmd.kvm.vcpu import Vcpu, enable_cap_struct

GUEST_ADDR_LIMIT = 1 << 52  # x86_64 architectural maximum guest physical address width
MAX_IRQ_ROUTES = 4096  # KVM_MAX_IRQ_ROUTES
PIC_PINS = 8
IOAPIC_PINS = 24
KVM_MSI_VALID_DEVID = 1
PIO_LIMIT = 1 << 16
ANY_WRITE = Datamatch()  # the default ioeventfd match: any write, of any length


@dataclass(frozen=True)
class Device:
    """A device created with KVM_CREATE_DEVICE; its fd is owned by the Vm."""

    type: int
    fd: int

    def fileno(self) -> int:
        return self.fd


class Vm:
    """A VM. Owns its guest memory (memfd mappings it makes itself), vCPUs, devices and
    stats fd; `close()` releases all of them. Safe to call from several threads: the
    memory table is guarded so a read can never race with the unmapping of its slot."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        self._fd = fd
        self._vcpu_mmap_size = vcpu_mmap_size
        self._lock = threading.RLock()
        self._regions: dict[int, GuestMemoryRegion] = {}
        self._starts: list[int] = []  # sorted guest addresses, for lookups
        self._by_start: dict[int, GuestMemoryRegion] = {}
        self._vcpus: dict[int, Vcpu] = {}
        self._devices: list[Device] = []
        self._irqfds: set[tuple[int, int]] = set()
        self._ioevents: dict[tuple[IoSpace, int, int, int | None], int] = {}
        self._stats: StatsReader | None = None
        self._max_slots = self.check_extension("KVM_CAP_NR_MEMSLOTS") or 32

    # -- lifetime -------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Stop and close every vCPU, close devices and the VM fd, then unmap guest memory."""
        with self._lock:
            if self._fd < 0:
                return
            for vcpu in self._vcpus.values():
                vcpu.close()
            self._vcpus.clear()
            for dev in self._devices:
                os.close(dev.fd)
            self._devices.clear()
            if self._stats is not None:
                self._stats.close()
                self._stats = None
            fd, self._fd = self._fd, -1
            os.close(fd)
            # The kernel drops its references to our pages with the last VM reference;
            # unmapping after the fd is closed means no vCPU can touch them meanwhile.
            for region in self._regions.values():
                region.close()
            self._regions.clear()
            self._starts.clear()
            self._by_start.clear()
            self._irqfds.clear()
            self._ioevents.clear()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_fd(self, op: str) -> int:
        if self._fd < 0:
            raise KvmError(errno.EBADF, op, "vm is closed")
        return self._fd

    # -- capabilities ---------------------------------------------------------------------

    def check_extension(self, cap: int | str) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (answers may differ from /dev/kvm's)."""
        from kvmd.kvm.system import capability_number

        return ioctl(self._open_fd("KVM_CHECK_EXTENSION"), "KVM_CHECK_EXTENSION",
                     capability_number(cap))

    def enable_cap(self, cap: int | str, args: tuple[int, ...] = (), flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM."""
        from kvmd.kvm.system import capability_number

        ioctl(self._open_fd("KVM_ENABLE_CAP"), "KVM_ENABLE_CAP",
              enable_cap_struct(capability_number(cap), args, flags))

    @property
    def max_memory_slots(self) -> int:
        return self._max_slots

    # -- guest memory ---------------------------------------------------------------------

    def add_memory_region(self, guest_addr: int, size: int, read_only: bool = False,
                          log_dirty: bool = False) -> int:
        """Map `size` bytes (rounded up to pages) of new zeroed memory at `guest_addr`.

        Returns the slot: the lowest free slot number, so freed slots are reused first.
        Refuses zero or negative sizes and unaligned addresses (EINVAL), ranges past the
        guest physical address space (EOVERFLOW), overlaps (EEXIST) and a full slot table
        (ENOSPC).
        """
        op = "KVM_SET_USER_MEMORY_REGION"
        if not isinstance(guest_addr, int) or guest_addr < 0 or guest_addr % PAGE_SIZE:
            raise invalid(op, f"guest address {guest_addr!r} is not page aligned")
        if not isinstance(size, int) or size <= 0:
            raise invalid(op, f"size {size!r} must be positive")
        size = round_up_to_page(size)
        if guest_addr + size > GUEST_ADDR_LIMIT:
            raise invalid(op, f"{guest_addr:#x}+{size:#x} is beyond guest physical addresses",
                          errno.EOVERFLOW)
        if read_only and log_dirty:
            raise invalid(op, "a read-only slot cannot log dirty pages")
        with self._lock:
            fd = self._open_fd(op)
            clash = self._overlapping(guest_addr, size)
            if clash is not None:
                raise invalid(op, f"{guest_addr:#x}+{size:#x} overlaps slot {clash.slot} at "
                              f"{clash.guest_addr:#x}+{clash.size:#x}", errno.EEXIST)
            slot = next(i for i in range(len(self._regions) + 1) if i not in self._regions)
            if slot >= self._max_slots:
                raise invalid(op, f"all {self._max_slots} memory slots are in use",
                              errno.ENOSPC)
            info = MemoryRegionInfo(slot, guest_addr, size, read_only, log_dirty)
            region = GuestMemoryRegion(info, f"kvmd-slot{slot}")
            try:
                self._set_region(fd, info, region.host_address)
            except BaseException:
                region.close()
                raise
            self._regions[slot] = region
            bisect.insort(self._starts, guest_addr)
            self._by_start[guest_addr] = region
            return slot

    def remove_memory_region(self, slot: int) -> MemoryRegionInfo:
        """Unmap a slot from the guest and release its memory; returns what it mapped."""
        op = "KVM_SET_USER_MEMORY_REGION"
        with self._lock:
            fd = self._open_fd(op)
            region = self._regions.get(slot)
            if region is None:
                raise invalid(op, f"no memory slot {slot}", errno.ENOENT)
            info = region.info
            self._set_region(fd, MemoryRegionInfo(slot, 0, 0, False, False), 0)
            del self._regions[slot]
            self._starts.remove(info.guest_addr)
            del self._by_start[info.guest_addr]
            region.close()
            return info

    def memory_regions(self) -> list[MemoryRegionInfo]:
        """Every slot, in guest address order."""
        with self._lock:
            return [self._by_start[a].info for a in self._starts]

    def memory_region(self, slot: int) -> MemoryRegionInfo:
        with self._lock:
            region = self._regions.get(slot)
            if region is None:
                raise invalid("memory_region", f"no memory slot {slot}", errno.ENOENT)
            return region.info

    def memory_fd(self, slot: int) -> int:
        """The memfd behind a slot (still owned by the Vm)."""
        with self._lock:
            self._open_fd("memory_fd")
            region = self._regions.get(slot)
            if region is None:
                raise invalid("memory_fd", f"no memory slot {slot}", errno.ENOENT)
            return region.memfd

    @property
    def memory_size(self) -> int:
        with self._lock:
            return sum(r.info.size for r in self._regions.values())

    def msync_memory_region(self, slot: int, offset: int, size: int) -> None:
        """msync part of a slot's memory to its backing file."""
        with self._lock:
            self._open_fd("msync")
            region = self._regions.get(slot)
            if region is None:
                raise invalid("msync", f"no memory slot {slot}", errno.ENOENT)
            if offset < 0 or size < 0 or offset + size > region.info.size:
                raise invalid("msync", f"{offset:#x}+{size:#x} is outside slot {slot}",
                              errno.EFAULT)
            if offset % PAGE_SIZE:
                raise invalid("msync", "offset must be page aligned")
            region.msync(offset, size)

    def read(self, guest_addr: int, length: int) -> bytes:
        """Read guest memory at a guest physical address; the range may span adjacent slots
        but must be backed throughout (else EFAULT)."""
        if length < 0:
            raise invalid("read", "negative length")
        with self._lock:
            self._open_fd("read")
            return b"".join(region.read(off, n) for region, off, n in
                            self._pieces("read", guest_addr, length))

    def write(self, guest_addr: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest memory (host writes do not mark the dirty log; read-only slots are
        writable from the host, as in KVM)."""
        view = memoryview(data).cast("B")
        with self._lock:
            self._open_fd("write")
            done = 0
            for region, off, n in self._pieces("write", guest_addr, len(view)):
                region.write(off, view[done : done + n])
                done += n

    def _pieces(self, op: str, guest_addr: int, length: int
                ) -> list[tuple[GuestMemoryRegion, int, int]]:
        if guest_addr < 0 or guest_addr + length > GUEST_ADDR_LIMIT:
            raise invalid(op, f"address {guest_addr:#x} is outside guest memory", errno.EFAULT)
        pieces: list[tuple[GuestMemoryRegion, int, int]] = []
        addr, end = guest_addr, guest_addr + length
        while addr < end or (length == 0 and not pieces):
            region = self._region_at(addr)
            if region is None:
                raise invalid(op, f"guest address {addr:#x} is not backed by memory",
                              errno.EFAULT)
            n = min(end, region.info.end) - addr
            pieces.append((region, addr - region.info.guest_addr, n))
            addr += n
            if length == 0:
                break
        return pieces

    def _region_at(self, addr: int) -> GuestMemoryRegion | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        region = self._by_start[self._starts[i]]
        return region if addr < region.info.end else None

    def _overlapping(self, start: int, size: int) -> MemoryRegionInfo | None:
        for region in self._regions.values():
            if start < region.info.end and region.info.guest_addr < start + size:
                return region.info
        return None

    def _set_region(self, fd: int, info: MemoryRegionInfo, host_addr: int) -> None:
        r = ffi.new("struct kvm_userspace_memory_region *")
        r.slot = info.slot
        r.flags = ((lib.KVM_MEM_READONLY if info.read_only else 0)
                   | (lib.KVM_MEM_LOG_DIRTY_PAGES if info.log_dirty else 0))
        r.guest_phys_addr = info.guest_addr
        r.memory_size = info.size
        r.userspace_addr = host_addr
        ioctl(fd, "KVM_SET_USER_MEMORY_REGION", r)

    def get_dirty_log(self, slot: int) -> bytes:
        """The slot's dirty bitmap (one bit per page, dirty_log_bitmap_size bytes); reading
        it resets the log, as KVM does. Only guest writes mark pages."""
        op = "KVM_GET_DIRTY_LOG"
        with self._lock:
            fd = self._open_fd(op)
            region = self._regions.get(slot)
            if region is None:
                raise invalid(op, f"no memory slot {slot}", errno.ENOENT)
            if not region.info.log_dirty:
                raise invalid(op, f"slot {slot} was added without dirty logging")
            size = dirty_log_bitmap_size(region.info.size)
            # The kernel writes whole 64-bit words.
            buf = ffi.new("uint8_t[]", (size + 7) // 8 * 8)
            check(lib.kvmd_get_dirty_log(fd, slot, buf), op)
            return bytes(ffi.buffer(buf, size))

    # -- interrupt controller, timers -----------------------------------------------------

    def create_irq_chip(self) -> None:
        """The in-kernel PIC, IOAPIC and per-vCPU LAPICs (create before vCPUs)."""
        ioctl(self._open_fd("KVM_CREATE_IRQCHIP"), "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        """The in-kernel i8254 PIT (needs the irqchip)."""
        cfg = ffi.new("struct kvm_pit_config *")
        cfg.flags = lib.KVM_PIT_SPEAKER_DUMMY
        ioctl(self._open_fd("KVM_CREATE_PIT2"), "KVM_CREATE_PIT2", cfg)

    def set_tss_address(self, addr: int) -> None:
        """Three pages of guest physical space Intel VMX needs for real mode (KVM_SET_TSS_ADDR)."""
        ioctl(self._open_fd("KVM_SET_TSS_ADDR"), "KVM_SET_TSS_ADDR", addr)

    def set_identity_map_address(self, addr: int) -> None:
        """One page for the EPT identity map (KVM_SET_IDENTITY_MAP_ADDR); before vCPUs."""
        a = ffi.new("uint64_t *", addr)
        ioctl(self._open_fd("KVM_SET_IDENTITY_MAP_ADDR"), "KVM_SET_IDENTITY_MAP_ADDR", a)

    def set_irq_line(self, irq: int, active: bool) -> None:
        """Raise or lower an in-kernel irqchip input (KVM_IRQ_LINE)."""
        if not 0 <= irq < MAX_IRQ_ROUTES:
            raise invalid("KVM_IRQ_LINE", f"irq {irq} out of range")
        check(lib.kvmd_irq_line(self._open_fd("KVM_IRQ_LINE"), irq, 1 if active else 0),
              "KVM_IRQ_LINE")

    def register_irqfd(self, gsi: int, event: HasFileno | int,
                       resample: HasFileno | int | None = None) -> None:
        """Inject GSI `gsi` whenever `event` is written. With `resample`, the line is
        level-triggered and `resample` is signalled when the guest acknowledges it.
        The same (gsi, eventfd) twice is refused (EEXIST)."""
        op = "KVM_IRQFD"
        efd = fd_of(event)
        if not 0 <= gsi < MAX_IRQ_ROUTES:
            raise invalid(op, f"gsi {gsi} out of range")
        with self._lock:
            fd = self._open_fd(op)
            if (gsi, efd) in self._irqfds:
                raise invalid(op, f"eventfd {efd} is already registered on gsi {gsi}",
                              errno.EEXIST)
            s = ffi.new("struct kvm_irqfd *")
            s.fd, s.gsi = efd, gsi
            if resample is not None:
                s.flags = lib.KVM_IRQFD_FLAG_RESAMPLE
                s.resamplefd = fd_of(resample) & 0xFFFFFFFF
            ioctl(fd, op, s)
            self._irqfds.add((gsi, efd))

    def unregister_irqfd(self, gsi: int, event: HasFileno | int) -> None:
        """Detach an irqfd. KVM does not report unknown pairs, so this binding tracks them
        and refuses what was never registered (ENOENT)."""
        op = "KVM_IRQFD"
        efd = fd_of(event)
        with self._lock:
            fd = self._open_fd(op)
            if (gsi, efd) not in self._irqfds:
                raise invalid(op, f"eventfd {efd} is not registered on gsi {gsi}", errno.ENOENT)
            s = ffi.new("struct kvm_irqfd *")
            s.fd, s.gsi, s.flags = efd, gsi, lib.KVM_IRQFD_FLAG_DEASSIGN
            ioctl(fd, op, s)
            self._irqfds.discard((gsi, efd))

    def set_gsi_routing(self, routes: list[IrqRoute]) -> None:
        """Replace the whole GSI routing table (irqchip pins and MSI messages)."""
        op = "KVM_SET_GSI_ROUTING"
        if len(routes) > MAX_IRQ_ROUTES:
            raise invalid(op, f"at most {MAX_IRQ_ROUTES} routes")
        arr = ffi.new("struct kvmd_route[]", max(1, len(routes)))
        for i, route in enumerate(routes):
            dst = arr[i]
            if not isinstance(route, IrqChipRoute | MsiRoute):
                raise invalid(op, f"not a route: {route!r}")
            if not 0 <= route.gsi < MAX_IRQ_ROUTES:
                raise invalid(op, f"gsi {route.gsi} out of range")
            dst.gsi = route.gsi
            if isinstance(route, IrqChipRoute):
                if route.chip not in tuple(IrqChip):
                    raise invalid(op, f"irqchip {route.chip!r} is not PIC_MASTER (0), "
                                  "PIC_SLAVE (1) or IOAPIC (2)")
                pins = IOAPIC_PINS if route.chip == IrqChip.IOAPIC else PIC_PINS
                if not 0 <= route.pin < pins:
                    chip = (IrqChip(route.chip).name if route.chip in tuple(IrqChip)
                            else f"unknown irqchip {int(route.chip)}")
                    raise invalid(op, f"pin {route.pin} is not a pin of {chip}")
                dst.kind, dst.irqchip, dst.pin = 0, int(route.chip), route.pin
            else:
                if not 0 <= route.address < 1 << 64 or not 0 <= route.data < 1 << 32:
                    raise invalid(op, "MSI address must fit 64 bits and data 32 bits")
                if route.devid is not None and not 0 <= route.devid < 1 << 32:
                    raise invalid(op, "MSI devid must fit 32 bits")
                dst.kind = 1
                dst.address_lo = route.address & 0xFFFFFFFF
                dst.address_hi = route.address >> 32
                dst.data = route.data
                if route.devid is not None:
                    dst.flags, dst.devid = KVM_MSI_VALID_DEVID, route.devid
        check(lib.kvmd_set_gsi_routing(self._open_fd(op), arr, len(routes)), op)

    def signal_msi(self, address: int, data: int, devid: int | None = None) -> int:
        """Inject an MSI directly; returns >0 if delivered, 0 if the guest blocked it."""
        if not 0 <= address < 1 << 64 or not 0 <= data < 1 << 32:
            raise invalid("KVM_SIGNAL_MSI", "MSI address must fit 64 bits and data 32 bits")
        if devid is not None and not 0 <= devid < 1 << 32:
            raise invalid("KVM_SIGNAL_MSI", "MSI devid must fit 32 bits")
        m = ffi.new("struct kvm_msi *")
        m.address_lo, m.address_hi, m.data = address & 0xFFFFFFFF, address >> 32, data
        if devid is not None:
            m.flags, m.devid = KVM_MSI_VALID_DEVID, devid
        return ioctl(self._open_fd("KVM_SIGNAL_MSI"), "KVM_SIGNAL_MSI", m)

    # -- ioeventfd ------------------------------------------------------------------------

    def register_ioevent(self, event: HasFileno | int, addr: IoEventAddress,
                         datamatch: Datamatch = ANY_WRITE) -> None:
        """Signal `event` (instead of exiting) when the guest writes to `addr`, optionally
        only for writes of `datamatch.length` bytes equal to `datamatch.value`."""
        self._ioeventfd(event, addr, datamatch, deassign=False)

    def unregister_ioevent(self, event: HasFileno | int, addr: IoEventAddress,
                           datamatch: Datamatch = ANY_WRITE) -> None:
        """Remove an ioeventfd; one never registered is refused (ENOENT)."""
        self._ioeventfd(event, addr, datamatch, deassign=True)

    def _ioeventfd(self, event: HasFileno | int, addr: IoEventAddress, dm: Datamatch,
                   deassign: bool) -> None:
        op = "KVM_IOEVENTFD"
        efd = fd_of(event)
        if dm.length not in (0, 1, 2, 4, 8):
            raise invalid(op, f"datamatch length {dm.length} is not 0, 1, 2, 4 or 8")
        if dm.value is not None and (dm.length == 0 or not 0 <= dm.value < 1 << (8 * dm.length)):
            raise invalid(op, f"datamatch value {dm.value!r} does not fit {dm.length} bytes")
        limit = PIO_LIMIT if addr.space == IoSpace.PIO else GUEST_ADDR_LIMIT
        if addr.address < 0 or addr.address + max(dm.length, 1) > limit:
            raise invalid(op, f"{addr.space.value} address {addr.address:#x} out of range")
        key = (addr.space, addr.address, dm.length, dm.value)
        with self._lock:
            fd = self._open_fd(op)
            if deassign and self._ioevents.get(key) != efd:
                raise invalid(op, f"no ioevent registered at {addr.space.value} "
                              f"{addr.address:#x} for this eventfd", errno.ENOENT)
            if not deassign and key in self._ioevents:
                raise invalid(op, f"an ioevent is already registered at {addr.space.value} "
                              f"{addr.address:#x} with this datamatch", errno.EEXIST)
            s = ffi.new("struct kvm_ioeventfd *")
            s.addr, s.len, s.fd = addr.address, dm.length, efd
            flags = lib.KVM_IOEVENTFD_FLAG_PIO if addr.space == IoSpace.PIO else 0
            if dm.value is not None:
                flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
                s.datamatch = dm.value
            if deassign:
                flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
            s.flags = flags
            ioctl(fd, op, s)
            if deassign:
                del self._ioevents[key]
            else:
                self._ioevents[key] = efd

    # -- vCPUs, devices, stats ------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """A new vCPU with its kvm_run mapping; owned (and closed) by this Vm."""
        op = "KVM_CREATE_VCPU"
        with self._lock:
            fd = self._open_fd(op)
            if vcpu_id in self._vcpus:
                raise invalid(op, f"vcpu {vcpu_id} already exists", errno.EEXIST)
            xsave2 = self._xsave2_cap()
            vfd = ioctl(fd, op, vcpu_id)
            vcpu = Vcpu(vfd, vcpu_id, self._vcpu_mmap_size)
            vcpu._xsave2_size = xsave2
            self._vcpus[vcpu_id] = vcpu
            return vcpu

    def vcpus(self) -> list[Vcpu]:
        with self._lock:
            return list(self._vcpus.values())

    def create_device(self, device_type: int, test_only: bool = False) -> Device | None:
        """KVM_CREATE_DEVICE; with test_only, just check the type is supported (returns
        None). The device fd is owned by this Vm."""
        op = "KVM_CREATE_DEVICE"
        with self._lock:
            fd = self._open_fd(op)
            d = ffi.new("struct kvm_create_device *")
            d.type = device_type
            d.flags = 1 if test_only else 0  # KVM_CREATE_DEVICE_TEST
            ioctl(fd, op, d)
            if test_only:
                return None
            dev = Device(device_type, int(d.fd))
            self._devices.append(dev)
            return dev

    def stats(self) -> StatsReader:
        """The kernel's binary statistics for this VM (fd owned by the Vm)."""
        with self._lock:
            if self._stats is None:
                fd = ioctl(self._open_fd("KVM_GET_STATS_FD"), "KVM_GET_STATS_FD")
                self._stats = StatsReader(fd)
            return self._stats

    def get_clock(self) -> ClockData:
        """The kvmclock (KVM_GET_CLOCK): `clock` in ns and, when `flags` says so, the host
        wall clock and TSC it was read at. KVM reports KVM_CLOCK_TSC_STABLE, REALTIME and
        HOST_TSC only while its master clock is on, which it decides when a vCPU runs or
        KVM_SET_CLOCK is called, not at VM creation."""
        c = ffi.new("struct kvm_clock_data *")
        ioctl(self._open_fd("KVM_GET_CLOCK"), "KVM_GET_CLOCK", c)
        return ClockData(int(c.clock), int(c.flags), int(c.realtime), int(c.host_tsc))

    def set_clock(self, value: ClockData | int) -> None:
        """Set the kvmclock (KVM_SET_CLOCK) from a ClockData, or from a plain ns value (no
        flags). With KVM_CLOCK_REALTIME in flags, KVM adds the wall time elapsed since
        `realtime` (if positive), so a ClockData saved by get_clock resumes where the wall
        clock is now; other flags are accepted and ignored, unknown ones refused (EINVAL)."""
        data = ClockData(value) if isinstance(value, int) else value
        c = ffi.new("struct kvm_clock_data *")
        try:
            c.clock, c.flags = data.clock, data.flags
            c.realtime, c.host_tsc = data.realtime, data.host_tsc
        except (OverflowError, TypeError) as exc:
            raise invalid("KVM_SET_CLOCK", str(exc)) from None
        ioctl(self._open_fd("KVM_SET_CLOCK"), "KVM_SET_CLOCK", c)

    # -- state for snapshot/restore -------------------------------------------------------

    _xsave2: int | None = None  # KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2), asked once

    def _xsave2_cap(self) -> int:
        if self._xsave2 is None:
            self._xsave2 = self.check_extension("KVM_CAP_XSAVE2")
        return self._xsave2

    def xsave_size(self) -> int:
        """Bytes in this VM's vCPU XSAVE images: KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the
        VM fd (never less than 4096), or 4096 on kernels without it."""
        return self._xsave2_cap() or XSAVE_LEGACY_SIZE

    @overload
    def get_irqchip(self, chip: Literal[IrqChip.PIC_MASTER, IrqChip.PIC_SLAVE]) -> PicState:
        ...

    @overload
    def get_irqchip(self, chip: Literal[IrqChip.IOAPIC]) -> IoapicState:
        ...

    @overload
    def get_irqchip(self, chip: IrqChip | int) -> PicState | IoapicState:
        ...

    def get_irqchip(self, chip: IrqChip | int) -> PicState | IoapicState:
        """The state of one in-kernel interrupt controller (KVM_GET_IRQCHIP): a PicState
        for PIC_MASTER or PIC_SLAVE, an IoapicState for IOAPIC. ENXIO without the
        in-kernel irqchip (or with the split irqchip); EINVAL for any other chip."""
        op = "KVM_GET_IRQCHIP"
        c = ffi.new("struct kvmd_irqchip *")
        c.chip_id = _chip_id(op, chip)
        check(lib.kvmd_get_irqchip(self._open_fd(op), c), op)
        if c.chip_id == IrqChip.IOAPIC:
            io = c.ioapic
            return IoapicState(int(io.base_address), int(io.ioregsel), int(io.id),
                               int(io.irr), [int(io.redirtbl[i]) for i in range(IOAPIC_PINS)])
        return PicState(**{name: int(getattr(c.pic, name)) for name in PIC_STATE_FIELDS})

    def set_irqchip(self, chip: IrqChip | int, state: PicState | IoapicState) -> None:
        """Restore one in-kernel interrupt controller (KVM_SET_IRQCHIP): a PicState for
        PIC_MASTER or PIC_SLAVE, an IoapicState for IOAPIC (else EINVAL). KVM re-evaluates
        the chip's output at once: an unmasked IRR bit can interrupt a vCPU."""
        op = "KVM_SET_IRQCHIP"
        c = ffi.new("struct kvmd_irqchip *")
        c.chip_id = _chip_id(op, chip)
        try:
            if c.chip_id == IrqChip.IOAPIC:
                if not isinstance(state, IoapicState):
                    raise invalid(op, "the IOAPIC takes an IoapicState")
                if len(state.redirtbl) != IOAPIC_PINS:
                    raise invalid(op, f"the IOAPIC has {IOAPIC_PINS} redirection entries")
                io = c.ioapic
                io.base_address, io.ioregsel = state.base_address, state.ioregsel
                io.id, io.irr = state.id, state.irr
                for i, entry in enumerate(state.redirtbl):
                    io.redirtbl[i] = entry
            else:
                if not isinstance(state, PicState):
                    raise invalid(op, f"{IrqChip(c.chip_id).name} takes a PicState")
                for name in PIC_STATE_FIELDS:
                    setattr(c.pic, name, getattr(state, name))
        except (OverflowError, TypeError) as exc:
            raise invalid(op, str(exc)) from None
        check(lib.kvmd_set_irqchip(self._open_fd(op), c), op)

    def get_pit2(self) -> PitState:
        """The in-kernel PIT's state (KVM_GET_PIT2); ENXIO without create_pit2()."""
        p = ffi.new("struct kvm_pit_state2 *")
        ioctl(self._open_fd("KVM_GET_PIT2"), "KVM_GET_PIT2", p)
        return PitState([PitChannelState(**{name: int(getattr(ch, name))
                                            for name in PIT_CHANNEL_FIELDS})
                         for ch in p.channels], int(p.flags))

    def set_pit2(self, state: PitState) -> None:
        """Restore the in-kernel PIT (KVM_SET_PIT2). KVM reloads each channel's count at
        the time of this call (channels 1 and 2 get a new count_load_time) and restarts
        channel 0's timer for its mode, unless flags has KVM_PIT_FLAGS_HPET_LEGACY (the
        HPET drives IRQ0 then: no PIT timer, and channel 0's count stands still)."""
        op = "KVM_SET_PIT2"
        if len(state.channels) != 3:
            raise invalid(op, "the PIT has 3 channels")
        p = ffi.new("struct kvm_pit_state2 *")
        try:
            for ch, src in zip(p.channels, state.channels, strict=True):
                for name in PIT_CHANNEL_FIELDS:
                    setattr(ch, name, getattr(src, name))
            p.flags = state.flags
        except (OverflowError, TypeError) as exc:
            raise invalid(op, str(exc)) from None
        ioctl(self._open_fd(op), op, p)


def _chip_id(op: str, chip: IrqChip | int) -> int:
    """The kernel's chip id for `chip`, refusing (EINVAL, as KVM does) unknown chips."""
    if not isinstance(chip, int) or chip not in tuple(IrqChip):
        raise invalid(op, f"chip {chip!r} is not PIC_MASTER (0), PIC_SLAVE (1) or IOAPIC (2)")
    return int(chip)
