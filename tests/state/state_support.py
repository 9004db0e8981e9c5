"""State tests: daemons (in-process, and as separate processes for "another daemon"), a
client for each, and helpers to boot the state guests, snapshot and restore.

Fixtures: `node` (an in-process daemon with a state directory), `other_process` (a kvmd
process of its own: restores there prove nothing is shared but the snapshot bytes), and
`node_factory(**config)` for daemons with particular limits.
"""

from __future__ import annotations

import itertools
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from kvmd_stubs import DefaultTimeout, Stubs
from polling import wait_until
from state_guests import CODE_ADDR, CODE_SEGMENT, MEM_SIZE, STACK_TOP, assemble

from kvmd.server import Config, Daemon
from kvmd.state.format import MAGIC, SnapshotReader, SnapshotWriter, as_message
from kvmd_proto import vmm_pb2 as pb

if not os.path.exists("/dev/kvm"):
    pytest.skip("/dev/kvm is absent: the state tests need real KVM", allow_module_level=True)

CALL_TIMEOUT = 60.0
OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
           ("grpc.max_send_message_length", 64 << 20)]


def connect(address: str) -> Stubs:
    channel = grpc.intercept_channel(grpc.insecure_channel(address, options=OPTIONS),
                                     DefaultTimeout(CALL_TIMEOUT))
    stubs: Stubs = Stubs.of(channel)
    return stubs


@dataclass
class Node:
    """A daemon and a client of it, with the calls the state tests repeat."""

    address: str
    stubs: Stubs
    state_dir: Path | None = None

    def healthy(self) -> bool:
        resp = self.stubs.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    def boot(self, vm_id: str, source: str, *, irqchip: bool = False, pit: bool = False,
             log_dirty: bool = True, mem_size: int = MEM_SIZE) -> None:
        """A real-mode VM running `source` (assembled) at CS:IP = CODE_SEGMENT:0."""
        s = self.stubs
        s.vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id, labels={"test": "state"},
                                          options=pb.VmOptions(irqchip=irqchip, pit=pit)))
        s.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
            vm_id=vm_id, guest_addr=0, size=mem_size, log_dirty=log_dirty))
        self.write(vm_id, CODE_ADDR, assemble(source))
        ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=0)
        s.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=0))
        sregs = s.vcpus.GetSregs(ref)
        sregs.cs.base, sregs.cs.selector = CODE_ADDR, CODE_SEGMENT
        s.vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref, sregs=sregs))
        s.vcpus.SetRegs(pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(rip=0, rsp=STACK_TOP,
                                                                 rflags=2)))

    def write(self, vm_id: str, addr: int, data: bytes, chunk: int = 1 << 20) -> None:
        def requests() -> Iterator[pb.WriteGuestMemoryRequest]:
            yield pb.WriteGuestMemoryRequest(vm_id=vm_id, guest_addr=addr, data=data[:chunk])
            for off in range(chunk, len(data), chunk):
                yield pb.WriteGuestMemoryRequest(data=data[off:off + chunk])
        self.stubs.memory.WriteGuestMemory(requests())

    def read(self, vm_id: str, addr: int, length: int) -> bytes:
        return b"".join(c.data for c in self.stubs.memory.ReadGuestMemory(
            pb.ReadGuestMemoryRequest(vm_id=vm_id, guest_addr=addr, length=length)))

    def u32(self, vm_id: str, addr: int) -> int:
        return int(struct.unpack("<I", self.read(vm_id, addr, 4))[0])

    def start(self, vm_id: str) -> None:
        self.stubs.vms.StartVm(pb.VmRef(vm_id=vm_id))

    def state(self, vm_id: str) -> str:
        return str(self.stubs.vms.GetVm(pb.GetVmRequest(vm_id=vm_id)).state)

    def console(self, vm_id: str) -> bytes:
        return b"".join(c.data for c in self.stubs.vms.StreamConsole(
            pb.StreamConsoleRequest(vm_id=vm_id, backlog=True, no_follow=True)))

    def wait_u32(self, vm_id: str, addr: int, above: int, timeout: float = 30) -> int:
        return int(wait_until(lambda: (v := self.u32(vm_id, addr)) > above and v, timeout,
                              f"{vm_id}: the guest's counter at {addr:#x} to pass {above}"))

    def snapshot(self, vm_id: str, **request: Any) -> tuple[bytes, pb.SnapshotInfo]:
        """The snapshot's bytes (empty when written to a file) and its summary."""
        data, done = [], None
        for msg in self.stubs.snapshots.SnapshotVm(pb.SnapshotVmRequest(vm_id=vm_id,
                                                                        **request)):
            if msg.WhichOneof("payload") == "data":
                data.append(msg.data)
            else:
                done = msg.done
        assert done is not None, "the snapshot stream ended without its summary"
        return b"".join(data), done

    def restore(self, vm_id: str, data: bytes = b"", *, files: tuple[str, ...] = (),
                start: bool = False, chunk: int = 1 << 20) -> pb.Vm:
        def requests() -> Iterator[pb.RestoreVmRequest]:
            yield pb.RestoreVmRequest(options=pb.RestoreVmOptions(
                vm_id=vm_id, start=start, files=list(files)))
            for off in range(0, len(data), chunk):
                yield pb.RestoreVmRequest(data=data[off:off + chunk])
        vm: pb.Vm = self.stubs.snapshots.RestoreVm(requests())
        return vm

    def vm_ids(self) -> list[str]:
        return [v.vm_id for v in self.stubs.vms.ListVms(pb.ListVmsRequest()).vms]


class ProcessDaemon:
    """kvmd as a process of its own, on a socket in `directory`."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.socket = directory / "kvmd.sock"
        self.address = f"unix://{self.socket}"
        self.log_path = directory / "kvmd.log"
        script = Path(sys.executable).parent / "kvmd"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(script), "--listen", self.address, "--metrics-listen", "off",
             "--state-dir", str(directory / "state"), *args],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.stubs = connect(self.address)
        deadline = time.monotonic() + 30
        while True:
            try:
                if Node(self.address, self.stubs).healthy():
                    break
            except grpc.RpcError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"kvmd did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.stubs.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


NodeFactory = Callable[..., Node]


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[NodeFactory]:
    """In-process daemons with any Config fields; each gets a state directory."""
    started: list[tuple[Daemon, Node]] = []
    numbers = itertools.count()

    def start(**config: Any) -> Node:
        n = next(numbers)
        path = tmp_path / f"d{n}"
        path.mkdir()
        address = f"unix://{path}/kvmd.sock"
        config.setdefault("log_level", "warning")
        config.setdefault("state_dir", str(path / "state"))
        daemon = Daemon(Config(listen=[address], **config))
        daemon.start()
        node = Node(address, connect(address), Path(config["state_dir"]) or None)
        started.append((daemon, node))
        return node

    yield start
    for daemon, node in started:
        node.stubs.close()
        daemon.stop()
        assert daemon.host is not None and daemon.host.vm_count() == 0


@pytest.fixture
def node(node_factory: NodeFactory) -> Node:
    return node_factory()


@pytest.fixture
def other_process(tmp_path: Path) -> Iterator[Node]:
    directory = tmp_path / "other"
    directory.mkdir()
    daemon = ProcessDaemon(directory)
    try:
        yield Node(daemon.address, daemon.stubs, directory / "state")
    finally:
        daemon.stop()


def rewrite(data: bytes, edit: Callable[[pb.SnapshotRecord], None], magic: str = MAGIC) -> bytes:
    """The snapshot (or hand-over state: `magic`) re-framed after `edit` changed its
    records, with a valid checksum: so a refusal is about the contents, not a checksum
    mismatch."""
    reader = SnapshotReader(magic)
    records = [as_message(r) for r in reader.feed(data)]
    writer = SnapshotWriter()
    out = b""
    for record in records:
        if record.HasField("trailer"):
            out += writer.trailer()
            writer = SnapshotWriter()
            continue
        edit(record)
        out += writer.record(record)
    return out
