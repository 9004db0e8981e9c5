"""The Snapshots service: thin translation to kvmd.state (which holds every rule of the
format and of saving and restoring) and to the state directory's files."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import grpc.aio

from kvmd.api import convert
from kvmd.api.auth import current_quota
from kvmd.api.base import Runtime, ServicerBase, caller_identity, data_field_view
from kvmd.api.interceptors import HandlerRegistry
from kvmd.core.errors import InvalidArgument, InvalidState, NotFound, Reason
from kvmd.core.host import Host
from kvmd.state.format import varint
from kvmd.state.snapshot import Restorer, RunMode, SnapshotSummary, SnapshotTaker
from kvmd.state.store import SnapshotStore, StoredSnapshot
from kvmd_proto import vmm_pb2 as pb
from kvmd_proto import vmm_pb2_grpc as rpc

DEFAULT_CHUNK = 1 << 20
# Wire tags of the bulk fields: SnapshotVmResponse.data (1) and RestoreVmRequest.data (2).
_TAG_RESPONSE_DATA = (1 << 3) | 2
_TAG_REQUEST_DATA = (2 << 3) | 2


class DataResponse:
    """A SnapshotVmResponse{data} already in wire form (SnapshotTaker.pull_message): its
    frame of guest pages was copied from the guest straight behind the message's header."""

    __slots__ = ("wire",)

    def __init__(self, wire: bytes) -> None:
        self.wire = wire


def _data_lead(size: int) -> bytes:
    """The bytes of a SnapshotVmResponse before a `data` of `size` bytes: its only field."""
    return bytes([_TAG_RESPONSE_DATA]) + varint(size)


def _next_response(taker: SnapshotTaker, size: int) -> DataResponse | None:
    """The next data message of a streamed snapshot (None when it is complete)."""
    wire = taker.pull_message(size)
    return None if wire is None else DataResponse(wire)


def _forget(future: asyncio.Future[DataResponse | None]) -> None:
    if not future.cancelled():
        future.exception()


def _serialize_response(message: pb.SnapshotVmResponse | DataResponse) -> bytes:
    if isinstance(message, DataResponse):
        return message.wire
    return message.SerializeToString()


def _parse_request(wire: bytes) -> pb.RestoreVmRequest | memoryview:
    """A RestoreVmRequest; its `data` form as a view of the received bytes (no copy)."""
    view = data_field_view(wire, _TAG_REQUEST_DATA)
    return view if view is not None else pb.RestoreVmRequest.FromString(wire)


def _feed_next(restorer: Restorer, pieces: Iterator[memoryview]) -> bool:
    """Feed the next piece of a file to `restorer`; False at the end of the file."""
    piece = next(pieces, None)
    if piece is None:
        return False
    restorer.feed(piece)
    return True


def add_snapshots_service(server: HandlerRegistry, servicer: SnapshotsService) -> None:
    """Register the Snapshots service as the generated code does, but with the bulk-data
    (de)serializers above for SnapshotVm responses and RestoreVm requests."""
    handlers = {
        "SnapshotVm": grpc.unary_stream_rpc_method_handler(
            servicer.SnapshotVm, request_deserializer=pb.SnapshotVmRequest.FromString,
            response_serializer=_serialize_response),
        "RestoreVm": grpc.stream_unary_rpc_method_handler(
            servicer.RestoreVm, request_deserializer=_parse_request,
            response_serializer=pb.Vm.SerializeToString),
        "ListSnapshots": grpc.unary_unary_rpc_method_handler(
            servicer.ListSnapshots, request_deserializer=pb.ListSnapshotsRequest.FromString,
            response_serializer=pb.ListSnapshotsResponse.SerializeToString),
        "DeleteSnapshot": grpc.unary_unary_rpc_method_handler(
            servicer.DeleteSnapshot, request_deserializer=pb.DeleteSnapshotRequest.FromString,
            response_serializer=pb.DeleteSnapshotResponse.SerializeToString),
    }
    name = pb.DESCRIPTOR.services_by_name["Snapshots"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


def summary_to_pb(s: SnapshotSummary, file: str = "") -> pb.SnapshotInfo:
    return pb.SnapshotInfo(
        snapshot_id=s.snapshot_id, base_snapshot_id=s.base_snapshot_id, vm_id=s.vm_id,
        diff=s.diff, size_bytes=s.size_bytes, memory_pages=s.memory_pages,
        guest_memory_bytes=s.guest_memory_bytes, created_unix_ms=s.created_unix_ms,
        file=file, seconds=s.seconds, owner=s.owner, format_version=s.format_version,
        kvmd_version=s.kvmd_version)


def stored_to_pb(s: StoredSnapshot) -> pb.SnapshotInfo:
    h = s.header
    return pb.SnapshotInfo(
        snapshot_id=h.snapshot_id, base_snapshot_id=h.base_snapshot_id, vm_id=s.vm_id,
        diff=bool(h.base_snapshot_id), size_bytes=s.size_bytes,
        guest_memory_bytes=s.guest_memory_bytes, created_unix_ms=h.created_unix_ms,
        file=s.name, owner=s.owner, format_version=h.format_version,
        kvmd_version=h.kvmd_version)


class SnapshotsService(ServicerBase, rpc.SnapshotsServicer):
    """Snapshots of whole VMs: streamed to the client or written to the state directory;
    restored from a client stream or from state-directory files."""

    def __init__(self, host: Host, runtime: Runtime, store: SnapshotStore | None,
                 visible: Callable[[str, str], bool]) -> None:
        super().__init__(host, runtime)
        self.store = store
        self.visible = visible

    def _store(self) -> SnapshotStore:
        if self.store is None:
            raise InvalidState("this daemon has no state directory (--state-dir): snapshot "
                               "files are not available; stream the snapshot instead",
                               reason=Reason.FEATURE_DISABLED)
        return self.store

    def _own_file(self, name: str) -> StoredSnapshot:
        """A file the caller may use: one of a VM it may see (NOT_FOUND otherwise, so its
        existence does not leak)."""
        stored = self._store().describe(name)
        if not self.visible(caller_identity(), stored.owner):
            raise NotFound(f"no snapshot file {name!r}", resource=f"snapshot/{name}")
        return stored

    async def SnapshotVm(self, request: pb.SnapshotVmRequest,
                         context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[pb.SnapshotVmResponse]:
        """Save the VM (held paused meanwhile); stream it, or write it to a file."""
        vm = self._vm(request.vm_id)
        store = self._store() if request.file else None
        if store is not None:
            store.path(request.file)  # a bad name is refused before the VM is touched
        # The snapshot becomes the base of the VM's next diff only once it was kept: a file
        # once it has its name, a stream once grpc took its last message.
        taker = SnapshotTaker(vm, request.diff, request.leave_paused,
                              lead=None if store is not None else _data_lead, confirm=True)
        try:
            if store is not None:
                await self._blocking(store.write, request.file, (
                    frame for frames in iter(lambda: taker.pull(DEFAULT_CHUNK), None)
                    for frame in frames))
                taker.confirm()
            else:
                size = self._chunk_size(request.chunk_size or DEFAULT_CHUNK)
                # One message ahead: the pool reads and frames the next part of the snapshot
                # while grpc sends this one.
                ahead = asyncio.ensure_future(self._blocking(_next_response, taker, size))
                try:
                    while (response := await ahead) is not None:
                        ahead = asyncio.ensure_future(
                            self._blocking(_next_response, taker, size))
                        yield response  # type: ignore[misc]
                finally:  # the client went away: what the pool still does is nobody's
                    ahead.add_done_callback(_forget)
            assert taker.summary is not None
            yield pb.SnapshotVmResponse(done=summary_to_pb(taker.summary, request.file))
            taker.confirm()  # a stream's: grpc took its last message (a file's is done)
        finally:
            # A client that went away: end the snapshot now, so the VM runs again (close
            # waits for a pull still running in the pool), and count it as failed unless
            # it was confirmed.
            await self._cleanup(taker.close)

    async def RestoreVm(self, request_iterator: AsyncIterator[pb.RestoreVmRequest],
                        context: grpc.aio.ServicerContext) -> pb.Vm:
        """Build a VM from snapshot bytes (the stream, or files); visible only when done."""
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            first = None
        if not isinstance(first, pb.RestoreVmRequest) or first.WhichOneof(
                "payload") != "options":
            raise InvalidArgument("the first message of RestoreVm must carry its options",
                                  reason=Reason.STREAM_INVALID, field="options")
        options = first.options
        for name in options.files:
            self._own_file(name)  # checked before anything is created
        restorer = Restorer(self.host, options.vm_id, caller_identity(), current_quota.get(),
                            RunMode.START if options.start else RunMode.PAUSED)
        try:
            if options.files:
                store = self._store()
                for name in options.files:
                    # Read and applied in the pool, a piece at a time (cancellable between)
                    pieces = store.read(name)
                    while await self._blocking(_feed_next, restorer, pieces):
                        pass
            else:
                async for msg in requests:  # data arrives as views (see _parse_request)
                    data: bytes | memoryview
                    if isinstance(msg, pb.RestoreVmRequest):
                        if msg.WhichOneof("payload") != "data":
                            raise InvalidArgument("only snapshot data may follow the options",
                                                  reason=Reason.STREAM_INVALID, field="data")
                        data = msg.data
                    else:
                        data = msg
                    await self._blocking(restorer.feed, data)
            vm = await self._blocking(restorer.finish)
        except BaseException:
            await self._cleanup(restorer.abort)
            raise
        return convert.vm_to_pb(vm)

    def ListSnapshots(self, request: pb.ListSnapshotsRequest,
                      context: grpc.aio.ServicerContext) -> pb.ListSnapshotsResponse:
        """The state directory's snapshot files of VMs the caller may see."""
        store = self._store()
        identity = caller_identity()
        out = []
        for name in store.names():
            try:
                stored = store.describe(name)
            except (NotFound, InvalidArgument, InvalidState):
                continue  # deleted meanwhile, not a snapshot, or of a newer kvmd: not listed
            if self.visible(identity, stored.owner):
                out.append(stored_to_pb(stored))
        return pb.ListSnapshotsResponse(snapshots=out)

    def DeleteSnapshot(self, request: pb.DeleteSnapshotRequest,
                       context: grpc.aio.ServicerContext) -> pb.DeleteSnapshotResponse:
        """Delete a snapshot file of a VM the caller may see."""
        self._own_file(request.file)
        self._store().delete(request.file)
        return pb.DeleteSnapshotResponse()
