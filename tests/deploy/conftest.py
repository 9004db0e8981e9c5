"""Deployment tests: TLS/mTLS, per-client authorization, certificate reload, the Unix
socket's mode and group, configuration refusals, sd_notify/watchdog, the systemd unit and
the install script. Daemons here are real (in-process `Daemon` or the `kvmd` console script)
on real /dev/kvm; certificates are made at test time with trustme.

Fixtures:

* `pki`: a session-wide test PKI (`deploy_support.Pki`).
* `short_dir`: a short temporary directory (Unix socket paths are limited to 107 bytes).
* `tls_daemon(**kw)`: starts an in-process `TlsDaemon` (Unix socket + TLS on 127.0.0.1:0);
  every daemon is stopped after the test.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from deploy_support import Pki, TlsDaemon


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: creates a virtualenv and pip-installs the "
                            "project (deploy/install.sh); deselect with -m 'not slow'")


def require_kvm() -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is absent: the deployment tests run the daemon on real KVM")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kvmd-deploy-") as name:
        yield Path(name)


@pytest.fixture
def tls_daemon(pki: Pki, short_dir: Path) -> Iterator[Callable[..., TlsDaemon]]:
    require_kvm()
    started: list[TlsDaemon] = []

    def start(**kw: Any) -> TlsDaemon:
        directory = short_dir / f"d{len(started)}"
        directory.mkdir()
        daemon = TlsDaemon(pki, directory, **kw)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()
