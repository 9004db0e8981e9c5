"""The target's side of a live migration: one-time tokens, and the VM built out of sight.

`prepare` reserves the VM id for the orchestrator (the migrated VM will be its VM) and
returns a random token; the source daemon presents it on its stream (`claim`), which spends
it. The VM is built by a `Restorer` as the bytes arrive and stays invisible until the
source says commit; a stream that ends any other way releases everything. A token nobody
uses expires and frees the id.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum

from kvmd.core.errors import (
    Aborted,
    InvalidArgument,
    InvalidState,
    PermissionDenied,
    Reason,
    ResourceExhausted,
    limit,
)
from kvmd.core.host import Host
from kvmd.core.vm import ManagedVm
from kvmd.state.format import FORMAT_VERSION
from kvmd.state.snapshot import Restorer, RunMode

log = logging.getLogger(__name__)

DEFAULT_TTL_SECONDS = 300
MAX_TTL_SECONDS = 3600
MAX_PENDING = 64  # prepared, not yet used tokens


class IncomingState(StrEnum):
    """Where an incoming migration is (ListMigrations shows the value)."""

    PREPARED = "prepared"
    RECEIVING = "receiving"
    READY = "ready"
    COMMITTED = "committed"
    ABORTED = "aborted"


PREPARED, RECEIVING, READY, COMMITTED, ABORTED = (
    IncomingState.PREPARED, IncomingState.RECEIVING, IncomingState.READY,
    IncomingState.COMMITTED, IncomingState.ABORTED)


@dataclass
class IncomingMigration:
    """One expected VM: its reserved id, its owner and token; then its restore."""

    vm_id: str
    owner: str
    owner_quota: int
    token: str
    expires_unix_ms: int
    host: Host
    state: IncomingState = PREPARED
    peer: str = ""
    source_vm_id: str = ""
    restorer: Restorer | None = None
    timer: threading.Timer | None = field(default=None, repr=False)
    cancelled: bool = False  # CancelMigration on this side: the stream ends at its next message

    def begin(self, source_vm_id: str, format_version: int) -> None:
        """The source presented the token: start building the VM."""
        if format_version > FORMAT_VERSION:
            raise InvalidState(f"the source sends snapshot format {format_version}; this "
                               f"daemon reads version {FORMAT_VERSION}",
                               reason=Reason.SNAPSHOT_INCOMPATIBLE)
        self.source_vm_id = source_vm_id
        self.restorer = Restorer(self.host, self.vm_id, self.owner, self.owner_quota,
                                 run=RunMode.AS_SAVED, kind="migration_in", reserved=True)
        self.state = RECEIVING

    def check_cancelled(self) -> None:
        if self.cancelled:
            raise Aborted(f"the incoming migration of vm {self.vm_id} was cancelled on the "
                          "target", reason=Reason.MIGRATION_CANCELLED)

    def feed(self, data: bytes | memoryview) -> None:
        if self.state != RECEIVING or self.restorer is None:
            raise InvalidArgument(f"migration data after {self.state}",
                                  reason=Reason.STREAM_INVALID)
        self.restorer.feed(data)

    def finish(self) -> None:
        """The final snapshot arrived: build the VM from it (not visible yet)."""
        if self.state != RECEIVING or self.restorer is None:
            raise InvalidArgument(f"migration finish after {self.state}",
                                  reason=Reason.STREAM_INVALID)
        self.restorer.prepare()
        self.state = READY

    def commit(self) -> ManagedVm:
        """Make the VM visible and run it as it ran on the source."""
        if self.state != READY or self.restorer is None:
            raise InvalidArgument(f"migration commit before the VM is ready ({self.state})",
                                  reason=Reason.STREAM_INVALID)
        vm = self.restorer.commit()
        self.state = COMMITTED
        log.info("vm migrated in", extra={"vm_id": self.vm_id, "peer": self.peer})
        return vm

    def abort(self) -> None:
        """Release everything (a no-op after commit)."""
        if self.state == COMMITTED:
            return
        if self.restorer is not None:
            self.restorer.abort()
        else:
            self.host.release_id(self.vm_id)
        if self.state != ABORTED:
            log.info("incoming migration discarded", extra={"vm_id": self.vm_id,
                                                            "state": self.state})
        self.state = ABORTED


class IncomingMigrations:
    """The tokens this daemon handed out, and the migrations they started."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._lock = threading.Lock()
        self._prepared: dict[str, IncomingMigration] = {}  # token -> not yet claimed
        self._running: list[IncomingMigration] = []  # claimed, stream still open

    def prepare(self, vm_id: str, owner: str, owner_quota: int = 0,
                ttl_seconds: int = 0) -> IncomingMigration:
        """Reserve `vm_id` for a migration and return its token (valid `ttl_seconds`)."""
        if not 0 <= ttl_seconds <= MAX_TTL_SECONDS:
            raise InvalidArgument(f"ttl_seconds must be 1-{MAX_TTL_SECONDS} (0: "
                                  f"{DEFAULT_TTL_SECONDS})",
                                  reason=Reason.VALUE_OUT_OF_RANGE, field="ttl_seconds")
        ttl = ttl_seconds or DEFAULT_TTL_SECONDS
        with self._lock:
            if len(self._prepared) >= MAX_PENDING:
                raise ResourceExhausted(f"{MAX_PENDING} incoming migrations are already "
                                        "prepared and unused; use or let them expire",
                                        reason=Reason.LIMIT_MIGRATIONS,
                                        metadata=limit("max_pending_incoming", MAX_PENDING))
            self.host.reserve_id(vm_id, owner, owner_quota)
            # Hex: a token never starts with '-', which command lines read as an option.
            token = secrets.token_hex(32)
            incoming = IncomingMigration(vm_id, owner, owner_quota, token,
                                         int((time.time() + ttl) * 1000), self.host)
            incoming.timer = threading.Timer(ttl, self._expire, (token,))
            incoming.timer.daemon = True
            self._prepared[token] = incoming
        incoming.timer.start()
        log.info("incoming migration prepared", extra={"vm_id": vm_id, "owner": owner,
                                                       "ttl_s": ttl})
        return incoming

    def _expire(self, token: str) -> None:
        with self._lock:
            incoming = self._prepared.pop(token, None)
        if incoming is not None:
            self.host.release_id(incoming.vm_id)
            log.info("incoming migration token expired", extra={"vm_id": incoming.vm_id})

    def claim(self, token: str, peer: str) -> IncomingMigration:
        """Spend a token (PERMISSION_DENIED when unknown, used or expired)."""
        with self._lock:
            found = None
            for known, incoming in self._prepared.items():  # constant time per token
                if hmac.compare_digest(known.encode(), token.encode()):
                    found = incoming
            if found is None:
                raise PermissionDenied("the migration token is unknown, already used or "
                                       "expired: prepare the incoming migration again",
                                       reason=Reason.MIGRATION_TOKEN_INVALID)
            del self._prepared[found.token]
            self._running.append(found)
        if found.timer is not None:
            found.timer.cancel()
        found.peer = peer
        return found

    def cancel(self, vm_id: str) -> bool:
        """Void the token for `vm_id` (the id is free again), or end its running stream at
        the next message. False when there is no incoming migration of that VM."""
        with self._lock:
            for token, incoming in list(self._prepared.items()):
                if incoming.vm_id == vm_id:
                    del self._prepared[token]
                    break
            else:
                for incoming in self._running:
                    if incoming.vm_id == vm_id and incoming.state != COMMITTED:
                        incoming.cancelled = True
                        return True
                return False
        if incoming.timer is not None:
            incoming.timer.cancel()
        self.host.release_id(vm_id)
        log.info("incoming migration cancelled", extra={"vm_id": vm_id})
        return True

    def ended(self, incoming: IncomingMigration) -> None:
        """The stream of a claimed migration ended (after commit or abort)."""
        with self._lock:
            if incoming in self._running:
                self._running.remove(incoming)

    def list(self) -> list[IncomingMigration]:
        with self._lock:
            return [*self._prepared.values(), *self._running]

    def close(self) -> None:
        """The daemon stops: unused tokens are void (running ones abort with their
        streams)."""
        with self._lock:
            prepared, self._prepared = list(self._prepared.values()), {}
        for incoming in prepared:
            if incoming.timer is not None:
                incoming.timer.cancel()
            self.host.release_id(incoming.vm_id)
