"""The host running out (memory for a memfd, file descriptors): RESOURCE_EXHAUSTED with the
errno, no traceback, and nothing half-made left behind (issue 13 #6, #9)."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from api_support import RunningDaemon, error_info

from kvmd.api.gen import vmm_pb2 as pb

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def failing(err: int) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(err, os.strerror(err))
    return fail


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize("err", [errno.ENOMEM, errno.ENOSPC, errno.EMFILE, errno.ENFILE])
def test_memfd_failure_is_resource_exhausted(api: RunningDaemon, caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    api.create_vm("oom")
    in_use = api.daemon.host.budget.in_use  # type: ignore[union-attr]
    with monkeypatch.context() as m:
        m.setattr(os, "memfd_create", failing(err))
        e = api.assert_code(lambda: api.add_memory("oom", 0, 1 << 20), EXHAUSTED)
    info = error_info(e)
    assert info is not None and info.metadata["errno"] == str(err)
    assert not tracebacks(caplog), [r.getMessage() for r in tracebacks(caplog)]
    assert list(api.memory.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm_id="oom")).regions) \
        == []
    assert api.daemon.host.budget.in_use == in_use  # type: ignore[union-attr]
    assert api.add_memory("oom", 0, 1 << 20).slot == 0  # and it works again
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="oom"))
