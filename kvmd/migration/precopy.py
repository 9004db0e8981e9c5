"""The source's side of a live migration: pre-copy rounds, then the switch-over.

The shape of QEMU's migration/ram.c: a full copy of guest memory while the VM runs
(sparse: pages without data are not sent), then rounds of the pages the guest dirtied
during the previous one, until what remains would take no longer than the allowed downtime
to send (or the round limit is reached: the migration fails and the VM keeps running).
Then the VM is paused, the last dirty pages and the complete state go to the target, which
builds the VM and says it is ready; the source tells it to commit, and deletes its own copy
once the target confirms. Auto-converge throttles the guest's vCPUs when it dirties memory
faster than the link carries it.

Every failure before the commit leaves the VM running here, and the target, which only ever
commits on our word, discards what it received. A failure after the commit was sent is
reported as an unknown outcome: the VM stays paused here (it may be running there).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

from kvmd.core.dirty import MIGRATION
from kvmd.core.errors import (
    Aborted,
    DomainError,
    InvalidArgument,
    InvalidState,
    OutcomeUnknown,
    Reason,
)
from kvmd.core.events import Broadcaster, Subscription
from kvmd.core.host import Host
from kvmd.core.state import VmState
from kvmd.core.vm import ManagedVm
from kvmd.kvm import PAGE_SIZE, MemoryRegionInfo
from kvmd.state.format import SnapshotWriter
from kvmd.state.snapshot import file_digest, fill_file_digests, snapshot_frames

log = logging.getLogger(__name__)

DEFAULT_MAX_DOWNTIME_MS = 300
DEFAULT_MAX_ROUNDS = 30
DEFAULT_TIMEOUT_MS = 10_000
MAX_ROUNDS_LIMIT = 1000
# Auto-converge as QEMU's cpu-throttle: start at 20%, 10 more per round the guest out-dirtied
# the link (it dirtied more than half of what the round sent), at most 99%.
THROTTLE_INITIAL, THROTTLE_STEP, THROTTLE_MAX = 20, 10, 99
DIRTY_THRESHOLD = 0.5
# What the switch-over costs besides the memory: saving and restoring the state, two round
# trips (ready, commit). Added to the memory estimate; the measured downtime is reported.
SWITCH_OVER_OVERHEAD_S = 0.004
# Below this no round could ever fit: the overhead alone is more.
MIN_DOWNTIME_MS = round(SWITCH_OVER_OVERHEAD_S * 1000)
# Bytes handed to the transport at once (it frames them into gRPC messages).
SEND_BATCH_BYTES = 1 << 20
PROGRESS_INTERVAL_S = 0.25



class Phase(StrEnum):
    """Where an outgoing migration is (MigrationProgress.phase)."""

    CONNECTING = "connecting"
    COPYING = "copying"
    SWITCHING_OVER = "switching_over"
    COMPLETED = "completed"


CONNECTING, COPYING, SWITCHING_OVER, COMPLETED = (
    Phase.CONNECTING, Phase.COPYING, Phase.SWITCHING_OVER, Phase.COMPLETED)


class Result(StrEnum):
    """How an outgoing migration ended (the result label of kvmd_migrations_total)."""

    OK = "ok"
    CANCELLED = "cancelled"
    FAILED = "failed"
    UNKNOWN = "unknown"  # the switch-over's outcome could not be learnt


class Direction(StrEnum):
    """Out of this daemon or into it (ListMigrations, the direction metric label)."""

    OUTGOING = "outgoing"
    INCOMING = "incoming"


@dataclass(frozen=True)
class MigrationOptions:
    """How a migration may go: see MigrationOptions in proto/vmm.proto."""

    max_downtime_ms: int = 0
    bandwidth_bytes_per_second: int = 0
    max_rounds: int = 0
    auto_converge: bool = False
    tls_server_name: str = ""
    timeout_ms: int = 0

    def validated(self) -> MigrationOptions:
        """These options with defaults filled in; bad values are INVALID_ARGUMENT."""
        if self.max_downtime_ms != 0 and not MIN_DOWNTIME_MS <= self.max_downtime_ms <= 60_000:
            raise InvalidArgument(f"max_downtime_ms must be {MIN_DOWNTIME_MS}-60000 (0: "
                                  f"{DEFAULT_MAX_DOWNTIME_MS})",
                                  reason=Reason.VALUE_OUT_OF_RANGE, field="options.max_downtime_ms")
        if not 0 <= self.max_rounds <= MAX_ROUNDS_LIMIT:
            raise InvalidArgument(f"max_rounds must be 1-{MAX_ROUNDS_LIMIT} (0: "
                                  f"{DEFAULT_MAX_ROUNDS})",
                                  reason=Reason.VALUE_OUT_OF_RANGE, field="options.max_rounds")
        if self.bandwidth_bytes_per_second < 0 or (
                0 < self.bandwidth_bytes_per_second < 64 * 1024):
            raise InvalidArgument("bandwidth_bytes_per_second must be at least 65536 (0: "
                                  "unlimited)",
                                  reason=Reason.VALUE_OUT_OF_RANGE,
                                  field="options.bandwidth_bytes_per_second")
        if not 0 <= self.timeout_ms <= 600_000:
            raise InvalidArgument("timeout_ms must be 1-600000 (0: "
                                  f"{DEFAULT_TIMEOUT_MS})",
                                  reason=Reason.VALUE_OUT_OF_RANGE, field="options.timeout_ms")
        return replace(self, max_downtime_ms=self.max_downtime_ms or DEFAULT_MAX_DOWNTIME_MS,
                       max_rounds=self.max_rounds or DEFAULT_MAX_ROUNDS,
                       timeout_ms=self.timeout_ms or DEFAULT_TIMEOUT_MS)


@dataclass
class Progress:
    """Where a migration stands (MigrationProgress in the API)."""

    phase: str = CONNECTING
    round: int = 0
    pages_sent: int = 0
    bytes_sent: int = 0
    pages_remaining: int = 0
    dirty_pages_per_second: float = 0.0
    throughput_bytes_per_second: float = 0.0
    expected_downtime_ms: float = 0.0
    throttle_percent: int = 0
    elapsed_seconds: float = 0.0
    downtime_ms: float = 0.0
    target_vm_id: str = ""
    guest_memory_bytes: int = 0


class Transport(Protocol):
    """The source's link to the target daemon. Every method raises a DomainError when the
    link fails (Unavailable when the target is lost); `close` ends it at any time, from any
    thread, and before a commit makes the target discard everything."""

    def start(self, source_vm_id: str) -> str:
        """Present the token; returns the VM's id on the target."""
        ...

    def send(self, frames: list[bytes]) -> None:
        """Send snapshot bytes, in order; blocks while the link is full."""
        ...

    def finish(self) -> None:
        """The final snapshot is sent: return once the target has built the VM from it."""
        ...

    def commit(self) -> None:
        """Tell the target to run the VM; return once it does. Raises OutcomeUnknown when
        the answer does not come."""
        ...

    def close(self) -> None:
        ...


class OutgoingMigration:
    """One VM's migration to one target, run by its own thread (`start`). Progress goes to
    subscribers (`watch`); `error` is set when it failed; `cancel` stops it before the
    switch-over's commit."""

    def __init__(self, host: Host, vm: ManagedVm, target: str, options: MigrationOptions,
                 connect: Callable[[], Transport],
                 on_end: Callable[[OutgoingMigration], None] | None = None) -> None:
        self.host = host
        self.vm = vm
        self.target = target
        self.options = options.validated()
        self._connect = connect
        self._on_end = on_end
        self.progress = Progress(guest_memory_bytes=sum(r.size for r in vm.memory_regions()))
        self.updates: Broadcaster[Progress] = Broadcaster(maxsize=64)
        self.error: DomainError | None = None
        self.result: str = ""  # a Result once ended
        self.started = time.monotonic()
        self._cancelled = threading.Event()
        self._cancel_reason = ""
        self._lock = threading.Lock()
        self._transport: Transport | None = None
        self._committing = False
        self._migrated_away = False  # the target runs the VM: this daemon frees it
        self._next_send = 0.0  # bandwidth pacing: when the next batch may go
        self._known_digests: dict[tuple[object, ...], bytes] = {}
        self._last_publish = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"migrate-{vm.id}")
        self.done = threading.Event()

    # -- control (API threads) ------------------------------------------------------------

    def start(self) -> None:
        """Claim the VM for the migration (refused if it is already migrating, busy, or has
        files mapped) and start the thread."""
        self.vm.begin_migration(self.target)
        self._thread.start()

    def watch(self) -> Subscription[Progress]:
        sub = self.updates.subscribe()
        sub.put(self.snapshot_progress())
        return sub

    def cancel(self, reason: str = "cancelled") -> bool:
        """Stop before the commit: the VM keeps running here. False when it is too late
        (the commit was sent) or the migration already ended."""
        with self._lock:
            if self._committing or self.done.is_set():
                return False
            self._cancel_reason = reason
            self._cancelled.set()
            transport = self._transport
        if transport is not None:
            transport.close()  # wakes a send blocked on the link
        return True

    def join(self, timeout: float | None = None) -> None:
        self.done.wait(timeout)

    def snapshot_progress(self) -> Progress:
        with self._lock:
            p = replace(self.progress)
        p.elapsed_seconds = time.monotonic() - self.started
        return p

    # -- the migration thread -------------------------------------------------------------

    def _run(self) -> None:
        vm = self.vm
        try:
            self._migrate()
            self.result = Result.OK
        except BaseException as exc:
            if isinstance(exc, DomainError):
                self.error = exc
            else:
                log.exception("migration failed", extra={"vm_id": vm.id})
                self.error = InvalidState(f"migration failed: {type(exc).__name__}: {exc}",
                                          reason=Reason.MIGRATION_FAILED)
            if self._cancelled.is_set() and not self._committing:
                self.error = Aborted(f"the migration of vm {vm.id} was {self._cancel_reason}; "
                                     "it runs on here", resource=vm.resource,
                                     reason=Reason.MIGRATION_CANCELLED)
                self.result = Result.CANCELLED
            elif isinstance(self.error, OutcomeUnknown):
                self.result = Result.UNKNOWN
            else:
                self.result = Result.FAILED
            log.warning("migration did not complete", extra={
                "vm_id": vm.id, "target": self.target, "result": self.result,
                "error": self.error.message})
        finally:
            transport, self._transport = self._transport, None
            if transport is not None:
                transport.close()
            vm.end_migration()
            p = self.snapshot_progress()
            self.host.shared.operations.record(
                "migration_out", "live", self.result, p.bytes_sent, p.elapsed_seconds)
            if self.result is Result.OK:
                self.host.shared.migration.record(p.downtime_ms / 1000, p.round)
            self.updates.publish(p)
            self.updates.end()
            if self._migrated_away:
                # After the caller's answer: unmapping a big guest takes tens of ms (45 ms
                # for 256 MiB here), which the migration's caller need not wait for. `done`
                # still waits for it, so nothing outlives a daemon's stop.
                self.host.release_migrated(vm)
            self.done.set()
            if self._on_end is not None:
                self._on_end(self)

    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise Aborted(f"the migration was {self._cancel_reason}",
                          reason=Reason.MIGRATION_CANCELLED)

    def _publish(self, force: bool = False, **changes: object) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self.progress, name, value)
        now = time.monotonic()
        if force or now - self._last_publish >= PROGRESS_INTERVAL_S:
            self._last_publish = now
            self.updates.publish(self.snapshot_progress())

    def _migrate(self) -> None:
        vm, opts = self.vm, self.options
        transport = self._connect()
        with self._lock:
            self._transport = transport
        self._check_cancelled()
        target_vm = transport.start(vm.id)
        self._publish(True, target_vm_id=target_vm, phase=COPYING)
        self._check_cancelled()
        layout = vm.memory_layout()
        files = vm.file_mapping_states(sync=False)
        layout_only = VmState(vm_id=vm.id, labels=dict(vm.labels), owner=vm.owner,
                              options=_options(vm), slots=layout, files=files)
        # Files travel by reference, checked by digest on the target. A read-only mapping
        # cannot change while the VM runs: its digest is taken now, not in the downtime.
        self._known_digests = {f.place(): file_digest(vm, layout, f) for f in files
                               if not f.writable}
        regions: dict[int, MemoryRegionInfo] = {r.slot: r for r in vm.vm.memory_regions()}

        # Round 0: every page with data, as it is now; what the guest writes from here on
        # is dirty for the next round.
        for s in layout:
            vm.dirty.take(MIGRATION, regions[s.slot])
        base = uuid.uuid4().hex
        round_started = time.monotonic()
        round_bytes, round_seconds = self._send_snapshot(
            SnapshotWriter(), layout_only, base, "", None, memory_only=True, limited=True)
        throughput = round_bytes / max(round_seconds, 1e-6)
        out_dirtied = 0
        rounds = 0
        while True:
            self._check_cancelled()
            bits = {s.slot: vm.dirty.take(MIGRATION, regions[s.slot]) for s in layout}
            pages = sum(b.bit_count() for b in bits.values())
            now = time.monotonic()
            dirty_rate = pages / max(now - round_started, 1e-6)
            vm.dirty.note_rate(pages, now - round_started)
            if round_bytes >= 256 * 1024:  # small rounds say little about the link
                throughput = round_bytes / max(round_seconds, 1e-6)
            expected = pages * PAGE_SIZE / throughput + SWITCH_OVER_OVERHEAD_S
            self._publish(True, round=rounds, pages_remaining=pages,
                          dirty_pages_per_second=dirty_rate,
                          throughput_bytes_per_second=throughput,
                          expected_downtime_ms=expected * 1000)
            if expected * 1000 <= opts.max_downtime_ms:
                break  # these pages go with the switch-over
            if rounds >= opts.max_rounds:
                raise InvalidState(
                    f"the migration of vm {vm.id} did not converge in {opts.max_rounds} "
                    f"rounds: the guest dirties {dirty_rate * PAGE_SIZE / 1e6:.1f} MB/s, the "
                    f"link carries {throughput / 1e6:.1f} MB/s, {pages} pages remain "
                    f"({expected * 1000:.0f} ms > max_downtime_ms {opts.max_downtime_ms}); "
                    "allow more downtime or bandwidth, or use auto_converge",
                    resource=vm.resource, reason=Reason.MIGRATION_FAILED)
            if opts.auto_converge and pages * PAGE_SIZE > DIRTY_THRESHOLD * round_bytes:
                out_dirtied += 1
                if out_dirtied >= 2:  # twice in a row, as QEMU: one round may be a burst
                    throttle = min(THROTTLE_MAX, THROTTLE_INITIAL if not vm.throttle_percent
                                   else vm.throttle_percent + THROTTLE_STEP)
                    vm.set_throttle(throttle)
                    self._publish(True, throttle_percent=throttle)
            else:
                out_dirtied = 0
            rounds += 1
            snapshot_id = uuid.uuid4().hex
            round_started = time.monotonic()
            round_bytes, round_seconds = self._send_snapshot(
                SnapshotWriter(), layout_only, snapshot_id, base, bits, memory_only=True,
                limited=True)
            base = snapshot_id
        self._switch_over(base, bits)

    def _switch_over(self, base: str, pending: dict[int, int]) -> None:
        """Pause, send the last pages (`pending`, taken by the last round, and what was
        dirtied since) and the state, let the target build the VM, commit, and drop the VM
        here once the target runs it."""
        vm, transport = self.vm, self._transport
        assert transport is not None
        self._publish(True, phase=SWITCHING_OVER)
        with vm.held_paused("migration", leave_paused=True) as hold:
            paused_at = time.monotonic()
            try:
                state = vm.save_state(hold.run_states)
                fill_file_digests(vm, state, self._known_digests)
                bits = {s.slot: pending.get(s.slot, 0)
                        | vm.dirty.take(MIGRATION, vm.vm.memory_region(s.slot))
                        for s in state.slots}
                self._send_snapshot(SnapshotWriter(), state, uuid.uuid4().hex, base, bits,
                                    memory_only=False, limited=False)
                transport.finish()
                with self._lock:
                    self._check_cancelled()
                    self._committing = True  # from here on, cancel is too late
                transport.commit()
            except BaseException as exc:
                if not self._committing:
                    hold.leave_paused = False  # nothing happened: the VM runs on here
                else:
                    reason = ("migration outcome unknown: the target may run the VM; check "
                              f"it before resuming here ({exc})")
                    vm.reason = reason
                    if not isinstance(exc, OutcomeUnknown):
                        raise OutcomeUnknown(reason, resource=vm.resource,
                                             reason=Reason.MIGRATION_OUTCOME_UNKNOWN) from exc
                raise
            downtime = time.monotonic() - paused_at
            # Still held (no resume can slip in): the VM runs on the target now. Its memory
            # is freed once the caller has the outcome (see _run).
            self.host.forget_migrated(vm)
            self._migrated_away = True
        self._publish(True, phase=COMPLETED, downtime_ms=downtime * 1000, pages_remaining=0)
        log.info("vm migrated", extra={"vm_id": vm.id, "target": self.target,
                                       "downtime_ms": round(downtime * 1000, 1)})

    def _send_snapshot(self, writer: SnapshotWriter, state: VmState, snapshot_id: str,
                       base: str, bits: dict[int, int] | None, *, memory_only: bool,
                       limited: bool) -> tuple[int, float]:
        """Send one snapshot; returns its bytes and the seconds it took."""
        started = time.monotonic()
        frames = snapshot_frames(writer, self.vm, state, snapshot_id, base, bits,
                                 memory_only=memory_only)
        sent_before = writer.size
        self._send(frames, writer, limited)
        return writer.size - sent_before, time.monotonic() - started

    def _send(self, frames: Iterable[bytes], writer: SnapshotWriter, limited: bool) -> None:
        transport = self._transport
        assert transport is not None
        batch: list[bytes] = []
        size = 0
        pages_before = writer.memory_pages
        for frame in frames:
            batch.append(frame)
            size += len(frame)
            if size >= SEND_BATCH_BYTES:
                self._send_batch(transport, batch, size, limited)
                self._publish(pages_sent=self.progress.pages_sent + writer.memory_pages
                              - pages_before)
                pages_before = writer.memory_pages
                batch, size = [], 0
        if batch:
            self._send_batch(transport, batch, size, limited)
        self._publish(pages_sent=self.progress.pages_sent + writer.memory_pages - pages_before)

    def _send_batch(self, transport: Transport, batch: list[bytes], size: int,
                    limited: bool) -> None:
        self._check_cancelled()
        transport.send(batch)
        with self._lock:
            self.progress.bytes_sent += size
        rate = self.options.bandwidth_bytes_per_second
        if limited and rate:
            now = time.monotonic()
            self._next_send = max(self._next_send, now) + size / rate
            if self._next_send > now:
                self._cancelled.wait(self._next_send - now)


def _options(vm: ManagedVm) -> dict[str, int | bool]:
    return dataclasses.asdict(vm.options)
