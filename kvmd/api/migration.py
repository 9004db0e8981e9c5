"""The Migration service: thin translation to kvmd.migration (which holds every rule of the
pre-copy loop, the tokens and the daemon-to-daemon link)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable

import grpc.aio

from kvmd.api.auth import current_quota
from kvmd.api.base import Runtime, ServicerBase, caller_identity, data_field_view
from kvmd.api.interceptors import HandlerRegistry
from kvmd.core.errors import Aborted, DeadlineExceeded, InvalidArgument, Reason
from kvmd.core.host import Host
from kvmd.migration.dataplane import DataListener, server_context
from kvmd.migration.incoming import COMMITTED, READY, IncomingMigration
from kvmd.migration.precopy import Direction, MigrationOptions, OutgoingMigration, Phase, Progress
from kvmd.migration.registry import Migrations
from kvmd_proto import vmm_pb2 as pb
from kvmd_proto import vmm_pb2_grpc as rpc

# The target gives up on a source that sends nothing for this long (the VM reservation and
# its memory are released), and on one that does not commit a ready VM.
RECEIVE_IDLE_SECONDS = 60.0
COMMIT_WAIT_SECONDS = 30.0
_TAG_DATA = (2 << 3) | 2  # MigrationMessage.data
POLL_SECONDS = 0.25  # how often a waiting stream looks at its data socket and a cancel

log = logging.getLogger(__name__)

_PHASES: dict[str, pb.MigrationProgress.Phase] = {Phase.CONNECTING: pb.MigrationProgress.CONNECTING,
           Phase.COPYING: pb.MigrationProgress.COPYING,
           Phase.SWITCHING_OVER: pb.MigrationProgress.SWITCHING_OVER,
           Phase.COMPLETED: pb.MigrationProgress.COMPLETED}


def progress_to_pb(p: Progress) -> pb.MigrationProgress:
    return pb.MigrationProgress(
        phase=_PHASES.get(p.phase, pb.MigrationProgress.PHASE_UNSPECIFIED), round=p.round,
        pages_sent=p.pages_sent, bytes_sent=p.bytes_sent, pages_remaining=p.pages_remaining,
        dirty_pages_per_second=p.dirty_pages_per_second,
        throughput_bytes_per_second=p.throughput_bytes_per_second,
        expected_downtime_ms=p.expected_downtime_ms, throttle_percent=p.throttle_percent,
        elapsed_seconds=p.elapsed_seconds, downtime_ms=p.downtime_ms,
        target_vm_id=p.target_vm_id, guest_memory_bytes=p.guest_memory_bytes)


def options_from_pb(o: pb.MigrationOptions) -> MigrationOptions:
    return MigrationOptions(
        max_downtime_ms=o.max_downtime_ms, bandwidth_bytes_per_second=o.bandwidth_bytes_per_second,
        max_rounds=o.max_rounds, auto_converge=o.auto_converge,
        tls_server_name=o.tls_server_name, timeout_ms=o.timeout_ms)


def _parse_message(wire: bytes) -> pb.MigrationMessage | memoryview:
    """A MigrationMessage; its `data` form as a view of the received bytes (no copy)."""
    view = data_field_view(wire, _TAG_DATA)
    return view if view is not None else pb.MigrationMessage.FromString(wire)


def add_migration_service(server: HandlerRegistry, servicer: MigrationService) -> None:
    """Register the Migration service as the generated code does, but with the bulk-data
    parser above for ReceiveMigration's messages."""
    handlers = {
        "PrepareIncomingMigration": grpc.unary_unary_rpc_method_handler(
            servicer.PrepareIncomingMigration,
            request_deserializer=pb.PrepareIncomingMigrationRequest.FromString,
            response_serializer=pb.IncomingMigration.SerializeToString),
        "MigrateVm": grpc.unary_stream_rpc_method_handler(
            servicer.MigrateVm, request_deserializer=pb.MigrateVmRequest.FromString,
            response_serializer=pb.MigrationProgress.SerializeToString),
        "CancelMigration": grpc.unary_unary_rpc_method_handler(
            servicer.CancelMigration, request_deserializer=pb.CancelMigrationRequest.FromString,
            response_serializer=pb.CancelMigrationResponse.SerializeToString),
        "ListMigrations": grpc.unary_unary_rpc_method_handler(
            servicer.ListMigrations, request_deserializer=pb.ListMigrationsRequest.FromString,
            response_serializer=pb.ListMigrationsResponse.SerializeToString),
        "ReceiveMigration": grpc.stream_stream_rpc_method_handler(
            servicer.ReceiveMigration, request_deserializer=_parse_message,
            response_serializer=pb.MigrationReply.SerializeToString),
    }
    name = pb.DESCRIPTOR.services_by_name["Migration"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


class MigrationService(ServicerBase, rpc.MigrationServicer):
    """Live migration: the target's tokens, the source's MigrateVm, and the stream between
    the two daemons."""

    def __init__(self, host: Host, runtime: Runtime, migrations: Migrations,
                 visible: Callable[[str, str], bool]) -> None:
        super().__init__(host, runtime)
        self.migrations = migrations
        self.visible = visible

    def PrepareIncomingMigration(self, request: pb.PrepareIncomingMigrationRequest,
                                 context: grpc.aio.ServicerContext) -> pb.IncomingMigration:
        """Expect a VM under `vm_id` (reserved meanwhile); returns its one-time token."""
        if not request.vm_id:
            raise InvalidArgument("vm_id is required", reason=Reason.FIELD_REQUIRED, field="vm_id")
        incoming = self.migrations.incoming.prepare(request.vm_id, caller_identity(),
                                                    current_quota.get(), request.ttl_seconds)
        return pb.IncomingMigration(vm_id=incoming.vm_id, token=incoming.token,
                                    expires_unix_ms=incoming.expires_unix_ms)

    async def MigrateVm(self, request: pb.MigrateVmRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.MigrationProgress]:
        """Move the VM to the target; progress until it runs there. The call ending early
        (a client gone, the daemon stopping) cancels the migration before its commit."""
        vm = self._vm(request.vm_id)
        migration: OutgoingMigration = await self._acquire(
            self.migrations.start, vm, request.target, request.token,
            options_from_pb(request.options),
            release=lambda m: m.cancel("cancelled: its MigrateVm call ended"))
        updates = migration.watch()
        try:
            async for progress in self._follow(updates, context):
                yield progress_to_pb(progress)
        finally:
            updates.close()
            if not migration.done.is_set():
                migration.cancel("cancelled: its MigrateVm call ended")
        if migration.error is not None:
            raise migration.error

    def CancelMigration(self, request: pb.CancelMigrationRequest,
                        context: grpc.aio.ServicerContext) -> pb.CancelMigrationResponse:
        """Cancel the VM's migration: outgoing (before its switch-over), or incoming."""
        self._check_id(request.vm_id)
        self.migrations.cancel(request.vm_id)
        return pb.CancelMigrationResponse()

    def ListMigrations(self, request: pb.ListMigrationsRequest,
                       context: grpc.aio.ServicerContext) -> pb.ListMigrationsResponse:
        """Outgoing and incoming migrations of VMs the caller may see."""
        identity = caller_identity()
        out = []
        for m in self.migrations.outgoing():
            if self.visible(identity, m.vm.owner):
                p = m.snapshot_progress()
                out.append(pb.MigrationInfo(vm_id=m.vm.id, direction=Direction.OUTGOING,
                                            peer=m.target, state=p.phase,
                                            progress=progress_to_pb(p)))
        for i in self.migrations.incoming.list():
            if self.visible(identity, i.owner):
                out.append(pb.MigrationInfo(
                    vm_id=i.vm_id, direction=Direction.INCOMING, peer=i.peer, state=i.state,
                    expires_unix_ms=i.expires_unix_ms if not i.peer else 0))
        return pb.ListMigrationsResponse(migrations=out)

    async def ReceiveMigration(self, request_iterator: AsyncIterator[pb.MigrationMessage],
                               context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[pb.MigrationReply]:
        """The source daemon's stream: start (the token), snapshot data (here or on the data
        socket offered with the accept), finish, commit. Anything but a commit leaves
        nothing here."""
        requests = _Requests(request_iterator)
        first = await requests.next(RECEIVE_IDLE_SECONDS)
        if not isinstance(first, pb.MigrationMessage) or first.WhichOneof("message") != "start":
            requests.close()
            raise InvalidArgument("a migration stream starts with its token (start)",
                                  reason=Reason.STREAM_INVALID, field="start")
        start = first.start
        incoming: IncomingMigration = self.migrations.incoming.claim(start.token,
                                                                     context.peer() or "")
        data: DataListener | None = None

        def release() -> None:
            try:
                if data is not None:
                    data.close()  # no feed runs after this
                if incoming.state != COMMITTED:
                    incoming.abort()  # the source gone: everything released
            finally:
                # Listed until released: a release that outlives a cancelled call (see
                # _cleanup) must not show the id as free while it is still reserved.
                self.migrations.incoming.ended(incoming)

        try:
            await self._blocking(incoming.begin, start.source_vm_id, start.format_version)
            accepted = pb.MigrationAccepted(vm_id=incoming.vm_id)
            if start.data_socket:
                data = await self._blocking(self._data_listener, incoming, context)
                if data is not None:
                    accepted.data_port, accepted.data_secret = data.port, data.secret
            yield pb.MigrationReply(accepted=accepted)
            while incoming.state != COMMITTED:
                wait = COMMIT_WAIT_SECONDS if incoming.state == READY else RECEIVE_IDLE_SECONDS
                msg = await requests.next(wait, incoming, data)
                incoming.check_cancelled()
                if msg is None:  # the source ended the stream without a commit: discard
                    raise Aborted(f"the migration stream of vm {incoming.vm_id} ended before "
                                  "its commit: nothing was kept", reason=Reason.MIGRATION_CANCELLED)
                if isinstance(msg, memoryview):
                    await self._blocking(incoming.feed, msg)
                    continue
                kind = msg.WhichOneof("message")
                if kind == "data":
                    await self._blocking(incoming.feed, msg.data)
                elif kind == "finish":
                    if msg.finish.data_bytes:
                        if data is None:
                            raise InvalidArgument("finish counts data-socket bytes but no "
                                                  "data socket was offered",
                                                  reason=Reason.STREAM_INVALID)
                        await self._blocking(data.wait, msg.finish.data_bytes,
                                             RECEIVE_IDLE_SECONDS)
                    await self._blocking(incoming.finish)
                    yield pb.MigrationReply(ready=pb.MigrationReady())
                elif kind == "commit":
                    await self._blocking(incoming.commit)
                    yield pb.MigrationReply(committed=pb.MigrationCommitted())
                else:
                    raise InvalidArgument(f"unexpected {kind or 'empty'} message in a "
                                          "migration stream", reason=Reason.STREAM_INVALID)
        finally:
            requests.close()
            await self._cleanup(release)

    def _data_listener(self, incoming: IncomingMigration,
                       context: grpc.aio.ServicerContext) -> DataListener | None:
        """The data socket offered to this stream's source: TLS with the daemon's own
        certificates when the stream is TLS, plain only when it is plain TCP over loopback;
        None (the data goes on the stream) otherwise."""
        auth = context.auth_context() or {}
        secure = b"ssl" in auth.get("transport_security_type", [])
        peer = context.peer() or ""
        if secure:
            files = self.migrations.data_tls
            host = self.migrations.data_host
            if files is None or not host:
                return None
            try:
                tls = server_context(*files)
            except (OSError, ssl.SSLError) as exc:
                log.warning("no migration data socket: %s", exc)
                return None
        else:
            if peer.startswith("ipv4:127."):
                host = "127.0.0.1"
            elif peer.startswith("ipv6:[::1]"):
                host = "::1"
            else:
                return None
            tls = None
        try:
            return DataListener(host, incoming.feed, tls, RECEIVE_IDLE_SECONDS)
        except OSError as exc:
            log.warning("no migration data socket: %s", exc)
            return None


class _Requests:
    """A stream's requests, one at a time with a deadline, that also watches the data socket
    (its failure ends the stream; its traffic counts as the source being alive) and a cancel
    on this side. The pending read is never cancelled between waits."""

    def __init__(self, iterator: AsyncIterator[pb.MigrationMessage | memoryview]) -> None:
        self._iterator = iterator.__aiter__()
        self._pending: asyncio.Future[pb.MigrationMessage | memoryview] | None = None

    async def next(self, timeout: float, incoming: IncomingMigration | None = None,
                   data: DataListener | None = None) -> pb.MigrationMessage | memoryview | None:
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._iterator.__anext__())
        task = self._pending
        deadline = time.monotonic() + timeout
        while True:
            done, _ = await asyncio.wait({task}, timeout=min(POLL_SECONDS, timeout))
            if done:
                break
            if incoming is not None:
                incoming.check_cancelled()
            if data is not None:
                if data.error is not None:
                    raise data.error
                deadline = max(deadline, data.last_activity + timeout)
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"the migration source sent nothing for {timeout:g} s",
                                       reason=Reason.PEER_TIMEOUT)
        self._pending = None
        try:
            return task.result()
        except StopAsyncIteration:
            return None

    def close(self) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
        self._pending = None
