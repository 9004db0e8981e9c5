"""A commit the target confirmed is a completed migration, whatever the stream does after
the confirmation (kvmd.migration.transport.GrpcTransport.commit): the half-close that
follows it is a courtesy, and its failure must not turn the outcome into 'unknown' (which
leaves the VM paused at the source, to be checked by hand, though it runs on the target)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
from migration_support import fake_target

from kvmd.migration.precopy import MigrationOptions
from kvmd.migration.transport import GrpcTransport
from kvmd_proto import vmm_pb2 as pb


def _target(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    """Accepts, is ready at the finish, confirms the commit, then the link breaks."""
    for raw in requests:
        kind = pb.MigrationMessage.FromString(raw).WhichOneof("message")
        if kind == "start":
            yield pb.MigrationReply(accepted=pb.MigrationAccepted(vm_id="v")).SerializeToString()
        elif kind == "finish":
            yield pb.MigrationReply(ready=pb.MigrationReady()).SerializeToString()
        elif kind == "commit":
            yield pb.MigrationReply(committed=pb.MigrationCommitted()).SerializeToString()
            context.abort(grpc.StatusCode.UNAVAILABLE, "the link broke")


class _LinkBreaksAfterTheConfirmation(GrpcTransport):
    """Hands the confirmation over only once the stream's failure has been seen: the
    order the race between the two takes when the link breaks right after the reply."""

    def _next_reply(self, what: str, timeout: float | None = None) -> pb.MigrationReply:
        reply = super()._next_reply(what, timeout)
        if what == "commit":
            deadline = time.monotonic() + 30
            while self._failure is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert self._failure is not None
        return reply


def test_a_confirmed_commit_stays_confirmed_when_the_link_breaks_after_it() -> None:
    server, address = fake_target(_target)
    transport = _LinkBreaksAfterTheConfirmation(address, "token", None,
                                                MigrationOptions(timeout_ms=5000))
    try:
        assert transport.start("v") == "v"
        transport.finish()
        transport.commit()  # confirmed: no OutcomeUnknown, no Unavailable
    finally:
        transport.close()
        server.stop(None)
