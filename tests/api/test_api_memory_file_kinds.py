"""Files of the images directory that are not plain image files: a FIFO named read-only is
refused without blocking the daemon, a Unix socket is a bad name (not an internal error),
and a running executable cannot back writable memory (FILE_NOT_WRITABLE) but can back
read-only memory."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from api_support import DaemonFactory, RunningDaemon

from kvmd.core.errors import Reason
from kvmd_proto import vmm_pb2 as pb

P = 4096
ADDR = 0x100000
Code = grpc.StatusCode


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir(mode=0o750)
    return root


@pytest.fixture
def gm(daemon_factory: DaemonFactory, images: Path) -> RunningDaemon:
    return daemon_factory(images_dir=str(images))


def add_file(api: RunningDaemon, vm_id: str, name: str, read_only: bool,
             size: int = P) -> pb.MemoryRegion:
    return api.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id=vm_id, guest_addr=ADDR, size=size, read_only=read_only,
        file=pb.MemoryFile(name=name, read_only=read_only)), timeout=10)


def test_a_fifo_named_read_only_is_refused_without_blocking(gm: RunningDaemon,
                                                            images: Path) -> None:
    """Opening a FIFO read-only would wait for a writer: the daemon opens without blocking
    and refuses it as not a regular file (INVALID_ARGUMENT, FILE_NAME_INVALID)."""
    fifo = images / "fifo"
    os.mkfifo(fifo)
    gm.create_vm("fifo")
    try:
        gm.assert_code(lambda: add_file(gm, "fifo", "fifo", read_only=True),
                       Code.INVALID_ARGUMENT, reason=Reason.FILE_NAME_INVALID,
                       field="file.name")
    finally:
        # Release a daemon thread stuck in open() (there is none unless the open blocked).
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    gm.vms.DeleteVm(pb.DeleteVmRequest(vm_id="fifo"))


@pytest.fixture
def bound_socket(images: Path) -> Iterator[str]:
    """A Unix socket bound inside the images directory (open(2) on it fails with ENXIO)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(images / "sock"))
        yield "sock"


def test_a_unix_socket_is_a_bad_file_name(gm: RunningDaemon, bound_socket: str) -> None:
    """A socket cannot be opened at all: INVALID_ARGUMENT (FILE_NAME_INVALID), read-only or
    not, never INTERNAL."""
    gm.create_vm("sock")
    for read_only in (True, False):
        gm.assert_code(lambda r=read_only: add_file(gm, "sock", bound_socket, r),
                       Code.INVALID_ARGUMENT, reason=Reason.FILE_NAME_INVALID,
                       field="file.name")
    gm.vms.DeleteVm(pb.DeleteVmRequest(vm_id="sock"))


@pytest.fixture
def running_executable(images: Path) -> Iterator[str]:
    """A copy of sleep(1) in the images directory, running (writing to it is ETXTBSY)."""
    exe = images / "busy.bin"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", exe)
    proc = subprocess.Popen([str(exe), "60"])
    try:
        yield "busy.bin"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_running_executable_backs_read_only_memory_only(gm: RunningDaemon,
                                                         running_executable: str) -> None:
    """Writable: FAILED_PRECONDITION with FILE_NOT_WRITABLE (the kernel's ETXTBSY), not a
    permission problem; read-only: mapped."""
    gm.create_vm("busy")
    gm.assert_code(lambda: add_file(gm, "busy", running_executable, read_only=False),
                   Code.FAILED_PRECONDITION, reason=Reason.FILE_NOT_WRITABLE)
    region = add_file(gm, "busy", running_executable, read_only=True)
    assert region.read_only and region.file.name == running_executable
    assert region.file.read_only
    gm.vms.DeleteVm(pb.DeleteVmRequest(vm_id="busy"))
