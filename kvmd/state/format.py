"""The snapshot byte format: records framed with a varint length, checksummed with XXH3-128.

    snapshot := header vm (memory | zero)* trailer
    stream   := snapshot+          (a full snapshot, then diffs on it)

Each record is a `SnapshotRecord` protobuf (proto/vmm.proto). The trailer carries the
XXH3-128 checksum of every byte of its snapshot before it, and the record and page counts,
so a truncated, reordered or bit-flipped snapshot is refused before anything it describes
is used. The same bytes go to a file, to a gRPC stream, or to another daemon.

Guest memory is the bulk of a snapshot, so its records avoid copies: a writer copies each
guest page once, straight into its frame; a reader hands out MemoryRecord views of the
bytes it was fed, which the caller copies once, into the guest. (XXH3 rather than SHA-256:
on these hosts SHA-256 alone took twice as long as sending the bytes; a checksum guards
against corruption, authenticity comes from where a snapshot is kept and from TLS.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import xxhash
from google.protobuf.message import DecodeError

from kvmd.core.errors import InvalidArgument, InvalidState, Reason
from kvmd.kvm import PAGE_SIZE
from kvmd_proto import vmm_pb2 as pb

MAGIC = "kvmd-snapshot"
FORMAT_VERSION = 1
# The state a daemon hands over to its successor (kvmd.state.handover): the same records
# without memory, which travels as memfds. Its own magic, so no snapshot reader (of this or
# an older daemon) ever takes it for a snapshot and restores a VM without its memory.
HANDOVER_MAGIC = "kvmd-handover"
# No record is larger: a corrupt length is refused before anything is buffered for it.
MAX_RECORD_BYTES = 64 << 20
# Guest memory per MemoryData record.
MEMORY_RECORD_BYTES = 1 << 20

_TAG_MEMORY = (3 << 3) | 2  # SnapshotRecord.memory, length-delimited
_TAG_SLOT = (1 << 3) | 0
_TAG_OFFSET = (2 << 3) | 0
_TAG_DATA = (3 << 3) | 2


class CorruptSnapshot(InvalidArgument):
    """The bytes are not a well-formed, intact kvmd snapshot."""

    default_reason = Reason.SNAPSHOT_CORRUPT


@dataclass(frozen=True)
class MemoryRecord:
    """A MemoryData record read in place: `data` views the bytes fed to the reader and is
    valid until the next feed (copy it, e.g. into the guest, before feeding more)."""

    slot: int
    offset: int
    data: memoryview

    def message(self) -> pb.SnapshotRecord:
        """The same record as a protobuf message (a copy: for tools and tests)."""
        return pb.SnapshotRecord(memory=pb.MemoryData(slot=self.slot, offset=self.offset,
                                                      data=bytes(self.data)))


def as_message(record: Record) -> pb.SnapshotRecord:
    """Any record as a protobuf message."""
    return record.message() if isinstance(record, MemoryRecord) else record


Record = pb.SnapshotRecord | MemoryRecord


def checksum() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int] | None:
    """(value, next position) of the varint at `pos`, or None if the buffer ends inside
    it; ValueError if it runs past 64 bits."""
    value = shift = 0
    while pos < len(buf):
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("a varint runs past 64 bits")
    return None


def _read_varint(buf: bytearray | memoryview, pos: int) -> tuple[int, int] | None:
    try:
        return read_varint(buf, pos)
    except ValueError:
        raise CorruptSnapshot("corrupt snapshot: a record length is not a varint") from None


class SnapshotWriter:
    """Frames the records of one snapshot and keeps its checksum and counts.

    `lead` (a gRPC stream's): given a frame's length, the bytes of the message that will
    carry that frame alone, which `memory_read` puts in front of each frame of guest pages
    as the pages are copied, so the frame is sent as it is, without being copied into its
    message (256 MiB of copies in a 256 MiB snapshot). The lead is not part of the
    snapshot: not checksummed, not counted. `last_message` is the latest such frame."""

    def __init__(self, lead: Callable[[int], bytes] | None = None) -> None:
        self._hash = checksum()
        self._lead = lead
        self.last_message: bytes | None = None
        self.last_lead = 0  # the length of last_message's lead
        self.records = 0
        self.memory_pages = 0
        self.size = 0

    def _frame(self, payload: bytes) -> bytes:
        frame = varint(len(payload)) + payload
        self._hash.update(frame)
        self.records += 1
        self.size += len(frame)
        return frame

    def record(self, record: pb.SnapshotRecord) -> bytes:
        kind = record.WhichOneof("record")
        if kind == "memory":
            self.memory_pages += len(record.memory.data) // PAGE_SIZE
        elif kind == "zero":
            self.memory_pages += record.zero.length // PAGE_SIZE
        return self._frame(record.SerializeToString())

    def memory(self, slot: int, offset: int, data: bytes) -> bytes:
        """A MemoryData record of `data`."""
        def copy(view: memoryview) -> None:
            view[:] = data
        return bytes(self.memory_filled(slot, offset, len(data), copy))

    @staticmethod
    def _memory_prefix(slot: int, offset: int, length: int) -> bytes:
        """The bytes of a MemoryData frame before its `length` bytes of data: encoded by
        hand so guest memory is copied once (protobuf readers parse it like any record)."""
        inner = (bytes([_TAG_SLOT]) + varint(slot) + bytes([_TAG_OFFSET]) + varint(offset)
                 + bytes([_TAG_DATA]) + varint(length))
        head = bytes([_TAG_MEMORY]) + varint(len(inner) + length) + inner
        return varint(len(head) + length) + head

    def memory_read(self, slot: int, offset: int, length: int,
                    read: Callable[[bytes], bytes]) -> bytes:
        """A MemoryData record of `length` bytes: `read(prefix)` returns the frame, the
        prefix followed by the data (e.g. Vm.read_joined: guest memory copied once); with a
        `lead`, the frame comes after it, in the one bytes object returned."""
        prefix = self._memory_prefix(slot, offset, length)
        lead = self._lead(len(prefix) + length) if self._lead is not None else b""
        frame = read(lead + prefix)
        if len(frame) != len(lead) + len(prefix) + length:
            raise ValueError(f"a memory frame of {len(frame) - len(lead)} bytes, not "
                             f"{len(prefix) + length}")
        self._hash.update(memoryview(frame)[len(lead):] if lead else frame)
        self.records += 1
        self.size += len(prefix) + length
        self.memory_pages += length // PAGE_SIZE
        if lead:
            self.last_message, self.last_lead = frame, len(lead)
        return frame

    def memory_filled(self, slot: int, offset: int, length: int,
                      fill: Callable[[memoryview], None]) -> bytearray:
        """A MemoryData record of `length` bytes that `fill` copies into the frame's data
        part."""
        prefix = self._memory_prefix(slot, offset, length)
        frame = bytearray(len(prefix) + length)
        frame[:len(prefix)] = prefix
        fill(memoryview(frame)[len(prefix):])
        self._hash.update(frame)
        self.records += 1
        self.size += len(frame)
        self.memory_pages += length // PAGE_SIZE
        return frame

    def zero(self, slot: int, offset: int, length: int) -> bytes:
        return self.record(pb.SnapshotRecord(zero=pb.MemoryZero(slot=slot, offset=offset,
                                                                length=length)))

    def trailer(self) -> bytes:
        """The last record; no record of this snapshot may follow."""
        record = pb.SnapshotRecord(trailer=pb.SnapshotTrailer(
            records=self.records, memory_pages=self.memory_pages,
            xxh3_128=self._hash.digest()))
        payload = record.SerializeToString()
        frame = varint(len(payload)) + payload
        self.size += len(frame)
        return frame


class SnapshotReader:
    """Parses a byte stream of snapshots incrementally, checking every record's place and
    each snapshot's trailer. `feed` returns the records that became complete (MemoryData
    as in-place MemoryRecord views); records of a snapshot whose trailer has not arrived yet
    may still be refused later, so a consumer must not make anything visible before
    `finish`."""

    def __init__(self, magic: str = MAGIC) -> None:
        self.magic = magic
        self._buf = bytearray()  # the start of a frame that did not arrive whole
        self._hash = checksum()
        self._expect = "header"  # header, vm, body (memory/zero/trailer)
        self._records = 0
        self._pages = 0
        self.snapshots = 0  # complete (trailer verified)
        self.bytes_read = 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[Record]:
        view = memoryview(data).cast("B")
        self.bytes_read += len(view)
        out: list[Record] = []
        if self._buf:  # only a frame cut by the previous feed is ever copied
            rest = self._complete(view, out)
            if rest is None:
                return out
            view = rest
        pos = 0
        while True:
            head = _read_varint(view, pos)
            if head is None:
                break
            length, start = head
            if length > MAX_RECORD_BYTES:
                raise CorruptSnapshot(f"corrupt snapshot: a record of {length} bytes (at most "
                                      f"{MAX_RECORD_BYTES})")
            end = start + length
            if end > len(view):
                break
            frame = view[pos:end]
            record = self._decode(view[start:end])
            self._check(record, frame)
            out.append(record)
            pos = end
        self._buf = bytearray(view[pos:])
        return out

    def _complete(self, view: memoryview, out: list[Record]) -> memoryview | None:
        """Complete the frame the previous feed cut, copying only its missing bytes from
        `view` (not the whole feed); the rest of `view`, or None when it ends first."""
        while True:
            head = _read_varint(self._buf, 0)
            if head is None:  # the cut is inside the length: take its next bytes
                take = min(len(view), 10)
                if not take:
                    return None
                self._buf += view[:take]
                view = view[take:]
                continue
            length, start = head
            if length > MAX_RECORD_BYTES:
                raise CorruptSnapshot(f"corrupt snapshot: a record of {length} bytes (at most "
                                      f"{MAX_RECORD_BYTES})")
            missing = start + length - len(self._buf)
            if missing > len(view):
                self._buf += view
                return None
            if missing > 0:
                self._buf += view[:missing]
            # the bytes taken for the length may reach past a very short frame
            excess = -missing if missing < 0 else 0
            frame = memoryview(self._buf)[:len(self._buf) - excess]
            rest = bytes(self._buf[len(frame):])
            self._buf = bytearray()  # `frame` keeps the old buffer alive for its record
            record = self._decode(frame[start:])
            self._check(record, frame)
            out.append(record)
            if missing >= 0:
                return view[missing:]
            self._buf = bytearray(rest)  # the start of the next frame: complete it too

    def _decode(self, payload: memoryview) -> Record:
        memory = _memory_in_place(payload)
        if memory is not None:
            return memory
        try:
            return pb.SnapshotRecord.FromString(payload)  # type: ignore[arg-type]
        except DecodeError as exc:
            raise CorruptSnapshot(f"corrupt snapshot: record {self._records + 1} does not "
                                  f"parse ({exc})") from None

    def _check(self, record: Record, frame: memoryview) -> None:
        kind = "memory" if isinstance(record, MemoryRecord) else record.WhichOneof("record")
        if kind == "trailer":
            assert isinstance(record, pb.SnapshotRecord)
            if self._expect != "body":
                raise CorruptSnapshot("corrupt snapshot: a trailer before the VM's state")
            t = record.trailer
            if (t.xxh3_128 != self._hash.digest() or t.records != self._records
                    or t.memory_pages != self._pages):
                raise CorruptSnapshot("corrupt snapshot: the checksum does not match its "
                                      "contents")
            self.snapshots += 1
            self._hash = checksum()
            self._records = self._pages = 0
            self._expect = "header"
            return
        wanted = {"header": ("header",), "vm": ("vm",), "body": ("memory", "zero")}
        if kind not in wanted[self._expect]:
            raise CorruptSnapshot(f"corrupt snapshot: a {kind or 'unknown'} record where a "
                                  f"{self._expect} record belongs")
        if isinstance(record, MemoryRecord):
            self._pages += len(record.data) // PAGE_SIZE
        elif kind == "header":
            check_header(record.header, self.magic)
            self._expect = "vm"
        elif kind == "vm":
            self._expect = "body"
        elif kind == "memory":
            self._pages += len(record.memory.data) // PAGE_SIZE
        else:
            self._pages += record.zero.length // PAGE_SIZE
        self._hash.update(frame)
        self._records += 1

    def finish(self) -> None:
        """The stream ended: it must end on a trailer."""
        if self._buf or self._expect != "header":
            raise CorruptSnapshot("truncated snapshot: the stream ended inside a snapshot")
        if not self.snapshots:
            raise CorruptSnapshot("empty snapshot stream")


def _memory_in_place(payload: memoryview) -> MemoryRecord | None:
    """A SnapshotRecord that is a MemoryData, read without copying its data; None for any
    other record, or an encoding this fast path does not expect (protobuf reads those)."""
    if len(payload) < 2 or payload[0] != _TAG_MEMORY:
        return None
    head = _read_varint(payload, 1)
    if head is None or head[0] + head[1] != len(payload):
        return None
    pos, end = head[1], len(payload)
    slot = offset = 0
    data: memoryview | None = None
    while pos < end:
        tag = payload[pos]
        field = _read_varint(payload, pos + 1)
        if field is None:
            return None
        value, pos = field
        if tag == _TAG_SLOT:
            slot = value
        elif tag == _TAG_OFFSET:
            offset = value
        elif tag == _TAG_DATA and pos + value <= end:
            data, pos = payload[pos:pos + value], pos + value
        else:
            return None
    if data is None or slot >= 1 << 32:
        return None
    return MemoryRecord(slot, offset, data)


def check_header(header: pb.SnapshotHeader, magic: str = MAGIC) -> None:
    """Refuse what this daemon cannot read, with a clear reason."""
    if header.magic != magic:
        if header.magic == HANDOVER_MAGIC:
            raise CorruptSnapshot("a daemon hand-over state, not a snapshot: its guest memory "
                                  "is not in it (it travels as memfds)")
        raise CorruptSnapshot("not a kvmd snapshot (bad magic)")
    if header.format_version > FORMAT_VERSION:
        raise InvalidState(f"the snapshot has format version {header.format_version} (written "
                           f"by kvmd {header.kvmd_version}); this daemon reads version "
                           f"{FORMAT_VERSION}", reason=Reason.SNAPSHOT_INCOMPATIBLE)
    if header.format_version < 1:
        raise CorruptSnapshot(f"corrupt snapshot: format version {header.format_version}")
    if header.page_size != PAGE_SIZE:
        raise InvalidState(f"the snapshot has {header.page_size}-byte pages; this host has "
                           f"{PAGE_SIZE}", reason=Reason.SNAPSHOT_INCOMPATIBLE)
