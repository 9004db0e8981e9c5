"""Fixtures of the core-layer tests: a Host on the real /dev/kvm, no gRPC."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kvmd.core.host import Host
from kvmd.core.limits import Limits


@pytest.fixture
def host() -> Iterator[Host]:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is absent: the core tests drive real VMs")
    h = Host(Limits(max_vms=4, max_memory_per_vm_bytes=1 << 24, max_memory_total_bytes=1 << 25,
                    max_memory_slots_per_vm=4, max_vcpus_per_vm=2))
    yield h
    h.close()
