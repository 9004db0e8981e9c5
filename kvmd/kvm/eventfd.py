"""EventFd: an owned Linux eventfd, the currency of irqfd and ioeventfd."""

from __future__ import annotations

import os
from typing import Protocol


class HasFileno(Protocol):
    def fileno(self) -> int: ...


def fd_of(obj: HasFileno | int) -> int:
    """The file descriptor number of an int or an object with fileno()."""
    return obj if isinstance(obj, int) else obj.fileno()


class EventFd:
    """An eventfd owned by this object (non-blocking, close-on-exec).

    `write(n)` adds n to the counter (this is how an irqfd is triggered); `read()` returns
    and resets the counter, or 0 when nothing was signalled (how an ioeventfd is observed).
    """

    def __init__(self, initval: int = 0) -> None:
        self._fd = -1  # until eventfd() succeeds (EMFILE): __del__ then has nothing to close
        self._fd = os.eventfd(initval, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("eventfd is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def write(self, value: int = 1) -> None:
        os.eventfd_write(self.fileno(), value)

    def read(self) -> int:
        try:
            return os.eventfd_read(self.fileno())
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> EventFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EventFd(fd={self._fd})"
