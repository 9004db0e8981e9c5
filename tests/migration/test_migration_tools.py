"""Migration through the tools an operator uses: kvmctl (prepare, migrate with progress,
list, cancel), the Python client, and the metrics it leaves behind on both daemons."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from migration_support import Host, wait_for

from kvmd_client import KvmdClient, NotFoundError, UnavailableError
from kvmd_client.kvmctl import main


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def kvmctl(capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    """kvmctl in-process (the console script itself is tested in tests/e2e)."""
    def run(host: Host, *args: str) -> Run:
        capsys.readouterr()
        code = main(["--address", host.address, *args])
        out = capsys.readouterr()
        return Run(code, out.out, out.err)
    return run


def test_kvmctl_migrates_a_vm_and_shows_progress_and_downtime(
        hosts: tuple[Host, Host], kvmctl: Callable[..., Run]) -> None:
    a, b = hosts
    a.boot_working_set("cli")
    a.node.start("cli")
    wait_for(lambda: a.passes("cli") > 5, 30, "passes")
    done = kvmctl(a, "vm", "migrate", "cli", "--to", b.target, "--target-address",
                  b.address, "--max-downtime-ms", "200", "--bandwidth", "512M")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert any(line.startswith("copying") for line in lines), done.stdout
    assert lines[-1].startswith(f"vm cli migrated to {b.target} as cli: ")
    assert "downtime" in lines[-1] and "ms" in lines[-1]
    assert b.vm("cli").state == "running" and a.vm_ids() == []


def test_kvmctl_prepare_then_migrate_with_the_token_as_json(
        hosts: tuple[Host, Host], kvmctl: Callable[..., Run]) -> None:
    a, b = hosts
    a.boot_working_set("tok")
    a.node.start("tok")
    prepared = kvmctl(b, "migration", "prepare", "tok2", "--ttl", "60", "--json")
    assert prepared.returncode == 0, prepared.stderr
    token = json.loads(prepared.stdout)["token"]
    listed = kvmctl(b, "migration", "list")
    assert "tok2" in listed.stdout and "incoming" in listed.stdout
    done = kvmctl(a, "vm", "migrate", "tok", "--to", b.target, "--token", token, "--json")
    assert done.returncode == 0, done.stderr
    updates = [json.loads(line) for line in done.stdout.splitlines()]
    assert updates[-1]["phase"] == "COMPLETED" and updates[-1]["target_vm_id"] == "tok2"
    assert b.vm("tok2").state == "running"
    # Failures: exit code and the daemon's reason on stderr.
    gone = kvmctl(a, "vm", "migrate", "tok", "--to", b.target, "--token", token)
    assert gone.returncode != 0 and "NOT_FOUND" in gone.stderr
    none = kvmctl(a, "migration", "cancel", "nosuch")
    assert none.returncode != 0 and "no migration in progress" in none.stderr


def test_the_client_library_migrates_cancels_and_reports(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    a.boot_working_set("lib")
    a.node.start("lib")
    with KvmdClient(a.address, timeout=30) as src, KvmdClient(b.address, timeout=30) as dst:
        with pytest.raises(UnavailableError):
            src.migrate_vm("lib", "127.0.0.1:1", dst.prepare_incoming_migration("x").token)
        dst.cancel_migration("x")
        with pytest.raises(NotFoundError):
            src.cancel_migration("lib")
        seen = []
        final = src.migrate_vm("lib", b.target, dst.prepare_incoming_migration("lib").token,
                               max_downtime_ms=500, on_progress=seen.append)
        assert final.downtime_ms > 0 and seen[-1] == final
        assert [v.vm_id for v in dst.list_vms()] == ["lib"]
        assert src.list_vms() == []  # gone from the source before the call returned
    # Its memory and descriptors are released just after the answer.
    wait_for(lambda: a.metrics()[("kvmd_guest_memory_in_use_bytes", ())] == 0
             and a.metrics()[("kvmd_vm_fds", ())] == 0, 10, "the source freeing the VM")
    metrics_a, metrics_b = a.metrics(), b.metrics()
    ok_out = metrics_a[("kvmd_migrations_total",
                        (("direction", "outgoing"), ("result", "ok")))]
    failed_out = metrics_a[("kvmd_migrations_total",
                            (("direction", "outgoing"), ("result", "failed")))]
    assert ok_out >= 1 and failed_out >= 1
    assert metrics_b[("kvmd_migrations_total",
                      (("direction", "incoming"), ("result", "ok")))] >= 1
    assert metrics_a[("kvmd_migration_downtime_seconds_count", ())] >= 1
    assert metrics_a[("kvmd_migration_bytes_total", (("direction", "outgoing"),))] > 4 << 20
    assert metrics_b[("kvmd_migration_bytes_total", (("direction", "incoming"),))] > 4 << 20
    assert ("kvmd_migration_rounds_total", ()) in metrics_a
    assert metrics_a[("kvmd_migrations_in_progress", ())] == 0
