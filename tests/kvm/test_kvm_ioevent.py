"""ioeventfd: registration rules, datamatch, and real guest writes that fire (or do not fire)
the eventfd. crosvm's register_ioevent and unregister_ioevent come first."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

import pytest
from guests import (
    DEBUG_PORT,
    HLT,
    MMIO_ADDR,
    MMIO_SEGMENT,
    OUT_DX_AL,
    boot_long_mode,
    boot_real_mode,
    mmio_write_read_program,
    mov_al,
    mov_ax,
    mov_ds_ax,
    mov_dx,
    mov_mem16_al,
    out_bytes_program,
    real_mode_program,
    run_guarded,
)

from kvmd.kvm import Datamatch, EventFd, HltExit, IoEventAddress, IoExit, KvmError, MmioExit, Vm

Pio = IoEventAddress.pio
Mmio = IoEventAddress.mmio


@pytest.fixture
def ev() -> Iterator[EventFd]:
    e = EventFd()
    try:
        yield e
    finally:
        e.close()


def _errno_of(call: object, *args: object) -> int | None:
    with pytest.raises(KvmError) as exc:
        call(*args)  # type: ignore[operator]
    return exc.value.errno


# -- crosvm's tests ----------------------------------------------------------------------
# crosvm registers MMIO ioevents at 0x1000; here that is the guest's code, so they sit at
# MMIO_ADDR (unbacked) instead, where the guest's writes can show that they fire.

# Real mode: one write for each ioevent test_register_ioevent registers, the matching ones
# first; then a 4-byte OUT to the port with a u64 datamatch (never matches: port IO is at
# most 4 bytes wide), then HLT.
REGISTERED_WRITES = real_mode_program(
    mov_dx(0xF4), mov_al(0x01), OUT_DX_AL,            # out 0xf4, al        (any length)
    mov_dx(0xC1), mov_al(0x7F), OUT_DX_AL,            # out 0xc1, al = 0x7f (u8)
    mov_dx(0xC2), mov_ax(0x1337), [0xEF],             # out 0xc2, ax = 0x1337 (u16)
    mov_dx(0xC4), [0x66, 0xB8], struct.pack("<I", 0xDEADBEEF),  # mov eax, 0xdeadbeef
    [0x66, 0xEF],                                     # out 0xc4, eax       (u32)
    mov_ax(MMIO_SEGMENT), mov_ds_ax(), mov_mem16_al(0),  # mov [MMIO_ADDR], al (any length)
    [0x66, 0xB8], struct.pack("<I", 0xDEADBEEF),     # mov eax, 0xdeadbeef (again)
    mov_dx(0xC8), [0x66, 0xEF],                       # out 0xc8, eax       (the u64 one)
    HLT,
)


def test_register_ioevent(vm: Vm, ev: EventFd) -> None:
    vm.register_ioevent(ev, Pio(0xF4), Datamatch.any_length())
    vm.register_ioevent(ev, Mmio(MMIO_ADDR), Datamatch.any_length())
    vm.register_ioevent(ev, Pio(0xC1), Datamatch.u8(0x7F))
    vm.register_ioevent(ev, Pio(0xC2), Datamatch.u16(0x1337))
    vm.register_ioevent(ev, Pio(0xC4), Datamatch.u32(0xDEADBEEF))
    vm.register_ioevent(ev, Pio(0xC8), Datamatch.u64(0xDEADBEEF_DEADBEEF))
    vcpu = boot_real_mode(vm, REGISTERED_WRITES)
    # The five matching writes complete in the kernel (no exit), each signalling the eventfd;
    # the first exit is the OUT no ioevent matches.
    assert run_guarded(vcpu) == IoExit(is_write=True, port=0xC8, size=4, count=1,
                                       data=struct.pack("<I", 0xDEADBEEF))
    assert ev.read() == 5
    assert isinstance(run_guarded(vcpu), HltExit)
    assert ev.read() == 0


def test_unregister_ioevent(vm: Vm, ev: EventFd) -> None:
    vm.register_ioevent(ev, Pio(0xF4), Datamatch.any_length())
    vm.register_ioevent(ev, Mmio(MMIO_ADDR), Datamatch.any_length())
    vm.register_ioevent(ev, Mmio(MMIO_ADDR + 4), Datamatch.u8(0x7F))
    vm.unregister_ioevent(ev, Pio(0xF4), Datamatch.any_length())
    vm.unregister_ioevent(ev, Mmio(MMIO_ADDR), Datamatch.any_length())
    vm.unregister_ioevent(ev, Mmio(MMIO_ADDR + 4), Datamatch.u8(0x7F))
    # Writes that each registration would have matched now exit to userspace instead.
    vcpu = boot_real_mode(vm, real_mode_program(
        mov_dx(0xF4), mov_al(0x7F), OUT_DX_AL,        # out 0xf4, al
        mov_ax(MMIO_SEGMENT), mov_ds_ax(),            # ds = MMIO_ADDR >> 4
        mov_al(0x7F), mov_mem16_al(0), mov_mem16_al(4),  # mov [0], al; mov [4], al
        HLT,
    ))
    assert run_guarded(vcpu) == IoExit(is_write=True, port=0xF4, size=1, count=1, data=b"\x7f")
    assert run_guarded(vcpu) == MmioExit(address=MMIO_ADDR, length=1, is_write=True,
                                         data=b"\x7f")
    assert run_guarded(vcpu) == MmioExit(address=MMIO_ADDR + 4, length=1, is_write=True,
                                         data=b"\x7f")
    assert isinstance(run_guarded(vcpu), HltExit)
    assert ev.read() == 0


# -- rules -------------------------------------------------------------------------------

PIO_PORTS = {1: 0x100, 2: 0x108, 4: 0x110, 8: 0x118}
MMIO_ADDRS = {1: MMIO_ADDR, 2: MMIO_ADDR + 8, 4: MMIO_ADDR + 16, 8: MMIO_ADDR + 24}
# Long mode: one OUT of each width to the PIO ports, one 1-valued store of each width to the
# MMIO addresses; a 4-byte OUT to the 8-byte port (its only exit, as no PIO is 8 bytes wide)
# and an 8-byte store of 2 (not the datamatch value) in between; then HLT.
WIDTH_WRITES = b"".join([
    bytes([0xBA]), struct.pack("<I", PIO_PORTS[1]), bytes([0xB0, 0x01, 0xEE]),  # out dx, al
    bytes([0xBA]), struct.pack("<I", PIO_PORTS[2]),
    bytes([0x66, 0xB8, 0x01, 0x00, 0x66, 0xEF]),              # mov ax, 1; out dx, ax
    bytes([0xBA]), struct.pack("<I", PIO_PORTS[4]),
    bytes([0xB8, 0x01, 0x00, 0x00, 0x00, 0xEF]),              # mov eax, 1; out dx, eax
    bytes([0xBA]), struct.pack("<I", PIO_PORTS[8]), bytes([0xEF]),  # out dx, eax -> exit
    bytes([0xBB]), struct.pack("<I", MMIO_ADDR),              # mov ebx, MMIO_ADDR
    bytes([0xC6, 0x03, 0x01]),                                # mov byte [rbx], 1
    bytes([0x66, 0xC7, 0x43, 0x08, 0x01, 0x00]),              # mov word [rbx+8], 1
    bytes([0xC7, 0x43, 0x10, 0x01, 0x00, 0x00, 0x00]),        # mov dword [rbx+16], 1
    bytes([0x48, 0xC7, 0x43, 0x18, 0x02, 0x00, 0x00, 0x00]),  # mov qword [rbx+24], 2 -> exit
    bytes([0x48, 0xC7, 0x43, 0x18, 0x01, 0x00, 0x00, 0x00]),  # mov qword [rbx+24], 1
    bytes([0xF4]),                                            # hlt
])


def test_datamatch_lengths(vm: Vm) -> None:
    pio = {n: EventFd() for n in PIO_PORTS}
    mmio = {n: EventFd() for n in MMIO_ADDRS}
    try:
        for n in PIO_PORTS:
            vm.register_ioevent(pio[n], Pio(PIO_PORTS[n]), Datamatch(n))        # any value
            vm.register_ioevent(mmio[n], Mmio(MMIO_ADDRS[n]), Datamatch(n, 1))  # value 1
        vcpu = boot_long_mode(vm, WIDTH_WRITES)
        assert run_guarded(vcpu) == IoExit(is_write=True, port=PIO_PORTS[8], size=4, count=1,
                                           data=struct.pack("<I", 1))
        assert {n: e.read() for n, e in pio.items()} == {1: 1, 2: 1, 4: 1, 8: 0}
        assert run_guarded(vcpu) == MmioExit(address=MMIO_ADDRS[8], length=8, is_write=True,
                                             data=struct.pack("<Q", 2))
        assert isinstance(run_guarded(vcpu), HltExit)
        assert {n: e.read() for n, e in mmio.items()} == {1: 1, 2: 1, 4: 1, 8: 1}
    finally:
        for e in (*pio.values(), *mmio.values()):
            e.close()


@pytest.mark.parametrize("length", [3, 5, 6, 7, 16, -1])
def test_datamatch_other_lengths_refused(vm: Vm, ev: EventFd, length: int) -> None:
    assert _errno_of(vm.register_ioevent, ev, Pio(0x100), Datamatch(length)) == errno.EINVAL
    assert _errno_of(vm.register_ioevent, ev, Mmio(0x1000), Datamatch(length, 0)) \
        == errno.EINVAL


@pytest.mark.parametrize("dm", [
    Datamatch(0, 1),          # a value needs a length
    Datamatch(0, 0),          # even a value of zero
    Datamatch(1, 0x100),      # does not fit one byte
    Datamatch(2, 0x1_0000),
    Datamatch(4, 1 << 32),
    Datamatch(8, 1 << 64),
    Datamatch(1, -1),
])
def test_datamatch_value_must_fit(vm: Vm, ev: EventFd, dm: Datamatch) -> None:
    """A datamatch whose value has no length or does not fit it is refused (EINVAL) by
    register and unregister alike: checked before the lookup (which would say ENOENT)."""
    assert _errno_of(vm.register_ioevent, ev, Pio(0x100), dm) == errno.EINVAL
    assert _errno_of(vm.unregister_ioevent, ev, Pio(0x100), dm) == errno.EINVAL


def test_ioevent_address_range(vm: Vm, ev: EventFd) -> None:
    vm.register_ioevent(ev, Pio(0xFFFF), Datamatch.u8())
    assert _errno_of(vm.register_ioevent, ev, Pio(0x10000), Datamatch.u8()) == errno.EINVAL
    assert _errno_of(vm.register_ioevent, ev, Pio(0xFFFF), Datamatch.u16()) == errno.EINVAL
    assert _errno_of(vm.register_ioevent, ev, Pio(-1), Datamatch.u8()) == errno.EINVAL
    assert _errno_of(vm.register_ioevent, ev, Mmio(1 << 52), Datamatch.u8()) == errno.EINVAL


def test_duplicate_ioevent_refused(vm: Vm, ev: EventFd) -> None:
    vm.register_ioevent(ev, Pio(0xF4), Datamatch.u8(1))
    assert _errno_of(vm.register_ioevent, ev, Pio(0xF4), Datamatch.u8(1)) == errno.EEXIST
    with EventFd() as other:
        # The kernel refuses a second eventfd whose matches collide: here a wildcard of
        # the same length over a specific value.
        assert _errno_of(vm.register_ioevent, other, Pio(0xF4), Datamatch.u8()) \
            == errno.EEXIST
        # A different value at the same port is a separate ioeventfd.
        vm.register_ioevent(other, Pio(0xF4), Datamatch.u8(2))
        vm.unregister_ioevent(other, Pio(0xF4), Datamatch.u8(2))


def test_unregister_unknown_ioevent_is_enoent(vm: Vm, ev: EventFd) -> None:
    assert _errno_of(vm.unregister_ioevent, ev, Pio(0xF4)) == errno.ENOENT
    vm.register_ioevent(ev, Pio(0xF4), Datamatch.u8(1))
    # Same port, other match or other eventfd: still unknown.
    assert _errno_of(vm.unregister_ioevent, ev, Pio(0xF4), Datamatch.u8(2)) == errno.ENOENT
    with EventFd() as other:
        assert _errno_of(vm.unregister_ioevent, other, Pio(0xF4), Datamatch.u8(1)) \
            == errno.ENOENT
    vm.unregister_ioevent(ev, Pio(0xF4), Datamatch.u8(1))
    assert _errno_of(vm.unregister_ioevent, ev, Pio(0xF4), Datamatch.u8(1)) == errno.ENOENT


def test_ioevent_on_closed_vm_is_ebadf(vm: Vm, ev: EventFd) -> None:
    vm.close()
    assert _errno_of(vm.register_ioevent, ev, Pio(0xF4)) == errno.EBADF


# -- real guests -------------------------------------------------------------------------


def test_pio_ioevent_fires_only_on_matching_value(vm: Vm, ev: EventFd) -> None:
    # The guest writes 0x41, then 0x42, to the port; only 0x42 matches.
    vcpu = boot_real_mode(vm, out_bytes_program(b"\x41\x42", DEBUG_PORT))
    vm.register_ioevent(ev, Pio(DEBUG_PORT), Datamatch.u8(0x42))
    assert run_guarded(vcpu) == IoExit(is_write=True, port=DEBUG_PORT, size=1, count=1,
                                       data=b"\x41")
    assert ev.read() == 0
    # The matching write completes in the kernel: no IO exit, the next one is the HLT.
    assert isinstance(run_guarded(vcpu), HltExit)
    assert ev.read() == 1
    assert ev.read() == 0   # reading resets the counter


def test_pio_ioevent_any_length(vm: Vm, ev: EventFd) -> None:
    vcpu = boot_real_mode(vm, out_bytes_program(b"abc", DEBUG_PORT))
    vm.register_ioevent(ev, Pio(DEBUG_PORT))
    assert isinstance(run_guarded(vcpu), HltExit)
    assert ev.read() == 3


def test_mmio_ioevent_fires(vm: Vm, ev: EventFd) -> None:
    # mmio_write_read_program writes MMIO_ADDR+0x10, then reads MMIO_ADDR+0x18.
    vcpu = boot_real_mode(vm, mmio_write_read_program(0x5A, 0x10))
    vm.register_ioevent(ev, Mmio(MMIO_ADDR + 0x10), Datamatch.u8(0x5A))
    ex = run_guarded(vcpu)
    assert ex == MmioExit(address=MMIO_ADDR + 0x18, length=1, is_write=False, data=b"")
    assert ev.read() == 1
    vcpu.complete_mmio_read(b"\x00")
    assert isinstance(run_guarded(vcpu), HltExit)


def test_unregistered_ioevent_exits_again(vm: Vm, ev: EventFd) -> None:
    vcpu = boot_real_mode(vm, out_bytes_program(b"z", DEBUG_PORT))
    vm.register_ioevent(ev, Pio(DEBUG_PORT), Datamatch.u8(ord("z")))
    vm.unregister_ioevent(ev, Pio(DEBUG_PORT), Datamatch.u8(ord("z")))
    assert run_guarded(vcpu) == IoExit(is_write=True, port=DEBUG_PORT, size=1, count=1,
                                       data=b"z")
    assert ev.read() == 0
