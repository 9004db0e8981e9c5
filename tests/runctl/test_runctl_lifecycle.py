"""Run control of spinning guests: pause (kicking a guest that never exits), registers while
paused, resume exactly where it stopped, stop, wrong-state calls, DeleteVm mid-run, crashes."""

from __future__ import annotations

import threading
import time

import pytest
from guests import SPIN, UD2
from guests_runctl import (
    COUNTING_LOOP_LEN,
    INT3,
    counting_loop,
    debug_exit,
    protected_mode_idt0,
)
from polling import wait_until
from runctl_api import Api, Code, fd_count, vcpu_threads

from kvmd_proto import vmm_pb2 as pb

LOOP = 0x1000
EXIT_STUB = 0x2000


def ref(vm_id: str, vcpu_id: int = 0) -> pb.VcpuRef:
    return pb.VcpuRef(vm_id=vm_id, vcpu_id=vcpu_id)


def test_spinning_guest_is_paused_and_rip_is_in_the_loop(api: Api) -> None:
    api.boot("spin", SPIN)
    watch = api.watch("spin")
    assert api.start("spin").state == "running"
    time.sleep(0.05)
    vm = api.pause("spin")  # must return although the guest never exits on its own
    assert vm.state == "paused" and vm.vcpu_states[0] == "paused"
    assert api.vcpu_state("spin").state == "paused"
    assert api.regs("spin").rip == LOOP  # `jmp $` at 0x1000
    watch.wait_for("paused")
    assert api.stop("spin").state == "stopped"
    watch.wait_for("stopped")
    assert api.vcpu_state("spin").state == "stopped"
    assert api.get_vm("spin").reason == "stopped by request"
    api.delete("spin")


def test_pause_resume_continues_exactly_where_it_stopped(api: Api) -> None:
    api.boot("counter", counting_loop())
    watch = api.watch("counter")
    api.start("counter")
    time.sleep(0.05)
    api.pause("counter")
    first = api.regs("counter")
    assert LOOP <= first.rip < LOOP + COUNTING_LOOP_LEN
    assert first.rbx > 0
    # While paused nothing runs: the registers stay exactly the same.
    time.sleep(0.1)
    assert api.regs("counter") == first
    api.resume("counter")
    time.sleep(0.05)
    api.pause("counter")
    second = api.regs("counter")
    assert second.rbx > first.rbx  # it kept counting from where it was
    assert LOOP <= second.rip < LOOP + COUNTING_LOOP_LEN
    watch.wait_for("paused", nth=2)
    types = watch.types()
    assert types[:5] == ["state", "started", "paused", "resumed", "paused"], types
    api.stop("counter")
    api.delete("counter")


def test_registers_changed_while_paused_take_effect(api: Api) -> None:
    api.boot("regs", {LOOP: counting_loop(), EXIT_STUB: debug_exit(0x33)})
    watch = api.watch("regs")
    api.start("regs")
    time.sleep(0.02)
    api.pause("regs")
    regs = api.regs("regs")
    # A new counter value: counting continues from it.
    regs.rbx = 0x4000_0000
    assert api.set_regs("regs", regs).rbx == 0x4000_0000
    api.resume("regs")
    time.sleep(0.02)
    api.pause("regs")
    assert api.regs("regs").rbx > 0x4000_0000
    # A new RIP: the guest continues there (a debug exit with code 0x33).
    regs = api.regs("regs")
    regs.rip = EXIT_STUB
    api.set_regs("regs", regs)
    sregs = api.vcpus.GetSregs(ref("regs"))
    assert api.vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref("regs"), sregs=sregs)) == sregs
    api.resume("regs")
    assert watch.wait_for("debug_exit").exit_code == 0x33
    assert api.get_vm("regs").exit_code == 0x33
    api.delete("regs")


def test_wrong_state_calls_are_failed_precondition(api: Api) -> None:
    FP = Code.FAILED_PRECONDITION
    api.create_vm("empty")
    api.assert_code(lambda: api.start("empty"), FP)       # no vCPUs to start
    api.boot("wrong", SPIN)
    api.assert_code(lambda: api.pause("wrong"), FP)       # created, not running
    api.assert_code(lambda: api.resume("wrong"), FP)      # created, not paused
    api.start("wrong")
    api.assert_code(lambda: api.start("wrong"), FP)       # start a running VM
    api.assert_code(lambda: api.resume("wrong"), FP)      # resume a running VM
    api.assert_code(lambda: api.vcpus.StartVcpu(ref("wrong")), FP)
    api.assert_code(lambda: api.vcpus.ResumeVcpu(ref("wrong")), FP)
    api.assert_code(lambda: api.regs("wrong"), FP)        # GetRegs while running
    api.assert_code(lambda: api.set_regs("wrong", pb.Regs(rip=0x1000, rflags=2)), FP)
    api.assert_code(lambda: api.vcpus.GetSregs(ref("wrong")), FP)
    api.assert_code(lambda: api.vcpus.SetSregs(pb.SetSregsRequest(
        vcpu=ref("wrong"), sregs=pb.Sregs())), FP)
    api.assert_code(lambda: api.vcpus.GetFpu(ref("wrong")), FP)
    api.assert_code(lambda: api.vcpus.GetVcpuEvents(ref("wrong")), FP)
    api.pause("wrong")
    api.assert_code(lambda: api.pause("wrong"), FP)       # pause a paused VM
    api.assert_code(lambda: api.start("wrong"), FP)       # start a paused VM
    api.assert_code(lambda: api.vcpus.PauseVcpu(ref("wrong")), FP)
    api.stop("wrong")
    api.assert_code(lambda: api.pause("wrong"), FP)       # pause a stopped VM
    api.assert_code(lambda: api.resume("wrong"), FP)      # resume a stopped VM
    api.assert_code(lambda: api.stop("wrong"), FP)        # stop a stopped VM
    api.assert_code(lambda: api.vcpus.StopVcpu(ref("wrong")), FP)
    api.assert_code(lambda: api.vcpus.InjectInterrupt(pb.InjectInterruptRequest(
        vcpu=ref("wrong"), vector=0x20)), FP)             # interrupt a stopped vCPU
    # Missing VMs and vCPUs are NOT_FOUND, whatever the call.
    api.assert_code(lambda: api.start("ghost"), Code.NOT_FOUND)
    api.assert_code(lambda: api.pause("ghost"), Code.NOT_FOUND)
    api.assert_code(lambda: api.stats("ghost"), Code.NOT_FOUND)
    api.assert_code(lambda: api.vcpus.PauseVcpu(ref("wrong", 7)), Code.NOT_FOUND)
    api.assert_code(lambda: api.vcpus.GetVcpuState(ref("wrong", 7)), Code.NOT_FOUND)
    api.assert_code(lambda: api.vms.StartVm(pb.VmRef(vm_id="")), Code.INVALID_ARGUMENT)
    api.delete("wrong")
    api.delete("empty")


def test_stopped_vm_can_be_started_again(api: Api) -> None:
    api.boot("again", counting_loop())
    watch = api.watch("again")
    api.start("again")
    time.sleep(0.02)
    api.stop("again")
    rbx = api.regs("again").rbx  # registers are readable once stopped
    assert rbx > 0
    assert api.start("again").state == "running"
    watch.wait_for("started", nth=2)
    time.sleep(0.02)
    api.pause("again")
    assert api.regs("again").rbx > rbx  # continued from the stopped state
    api.stop("again")
    api.delete("again")


def test_delete_vm_mid_run_stops_it_first(api: Api) -> None:
    base_threads = len(vcpu_threads())
    api.boot("doomed", SPIN)
    watch = api.watch("doomed")
    api.start("doomed")
    watch.wait_for("started")
    assert len(vcpu_threads()) == base_threads + 1
    api.delete("doomed")  # running: it is stopped, then released
    api.assert_code(lambda: api.get_vm("doomed"), Code.NOT_FOUND)
    assert watch.wait_ended() is not None  # the watch stream ends with the VM
    assert "stopped" in watch.types()
    wait_until(lambda: len(vcpu_threads()) == base_threads, 10, "the vCPU thread to end")
    api.assert_code(lambda: api.delete("doomed"), Code.NOT_FOUND)


def test_delete_paused_vm_releases_its_fds(api: Api) -> None:
    api.assert_healthy()
    before = fd_count()
    api.boot("paused-del", SPIN)
    api.start("paused-del")
    api.pause("paused-del")
    api.delete("paused-del")
    wait_until(lambda: fd_count() <= before, 10, f"fd count back to {before}")


def triple_fault_vm(api: Api, vm_id: str, code: bytes) -> None:
    api.boot(vm_id, code)
    sregs = api.vcpus.GetSregs(ref(vm_id))
    api.vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref(vm_id), sregs=protected_mode_idt0(sregs)))
    api.set_regs(vm_id, pb.Regs(rip=0x1000, rsp=0x8000, rflags=2))


def test_triple_fault_crashes_vm_with_reason_and_regs(api: Api) -> None:
    # 32-bit protected mode, IDT limit 0: ud2 -> #UD -> #GP -> #DF -> triple fault.
    triple_fault_vm(api, "tf", UD2)
    watch = api.watch("tf")
    api.start("tf")
    event = watch.wait_for("crashed")
    assert "shutdown" in event.reason
    assert event.state == "crashed"
    assert event.HasField("regs") and event.regs.rip == 0x1000  # at the faulting ud2
    vm = api.wait_vm_state("tf", "crashed")
    assert "shutdown" in vm.reason and vm.vcpu_states[0] == "crashed"
    state = api.vcpu_state("tf")
    assert state.state == "crashed" and "shutdown" in state.reason
    assert api.stats("tf").total["shutdown"] == 1
    api.assert_healthy()
    # A crashed VM cannot be paused or resumed; it can be inspected, stopped (keeping why
    # it crashed) and started again from its registers as they are.
    api.assert_code(lambda: api.pause("tf"), Code.FAILED_PRECONDITION)
    api.assert_code(lambda: api.vms.ResumeVm(pb.VmRef(vm_id="tf")), Code.FAILED_PRECONDITION)
    assert api.regs("tf").rip == 0x1000
    stopped = api.vms.StopVm(pb.VmRef(vm_id="tf"))
    assert stopped.state == "stopped" and "shutdown" in stopped.reason
    assert api.vcpu_state("tf").state == "stopped"
    api.assert_code(lambda: api.vms.StopVm(pb.VmRef(vm_id="tf")), Code.FAILED_PRECONDITION)
    api.start("tf")  # the same ud2 at the same rip: it crashes again
    assert "shutdown" in watch.wait_for("crashed", nth=2).reason
    api.wait_vm_state("tf", "crashed")
    api.start("tf")  # a crashed VM also starts directly
    assert "shutdown" in watch.wait_for("crashed", nth=3).reason
    assert api.stats("tf").total["shutdown"] == 3
    api.delete("tf")


def test_int3_without_idt_is_an_internal_error_crash_on_this_host(api: Api) -> None:
    """PVM quirk: int3 with IDT limit 0 in protected mode is not a triple fault here;
    KVM's emulator gives up (KVM_EXIT_INTERNAL_ERROR, emulation suberror 1). Either way
    the VM must end crashed with the reason, and the daemon stay healthy."""
    triple_fault_vm(api, "int3", INT3)
    watch = api.watch("int3")
    api.start("int3")
    event = watch.wait_for("crashed")
    assert event.reason.startswith(("internal_error", "shutdown")), event.reason
    assert event.HasField("regs")
    assert api.get_vm("int3").state == "crashed"
    api.assert_healthy()
    api.delete("int3")


def test_multi_vcpu_pause_vm_and_per_vcpu_control(api: Api) -> None:
    api.boot("duo", {0x1000: counting_loop(), 0x1100: counting_loop()},
             entries={0: 0x1000, 1: 0x1100})
    watch = api.watch("duo")
    vm = api.start("duo")
    assert dict(vm.vcpu_states) == {0: "running", 1: "running"}
    time.sleep(0.02)
    vm = api.pause("duo")
    assert vm.state == "paused" and dict(vm.vcpu_states) == {0: "paused", 1: "paused"}
    r0, r1 = api.regs("duo", 0), api.regs("duo", 1)
    assert 0x1000 <= r0.rip < 0x1004 and 0x1100 <= r1.rip < 0x1104
    assert r0.rbx > 0 and r1.rbx > 0
    paused = {watch.wait_for("paused", n).vcpu_id for n in (1, 2)}
    assert paused == {0, 1}  # one event per vCPU

    vm = api.resume("duo")
    assert dict(vm.vcpu_states) == {0: "running", 1: "running"}
    # Pause only vCPU 1: vCPU 0 keeps running (and its registers stay off limits).
    assert api.vcpus.PauseVcpu(ref("duo", 1)).state == "paused"
    vm = api.get_vm("duo")
    assert dict(vm.vcpu_states) == {0: "running", 1: "paused"} and vm.state == "running"
    r1_paused = api.regs("duo", 1)
    api.assert_code(lambda: api.regs("duo", 0), Code.FAILED_PRECONDITION)
    time.sleep(0.05)
    assert api.regs("duo", 1) == r1_paused  # vCPU 1 did not move
    assert api.vcpus.ResumeVcpu(ref("duo", 1)).state == "running"
    assert api.vcpus.PauseVcpu(ref("duo", 0)).state == "paused"
    r0_paused = api.regs("duo", 0)
    assert r0_paused.rbx > r0.rbx
    assert api.vcpus.ResumeVcpu(ref("duo", 0)).state == "running"
    # StopVcpu ends one thread; the VM is still running on the other.
    assert api.vcpus.StopVcpu(ref("duo", 1)).state == "stopped"
    assert api.get_vm("duo").state == "running"
    vm = api.stop("duo")
    assert dict(vm.vcpu_states) == {0: "stopped", 1: "stopped"} and vm.state == "stopped"
    api.delete("duo")


def test_start_one_vcpu_of_two(api: Api) -> None:
    api.boot("half", {0x1000: SPIN, 0x1100: SPIN}, entries={0: 0x1000, 1: 0x1100})
    assert api.vcpus.StartVcpu(ref("half", 0)).state == "running"
    vm = api.get_vm("half")
    assert dict(vm.vcpu_states) == {0: "running", 1: "created"} and vm.state == "running"
    # StartVm needs every vCPU created or stopped.
    api.assert_code(lambda: api.start("half"), Code.FAILED_PRECONDITION)
    assert api.vcpus.StartVcpu(ref("half", 1)).state == "running"
    vm = api.pause("half")
    assert dict(vm.vcpu_states) == {0: "paused", 1: "paused"}
    api.delete("half")


def test_debug_exit_on_one_vcpu_stops_the_whole_vm(api: Api) -> None:
    api.boot("dexit-duo", {0x1000: SPIN, 0x1100: debug_exit(0x44)},
             entries={0: 0x1000, 1: 0x1100})
    watch = api.watch("dexit-duo")
    api.start("dexit-duo")
    event = watch.wait_for("debug_exit")
    assert event.vcpu_id == 1 and event.exit_code == 0x44
    vm = api.wait_vm_state("dexit-duo", "stopped")
    assert dict(vm.vcpu_states) == {0: "stopped", 1: "stopped"}
    assert vm.exit_code == 0x44
    api.delete("dexit-duo")


def test_triple_fault_on_one_vcpu_crashes_the_vm_and_stops_the_other(api: Api) -> None:
    api.boot("tf-duo", {0x1000: UD2, 0x1100: SPIN}, entries={0: 0x1000, 1: 0x1100})
    sregs = api.vcpus.GetSregs(ref("tf-duo", 0))
    api.vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref("tf-duo", 0),
                                          sregs=protected_mode_idt0(sregs)))
    api.set_regs("tf-duo", pb.Regs(rip=0x1000, rsp=0x8000, rflags=2), 0)
    watch = api.watch("tf-duo")
    api.start("tf-duo")
    assert watch.wait_for("crashed").vcpu_id == 0
    wait_until(lambda: api.vcpu_state("tf-duo", 1).state == "stopped", 10,
               "the healthy vCPU to be stopped")
    vm = api.get_vm("tf-duo")
    assert vm.state == "crashed" and "shutdown" in vm.reason
    assert dict(vm.vcpu_states) == {0: "crashed", 1: "stopped"}
    api.assert_healthy()
    api.delete("tf-duo")


def test_restart_after_debug_exit_clears_the_exit_code(api: Api) -> None:
    api.boot("rerun", {LOOP: debug_exit(0x21), EXIT_STUB: SPIN})
    watch = api.watch("rerun")
    api.start("rerun")
    watch.wait_for("debug_exit")
    assert api.get_vm("rerun").exit_code == 0x21
    api.set_regs("rerun", pb.Regs(rip=EXIT_STUB, rflags=2))
    vm = api.start("rerun")
    assert vm.state == "running" and not vm.HasField("exit_code"), vm
    assert api.get_vm("rerun").reason == ""
    api.stop("rerun")
    api.delete("rerun")


class FailingThreads:
    """Stands in for kvmd.core.vcpu's `threading`: thread creation fails after `ok`
    successes, as under a tasks limit (TasksMax=, RLIMIT_NPROC): "can't start new thread"."""

    def __init__(self, ok: int) -> None:
        self.left = ok
        outer = self

        class Thread(threading.Thread):
            def start(self) -> None:
                if outer.left <= 0:
                    raise RuntimeError("can't start new thread")
                outer.left -= 1
                super().start()

        self.Thread = Thread

    def __getattr__(self, name: str) -> object:
        return getattr(threading, name)


def test_a_start_that_fails_half_way_rolls_back(api: Api, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    """StartVm with thread creation failing at the third of four vCPUs: RESOURCE_EXHAUSTED,
    every vCPU as it was (created; the next round stopped), no thread and no event left
    behind; StartVm works once threads are available again. StartVcpu alike."""
    import kvmd.core.vcpu as vcpu_module

    entries = {i: LOOP for i in range(4)}
    api.boot("half", SPIN, entries=entries)
    threads_before = len(vcpu_threads())
    for expected in ("created", "stopped"):
        watch = api.watch("half")
        watch.wait_for("state")
        with monkeypatch.context() as m:
            m.setattr(vcpu_module, "threading", FailingThreads(ok=2))
            api.assert_code(lambda: api.start("half"), Code.RESOURCE_EXHAUSTED)
        vm = api.get_vm("half")
        assert (vm.state, dict(vm.vcpu_states)) == (expected, dict.fromkeys(entries, expected))
        assert len(vcpu_threads()) == threads_before
        with monkeypatch.context() as m:
            m.setattr(vcpu_module, "threading", FailingThreads(ok=0))
            api.assert_code(lambda: api.vcpus.StartVcpu(ref("half", 1)),
                            Code.RESOURCE_EXHAUSTED)
        assert api.vcpu_state("half", 1).state == expected
        assert watch.types() == ["state"]  # nothing happened
        assert api.start("half").state == "running"
        assert len(vcpu_threads()) == threads_before + 4
        api.stop("half")
        watch.wait_for("stopped", nth=4)
        watch.cancel()
    api.delete("half")


def test_a_vm_whose_reaper_thread_cannot_start_is_not_made(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dirty-ring VM needs a reaper thread: under a tasks limit CreateVm answers
    RESOURCE_EXHAUSTED and leaves no VM, descriptor or thread behind."""
    import kvmd.core.dirty as dirty_module

    host = api.daemon.host
    assert host is not None
    api.assert_healthy()  # the client's and the daemon's descriptors for calls are open
    fds, in_use = fd_count(), host.fds.in_use
    with monkeypatch.context() as m:
        m.setattr(dirty_module, "threading", FailingThreads(ok=0))
        api.assert_code(lambda: api.create_vm("reaperless", dirty_tracking="ring"),
                        Code.RESOURCE_EXHAUSTED)
    assert "reaperless" not in {v.vm_id for v in api.vms.ListVms(pb.ListVmsRequest()).vms}
    assert (fd_count(), host.fds.in_use) == (fds, in_use)
    api.create_vm("reaperless", dirty_tracking="ring")
    api.delete("reaperless")
