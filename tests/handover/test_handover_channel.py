"""The take-over wire (kvmd.handover.Channel) over a socketpair: fd frames must carry as
many fds as names, and a message other than the one expected fails with the peer's
reason."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator

import pytest

from kvmd.handover import _HEAD, FD_BATCH, MAX_FRAME, Channel, HandoverError


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        yield Channel(a), Channel(b)
    finally:
        a.close()
        b.close()


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_an_fd_frame_with_fewer_fds_than_names_is_refused_and_closes_them(
        pair: tuple[Channel, Channel]) -> None:
    """Two names but one fd: HandoverError naming both counts, and the fd that did arrive
    is closed (never attributed to the wrong name)."""
    sender, receiver = pair
    r, w = os.pipe()
    try:
        payload = json.dumps(["kvmd-mem.0.a", "kvmd-mem.1.a"]).encode()
        before = open_fds()
        socket.send_fds(sender.sock, [_HEAD.pack(len(payload), ord("F")) + payload], [r])
        with pytest.raises(HandoverError, match="2 fd names but 1 fds arrived"):
            receiver.recv(5)
        assert open_fds() <= before
    finally:
        os.close(r)
        os.close(w)


def test_expect_fails_with_the_peers_reason(pair: tuple[Channel, Channel]) -> None:
    """Waiting for "accepted", a refusal fails with the reason the peer gave."""
    sender, receiver = pair
    sender.send_json({"op": "refused", "reason": "another hand-over is in progress"})
    with pytest.raises(HandoverError,
                       match="expected 'accepted', got 'another hand-over is in progress'"):
        receiver.expect("accepted", 5)


def test_more_fds_than_one_message_carries_arrive_in_batches_every_one_named(
        pair: tuple[Channel, Channel]) -> None:
    """A VM of more memfds than one SCM_RIGHTS message may carry: send_fds splits them in
    frames of FD_BATCH; every fd arrives, under its name, in order."""
    sender, receiver = pair
    r, w = os.pipe()
    names = [f"kvmd-mem.{i}.a" for i in range(FD_BATCH + 2)]
    got: dict[str, int] = {}
    try:
        sender.send_fds({n: r for n in names})
        while len(got) < len(names):
            kind, frame_names, fds = receiver.recv(10)
            assert kind == "F" and len(frame_names) == len(fds) <= FD_BATCH
            got.update(zip(frame_names, fds, strict=True))
        assert list(got) == names
        assert {os.fstat(fd).st_ino for fd in got.values()} == {os.fstat(r).st_ino}
    finally:
        for fd in (r, w, *got.values()):
            os.close(fd)


def test_more_fds_than_the_receiver_takes_are_refused_as_lost_and_closed(
        pair: tuple[Channel, Channel]) -> None:
    """One message of more fds than FD_BATCH: the kernel drops the rest (MSG_CTRUNC); the
    frame is refused as fds lost in transit, and those that arrived are closed."""
    sender, receiver = pair
    r, w = os.pipe()
    try:
        names = [f"kvmd-mem.{i}.a" for i in range(FD_BATCH + 1)]
        payload = json.dumps(names).encode()
        before = open_fds()
        socket.send_fds(sender.sock, [_HEAD.pack(len(payload), ord("F")) + payload],
                        [r] * len(names))
        with pytest.raises(HandoverError, match=r"fds were lost in transit \(MSG_CTRUNC\)"):
            receiver.recv(5)
        assert open_fds() <= before
    finally:
        os.close(r)
        os.close(w)


def test_fds_of_a_frame_cut_short_are_closed(pair: tuple[Channel, Channel]) -> None:
    """The peer sends an fd frame's header and fds, then goes before its payload: the
    connection's end is the error, and the fds that arrived are closed."""
    sender, receiver = pair
    r, w = os.pipe()
    try:
        before = open_fds()
        socket.send_fds(sender.sock, [_HEAD.pack(100, ord("F"))], [r])
        sender.sock.shutdown(socket.SHUT_WR)
        with pytest.raises(HandoverError, match="closed the hand-over connection"):
            receiver.recv(5)
        assert open_fds() <= before
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"accepted"'])
def test_expect_refuses_a_message_that_is_no_object_and_closes_fds_sent_with_it(
        pair: tuple[Channel, Channel], payload: bytes) -> None:
    """A JSON frame that is not an object, with an fd attached: HandoverError (never an
    AttributeError from inside), and the fd is not kept."""
    sender, receiver = pair
    r, w = os.pipe()
    try:
        before = open_fds()
        socket.send_fds(sender.sock, [_HEAD.pack(len(payload), ord("J")) + payload], [r])
        with pytest.raises(HandoverError, match="expected 'accepted', got a J frame"):
            receiver.expect("accepted", 5)
        assert open_fds() <= before
    finally:
        os.close(r)
        os.close(w)


def test_a_frame_larger_than_the_limit_is_refused_before_its_payload(
        pair: tuple[Channel, Channel]) -> None:
    """A header announcing more than MAX_FRAME bytes is refused at once (never buffered:
    a broken or hostile peer cannot make the daemon allocate it)."""
    sender, receiver = pair
    sender.sock.sendall(_HEAD.pack(MAX_FRAME + 1, ord("B")))
    with pytest.raises(HandoverError, match=f"a hand-over frame of {MAX_FRAME + 1} bytes"):
        receiver.recv(1)
