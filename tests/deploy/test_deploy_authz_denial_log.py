"""The denial log's rate limit (kvmd.api.auth.DenialLog) on a fake clock: the boundaries of
`per_key` (no summary when nothing was suppressed), of `interval` (a window ends exactly
`interval` seconds after it started), of `max_keys` (the pair beyond it shares ("*", "*")),
and `flush`, which sums up every window, ended or not, when the daemon stops."""

from __future__ import annotations

import logging

import pytest

from kvmd.api.auth import DenialLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str, int | None]]:
    """(message, identity, method, suppressed) of each auth log line, in order."""
    return [(r.getMessage(), r.identity, r.method,  # type: ignore[attr-defined]
             getattr(r, "suppressed", None))
            for r in caplog.records if r.name == "kvmd.auth"]


DENIED, SUMMARY = "rpc denied", "rpc denials not logged"


@pytest.fixture
def caplog_auth(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="kvmd.auth")
    return caplog


def test_exactly_per_key_denials_log_no_summary(caplog_auth: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = DenialLog(per_key=2, interval=10, clock=clock)
    for _ in range(2):
        log.denied("v", "/m", {})
    clock.now += 10
    log.denied("v", "/m", {})  # a new window; the old one suppressed nothing
    log.flush()
    assert lines(caplog_auth) == [(DENIED, "v", "/m", None)] * 3


def test_a_window_ends_exactly_interval_seconds_after_it_started(
        caplog_auth: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = DenialLog(per_key=1, interval=10, clock=clock)
    log.denied("v", "/m", {})
    log.denied("v", "/m", {})  # suppressed
    clock.now += 9.5
    log.denied("w", "/m", {})  # the window of ("v", "/m") is still open
    assert [line[0] for line in lines(caplog_auth)] == [DENIED, DENIED]
    clock.now += 0.5
    log.denied("w", "/n", {})  # exactly 10 s: over, summed up
    assert lines(caplog_auth)[2:] == [(SUMMARY, "v", "/m", 1), (DENIED, "w", "/n", None)]


def test_pairs_beyond_max_keys_share_one_window(caplog_auth: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = DenialLog(per_key=1, interval=10, max_keys=2, clock=clock)
    log.denied("a", "/m", {})
    log.denied("b", "/m", {})
    for who in ("c", "d", "c"):  # the third and later pairs: one ("*", "*") window
        log.denied(who, "/m", {})
    assert [line[1] for line in lines(caplog_auth)] == ["a", "b", "c"]
    log.flush()
    assert lines(caplog_auth)[3:] == [(SUMMARY, "*", "*", 2)]


def test_flush_sums_up_windows_not_yet_over(caplog_auth: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = DenialLog(per_key=1, interval=60, clock=clock)
    for _ in range(4):
        log.denied("v", "/m", {})
    clock.now += 1
    log.flush()  # the daemon stops 1 s into the window
    assert lines(caplog_auth) == [(DENIED, "v", "/m", None), (SUMMARY, "v", "/m", 3)]
    log.flush()  # nothing twice
    assert len(lines(caplog_auth)) == 2
