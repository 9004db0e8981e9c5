"""The in-process daemon's lifetime: stop() ends streams and releases everything."""

from __future__ import annotations

import gc
import os
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
from api_support import Stubs

from kvmd.server import Config, ConfigError, Daemon
from kvmd_proto import vmm_pb2 as pb


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return fds


def _start(path: Path) -> Daemon:
    daemon = Daemon(Config(listen=[f"unix://{path}"], log_level="warning"))
    daemon.start()
    return daemon


def _populate_and_watch(address: str) -> tuple[Stubs, list[threading.Thread], list[object]]:
    """VMs holding every kind of resource, and three open watch streams."""
    stubs = Stubs.connect(address)
    for vm_id, irqchip in (("a", True), ("b", False)):
        stubs.vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id,
                                              options=pb.VmOptions(irqchip=irqchip)))
        stubs.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
            vm_id=vm_id, size=1 << 20, log_dirty=True))
        stubs.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=0))
        stubs.ioevents.RegisterIoevent(pb.RegisterIoeventRequest(
            vm_id=vm_id, ioevent_id="e", space=pb.PIO, address=0x10))
    stubs.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(
        vm_id="a", irqfd_id="i", gsi=5, resample=True))
    streams = [
        stubs.ioevents.WatchIoevents(pb.WatchIoeventsRequest(vm_id="a"), timeout=30),
        stubs.ioevents.WatchIoevents(pb.WatchIoeventsRequest(vm_id="b"), timeout=30),
        stubs.interrupts.WatchIrqfdResamples(pb.WatchIrqfdResamplesRequest(vm_id="a"),
                                             timeout=30),
    ]
    outcomes: list[object] = []

    def drain(stream: object) -> None:
        try:
            outcomes.append(list(stream))  # type: ignore[call-overload]
        except grpc.RpcError as err:
            outcomes.append(err.code())  # type: ignore[attr-defined]

    threads = [threading.Thread(target=drain, args=(s,), daemon=True) for s in streams]
    for t in threads:
        t.start()
    time.sleep(0.3)
    return stubs, threads, outcomes


@pytest.fixture(scope="module")
def warmed(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Start and stop one daemon first: grpc creates process-wide state on first use."""
    tmp_path = tmp_path_factory.mktemp("warm")
    daemon = _start(tmp_path / "warm.sock")
    stubs, threads, _ = _populate_and_watch(f"unix://{tmp_path}/warm.sock")
    daemon.stop()
    for t in threads:
        t.join(10)
    stubs.close()
    del daemon
    gc.collect()
    time.sleep(0.2)


@pytest.mark.usefixtures("warmed")
def test_stop_ends_streams_and_releases_every_vm_resource(tmp_path: Path) -> None:
    baseline = _open_fds()
    path = tmp_path / "kvmd.sock"
    daemon = _start(path)
    stubs, threads, outcomes = _populate_and_watch(f"unix://{path}")
    assert len(_open_fds()) > len(baseline) + 10  # /dev/kvm, VMs, vCPUs, memfds, eventfds

    daemon.stop()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a watch stream outlived stop()"
    assert len(outcomes) == 3  # each ended (cleanly or with a status), none hangs
    stubs.close()
    assert not path.exists()
    assert daemon.host is not None and daemon.host.vm_count() == 0

    # Everything kvmd itself opened is closed. (grpc's server object keeps an epoll fd and
    # an eventfd until it is garbage-collected: see the next test.)
    del daemon
    gc.collect()
    deadline = time.monotonic() + 10
    while len(_open_fds()) > len(baseline) and time.monotonic() < deadline:
        time.sleep(0.1)
    now = _open_fds()
    assert len(now) <= len(baseline), {fd: t for fd, t in now.items() if fd not in baseline}


@pytest.mark.usefixtures("warmed")
def test_stop_releases_rpc_threads_and_server_fds(tmp_path: Path) -> None:
    """A stopped Daemon still held by its owner (an embedding, a test, a supervisor that
    restarts it in-process) must not keep grpc's worker threads or fds alive."""
    baseline = _open_fds()
    threads_before = set(threading.enumerate())
    path = tmp_path / "kvmd.sock"
    daemon = _start(path)
    stubs = Stubs.connect(f"unix://{path}")
    for i in range(8):  # several RPCs at once: the executor grows a few worker threads
        stubs.vms.CreateVm(pb.CreateVmRequest(vm_id=f"v{i}"))
    stubs.close()
    daemon.stop()

    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        extra_threads = [t.name for t in threading.enumerate()
                         if t not in threads_before and t.is_alive()]
        extra_fds = {fd: t for fd, t in _open_fds().items() if fd not in baseline}
        if not extra_threads and not extra_fds:
            break
        time.sleep(0.1)
    assert (extra_threads, extra_fds) == ([], {}), (
        "Daemon.stop() left grpc worker threads and/or fds behind while the Daemon object "
        "is alive")


def test_second_daemon_on_a_live_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kvmd.sock"
    first = _start(path)
    try:
        second = Daemon(Config(listen=[f"unix://{path}"], log_level="warning"))
        with pytest.raises(ConfigError, match="already listening"):
            second.start()
        second.stop()
        # The first daemon still owns its socket and answers.
        stubs = Stubs.connect(f"unix://{path}")
        assert stubs.hypervisor.GetInfo(pb.GetInfoRequest()).api_version == 12
        stubs.close()
    finally:
        first.stop()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "kvmd.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening: what a crashed daemon leaves
    stale.close()
    assert path.exists()
    daemon = _start(path)
    try:
        assert oct(path.stat().st_mode & 0o777) == oct(0o660)
        stubs = Stubs.connect(f"unix://{path}")
        assert stubs.hypervisor.GetInfo(pb.GetInfoRequest()).api_version == 12
        stubs.close()
    finally:
        daemon.stop()
    assert not path.exists()


def test_the_server_waits_for_calls_with_one_request_not_one_per_method(
        tmp_path: Path) -> None:
    """grpc.aio's server keeps one pending request per *registered* method and waits on all
    of them for every call (~300 us of the loop per call with kvmd's 74 methods); kvmd
    serves every method through generic handlers, so one request waits for any call. Every
    service still answers (health and reflection included)."""
    import asyncio
    import collections

    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from kvmd.server import grpc_loop

    path = tmp_path / "kvmd.sock"
    daemon = _start(path)
    try:
        async def pending_requests() -> collections.Counter[str]:
            return collections.Counter(getattr(t.get_coro(), "__qualname__", "")
                                       for t in asyncio.all_tasks())

        tasks = asyncio.run_coroutine_threadsafe(pending_requests(), grpc_loop()).result(10)
        assert tasks["AioServer._request_registered_call"] == 0, tasks
        assert tasks["AioServer._request_call"] == 1, tasks

        stubs = Stubs.connect(f"unix://{path}")
        try:
            stubs.vms.CreateVm(pb.CreateVmRequest(vm_id="v"))
            assert stubs.vms.GetVm(pb.GetVmRequest(vm_id="v")).vm_id == "v"
            channel = grpc.insecure_channel(f"unix://{path}")
            check = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="kvmd.v1.Vms"), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            (answer,) = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
            listed = {s.name for s in answer.list_services_response.service}
            assert {"kvmd.v1.Vms", "kvmd.v1.Migration", "grpc.health.v1.Health"} <= listed
            channel.close()
        finally:
            stubs.close()
    finally:
        daemon.stop()
