"""The source's switch-over (kvmd.migration.precopy) against a target that fails or is
cancelled after the last pages went and before the commit: the VM must run on at the
source, unpaused, and the target must never be told to commit. Driven on a real VM, with a
stand-in transport (the daemon-to-daemon failures, a killed target or a cut link, are in
test_migration_failures). And the target's side of it: a restore, once prepared (ready),
takes no more bytes before its commit."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from guests import SPIN, boot

from kvmd.core.errors import InvalidState, Reason, Unavailable
from kvmd.core.host import Host
from kvmd.core.vm import ManagedVm, VmOptions
from kvmd.migration.precopy import MigrationOptions, OutgoingMigration, Result
from kvmd.state.snapshot import Restorer, SnapshotTaker


class SwitchOverTarget:
    """Takes every byte; `at_finish` runs when the source says the last snapshot went."""

    def __init__(self, at_finish: Callable[[], None]) -> None:
        self.at_finish = at_finish
        self.sent = 0
        self.finished = self.committed = self.closed = False

    def start(self, source_vm_id: str) -> str:
        return source_vm_id

    def send(self, frames: list[bytes]) -> None:
        self.sent += sum(len(f) for f in frames)

    def finish(self) -> None:
        self.finished = True
        self.at_finish()

    def commit(self) -> None:
        self.committed = True

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def spinning(host: Host) -> ManagedVm:
    vm = host.create_vm("mover", {}, VmOptions())
    boot(vm, SPIN)  # its slot without dirty logging: the migration logs it for its time
    vm.start()
    return vm


def _migrate(host: Host, vm: ManagedVm, target: SwitchOverTarget) -> OutgoingMigration:
    migration = OutgoingMigration(host, vm, "stand-in:1", MigrationOptions(), lambda: target)
    migration.start()
    migration.join(60)
    assert migration.done.is_set()
    return migration


def _runs_on_here(host: Host, vm: ManagedVm) -> None:
    assert host.get_vm("mover") is vm
    assert vm.state == "running" and vm.migrating_to == ""
    assert {v.state for v in vm.vcpus()} == {"running"}
    vm.pause()  # it answers run control again
    vm.resume()


def test_a_target_failing_at_the_switch_over_leaves_the_vm_running_here(
        host: Host, spinning: ManagedVm) -> None:
    def refuse() -> None:
        raise Unavailable("the target could not build the VM", reason=Reason.PEER_UNAVAILABLE)
    target = SwitchOverTarget(refuse)
    migration = _migrate(host, spinning, target)
    assert migration.result == Result.FAILED
    assert migration.error is not None and "could not build" in migration.error.message
    assert target.finished and not target.committed and target.closed
    _runs_on_here(host, spinning)


def test_a_cancel_before_the_commit_is_honoured_at_the_switch_over(
        host: Host, spinning: ManagedVm) -> None:
    holder: list[OutgoingMigration] = []
    cancelled: list[bool] = []
    target = SwitchOverTarget(lambda: cancelled.append(holder[0].cancel("cancelled by test")))
    migration = OutgoingMigration(host, spinning, "stand-in:1", MigrationOptions(),
                                  lambda: target)
    holder.append(migration)
    migration.start()
    migration.join(60)
    assert cancelled == [True]  # not too late: the commit had not been sent
    assert migration.result == Result.CANCELLED
    assert migration.error is not None
    assert migration.error.reason == Reason.MIGRATION_CANCELLED
    assert target.finished and not target.committed
    _runs_on_here(host, spinning)


def test_a_prepared_restore_takes_no_more_bytes(host: Host, spinning: ManagedVm) -> None:
    """Once prepared (the stream complete, file digests checked), a restore refuses more
    data: nothing may change the VM between the checks and its commit."""
    data = b"".join(SnapshotTaker(spinning))
    restorer = Restorer(host, "copy", "local")
    restorer.feed(data)
    restorer.prepare()
    with pytest.raises(InvalidState) as err:
        restorer.feed(data[:10])
    assert err.value.reason == Reason.RESTORE_NOT_READY
    # The refused bytes changed nothing: the prepared VM commits as it was.
    assert restorer.commit().id == "copy"
    assert sorted(v.id for v in host.list_vms()) == ["copy", "mover"]
