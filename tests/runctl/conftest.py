"""Fixtures for the run-control tests: an in-process kvmd per test on a temporary Unix
socket, stopped (and checked to have ended every vCPU thread) afterwards."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from polling import wait_until
from runctl_api import Api, vcpu_threads

if not os.path.exists("/dev/kvm"):
    pytest.skip("/dev/kvm is absent: the run-control tests need real KVM",
                allow_module_level=True)


@pytest.fixture
def api_factory() -> Iterator[Callable[..., Api]]:
    """Start daemons with any Config fields; each is stopped after the test, and must
    then hold no VM and have ended every vCPU thread."""
    started: list[Api] = []
    # A short directory: Unix socket paths are limited to 107 bytes.
    tmp = tempfile.TemporaryDirectory(prefix="kvmd-runctl-")

    def start(**config: Any) -> Api:
        api = Api(os.path.join(tmp.name, f"kvmd-{len(started)}.sock"), **config)
        started.append(api)
        return api

    yield start
    for api in started:
        api.close()
        host = api.daemon.host
        assert host is not None and host.vm_count() == 0, "the daemon kept VMs after stop()"
        assert not os.path.lexists(api.socket_path), "the socket outlived the daemon"
    wait_until(lambda: not vcpu_threads(), 10, "every vCPU thread to end")
    tmp.cleanup()


@pytest.fixture
def api(api_factory: Callable[..., Api]) -> Iterator[Api]:
    """A daemon with the default limits; checked healthy when the test ends."""
    running = api_factory()
    yield running
    running.assert_healthy()
