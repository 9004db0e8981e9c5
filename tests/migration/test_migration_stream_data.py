"""Without a data socket the snapshot bytes go in `data` messages of the stream
(kvmd.migration.transport.GrpcTransport.send): frames are joined into messages of at most
MAX_DATA_MESSAGE bytes, a bigger frame (a huge state record) is cut into pieces, and the
target gets every byte, in order."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
from migration_support import fake_target

from kvmd.migration.precopy import MigrationOptions
from kvmd.migration.transport import MAX_DATA_MESSAGE, GrpcTransport
from kvmd_proto import vmm_pb2 as pb


def test_frames_go_in_bounded_data_messages_in_order() -> None:
    messages: list[bytes] = []

    def receive(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for raw in requests:
            msg = pb.MigrationMessage.FromString(raw)
            kind = msg.WhichOneof("message")
            if kind == "start":  # no data port offered: the data comes on the stream
                yield pb.MigrationReply(accepted=pb.MigrationAccepted(vm_id="v")
                                        ).SerializeToString()
            elif kind == "data":
                messages.append(msg.data)
            elif kind == "finish":
                yield pb.MigrationReply(ready=pb.MigrationReady()).SerializeToString()
                return

    server, address = fake_target(receive, ("grpc.max_receive_message_length", 64 << 20))
    transport = GrpcTransport(address, "token", None,
                              MigrationOptions(timeout_ms=30_000))
    frames = [os.urandom(n) for n in (100, MAX_DATA_MESSAGE - 50, 3 * MAX_DATA_MESSAGE // 2,
                                      10, 7 * MAX_DATA_MESSAGE // 2 + 1, 1)]
    try:
        assert transport.start("v") == "v"
        transport.send(frames)
        transport.finish()
    finally:
        transport.close()
        server.stop(None)
    assert b"".join(messages) == b"".join(frames)
    assert max(len(m) for m in messages) <= MAX_DATA_MESSAGE
