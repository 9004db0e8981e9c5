"""kvmctl vm snapshot / vm restore / snapshot list|delete, and the client's snapshot_vm /
restore_vm, against the session daemon (a process)."""

from __future__ import annotations

from pathlib import Path

from kvmctl_support import Kvmctl, ok

from kvmd_client import AlreadyExistsError, KvmdClient

PATTERN = bytes(range(256)) * 64  # 16 KiB


def running_vm(client: KvmdClient, vm_id: str) -> None:
    client.create_vm(vm_id, {"app": "snap"})
    client.add_memory_region(vm_id, 0, 1 << 20, log_dirty=True)
    client.write_memory(vm_id, 0x1000, b"\xeb\xfe")  # jmp $
    client.write_memory(vm_id, 0x40000, PATTERN)
    client.create_vcpu(vm_id, 0)
    client.set_sregs(vm_id, 0, cs={"base": 0, "selector": 0})
    client.set_regs(vm_id, 0, rip=0x1000, rflags=2)
    client.start_vm(vm_id)


def test_kvmctl_snapshot_and_restore_through_local_files(
        kvmctl: Kvmctl, client: KvmdClient, vm_ids: object, tmp_path: Path) -> None:
    src, full_id, diff_id = vm_ids(), vm_ids(), vm_ids()  # type: ignore[operator]
    running_vm(client, src)
    full = tmp_path / "full.snap"
    out = ok(kvmctl("vm", "snapshot", src, str(full))).out
    assert "full snapshot" in out and full.stat().st_size > len(PATTERN)
    assert client.get_vm(src).state == "running"
    client.write_memory(src, 0x40000, b"\x00" * 4096 + b"\x77" * 4096)
    diff = tmp_path / "diff.snap"
    info = ok(kvmctl("--json", "vm", "snapshot", src, str(diff), "--diff",
                     "--leave-paused")).json()
    assert info["diff"] is True and int(info["memory_pages"]) == 2
    assert client.get_vm(src).state == "paused"

    vm = ok(kvmctl("--json", "vm", "restore", full_id, str(full), "--start")).json()
    assert vm["state"] == "running" and vm["labels"] == {"app": "snap"}
    assert client.read_memory(full_id, 0x40000, len(PATTERN)) == PATTERN
    ok(kvmctl("vm", "restore", diff_id, str(diff), "--base", str(full)))
    assert client.read_memory(diff_id, 0x40000, len(PATTERN)) == client.read_memory(
        src, 0x40000, len(PATTERN))
    # A restore onto an existing id is refused, exit code 1 with the status.
    failed = kvmctl("vm", "restore", full_id, str(full))
    assert failed.code == 1 and "ALREADY_EXISTS" in failed.err


def test_kvmctl_state_directory_files(kvmctl: Kvmctl, client: KvmdClient,
                                      vm_ids: object) -> None:
    src, copy = vm_ids(), vm_ids()  # type: ignore[operator]
    running_vm(client, src)
    name = f"{src}-snap"
    ok(kvmctl("vm", "snapshot", src, "--to-state-dir", name))
    listed = ok(kvmctl("--json", "snapshot", "list")).json()
    mine = [s for s in listed if s["file"] == name]
    assert mine and mine[0]["vm_id"] == src
    assert name in ok(kvmctl("snapshot", "list")).out
    ok(kvmctl("vm", "restore", copy, "--from-state-dir", name))
    assert client.read_memory(copy, 0x40000, len(PATTERN)) == PATTERN
    ok(kvmctl("snapshot", "delete", name))
    assert name not in ok(kvmctl("snapshot", "list")).out


def test_client_snapshot_restore_in_memory(client: KvmdClient, vm_ids: object) -> None:
    src, copy = vm_ids(), vm_ids()  # type: ignore[operator]
    running_vm(client, src)
    data, info = client.snapshot_vm(src, leave_paused=True)
    assert len(data) == info.size_bytes and not info.diff
    vm = client.restore_vm(copy, data)
    assert vm.state == "paused" and vm.vcpu_states[0] == "paused"
    assert client.get_regs(copy, 0) == client.get_regs(src, 0)
    try:
        client.restore_vm(copy, data)
        raise AssertionError("a restore onto an existing id was accepted")
    except AlreadyExistsError:
        pass
