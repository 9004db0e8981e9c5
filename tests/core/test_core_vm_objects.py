"""What a VM object holds besides memory, without gRPC: its vCPUs' descriptors, the fd
watcher's callbacks for its eventfds, remote claims and the ports they route, and its
in-daemon devices (the debug-exit port, COM1's interrupt)."""

from __future__ import annotations

import os

import pytest
from core_guests import DEBUG_EXIT
from guests import boot
from polling import wait_until

from kvmd.core.devices import COM1_BASE, COM1_IRQ
from kvmd.core.dirty import DirtyTracker
from kvmd.core.errors import (
    DomainError,
    InvalidArgument,
    NotFound,
    Reason,
    ResourceExhausted,
)
from kvmd.core.host import Host
from kvmd.core.remote import ClaimRange, HandlerClose
from kvmd.core.vm import VmOptions
from kvmd.kvm import IoSpace, IrqChip


def test_a_vcpu_the_kernel_refuses_leaves_its_descriptors_uncharged(host: Host) -> None:
    """A vCPU id KVM refuses (above its KVM_MAX_VCPU_ID) gives back the descriptors charged
    for it; a later vCPU is still made."""
    vm = host.create_vm("refused", {}, VmOptions())
    held = vm.fds.held
    with pytest.raises(DomainError):
        vm.create_vcpu(1 << 20)
    assert vm.fds.held == held and vm.vcpus() == []
    vm.create_vcpu(0)
    assert [v.id for v in vm.vcpus()] == [0]


def test_the_fd_watcher_forgets_what_is_unregistered_and_what_a_deleted_vm_had(
        host: Host) -> None:
    """An unregistered irqfd's resample eventfd and an unregistered ioevent's eventfd leave
    the host's fd watcher (no callback holding them or their VM stays), and so does every
    one a deleted VM had."""
    base = set(host.watcher._callbacks)
    vm = host.create_vm("watched", {}, VmOptions(irqchip=True))
    for i in range(2):
        vm.register_irqfd(f"level{i}", 5, True)
        vm.register_ioevent(f"bell{i}", IoSpace.PIO, 0x90 + i, 1, None)
    assert len(host.watcher._callbacks) == len(base) + 4
    vm.unregister_irqfd("level0")
    vm.unregister_ioevent("bell0")
    assert len(host.watcher._callbacks) == len(base) + 2
    host.delete_vm("watched")
    assert set(host.watcher._callbacks) == base


def test_claims_end_at_the_top_of_the_port_and_mmio_spaces(host: Host) -> None:
    """A claim may reach the last port (0xffff) and the last MMIO address below 2^52 (the
    physical-address width KVM supports), not one byte past either: INVALID_ARGUMENT of
    `ranges`, nothing claimed."""
    vm = host.create_vm("tops", {}, VmOptions())
    top = {IoSpace.PIO: 1 << 16, IoSpace.MMIO: 1 << 52}
    for space, end in top.items():
        with pytest.raises(InvalidArgument) as caught:
            vm.add_handler([ClaimRange(space, end - 0x10, 0x11)], 1000)
        assert caught.value.field == "ranges"
        assert vm.claims.handlers() == []
        handler = vm.add_handler([ClaimRange(space, end - 0x10, 0x10)], 1000)
        vm.release_handler(handler, HandlerClose.CLIENT_CLOSED)


def test_released_ports_go_back_to_the_c_path_unless_io_is_strict(host: Host) -> None:
    """Ports a handler claimed reach the daemon while claimed; released, a VM's unclaimed
    ports are completed in C again (all-ones reads, dropped writes), while a strict-IO
    VM's keep reaching the daemon (which crashes the guest for them)."""
    for strict in (False, True):
        vm = host.create_vm(f"ports-{strict}".lower(), {}, VmOptions(strict_io=strict))
        assert vm.pio_map.is_claimed(0x300) is strict
        handler = vm.add_handler([ClaimRange(IoSpace.PIO, 0x300, 8)], 1000)
        assert vm.pio_map.is_claimed(0x300) and vm.pio_map.is_claimed(0x307)
        vm.release_handler(handler, HandlerClose.CLIENT_CLOSED)
        assert vm.pio_map.is_claimed(0x300) is strict and vm.pio_map.is_claimed(0x307) is strict


def test_a_deleted_vm_takes_no_claim(host: Host) -> None:
    """A claim for a VM deleted meanwhile (a HandleExits racing a DeleteVm) is NotFound:
    no handler is left holding ports of a VM that is gone."""
    vm = host.create_vm("unclaimed", {}, VmOptions())
    host.delete_vm("unclaimed")
    with pytest.raises(NotFound):
        vm.add_handler([ClaimRange(IoSpace.PIO, 0x300, 8)], 1000)
    assert vm.claims.handlers() == [] and not vm.pio_map.is_claimed(0x300)


def test_a_read_of_the_debug_exit_port_reads_all_ones_and_goes_on(host: Host) -> None:
    """Only a write to the debug-exit port ends the VM: a guest's read of it gets 0xff and
    the guest runs on (here to its HLT)."""
    vm = host.create_vm("peek", {}, VmOptions())
    boot(vm, bytes([
        0xBA, DEBUG_EXIT & 0xFF, DEBUG_EXIT >> 8,  # mov dx, 0x501
        0xEC,                                      # in al, dx
        0x88, 0xC3,                                # mov bl, al
        0xF4,                                      # hlt
    ]))
    vm.start()
    wait_until(lambda: vm.vcpu(0).state != "running", 10, "the vCPU to halt or stop")
    assert vm.vcpu(0).state == "halted" and vm.reason == ""
    vm.stop()
    assert vm.vcpu(0).get_regs().rbx & 0xFF == 0xFF


def test_console_input_pulses_com1s_interrupt_line(host: Host) -> None:
    """With the in-kernel irqchip, input for a guest that enabled the UART's receive
    interrupt raises IRQ 4 and lowers it again: the PIC latched the edge, and the line is
    low so that the next input is a new edge."""
    vm = host.create_vm("rx-irq", {}, VmOptions(irqchip=True))
    vm.create_vcpu(0)
    vm.uart.write(COM1_BASE + 1, b"\x01")  # IER: received data available
    assert vm.write_console(b"a") == 1
    pic = vm.vm.get_irqchip(IrqChip.PIC_MASTER)
    assert (pic.irr & 1 << COM1_IRQ, pic.last_irr & 1 << COM1_IRQ) == (1 << COM1_IRQ, 0)


def test_closing_a_deleted_vm_again_changes_nothing(host: Host) -> None:
    """close() may be called again on a closed VM: nothing is released twice (the host's
    descriptor count stays), nothing fails."""
    in_use = host.fds.in_use
    vm = host.create_vm("twice", {}, VmOptions(irqchip=True))
    vm.create_vcpu(0)
    vm.register_irqfd("level", 5, True)
    host.delete_vm("twice")
    assert host.fds.in_use == in_use
    vm.close()
    assert host.fds.in_use == in_use and vm.closed


def test_a_vm_whose_reaper_cannot_start_is_not_made(host: Host,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A VM whose dirty-ring reaper thread cannot be created (a tasks limit) is refused as
    HOST_EXHAUSTED and leaves nothing: no descriptor charged or open, no VM."""
    def no_thread(self: DirtyTracker, name: str) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(DirtyTracker, "start_reaper", no_thread)
    in_use, before = host.fds.in_use, len(os.listdir("/proc/self/fd"))
    with pytest.raises(ResourceExhausted) as caught:
        host.create_vm("no-reaper", {}, VmOptions())
    assert caught.value.reason == Reason.HOST_EXHAUSTED
    assert host.fds.in_use == in_use and len(os.listdir("/proc/self/fd")) == before
    assert host.list_vms() == []


def test_a_vm_keeps_its_own_copy_of_its_labels(host: Host) -> None:
    """The labels a VM was made with are its own: the caller's dict changing afterwards
    changes nothing."""
    labels = {"team": "a"}
    vm = host.create_vm("labelled", labels, VmOptions())
    labels["team"] = "b"
    assert vm.labels == {"team": "a"}


def test_a_dirty_ring_size_needs_the_ring_mode(host: Host) -> None:
    """dirty_ring_bytes with any mode but "ring" (the manual bitmap here) is a conflict of
    options, refused before the kernel is asked."""
    with pytest.raises(InvalidArgument) as caught:
        host.create_vm("manual", {}, VmOptions(dirty_tracking="manual",
                                               dirty_ring_bytes=1 << 16))
    assert (caught.value.reason, caught.value.field) == (Reason.ARGUMENTS_CONFLICT,
                                                         "options.dirty_ring_bytes")
    assert host.list_vms() == []
