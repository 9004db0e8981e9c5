"""Load, CI-sized: the soak workload (benchmarks/soak.py) for LOAD_SECONDS against a kvmd
process. Only invariants are asserted, never speed: every call ends with an expected code,
the health check (polled from its own thread throughout) always answers, no VM is left,
the daemon's fds and threads come back to their baseline, and it exits 0 on SIGTERM.
`make soak` runs the same workload for ten minutes and reports the numbers."""

from __future__ import annotations

import pytest
from load_support import soak

LOAD_SECONDS = 40.0
CLIENTS = 8


@pytest.mark.timeout(LOAD_SECONDS + 120)
def test_many_clients_cycling_vms(capsys: pytest.CaptureFixture[str]) -> None:
    report = soak.run(LOAD_SECONDS, clients=CLIENTS, warmup=4.0, sample_interval=1.0,
                      log=lambda line: None)
    with capsys.disabled():
        print("\n" + report.table())
    assert not report.violations(), report.table()
    # Every step of the cycle ran, on every kind of guest.
    for name in ("CreateVm", "AddMemoryRegion", "WriteGuestMemory", "StartVm", "PauseVm",
                 "ResumeVm", "StopVm", "DeleteVm", "PauseVm(shared)"):
        assert report.rpcs[name].calls > 0, name
    assert report.rpcs["DeleteVm"].calls >= 3 * CLIENTS
