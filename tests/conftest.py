"""Shared fixtures: a `Kvm` on the real /dev/kvm and a `Vm`, both closed after each test.

Tests that need KVM skip only when /dev/kvm does not exist; on a machine that has it, any
other problem (permissions, a broken binding) fails the test instead of hiding it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from kvmd.kvm import Kvm, Vm

# Let every test layer import the shared guest helpers as `from guests import ...`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

KVM_PATH = "/dev/kvm"


def require_kvm() -> None:
    """Skip the calling test when this machine has no /dev/kvm (and only then)."""
    if not os.path.exists(KVM_PATH):
        pytest.skip(f"{KVM_PATH} does not exist: KVM tests need a host with KVM")


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    """An open `kvmd.kvm.Kvm` (/dev/kvm), closed after the test."""
    require_kvm()
    k = Kvm(KVM_PATH)
    try:
        yield k
    finally:
        k.close()


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[Vm]:
    """A fresh `kvmd.kvm.Vm` with no memory and no vCPUs, closed (with all it owns) after
    the test."""
    v = kvm.create_vm()
    try:
        yield v
    finally:
        v.close()
