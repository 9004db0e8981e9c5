"""Saving a VM into the snapshot format, and building a VM from one.

`SnapshotTaker` holds the VM paused while it yields the snapshot's bytes: header, the VM's
state (each object saved its own), guest memory (sparse: only pages with data; for a diff,
the pages dirtied since the last snapshot, zero ones as MemoryZero), trailer. `Restorer`
takes the same bytes as they arrive, builds the VM out of sight, and registers it only when
every snapshot in the stream has been verified; anything else leaves nothing behind.
"""

from __future__ import annotations

import bisect
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from kvmd import __version__
from kvmd.core.dirty import SNAPSHOT, page_runs
from kvmd.core.errors import InvalidArgument, InvalidState, Reason
from kvmd.core.host import Host
from kvmd.core.state import FileMappingState, SlotState, VmState
from kvmd.core.vm import ManagedVm, VmOptions
from kvmd.kvm import PAGE_SIZE
from kvmd.state.codec import vm_state_from_pb, vm_state_to_pb
from kvmd.state.format import (
    FORMAT_VERSION,
    MAGIC,
    MEMORY_RECORD_BYTES,
    CorruptSnapshot,
    MemoryRecord,
    Record,
    SnapshotReader,
    SnapshotWriter,
    checksum,
)
from kvmd_proto import vmm_pb2 as pb

# The capabilities a saved state depends on (recorded, and checked against the target).
STATE_CAPABILITIES = ("KVM_CAP_XSAVE", "KVM_CAP_XSAVE2", "KVM_CAP_XCRS", "KVM_CAP_DEBUGREGS",
                      "KVM_CAP_IRQCHIP", "KVM_CAP_PIT2", "KVM_CAP_PIT_STATE2",
                      "KVM_CAP_ADJUST_CLOCK", "KVM_CAP_TSC_CONTROL", "KVM_CAP_VCPU_EVENTS")
LEGACY_XSAVE_BYTES = 4096
# How a restored VM's vCPUs run once it is visible (see Restorer).


class RunMode(StrEnum):
    """How a restored VM's started vCPUs come back (see Restorer)."""

    PAUSED = "paused"
    START = "start"
    AS_SAVED = "as_saved"


RUN_MODES = tuple(RunMode)


@dataclass
class SnapshotSummary:
    """What a finished snapshot holds (SnapshotInfo in the API)."""

    snapshot_id: str
    base_snapshot_id: str
    vm_id: str
    diff: bool
    size_bytes: int
    memory_pages: int
    guest_memory_bytes: int
    created_unix_ms: int
    seconds: float
    owner: str
    format_version: int = FORMAT_VERSION
    kvmd_version: str = __version__


def xsave_size(capabilities: dict[str, int]) -> int:
    """Bytes of a vCPU's XSAVE image on a host with these capabilities (0: no XSAVE)."""
    if not capabilities.get("KVM_CAP_XSAVE"):
        return 0
    return max(LEGACY_XSAVE_BYTES, capabilities.get("KVM_CAP_XSAVE2", 0))


def host_features(capabilities: dict[str, int]) -> pb.HostFeatures:
    return pb.HostFeatures(xsave_size=xsave_size(capabilities),
                           capabilities={c: capabilities.get(c, 0) for c in STATE_CAPABILITIES})


def check_host(features: pb.HostFeatures, state: VmState,
               capabilities: dict[str, int]) -> None:
    """Refuse a state this host cannot hold (FAILED_PRECONDITION), with the reason."""
    here = xsave_size(capabilities)
    if features.xsave_size and features.xsave_size != here:
        raise InvalidState(f"incompatible host: the snapshot's vCPUs have {features.xsave_size}"
                           f"-byte XSAVE images, this host's take {here}",
                           reason=Reason.SNAPSHOT_INCOMPATIBLE)
    needs = {"irqchip": "KVM_CAP_IRQCHIP", "pit": "KVM_CAP_PIT2"}
    for option, cap in needs.items():
        if state.options.get(option) and not capabilities.get(cap):
            raise InvalidState(f"incompatible host: the VM uses the in-kernel {option}, which "
                               f"this host's KVM lacks ({cap})",
                               reason=Reason.SNAPSHOT_INCOMPATIBLE)


DIGEST_CHUNK = 4 << 20


def file_digest(vm: ManagedVm, slots: list[SlotState], f: FileMappingState) -> bytes:
    """XXH3-128 of the bytes a file mapping shows the guest (read through the VM)."""
    base = next(s.guest_addr for s in slots if s.slot == f.slot)
    h = checksum()
    buf = bytearray(min(DIGEST_CHUNK, f.size))
    view = memoryview(buf)
    for done in range(0, f.size, DIGEST_CHUNK):
        n = min(DIGEST_CHUNK, f.size - done)
        vm.vm.read_into(base + f.offset + done, view[:n])
        h.update(view[:n])
    return h.digest()


def fill_file_digests(vm: ManagedVm, state: VmState,
                      known: dict[tuple[object, ...], bytes] | None = None) -> None:
    """Give each file mapping of a saved state the digest its restore checks (`known`:
    digests already taken of read-only mappings, which cannot have changed)."""
    for f in state.files:
        cached = (known or {}).get(f.place()) if not f.writable else None
        f.digest = cached if cached is not None else file_digest(vm, state.slots, f)


def check_file_digests(vm: ManagedVm, state: VmState) -> None:
    """After a restore mapped the files: each must show the bytes it showed when saved."""
    for f in state.files:
        if not f.digest:
            raise CorruptSnapshot(f"corrupt snapshot: memory file {f.image!r} has no digest")
        if file_digest(vm, state.slots, f) != f.digest:
            raise InvalidState(
                f"memory file {f.image!r} (slot {f.slot} at {f.offset:#x}+{f.size:#x}) is "
                f"not the one the VM had: its bytes differ (it was {f.file_size} bytes when "
                "saved); put the same file in this daemon's images directory",
                reason=Reason.SNAPSHOT_INCOMPATIBLE)


def _file_mask(state: VmState, slot: int) -> int:
    """The pages of a slot that files cover: their bytes travel by reference."""
    mask = 0
    for f in state.files:
        if f.slot == slot:
            first, pages = f.offset // PAGE_SIZE, f.size // PAGE_SIZE
            mask |= ((1 << pages) - 1) << first
    return mask


def snapshot_frames(writer: SnapshotWriter, vm: ManagedVm, state: VmState,
                    snapshot_id: str, base_id: str, memory: dict[int, int] | None,
                    memory_only: bool = False) -> Iterator[bytes]:
    """The frames of one snapshot of `vm`: header, `state`, guest memory, trailer.

    `memory` None: every page of the slots that has data (a full snapshot). Otherwise
    {slot: bitmap}: the pages to send, zero ones as MemoryZero (a diff, a migration round).
    `memory_only` (a pre-copy round of a running VM): `state` holds only the options,
    labels, slots and file mappings. Pages of files mapped into the VM never go: the
    files travel by reference. Pages are read as they are now: a page the guest writes meanwhile is
    dirty again, and the next round carries it."""
    yield writer.record(pb.SnapshotRecord(header=pb.SnapshotHeader(
        magic=MAGIC, format_version=FORMAT_VERSION, kvmd_version=__version__,
        snapshot_id=snapshot_id, base_snapshot_id=base_id,
        created_unix_ms=int(time.time() * 1000), page_size=PAGE_SIZE,
        host=host_features(vm.shared.capabilities), memory_only=memory_only)))
    yield writer.record(pb.SnapshotRecord(vm=vm_state_to_pb(state)))
    for s in state.slots:
        # The backing is asked once per slot which ranges hold data (see _data_runs).
        if memory is None:
            # "pages the guest has", as discard counts them: ManagedVm.guest_pages
            for data_off, data_len in _data_runs(vm, s.slot, vm.guest_pages(s.slot)):
                yield from _data(writer, vm, s, data_off, data_len)
        else:
            bits = memory.get(s.slot, 0)
            mask = _file_mask(state, s.slot)
            if mask:
                bits &= ~mask
            if bits:
                yield from _pages(writer, vm, s, bits, vm.guest_pages(s.slot))
    yield writer.trailer()


def _pages(writer: SnapshotWriter, vm: ManagedVm, s: SlotState, bits: int,
           populated: list[tuple[int, int]]) -> Iterator[bytes]:
    """The records of the pages of a slot in `bits`: data where there is some, zero
    where the page reads zero (or was discarded; `populated`: the slot's ranges that hold
    data)."""
    starts = [lo for lo, _ in populated]
    for first, count in page_runs(bits):
        offset, end = first * PAGE_SIZE, (first + count) * PAGE_SIZE
        within = _clip(populated, starts, offset, end)
        for data_off, data_len in _data_runs(vm, s.slot, within):
            if data_off > offset:
                yield writer.zero(s.slot, offset, data_off - offset)
            yield from _data(writer, vm, s, data_off, data_len)
            offset = data_off + data_len
        if offset < end:
            yield writer.zero(s.slot, offset, end - offset)


def _clip(ranges: list[tuple[int, int]], starts: list[int], lo: int, hi: int
          ) -> list[tuple[int, int]]:
    """The parts of sorted, disjoint `ranges` (`starts`: their first offsets) inside
    [lo, hi)."""
    out = []
    i = max(bisect.bisect_right(starts, lo) - 1, 0)
    while i < len(ranges) and ranges[i][0] < hi:
        r_lo, r_hi = max(ranges[i][0], lo), min(ranges[i][0] + ranges[i][1], hi)
        if r_lo < r_hi:
            out.append((r_lo, r_hi - r_lo))
        i += 1
    return out


def _data_runs(vm: ManagedVm, slot: int, populated: list[tuple[int, int]]
               ) -> Iterator[tuple[int, int]]:
    """The runs of pages holding a non-zero byte within `populated` (ranges of the slot
    that hold data, from guest_pages), found one record's worth at a time just before
    `_data` copies them, without asking the backing again: its SEEK_HOLE walks every page
    of data after the offset (1.6 ms from the start of 256 MiB here), which a dirty round
    of scattered pages used to pay once per run."""
    for lo, length in populated:
        end = lo + length
        for window in range(lo, end, MEMORY_RECORD_BYTES):
            yield from vm.data_pages_within(slot, window,
                                            min(MEMORY_RECORD_BYTES, end - window))


def _data(writer: SnapshotWriter, vm: ManagedVm, s: SlotState, offset: int,
          length: int) -> Iterator[bytes]:
    """Frames of pages that hold data, copied once from the guest's mapping (the checksum
    is of that copy: a page a running guest writes meanwhile goes again next round)."""
    read_joined = vm.vm.read_joined
    for done in range(0, length, MEMORY_RECORD_BYTES):
        n = min(MEMORY_RECORD_BYTES, length - done)
        addr = s.guest_addr + offset + done

        def read(prefix: bytes, addr: int = addr, n: int = n) -> bytes:
            return read_joined(addr, n, prefix)
        yield writer.memory_read(s.slot, offset + done, n, read)


class SnapshotTaker:
    """Iterate to get a snapshot of `vm` as bytes, the VM held paused meanwhile; `summary`
    is set once the last byte is out. Close the iterator early (a client went away) and the
    VM is left as it was: running again unless asked otherwise, and a diff's dirty pages
    still owed to the next snapshot.

    With `confirm`, a complete snapshot becomes the VM's base for diffs only at `confirm()`
    (a file, once it has its name); `close()` before that counts it as failed."""

    def __init__(self, vm: ManagedVm, diff: bool = False, leave_paused: bool = False,
                 lead: Callable[[int], bytes] | None = None, confirm: bool = False) -> None:
        self.vm = vm
        self._needs_confirm = confirm
        self._settle: Callable[[bool], None] | None = None  # awaiting confirm() or close()
        self.diff = diff
        self.leave_paused = leave_paused
        # A stream's message header for a payload of n bytes (see SnapshotWriter, and
        # pull_message); None for files.
        self._lead = lead
        self._writer = SnapshotWriter(lead)  # the current iteration's (see __iter__)
        self._held: bytes | None = None  # a frame pulled but left for the next message
        self.summary: SnapshotSummary | None = None
        self.snapshot_id = uuid.uuid4().hex
        # pull() and close() may come from different threads (an RPC's pool work, then its
        # cancellation): one at a time, and close() waits for a pull in progress.
        self._lock = threading.Lock()
        self._chunks: Iterator[bytes] | None = None
        if diff and not vm.last_snapshot_id:
            raise InvalidState(f"vm {vm.id} has no snapshot to diff against: take a full "
                               "snapshot first", resource=vm.resource,
                               reason=Reason.SNAPSHOT_INCOMPATIBLE)

    def __iter__(self) -> Iterator[bytes]:
        vm = self.vm
        started = time.monotonic()
        writer = self._writer = SnapshotWriter(self._lead)
        taken: dict[int, int] = {}  # slot -> dirty bits taken (given back on failure)
        done = False
        with vm.held_paused("snapshot", self.leave_paused) as hold:
            try:
                state = vm.save_state(hold.run_states)
                fill_file_digests(vm, state)
                layout = state.slots
                if self.diff and layout != vm.last_snapshot_layout:
                    raise InvalidState(f"vm {vm.id}'s memory slots changed since its last "
                                       "snapshot: take a full snapshot", resource=vm.resource,
                                       reason=Reason.SNAPSHOT_INCOMPATIBLE)
                base = vm.last_snapshot_id if self.diff else ""
                vm.dirty.add_consumer(SNAPSHOT)
                for s in layout:
                    if s.log_dirty:
                        taken[s.slot] = vm.dirty.take(SNAPSHOT, vm.vm.memory_region(s.slot))
                memory = None
                if self.diff:  # a slot without dirty logging is sent whole
                    memory = {s.slot: taken.get(s.slot, 0) if s.log_dirty
                              else (1 << s.size // PAGE_SIZE) - 1 for s in layout}
                yield from snapshot_frames(writer, vm, state, self.snapshot_id, base, memory)
                done = True
            finally:
                def settle(ok: bool) -> None:
                    if ok:
                        vm.last_snapshot_id, vm.last_snapshot_layout = self.snapshot_id, layout
                    else:
                        for slot, bits in taken.items():
                            vm.dirty.put_back(SNAPSHOT, slot, bits)
                    vm.shared.operations.record("snapshot", "diff" if self.diff else "full",
                                                "ok" if ok else "error", writer.size,
                                                time.monotonic() - started)
                if done and self._needs_confirm:
                    self._settle = settle
                else:
                    settle(done)
        self.summary = SnapshotSummary(
            snapshot_id=self.snapshot_id, base_snapshot_id=base, vm_id=vm.id, diff=self.diff,
            size_bytes=writer.size, memory_pages=writer.memory_pages,
            guest_memory_bytes=sum(s.size for s in layout),
            created_unix_ms=int(time.time() * 1000), seconds=time.monotonic() - started,
            owner=vm.owner)

    def pull(self, size: int) -> list[bytes] | None:
        """The next frames of the snapshot, about `size` bytes of them (None when it is
        complete). Frames, not one joined buffer: each frame is sent without a copy."""
        with self._lock:
            if self._chunks is None:
                self._chunks = iter(self)
            parts: list[bytes] = []
            got = 0
            for piece in self._chunks:
                parts.append(piece)
                got += len(piece)
                if got >= size:
                    break
            return parts or None

    def pull_message(self, size: int) -> bytes | None:
        """The next message of a streamed snapshot, whole on the wire (the taker was made
        with a `lead`), about `size` bytes of frames: a frame of guest pages that fills a
        message alone goes as it was built, behind its lead, without a copy; smaller frames
        (header, state, zero pages, short runs of pages, trailer) are joined behind one
        lead. None when the snapshot is complete."""
        assert self._lead is not None, "pull_message needs a taker made with a lead"
        with self._lock:
            if self._chunks is None:
                self._chunks = iter(self)
            parts: list[bytes | memoryview] = []
            got = 0
            while got < size:
                frame, self._held = self._held, None
                if frame is None:
                    frame = next(self._chunks, None)
                    if frame is None:
                        break
                part: bytes | memoryview = frame
                writer = self._writer
                if frame is writer.last_message:
                    if len(frame) - writer.last_lead >= size:
                        if parts:
                            self._held = frame  # the next message, alone
                            break
                        return frame
                    part = memoryview(frame)[writer.last_lead:]
                parts.append(part)
                got += len(part)
            return b"".join([self._lead(got), *parts]) if parts else None

    def confirm(self) -> None:
        """The complete snapshot was kept (a taker made with `confirm`): diffs follow it."""
        with self._lock:
            settle, self._settle = self._settle, None
        if settle is not None:
            settle(True)

    def close(self) -> None:
        """End the snapshot now (complete or not): the VM is released at once. An
        unconfirmed snapshot counts as failed: its dirty pages are owed again."""
        with self._lock:
            if self._chunks is not None:
                self._chunks.close()  # type: ignore[attr-defined]
            settle, self._settle = self._settle, None
        if settle is not None:
            settle(False)


class Restorer:
    """Build a VM named `vm_id` from snapshot bytes fed as they arrive (a full snapshot,
    then diffs on it; a migration's memory-only rounds, then its final state). Nothing is
    visible before `finish` (or `prepare` then `commit`), which registers the VM; `abort`
    (or any error) releases everything: no VM, no fd, no memory, the id free again.

    `run`: "paused" (the vCPUs that had been started wait paused), "start" (they run, and
    a VM saved before it ever ran is started) or "as_saved" (each vCPU in the run state it
    was saved in: a migration)."""

    def __init__(self, host: Host, vm_id: str, owner: str, owner_quota: int = 0,
                 run: str = RunMode.PAUSED, kind: str = "restore", reserved: bool = False) -> None:
        if run not in RUN_MODES:
            raise InvalidArgument(f"run mode {run!r} is not one of {', '.join(RUN_MODES)}",
                                  reason=Reason.VALUE_UNKNOWN, field="run")
        self.host = host
        self.vm_id = vm_id
        self.owner = owner
        self.run = run
        self.kind = kind  # the operation counted in the metrics: restore, migration_in
        self.reader = SnapshotReader()
        self.vm: ManagedVm | None = None
        self._header: pb.SnapshotHeader | None = None
        self._state: VmState | None = None  # of the snapshot being read
        self._final: VmState | None = None  # of the last complete snapshot with a state
        self._slots: dict[int, SlotState] = {}
        # Where files are mapped: their pages travel by reference, so no memory or zero
        # record may touch them, and a diff must map them where its base did.
        self._files: list[FileMappingState] = []
        self._last_id = ""
        self._last_memory_only = False
        self._prepared = False
        self._done = False
        self._started = time.monotonic()
        # feed/finish and abort may come from different threads (an RPC's pool work, then
        # its cancellation): one at a time.
        self._lock = threading.RLock()
        if not reserved:  # `reserved`: the caller holds the id already (and hands it over)
            host.reserve_id(vm_id, owner, owner_quota)

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    def feed(self, data: bytes | memoryview) -> None:
        """Apply what `data` completes; raises (after releasing everything) on bad input."""
        with self._lock:
            if self._done or self._prepared:
                raise InvalidState(f"the restore of {self.vm_id} has ended",
                                   reason=Reason.RESTORE_NOT_READY)
            try:
                for record in self.reader.feed(data):
                    self._apply(record)
            except BaseException:
                self.abort()
                raise

    def _apply(self, record: Record) -> None:
        if isinstance(record, MemoryRecord):  # the bulk: copied once, into the guest
            slot = self._slot(record.slot, record.offset, len(record.data))
            assert self.vm is not None
            self.vm.vm.write(slot.guest_addr + record.offset, record.data)
            return
        kind = record.WhichOneof("record")
        if kind == "header":
            self._on_header(record.header)
        elif kind == "vm":
            self._on_vm(record.vm)
        elif kind == "memory":
            m = record.memory
            slot = self._slot(m.slot, m.offset, len(m.data))
            assert self.vm is not None
            self.vm.vm.write(slot.guest_addr + m.offset, m.data)
        elif kind == "zero":
            z = record.zero
            slot = self._slot(z.slot, z.offset, z.length)
            assert self.vm is not None
            self.vm.vm.discard(slot.guest_addr + z.offset, z.length)
        elif kind == "trailer":
            assert self._header is not None
            self._last_id = self._header.snapshot_id
            self._last_memory_only = self._header.memory_only
            if not self._header.memory_only:
                self._final = self._state

    def _on_header(self, header: pb.SnapshotHeader) -> None:
        if not self._last_id and header.base_snapshot_id:
            raise InvalidState(f"snapshot {header.snapshot_id} is a diff on "
                               f"{header.base_snapshot_id}: restore its base first",
                               reason=Reason.SNAPSHOT_INCOMPATIBLE)
        if self._last_id and header.base_snapshot_id != self._last_id:
            raise InvalidState(f"snapshot {header.snapshot_id} applies on "
                               f"{header.base_snapshot_id or 'nothing (it is full)'}, not on "
                               f"{self._last_id}: wrong base", reason=Reason.SNAPSHOT_INCOMPATIBLE)
        self._header = header

    def _on_vm(self, saved: pb.SavedVm) -> None:
        assert self._header is not None
        state = vm_state_from_pb(saved)
        check_host(self._header.host, state, self.host.capabilities())
        self._state = state
        if self.vm is None:
            try:
                options = VmOptions(**state.options)  # type: ignore[arg-type]
            except TypeError as exc:
                raise CorruptSnapshot(f"corrupt snapshot: VM options {exc}") from None
            self.vm = self.host.build_vm(self.vm_id, state.labels, options, self.owner)
            self._files = list(state.files)
            self.vm.restore_memory_layout(state.slots, files=state.files)
            self._slots = {s.slot: s for s in state.slots}
        elif {s.slot: s for s in state.slots} != self._slots or \
                [f.place() for f in state.files] != [f.place() for f in self._files]:
            raise InvalidState(f"snapshot {self._header.snapshot_id} has other memory slots "
                               "or files than its base", reason=Reason.SNAPSHOT_INCOMPATIBLE)

    def _slot(self, number: int, offset: int, length: int) -> SlotState:
        slot = self._slots.get(number)
        if slot is None or offset % PAGE_SIZE or length % PAGE_SIZE or \
                offset + length > slot.size:
            raise CorruptSnapshot(f"corrupt snapshot: memory {offset:#x}+{length:#x} is not "
                                  f"whole pages of slot {number}")
        for f in self._files:
            if f.slot == number and length and offset < f.offset + f.size and \
                    f.offset < offset + length:
                raise CorruptSnapshot(f"corrupt snapshot: memory {offset:#x}+{length:#x} of "
                                      f"slot {number} lies over memory file {f.image!r} (a file "
                                      "travels by reference, its pages are never in a "
                                      "snapshot)")
        return slot

    def finish(self) -> ManagedVm:
        """The stream ended: restore the vCPUs and devices of the last snapshot, put each
        vCPU back in its run state (or start the VM), and make it visible."""
        with self._lock:
            self.prepare()
            return self.commit()

    def prepare(self) -> None:
        """Everything but making the VM visible: the stream must be complete, the last
        snapshot must carry a state (not a memory-only round); the vCPUs and devices are
        restored, started vCPUs wait paused. The id stays reserved until commit or abort."""
        with self._lock:
            if self._done or self._prepared:
                raise InvalidState(f"the restore of {self.vm_id} has ended",
                                   reason=Reason.RESTORE_NOT_READY)
            try:
                self.reader.finish()
                if self._last_memory_only or self._final is None:
                    raise CorruptSnapshot("the stream ends with a memory-only snapshot (a "
                                          "pre-copy round): the VM's state is missing")
                assert self.vm is not None
                vm = self.vm
                check_file_digests(vm, self._final)
                vm.restore_state(self._final)
                vm.last_snapshot_id = self._last_id
                vm.last_snapshot_layout = list(self._final.slots)
                vm.dirty.add_consumer(SNAPSHOT)  # a diff of it applies on what was restored
                vm.resume_run_states(self._final, start=False)
                self._prepared = True
            except BaseException:
                self.abort()
                raise

    def commit(self) -> ManagedVm:
        """Make the prepared VM visible and run it as `run` says."""
        with self._lock:
            if self._done or not self._prepared:
                raise InvalidState(f"the restore of {self.vm_id} is not ready to commit",
                                   reason=Reason.RESTORE_NOT_READY)
            assert self.vm is not None and self._final is not None
            vm = self.vm
            try:
                self.host.register(vm)
            except BaseException:
                self.abort()
                raise
            self._done = True
            self.host.release_id(self.vm_id)
            self._record("ok")
            if self.run == RunMode.START:
                vm.resume_run_states(self._final, start=True, parked=True)
            elif self.run == RunMode.AS_SAVED:
                vm.resume_saved_run_states(self._final)
            return vm

    def abort(self) -> None:
        """Give up: close the half-built VM (its memory and fds) and free the id."""
        with self._lock:
            if self._done:
                return
            self._done = True
            if self.vm is not None:
                self.vm.close()
                self.vm = None
            self.host.release_id(self.vm_id)
            self._record("error")

    def _record(self, result: str) -> None:
        kind = "diff" if self.reader.snapshots > 1 else "full"
        if self.kind != "restore":
            kind = "live"
        self.host.shared.operations.record(self.kind, kind, result, self.reader.bytes_read,
                                           time.monotonic() - self._started)


def restore_bytes(host: Host, vm_id: str, owner: str, chunks: Iterator[bytes],
                  start: bool = False, owner_quota: int = 0) -> ManagedVm:
    """Restore from an iterator of snapshot bytes (files, tests)."""
    restorer = Restorer(host, vm_id, owner, owner_quota,
                        RunMode.START if start else RunMode.PAUSED)
    for chunk in chunks:
        restorer.feed(chunk)
    return restorer.finish()
