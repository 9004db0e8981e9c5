"""The data socket: guest memory goes beside the gRPC stream (TLS like the stream, opened by a
per-migration secret), and on the stream when the source cannot reach it. The failures
(kill, cut, cancel) go through it in test_migration_failures."""

from __future__ import annotations

import os
import queue
import socket
import ssl
from collections.abc import Iterator

import grpc
import pytest
from migration_support import Host, LinkProxy, Pki, wait_for

from kvmd_proto import vmm_pb2 as pb

MiB = 1 << 20


def _data_socket_opens(host: Host) -> list[str]:
    return [line for line in host.log().splitlines() if "migration data socket open" in line]


def test_guest_memory_goes_on_a_tls_data_socket_beside_the_stream(
        hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    proxy = LinkProxy(b.port)  # carries the stream only
    opened = len(_data_socket_opens(b))
    a.boot_working_set("d", static=os.urandom(MiB))
    a.node.start("d")
    # Its working set touched once: a guest starved on a loaded host had touched 2.4 MiB.
    wait_for(lambda: a.passes("d") > 0, 30, "a first pass over the working set")
    progress = a.migrate("d", proxy.target, b.prepare("d"), tls_server_name="localhost")
    assert progress[-1].phase == pb.MigrationProgress.COMPLETED
    assert progress[-1].bytes_sent > 4 * MiB
    assert proxy.bytes < MiB, proxy.bytes  # the pages went around the stream
    opens = _data_socket_opens(b)[opened:]
    assert len(opens) == 1 and "tls=True" in opens[0], opens
    vm = b.vm("d")
    assert vm.state == "running" and a.vm_ids() == []
    passes = b.passes("d")
    wait_for(lambda: b.passes("d") > passes + 3, 30, "the guest to run on at the target")


def test_a_source_that_cannot_reach_the_data_socket_sends_on_the_stream(
        hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    # The source reaches the target through 127.0.0.2; the data socket listens on the
    # target's own address (127.0.0.1) only: refused, so the stream carries everything.
    proxy = LinkProxy(b.port, host="127.0.0.2")
    a.boot_working_set("s", static=os.urandom(MiB))
    a.node.start("s")
    progress = a.migrate("s", proxy.target, b.prepare("s"), tls_server_name="localhost")
    assert progress[-1].phase == pb.MigrationProgress.COMPLETED
    assert proxy.bytes > progress[-1].bytes_sent
    assert "migration data socket refused; sending on the stream" in a.log()
    assert b.vm("s").state == "running" and a.vm_ids() == []
    wait_for(lambda: not b.migrations(), 10, "the incoming migration to end")


class _Stream:
    """A hand-driven ReceiveMigration over TLS, as a source daemon would open it."""

    def __init__(self, b: Host, pki: Pki) -> None:
        cert, key = pki.host("kvmd-tester")
        with open(cert, "rb") as c, open(key, "rb") as k, open(pki.ca_file, "rb") as ca:
            creds = grpc.ssl_channel_credentials(ca.read(), k.read(), c.read())
        self.channel = grpc.secure_channel(b.target, creds)
        self.requests: queue.Queue[bytes | None] = queue.Queue()
        method = self.channel.stream_stream(
            "/kvmd.v1.Migration/ReceiveMigration", request_serializer=lambda m: m,
            response_deserializer=pb.MigrationReply.FromString)
        self.replies = method(self._iterate(), timeout=30)

    def _iterate(self) -> Iterator[bytes]:
        while (item := self.requests.get()) is not None:
            yield item

    def send(self, message: pb.MigrationMessage) -> None:
        self.requests.put(message.SerializeToString())

    def close(self) -> None:
        self.requests.put(None)
        self.channel.close()


@pytest.mark.parametrize("opener", ["a wrong secret", "no TLS"])
def test_the_data_socket_opens_only_with_its_secret_over_tls(
        hosts: tuple[Host, Host], pki: Pki, opener: str) -> None:
    _a, b = hosts
    # A source that does not ask for a data socket (an older kvmd) is offered none.
    old = _Stream(b, pki)
    try:
        old.send(pb.MigrationMessage(start=pb.MigrationStart(token=b.prepare("o"),
                                                             format_version=1)))
        accepted = next(old.replies).accepted
        assert accepted.vm_id == "o" and accepted.data_port == 0 and not accepted.data_secret
    finally:
        old.close()
    wait_for(lambda: not b.migrations(), 10, "the target to drop it")

    stream = _Stream(b, pki)
    try:
        stream.send(pb.MigrationMessage(start=pb.MigrationStart(
            token=b.prepare("x"), format_version=1, data_socket=True)))
        accepted = next(stream.replies).accepted
        assert accepted.data_port and len(accepted.data_secret) == 32
        raw = socket.create_connection(("127.0.0.1", accepted.data_port), timeout=10)
        if opener == "a wrong secret":
            cert, key = pki.host("kvmd-tester")
            ctx = ssl.create_default_context(cafile=pki.ca_file)
            ctx.load_cert_chain(cert, key)
            conn: socket.socket = ctx.wrap_socket(raw, server_hostname="localhost")
            conn.sendall(bytes(32))
        else:  # the right secret, in the clear
            conn = raw
            conn.sendall(accepted.data_secret)
        with pytest.raises(grpc.RpcError) as err:
            next(stream.replies)
        code = err.value.code()  # type: ignore[attr-defined]
        expected = (grpc.StatusCode.INVALID_ARGUMENT if opener == "a wrong secret"
                    else grpc.StatusCode.UNAVAILABLE)
        assert code == expected, err.value
        conn.close()
    finally:
        stream.close()
    wait_for(lambda: not b.migrations(), 10, "the target to drop it")
    assert b.vm_ids() == [] and b.node.healthy()
