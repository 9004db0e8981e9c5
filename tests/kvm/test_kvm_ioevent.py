"""ioeventfd: registration rules, datamatch, and real guest writes that fire (or do not fire)
the eventfd. crosvm's register_ioevent and unregister_ioevent come first."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest
from guests import (
    DEBUG_PORT,
    MMIO_ADDR,
    boot_real_mode,
    mmio_write_read_program,
    out_bytes_program,
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


def test_register_ioevent(vm: Vm, ev: EventFd) -> None:
    vm.register_ioevent(ev, Pio(0xF4), Datamatch.any_length())
    vm.register_ioevent(ev, Mmio(0x1000), Datamatch.any_length())
    vm.register_ioevent(ev, Pio(0xC1), Datamatch.u8(0x7F))
    vm.register_ioevent(ev, Pio(0xC2), Datamatch.u16(0x1337))
    vm.register_ioevent(ev, Pio(0xC4), Datamatch.u32(0xDEADBEEF))
    vm.register_ioevent(ev, Pio(0xC8), Datamatch.u64(0xDEADBEEF_DEADBEEF))


def test_unregister_ioevent(vm: Vm, ev: EventFd) -> None:
    vm.register_ioevent(ev, Pio(0xF4), Datamatch.any_length())
    vm.register_ioevent(ev, Mmio(0x1000), Datamatch.any_length())
    vm.register_ioevent(ev, Mmio(0x1004), Datamatch.u8(0x7F))
    vm.unregister_ioevent(ev, Pio(0xF4), Datamatch.any_length())
    vm.unregister_ioevent(ev, Mmio(0x1000), Datamatch.any_length())
    vm.unregister_ioevent(ev, Mmio(0x1004), Datamatch.u8(0x7F))


# -- rules -------------------------------------------------------------------------------


def test_datamatch_lengths(vm: Vm, ev: EventFd) -> None:
    for port, length in enumerate((1, 2, 4, 8)):
        vm.register_ioevent(ev, Pio(0x100 + 8 * port), Datamatch(length))          # any value
        vm.register_ioevent(ev, Mmio(0x2000 + 8 * port), Datamatch(length, 1))    # value 1


@pytest.mark.parametrize("length", [3, 5, 6, 7, 16, -1])
def test_datamatch_other_lengths_refused(vm: Vm, ev: EventFd, length: int) -> None:
    assert _errno_of(vm.register_ioevent, ev, Pio(0x100), Datamatch(length)) == errno.EINVAL
    assert _errno_of(vm.register_ioevent, ev, Mmio(0x1000), Datamatch(length, 0)) \
        == errno.EINVAL


@pytest.mark.parametrize("dm", [
    Datamatch(0, 1),          # a value needs a length
    Datamatch(1, 0x100),      # does not fit one byte
    Datamatch(2, 0x1_0000),
    Datamatch(4, 1 << 32),
    Datamatch(8, 1 << 64),
    Datamatch(1, -1),
])
def test_datamatch_value_must_fit(vm: Vm, ev: EventFd, dm: Datamatch) -> None:
    assert _errno_of(vm.register_ioevent, ev, Pio(0x100), dm) == errno.EINVAL


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
