"""API tests: an in-process kvmd on a temporary Unix socket, driven through the real stubs.

Fixtures:

* `daemon_factory(**config)` starts a `Daemon` (any `Config` field, e.g. small limits) on
  `unix://{tmp_path}/kvmd-N.sock` and returns a `RunningDaemon` with stubs for every service.
  Every daemon started in a test is stopped when the test ends, and the teardown checks it
  released everything (no VM left, socket removed, fd watcher thread gone).
* `kvmd` is one daemon with the default limits; `api` is its `RunningDaemon`.
* `assert_code(fn, code)` calls `fn`, asserts it failed with exactly `code` (and, for errors
  the daemon produced, a google.rpc.ErrorInfo in the details), then asserts the daemon is
  still healthy: grpc.health.v1 Check("") is SERVING and GetInfo answers.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from kvmd_stubs import DefaultTimeout
from kvmd_stubs import Stubs as StubsBase

from kvmd.server import Config, Daemon
from kvmd_proto import vmm_pb2 as pb
from kvmd_proto import vmm_pb2_grpc as rpc

if not os.path.exists("/dev/kvm"):
    pytest.skip("/dev/kvm is absent: the API tests need real KVM", allow_module_level=True)

# Every call gets a deadline unless it sets one, so a daemon bug fails a test, never hangs it.
DEFAULT_TIMEOUT = 30.0
# The client's receive limit matches the daemon's largest possible message.
CLIENT_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
                  ("grpc.max_send_message_length", 64 << 20)]

# Codes grpc itself produces (message too large, concurrency limit): no kvmd ErrorInfo.
GRPC_NATIVE = object()


class Stubs(StubsBase):
    """One channel and a stub per kvmd service (plus health); every call has a deadline."""

    @classmethod
    def connect(cls, address: str) -> Stubs:
        channel = grpc.intercept_channel(
            grpc.insecure_channel(address, options=CLIENT_OPTIONS),
            DefaultTimeout(DEFAULT_TIMEOUT))
        stubs: Stubs = cls.of(channel)
        return stubs


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The google.rpc.ErrorInfo in an error's rich status, if any."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


@dataclass
class RunningDaemon:
    """An in-process kvmd and a client connected to it."""

    daemon: Daemon
    address: str
    socket_path: str
    stubs: Stubs
    _extra: list[Stubs] = field(default_factory=list)

    # Shorthands, so tests read `api.vms.CreateVm(...)`.
    @property
    def hypervisor(self) -> rpc.HypervisorStub:
        return self.stubs.hypervisor

    @property
    def vms(self) -> rpc.VmsStub:
        return self.stubs.vms

    @property
    def memory(self) -> rpc.MemoryStub:
        return self.stubs.memory

    @property
    def interrupts(self) -> rpc.InterruptsStub:
        return self.stubs.interrupts

    @property
    def ioevents(self) -> rpc.IoEventsStub:
        return self.stubs.ioevents

    @property
    def vcpus(self) -> rpc.VcpusStub:
        return self.stubs.vcpus

    def connect(self) -> Stubs:
        """Another client (its own channel), closed at teardown unless closed earlier."""
        stubs = Stubs.connect(self.address)
        self._extra.append(stubs)
        return stubs

    def assert_healthy(self) -> None:
        resp = self.stubs.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        info = self.stubs.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=10)
        assert info.api_version == 12

    def assert_code(self, fn: Callable[[], Any], code: grpc.StatusCode,
                    *, details: Any = True) -> grpc.RpcError:
        """`fn()` must fail with exactly `code`; then the daemon must still be healthy.

        For a streaming RPC pass something that consumes the stream, e.g.
        `lambda: list(api.memory.ReadGuestMemory(...))`. With details=GRPC_NATIVE the error
        is one grpc raises by itself (no kvmd ErrorInfo expected).
        """
        with pytest.raises(grpc.RpcError) as caught:
            fn()
        err = caught.value
        assert err.code() == code, (  # type: ignore[attr-defined]
            f"expected {code.name}, got {err.code().name}: {err.details()}")  # type: ignore[attr-defined]
        if details is not GRPC_NATIVE:
            info = error_info(err)
            assert info is not None, f"{code.name} without google.rpc.ErrorInfo details"
            assert info.domain == "kvmd"
            assert info.reason
        self.assert_healthy()
        return err

    # -- small conveniences used by many tests --------------------------------------------

    def create_vm(self, vm_id: str, *, irqchip: bool = False, pit: bool = False,
                  labels: dict[str, str] | None = None) -> pb.Vm:
        return self.vms.CreateVm(pb.CreateVmRequest(
            vm_id=vm_id, labels=labels or {}, options=pb.VmOptions(irqchip=irqchip, pit=pit)))

    def add_memory(self, vm_id: str, guest_addr: int, size: int, *, read_only: bool = False,
                   log_dirty: bool = False) -> pb.MemoryRegion:
        return self.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
            vm_id=vm_id, guest_addr=guest_addr, size=size, read_only=read_only,
            log_dirty=log_dirty))

    def write(self, vm_id: str, guest_addr: int, data: bytes, chunk: int = 1 << 20) -> int:
        def requests() -> Iterator[pb.WriteGuestMemoryRequest]:
            yield pb.WriteGuestMemoryRequest(vm_id=vm_id, guest_addr=guest_addr,
                                             data=data[:chunk])
            for off in range(chunk, len(data), chunk):
                yield pb.WriteGuestMemoryRequest(data=data[off : off + chunk])
        return int(self.memory.WriteGuestMemory(requests()).bytes_written)

    def read(self, vm_id: str, guest_addr: int, length: int, chunk_size: int = 0) -> bytes:
        chunks = self.memory.ReadGuestMemory(pb.ReadGuestMemoryRequest(
            vm_id=vm_id, guest_addr=guest_addr, length=length, chunk_size=chunk_size))
        return b"".join(c.data for c in chunks)

    def dirty_log(self, vm_id: str, slot: int, chunk_size: int = 0,
                  form: int = pb.GetDirtyLogRequest.BITMAP) -> list[pb.DirtyLogChunk]:
        return list(self.memory.GetDirtyLog(pb.GetDirtyLogRequest(
            vm_id=vm_id, slot=slot, chunk_size=chunk_size, form=form)))

    def create_vcpu(self, vm_id: str, vcpu_id: int = 0) -> pb.Vcpu:
        return self.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=vcpu_id))

    def close(self) -> None:
        for stubs in self._extra:
            stubs.close()
        self.stubs.close()


DaemonFactory = Callable[..., RunningDaemon]


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Start in-process daemons with any Config fields (e.g. max_vms=2); all are stopped,
    and checked to have released everything, when the test ends."""
    started: list[RunningDaemon] = []
    numbers = itertools.count()

    def start(**config: Any) -> RunningDaemon:
        path = str(tmp_path / f"kvmd-{next(numbers)}.sock")
        address = f"unix://{path}"
        config.setdefault("log_level", "warning")
        daemon = Daemon(Config(listen=[address], **config))
        daemon.start()
        running = RunningDaemon(daemon, address, path, Stubs.connect(address))
        started.append(running)
        return running

    yield start

    for running in started:
        running.close()
        running.daemon.stop()
        host = running.daemon.host
        assert host is not None
        assert host.vm_count() == 0, "the daemon kept VMs after stop()"
        assert host.kvm.closed, "the daemon kept /dev/kvm open after stop()"
        assert not os.path.lexists(running.socket_path), "the socket outlived the daemon"


@pytest.fixture
def api(daemon_factory: DaemonFactory) -> RunningDaemon:
    """A daemon with the default limits and a client for it."""
    return daemon_factory()


@pytest.fixture
def assert_code(api: RunningDaemon) -> Callable[..., grpc.RpcError]:
    """`assert_code(fn, code)` against the `api` daemon (see RunningDaemon.assert_code)."""
    return api.assert_code
