"""What a resume does to a paused vCPU thread's scheduling before the thread runs: its
slice goes back to the kernel's at once (so, woken, it does not preempt the resumer),
while its nice value stays the API's until it lowers itself on its way into the guest.

The vCPU's lock is held across the resume: its thread cannot leave its wait, let alone
enter the guest (where it would reset both itself), until the checks are done."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest
from guests import SPIN
from guests_runctl import halt_then_exit
from polling import wait_until
from runctl_api import WAIT, Api

from kvmd.config import DEFAULT_VCPU_NICE
from kvmd.core import sched


def test_a_resume_gives_the_kernels_slice_back_before_the_thread_runs(
        api_factory: Callable[..., Api]) -> None:
    api: Api = api_factory()  # the default api_slice_us and vcpu_nice
    short = sched.api_slice_us()
    if not short:
        pytest.skip("this kernel has no per-thread scheduler slices (Linux 6.12+)")
    api.boot("slice", SPIN)
    api.start("slice")
    host = api.daemon.host
    assert host is not None
    v = host.get_vm("slice").vcpu(0)
    (thread,) = [t for t in threading.enumerate() if t.name == "vcpu-slice-0"]
    tid = thread.native_id
    assert tid is not None
    wait_until(lambda: os.getpriority(os.PRIO_PROCESS, tid) == DEFAULT_VCPU_NICE, WAIT,
               "the vCPU thread to lower itself")
    assert api.pause("slice").state == "paused"
    assert sched.thread_slice_ns(tid) // 1000 == short  # paused: the API's slice
    with v.cond:
        v.resume()
        assert v.state == "running"
        assert sched.thread_slice_ns(tid) // 1000 > short  # the kernel's, before it woke
        assert os.getpriority(os.PRIO_PROCESS, tid) == 0  # lowered only on its way in
    wait_until(lambda: os.getpriority(os.PRIO_PROCESS, tid) == DEFAULT_VCPU_NICE, WAIT,
               "the vCPU thread to lower itself again")
    api.delete("slice")


def test_a_halted_vcpu_is_boosted_when_paused(api_factory: Callable[..., Api]) -> None:
    """A vCPU halted (HLT, no in-kernel irqchip) after lowering itself on its way in waits
    at vcpu_nice; a pause gives it the API's priority back, as it does a running one."""
    api: Api = api_factory()  # the default vcpu_nice
    api.boot("nap", halt_then_exit(0x79))
    api.start("nap")
    api.wait_vcpu_state("nap", "halted")
    (thread,) = [t for t in threading.enumerate() if t.name == "vcpu-nap-0"]
    tid = thread.native_id
    assert tid is not None
    assert os.getpriority(os.PRIO_PROCESS, tid) == DEFAULT_VCPU_NICE
    assert api.pause("nap").state == "paused"
    assert os.getpriority(os.PRIO_PROCESS, tid) == 0
    api.resume("nap")
    api.wait_vm_state("nap", "stopped")
    assert api.get_vm("nap").exit_code == 0x79
    api.delete("nap")
