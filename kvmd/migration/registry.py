"""The migrations of one daemon: outgoing ones by VM, and the incoming tokens."""

from __future__ import annotations

import threading

from kvmd.core.errors import (
    InvalidArgument,
    InvalidState,
    NotFound,
    Reason,
    ResourceExhausted,
    limit,
)
from kvmd.core.host import Host
from kvmd.core.vm import ManagedVm, validate_id
from kvmd.migration.incoming import IncomingMigrations
from kvmd.migration.precopy import MigrationOptions, OutgoingMigration, Transport
from kvmd.migration.transport import MigrationTls, check_target, connect

MAX_OUTGOING = 8  # migrations this daemon sends at once


class Migrations:
    """Starts, lists and cancels outgoing migrations; holds the incoming ones. `tls`: the
    files outgoing migrations connect with (None: plain TCP, to loopback targets only)."""

    def __init__(self, host: Host, tls: MigrationTls | None = None) -> None:
        self.host = host
        self.tls = tls
        # Incoming data sockets: the host they bind (the TCP listener's), and the server
        # certificate, key and client CA that wrap them when the stream is TLS.
        self.data_host = ""
        self.data_tls: tuple[str, str, str] | None = None
        self.incoming = IncomingMigrations(host)
        self._outgoing: dict[str, OutgoingMigration] = {}
        self._lock = threading.Lock()
        self._closed = False

    def start(self, vm: ManagedVm, target: str, token: str,
              options: MigrationOptions) -> OutgoingMigration:
        """Start migrating `vm` to `target` with the target's `token` (checked there)."""
        if not target:
            raise InvalidArgument("target is required: the target daemon's host:port",
                                  reason=Reason.FIELD_REQUIRED, field="target")
        if not token:
            raise InvalidArgument("token is required: the target's PrepareIncomingMigration "
                                  "gives it", reason=Reason.FIELD_REQUIRED, field="token")
        check_target(target, self.tls)
        options = options.validated()

        def link() -> Transport:
            return connect(target, token, self.tls, options)

        migration = OutgoingMigration(self.host, vm, target, options, link,
                                      on_end=self._ended)
        with self._lock:
            if self._closed:
                raise InvalidState("the daemon is stopping", reason=Reason.DAEMON_STOPPING)
            if vm.id in self._outgoing:
                raise InvalidState(f"vm {vm.id} is already migrating to "
                                   f"{self._outgoing[vm.id].target}", resource=vm.resource,
                                   reason=Reason.VM_MIGRATING)
            if len(self._outgoing) >= MAX_OUTGOING:
                raise ResourceExhausted(f"{MAX_OUTGOING} migrations are already running "
                                        "from this daemon",
                                        reason=Reason.LIMIT_MIGRATIONS,
                                        metadata=limit("max_outgoing_migrations", MAX_OUTGOING))
            migration.start()  # claims the VM (refused if it is busy or migrating)
            self._outgoing[vm.id] = migration
        return migration

    def _ended(self, migration: OutgoingMigration) -> None:
        with self._lock:
            if self._outgoing.get(migration.vm.id) is migration:
                del self._outgoing[migration.vm.id]

    def get(self, vm_id: str) -> OutgoingMigration:
        with self._lock:
            migration = self._outgoing.get(vm_id)
        if migration is None:
            raise NotFound(f"vm {vm_id!r} has no migration in progress",
                           resource=f"vm/{vm_id}")
        return migration

    def cancel(self, vm_id: str) -> None:
        """Cancel the VM's migration: an outgoing one before its switch-over (then
        FAILED_PRECONDITION), or an incoming one (its token voided, or its stream ended)."""
        validate_id("vm id", vm_id)
        with self._lock:
            migration = self._outgoing.get(vm_id)
        if migration is not None:
            if not migration.cancel("cancelled by CancelMigration"):
                raise InvalidState(f"the migration of vm {vm_id} is past its switch-over; "
                                   "it can no longer be cancelled", resource=f"vm/{vm_id}",
                                   reason=Reason.VM_MIGRATING)
            return
        if not self.incoming.cancel(vm_id):
            raise NotFound(f"vm {vm_id!r} has no migration in progress",
                           resource=f"vm/{vm_id}")

    def outgoing(self) -> list[OutgoingMigration]:
        with self._lock:
            return sorted(self._outgoing.values(), key=lambda m: m.vm.id)

    def cancel_all(self, reason: str) -> None:
        """Cancel every outgoing migration before its commit (their VMs run on here) and
        wait for them to end; one past its commit finishes."""
        running = self.outgoing()
        for migration in running:
            migration.cancel(reason)
        for migration in running:
            migration.join(30)

    def close(self) -> None:
        """The daemon stops: outgoing migrations are cancelled (their VMs run on here)
        and waited for; unused incoming tokens are void."""
        with self._lock:
            self._closed = True
        self.cancel_all("cancelled: the daemon is stopping")
        self.incoming.close()
