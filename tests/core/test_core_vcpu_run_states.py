"""A vCPU's run-state machine driven directly (no gRPC): what a restart starts from, which
stop reason a vCPU keeps, and how a pause ends when something else comes first.

Races are made deterministic by holding the vCPU's lock (`cond`, re-entrant) across two
requests: its thread cannot act on the first before the second is made."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import pytest
from core_guests import DEBUG_EXIT, SPIN
from guests import boot
from polling import drained, wait_until

from kvmd.core.errors import Aborted, InvalidState, NotFound, Reason
from kvmd.core.host import Host
from kvmd.core.vcpu import Action, ManagedVcpu, Outcome
from kvmd.core.vm import ManagedVm, VmOptions

WAIT = 10.0

# hlt, then debug-exit with code 0x2A (reached only once the vCPU runs past its HLT).
HLT_THEN_DEBUG_EXIT = bytes([
    0xF4,                                      # hlt
    0xBA, DEBUG_EXIT & 0xFF, DEBUG_EXIT >> 8,  # mov dx, 0x501
    0xB0, 0x2A,                                # mov al, 0x2a
    0xEE,                                      # out dx, al
    0xEB, 0xFE,                                # jmp $ (not reached)
])


def one_vcpu(host: Host, name: str, code: bytes) -> tuple[ManagedVm, ManagedVcpu]:
    vm = host.create_vm(name, {}, VmOptions())
    boot(vm, code)
    return vm, vm.vcpu(0)


def reaches(v: ManagedVcpu, state: str) -> None:
    wait_until(lambda: v.state == state, WAIT, f"vcpu {v.id} to be {state}")


def test_a_second_launch_while_one_awaits_its_commit_is_busy(host: Host) -> None:
    vm, v = one_vcpu(host, "launch2", SPIN)
    launch = v.launch()
    with pytest.raises(InvalidState) as err:
        v.launch()
    assert err.value.reason == Reason.VM_BUSY
    launch.cancel()
    assert v.state == "created"
    v.start()  # the cancelled launch left nothing behind
    assert v.state == "running"
    vm.stop()


def test_a_launch_committed_after_its_vm_was_deleted_is_not_found(host: Host) -> None:
    """A DeleteVm between the two halves of a start: the held thread ends unseen."""
    _vm, v = one_vcpu(host, "launch-del", SPIN)
    launch = v.launch()
    host.delete_vm("launch-del")
    with pytest.raises(NotFound):
        launch.commit()
    launch.thread.join(WAIT)
    assert not launch.thread.is_alive()
    assert v.state == "created"


def test_a_vcpu_stopped_while_paused_runs_when_started_again(host: Host) -> None:
    """The pause request of before the stop is not carried into the next run."""
    vm, v = one_vcpu(host, "restart-paused", HLT_THEN_DEBUG_EXIT)
    v.start()
    reaches(v, "halted")
    v.pause()
    v.stop()
    assert v.state == "stopped"
    v.start()  # from past the HLT: straight to the debug exit
    wait_until(lambda: v.state in ("stopped", "paused"), WAIT, "the vCPU to stop or park")
    assert v.state == "stopped" and vm.exit_code == 0x2A


def test_a_restarted_vcpu_reports_the_reason_of_its_latest_stop(host: Host) -> None:
    _vm, v = one_vcpu(host, "restop", SPIN)
    v.start()
    v.stop("first stop")
    assert v.reason == "first stop"
    v.start()
    v.stop("second stop")
    assert v.state == "stopped" and v.reason == "second stop"


def test_the_first_of_two_stop_requests_gives_the_reason(host: Host) -> None:
    """A vCPU asked to stop twice before its thread acted (a debug exit of another vCPU,
    then a DeleteVm) keeps the first cause."""
    _vm, v = one_vcpu(host, "stop2", SPIN)
    v.start()
    with v.cond:
        thread = v.request_stop("vcpu 1 debug_exit")
        assert v.request_stop("vm deleted") is thread
    v.join(thread=thread)
    assert v.state == "stopped" and v.reason == "vcpu 1 debug_exit"


def test_a_pause_the_vcpu_ends_before_parking_is_over_at_once(host: Host) -> None:
    _vm, v = one_vcpu(host, "pause-stop", SPIN)
    v.start()
    with v.cond:
        ticket = v.request_pause()
        thread = v.request_stop("stopped meanwhile")
    v.join(thread=thread)
    assert v.state == "stopped"
    assert v.pause_done(ticket)  # ended: nothing left to wait for
    v.wait_paused(ticket)


def test_a_resume_before_a_running_vcpu_parks_aborts_the_pause(host: Host) -> None:
    vm, v = one_vcpu(host, "pause-resume", SPIN)
    v.start()
    with v.cond:
        ticket = v.request_pause()
        v.resume()
        assert not v.pause_pending
    with pytest.raises(Aborted):
        v.pause_done(ticket)
    with pytest.raises(Aborted):
        v.wait_paused(ticket)
    assert v.state == "running"
    vm.stop()


def test_a_resume_before_a_halted_vcpu_parks_aborts_the_pause(host: Host) -> None:
    vm, v = one_vcpu(host, "halt-pause-resume", HLT_THEN_DEBUG_EXIT)
    v.start()
    reaches(v, "halted")
    with v.cond:
        ticket = v.request_pause()
        v.resume()  # runs on past the HLT, to the debug exit
    with pytest.raises(Aborted):
        v.pause_done(ticket)
    reaches(v, "stopped")
    assert vm.exit_code == 0x2A


def watch_waits(v: ManagedVcpu) -> Callable[[], int]:
    """Count the times the vCPU's own thread starts waiting on its lock (it then acted on
    every wake-up before): install before the thread starts."""
    entered = [0]
    real_wait = v.cond.wait

    def wait(timeout: float | None = None) -> Any:
        if threading.current_thread().name.startswith("vcpu-"):
            entered[0] += 1
        return real_wait(timeout)

    v.cond.wait = wait  # type: ignore[method-assign]
    return lambda: entered[0]


def test_waking_a_paused_vcpu_does_not_report_it_paused_again(host: Host) -> None:
    """An interrupt queued for a paused vCPU wakes its thread, which parks again quietly:
    one "paused" event per pause, whatever else wakes it meanwhile."""
    vm, v = one_vcpu(host, "pause-wake", SPIN)
    waits = watch_waits(v)
    events = vm.watch()
    v.start()
    v.pause()
    with v.cond:
        before = waits()
        v.inject_interrupt(0x20)  # wakes the parked thread (delivered once it runs)
    wait_until(lambda: waits() > before, WAIT, "the vCPU thread to park again")
    vm.stop()
    seen = [e.type for e in drained(events.get)]
    events.close()
    assert seen.count("paused") == 1, seen


def test_a_halted_vcpu_parks_when_paused_and_halts_again_when_resumed(host: Host) -> None:
    """A halted vCPU's thread waits for an interrupt, outside the guest: a pause must wake
    it to park (no kick reaches it there)."""
    vm, v = one_vcpu(host, "halt-pause", HLT_THEN_DEBUG_EXIT)
    events = vm.watch()
    v.start()
    reaches(v, "halted")
    v.pause()
    assert v.state == "paused"
    v.resume()
    assert v.state == "running"  # resumed past its HLT: to the debug exit
    reaches(v, "stopped")
    assert vm.exit_code == 0x2A
    seen = [e.type for e in drained(events.get)]
    events.close()
    assert seen.count("paused") == 1, seen


def test_listeners_hear_of_every_state_change_until_removed(host: Host) -> None:
    """How an event loop waiting for a pause learns of it (it cannot block on the lock)."""
    vm, v = one_vcpu(host, "listen", SPIN)
    heard: list[str] = []

    def listener() -> None:
        heard.append(v.state)

    v.add_listener(listener)
    v.start()
    v.pause()
    v.resume()
    assert heard[:1] == ["running"] and "paused" in heard and heard[-1] == "running"
    v.remove_listener(listener)
    v.remove_listener(listener)  # removing one not (any longer) there is harmless
    count = len(heard)
    vm.stop()
    assert v.state == "stopped" and len(heard) == count


def test_a_throttle_takes_a_spinning_vcpu_out_of_the_guest_at_once(host: Host) -> None:
    """Auto-converge's throttle kicks the vCPU (a guest that never exits would otherwise
    run on); it stays RUNNING, and a stop ends the throttle's wait."""
    vm, v = one_vcpu(host, "throttle", SPIN)
    v.start()
    wait_until(lambda: v.vcpu.is_running, WAIT, "the vCPU to enter the guest")
    kicks = v.exit_counts()["intr"]
    v.throttle(60.0)
    wait_until(lambda: v.exit_counts()["intr"] > kicks and not v.vcpu.is_running, WAIT,
               "the throttled vCPU to leave the guest")
    assert v.state == "running"
    vm.stop()
    assert v.state == "stopped"


def test_a_crashed_vcpu_takes_no_interrupt_and_keeps_its_reason_when_stopped(host: Host) -> None:
    vm = host.create_vm("crash-stop", {}, VmOptions(strict_io=True))
    boot(vm, bytes([0xE4, 0x60, 0xF4]))  # in al, 0x60 (unclaimed: a strict-IO crash); hlt
    v = vm.vcpu(0)
    v.start()
    reaches(v, "crashed")
    assert v.reason == "unclaimed port read at 0x60"
    with pytest.raises(InvalidState) as err:
        v.inject_interrupt(0x20)  # nothing runs to take it
    assert err.value.reason == Reason.VM_STOPPED
    v.join()
    v.stop("stopped by request")
    assert v.state == "stopped" and v.reason == "unclaimed port read at 0x60"


def test_a_debug_exit_parks_the_vcpu_until_it_is_resumed(host: Host) -> None:
    """A KVM debug exit (here: single-stepping, set through the binding) pauses the vCPU
    for good, as a pause request would: its thread parks instead of stepping on."""
    vm, v = one_vcpu(host, "step", SPIN)
    v.vcpu.set_single_step(True)
    waits = watch_waits(v)
    v.start()
    wait_until(lambda: waits() > 0, WAIT, "the vCPU thread to park")
    assert v.state == "paused" and v.reason == "debug"
    assert v.exit_counts()["debug"] == 1
    assert v.get_regs().rip == 0x1001  # one instruction: inc ax
    v.resume()
    wait_until(lambda: waits() > 1, WAIT, "the vCPU thread to park again")
    assert v.exit_counts()["debug"] == 2 and v.get_regs().rip == 0x1000  # jmp back
    vm.stop()


def test_a_hlt_exit_racing_a_stop_never_reports_the_vcpu_halted(host: Host) -> None:
    """A stop requested while the vCPU's HLT exit is dispatched: the vCPU stops without a
    "halted" state in between (forced here by asking for the stop from the dispatch)."""
    vm = host.create_vm("hlt-stop", {}, VmOptions())
    boot(vm, bytes([0xF4, 0xEB, 0xFE]))  # hlt; jmp $
    v = vm.vcpu(0)
    dispatch = v.link.dispatch

    def stopping_first(vcpu: ManagedVcpu, exit_: Any) -> Outcome:
        outcome = dispatch(vcpu, exit_)
        if outcome.action is Action.HALT:
            vcpu.request_stop("stopped while halting")
        return outcome

    v.link = dataclasses.replace(v.link, dispatch=stopping_first)
    events = vm.watch()
    v.start()
    reaches(v, "stopped")
    seen = [e.type for e in drained(events.get)]
    events.close()
    assert "halted" not in seen, seen
    assert v.reason == "stopped while halting"
