"""Kvm: the /dev/kvm system fd."""

from __future__ import annotations

import errno
import os

from kvmd.kvm._ffi import ffi, ioctl
from kvmd.kvm.caps import CAPABILITY_NUMBERS, capability_number
from kvmd.kvm.dirty import DirtyLogModes, dirty_log_modes
from kvmd.kvm.errors import KvmError
from kvmd.kvm.marshal import cpuid_entries
from kvmd.kvm.types import CpuidEntry
from kvmd.kvm.vm import Vm

KVM_API_VERSION = 12
DEFAULT_PATH = "/dev/kvm"

class Kvm:
    """The KVM system: API version, capabilities, supported CPUID and MSRs, VM creation."""

    def __init__(self, path: str = DEFAULT_PATH) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(exc.errno or errno.ENODEV, "open", path) from None
        try:
            version = ioctl(fd, "KVM_GET_API_VERSION")
            if version != KVM_API_VERSION:
                raise KvmError(errno.EINVAL, "KVM_GET_API_VERSION",
                               f"API version {version}, need {KVM_API_VERSION}")
            self.vcpu_mmap_size = ioctl(fd, "KVM_GET_VCPU_MMAP_SIZE")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.path = path
        self.api_version = version

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close /dev/kvm; VMs already created keep working (they hold their own fds)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_extension(self, cap: int | str) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: 0 if unsupported, else a positive value."""
        return ioctl(self._fd, "KVM_CHECK_EXTENSION", capability_number(cap))

    def capabilities(self) -> dict[str, int]:
        """Every capability this binding knows by name, with the kernel's answer."""
        return {name: self.check_extension(num) for name, num in CAPABILITY_NUMBERS.items()}

    def get_supported_cpuid(self, max_entries: int = 256) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer while the kernel says E2BIG."""
        while True:
            c = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
            try:
                ioctl(self._fd, "KVM_GET_SUPPORTED_CPUID", c)
            except KvmError as exc:
                if exc.errno == errno.E2BIG and max_entries < 4096:
                    max_entries *= 2
                    continue
                raise
            return cpuid_entries(c)

    def get_msr_index_list(self) -> list[int]:
        """MSR indices KVM_GET_MSRS/KVM_SET_MSRS support (KVM_GET_MSR_INDEX_LIST)."""
        n = 256
        while True:
            m = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
            try:
                ioctl(self._fd, "KVM_GET_MSR_INDEX_LIST", m)
            except KvmError as exc:
                if exc.errno == errno.E2BIG and n < 65536:
                    n = max(n * 2, int(m.nmsrs))
                    continue
                raise
            return [int(m.indices[i]) for i in range(m.nmsrs)]

    def create_vm(self) -> Vm:
        """A new VM (machine type 0); its fd and memory belong to the returned Vm."""
        fd = ioctl(self._fd, "KVM_CREATE_VM", 0)
        try:
            return Vm(fd, self.vcpu_mmap_size)
        except BaseException:
            os.close(fd)
            raise

    def dirty_log_modes(self) -> DirtyLogModes:
        """Which dirty-tracking modes the kernel offers (bitmap always; manual protect with
        or without initially-set; dirty ring with its maximum size and acquire/release)."""
        return dirty_log_modes(self.check_extension)
