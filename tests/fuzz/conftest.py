"""Fixtures of the fuzz tests; the helpers live in fuzz_support (a uniquely named module)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from fuzz_support import FuzzDaemon, fd_count
from polling import wait_until

if not os.path.exists("/dev/kvm"):
    pytest.skip("/dev/kvm is absent: the fuzz tests need real KVM", allow_module_level=True)


# The Unix socket's identity as an operator: VM ids must start with "fz-" (else
# PERMISSION_DENIED), at most 4 VMs, and the budgets of a non-admin caller.
OPERATOR = {"identities": [{"name": "local", "role": "operator", "vm_prefix": "fz-",
                            "max_vms": 4}]}


@pytest.fixture(scope="module")
def fuzz_daemon() -> Iterator[FuzzDaemon]:
    """One in-process daemon with small limits per test module, shared by every example
    (each example starts from the same world). At the end, after every VM is deleted, the
    process holds no more file descriptors than before the world was built."""
    yield from _daemon()


@pytest.fixture(scope="module")
def operator_daemon() -> Iterator[FuzzDaemon]:
    """The same, with an authorization policy that makes the caller an operator."""
    yield from _daemon(authorization=OPERATOR)


def _daemon(**config: object) -> Iterator[FuzzDaemon]:
    fz = FuzzDaemon.start(**config)
    fz.delete_all()
    fz.fd_baseline = fd_count()
    try:
        yield fz
        fz.delete_all()
        wait_until(lambda: fd_count() <= fz.fd_baseline, 10,
                   f"file descriptors back to {fz.fd_baseline} (now {fd_count()})")
        print(f"\nfuzz: {fz.calls} checked calls, codes {dict(sorted(fz.codes.items()))}")
    finally:
        fz.stop()
