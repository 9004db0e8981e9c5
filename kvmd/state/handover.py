"""A VM's state as a daemon hands it to its successor: the snapshot format without memory.

KVM binds a VM's fds to the process that created it, so a restarting or upgraded daemon
re-creates each VM in the new process from saved state, as QEMU's CPR transfer mode does;
guest memory is not copied: the memfds behind the slots pass to the new process (over a
Unix socket with SCM_RIGHTS, or through systemd's fd store) and the new VM maps them.

    state := header(magic "kvmd-handover", HandoverState) vm trailer

The same records, framing and XXH3 checksum as a snapshot (kvmd.state.format), with a
magic of its own so no snapshot reader ever restores it as a VM without memory. The header's
HandoverState names each slot's memfd and records its identity (device, inode, size), so a
missing, swapped or truncated memfd is refused before anything is mapped; it also carries
the daemon's bookkeeping a snapshot does not need: counters that continue (discarded bytes,
dirty pages), each slot's discard credit (so the new daemon charges the adopted memory as
the old one did, and a host overcommitted by discards is taken over), the pages dirtied and
not yet reported to GetDirtyLog or to the next diff snapshot, and when the VM was paused
(to measure the outage).

`save_vm` (old daemon, VM held paused) -> `SavedForHandover`; `read_state` checks bytes;
`restore_vm` (new daemon) builds, adopts the memfds, restores and registers the VM with its
vCPUs parked; `resume` puts them back in their run state.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass

from kvmd import __version__
from kvmd.core.dirty import API, SNAPSHOT
from kvmd.core.errors import InvalidState, Reason
from kvmd.core.host import Host
from kvmd.core.state import VmState
from kvmd.core.vcpu import HALTED, RUNNING
from kvmd.core.vm import ManagedVm, VmOptions
from kvmd.kvm import PAGE_SIZE
from kvmd.state.codec import vm_state_from_pb, vm_state_to_pb
from kvmd.state.format import (
    FORMAT_VERSION,
    HANDOVER_MAGIC,
    CorruptSnapshot,
    SnapshotReader,
    SnapshotWriter,
)
from kvmd.state.snapshot import check_host, host_features
from kvmd_proto import vmm_pb2 as pb

# fd names: systemd's FDNAME allows printable ASCII except ':' (its LISTEN_FDNAMES
# separator), at most 255 characters. "kvmd-mem.<slot>.<vm id>": VM ids are
# [A-Za-z0-9._-]{1,64}, so the name parses back from the left.
MEMFD_PREFIX = "kvmd-mem"
_MEMFD_NAME = re.compile(r"^kvmd-mem\.(\d{1,5})\.([A-Za-z0-9][A-Za-z0-9._-]{0,63})$")
DIRTY_CONSUMERS = (API, SNAPSHOT)


def boottime_ns() -> int:
    """CLOCK_BOOTTIME: one clock for every process of the host, across suspends, so the old
    and the new daemon measure the outage on the same scale."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def memfd_name(vm_id: str, slot: int) -> str:
    return f"{MEMFD_PREFIX}.{slot}.{vm_id}"


def parse_memfd_name(name: str) -> tuple[str, int] | None:
    """(vm id, slot) of a memfd name, None for any other name."""
    m = _MEMFD_NAME.match(name)
    return (m.group(2), int(m.group(1))) if m else None


@dataclass
class SavedForHandover:
    """One VM saved by the old daemon: the state's bytes and each slot's memfd (the VM's
    own fds: valid while the VM is open; dup them to keep them longer)."""

    vm_id: str
    data: bytes
    memfds: dict[str, int]  # name -> fd
    was_running: bool


def save_vm(vm: ManagedVm, run_states: dict[int, str], paused_ns: int) -> SavedForHandover:
    """The VM's state for a hand-over. Held paused by the caller (`run_states`: each vCPU's
    state before). Each slot of the VM's own memory goes as its memfd; files of the images
    directory by name (the same host, the same directory: the next daemon maps them again;
    writable ones were msync'ed by save_state)."""
    state = vm.save_state(run_states)
    file_slots = {f.slot for f in state.files if f.whole_slot}
    extras = pb.HandoverState(
        paused_boottime_ns=paused_ns, created_unix_ms=vm.created_unix_ms,
        discarded_bytes=vm.discarded_bytes_total, dirty_pages_total=vm.dirty_pages_total,
        last_snapshot_id=vm.last_snapshot_id, discard_credit_bytes=vm.discard_credits())
    memfds: dict[str, int] = {}
    for s in state.slots:
        if s.slot in file_slots:
            continue
        fd = vm.vm.memory_fd(s.slot)
        st = os.fstat(fd)
        name = memfd_name(vm.id, s.slot)
        memfds[name] = fd
        extras.memory_fds.add(slot=s.slot, name=name, size=st.st_size, device=st.st_dev,
                              inode=st.st_ino)
        if s.log_dirty:
            info = vm.vm.memory_region(s.slot)
            for consumer in DIRTY_CONSUMERS:
                if consumer == API or vm.dirty.has_consumer(consumer):
                    # peek: read without clearing, so a hand-over that fails loses nothing
                    bits = vm.dirty.peek(consumer, info)
                    if bits:
                        pages = s.size // PAGE_SIZE
                        extras.dirty.add(consumer=consumer, slot=s.slot,
                                         bitmap=bits.to_bytes((pages + 7) // 8, "little"))
    writer = SnapshotWriter()
    data = b"".join((
        writer.record(pb.SnapshotRecord(header=pb.SnapshotHeader(
            magic=HANDOVER_MAGIC, format_version=FORMAT_VERSION, kvmd_version=__version__,
            snapshot_id=uuid.uuid4().hex, created_unix_ms=int(time.time() * 1000),
            page_size=PAGE_SIZE, host=host_features(vm.shared.capabilities),
            handover=extras))),
        writer.record(pb.SnapshotRecord(vm=vm_state_to_pb(state))),
        writer.trailer()))
    was_running = any(s in (RUNNING, HALTED) for s in run_states.values())
    return SavedForHandover(vm.id, data, memfds, was_running)


@dataclass
class HandoverRecord:
    """A hand-over state read back and checked."""

    header: pb.SnapshotHeader
    state: VmState

    @property
    def extras(self) -> pb.HandoverState:
        return self.header.handover

    @property
    def was_running(self) -> bool:
        return any(v.run_state in (RUNNING, HALTED) for v in self.state.vcpus)

    @property
    def memfd_names(self) -> list[str]:
        return [m.name for m in self.extras.memory_fds]


def read_state(data: bytes | memoryview, vm_id: str = "") -> HandoverRecord:
    """Parse and verify a hand-over state (CorruptSnapshot: not intact or not one;
    InvalidState: a newer format); `vm_id`, when given, must be the VM's."""
    reader = SnapshotReader(HANDOVER_MAGIC)
    header: pb.SnapshotHeader | None = None
    saved: pb.SavedVm | None = None
    for record in reader.feed(data):
        if not isinstance(record, pb.SnapshotRecord):
            raise CorruptSnapshot("corrupt hand-over state: it holds guest memory")
        kind = record.WhichOneof("record")
        if kind == "header":
            header = record.header
        elif kind == "vm":
            saved = record.vm
        elif kind != "trailer":
            raise CorruptSnapshot(f"corrupt hand-over state: a {kind} record")
    reader.finish()
    if reader.snapshots != 1 or header is None or saved is None:
        raise CorruptSnapshot("corrupt hand-over state: not exactly one VM")
    state = vm_state_from_pb(saved)
    if vm_id and state.vm_id != vm_id:
        raise CorruptSnapshot(f"the hand-over state of {vm_id} holds vm {state.vm_id}")
    named = {m.slot for m in header.handover.memory_fds}
    named |= {f.slot for f in state.files if f.whole_slot}  # files: by name
    missing = [s.slot for s in state.slots if s.slot not in named]
    if missing:
        raise CorruptSnapshot(f"corrupt hand-over state: no memfd named for slots {missing}")
    return HandoverRecord(header, state)


def check_memfds(record: HandoverRecord, memfds: dict[str, int]) -> dict[int, int]:
    """{slot: fd} for the restore, once every slot's memfd is there and is the one saved
    (device, inode, size); InvalidState names the first that is not."""
    vm_id = record.state.vm_id
    sizes = {s.slot: s.size for s in record.state.slots}
    out: dict[int, int] = {}
    for m in record.extras.memory_fds:
        fd = memfds.get(m.name)
        if fd is None:
            raise InvalidState(f"vm {vm_id}: the memory of slot {m.slot} (memfd {m.name!r}) "
                               "was not passed to this daemon", resource=f"vm/{vm_id}",
                               reason=Reason.HANDOVER_STATE_UNUSABLE)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise InvalidState(f"vm {vm_id}: memfd {m.name!r} is not usable: {exc.strerror}",
                               resource=f"vm/{vm_id}",
                               reason=Reason.HANDOVER_STATE_UNUSABLE) from None
        if (st.st_dev, st.st_ino) != (m.device, m.inode):
            raise InvalidState(f"vm {vm_id}: the fd passed as {m.name!r} is another file "
                               f"(inode {st.st_ino}, saved {m.inode})", resource=f"vm/{vm_id}",
                               reason=Reason.HANDOVER_STATE_UNUSABLE)
        if st.st_size < max(m.size, sizes.get(m.slot, 0)):
            raise InvalidState(f"vm {vm_id}: memfd {m.name!r} has {st.st_size} bytes, the "
                               f"slot needs {sizes.get(m.slot, m.size)}",
                               resource=f"vm/{vm_id}", reason=Reason.HANDOVER_STATE_UNUSABLE)
        out[m.slot] = fd
    return out


def restore_vm(host: Host, record: HandoverRecord, memfds: dict[str, int],
               id_reserved: bool = False) -> ManagedVm:
    """Re-create the VM here: built out of sight, each slot mapped from its memfd (adopted:
    no copy; the VM keeps a dup, the caller keeps `memfds`), every object's state restored,
    the bookkeeping continued, vCPUs that had been started parked paused (see `resume`),
    then registered. On failure nothing is left but the caller's fds; `id_reserved`: the
    caller holds the id (and keeps holding it on failure)."""
    state = record.state
    check_host(record.header.host, state, host.capabilities())
    slots = check_memfds(record, memfds)
    try:
        options = VmOptions(**state.options)  # type: ignore[arg-type]
    except TypeError as exc:
        raise CorruptSnapshot(f"corrupt hand-over state: VM options {exc}") from None
    if not id_reserved:
        host.reserve_id(state.vm_id, state.owner)
    vm: ManagedVm | None = None
    try:
        vm = host.build_vm(state.vm_id, state.labels, options, state.owner)
        vm.restore_memory_layout(state.slots, slots, files=state.files,
                                 credits=dict(record.extras.discard_credit_bytes))
        vm.restore_state(state)
        _continue_bookkeeping(vm, record.extras)
        vm.resume_run_states(state, start=False)
        host.register(vm)
    except BaseException:
        if vm is not None:
            vm.close()
        if not id_reserved:
            host.release_id(state.vm_id)
        raise
    host.release_id(state.vm_id)
    return vm


def _continue_bookkeeping(vm: ManagedVm, extras: pb.HandoverState) -> None:
    if extras.created_unix_ms:
        vm.created_unix_ms = extras.created_unix_ms
    vm.discarded_bytes_total = extras.discarded_bytes
    vm.dirty.harvested_pages = extras.dirty_pages_total
    if extras.last_snapshot_id:
        vm.last_snapshot_id = extras.last_snapshot_id
        vm.last_snapshot_layout = vm.memory_layout()
        vm.dirty.add_consumer(SNAPSHOT)
    for bits in extras.dirty:
        if bits.consumer in DIRTY_CONSUMERS:
            vm.dirty.put_back(bits.consumer, bits.slot, int.from_bytes(bits.bitmap, "little"))


def resume(vm: ManagedVm, state: VmState) -> bool:
    """Put each restored vCPU back where it was: running ones run, halted ones (HLT without
    the in-kernel irqchip) wait for an interrupt again, paused ones stay paused. True if
    any vCPU runs again."""
    return vm.resume_saved_run_states(state)
