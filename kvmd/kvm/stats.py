"""Reader for KVM binary statistics (KVM_GET_STATS_FD), per VM or per vCPU."""

from __future__ import annotations

import errno
import os
import struct

from kvmd.kvm._ffi import lib
from kvmd.kvm.errors import KvmError
from kvmd.kvm.types import StatDescriptor

_HEADER = struct.Struct("=6I")  # struct kvm_stats_header
_DESC = struct.Struct("=IhHII")  # struct kvm_stats_desc without its name

_KINDS = {0: "cumulative", 1: "instant", 2: "peak", 3: "linear_hist", 4: "log_hist"}
_UNITS = {0: "none", 1: "bytes", 2: "seconds", 3: "cycles", 4: "boolean"}


class StatsReader:
    """Owns a binary-stats fd; descriptors are parsed once, values re-read on each `read()`."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        try:
            header = os.pread(fd, _HEADER.size, 0)
            _flags, name_size, num_desc, id_off, desc_off, data_off = _HEADER.unpack(header)
            self.id = os.pread(fd, name_size, id_off).split(b"\0", 1)[0].decode()
            step = _DESC.size + name_size
            raw = os.pread(fd, step * num_desc, desc_off)
            descs = _parse_descriptors(raw, step, num_desc)
        except BaseException:
            os.close(fd)
            raise
        self.descriptors: tuple[StatDescriptor, ...] = descs
        self._data_offset = data_off
        self._data_len = max((d.offset + 8 * d.size for d in descs), default=0)

    def read(self) -> dict[str, int | tuple[int, ...]]:
        """Current values: an int per scalar statistic, a tuple of buckets per histogram."""
        if self._fd < 0:
            raise KvmError(errno.EBADF, "read(stats)", "stats fd is closed")
        raw = os.pread(self._fd, self._data_len, self._data_offset)
        out: dict[str, int | tuple[int, ...]] = {}
        for d in self.descriptors:
            values = struct.unpack_from(f"={d.size}Q", raw, d.offset)
            out[d.name] = values[0] if d.size == 1 and not d.kind.endswith("hist") else values
        return out

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


# Every VM (and every vCPU) of a kernel describes its statistics identically: parse each
# distinct descriptor block once, not once per vCPU.
_parsed: dict[bytes, tuple[StatDescriptor, ...]] = {}


def _parse_descriptors(raw: bytes, step: int, count: int) -> tuple[StatDescriptor, ...]:
    cached = _parsed.get(raw)
    if cached is not None:
        return cached
    descs = []
    for i in range(count):
        base = i * step
        flags, exponent, size, offset, bucket = _DESC.unpack_from(raw, base)
        name = raw[base + _DESC.size : base + step].split(b"\0", 1)[0].decode()
        descs.append(StatDescriptor(
            name=name,
            kind=_KINDS.get(flags & lib.KVM_STATS_TYPE_MASK, "unknown"),
            unit=_UNITS.get((flags & lib.KVM_STATS_UNIT_MASK) >> 4, "unknown"),
            base=2 if (flags & lib.KVM_STATS_BASE_MASK) >> 8 else 10,
            exponent=exponent,
            size=size,
            offset=offset,
            bucket_size=bucket,
        ))
    result = tuple(descs)
    if len(_parsed) < 16:
        _parsed[raw] = result
    return result
