"""Rich error details, and resources vanishing under an RPC that is still streaming."""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from api_support import RunningDaemon, error_info

from kvmd.api import convert
from kvmd.core.errors import InvalidArgument, KernelError, Reason
from kvmd_proto import vmm_pb2 as pb

MiB = 1 << 20
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def test_not_found_details_name_the_resource(api: RunningDaemon) -> None:
    err = api.assert_code(lambda: api.vms.GetVm(pb.GetVmRequest(vm_id="ghost")),
                          grpc.StatusCode.NOT_FOUND)
    info = error_info(err)
    assert info is not None
    assert (info.domain, info.reason) == ("kvmd", "VM_NOT_FOUND")
    assert info.metadata["resource"] == "vm/ghost"
    assert info.metadata["vm_id"] == "ghost"


def test_kernel_refusal_details_carry_errno_and_ioctl(api: RunningDaemon) -> None:
    options = pb.VmOptions(tss_address=(1 << 64) - 1)
    err = api.assert_code(lambda: api.vms.CreateVm(pb.CreateVmRequest(
        vm_id="tss", options=options)), INVALID)
    info = error_info(err)
    assert info is not None
    assert info.reason == "KERNEL_REJECTED"
    assert info.metadata["errno"] == "22"  # EINVAL
    assert info.metadata["ioctl"] == "KVM_SET_TSS_ADDR"


def test_already_exists_and_limit_details(api: RunningDaemon) -> None:
    api.create_vm("twice")
    err = api.assert_code(lambda: api.create_vm("twice"), grpc.StatusCode.ALREADY_EXISTS)
    info = error_info(err)
    assert info is not None and info.reason == "VM_ALREADY_EXISTS"
    assert info.metadata["resource"] == "vm/twice"
    err = api.assert_code(lambda: api.add_memory("twice", 0, 1 << 62),
                          grpc.StatusCode.RESOURCE_EXHAUSTED)
    info = error_info(err)
    assert info is not None and info.reason == "LIMIT_VM_MEMORY"
    assert info.metadata["limit"] == "max_memory_per_vm_bytes"
    assert int(info.metadata["limit_value"]) > 0


def test_vm_deleted_between_write_chunks(api: RunningDaemon) -> None:
    api.create_vm("w")
    api.add_memory("w", 0, MiB)
    deleted = threading.Event()

    def chunks() -> Iterator[pb.WriteGuestMemoryRequest]:
        yield pb.WriteGuestMemoryRequest(vm_id="w", guest_addr=0, data=b"a" * 1000)
        deleted.wait(10)
        yield pb.WriteGuestMemoryRequest(data=b"b" * 1000)

    call = api.memory.WriteGuestMemory.future(chunks())
    threading.Event().wait(0.3)  # the first chunk is in
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="w"))
    deleted.set()
    # The VM it was writing to is gone: a wrong-state error, and the daemon is fine.
    api.assert_code(call.result, PRECONDITION)


@pytest.mark.parametrize("what", ["delete-vm", "remove-slot"])
def test_resource_removed_during_read_stream(api: RunningDaemon, what: str) -> None:
    api.create_vm("r")
    api.add_memory("r", 0, 64 * MiB)
    stream = api.memory.ReadGuestMemory(pb.ReadGuestMemoryRequest(
        vm_id="r", guest_addr=0, length=64 * MiB, chunk_size=4096))
    assert len(next(stream).data) == 4096
    if what == "delete-vm":
        api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="r"))
        expected = PRECONDITION  # the VM was closed under the stream
    else:
        api.memory.RemoveMemoryRegion(pb.RemoveMemoryRegionRequest(vm_id="r", slot=0))
        expected = INVALID  # the rest of the range is no longer guest memory
    # Chunks already produced may still arrive; then the stream fails with the code.
    api.assert_code(lambda: list(stream), expected)


# What a GetVm raises, the status the caller gets, and how the daemon logs it: a caller's
# mistake or the host running out at INFO without a traceback; a kernel failure, another
# OSError, a daemon bug at ERROR with the traceback an operator needs.
FAILURES = {
    "caller's mistake": (InvalidArgument("bad", reason=Reason.VALUE_OUT_OF_RANGE),
                         INVALID, logging.INFO),
    "kernel failure": (KernelError("boom", errno=errno.EIO, ioctl="KVM_RUN"),
                       grpc.StatusCode.INTERNAL, logging.ERROR),
    "host out of memory": (OSError(errno.ENOMEM, os.strerror(errno.ENOMEM)),
                           grpc.StatusCode.RESOURCE_EXHAUSTED, logging.INFO),
    "other OSError": (OSError(errno.EIO, os.strerror(errno.EIO)), grpc.StatusCode.INTERNAL,
                      logging.ERROR),
    "daemon bug": (RuntimeError("bug"), grpc.StatusCode.INTERNAL, logging.ERROR),
}


@pytest.mark.parametrize("case", FAILURES)
def test_a_failure_is_logged_by_whose_fault_it_is(api: RunningDaemon,
                                                  caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  case: str) -> None:
    exc, code, level = FAILURES[case]

    def fail(*args: Any) -> Any:
        raise exc

    api.create_vm("logged")
    caplog.set_level(logging.INFO, logger="kvmd")
    with monkeypatch.context() as m:
        m.setattr(convert, "vm_to_pb", fail)
        err = api.assert_code(lambda: api.vms.GetVm(pb.GetVmRequest(vm_id="logged")), code)
    if isinstance(exc, OSError) and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        info = error_info(err)
        assert info is not None and info.metadata["errno"] == str(errno.ENOMEM)
    records = [r for r in caplog.records if r.getMessage() == "rpc failed"
               and getattr(r, "method", "").endswith("/GetVm")]
    assert [(r.levelno, r.exc_info is not None) for r in records] \
        == [(level, level == logging.ERROR)], records
    assert api.vms.GetVm(pb.GetVmRequest(vm_id="logged")).vm_id == "logged"
