"""The plain (loopback) data socket end to end (kvmd.migration.dataplane): DataSender writes
frames with sendmsg, IOV_MAX buffers at a time, resuming after partial writes; the listener
must receive exactly those bytes, in order, and both ends must count them alike."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from migration_support import Host, wait_for

from kvmd.migration.dataplane import IOV_MAX, DataListener, DataSender
from kvmd_proto import vmm_pb2 as pb


def test_every_frame_arrives_in_order_across_partial_writes() -> None:
    received = hashlib.sha256()
    listener = DataListener("127.0.0.1", lambda view: received.update(view), None, 30)
    # More frames than one sendmsg takes, empty ones among them, and big ones: a write
    # of several MiB fills the socket buffers, so sendmsg returns part of it.
    frames = [os.urandom(n) for n in (1, 0, 4096, 3, 0, 65536)] * (IOV_MAX // 3)
    frames += [os.urandom(8 << 20), b"", os.urandom(5)]
    total = sum(len(f) for f in frames)
    sender = DataSender("127.0.0.1", listener.port, listener.secret, None, "", 30)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            for _ in range(2):
                sender.send(frames)
        except BaseException as exc:  # reported below
            errors.append(exc)
    thread = threading.Thread(target=send, daemon=True)
    try:
        thread.start()
        listener.wait(2 * total, 60)
        thread.join(60)
        assert not thread.is_alive(), "the sender did not return"
        assert errors == []
        assert sender.sent == 2 * total
        assert received.hexdigest() == hashlib.sha256(b"".join(frames) * 2).hexdigest()
    finally:
        sender.close()
        listener.close()


def test_a_vm_migrates_over_plain_loopback_through_the_data_socket(tmp_path: Path) -> None:
    """Two daemons without TLS on loopback: the target offers a plain data socket, the
    guest's memory goes through it, and the guest goes on checking its pages there."""
    a = Host(tmp_path / "a", None, "kvmd-plain-a")
    try:
        b = Host(tmp_path / "b", None, "kvmd-plain-b")
        try:
            a.boot_working_set("p")
            a.node.start("p")
            wait_for(lambda: a.passes("p") > 0, 30, "a first pass over the working set")
            progress = a.migrate("p", b)
            assert progress[-1].phase == pb.MigrationProgress.COMPLETED
            assert a.vm_ids() == []
            passes = b.passes("p")
            wait_for(lambda: b.passes("p") > passes + 3, 30, "the guest to go on at the target")
            vm = b.vm("p")
            assert vm.state == "running" and not vm.HasField("exit_code"), vm
            assert "migration data socket open" in b.log()
        finally:
            b.stop()
    finally:
        a.stop()
