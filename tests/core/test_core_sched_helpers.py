"""kvmd.core.sched's helpers as units: CPU lists as Linux and operators write them, and
the once-only warnings of scheduling failures (a host refusing them would otherwise log
one per vCPU thread, per pause)."""

from __future__ import annotations

import logging

import pytest

from kvmd.core import sched


def test_a_range_of_one_cpu_is_that_cpu() -> None:
    assert sched.parse_cpu_list("2-2") == {2}
    assert sched.parse_cpu_list("0-0,3-4") == {0, 3, 4}
    assert sched.format_cpu_list(sched.parse_cpu_list("2-2")) == "2"
    with pytest.raises(ValueError, match="descending"):
        sched.parse_cpu_list("3-2")


def test_a_priority_failure_is_logged_once(monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sched, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=sched.log.name):
        sched.report_priority_failure("idle", 10, "Operation not permitted")
        sched.report_priority_failure("idle", 10, "Operation not permitted")
    warnings = [r for r in caplog.records if "priority" in r.getMessage()]
    assert len(warnings) == 1


def test_a_refused_affinity_is_reported_and_logged_once(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    monkeypatch.setattr(sched, "_warned", set())
    bad = frozenset({4095})  # no such CPU: the kernel refuses the mask
    with caplog.at_level(logging.WARNING, logger=sched.log.name):
        assert sched.confine_thread(0, bad) is False
        assert sched.confine_thread(0, bad) is False
    assert len([r for r in caplog.records if "affinity" in r.getMessage()]) == 1
