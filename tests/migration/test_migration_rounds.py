"""The source's pre-copy loop (kvmd.migration.precopy) round by round, on a real VM that
does not run, against a stand-in link: the test decides which pages are dirty in each round
(host writes count as dirty for the migration), so the rounds, the downtime estimate, the
round limit, auto-converge's throttle and the progress fields are exact.

The link is paced by the migration's own bandwidth option (4 MiB/s), so the round estimate
rests on a known throughput: LOTS pages (64 KiB, 16 ms to send) never fit MAX_DOWNTIME_MS,
while a round that leaves nothing dirty is the switch-over overhead alone (4 ms) and does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from guests import SPIN, boot

from kvmd.core.errors import InvalidState, OutcomeUnknown, Reason
from kvmd.core.host import Host
from kvmd.core.vm import ManagedVm, VmOptions
from kvmd.kvm import PAGE_SIZE
from kvmd.migration import precopy
from kvmd.migration.precopy import (
    MigrationOptions,
    OutgoingMigration,
    Progress,
    Result,
)
from kvmd.state.snapshot import Restorer, RunMode

DIRTY_BASE = 0x20000  # the pages the test dirties: beyond the program (GUEST_MEM_SIZE)
REGION = 1 << 20
DATA_PAGES = 8  # pages with data at the start (besides the program's)
LOTS = 16  # dirty pages that never fit MAX_DOWNTIME_MS at RATE
CALM = 4  # dirty pages that do not fit it either, but are few beside a round of LOTS
RATE = 4 << 20
MAX_DOWNTIME_MS = 5
MIN_RATE = 64 * 1024  # the slowest bandwidth an option may ask for


class Link:
    """Takes every byte at once; `plan[i]` pages (from DIRTY_BASE) are written during the
    i-th snapshot sent (0: the full copy), none once the plan runs out. `on_commit` runs
    when the source commits."""

    def __init__(self, vm: ManagedVm, plan: list[int],
                 on_commit: Callable[[], None] | None = None) -> None:
        self.vm = vm
        self.plan = list(plan)
        self.on_commit = on_commit
        self.snapshots = 0
        self.bytes = 0
        self.closed = self.committed = False
        self.migration: OutgoingMigration | None = None
        self._last_phase = ""
        self._generation = 0

    def dirty(self, pages: int) -> None:
        self._generation += 1
        for i in range(pages):
            self.vm.write_memory(DIRTY_BASE + i * PAGE_SIZE,
                                 bytes([self._generation & 0xFF or 1]) * 16)

    def start(self, source_vm_id: str) -> str:
        return source_vm_id

    def send(self, frames: list[bytes]) -> None:
        self.bytes += sum(len(f) for f in frames)
        # Each snapshot of these rounds is one batch (< SEND_BATCH_BYTES).
        index = self.snapshots
        self.snapshots += 1
        if index < len(self.plan):
            self.dirty(self.plan[index])

    def finish(self) -> None:
        pass

    def commit(self) -> None:
        self.committed = True
        if self.on_commit is not None:
            self.on_commit()

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def idle_vm(host: Host) -> ManagedVm:
    """Created, not started: only the test dirties its memory."""
    vm = host.create_vm("mover", {}, VmOptions())
    boot(vm, SPIN)
    vm.add_memory_region(0x10000, REGION, False, True)
    for i in range(DATA_PAGES):
        vm.write_memory(DIRTY_BASE + i * PAGE_SIZE, b"\x5a" * 64)
    return vm


def migrate(host: Host, vm: ManagedVm, link: Link,
            **options: object) -> tuple[OutgoingMigration, list[Progress]]:
    options.setdefault("bandwidth_bytes_per_second", RATE)
    options.setdefault("max_downtime_ms", MAX_DOWNTIME_MS)
    migration = OutgoingMigration(host, vm, "stand-in:1", MigrationOptions(**options),
                                  lambda: link)  # type: ignore[arg-type]
    link.migration = migration
    watched = migration.watch()
    migration.start()
    migration.join(120)
    assert migration.done.is_set()
    seen: list[Progress] = []
    while (p := watched.get(5)) is not None:
        seen.append(p)
    return migration, seen


def completed(host: Host) -> int:
    """Downtimes recorded (kvmd_migration_downtime_seconds' count)."""
    return host.shared.migration.downtime.snapshot()[2]


def by_round(seen: list[Progress]) -> dict[int, Progress]:
    """The last progress reported for each round, while copying."""
    return {p.round: p for p in seen if p.phase == precopy.COPYING}


def test_a_round_reports_what_it_leaves_and_the_switch_over_overhead(
        host: Host, idle_vm: ManagedVm) -> None:
    """Nothing dirtied during the full copy: round 0 leaves no page, its estimate is the
    switch-over overhead alone (in ms), and it switches over at once."""
    migration, seen = migrate(host, idle_vm, Link(idle_vm, []))
    assert migration.result == Result.OK, migration.error
    rounds = by_round(seen)
    assert sorted(rounds) == [0]
    assert rounds[0].pages_remaining == 0
    assert rounds[0].expected_downtime_ms == pytest.approx(
        precopy.SWITCH_OVER_OVERHEAD_S * 1000)


def test_rounds_report_their_dirty_pages_and_the_link_measured_by_the_full_copy(
        host: Host, idle_vm: ManagedVm) -> None:
    """Each round reports the pages dirtied during the one before; rounds too small to
    say anything about the link keep the full copy's throughput."""
    link = Link(idle_vm, [LOTS, LOTS, CALM + 1])
    downtimes, rounds_total = completed(host), host.shared.migration.rounds_total
    migration, seen = migrate(host, idle_vm, link)
    assert migration.result == Result.OK, migration.error
    assert completed(host) == downtimes + 1
    assert host.shared.migration.rounds_total == rounds_total + 3
    rounds = by_round(seen)
    assert sorted(rounds) == [0, 1, 2, 3]
    assert [rounds[r].pages_remaining for r in range(4)] == [LOTS, LOTS, CALM + 1, 0]
    assert len({rounds[r].throughput_bytes_per_second for r in range(4)}) == 1
    assert rounds[3].dirty_pages_per_second == 0
    assert rounds[1].expected_downtime_ms > MAX_DOWNTIME_MS
    # What the link carried, and the pages the snapshots held: the full copy's (program
    # and data), each round's, none left at the end.
    last = seen[-1]
    assert last.phase == precopy.COMPLETED and last.pages_remaining == 0
    assert last.bytes_sent == link.bytes
    assert last.pages_sent == 1 + DATA_PAGES + LOTS + LOTS + CALM + 1
    assert last.elapsed_seconds > 0


def test_the_completed_progress_has_no_pages_remaining(host: Host,
                                                       idle_vm: ManagedVm) -> None:
    """Pages left by the last round go with the switch-over: none remain once completed."""
    migration, seen = migrate(host, idle_vm, Link(idle_vm, [CALM]), max_downtime_ms=300)
    assert migration.result == Result.OK, migration.error
    assert by_round(seen)[0].pages_remaining == CALM
    assert seen[-1].phase == precopy.COMPLETED and seen[-1].pages_remaining == 0


def test_pages_dirtied_before_the_full_copy_go_with_it_only(host: Host,
                                                            idle_vm: ManagedVm) -> None:
    """Pages written after the migration began but before the full copy read them are in
    that copy, as they are: they are not dirty again for round 1."""
    link = Link(idle_vm, [])
    start = link.start

    def start_and_dirty(source_vm_id: str) -> str:
        link.dirty(LOTS)
        return start(source_vm_id)
    link.start = start_and_dirty  # type: ignore[method-assign]
    migration, seen = migrate(host, idle_vm, link)
    assert migration.result == Result.OK, migration.error
    assert by_round(seen)[0].pages_remaining == 0


def test_the_last_allowed_round_may_still_converge(host: Host, idle_vm: ManagedVm) -> None:
    """max_rounds rounds after the full copy: the last may still converge."""
    migration, seen = migrate(host, idle_vm, Link(idle_vm, [LOTS]), max_rounds=1)
    assert migration.result == Result.OK, migration.error
    assert [p.pages_remaining for p in by_round(seen).values()] == [LOTS, 0]


def test_the_round_limit_fails_a_migration_that_does_not_converge(
        host: Host, idle_vm: ManagedVm) -> None:
    migration, seen = migrate(host, idle_vm, Link(idle_vm, [LOTS] * 10), max_rounds=3)
    assert migration.result == Result.FAILED
    assert isinstance(migration.error, InvalidState)
    assert "did not converge in 3 rounds" in migration.error.message
    rounds = by_round(seen)
    assert sorted(rounds) == [0, 1, 2, 3]
    # Each round's dirty rate is the one the VM shows (MeasureDirtyRate's field) after it.
    assert rounds[3].dirty_pages_per_second > 0
    assert rounds[3].dirty_pages_per_second == pytest.approx(idle_vm.dirty.rate)
    assert idle_vm.migrating_to == "" and host.get_vm("mover") is idle_vm


def test_auto_converge_throttles_from_the_second_out_dirtied_round_up_to_99(
        host: Host, idle_vm: ManagedVm) -> None:
    """As QEMU's cpu-throttle: nothing after one round that the guest out-dirtied, 20% after
    the second in a row, 10 more per round after that, at most 99%; off once it ended."""
    migration, seen = migrate(host, idle_vm, Link(idle_vm, [LOTS] * 20), max_rounds=10,
                              auto_converge=True)
    assert migration.result == Result.FAILED
    throttle = {r: p.throttle_percent for r, p in by_round(seen).items()}
    assert throttle == {0: 0, 1: 20, 2: 30, 3: 40, 4: 50, 5: 60, 6: 70, 7: 80, 8: 90,
                        9: 99, 10: 99}
    assert idle_vm.throttle_percent == 0


def test_a_calm_round_resets_auto_converge(host: Host, idle_vm: ManagedVm) -> None:
    """Two out-dirtied rounds with a calm one between them are not 'twice in a row'."""
    migration, seen = migrate(host, idle_vm, Link(idle_vm, [LOTS, CALM, LOTS, CALM, LOTS]),
                              auto_converge=True)
    assert migration.result == Result.OK, migration.error
    assert {p.throttle_percent for p in seen} == {0}
    assert [p.pages_remaining for p in by_round(seen).values()] == [
        LOTS, CALM, LOTS, CALM, LOTS, 0]


def test_a_cancel_is_refused_once_the_commit_was_sent(host: Host,
                                                      idle_vm: ManagedVm) -> None:
    answers: list[bool] = []
    link = Link(idle_vm, [], on_commit=lambda: answers.append(
        link.migration.cancel("cancelled by test")))  # type: ignore[union-attr]
    migration, _seen = migrate(host, idle_vm, link)
    assert answers == [False]
    assert migration.result == Result.OK, migration.error


@pytest.mark.parametrize("failure", [
    OutcomeUnknown("no answer to the commit", reason=Reason.MIGRATION_OUTCOME_UNKNOWN),
    InvalidState("the link broke at the commit", reason=Reason.MIGRATION_FAILED)],
    ids=["OutcomeUnknown", "another error"])
def test_a_commit_without_an_answer_is_an_unknown_outcome(
        host: Host, idle_vm: ManagedVm, failure: Exception) -> None:
    """Whatever the commit raises, the target may run the VM: the result is unknown, the
    VM stays here paused, with a reason saying to check the target first."""
    def fail() -> None:
        raise failure
    downtimes = completed(host)
    migration, _seen = migrate(host, idle_vm, Link(idle_vm, [], on_commit=fail))
    assert migration.result == Result.UNKNOWN
    assert isinstance(migration.error, OutcomeUnknown)
    assert migration.error.reason == Reason.MIGRATION_OUTCOME_UNKNOWN
    assert "check it before resuming here" in idle_vm.reason
    assert host.get_vm("mover") is idle_vm
    assert completed(host) == downtimes  # only completed migrations have a downtime


def test_a_watcher_first_gets_where_the_migration_stands(host: Host,
                                                         idle_vm: ManagedVm) -> None:
    """Watching before anything happened still answers at once: connecting, and the size
    of the guest's memory."""
    migration = OutgoingMigration(host, idle_vm, "stand-in:1", MigrationOptions(),
                                  lambda: Link(idle_vm, []))
    watched = migration.watch()
    first = watched.get(0)
    assert first is not None and first.phase == precopy.CONNECTING
    assert first.guest_memory_bytes == 0x10000 + REGION


class BlockingLink(Link):
    """Its first send blocks until the link is closed (a full link)."""

    def __init__(self, vm: ManagedVm) -> None:
        super().__init__(vm, [])
        self.sending = threading.Event()
        self.closing = threading.Event()

    def send(self, frames: list[bytes]) -> None:
        self.sending.set()
        self.closing.wait(30)
        super().send(frames)

    def close(self) -> None:
        self.closing.set()
        super().close()


def test_a_cancel_closes_the_link_to_wake_a_blocked_send(host: Host,
                                                         idle_vm: ManagedVm) -> None:
    link = BlockingLink(idle_vm)
    migration = OutgoingMigration(host, idle_vm, "stand-in:1", MigrationOptions(),
                                  lambda: link)
    migration.start()
    assert link.sending.wait(30)
    assert migration.cancel("cancelled by test")
    assert link.closed  # at once: a send blocked on a full link returns
    migration.join(60)
    assert migration.result == Result.CANCELLED
    assert idle_vm.migrating_to == ""


def test_a_cancel_does_not_wait_out_the_bandwidth_pacing(host: Host,
                                                         idle_vm: ManagedVm) -> None:
    """At the slowest bandwidth the full copy's batch (near 1 MiB) is paced for about 15
    s; a cancel during it ends the migration without waiting that out."""
    for i in range(DATA_PAGES, 236):
        idle_vm.write_memory(DIRTY_BASE + i * PAGE_SIZE, b"\x5a" * 64)
    link = Link(idle_vm, [])
    send = link.send

    def send_then_cancel(frames: list[bytes]) -> None:
        send(frames)
        assert link.migration is not None and link.migration.cancel("cancelled by test")
    link.send = send_then_cancel  # type: ignore[method-assign]
    migration, seen = migrate(host, idle_vm, link, bandwidth_bytes_per_second=MIN_RATE)
    assert migration.result == Result.CANCELLED
    assert link.snapshots == 1
    paced_seconds = link.bytes / MIN_RATE
    assert paced_seconds > 10
    assert seen[-1].elapsed_seconds < paced_seconds


def test_the_switch_over_is_not_paced(host: Host, idle_vm: ManagedVm) -> None:
    """The bandwidth limit paces the rounds only: the VM is paused while the last pages
    go, and pausing it longer would only add downtime. Here the full copy leaves 200
    pages, which at the slowest bandwidth would take over 12 s, and max_downtime_ms allows
    that: they go in the switch-over, unpaced."""
    link = Link(idle_vm, [200])
    migration, seen = migrate(host, idle_vm, link, bandwidth_bytes_per_second=MIN_RATE,
                              max_downtime_ms=60_000)
    assert migration.result == Result.OK, migration.error
    assert by_round(seen)[0].pages_remaining == 200
    paced_seconds = 200 * PAGE_SIZE / MIN_RATE
    assert seen[-1].downtime_ms < paced_seconds * 1000


class RestoringLink(Link):
    """Feeds every byte to a restore on the same host, as a target would (VM "copy"); keeps
    the source's memory as it was when the last snapshot had gone."""

    def __init__(self, host: Host, vm: ManagedVm, plan: list[int]) -> None:
        super().__init__(vm, plan)
        self.restorer = Restorer(host, "copy", "local", run=RunMode.AS_SAVED)
        self.image = b""

    def send(self, frames: list[bytes]) -> None:
        for frame in frames:
            self.restorer.feed(frame)
        super().send(frames)

    def finish(self) -> None:
        self.image = self.vm.read_memory(0, 0x10000 + REGION)
        self.restorer.prepare()

    def commit(self) -> None:
        self.restorer.commit()
        super().commit()

    def close(self) -> None:
        if not self.committed:
            self.restorer.abort()
        super().close()


def test_the_target_builds_the_vm_from_every_round(host: Host, idle_vm: ManagedVm) -> None:
    """Each round applies on the one before (the target checks the chain), and the pages
    the last round left go with the switch-over: the copy's memory is the source's."""
    link = RestoringLink(host, idle_vm, [LOTS, LOTS, CALM])
    migration, seen = migrate(host, idle_vm, link)
    assert migration.result == Result.OK, migration.error
    assert [p.pages_remaining for p in by_round(seen).values()] == [LOTS, LOTS, CALM, 0]
    copy = host.get_vm("copy")
    assert copy.read_memory(0, 0x10000 + REGION) == link.image
    assert link.image[DIRTY_BASE:DIRTY_BASE + 1] == bytes([3])  # the last round's writes


def test_pages_the_last_round_left_go_with_the_switch_over(host: Host,
                                                           idle_vm: ManagedVm) -> None:
    link = RestoringLink(host, idle_vm, [CALM])
    migration, seen = migrate(host, idle_vm, link, max_downtime_ms=300)
    assert migration.result == Result.OK, migration.error
    assert by_round(seen)[0].pages_remaining == CALM  # not sent by a round: converged
    assert host.get_vm("copy").read_memory(0, 0x10000 + REGION) == link.image
