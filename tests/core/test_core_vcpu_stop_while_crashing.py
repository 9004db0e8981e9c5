"""StopVcpu on a vCPU that crashed while its thread is still finishing (it is telling the
VM, which stops the other vCPUs): the stop waits for that thread, and then the vCPU must be
stopped, as it is when its thread had already ended, keeping why it crashed."""

from __future__ import annotations

import dataclasses
import threading

from guests import boot
from polling import wait_until

from kvmd.core.host import Host
from kvmd.core.vcpu import ManagedVcpu, Outcome
from kvmd.core.vm import VmOptions

WAIT = 10.0


def test_stopping_a_vcpu_whose_thread_is_still_ending_its_crash_stops_it(host: Host) -> None:
    vm = host.create_vm("crashing", {}, VmOptions(strict_io=True))
    boot(vm, bytes([0xE4, 0x60, 0xF4]))  # in al, 0x60 (unclaimed: a strict-IO crash); hlt
    v = vm.vcpu(0)
    on_ended = v.link.on_ended
    in_on_ended = threading.Event()

    def slow_on_ended(vcpu: ManagedVcpu, outcome: Outcome) -> None:
        in_on_ended.set()
        with vcpu.cond:  # hold the thread here until a stop has been asked for
            vcpu.cond.wait_for(lambda: vcpu._stop_requested, WAIT)
        on_ended(vcpu, outcome)

    v.link = dataclasses.replace(v.link, on_ended=slow_on_ended)
    v.start()
    wait_until(in_on_ended.is_set, WAIT, "the crashed vCPU's thread to tell the VM")
    assert v.state == "crashed"
    v.stop("stopped by request")
    assert v.state == "stopped", v.state
    assert v.reason == "unclaimed port read at 0x60"
