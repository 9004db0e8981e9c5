"""The client's Watch on its own, over a stand-in for grpc's call (no daemon needed): how
many events collect() takes, a next() timeout that must not outlive its call, and the
backoff between re-opens."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from kvmd_client import kvmd_client as kc
from kvmd_client.kvmd_client import Watch


class FakeCall:
    """A server stream that yields `items`, then waits until cancelled."""

    def __init__(self, items: list[int]) -> None:
        self._items: Iterator[int] = iter(items)
        self.cancelled = threading.Event()

    def __next__(self) -> int:
        for item in self._items:
            return item
        self.cancelled.wait(30)
        raise StopIteration

    def cancel(self) -> None:
        self.cancelled.set()


def test_collect_stops_at_count() -> None:
    watch: Watch[int] = Watch(FakeCall([1, 2, 3, 4]))
    assert watch.collect(count=2, duration=30) == [1, 2]
    assert watch.cancelled


def test_a_next_that_got_its_item_leaves_no_timer_behind() -> None:
    """next(timeout) cancels the stream only if nothing came in time: an item that came
    disarms it, so the watch is still open after the timeout."""
    watch: Watch[int] = Watch(FakeCall([1, 2]))
    assert watch.next(0.2) == 1
    time.sleep(0.5)
    assert not watch.cancelled
    assert watch.next(0.2) == 2
    watch.cancel()


class Pauses:
    """Stands in for the cancel event a re-open waits on: records each pause, never set."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def wait(self, timeout: float) -> bool:
        self.seen.append(timeout)
        return False


def test_reconnect_backoff_grows_up_to_its_cap() -> None:
    """Each pause is half to all of a backoff that doubles from _FIRST_BACKOFF up to
    _MAX_BACKOFF: a daemon that is back is seen within about a second, however long the
    outage was."""
    pauses = Pauses()
    retry = kc._Reconnect(3600)
    for _ in range(12):
        assert retry.wait(pauses)  # type: ignore[arg-type]
    first, cap = kc._FIRST_BACKOFF, kc._MAX_BACKOFF
    assert first / 2 <= pauses.seen[0] <= first
    assert all(p <= cap for p in pauses.seen), pauses.seen
    assert pauses.seen[-1] >= cap / 2
