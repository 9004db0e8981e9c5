"""The eventfd poller (FdWatcher) and watcher mailboxes (Mailbox, Broadcaster): a failing
callback does not stop the poller, and mailboxes keep their byte and item bookkeeping
right across drains, gets and ends."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from kvmd.core.devices import MIN_SUBSCRIBER_BYTES, Console
from kvmd.core.events import Broadcaster, FdWatcher, Mailbox
from kvmd.core.host import Host
from kvmd.core.vm import VmOptions
from kvmd.kvm import EventFd


@pytest.fixture
def watcher() -> Iterator[FdWatcher]:
    """A poller of its own, closed (its thread joined) after the test."""
    w = FdWatcher()
    yield w
    w.close()


def test_a_failing_callback_does_not_stop_the_poller(
        watcher: FdWatcher, caplog: pytest.LogCaptureFixture) -> None:
    """A callback that raises is logged and the poller thread carries on: eventfds
    signalled afterwards still reach their callbacks."""
    bad, good = EventFd(), EventFd()
    failed, fired = threading.Event(), threading.Event()

    def broken() -> None:
        bad.read()
        failed.set()
        raise RuntimeError("a watcher bug")

    try:
        watcher.add(bad.fileno(), broken)
        watcher.add(good.fileno(), lambda: (good.read(), fired.set()))
        bad.write(1)
        assert failed.wait(5)
        good.write(1)
        assert fired.wait(5), "the poller stopped after a callback raised"
        assert "fd watcher callback failed" in caplog.text
    finally:
        watcher.remove(bad.fileno())
        watcher.remove(good.fileno())
        bad.close()
        good.close()


def test_a_piece_larger_than_the_bound_keeps_its_newest_bytes() -> None:
    """A console reader bounded to MIN_SUBSCRIBER_BYTES that gets one larger piece keeps
    its newest bytes (what the guest printed last) and counts the oldest as dropped: in its
    bytes, and as a dropped piece (which ends a StreamConsole as "lagged": its offsets
    would be wrong otherwise)."""
    console = Console(capacity=16)
    _backlog, sub = console.subscribe(backlog=False)
    data = os.urandom(MIN_SUBSCRIBER_BYTES + 10)
    console.output(data)
    assert b"".join(sub.drain()) == data[-MIN_SUBSCRIBER_BYTES:]
    assert (sub.dropped, sub.dropped_bytes) == (1, 10)
    sub.close()


def test_what_a_reader_drained_no_longer_counts_against_its_bound() -> None:
    """Bytes a console reader took with drain() (the API's streams do) leave its bound:
    after draining 48 KiB, 48 KiB more in two pieces fit a 64 KiB reader whole, nothing
    dropped (a drop would end a StreamConsole as lagged)."""
    console = Console(capacity=16)
    _backlog, sub = console.subscribe(backlog=False)
    first, second, third = (os.urandom(n << 10) for n in (48, 32, 16))
    console.output(first)
    assert b"".join(sub.drain()) == first
    console.output(second)
    console.output(third)
    assert b"".join(sub.drain()) == second + third
    assert (sub.dropped, sub.dropped_bytes) == (0, 0)
    sub.close()


def test_what_a_reader_took_with_get_no_longer_counts_against_its_bound() -> None:
    """A byte-bounded mailbox read item by item with get() frees the bytes of each item it
    hands out: a reader one 40 KiB piece behind, bounded to 100 KiB, never has output
    dropped."""
    b: Broadcaster[bytes] = Broadcaster(maxsize=64, max_bytes=100 << 10)
    sub = b.subscribe()
    pieces = [bytes([i]) * (40 << 10) for i in range(8)]
    b.publish(pieces[0])
    for i in range(1, len(pieces)):
        b.publish(pieces[i])  # two pieces queued: 80 KiB, too large to join
        assert sub.get(0) == pieces[i - 1]
    assert sub.get(0) == pieces[-1]
    assert (sub.dropped, sub.dropped_bytes) == (0, 0)
    sub.close()


def test_watching_a_deleted_vm_ends_at_once(host: Host) -> None:
    """A watcher that subscribes after the VM was deleted (a call that found the VM just
    before the delete) gets an ended mailbox, never one that waits forever; nothing stays
    subscribed."""
    vm = host.create_vm("gone", {}, VmOptions())
    host.delete_vm("gone")
    subs = [vm.watch(), vm.watch_ioevents(), vm.watch_resamples(),
            vm.console.subscribe_from(None)[2]]
    assert [s.closed for s in subs] == [True] * 4
    assert [s.get(5) for s in subs] == [None] * 4
    assert vm.events.subscriber_count == vm.ioevent_fired.subscriber_count == 0
    for s in subs:
        s.close()


def test_an_ended_mailbox_takes_nothing_more() -> None:
    """Once ended, a mailbox ignores puts (a vCPU submitting to a remote handler that just
    failed): its consumer sees it closed once it took what came before the end."""
    box: Mailbox[int] = Mailbox()
    box.put(1)
    box.end()
    box.put(2)
    assert not box.closed
    assert box.drain() == [1]
    box.put(3)
    assert box.closed and box.drain() == [] and box.get(0) is None


def test_a_removed_fd_can_be_watched_again(watcher: FdWatcher) -> None:
    """remove(fd) takes the fd out of the poller entirely: the same open fd can be added
    again (with a new callback) and its signals reach only that callback."""
    event = EventFd()
    first, second = threading.Event(), threading.Event()
    try:
        watcher.add(event.fileno(), lambda: (event.read(), first.set()))
        watcher.remove(event.fileno())
        watcher.add(event.fileno(), lambda: (event.read(), second.set()))
        event.write(1)
        assert second.wait(5)
        assert not first.is_set()
    finally:
        watcher.remove(event.fileno())
        event.close()
