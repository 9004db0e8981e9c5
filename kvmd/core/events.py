"""Fan-out of eventfd activity: one poller thread for the daemon, mailboxes for watchers."""

from __future__ import annotations

import logging
import select
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from kvmd.kvm import EventFd

log = logging.getLogger(__name__)
T = TypeVar("T")
# Byte-bounded mailboxes join queued pieces up to this size.
COALESCE_BYTES = 64 << 10


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

    def quiet(self) -> threading.Lock:
        """Hold it (`with watcher.quiet():`) and no callback runs meanwhile: the holder may
        take what a watched fd holds itself, without racing its callback. Never held by a
        callback; taken after a VM's lock, as `remove` is."""
        return self._lock

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


class Mailbox(Generic[T]):
    """A thread-safe queue from producers (vCPU threads, the fd watcher) to one consumer.

    The consumer is either a thread, blocking in `get`, or an event loop: it installs a
    waker (called, from the producer's thread, after every put and at the end) and takes
    what arrived with `drain`. Core code stays free of asyncio; the API layer bridges.
    With `maxsize`, a full mailbox drops its oldest item (counted in `dropped`): a consumer
    that stopped reading never blocks a producer. With `max_bytes` (items are then bytes),
    the same holds for the bytes queued: the oldest items go (`dropped_bytes`) until the
    newest fit, and an item larger than the bound keeps only its newest `max_bytes` (a drop
    too: `dropped` counts every item lost in whole or in part).
    """

    def __init__(self, maxsize: int = 0, max_bytes: int = 0) -> None:
        self._items: deque[T] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._maxsize = maxsize
        self._max_bytes = max_bytes
        self._bytes = 0
        self._waker: Callable[[], None] | None = None
        self._ended = False
        self.dropped = 0
        self.dropped_bytes = 0

    def put(self, item: T) -> None:
        with self._cond:
            if self._ended:
                return
            if self._maxsize and len(self._items) >= self._maxsize:
                self._forget(self._items.popleft())
                self.dropped += 1
            if self._max_bytes:
                size = len(item)  # type: ignore[arg-type]
                if size > self._max_bytes:  # cut: counted as a drop, as lost output is
                    self.dropped += 1
                    self.dropped_bytes += size - self._max_bytes
                    item = item[-self._max_bytes:]  # type: ignore[index]
                    size = self._max_bytes
                while self._items and self._bytes + size > self._max_bytes:
                    old = self._items.popleft()
                    self._forget(old)
                    self.dropped += 1
                    self.dropped_bytes += len(old)  # type: ignore[arg-type]
                self._bytes += size
                last = self._items[-1] if self._items else None
                if last is not None and len(last) + size <= COALESCE_BYTES:  # type: ignore
                    # Small pieces join the last one: the item count stays bounded by the
                    # bytes, however the producer slices them.
                    self._items[-1] = last + item  # type: ignore[operator]
                    item = None  # type: ignore[assignment]
            if item is not None:
                self._items.append(item)
            self._cond.notify()
            waker = self._waker
        if waker is not None:
            waker()

    def end(self) -> None:
        """No more items will come; the consumer sees `closed` once it took the rest."""
        with self._cond:
            if self._ended:
                return
            self._ended = True
            self._cond.notify_all()
            waker = self._waker
        if waker is not None:
            waker()

    @property
    def closed(self) -> bool:
        """Ended, and every item taken."""
        with self._cond:
            return self._ended and not self._items

    def set_waker(self, waker: Callable[[], None] | None) -> None:
        """Call `waker` (from the producer's thread) whenever an item arrives or the mailbox
        ends; called once at once if something is already waiting."""
        with self._cond:
            self._waker = waker
            pending = bool(self._items) or self._ended
        if waker is not None and pending:
            waker()

    def _forget(self, item: T) -> None:
        if self._max_bytes:
            self._bytes -= len(item)  # type: ignore[arg-type]

    def drain(self) -> list[T]:
        """Every item waiting now, without blocking."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._bytes = 0
            return items

    def get(self, timeout: float) -> T | None:
        """The next item, or None after `timeout` seconds or once ended and empty."""
        with self._cond:
            if not self._items and not self._ended:
                self._cond.wait(timeout)
            if not self._items:
                return None
            item = self._items.popleft()
            self._forget(item)
            return item


class Subscription(Mailbox[T]):
    """One watcher of a Broadcaster: a bounded mailbox that unsubscribes on `close`."""

    def __init__(self, owner: Broadcaster[T], maxsize: int, max_bytes: int = 0) -> None:
        super().__init__(maxsize, max_bytes)
        self._owner = owner

    def close(self) -> None:
        self._owner.unsubscribe(self)
        self.end()


class Broadcaster(Generic[T]):
    """Publishes items to every current subscription (each bounded by `maxsize` items and,
    for bytes, `max_bytes`)."""

    def __init__(self, maxsize: int = 1024, max_bytes: int = 0) -> None:
        self._subs: set[Subscription[T]] = set()
        self._lock = threading.Lock()
        self._maxsize = maxsize
        self._max_bytes = max_bytes
        self._ended = False

    def subscribe(self) -> Subscription[T]:
        sub: Subscription[T] = Subscription(self, self._maxsize, self._max_bytes)
        with self._lock:
            if self._ended:
                sub.end()
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
            sub.end()
