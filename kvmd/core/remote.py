"""Remote exit handling: clients claim PIO/MMIO ranges and answer the guest's accesses.

A vCPU thread that hits a claimed range hands a RemoteExit to the claiming handler and
waits, at most the claim's deadline, for the reply. A handler that misses a deadline or
disconnects is closed: its claims are released and every exit waiting on it continues as
an unclaimed access. A vCPU is never left waiting on a handler that is gone.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from kvmd.core.events import Mailbox
from kvmd.kvm import IoSpace

DEFAULT_DEADLINE_MS = 1000
MAX_DEADLINE_MS = 60_000
# A claim names at most this many ranges, and a VM holds at most MAX_CLAIMED_RANGES: every
# check is O(log n) per range, so a claim costs microseconds, never a core for minutes.
MAX_RANGES_PER_CLAIM = 1024
MAX_CLAIMED_RANGES = 16384
_exit_ids = itertools.count(1)
_handler_ids = itertools.count(1)


@dataclass(frozen=True)
class ClaimRange:
    """A claimed range of port or MMIO addresses."""

    space: IoSpace
    base: int
    length: int

    @property
    def end(self) -> int:
        return self.base + self.length

    def contains(self, space: IoSpace, address: int) -> bool:
        return space == self.space and self.base <= address < self.end

    def overlaps(self, other: ClaimRange) -> bool:
        return self.space == other.space and self.base < other.end and other.base < self.end


@dataclass
class RemoteExit:
    """One guest access waiting for a remote answer."""

    vcpu_id: int
    space: IoSpace
    address: int
    size: int  # bytes per access
    is_write: bool
    data: bytes
    count: int = 1  # accesses of a string instruction (rep ins/outs): data is size*count
    id: int = field(default_factory=lambda: next(_exit_ids))
    done: threading.Event = field(default_factory=threading.Event)
    reply: bytes | None = None
    abandoned: bool = False  # the vCPU stopped waiting (it is being stopped)


class HandlerClose(StrEnum):
    """Why a HandleExits handler ended: what the API layer picks a status code by. Its
    close_reason is the text (the cause, with details where there are any)."""

    BAD_REPLY = "bad reply"  # the client sent something other than a valid reply
    DEADLINE = "missed deadline"  # an exit waited longer than the handler's deadline
    CLIENT_CLOSED = "client closed its side"
    CLIENT_GONE = "client went away"  # its request stream broke
    STREAM_ENDED = "stream ended"  # the server side of the stream ended
    VM_DELETED = "vm deleted"


class RemoteHandler:
    """One HandleExits stream: its claims, the exits sent to it, and their replies."""

    def __init__(self, vm_id: str, ranges: list[ClaimRange], deadline_ms: int,
                 observe_wait: Callable[[float], None] | None = None) -> None:
        self.id = f"h{next(_handler_ids)}"
        self.vm_id = vm_id
        self.ranges = ranges
        self.deadline = deadline_ms / 1000.0
        # Exits for the client; unbounded, but each waiting vCPU adds at most one.
        self.outbound: Mailbox[RemoteExit] = Mailbox()
        self._pending: dict[int, RemoteExit] = {}
        self._abandoned: set[int] = set()
        self._lock = threading.Lock()
        self.closed = False
        self.close_reason = ""
        self.close_cause: HandlerClose | None = None  # set with close_reason, first wins
        self._observe_wait = observe_wait
        # Set by the VM: releases this handler's claims when it closes, however it closes.
        self.on_close: Callable[[], None] | None = None

    def submit(self, exit_: RemoteExit) -> bytes | None:
        """Called by a vCPU thread: send the exit, wait for the reply or the deadline.
        Returns the reply (empty for writes) or None when the handler failed."""
        with self._lock:
            if self.closed:
                return None
            self._pending[exit_.id] = exit_
        started = time.monotonic()
        self.outbound.put(exit_)
        answered = exit_.done.wait(self.deadline)
        elapsed = time.monotonic() - started
        if self._observe_wait is not None:
            self._observe_wait(elapsed)
        with self._lock:
            self._pending.pop(exit_.id, None)
        if exit_.abandoned:
            return None
        if not answered:
            self.close(HandlerClose.DEADLINE,
                       f"missed the {int(self.deadline * 1000)} ms deadline")
        return exit_.reply

    def abandon(self, exit_: RemoteExit) -> None:
        """Stop waiting for this exit (its vCPU is being stopped); a late reply to it is
        ignored rather than treated as a protocol error."""
        with self._lock:
            if self._pending.pop(exit_.id, None) is None:
                return
            self._abandoned.add(exit_.id)
            exit_.abandoned = True
        exit_.done.set()

    def answer(self, exit_id: int, data: bytes) -> str | None:
        """Called for a client reply; returns an error message for a bad reply."""
        with self._lock:
            exit_ = self._pending.get(exit_id)
            if exit_ is None and exit_id in self._abandoned:
                self._abandoned.discard(exit_id)
                return None
        if exit_ is None:
            return f"no exit {exit_id} is waiting for a reply"
        want = exit_.size * exit_.count
        if not exit_.is_write and len(data) != want:
            return f"exit {exit_id} reads {want} bytes; the reply has {len(data)}"
        exit_.reply = data if not exit_.is_write else b""
        exit_.done.set()
        return None

    def fail(self, cause: HandlerClose, reason: str = "") -> None:
        """Record why the handler ends and end its outbound stream without taking any lock
        but its own (safe from an event loop); whoever serves the stream then calls the
        VM's release_handler, which closes the handler and frees its claims."""
        with self._lock:
            if self.close_cause is None:
                self.close_cause, self.close_reason = cause, reason or cause.value
        self.outbound.end()

    def close(self, cause: HandlerClose, reason: str = "") -> None:
        """Fail every pending exit (they continue as unclaimed) and end the stream."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.close_cause is None:
                self.close_cause, self.close_reason = cause, reason or cause.value
            pending, self._pending = list(self._pending.values()), {}
        if self.on_close is not None:
            self.on_close()
        for exit_ in pending:
            exit_.done.set()
        self.outbound.end()


class ClaimConflict(Exception):
    """A claim cannot be added: `reason` says why (overlapping itself, or too many ranges);
    `clash` is the existing claimed range it overlaps, if that is the reason."""

    def __init__(self, reason: str, clash: ClaimRange | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.clash = clash


class ClaimTable:
    """The claims of one VM: per address space, disjoint ranges sorted by base, so a lookup
    (on every claimed exit) and each overlap check is a binary search."""

    def __init__(self) -> None:
        self._bases: dict[IoSpace, list[int]] = {IoSpace.PIO: [], IoSpace.MMIO: []}
        self._entries: dict[IoSpace, list[tuple[ClaimRange, RemoteHandler]]] = {
            IoSpace.PIO: [], IoSpace.MMIO: []}
        self._lock = threading.Lock()

    @staticmethod
    def check_disjoint(ranges: list[ClaimRange]) -> None:
        """Raise ClaimConflict if the ranges of one claim overlap each other."""
        if len(ranges) > MAX_RANGES_PER_CLAIM:
            raise ClaimConflict(f"a claim may name at most {MAX_RANGES_PER_CLAIM} ranges, not "
                                f"{len(ranges)}")
        ordered = sorted(ranges, key=lambda r: (r.space.value, r.base))
        for a, b in itertools.pairwise(ordered):
            if a.overlaps(b):
                raise ClaimConflict("the claimed ranges overlap each other")

    def _clash(self, wanted: ClaimRange) -> ClaimRange | None:
        bases, entries = self._bases[wanted.space], self._entries[wanted.space]
        i = bisect.bisect_left(bases, wanted.end)  # entries from i on start at/after its end
        if i > 0 and entries[i - 1][0].end > wanted.base:
            return entries[i - 1][0]
        return None

    def overlapping(self, wanted: ClaimRange) -> ClaimRange | None:
        """The claimed range `wanted` overlaps, if any."""
        with self._lock:
            return self._clash(wanted)

    def add(self, handler: RemoteHandler) -> ClaimRange | None:
        """Add all of the handler's ranges, or none: returns the first conflicting range.
        Raises ClaimConflict for a claim that overlaps itself or exceeds the limits."""
        self.check_disjoint(handler.ranges)
        with self._lock:
            held = sum(len(e) for e in self._entries.values())
            if held + len(handler.ranges) > MAX_CLAIMED_RANGES:
                raise ClaimConflict(f"the VM would hold more than {MAX_CLAIMED_RANGES} "
                                    "claimed ranges")
            for wanted in handler.ranges:
                clash = self._clash(wanted)
                if clash is not None:
                    return clash
            for r in handler.ranges:
                i = bisect.bisect_left(self._bases[r.space], r.base)
                self._bases[r.space].insert(i, r.base)
                self._entries[r.space].insert(i, (r, handler))
        return None

    def remove(self, handler: RemoteHandler) -> list[ClaimRange]:
        with self._lock:
            mine: list[ClaimRange] = []
            for space, entries in self._entries.items():
                keep = [(r, h) for r, h in entries if h is not handler]
                mine += [r for r, h in entries if h is handler]
                self._entries[space] = keep
                self._bases[space] = [r.base for r, _h in keep]
        return mine

    def find(self, space: IoSpace, address: int) -> RemoteHandler | None:
        with self._lock:
            i = bisect.bisect_right(self._bases[space], address) - 1
            if i >= 0:
                claim, handler = self._entries[space][i]
                if address < claim.end:
                    return handler
        return None

    def handlers(self) -> list[RemoteHandler]:
        with self._lock:
            found = {id(h): h for entries in self._entries.values() for _r, h in entries}
        return list(found.values())
