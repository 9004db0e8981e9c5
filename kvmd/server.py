"""The kvmd daemon entry point (placeholder until the gRPC API lands)."""

from __future__ import annotations

import signal
import sys

from kvmd.kvm import Kvm


def main(argv: list[str] | None = None) -> int:
    with Kvm() as kvm:
        caps = {k: v for k, v in kvm.capabilities().items() if v}
        print(f"KVM API version {kvm.api_version}, vcpu mmap size {kvm.vcpu_mmap_size}")
        for name, value in sorted(caps.items()):
            print(f"  {name} = {value}")
        sys.stdout.flush()
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0
