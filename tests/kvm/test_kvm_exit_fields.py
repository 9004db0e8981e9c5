"""Names and fields of decoded exits that callers act on: the direction of a real guest's
port IO, every system event's and internal error's name (and the fallback for a number
this binding does not know), and the value an OtherExit carries only for UNKNOWN."""

from __future__ import annotations

from guests import boot_real_mode, in_then_out_program, run_guarded

from kvmd.kvm import InternalErrorExit, IoExit, OtherExit, SystemEventExit, Vm
from kvmd.kvm._ffi import ffi, lib
from kvmd.kvm.exits import decode_exit


def _exit(reason: int, **fields: int) -> object:
    ex = ffi.new("struct kvmd_exit *")
    ex.reason = reason
    for name, value in fields.items():
        setattr(ex, name, value)
    return ex


def test_a_real_guests_in_and_out_report_their_direction(vm: Vm) -> None:
    """IoExit.direction is "in" for the guest's IN and "out" for its OUT."""
    vcpu = boot_real_mode(vm, in_then_out_program(0x10, 0x11))
    first = run_guarded(vcpu)
    assert isinstance(first, IoExit) and first.port == 0x10
    assert (first.is_write, first.direction) == (False, "in")
    vcpu.complete_io_in(b"\x01")
    second = run_guarded(vcpu)
    assert isinstance(second, IoExit) and second.port == 0x11
    assert (second.is_write, second.direction) == (True, "out")


def test_every_system_event_has_its_name_and_an_unknown_one_its_number() -> None:
    """SystemEventExit.event names each KVM_SYSTEM_EVENT_* type (what the daemon stops or
    crashes a VM on); an unknown type is "event_<n>", never a known event's name."""
    expected = {
        lib.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown",
        lib.KVM_SYSTEM_EVENT_RESET: "reset",
        lib.KVM_SYSTEM_EVENT_CRASH: "crash",
        lib.KVM_SYSTEM_EVENT_WAKEUP: "wakeup",
        lib.KVM_SYSTEM_EVENT_SUSPEND: "suspend",
        lib.KVM_SYSTEM_EVENT_SEV_TERM: "sev_term",
    }
    for kind, name in expected.items():
        ex = decode_exit(_exit(lib.KVM_EXIT_SYSTEM_EVENT, subtype=kind))
        assert isinstance(ex, SystemEventExit)
        assert (ex.type, ex.event) == (kind, name)
    ex = decode_exit(_exit(lib.KVM_EXIT_SYSTEM_EVENT, subtype=99))
    assert ex.event == "event_99"  # type: ignore[attr-defined]


def test_every_internal_error_suberror_has_its_name_and_an_unknown_one_its_number() -> None:
    """InternalErrorExit.suberror_name names each KVM_INTERNAL_ERROR_* (it is part of a
    crashed VM's reason); an unknown suberror is "suberror_<n>"."""
    expected = {
        lib.KVM_INTERNAL_ERROR_EMULATION: "emulation",
        lib.KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous_exception",
        lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "delivery_event",
        lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected_exit_reason",
    }
    for sub, name in expected.items():
        ex = decode_exit(_exit(lib.KVM_EXIT_INTERNAL_ERROR, subtype=sub))
        assert isinstance(ex, InternalErrorExit)
        assert (ex.suberror, ex.suberror_name) == (sub, name)
    ex = decode_exit(_exit(lib.KVM_EXIT_INTERNAL_ERROR, subtype=42))
    assert ex.suberror_name == "suberror_42"  # type: ignore[attr-defined]


def test_other_exit_carries_a_value_only_for_unknown() -> None:
    """`value` is hardware_exit_reason for KVM_EXIT_UNKNOWN only; for any other reason a
    stale value left in the exit struct is not reported."""
    assert decode_exit(_exit(lib.KVM_EXIT_IRQ_WINDOW_OPEN, value=0x55)) == OtherExit(
        lib.KVM_EXIT_IRQ_WINDOW_OPEN, 0)
    assert decode_exit(_exit(200, value=0x55)) == OtherExit(200, 0)
    assert decode_exit(_exit(lib.KVM_EXIT_UNKNOWN, value=0x55)) == OtherExit(
        lib.KVM_EXIT_UNKNOWN, 0x55)
