"""The host running out (memory for a memfd, file descriptors): RESOURCE_EXHAUSTED with the
errno, no traceback, and nothing half-made left behind (issue 13 #6, #9)."""

from __future__ import annotations

import errno
import logging
import os
import resource
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from api_support import RunningDaemon, error_info
from grpc_health.v1 import health_pb2

from kvmd_proto import vmm_pb2 as pb

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def failing(err: int) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(err, os.strerror(err))
    return fail


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize("err", [errno.ENOMEM, errno.ENOSPC, errno.EMFILE, errno.ENFILE])
def test_memfd_failure_is_resource_exhausted(api: RunningDaemon, caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    api.create_vm("oom")
    in_use = api.daemon.host.budget.in_use  # type: ignore[union-attr]
    with monkeypatch.context() as m:
        m.setattr(os, "memfd_create", failing(err))
        e = api.assert_code(lambda: api.add_memory("oom", 0, 1 << 20), EXHAUSTED)
    info = error_info(e)
    assert info is not None and info.metadata["errno"] == str(err)
    assert not tracebacks(caplog), [r.getMessage() for r in tracebacks(caplog)]
    assert list(api.memory.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm_id="oom")).regions) \
        == []
    assert api.daemon.host.budget.in_use == in_use  # type: ignore[union-attr]
    assert api.add_memory("oom", 0, 1 << 20).slot == 0  # and it works again
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="oom"))


def open_now() -> int:
    return len(os.listdir("/proc/self/fd"))


class NoFile:
    """This process's soft RLIMIT_NOFILE set for a block so that only `slack` more
    descriptors can be opened: the kernel's own EMFILE, which the daemon's budget (sized
    when it started) does not see. (The kernel hands out the lowest free number and refuses
    one at or above the limit: the limit is that number plus the slack, holes above it
    included.)"""

    def __init__(self, slack: int) -> None:
        self.slack = slack

    def __enter__(self) -> None:
        self.saved = resource.getrlimit(resource.RLIMIT_NOFILE)
        free = [os.dup(0) for _ in range(self.slack + 1)]
        for fd in free:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (free[-1], self.saved[1]))

    def __exit__(self, *exc: object) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, self.saved)


def test_emfile_from_the_kernel_leaves_nothing_half_made(api: RunningDaemon,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    """Past RLIMIT_NOFILE every call that needs descriptors answers RESOURCE_EXHAUSTED, and
    an object needing two (a vCPU and its stats fd, a resample irqfd's two eventfds) that
    got only one is not left half made: nothing listed, every descriptor closed."""
    api.create_vm("emfile", irqchip=True)
    api.stubs.health.Check(health_pb2.HealthCheckRequest(service=""))  # warm
    calls: dict[str, tuple[int, Callable[[], Any], Callable[[], int]]] = {
        "CreateVm": (0, lambda: api.create_vm("emfile-2"),
                     lambda: len(api.vms.ListVms(pb.ListVmsRequest()).vms)),
        "CreateVcpu": (1, lambda: api.create_vcpu("emfile", 0),
                       lambda: len(api.vcpus.ListVcpus(pb.ListVcpusRequest(
                           vm_id="emfile")).vcpus)),
        "AddMemoryRegion": (0, lambda: api.add_memory("emfile", 0, 1 << 16),
                            lambda: len(api.memory.ListMemoryRegions(
                                pb.ListMemoryRegionsRequest(vm_id="emfile")).regions)),
        "RegisterIrqfd": (1, lambda: api.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(
            vm_id="emfile", irqfd_id="level", gsi=5, resample=True)),
            lambda: len(api.interrupts.ListIrqfds(pb.ListIrqfdsRequest(
                vm_id="emfile")).irqfds)),
        "RegisterIoevent": (0, lambda: api.ioevents.RegisterIoevent(pb.RegisterIoeventRequest(
            vm_id="emfile", ioevent_id="bell", space=pb.MMIO, address=0xD000_0000, length=4)),
            lambda: len(api.ioevents.ListIoevents(pb.ListIoeventsRequest(
                vm_id="emfile")).ioevents)),
    }
    for name, (slack, call, count) in calls.items():
        before, fds = count(), open_now()
        with NoFile(slack), pytest.raises(grpc.RpcError) as caught:
            call()
        err = caught.value
        assert err.code() == EXHAUSTED, (name, err.details())  # type: ignore[attr-defined]
        info = error_info(err)
        assert info is not None and info.metadata["errno"] == str(errno.EMFILE), name
        assert count() == before, name
        assert open_now() == fds, name
        call()  # with descriptors again, it works
        assert count() == before + 1, name
    assert not tracebacks(caplog), [r.getMessage() for r in tracebacks(caplog)]
    api.assert_healthy()
    for vm_id in ("emfile", "emfile-2"):
        api.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id))


def test_a_watcher_that_cannot_take_an_eventfd_leaves_nothing_in_kvm(
        api: RunningDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last step of RegisterIrqfd (resample) and RegisterIoevent, watching the eventfd
    (epoll: ENOMEM, ENOSPC at max_user_watches), failing undoes the KVM registration."""
    api.create_vm("watch", irqchip=True)
    host = api.daemon.host
    assert host is not None
    vm = host.get_vm("watch")
    fds = open_now()
    with monkeypatch.context() as m:
        m.setattr(host.watcher, "add", failing(errno.ENOSPC))
        api.assert_code(lambda: api.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(
            vm_id="watch", irqfd_id="level", gsi=5, resample=True)), EXHAUSTED)
        api.assert_code(lambda: api.ioevents.RegisterIoevent(pb.RegisterIoeventRequest(
            vm_id="watch", ioevent_id="bell", space=pb.MMIO, address=0xD000_0000, length=4)),
            EXHAUSTED)
    assert vm.irqfds() == [] and vm.ioevents() == []
    assert vm.vm.irqfds() == [] and vm.vm.ioevents() == []  # nothing left in KVM
    assert open_now() == fds and vm.fds.held == 3
    api.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(vm_id="watch", irqfd_id="level",
                                                         gsi=5, resample=True))
    api.ioevents.RegisterIoevent(pb.RegisterIoeventRequest(
        vm_id="watch", ioevent_id="bell", space=pb.MMIO, address=0xD000_0000, length=4))
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="watch"))
