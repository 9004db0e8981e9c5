"""Fan-out of eventfd activity: one poller thread for the daemon, queues for watchers."""

from __future__ import annotations

import logging
import queue
import select
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from kvmd.kvm import EventFd

log = logging.getLogger(__name__)
T = TypeVar("T")


class FdWatcher:
    """Calls a callback whenever a registered fd becomes readable, from one thread.

    `remove(fd)` returns only once no callback for that fd is running or will run, so the
    caller may close the fd right after.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()
        self._wake = EventFd()
        self._epoll.register(self._wake.fileno(), select.EPOLLIN)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="kvmd-fd-watcher", daemon=True)
        self._thread.start()

    def add(self, fd: int, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks[fd] = callback
            self._epoll.register(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        with self._lock:
            if self._callbacks.pop(fd, None) is not None:
                self._epoll.unregister(fd)

    def _loop(self) -> None:
        while not self._stopping:
            try:
                ready = self._epoll.poll(1.0)
            except InterruptedError:
                continue
            with self._lock:
                for fd, _mask in ready:
                    if fd == self._wake.fileno():
                        self._wake.read()
                        continue
                    callback = self._callbacks.get(fd)
                    if callback is None:
                        continue
                    try:
                        callback()
                    except Exception:  # a watcher bug must not kill the poller
                        log.exception("fd watcher callback failed for fd %d", fd)

    def close(self) -> None:
        self._stopping = True
        self._wake.write(1)
        self._thread.join(timeout=5)
        with self._lock:
            self._epoll.close()
            self._wake.close()


class Subscription(Generic[T]):
    """One watcher's bounded queue. `get` returns None on timeout; `closed` after the
    broadcaster ended (its resource was deleted)."""

    def __init__(self, owner: Broadcaster[T], maxsize: int) -> None:
        self._owner = owner
        self._queue: queue.Queue[T | None] = queue.Queue(maxsize)
        self.closed = False
        self.dropped = 0

    def put(self, item: T | None) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            # A watcher that stopped reading loses its oldest events, never blocks the VM.
            self.dropped += 1
            try:
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._queue.put_nowait(item)

    def get(self, timeout: float) -> T | None:
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is None:
            self.closed = True
        return item

    def wake(self) -> None:
        """Unblock a pending get (e.g. the RPC was cancelled)."""
        self.put(None)

    def close(self) -> None:
        self._owner.unsubscribe(self)


class Broadcaster(Generic[T]):
    """Publishes items to every current subscription."""

    def __init__(self, maxsize: int = 1024) -> None:
        self._subs: set[Subscription[T]] = set()
        self._lock = threading.Lock()
        self._maxsize = maxsize
        self._ended = False

    def subscribe(self) -> Subscription[T]:
        sub: Subscription[T] = Subscription(self, self._maxsize)
        with self._lock:
            if self._ended:
                sub.put(None)
            else:
                self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription[T]) -> None:
        with self._lock:
            self._subs.discard(sub)

    def publish(self, item: T) -> None:
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            sub.put(item)

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subs)

    def end(self) -> None:
        """Tell every subscriber the stream is over."""
        with self._lock:
            self._ended = True
            subs, self._subs = self._subs, set()
        for sub in subs:
            sub.put(None)
