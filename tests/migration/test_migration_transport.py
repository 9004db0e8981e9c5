"""The source's stream to a target (kvmd.migration.transport.GrpcTransport) on its own,
against a stand-in target: what it does when the target stops reading."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from migration_support import fake_target

from kvmd.core.errors import Unavailable
from kvmd.migration.precopy import MigrationOptions
from kvmd.migration.transport import GrpcTransport
from kvmd_proto import vmm_pb2 as pb

FRAME = bytes(1 << 20)


def test_a_target_that_stops_reading_fails_the_send_after_the_timeout() -> None:
    """No data socket: the bytes go on the stream. The target accepts, then reads nothing
    more (hung, stopped): once grpc's window and the queue are full, the source gives up
    after timeout_ms with UNAVAILABLE, instead of waiting for ever with the VM migrating."""
    release = threading.Event()

    def receive(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        pb.MigrationMessage.FromString(next(requests))  # the start
        yield pb.MigrationReply(accepted=pb.MigrationAccepted(vm_id="v")).SerializeToString()
        release.wait(60)  # and never reads again

    server, address = fake_target(receive)
    transport = GrpcTransport(address, "token", None,
                              MigrationOptions(timeout_ms=1000))
    try:
        assert transport.start("v") == "v"
        started = time.monotonic()
        with pytest.raises(Unavailable, match="stopped reading for 1 s"):
            for _ in range(1000):  # 1 GiB: far more than any window or queue holds
                transport.send([FRAME])
        assert time.monotonic() - started < 30
    finally:
        release.set()
        transport.close()
        server.stop(None)
