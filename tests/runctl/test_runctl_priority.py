"""vCPU threads lower their own scheduling priority (vcpu_nice); the API's threads keep
theirs, so the control plane stays responsive while guests spin."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from guests import SPIN
from polling import wait_until
from runctl_api import WAIT, Api

from kvmd.config import DEFAULT_VCPU_NICE
from kvmd_proto import vmm_pb2 as pb


def vcpu_thread_nice(vm_id: str) -> int:
    threads = [t for t in threading.enumerate() if t.name == f"vcpu-{vm_id}-0"]
    assert threads and threads[0].native_id is not None
    return os.getpriority(os.PRIO_PROCESS, threads[0].native_id)


def test_vcpu_threads_run_at_the_configured_nice_value(api_factory: Callable[..., Api]) -> None:
    api: Api = api_factory()  # the default: DEFAULT_VCPU_NICE
    api.boot("spin", SPIN)
    api.start("spin")
    wait_until(lambda: vcpu_thread_nice("spin") == DEFAULT_VCPU_NICE, WAIT, "the nice value")
    # The API's threads (and this test's) are untouched.
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0
    assert api.get_vm("spin").state == "running"
    # Paused, the thread has the API's priority back (so it leaves the guest promptly on a
    # busy host); resumed, it lowers itself again.
    assert api.pause("spin").state == "paused"
    assert vcpu_thread_nice("spin") == 0
    api.vms.ResumeVm(pb.VmRef(vm_id="spin"))
    wait_until(lambda: vcpu_thread_nice("spin") == DEFAULT_VCPU_NICE, WAIT, "nice again")
    api.delete("spin")

    off = api_factory(vcpu_nice=0)
    off.boot("plain", SPIN)
    off.start("plain")
    wait_until(lambda: off.get_vm("plain").state == "running", WAIT, "running")
    assert vcpu_thread_nice("plain") == 0
    off.delete("plain")


def test_vcpu_threads_under_the_idle_policy(api_factory: Callable[..., Api]) -> None:
    api: Api = api_factory(vcpu_policy="idle")
    api.boot("idle", SPIN)
    api.start("idle")
    wait_until(lambda: vcpu_thread_policy("idle") == os.SCHED_IDLE, WAIT, "SCHED_IDLE")
    assert api.pause("idle").state == "paused"
    assert vcpu_thread_policy("idle") == os.SCHED_OTHER  # paused: the API's priority
    assert vcpu_thread_nice("idle") == 0
    api.vms.ResumeVm(pb.VmRef(vm_id="idle"))
    wait_until(lambda: vcpu_thread_policy("idle") == os.SCHED_IDLE, WAIT, "idle again")
    api.delete("idle")


def vcpu_thread_policy(vm_id: str) -> int:
    threads = [t for t in threading.enumerate() if t.name == f"vcpu-{vm_id}-0"]
    assert threads and threads[0].native_id is not None
    return os.sched_getscheduler(threads[0].native_id)
