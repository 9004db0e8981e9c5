"""End-to-end tests of the client library (client.KvmdClient) against the kvmd process.

Every bad-input case asserts the exact exception class (hence status code), then that the
daemon is still healthy.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from guests import PIC_VECTOR_BASE
from interrupt_guests import (
    COUNTERS,
    LAPIC_ES,
    MSI_ADDRESS,
    counter_program,
    counts,
    lapic_enabled,
    wait_for_count,
    wait_ready,
)

from kvmd_client import (
    STATUS_TO_ERROR,
    AlreadyExistsError,
    CancelledError,
    DirtyLog,
    FailedPreconditionError,
    InvalidArgumentError,
    KvmdClient,
    KvmdError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    irqchip_route,
    msi_route,
)
from kvmd_client.errors import error_for_code
from kvmd_client.kvmd_client import normalize_address
from kvmd_proto import vmm_pb2

MiB = 1 << 20
PAGE = 4096

# A tiny real-mode program: mov ax, 0x1234; mov [0x4000], ax; hlt
REAL_MODE_PROGRAM = bytes([0xB8, 0x34, 0x12, 0xA3, 0x00, 0x40, 0xF4])

Healthy = Callable[[], None]
VmIds = Callable[[], str]


# ---------------------------------------------------------------------------------------------
# connection, health, hypervisor


def test_wait_ready_and_health(client: KvmdClient) -> None:
    client.wait_ready(5)
    assert client.health() == "SERVING"


def test_info(client: KvmdClient) -> None:
    info = client.info()
    assert info.api_version == 12
    assert info.page_size == PAGE
    assert info.vcpu_mmap_size >= PAGE
    assert info.daemon_version
    assert info.capabilities["KVM_CAP_IRQFD"] > 0
    assert info.capabilities["KVM_CAP_USER_MEMORY"] > 0
    assert info.limits.max_vms > 0
    assert info.limits.max_vcpus_per_vm > 0


def test_check_extension(client: KvmdClient, vm_id: str) -> None:
    by_name = client.check_extension("KVM_CAP_IRQFD")
    assert by_name > 0
    assert client.check_extension("irqfd") == by_name
    assert client.check_extension(32) == by_name  # KVM_CAP_IRQFD is 32
    client.create_vm(vm_id)
    assert client.check_extension("KVM_CAP_IRQFD", vm_id) > 0


def test_check_extension_unknown_name(client: KvmdClient, assert_healthy: Healthy) -> None:
    with pytest.raises(InvalidArgumentError):
        client.check_extension("KVM_CAP_NO_SUCH_THING")
    assert_healthy()


def test_supported_cpuid(client: KvmdClient) -> None:
    entries = client.supported_cpuid()
    assert entries
    leaf0 = next(e for e in entries if e.function == 0)
    assert leaf0.eax >= 1  # highest basic leaf


def test_unreachable_daemon(tmp_path: Path) -> None:
    address = f"unix://{tmp_path}/nobody.sock"
    with KvmdClient(address, timeout=5) as c:
        with pytest.raises(UnavailableError) as info:
            c.info()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            c.wait_ready(0.5)
        assert time.monotonic() - started < 5


def test_address_forms() -> None:
    assert normalize_address("unix:///run/kvmd/kvmd.sock") == ("unix:///run/kvmd/kvmd.sock", True)
    assert normalize_address("/tmp/k.sock") == ("unix:///tmp/k.sock", True)
    assert normalize_address("127.0.0.1:7000") == ("127.0.0.1:7000", False)
    assert normalize_address("tcp://[::1]:7000") == ("[::1]:7000", False)
    assert normalize_address("unix-abstract:kvmd") == ("unix-abstract:kvmd", True)
    with pytest.raises(ValueError):
        normalize_address("")
    for local in ("unix:///tmp/k.sock", "unix-abstract:kvmd"):  # Unix sockets: no TLS
        with pytest.raises(ValueError, match="TLS"):
            KvmdClient(local, tls_ca="/nonexistent")


def test_error_table() -> None:
    assert STATUS_TO_ERROR[grpc.StatusCode.NOT_FOUND] is NotFoundError
    for code, cls in STATUS_TO_ERROR.items():
        error = error_for_code(code, "boom", details={"errno": "22", "ioctl": "KVM_X"})
        assert type(error) is cls
        assert error.code == code
        assert (error.errno, error.ioctl) == (22, "KVM_X")
    other = error_for_code(grpc.StatusCode.DATA_LOSS, "lost")
    assert type(other) is KvmdError
    assert other.code == grpc.StatusCode.DATA_LOSS
    assert str(other) == "DATA_LOSS: lost"


class _FakeCall(grpc.RpcError):
    """What a failed call looks like to from_rpc_error: code, details, trailing metadata."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 trailing: tuple[tuple[str, bytes], ...]) -> None:
        self._code, self._message, self._trailing = code, message, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailing


def test_rich_details_are_parsed() -> None:
    """ErrorInfo and BadRequest from the grpc-status-details-bin trailer (as the daemon's
    kvmd.api.errors.to_status packs them) become reason, domain, metadata and
    field_violations; a call without the trailer leaves them empty."""
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2

    from kvmd_client.errors import FieldViolation, from_rpc_error

    message = "guest address 0x1001 is not page aligned"
    info, bad = any_pb2.Any(), any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="ADDRESS_UNALIGNED", domain="kvmd",
                                          metadata={"vm_id": "a", "resource": "vm/a"}))
    bad.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="guest_addr", description=message)]))
    code = grpc.StatusCode.INVALID_ARGUMENT
    second = any_pb2.Any()  # AIP-193: one ErrorInfo; should a second come, the first counts
    second.Pack(error_details_pb2.ErrorInfo(reason="SECOND", domain="other"))
    rich = status_pb2.Status(code=code.value[0], message=message, details=[info, bad, second])
    error = from_rpc_error(_FakeCall(code, message, (
        ("grpc-status-details-bin", rich.SerializeToString()),)))
    assert type(error) is InvalidArgumentError
    assert (error.reason, error.domain) == ("ADDRESS_UNALIGNED", "kvmd")
    assert error.metadata == {"vm_id": "a", "resource": "vm/a"}
    assert error.field_violations == [FieldViolation("guest_addr", message)]
    assert error.field_violations[0].field == "guest_addr"
    assert str(error) == f"INVALID_ARGUMENT (ADDRESS_UNALIGNED): {message}"
    plain = from_rpc_error(_FakeCall(grpc.StatusCode.UNAVAILABLE, "no daemon", ()))
    assert (plain.reason, plain.domain, plain.metadata, plain.field_violations) == (
        None, None, {}, [])
    assert str(plain) == "UNAVAILABLE: no daemon"


def test_invalid_argument_names_the_field(client: KvmdClient, vm_id: str) -> None:
    client.create_vm(vm_id)
    with pytest.raises(InvalidArgumentError) as info:
        client.add_memory_region(vm_id, 0x1001, 0x10000)
    assert info.value.reason == "ADDRESS_UNALIGNED"
    assert [v.field for v in info.value.field_violations] == ["guest_addr"]


# ---------------------------------------------------------------------------------------------
# VMs


def test_vm_lifecycle(client: KvmdClient, vm_ids: VmIds) -> None:
    a, b = vm_ids(), vm_ids()
    vm = client.create_vm(a, {"team": "infra", "tier": "gold"}, irqchip=True, pit=True)
    assert vm.vm_id == a
    assert dict(vm.labels) == {"team": "infra", "tier": "gold"}
    assert vm.options.irqchip and vm.options.pit
    assert vm.state == "created"
    client.create_vm(b, {"team": "web"})

    got = client.get_vm(a)
    assert got.vm_id == a and got.created_unix_ms > 0
    names = {v.vm_id for v in client.list_vms()}
    assert {a, b} <= names
    assert [v.vm_id for v in client.list_vms({"team": "infra"})] == [a]
    assert [v.vm_id for v in client.list_vms({"team": "infra", "tier": "gold"})] == [a]
    assert client.list_vms({"team": "infra", "tier": "silver"}) == []

    client.delete_vm(a)
    with pytest.raises(NotFoundError):
        client.get_vm(a)
    assert a not in {v.vm_id for v in client.list_vms()}


def test_vm_counts(client: KvmdClient, vm_id: str) -> None:
    client.create_vm(vm_id)
    client.add_memory_region(vm_id, 0, 2 * MiB)
    client.add_memory_region(vm_id, 4 * MiB, 64 * 1024)
    client.create_vcpu(vm_id, 0)
    client.create_vcpu(vm_id, 1)
    vm = client.get_vm(vm_id)
    assert vm.vcpu_count == 2
    assert vm.memory_slot_count == 2
    assert vm.memory_bytes == 2 * MiB + 64 * 1024


def test_not_found(client: KvmdClient, assert_healthy: Healthy) -> None:
    with pytest.raises(NotFoundError) as info:
        client.get_vm("no-such-vm")
    error = info.value
    assert type(error) is NotFoundError
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "VM_NOT_FOUND"
    assert error.domain == "kvmd"
    assert error.details.get("resource") == "vm/no-such-vm"
    assert error.metadata is error.details and error.metadata["vm_id"] == "no-such-vm"
    assert error.field_violations == []
    assert str(error).startswith("NOT_FOUND (VM_NOT_FOUND): ")
    for call in (
        lambda: client.delete_vm("no-such-vm"),
        lambda: client.list_memory_regions("no-such-vm"),
        lambda: client.create_vcpu("no-such-vm", 0),
        lambda: client.read_memory("no-such-vm", 0, 16),
        lambda: client.write_memory("no-such-vm", 0, b"x"),
        lambda: client.list_irqfds("no-such-vm"),
        lambda: client.list_ioevents("no-such-vm"),
    ):
        with pytest.raises(NotFoundError):
            call()
    assert_healthy()


def test_already_exists(
    client: KvmdClient, vm_id: str, assert_healthy: Healthy
) -> None:
    client.create_vm(vm_id, irqchip=True)
    with pytest.raises(AlreadyExistsError) as info:
        client.create_vm(vm_id)
    assert type(info.value) is AlreadyExistsError
    assert info.value.reason == "VM_ALREADY_EXISTS"
    client.create_vcpu(vm_id, 0)
    with pytest.raises(AlreadyExistsError) as info:
        client.create_vcpu(vm_id, 0)
    assert info.value.reason == "VCPU_ALREADY_EXISTS"
    assert info.value.metadata["vcpu_id"] == "0"
    client.register_irqfd(vm_id, "fd", 5)
    with pytest.raises(AlreadyExistsError):
        client.register_irqfd(vm_id, "fd", 6)
    client.register_ioevent(vm_id, "ev", 0x2F8, 1)
    with pytest.raises(AlreadyExistsError):
        client.register_ioevent(vm_id, "ev", 0x2F9, 1)
    assert_healthy()


@pytest.mark.parametrize(
    "vm_name",
    ["", "x" * 65, "a/b", "has space", "-leading-dash"],
    ids=["empty", "too-long", "slash", "space", "leading-dash"],
)
def test_invalid_vm_ids(client: KvmdClient, vm_name: str, assert_healthy: Healthy) -> None:
    with pytest.raises(InvalidArgumentError):
        client.create_vm(vm_name)
    assert_healthy()


def test_longest_vm_id(client: KvmdClient, vm_ids: VmIds) -> None:
    name = f"long-{os.getpid()}".ljust(64, "x")
    try:
        assert client.create_vm(name).vm_id == name
    finally:
        client.delete_vm(name)


# ---------------------------------------------------------------------------------------------
# memory


def test_memory_regions(client: KvmdClient, vm_id: str) -> None:
    client.create_vm(vm_id)
    r0 = client.add_memory_region(vm_id, 0, MiB)
    r1 = client.add_memory_region(vm_id, 16 * MiB, 3 * PAGE, read_only=True)
    r2 = client.add_memory_region(vm_id, 32 * MiB, 100, log_dirty=True)  # rounded up to a page
    assert (r0.slot, r1.slot, r2.slot) == (0, 1, 2)
    assert r1.read_only and not r1.log_dirty
    assert r2.log_dirty and r2.size == PAGE
    listed = {r.slot: r for r in client.list_memory_regions(vm_id)}
    assert set(listed) == {0, 1, 2}
    assert listed[1].guest_addr == 16 * MiB and listed[1].size == 3 * PAGE

    removed = client.remove_memory_region(vm_id, 0)
    assert (removed.slot, removed.guest_addr, removed.size) == (0, 0, MiB)
    assert {r.slot for r in client.list_memory_regions(vm_id)} == {1, 2}
    # the lowest free slot number is reused
    assert client.add_memory_region(vm_id, 0, PAGE).slot == 0
    with pytest.raises(NotFoundError):
        client.remove_memory_region(vm_id, 9)


@pytest.mark.parametrize(
    ("guest_addr", "size", "error"),
    [
        (0x1001, PAGE, InvalidArgumentError),  # unaligned address
        (0x10000, 0, InvalidArgumentError),  # zero size
        (0x10000, 1 << 60, ResourceExhaustedError),  # absurd size: over the memory limit
    ],
    ids=["unaligned-addr", "zero-size", "absurd-size"],
)
def test_bad_regions(
    client: KvmdClient,
    vm_id: str,
    assert_healthy: Healthy,
    guest_addr: int,
    size: int,
    error: type[KvmdError],
) -> None:
    client.create_vm(vm_id)
    with pytest.raises(error) as info:
        client.add_memory_region(vm_id, guest_addr, size)
    assert type(info.value) is error
    assert client.list_memory_regions(vm_id) == []
    assert_healthy()


def test_overlapping_region_refused(
    client: KvmdClient, vm_id: str, assert_healthy: Healthy
) -> None:
    client.create_vm(vm_id)
    client.add_memory_region(vm_id, 0, MiB)
    # The daemon reports an overlap as ALREADY_EXISTS (KVM's own EEXIST), with the ioctl name.
    with pytest.raises(AlreadyExistsError) as info:
        client.add_memory_region(vm_id, 512 * 1024, PAGE)
    assert info.value.errno == 17
    assert info.value.ioctl == "KVM_SET_USER_MEMORY_REGION"
    assert len(client.list_memory_regions(vm_id)) == 1
    assert_healthy()


def test_large_streamed_roundtrip(client: KvmdClient, vm_id: str) -> None:
    """8 MiB out and back: well over the 4 MiB single-message default, so it must stream."""
    client.create_vm(vm_id)
    client.add_memory_region(vm_id, 0, 16 * MiB)
    data = os.urandom(8 * MiB)
    base = 3 * MiB + 123  # deliberately not aligned: guest memory is byte addressed
    assert client.write_memory(vm_id, base, data) == len(data)
    assert client.read_memory(vm_id, base, len(data)) == data

    chunks = list(client.iter_memory(vm_id, base, len(data), chunk_size=256 * 1024))
    assert len(chunks) == 32
    assert all(len(c.data) == 256 * 1024 for c in chunks)
    assert [c.guest_addr for c in chunks] == [base + i * 256 * 1024 for i in range(32)]
    assert b"".join(c.data for c in chunks) == data
    # bytes around the written range are untouched (fresh memory is zeroed)
    assert client.read_memory(vm_id, base - 16, 16) == bytes(16)
    assert client.read_memory(vm_id, base + len(data), 16) == bytes(16)


def test_write_in_small_chunks(client: KvmdClient, vm_id: str) -> None:
    client.create_vm(vm_id)
    client.add_memory_region(vm_id, 0, MiB)
    data = bytes(range(256)) * 64  # 16 KiB
    assert client.write_memory(vm_id, 0x1000, data, chunk_size=1000) == len(data)
    assert client.read_memory(vm_id, 0x1000, len(data), chunk_size=4096) == data
    assert client.write_memory(vm_id, 0x1000, b"") == 0


def test_write_file_and_read_to_file(client: KvmdClient, vm_id: str, tmp_path: Path) -> None:
    client.create_vm(vm_id)
    client.add_memory_region(vm_id, 0, 4 * MiB)
    image = tmp_path / "image.bin"
    payload = os.urandom(3 * MiB + 17)
    image.write_bytes(payload)
    assert client.write_file(vm_id, 0x10000, image) == len(payload)
    out = tmp_path / "out.bin"
    assert client.read_to_file(vm_id, 0x10000, len(payload), out) == len(payload)
    assert out.read_bytes() == payload


@pytest.mark.parametrize(
    ("guest_addr", "length"),
    [(MiB - 4, 8), (2 * MiB, 8), (0, 1 << 40)],
    ids=["straddles-end", "unbacked", "absurd-length"],
)
def test_memory_access_out_of_bounds(
    client: KvmdClient, vm_id: str, assert_healthy: Healthy, guest_addr: int, length: int
) -> None:
    client.create_vm(vm_id)
    client.add_memory_region(vm_id, 0, MiB)
    with pytest.raises(InvalidArgumentError):
        client.read_memory(vm_id, guest_addr, length)
    if length < MiB:
        with pytest.raises(InvalidArgumentError):
            client.write_memory(vm_id, guest_addr, b"\xaa" * length)
    # a failed write leaves the bytes that were in bounds alone
    assert client.read_memory(vm_id, MiB - 4, 4) == bytes(4)
    assert_healthy()


def test_oversized_message_refused(
    client: KvmdClient, vm_id: str, assert_healthy: Healthy
) -> None:
    client.create_vm(vm_id)
    client.add_memory_region(vm_id, 0, 32 * MiB)
    limit = client.info().limits.max_message_bytes
    with pytest.raises(ResourceExhaustedError):
        client.write_chunks(vm_id, 0, [bytes(limit + PAGE)])
    assert_healthy()


def test_dirty_log(client: KvmdClient, vm_id: str, assert_healthy: Healthy) -> None:
    client.create_vm(vm_id)
    logged = client.add_memory_region(vm_id, 0, MiB, log_dirty=True)  # 256 pages
    plain = client.add_memory_region(vm_id, 2 * MiB, MiB)
    client.write_memory(vm_id, 0x3000, b"host write")  # host writes do not mark pages dirty

    log = client.dirty_log(vm_id, logged.slot)
    assert isinstance(log, DirtyLog)
    bitmap, count = log
    assert count == 0
    assert log.total_pages == 256
    assert len(bitmap) == 256 // 8
    assert bitmap == bytes(len(bitmap))
    assert log.pages() == []
    assert client.dirty_pages(vm_id, logged.slot) == []

    chunks = list(client.iter_dirty_log(vm_id, logged.slot, chunk_size=8))
    assert [c.first_page for c in chunks] == [0, 64, 128, 192]
    assert [c.last for c in chunks] == [False, False, False, True]
    assert all(c.total_pages == 256 for c in chunks)
    assert chunks[-1].total_dirty_pages == 0

    with pytest.raises(InvalidArgumentError):  # the slot was added without dirty logging
        client.dirty_log(vm_id, plain.slot)
    with pytest.raises(NotFoundError):
        client.dirty_log(vm_id, 42)
    assert_healthy()


def test_dirty_log_pages_decoding() -> None:
    log = DirtyLog(slot=0, bitmap=bytes([0b101, 0, 0x80]) + bytes(5), dirty_count=3,
                   total_pages=64)
    assert log.pages() == [0, 2, 23]


def test_real_mode_program_loaded(client: KvmdClient, vm_id: str) -> None:
    """The kvm-ioctls scenario up to the run: program in memory, registers pointing at it."""
    client.create_vm(vm_id)
    client.add_memory_region(vm_id, 0, 0x10000)
    client.write_memory(vm_id, 0x1000, REAL_MODE_PROGRAM)
    client.create_vcpu(vm_id, 0)
    sregs = client.set_sregs(vm_id, 0, cs={"base": 0, "selector": 0})
    assert (sregs.cs.base, sregs.cs.selector) == (0, 0)
    regs = client.set_regs(vm_id, 0, rip=0x1000, rflags=0x2, rax=0)
    assert (regs.rip, regs.rflags, regs.rax) == (0x1000, 0x2, 0)
    assert client.read_memory(vm_id, 0x1000, len(REAL_MODE_PROGRAM)) == REAL_MODE_PROGRAM


# ---------------------------------------------------------------------------------------------
# interrupts and ioevents


def test_irq_line_routing_msi(client: KvmdClient, vm_id: str, assert_healthy: Healthy) -> None:
    """Each way in reaches a started guest that counts its interrupts in memory
    (tests/interrupt_guests.py): an irq line, an MSI, and irqfds on routed GSIs."""
    client.create_vm(vm_id, irqchip=True)
    client.add_memory_region(vm_id, 0, 0x10000)
    client.write_memory(vm_id, 0x1000, counter_program(pic_irqs=(4,), lapic_vectors=(0x30,
                                                                                    0x31)))
    client.create_vcpu(vm_id, 0)
    flat = {"base": 0, "selector": 0}
    client.set_sregs(vm_id, 0, cs=flat, ds=flat, ss=flat, es=LAPIC_ES)
    client.set_regs(vm_id, 0, rip=0x1000, rsp=0x8000, rflags=0x2)
    assert client.signal_msi(vm_id, MSI_ADDRESS, 0x30) is False  # the LAPIC is disabled
    client.set_lapic(vm_id, 0, lapic_enabled(client.get_lapic(vm_id, 0)))
    client.start_vm(vm_id)

    def read(addr: int, length: int) -> bytes:
        return client.read_memory(vm_id, addr, length)

    wait_ready(read)
    client.set_irq_line(vm_id, 4, True)   # default routes: GSI 4 is PIC pin 4
    client.set_irq_line(vm_id, 4, False)
    assert wait_for_count(read, PIC_VECTOR_BASE + 4, 1) == 1
    assert client.signal_msi(vm_id, MSI_ADDRESS, 0x30) is True
    assert wait_for_count(read, 0x30, 1) == 1
    client.set_gsi_routing(
        vm_id,
        [
            irqchip_route(0, "pic-master", 0),
            irqchip_route(4, "ioapic", 4),
            msi_route(24, MSI_ADDRESS, 0x31),
            {"gsi": 25, "msi": {"address": MSI_ADDRESS, "data": 0x30}},
        ],
    )
    client.register_irqfd(vm_id, "msi24", 24)
    client.register_irqfd(vm_id, "msi25", 25)
    client.trigger_irqfd(vm_id, "msi24")
    assert wait_for_count(read, 0x31, 1) == 1
    client.trigger_irqfd(vm_id, "msi25")
    assert wait_for_count(read, 0x30, 2) == 2
    # GSI 4 now goes to the IOAPIC only, where the guest takes nothing.
    client.set_irq_line(vm_id, 4, True)
    client.set_irq_line(vm_id, 4, False)
    time.sleep(0.2)
    assert counts(read(COUNTERS, 256)) == {PIC_VECTOR_BASE + 4: 1, 0x30: 2, 0x31: 1}
    with pytest.raises(InvalidArgumentError) as info:
        client.set_gsi_routing(vm_id, [irqchip_route(0, "ioapic", 99)])
    assert info.value.ioctl == "KVM_SET_GSI_ROUTING"
    assert info.value.errno == 22
    assert_healthy()


def test_irqchip_required(client: KvmdClient, vm_id: str, assert_healthy: Healthy) -> None:
    client.create_vm(vm_id)  # no in-kernel irqchip
    with pytest.raises(FailedPreconditionError):
        client.set_irq_line(vm_id, 4, True)
    with pytest.raises(FailedPreconditionError):
        client.register_irqfd(vm_id, "fd", 4)
    assert_healthy()


def test_irqfds(client: KvmdClient, vm_id: str, assert_healthy: Healthy) -> None:
    client.create_vm(vm_id, irqchip=True)
    fd = client.register_irqfd(vm_id, "net0", 5)
    assert (fd.irqfd_id, fd.gsi, fd.resample, fd.triggers) == ("net0", 5, False, 0)
    level = client.register_irqfd(vm_id, "blk0", 10, resample=True)
    assert level.resample
    for _ in range(3):
        client.trigger_irqfd(vm_id, "net0")
    listed = {i.irqfd_id: i for i in client.list_irqfds(vm_id)}
    assert set(listed) == {"net0", "blk0"}
    assert listed["net0"].triggers == 3
    client.unregister_irqfd(vm_id, "net0")
    assert [i.irqfd_id for i in client.list_irqfds(vm_id)] == ["blk0"]
    with pytest.raises(NotFoundError):
        client.unregister_irqfd(vm_id, "net0")  # double unregister is tracked, not silent
    with pytest.raises(NotFoundError):
        client.trigger_irqfd(vm_id, "net0")
    assert_healthy()


def test_watch_irqfd_resamples_cancel(client: KvmdClient, vm_id: str) -> None:
    client.create_vm(vm_id, irqchip=True)
    client.register_irqfd(vm_id, "lvl", 10, resample=True)
    watch = client.watch_irqfd_resamples(vm_id)
    timer = threading.Timer(0.3, watch.cancel)
    timer.start()
    started = time.monotonic()
    assert list(watch) == []  # nothing acknowledged: the stream just ends when cancelled
    assert watch.cancelled
    assert time.monotonic() - started < 10


def test_ioevents(client: KvmdClient, vm_id: str, assert_healthy: Healthy) -> None:
    client.create_vm(vm_id)
    pio = client.register_ioevent(vm_id, "uart", 0x2F8, 1)
    assert pio.space == vmm_pb2.PIO and pio.length == 1 and not pio.HasField("datamatch")
    mmio = client.register_ioevent(vm_id, "doorbell", 0xD000_0000, 4, space="mmio",
                                   datamatch=0x1234)
    assert mmio.space == vmm_pb2.MMIO and mmio.datamatch == 0x1234
    anylen = client.register_ioevent(vm_id, "any", 0x80)
    assert anylen.length == 0
    listed = {e.ioevent_id: e for e in client.list_ioevents(vm_id)}
    assert set(listed) == {"uart", "doorbell", "any"}
    assert listed["doorbell"].address == 0xD000_0000
    assert listed["uart"].fired == 0
    client.unregister_ioevent(vm_id, "uart")
    assert {e.ioevent_id for e in client.list_ioevents(vm_id)} == {"doorbell", "any"}
    with pytest.raises(NotFoundError):
        client.unregister_ioevent(vm_id, "uart")
    assert_healthy()


@pytest.mark.parametrize(
    ("length", "datamatch"),
    [(3, None), (16, None), (0, 5), (3, 5)],
    ids=["length-3", "length-16", "datamatch-without-length", "datamatch-length-3"],
)
def test_bad_ioevents(
    client: KvmdClient,
    vm_id: str,
    assert_healthy: Healthy,
    length: int,
    datamatch: int | None,
) -> None:
    client.create_vm(vm_id)
    with pytest.raises(InvalidArgumentError):
        client.register_ioevent(vm_id, "bad", 0x2F8, length, datamatch=datamatch)
    assert client.list_ioevents(vm_id) == []
    assert_healthy()


def test_watch_ioevents(client: KvmdClient, vm_id: str) -> None:
    client.create_vm(vm_id)
    client.register_ioevent(vm_id, "uart", 0x2F8, 1)
    with client.watch_ioevents(vm_id) as watch:
        assert watch.collect(duration=0.3) == []
    assert watch.cancelled


def test_watch_unknown_vm(client: KvmdClient, assert_healthy: Healthy) -> None:
    for watch in (client.watch_ioevents("no-such-vm"),
                  client.watch_irqfd_resamples("no-such-vm")):
        with pytest.raises(NotFoundError):
            next(iter(watch))
        assert watch.reopened == 0  # a lasting refusal is not re-opened (only UNAVAILABLE)
    assert_healthy()


def test_watch_deadline(client: KvmdClient, vm_id: str) -> None:
    client.create_vm(vm_id)
    watch = client.watch_ioevents(vm_id, timeout=0.3)
    with pytest.raises(KvmdError) as info:
        list(watch)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not isinstance(info.value, CancelledError)


# ---------------------------------------------------------------------------------------------
# vCPUs


def test_vcpus(client: KvmdClient, vm_id: str, assert_healthy: Healthy) -> None:
    client.create_vm(vm_id)
    vcpu = client.create_vcpu(vm_id, 0)
    assert (vcpu.vm_id, vcpu.vcpu_id) == (vm_id, 0)
    client.create_vcpu(vm_id, 3)
    assert sorted(v.vcpu_id for v in client.list_vcpus(vm_id)) == [0, 3]
    with pytest.raises(NotFoundError):
        client.get_regs(vm_id, 1)
    assert_healthy()


def test_regs_partial_and_full(client: KvmdClient, vm_id: str) -> None:
    client.create_vm(vm_id)
    client.create_vcpu(vm_id, 0)
    reset = client.get_regs(vm_id, 0)
    assert reset.rip == 0xFFF0 and reset.rflags == 0x2  # the x86 reset state

    regs = client.set_regs(vm_id, 0, rax=0x1111, rbx=0x2222)
    regs = client.set_regs(vm_id, 0, {"rip": 0x1000})  # a mapping merges too
    assert (regs.rax, regs.rbx, regs.rip) == (0x1111, 0x2222, 0x1000)
    assert client.get_regs(vm_id, 0) == regs

    full = vmm_pb2.Regs(rip=0x2000, rflags=0x2, rsp=0x8000)  # a message is set as given
    regs = client.set_regs(vm_id, 0, full)
    assert (regs.rip, regs.rsp, regs.rax, regs.rbx) == (0x2000, 0x8000, 0, 0)

    with pytest.raises(ValueError):
        client.set_regs(vm_id, 0, rpi=1)
    with pytest.raises(ValueError):
        client.set_regs(vm_id, 0)


def test_sregs_fpu_events(client: KvmdClient, vm_id: str) -> None:
    client.create_vm(vm_id)
    client.create_vcpu(vm_id, 0)
    before = client.get_sregs(vm_id, 0)
    sregs = client.set_sregs(vm_id, 0, cs={"base": 0, "selector": 0}, cr0=before.cr0 | 0)
    assert (sregs.cs.base, sregs.cs.selector) == (0, 0)
    assert sregs.cs.limit == before.cs.limit  # untouched fields keep their values
    assert sregs.ds == before.ds

    # (mxcsr is left alone: on this host's nested KVM, KVM_SET_FPU drops it even when called
    # through kvmd.kvm directly, so it is not the API's to promise)
    fpu = client.set_fpu(vm_id, 0, fcw=0x27F)
    assert fpu.fcw == 0x27F
    assert client.get_fpu(vm_id, 0).fcw == 0x27F

    events = client.set_vcpu_events(vm_id, 0, nmi_pending=1)
    assert events.nmi_pending == 1
    assert client.get_vcpu_events(vm_id, 0).nmi_pending == 1


def test_cpuid_msrs_mpstate(client: KvmdClient, vm_id: str) -> None:
    client.create_vm(vm_id, irqchip=True)  # KVM refuses MP states but RUNNABLE without LAPIC
    client.create_vcpu(vm_id, 0)
    supported = client.supported_cpuid()
    entries = client.set_cpuid(vm_id, 0, use_supported=True)
    assert entries
    got = client.get_cpuid(vm_id, 0)
    assert {e.function for e in got} <= {e.function for e in supported}

    custom = client.set_cpuid(vm_id, 0, [{"function": 0, "eax": 1, "ebx": 0x756E6547}])
    assert custom[0].function == 0

    sysenter_cs = 0x174
    assert client.set_msrs(vm_id, 0, {sysenter_cs: 0x10})[sysenter_cs] == 0x10
    assert client.get_msrs(vm_id, 0, [sysenter_cs]) == {sysenter_cs: 0x10}

    assert client.get_mp_state(vm_id, 0) == "RUNNABLE"
    assert client.set_mp_state(vm_id, 0, "halted") == "HALTED"
    assert client.get_mp_state(vm_id, 0) == "HALTED"


def test_lapic(client: KvmdClient, vm_id: str) -> None:
    client.create_vm(vm_id, irqchip=True)
    client.create_vcpu(vm_id, 0)
    regs = client.get_lapic(vm_id, 0)
    assert len(regs) == 1024
    page = bytearray(regs)
    page[0x80:0x84] = (0x20).to_bytes(4, "little")  # task priority register
    back = client.set_lapic(vm_id, 0, bytes(page))
    assert back[0x80:0x84] == (0x20).to_bytes(4, "little")
    assert client.get_lapic(vm_id, 0)[0x80:0x84] == (0x20).to_bytes(4, "little")


# ---------------------------------------------------------------------------------------------
# concurrency and the daemon process


def test_concurrent_clients(kvmd: Any, address: str, client: KvmdClient) -> None:
    """16 clients create, fill and delete VMs at once; nothing is left and fds are released."""
    pid = kvmd.proc.pid
    fd_dir = Path(f"/proc/{pid}/fd")
    before_vms = {v.vm_id for v in client.list_vms()}
    fds_before = len(os.listdir(fd_dir))
    payload = os.urandom(256 * 1024)

    def worker(n: int) -> None:
        with KvmdClient(address, timeout=60) as c:
            for round_ in range(3):
                name = f"conc-{os.getpid()}-{n}-{round_}"
                c.create_vm(name, {"test": "concurrency"}, irqchip=True)
                c.add_memory_region(name, 0, MiB)
                c.write_memory(name, 0x1000, payload)
                assert c.read_memory(name, 0x1000, len(payload)) == payload
                c.create_vcpu(name, 0)
                c.register_irqfd(name, "fd", 5)
                c.register_ioevent(name, "ev", 0x2F8, 1)
                c.delete_vm(name)

    with ThreadPoolExecutor(16) as pool:
        for future in [pool.submit(worker, n) for n in range(16)]:
            future.result()

    assert {v.vm_id for v in client.list_vms()} == before_vms
    assert client.list_vms({"test": "concurrency"}) == []
    deadline = time.monotonic() + 5
    while len(os.listdir(fd_dir)) > fds_before and time.monotonic() < deadline:
        time.sleep(0.1)  # fds of closing connections may take a moment
    assert len(os.listdir(fd_dir)) <= fds_before


def test_sigterm_stops_cleanly(start_kvmd: Callable[..., Any]) -> None:
    daemon = start_kvmd()
    with KvmdClient(daemon.address, timeout=10) as c:
        c.create_vm("busy", irqchip=True)
        c.add_memory_region("busy", 0, 4 * MiB)
        c.create_vcpu("busy", 0)
        c.register_irqfd("busy", "fd", 5)
        watch = c.watch_ioevents("busy")  # an open stream must not block shutdown
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        code = daemon.wait(10)
        elapsed = time.monotonic() - started
        watch.cancel()
    assert code == 0, daemon.log()
    assert elapsed < 5, f"took {elapsed:.1f}s to stop"
    assert not daemon.socket.exists()


def test_sigint_stops_cleanly(start_kvmd: Callable[..., Any]) -> None:
    daemon = start_kvmd()
    daemon.signal(signal.SIGINT)
    assert daemon.wait(10) == 0, daemon.log()
    assert not daemon.socket.exists()


def test_stale_socket_is_replaced(start_kvmd: Callable[..., Any], tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))  # a socket file nobody listens on, as a crashed daemon leaves
    s.close()
    assert stale.exists()
    daemon = start_kvmd(name="stale")
    with KvmdClient(daemon.address, timeout=10) as c:
        assert c.health() == "SERVING"


def test_live_socket_is_not_taken(start_kvmd: Callable[..., Any]) -> None:
    first = start_kvmd(name="live")
    second = start_kvmd(name="live", wait=False)
    code = second.wait(10)
    assert code != 0, "a second daemon took over a live socket"
    with KvmdClient(first.address, timeout=10) as c:
        assert c.health() == "SERVING"


# ---------------------------------------------------------------------------------------------
# running guests (run control): hand-assembled real-mode programs at 0x1000

DEBUG_EXIT_PORT = 0x501  # the daemon's default debug-exit device: a write stops the VM
COM1 = 0x3F8


def _out_dx(port: int, *values: int) -> bytes:
    """mov dx, port; then for each value: mov al, value; out dx, al."""
    code = bytes([0xBA, port & 0xFF, port >> 8])
    for v in values:
        code += bytes([0xB0, v, 0xEE])
    return code


def _debug_exit(code: int) -> bytes:
    """Stop the VM with exit code ``code``, then hlt (never reached)."""
    return _out_dx(DEBUG_EXIT_PORT, code) + bytes([0xF4])


def _boot(client: KvmdClient, vm_id: str, program: bytes, *, irqchip: bool = False,
          log_dirty: bool = False) -> None:
    """64 KiB of RAM at 0, ``program`` at 0x1000, vCPU 0 in flat real mode at 0x1000."""
    client.create_vm(vm_id, irqchip=irqchip)
    client.add_memory_region(vm_id, 0, 0x10000, log_dirty=log_dirty)
    client.write_memory(vm_id, 0x1000, program)
    client.create_vcpu(vm_id, 0)
    flat = {"base": 0, "selector": 0}
    client.set_sregs(vm_id, 0, cs=flat, ds=flat, es=flat, fs=flat, gs=flat, ss=flat)
    client.set_regs(vm_id, 0, rip=0x1000, rsp=0x8000, rflags=0x2)


def test_guest_runs_to_debug_exit(client: KvmdClient, vm_id: str) -> None:
    """Load with WriteGuestMemory, set registers, run: console output, a guest store that
    dirties one page, the exit code, the events and the exit counters all come back."""
    program = (
        _out_dx(COM1, ord("H"), ord("i"))
        + bytes([0xB8, 0x34, 0x12, 0xA3, 0x00, 0x40])  # mov ax, 0x1234; mov [0x4000], ax
        + _debug_exit(42)
    )
    _boot(client, vm_id, program, log_dirty=True)
    assert client.dirty_log(vm_id, 0).dirty_count == 0
    with client.watch_vm(vm_id) as events:
        assert client.start_vm(vm_id).state in ("running", "stopped")
        final = client.wait_vm(vm_id, timeout=30)
        seen = events.collect(duration=0.5)
    assert (final.state, final.reason, final.exit_code) == ("stopped", "debug_exit", 42)
    assert "started" in [e.type for e in seen]
    vm = client.get_vm(vm_id)
    assert (vm.state, vm.exit_code) == ("stopped", 42)

    assert client.read_memory(vm_id, 0x4000, 2) == b"\x34\x12"
    log = client.dirty_log(vm_id, 0)
    assert log.pages() == [4]  # the guest's store, and only that (the log was reset above)
    assert log.dirty_count == 1
    assert client.dirty_pages(vm_id, 0) == []  # reading reset the log

    with client.stream_console(vm_id) as console:
        first = console.next(5)
    assert first is not None and first.data == b"Hi"

    stats = client.exit_stats(vm_id)
    assert stats.total["io_out"] == 3  # 'H', 'i', the debug exit
    assert stats.vcpus[0].counts["io_out"] == 3


def test_guest_fires_ioevents(client: KvmdClient, vm_id: str) -> None:
    _boot(client, vm_id, _out_dx(0x600, 1, 2, 3) + _debug_exit(0))
    client.register_ioevent(vm_id, "door", 0x600, 1)
    with client.watch_ioevents(vm_id) as watch:
        client.start_vm(vm_id)
        client.wait_vm(vm_id, timeout=30)
        fired = 0
        while fired < 3:
            event = watch.next(5)
            assert event is not None, f"only {fired} of 3 ioevent writes reported"
            assert event.ioevent_id == "door"
            fired += event.count
    assert fired == 3
    assert client.list_ioevents(vm_id)[0].fired == 3
    assert client.exit_stats(vm_id).total["io_out"] == 1  # the ioevent writes never exited


def test_remote_exit_handler(client: KvmdClient, vm_id: str, assert_healthy: Healthy) -> None:
    program = bytes([
        0xBA, 0x00, 0x07,  # mov dx, 0x700
        0xEC,              # in al, dx        (claimed: answered by this test)
        0xA2, 0x00, 0x40,  # mov [0x4000], al
        0xB0, 0x77,        # mov al, 0x77
        0xEE,              # out dx, al       (claimed: a write the test sees)
        0xA0, 0x00, 0x40,  # mov al, [0x4000]
    ]) + bytes([0xBA, 0x01, 0x05, 0xEE, 0xF4])  # debug exit with the value read
    _boot(client, vm_id, program)
    seen = []

    def device(exit_request: vmm_pb2.ExitRequest) -> bytes | None:
        seen.append((exit_request.address, exit_request.is_write, bytes(exit_request.data)))
        return None if exit_request.is_write else b"\x5a"

    with client.handle_exits(vm_id, [("pio", 0x700, 1)], deadline_ms=10_000) as handler:
        assert [(r.base, r.length) for r in handler.ranges] == [(0x700, 1)]
        with pytest.raises(AlreadyExistsError):  # overlapping claims are refused
            client.handle_exits(vm_id, [("pio", 0x700, 2)])
        client.start_vm(vm_id)
        assert handler.serve(device, count=2) == 2
    assert seen == [(0x700, False, b""), (0x700, True, b"\x77")]
    final = client.wait_vm(vm_id, timeout=30)
    assert final.exit_code == 0x5A
    assert_healthy()


def test_pause_resume_stop(client: KvmdClient, vm_id: str, assert_healthy: Healthy) -> None:
    _boot(client, vm_id, bytes([0xEB, 0xFE]))  # jmp $: spins forever
    with pytest.raises(FailedPreconditionError):
        client.pause_vm(vm_id)  # not running yet
    client.start_vm(vm_id)
    with pytest.raises(FailedPreconditionError):
        client.start_vm(vm_id)  # already running
    assert client.pause_vm(vm_id).state == "paused"
    assert client.get_vcpu_state(vm_id, 0).state == "paused"
    assert client.get_regs(vm_id, 0).rip == 0x1000  # paused inside the loop
    assert client.resume_vm(vm_id).state == "running"
    assert client.stop_vm(vm_id).state == "stopped"
    with pytest.raises(FailedPreconditionError):
        client.stop_vm(vm_id)
    assert_healthy()


def test_vcpu_run_control(client: KvmdClient, vm_id: str) -> None:
    _boot(client, vm_id, bytes([0xEB, 0xFE]))
    assert client.get_vcpu_state(vm_id, 0).state == "created"
    assert client.start_vcpu(vm_id, 0).state == "running"
    assert client.pause_vcpu(vm_id, 0).state == "paused"
    assert client.resume_vcpu(vm_id, 0).state == "running"
    assert client.stop_vcpu(vm_id, 0).state == "stopped"
    with pytest.raises(NotFoundError):
        client.start_vcpu(vm_id, 9)


def test_delete_running_vm(client: KvmdClient, vm_ids: VmIds) -> None:
    vm_id = vm_ids()
    _boot(client, vm_id, bytes([0xEB, 0xFE]))
    client.start_vm(vm_id)
    client.delete_vm(vm_id)  # stops the spinning vCPU first
    with pytest.raises(NotFoundError):
        client.get_vm(vm_id)


# ---------------------------------------------------------------------------------------------
# TLS over TCP


@pytest.fixture
def tls_daemon(start_kvmd: Callable[..., Any], tls_files: Any, tcp_port: int) -> str:
    """A private daemon with an mTLS TCP listener on loopback; returns its TCP address."""
    address = f"127.0.0.1:{tcp_port}"
    start_kvmd("--listen", address, "--tls-cert", str(tls_files.server_cert),
               "--tls-key", str(tls_files.server_key), "--tls-client-ca", str(tls_files.ca))
    return address


def test_mutual_tls(tls_daemon: str, tls_files: Any) -> None:
    with KvmdClient(tls_daemon, tls_ca=tls_files.ca, tls_cert=tls_files.client_cert,
                    tls_key=tls_files.client_key, timeout=10) as c:
        c.wait_ready(10)
        assert c.info().api_version == 12
        c.create_vm("over-tls")
        assert [v.vm_id for v in c.list_vms()] == ["over-tls"]
    # the name in the certificate is checked: localhost is in it too
    localhost = tls_daemon.replace("127.0.0.1", "localhost")
    with KvmdClient(localhost, tls_ca=tls_files.ca, tls_cert=tls_files.client_cert,
                    tls_key=tls_files.client_key, timeout=10) as c:
        assert c.health() == "SERVING"


@pytest.mark.parametrize("credentials", ["plaintext", "no-client-cert", "untrusted-server"])
def test_tls_refuses_clients_without_a_certificate(
    tls_daemon: str, tls_files: Any, credentials: str
) -> None:
    if credentials == "plaintext":
        c = KvmdClient(tls_daemon, timeout=5)
    elif credentials == "no-client-cert":  # TLS, but no client certificate for mTLS
        c = KvmdClient(tls_daemon, tls_ca=tls_files.ca, timeout=5)
    else:  # a client certificate, but the daemon's CA is not trusted (system roots only)
        c = KvmdClient(tls_daemon, tls_cert=tls_files.client_cert, tls_key=tls_files.client_key,
                       timeout=5)
    with c, pytest.raises(UnavailableError):
        c.info()


def test_tls_option_checks(tls_files: Any) -> None:
    with pytest.raises(ValueError, match="together"):
        KvmdClient("127.0.0.1:1", tls_ca=tls_files.ca, tls_cert=tls_files.client_cert)
    with pytest.raises(OSError):
        KvmdClient("127.0.0.1:1", tls_ca="/nonexistent/ca.pem")
