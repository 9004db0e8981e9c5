"""Shared fixtures: a `Kvm` on the real /dev/kvm and a `Vm`, both closed after each test, and
in-process daemons (`start_daemon`).

Tests that need KVM skip only when /dev/kvm does not exist; on a machine that has it, any
other problem (permissions, a broken binding) fails the test instead of hiding it.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from kvmd.kvm import Kvm, Vm

if TYPE_CHECKING:
    from kvmd.core.host import Host
    from kvmd.server import Daemon

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


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start in-process daemons (kvmd.server.Daemon, real /dev/kvm): Config fields as
    keywords, `listen` one Unix socket in tmp_path unless given; each is stopped after the
    test."""
    from kvmd.server import Config, Daemon

    require_kvm()
    started: list[Daemon] = []
    numbers = itertools.count()

    def start(**config: Any) -> Daemon:
        config.setdefault("listen", [f"unix://{tmp_path}/d{next(numbers)}.sock"])
        config.setdefault("log_level", "warning")
        daemon = Daemon(Config(**config))
        started.append(daemon)
        daemon.start()
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def host() -> Iterator[Host]:
    """A core Host (the daemon's VM registry, default limits) on the real /dev/kvm, closed
    with its VMs after the test. Layers needing other limits define their own."""
    from kvmd.core.host import Host

    require_kvm()
    h = Host()
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def hosts() -> Iterator[tuple[Host, Host]]:
    """Two Hosts in one process, standing for two daemons (an old and a new one)."""
    from kvmd.core.host import Host

    require_kvm()
    a, b = Host(), Host()
    try:
        yield a, b
    finally:
        a.close()
        b.close()
