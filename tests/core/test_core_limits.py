"""The default limits come from the host: guest memory never above what it can back."""

from __future__ import annotations

from pathlib import Path

from kvmd.core.limits import (
    HOST_RESERVE_MIN,
    GiB,
    MiB,
    host_limits,
    host_memory_bytes,
    kernel_overhead,
)


def _cgroup_path() -> str:
    with open("/proc/self/cgroup") as fh:
        return next(ln.split(":", 2)[2].strip() for ln in fh if ln.startswith("0::"))


def _host(tmp_path: Path, mem_total_kib: int, memory_max: str | None) -> tuple[str, str]:
    tmp_path.mkdir()
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       {mem_total_kib} kB\nMemFree:        1 kB\n")
    root = tmp_path / "cgroup"
    group = root / _cgroup_path().lstrip("/")
    group.mkdir(parents=True)
    if memory_max is not None:
        (group / "memory.max").write_text(memory_max + "\n")
    return str(meminfo), str(root)


def test_host_memory_is_memtotal_or_the_cgroups_limit_if_lower(tmp_path: Path) -> None:
    meminfo, root = _host(tmp_path / "a", 24 * 1024 * 1024, "max")
    assert host_memory_bytes(meminfo, root) == 24 * GiB
    meminfo, root = _host(tmp_path / "b", 24 * 1024 * 1024, str(8 * GiB))
    assert host_memory_bytes(meminfo, root) == 8 * GiB   # a MemoryMax= of the unit
    meminfo, root = _host(tmp_path / "c", 4 * 1024 * 1024, str(8 * GiB))
    assert host_memory_bytes(meminfo, root) == 4 * GiB   # never above the machine
    meminfo, root = _host(tmp_path / "d", 2 * 1024 * 1024, None)
    assert host_memory_bytes(meminfo, root) == 2 * GiB   # no memory controller


def test_this_hosts_defaults_fit_in_this_host() -> None:
    limits, total = host_limits(), host_memory_bytes()
    assert total > 0
    assert limits.max_memory_total_bytes + kernel_overhead(limits.max_memory_total_bytes) \
        <= total - HOST_RESERVE_MIN
    assert limits.max_memory_per_vm_bytes <= limits.max_memory_total_bytes


def test_defaults_leave_a_reserve_and_kvms_own_memory() -> None:
    # 24 GiB host (this one): 10% (2.4 GiB) reserved, then KVM's ~0.3% for the rest.
    limits = host_limits(24 * GiB)
    usable = 24 * GiB - 24 * GiB // 10
    assert limits.max_memory_total_bytes == usable - kernel_overhead(usable)
    assert limits.max_memory_total_bytes + kernel_overhead(limits.max_memory_total_bytes) \
        <= usable
    assert limits.max_memory_per_vm_bytes == limits.max_memory_total_bytes  # under 64 GiB
    # A small host keeps at least 1 GiB, and guests get at least 256 MiB.
    assert host_limits(4 * GiB).max_memory_total_bytes == \
        3 * GiB - kernel_overhead(3 * GiB)
    assert host_limits(GiB).max_memory_total_bytes == 256 * MiB
    # A 64 GiB slot costs about 192 MiB of kernel memory up front (measured ~160 MiB).
    assert 150 * MiB < kernel_overhead(64 * GiB) < 200 * MiB
