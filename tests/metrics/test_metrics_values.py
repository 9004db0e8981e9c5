"""Metrics whose values only a guest that did something can make non-zero: console bytes in
each direction, and the time vCPUs waited for remote exit handlers. Zero is what a broken
counter shows, so each is checked against exactly what the guest and the test did."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from guests import IN_AL_DX, UART_PORT, mov_dx, out_bytes_program, real_mode_program
from metrics_support import RPC_TIMEOUT, MetricsDaemon, Scrape, wait_for

from kvmd_client import KvmdClient, KvmdError
from kvmd_proto import vmm_pb2 as pb

PRINTED = b"console bytes, counted\n"   # what the guest writes to COM1 (23 bytes)
TYPED = b"abc"                          # what the test writes with WriteConsole
CLAIM_PORT = 0x300
REMOTE_READS = 3
REPLY_DELAY = 0.02  # seconds the handler takes over each reply


def _halted(mkvmd: MetricsDaemon, vm_id: str) -> bool:
    vcpu = mkvmd.vcpus.GetVcpuState(pb.VcpuRef(vm_id=vm_id, vcpu_id=0), timeout=RPC_TIMEOUT)
    return vcpu.state == "halted"


def test_console_bytes_count_each_direction(mkvmd: MetricsDaemon) -> None:
    mkvmd.create_guest("chatty", out_bytes_program(PRINTED, UART_PORT))  # ...then hlt
    mkvmd.vms.StartVm(pb.VmRef(vm_id="chatty"), timeout=RPC_TIMEOUT)
    wait_for(lambda: _halted(mkvmd, "chatty"), "the guest to print and halt")
    s = mkvmd.scrape()
    assert s.value("kvmd_console_bytes_total", vm="chatty", direction="out") == len(PRINTED)
    assert s.value("kvmd_console_bytes_total", vm="chatty", direction="in") == 0
    accepted = mkvmd.vms.WriteConsole(pb.WriteConsoleRequest(vm_id="chatty", data=TYPED),
                                      timeout=RPC_TIMEOUT).accepted
    assert accepted == len(TYPED)
    s = mkvmd.scrape()
    assert s.value("kvmd_console_bytes_total", vm="chatty", direction="in") == len(TYPED)
    assert s.value("kvmd_console_bytes_total", vm="chatty", direction="out") == len(PRINTED)
    mkvmd.delete("chatty")


def _remote(s: Scrape) -> tuple[float, float, list[tuple[float, float]]]:
    """(count, sum, [(le, cumulative count)]) of kvmd_remote_exit_seconds."""
    buckets = [(float(b.labels["le"]), float(b.value))
               for b in s.find("kvmd_remote_exit_seconds_bucket")]
    return (float(s.value("kvmd_remote_exit_seconds_count")),
            float(s.value("kvmd_remote_exit_seconds_sum")), buckets)


def test_remote_exit_seconds_observes_every_remote_exit(mkvmd: MetricsDaemon) -> None:
    count, total, _ = _remote(mkvmd.scrape())
    assert (count, total) == (0, 0)
    # REMOTE_READS port reads from a claimed port, then hlt.
    mkvmd.create_guest("remote", real_mode_program(mov_dx(CLAIM_PORT),
                                                   *[IN_AL_DX] * REMOTE_READS, b"\xf4"))
    with KvmdClient(mkvmd.address, timeout=RPC_TIMEOUT) as client, \
            client.handle_exits("remote", [("pio", CLAIM_PORT, 1)]) as session:

        def answer(exit_request: pb.ExitRequest) -> bytes:
            time.sleep(REPLY_DELAY)
            return b"\x01"

        server = threading.Thread(target=session.serve, args=(answer, REMOTE_READS),
                                  daemon=True)
        server.start()
        mkvmd.vms.StartVm(pb.VmRef(vm_id="remote"), timeout=RPC_TIMEOUT)
        wait_for(lambda: _halted(mkvmd, "remote"), "the guest's remote reads")
        server.join(RPC_TIMEOUT)
    count, total, buckets = _remote(mkvmd.scrape())
    assert count == REMOTE_READS
    # Each wait lasted at least the handler's delay.
    assert REMOTE_READS * REPLY_DELAY <= total < 30
    assert buckets[-1] == (float("inf"), REMOTE_READS)
    assert [n for _, n in buckets] == sorted(n for _, n in buckets)  # cumulative
    assert all(n == 0 for le, n in buckets if le < REPLY_DELAY)  # none waited less
    mkvmd.delete("remote")


def test_snapshots_and_restores_are_counted_timed_and_measured(
        metrics_daemon: Any, tmp_path: Any) -> None:
    """kvmd_snapshots_total{kind,result}, kvmd_snapshot_bytes_total, kvmd_snapshot_seconds
    and the same for restores follow what was done, refused ones included."""
    d = metrics_daemon(state_dir=str(tmp_path / "state"))
    before = d.scrape()  # every kind and result from the start (rate() and alerts need it)
    for name in ("kvmd_snapshots_total", "kvmd_restores_total"):
        for kind in ("full", "diff"):
            for result in ("ok", "error"):
                assert before.value(name, kind=kind, result=result) == 0, (name, kind, result)
    d.start_pio_guest("snap")
    with KvmdClient(d.address, timeout=RPC_TIMEOUT) as c:
        data, _ = c.snapshot_vm("snap")
        c.restore_vm("copy", data)
        with pytest.raises(KvmdError):
            c.restore_vm("copy2", data[:-10])  # truncated: refused
        c.delete_vm("copy")
    d.delete("snap")
    s = d.scrape()
    assert s.value("kvmd_snapshots_total", kind="full", result="ok") == 1
    assert s.value("kvmd_snapshot_bytes_total") == len(data)
    assert s.value("kvmd_snapshot_seconds_count") == 1
    assert s.value("kvmd_restores_total", kind="full", result="ok") == 1
    assert s.value("kvmd_restores_total", kind="full", result="error") == 1
    assert s.value("kvmd_restore_bytes_total") >= len(data)
    assert s.value("kvmd_restore_seconds_count") >= 1
