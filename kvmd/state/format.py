"""The snapshot byte format: records framed with a varint length, checksummed with SHA-256.

    snapshot := header vm (memory | zero)* trailer
    stream   := snapshot+          (a full snapshot, then diffs on it)

Each record is a `SnapshotRecord` protobuf (proto/vmm.proto). The trailer carries the
SHA-256 of every byte of its snapshot before it, and the record and page counts, so a
truncated, reordered or bit-flipped snapshot is refused before anything it describes is
used. The same bytes go to a file, to a gRPC stream, or to another daemon.
"""

from __future__ import annotations

import hashlib

from google.protobuf.message import DecodeError

from kvmd.api.gen import vmm_pb2 as pb
from kvmd.core.errors import InvalidArgument, InvalidState
from kvmd.kvm import PAGE_SIZE

MAGIC = "kvmd-snapshot"
FORMAT_VERSION = 1
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


def _read_varint(buf: bytearray | memoryview, pos: int) -> tuple[int, int] | None:
    """(value, next position), or None if the buffer ends inside the varint."""
    value = shift = 0
    while pos < len(buf):
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise CorruptSnapshot("corrupt snapshot: a record length is not a varint")
    return None


class SnapshotWriter:
    """Frames the records of one snapshot and keeps its checksum and counts."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
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
        return self._frame(record.SerializeToString())

    def memory(self, slot: int, offset: int, data: bytes) -> bytes:
        """A MemoryData record, encoded by hand: guest memory is the bulk of a snapshot
        and this costs one copy of it (protobuf readers parse it like any record)."""
        inner = (bytes([_TAG_SLOT]) + varint(slot) + bytes([_TAG_OFFSET]) + varint(offset)
                 + bytes([_TAG_DATA]) + varint(len(data)))
        head = bytes([_TAG_MEMORY]) + varint(len(inner) + len(data)) + inner
        length = len(head) + len(data)
        frame = b"".join((varint(length), head, data))
        self._hash.update(frame)
        self.records += 1
        self.size += len(frame)
        self.memory_pages += len(data) // PAGE_SIZE
        return frame

    def zero(self, slot: int, offset: int, length: int) -> bytes:
        self.memory_pages += length // PAGE_SIZE
        return self.record(pb.SnapshotRecord(zero=pb.MemoryZero(slot=slot, offset=offset,
                                                                length=length)))

    def trailer(self) -> bytes:
        """The last record; no record of this snapshot may follow."""
        record = pb.SnapshotRecord(trailer=pb.SnapshotTrailer(
            records=self.records, memory_pages=self.memory_pages,
            sha256=self._hash.digest()))
        payload = record.SerializeToString()
        frame = varint(len(payload)) + payload
        self.size += len(frame)
        return frame


class SnapshotReader:
    """Parses a byte stream of snapshots incrementally, checking every record's place and
    each snapshot's trailer. `feed` returns the records that became complete; records of a
    snapshot whose trailer has not arrived yet may still be refused later, so a consumer
    must not make anything visible before `finish`."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._hash = hashlib.sha256()
        self._expect = "header"  # header, vm, body (memory/zero/trailer)
        self._records = 0
        self._pages = 0
        self.snapshots = 0  # complete (trailer verified)
        self.bytes_read = 0

    def feed(self, data: bytes | memoryview) -> list[pb.SnapshotRecord]:
        self._buf += data
        self.bytes_read += len(data)
        out: list[pb.SnapshotRecord] = []
        pos = 0
        while True:
            head = _read_varint(self._buf, pos)
            if head is None:
                break
            length, start = head
            if length > MAX_RECORD_BYTES:
                raise CorruptSnapshot(f"corrupt snapshot: a record of {length} bytes (at most "
                                      f"{MAX_RECORD_BYTES})")
            end = start + length
            if end > len(self._buf):
                break
            frame = memoryview(self._buf)[pos:end]
            try:
                record = pb.SnapshotRecord.FromString(frame[start - pos:])  # type: ignore[arg-type]
            except DecodeError as exc:
                raise CorruptSnapshot(f"corrupt snapshot: record {self._records + 1} does not "
                                      f"parse ({exc})") from None
            self._check(record, frame)
            frame.release()
            out.append(record)
            pos = end
        del self._buf[:pos]
        return out

    def _check(self, record: pb.SnapshotRecord, frame: memoryview) -> None:
        kind = record.WhichOneof("record")
        if kind == "trailer":
            if self._expect != "body":
                raise CorruptSnapshot("corrupt snapshot: a trailer before the VM's state")
            t = record.trailer
            if (t.sha256 != self._hash.digest() or t.records != self._records
                    or t.memory_pages != self._pages):
                raise CorruptSnapshot("corrupt snapshot: the checksum does not match its "
                                      "contents")
            self.snapshots += 1
            self._hash = hashlib.sha256()
            self._records = self._pages = 0
            self._expect = "header"
            return
        wanted = {"header": ("header",), "vm": ("vm",), "body": ("memory", "zero")}
        if kind not in wanted[self._expect]:
            raise CorruptSnapshot(f"corrupt snapshot: a {kind or 'unknown'} record where a "
                                  f"{self._expect} record belongs")
        if kind == "header":
            check_header(record.header)
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


def check_header(header: pb.SnapshotHeader) -> None:
    """Refuse what this daemon cannot read, with a clear reason."""
    if header.magic != MAGIC:
        raise CorruptSnapshot("not a kvmd snapshot (bad magic)")
    if header.format_version > FORMAT_VERSION:
        raise InvalidState(f"the snapshot has format version {header.format_version} (written "
                           f"by kvmd {header.kvmd_version}); this daemon reads version "
                           f"{FORMAT_VERSION}")
    if header.format_version < 1:
        raise CorruptSnapshot(f"corrupt snapshot: format version {header.format_version}")
    if header.page_size != PAGE_SIZE:
        raise InvalidState(f"the snapshot has {header.page_size}-byte pages; this host has "
                           f"{PAGE_SIZE}")
