"""What the VM's exit dispatcher makes of exits a guest here cannot produce on demand:
system events stop or crash the VM by their name (or are let pass), and an internal error's
crash reason names its suberror."""

from __future__ import annotations

from kvmd.core.host import Host
from kvmd.core.vcpu import CONTINUE, Action, Outcome
from kvmd.core.vm import VmOptions
from kvmd.kvm import InternalErrorExit, SystemEventExit
from kvmd.kvm._ffi import lib


def test_system_events_stop_crash_or_pass_by_their_kind(host: Host) -> None:
    """A guest's shutdown or reset stops the VM with that reason, a crash event crashes it,
    and any other event (wakeup, suspend, an unknown type) lets the vCPU go on."""
    vm = host.create_vm("events", {}, VmOptions())
    vcpu = vm.create_vcpu(0)
    cases = {
        lib.KVM_SYSTEM_EVENT_SHUTDOWN: Outcome(Action.STOP, "shutdown"),
        lib.KVM_SYSTEM_EVENT_RESET: Outcome(Action.STOP, "reset"),
        lib.KVM_SYSTEM_EVENT_CRASH: Outcome(Action.CRASH, "system_event: crash"),
        lib.KVM_SYSTEM_EVENT_WAKEUP: CONTINUE,
        lib.KVM_SYSTEM_EVENT_SUSPEND: CONTINUE,
        99: CONTINUE,
    }
    for kind, outcome in cases.items():
        assert vm.dispatch(vcpu, SystemEventExit(kind, 0, ())) == outcome, kind
    host.delete_vm("events")


def test_internal_error_crash_reason_names_the_suberror(host: Host) -> None:
    """The crash reason of an internal error names its suberror and lists its data words."""
    vm = host.create_vm("internal", {}, VmOptions())
    vcpu = vm.create_vcpu(0)
    got = vm.dispatch(vcpu, InternalErrorExit(lib.KVM_INTERNAL_ERROR_SIMUL_EX, (0x10, 0x2)))
    assert got == Outcome(Action.CRASH, "internal_error: simultaneous_exception "
                                        "['0x10', '0x2']")
    got = vm.dispatch(vcpu, InternalErrorExit(7, ()))
    assert got == Outcome(Action.CRASH, "internal_error: suberror_7 []")
    host.delete_vm("internal")
