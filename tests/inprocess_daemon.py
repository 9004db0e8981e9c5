"""Helpers for tests that drive in-process daemons (the `start_daemon` fixture of
tests/conftest.py) through raw stubs or the client library."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from kvmd_stubs import Stubs

from kvmd.server import Daemon
from kvmd_client import KvmdClient, KvmdError


def address(daemon: Daemon) -> str:
    """The daemon's first listen address."""
    return daemon.cfg.listen[0]


def raw_stubs(daemon: Daemon) -> Stubs:
    """Raw stubs on a channel of their own (the caller closes them)."""
    return Stubs.of(grpc.insecure_channel(address(daemon)))


def client_of(daemon: Daemon) -> KvmdClient:
    """A client that does not retry (the caller closes it)."""
    return KvmdClient(address(daemon), timeout=20, retry_timeout=0)


def assert_refused(fn: Callable[[], Any], code: grpc.StatusCode, reason: str) -> KvmdError:
    """fn() fails with exactly `code` and the daemon's ErrorInfo `reason`."""
    with pytest.raises(KvmdError) as caught:
        fn()
    err = caught.value
    assert (err.code, err.reason) == (code, reason), str(err)
    return err
