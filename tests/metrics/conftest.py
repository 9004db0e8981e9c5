"""Fixtures for the metrics tests.

* `metrics_daemon(**config)`: start an in-process kvmd (any `Config` field) with /metrics on a
  free loopback port; every daemon is stopped, and checked to hold no VM, at teardown.
* `mkvmd`: one such daemon with the default settings.
* `promtool`: the promtool binary (the test is skipped only when it is not installed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from metrics_support import MetricsDaemon, tool

if not os.path.exists("/dev/kvm"):
    pytest.skip("/dev/kvm is absent: the metrics tests need real KVM", allow_module_level=True)

DaemonFactory = Callable[..., MetricsDaemon]


@pytest.fixture
def metrics_daemon(tmp_path: Path) -> Iterator[DaemonFactory]:
    started: list[MetricsDaemon] = []

    def start(**config: Any) -> MetricsDaemon:
        directory = tmp_path / f"kvmd-{len(started)}"
        directory.mkdir()
        d = MetricsDaemon(directory, **config)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()
        assert d.daemon.host is not None and d.daemon.host.vm_count() == 0


@pytest.fixture
def mkvmd(metrics_daemon: DaemonFactory) -> MetricsDaemon:
    return metrics_daemon()


@pytest.fixture
def promtool() -> str:
    path = tool("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus'; .ci/run installs "
                    "it)")
    return path
