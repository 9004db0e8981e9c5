"""Conversions between the API's proto messages and the core's objects. The binding's
register files, CPUID and routes convert in kvmd.state.codec (shared with snapshots)."""

from __future__ import annotations

import base64
from array import array
from collections.abc import Iterator

from kvmd.core.errors import InvalidArgument, Reason
from kvmd.core.images import FileBackedRange, MemoryFile
from kvmd.core.vcpu import ManagedVcpu
from kvmd.core.vm import IoeventEntry, IrqfdEntry, ManagedVm, VmEvent, VmOptions
from kvmd.kvm import (
    DirtyLogModes,
    IoSpace,
    MemoryRegionInfo,
    bitmap_popcount,
    bitmap_runs,
    bitmap_runs_packed,
    max_u64,
    pack_varints,
)
from kvmd.state.codec import (
    cpuid_from_pb,
    cpuid_to_pb,
    events_from_pb,
    events_to_pb,
    fpu_from_pb,
    fpu_to_pb,
    regs_from_pb,
    regs_to_pb,
    route_from_pb,
    sregs_from_pb,
    sregs_to_pb,
)
from kvmd.state.format import varint
from kvmd_proto import vmm_pb2 as pb


def region_to_pb(r: MemoryRegionInfo, files: list[FileBackedRange] | None = None,
                 allocated_bytes: int = 0) -> pb.MemoryRegion:
    msg = pb.MemoryRegion(slot=r.slot, guest_addr=r.guest_addr, size=r.size,
                          read_only=r.read_only, log_dirty=r.log_dirty,
                          allocated_bytes=allocated_bytes)
    for f in files or []:
        if f.whole_slot:
            msg.file.CopyFrom(memory_file_to_pb(f.memory_file))
        else:
            msg.mappings.append(file_mapping_to_pb(f))
    return msg


def vm_region_to_pb(vm: ManagedVm, r: MemoryRegionInfo) -> pb.MemoryRegion:
    """A slot of `vm` with its files and the host memory it holds now."""
    return region_to_pb(r, vm.region_files(r.slot), vm.slot_allocated_bytes(r.slot))


def memory_file_to_pb(f: MemoryFile) -> pb.MemoryFile:
    return pb.MemoryFile(name=f.name, offset=f.offset, read_only=f.read_only)


def memory_file_from_pb(msg: pb.MemoryFile) -> MemoryFile:
    return MemoryFile(msg.name, msg.offset, msg.read_only)


def file_mapping_to_pb(f: FileBackedRange) -> pb.GuestFileMapping:
    return pb.GuestFileMapping(slot=f.slot, offset=f.offset, size=f.size,
                               guest_addr=f.guest_addr, file=memory_file_to_pb(f.memory_file))


def vm_options_from_pb(o: pb.VmOptions) -> VmOptions:
    return VmOptions(irqchip=o.irqchip, pit=o.pit, tss_address=o.tss_address,
                     identity_map_address=o.identity_map_address,
                     debug_exit_port=o.debug_exit_port, strict_io=o.strict_io,
                     console_buffer_bytes=o.console_buffer_bytes,
                     dirty_tracking=o.dirty_tracking, dirty_ring_bytes=o.dirty_ring_bytes)


def vm_to_pb(vm: ManagedVm) -> pb.Vm:
    regions = vm.memory_regions()
    o = vm.options
    vcpus = vm.vcpus()
    msg = pb.Vm(
        vm_id=vm.id, labels=vm.labels, state=vm.state, reason=vm.reason,
        options=pb.VmOptions(irqchip=o.irqchip, pit=o.pit, tss_address=o.tss_address,
                             identity_map_address=o.identity_map_address,
                             debug_exit_port=vm.debug_exit.base, strict_io=o.strict_io,
                             console_buffer_bytes=vm.console.capacity,
                             dirty_tracking=vm.dirty.mode,
                             dirty_ring_bytes=vm.vm.dirty_ring_bytes),
        vcpu_count=len(vcpus), memory_slot_count=len(regions),
        memory_bytes=sum(r.size for r in regions), created_unix_ms=vm.created_unix_ms,
        owner=vm.owner, vcpu_states={v.id: v.state for v in vcpus},
        dirty_pages_per_second=vm.dirty.rate, dirty_rate_unix_ms=vm.dirty.rate_unix_ms,
        discarded_bytes=vm.discarded_bytes_total,
        memory_allocated_bytes=vm.memory_allocated_bytes(), migrating_to=vm.migrating_to)
    if vm.exit_code is not None:
        msg.exit_code = vm.exit_code
    return msg


def vcpu_to_pb(v: ManagedVcpu) -> pb.Vcpu:
    return pb.Vcpu(vm_id=v.vm_id, vcpu_id=v.id, state=v.state, reason=v.reason,
                   cpu_seconds=v.cpu_seconds())


def event_to_pb(vm_id: str, e: VmEvent, with_regs: bool = True) -> pb.VmEvent:
    """A VmEvent; `with_regs` False leaves a crash's registers out (guest data)."""
    msg = pb.VmEvent(vm_id=vm_id, type=e.type, vcpu_id=e.vcpu_id, state=e.state,
                     reason=e.reason, unix_ms=e.unix_ms)
    if e.exit_code is not None:
        msg.exit_code = e.exit_code
    if e.regs is not None and with_regs:
        msg.regs.CopyFrom(regs_to_pb(e.regs))
    return msg


def irqfd_to_pb(vm_id: str, e: IrqfdEntry) -> pb.Irqfd:
    return pb.Irqfd(vm_id=vm_id, irqfd_id=e.irqfd_id, gsi=e.gsi,
                    resample=e.resample is not None, triggers=e.triggers, resamples=e.resamples)


SPACES = {pb.PIO: IoSpace.PIO, pb.MMIO: IoSpace.MMIO}
SPACES_PB = {v: k for k, v in SPACES.items()}


def ioevent_to_pb(vm_id: str, e: IoeventEntry) -> pb.Ioevent:
    msg = pb.Ioevent(vm_id=vm_id, ioevent_id=e.ioevent_id, space=SPACES_PB[e.space],
                     address=e.address, length=e.length, fired=e.fired)
    if e.datamatch is not None:
        msg.datamatch = e.datamatch
    return msg


def dirty_modes_to_pb(m: DirtyLogModes) -> pb.DirtyLogModes:
    return pb.DirtyLogModes(bitmap=m.bitmap, manual_protect=m.manual_protect,
                            initially_set=m.initially_set, ring_max_bytes=m.ring_max_bytes,
                            ring_acq_rel=m.ring_acq_rel)


_TOKEN_PREFIX = "after:"


def page_token(last_id: str) -> str:
    """An opaque page token: the listing resumes after this id."""
    return base64.urlsafe_b64encode((_TOKEN_PREFIX + last_id).encode()).decode()


def page_token_id(token: str) -> str:
    """The id a page token resumes after ("" for the first page); INVALID_ARGUMENT for a
    token this daemon did not make."""
    if not token:
        return ""
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        text = ""
    if not text.startswith(_TOKEN_PREFIX):
        raise InvalidArgument("page_token is not one this daemon gave",
                              reason=Reason.PAGE_TOKEN_INVALID, field="page_token")
    return text[len(_TOKEN_PREFIX):]


def _varint_len(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def page_run_chunks(bitmap: bytes, limit: int) -> list[tuple[array[int], array[int]]]:
    """The dirty pages as runs (first pages, page counts), in parts of at most about
    `limit` bytes each."""
    firsts, counts = bitmap_runs(bitmap)
    # Packed varints: the first pages grow, so sizing by the largest is close and safe.
    per_run = _varint_len(firsts[-1] if firsts else 0) + _varint_len(max_u64(counts))
    step = max(1, limit // per_run)
    return [(firsts[i:i + step], counts[i:i + step])
            for i in range(0, len(firsts), step)] or [(firsts, counts)]


def _length_delimited(number: int, body: bytes) -> bytes:
    """A length-delimited field on the wire: a packed repeated field, or a sub-message;
    nothing when empty, as protobuf writes an empty packed field (no sub-message written
    here is empty)."""
    return varint(number << 3 | 2) + varint(len(body)) + body if body else b""


def dirty_runs_chunk(slot: int, total_pages: int, firsts: array[int], counts: array[int],
                     total_before: int, last: bool) -> tuple[bytes, int]:
    """A DirtyLogChunk of runs, serialized, and the pages its runs cover. The packed fields
    are encoded in C and appended to the serialized scalar fields (protobuf's own field
    order): no Python int per run and no parse (extending the repeated fields from arrays
    cost more than the rest of a GetDirtyLog). `total_before`: dirty pages of the chunks
    before it."""
    packed_firsts, _ = pack_varints(firsts)
    packed_counts, pages = pack_varints(counts)
    return _runs_chunk(slot, total_pages, packed_firsts, packed_counts, pages, total_before,
                       last), pages


# A packed field's tag and length take at most this many bytes.
_RUNS_FIELD_HEAD = 11


def _runs_chunk(slot: int, total_pages: int, packed_firsts: bytes, packed_counts: bytes,
                pages: int, total_before: int, last: bool) -> bytes:
    head = pb.DirtyLogChunk(slot=slot, total_pages=total_pages, last=last, dirty_pages=pages,
                            total_dirty_pages=total_before + pages if last else 0)
    return (head.SerializeToString()
            + _length_delimited(pb.DirtyLogChunk.RUN_FIRST_PAGES_FIELD_NUMBER, packed_firsts)
            + _length_delimited(pb.DirtyLogChunk.RUN_PAGES_FIELD_NUMBER, packed_counts))


def dirty_log_answer_bound(pages: int, form: int) -> int:
    """The most bytes a whole-slot DirtyLogChunk of `pages` pages can take in `form`: the
    bitmap (AUTO never chooses runs longer than it), or with RANGES forced the worst case,
    a one-page run at every other page. Known before the log is read."""
    bitmap = (pages + 7) // 8
    if form != pb.GetDirtyLogRequest.RANGES:
        return bitmap + 64
    runs = (pages + 1) // 2
    return runs * (_varint_len(pages) + 1) + 64


def shorter_runs(bitmap: bytes) -> tuple[bytes, bytes, int] | None:
    """AUTO's one rule, for GetDirtyLog and PollDirtyLog alike: the dirty pages as packed
    runs (first pages, page counts, pages covered) when both fields take fewer bytes than
    the bitmap, by their exact sizes; None to send the bitmap. Packed in one pass in C,
    given up as soon as the runs pass the bitmap's size."""
    runs = bitmap_runs_packed(bitmap, len(bitmap))
    if runs is None or len(runs[0]) + len(runs[1]) + 2 * _RUNS_FIELD_HEAD >= len(bitmap):
        return None
    return runs


def whole_dirty_log(slot: int, bitmap: bytes, total_pages: int, form: int) -> bytes:
    """A serialized PollDirtyLogResponse: the slot's whole log as one DirtyLogChunk
    (first_page 0, last), as runs when `form` is RANGES, or AUTO and they are shorter
    (shorter_runs); as the bitmap otherwise."""
    runs = None
    if form == pb.GetDirtyLogRequest.AUTO:
        runs = shorter_runs(bitmap)
    elif form == pb.GetDirtyLogRequest.RANGES:
        runs = bitmap_runs_packed(bitmap, dirty_log_answer_bound(total_pages, form))
    if runs is None:
        chunk, _ = _bitmap_chunk(slot, bitmap, 0, total_pages, 0, True)
    else:
        packed_firsts, packed_counts, pages = runs
        chunk = _runs_chunk(slot, total_pages, packed_firsts, packed_counts, pages, 0, True)
    return _length_delimited(pb.PollDirtyLogResponse.LOG_FIELD_NUMBER, chunk)


def _bitmap_chunk(slot: int, piece: bytes, first_page: int, total_pages: int,
                  total_before: int, last: bool) -> tuple[bytes, int]:
    """A DirtyLogChunk of bitmap, serialized, and the pages it marks dirty."""
    dirty = bitmap_popcount(piece)
    return pb.DirtyLogChunk(slot=slot, first_page=first_page, bitmap=piece, dirty_pages=dirty,
                            total_pages=total_pages, last=last,
                            total_dirty_pages=total_before + dirty if last else 0
                            ).SerializeToString(), dirty


def dirty_log_chunks(slot: int, bitmap: bytes, total_pages: int, form: int,
                     chunk_bytes: int) -> Iterator[bytes]:
    """GetDirtyLog's answer, serialized: DirtyLogChunks of at most about `chunk_bytes` of
    bitmap or runs each, the form chosen as PollDirtyLog chooses it (AUTO: shorter_runs),
    so the two RPCs answer one log alike."""
    if form == pb.GetDirtyLogRequest.AUTO:
        runs = shorter_runs(bitmap)
        if runs is None:
            yield from _bitmap_chunks(slot, bitmap, total_pages, chunk_bytes)
            return
        packed_firsts, packed_counts, pages = runs
        if len(packed_firsts) + len(packed_counts) <= chunk_bytes:  # the usual case
            yield _runs_chunk(slot, total_pages, packed_firsts, packed_counts, pages, 0, True)
            return
    elif form == pb.GetDirtyLogRequest.BITMAP:
        yield from _bitmap_chunks(slot, bitmap, total_pages, chunk_bytes)
        return
    # Runs in several chunks (or RANGES, whose runs may pass the bitmap's size): split
    # from arrays, as many runs to a chunk as fit.
    parts = page_run_chunks(bitmap, chunk_bytes)
    total = 0
    for i, (firsts, counts) in enumerate(parts):
        wire, dirty = dirty_runs_chunk(slot, total_pages, firsts, counts, total,
                                       i == len(parts) - 1)
        total += dirty
        yield wire


def _bitmap_chunks(slot: int, bitmap: bytes, total_pages: int,
                   chunk_bytes: int) -> Iterator[bytes]:
    total = 0
    offsets = range(0, len(bitmap), chunk_bytes)
    for i, off in enumerate(offsets):
        wire, dirty = _bitmap_chunk(slot, bitmap[off:off + chunk_bytes], off * 8, total_pages,
                                    total, i == len(offsets) - 1)
        total += dirty
        yield wire


__all__ = [
    "SPACES",
    "SPACES_PB",
    "cpuid_from_pb",
    "cpuid_to_pb",
    "dirty_log_answer_bound",
    "dirty_log_chunks",
    "dirty_modes_to_pb",
    "dirty_runs_chunk",
    "event_to_pb",
    "events_from_pb",
    "events_to_pb",
    "fpu_from_pb",
    "fpu_to_pb",
    "ioevent_to_pb",
    "irqfd_to_pb",
    "page_run_chunks",
    "page_token",
    "page_token_id",
    "region_to_pb",
    "regs_from_pb",
    "regs_to_pb",
    "route_from_pb",
    "shorter_runs",
    "sregs_from_pb",
    "sregs_to_pb",
    "vcpu_to_pb",
    "vm_options_from_pb",
    "vm_to_pb",
    "whole_dirty_log",
]
