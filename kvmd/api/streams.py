"""Long-lived server streams on the event loop: a follower per stream, no thread each.

A core `Mailbox` is filled by vCPU threads or the fd watcher; `follow` turns it into an
async iterator by installing a waker that sets an asyncio.Event from the producer's thread.
Every follower is registered with the daemon's `StreamRegistry`, so shutdown ends them all
at once with a clean end of stream (OK, trailing metadata `kvmd-stream-end: shutdown`)
instead of waiting out the grace period and leaving clients with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

import grpc.aio

from kvmd.core.events import Mailbox

T = TypeVar("T")

END_KEY = "kvmd-stream-end"
END_SHUTDOWN = "shutdown"  # the daemon is stopping (or handing over): reconnect and re-open
END_CLOSED = "closed"  # the resource went away (VM deleted, handler closed)
END_LAGGED = "lagged"  # the reader fell behind and items were dropped: re-open (consoles
                       # resume from their offset)


class StreamRegistry:
    """The wake-up events of every open follower. Used from the event loop only."""

    def __init__(self) -> None:
        self._events: set[asyncio.Event] = set()
        self.shutting_down = False

    def add(self, event: asyncio.Event) -> None:
        self._events.add(event)

    def discard(self, event: asyncio.Event) -> None:
        self._events.discard(event)

    def __len__(self) -> int:
        return len(self._events)

    def shutdown(self) -> None:
        """End every follower now (and every one opened later)."""
        self.shutting_down = True
        for event in list(self._events):
            event.set()

    def reopen(self) -> None:
        """Followers may run again (a hand-over that failed: the daemon serves on)."""
        self.shutting_down = False


async def follow(mailbox: Mailbox[T], streams: StreamRegistry,
                 context: grpc.aio.ServicerContext | None = None) -> AsyncIterator[T]:
    """Yield what arrives in `mailbox` until it ends or the daemon shuts down; tells the
    client why the stream ended in the trailing metadata."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()

    def wake() -> None:  # called from any thread
        try:
            loop.call_soon_threadsafe(ready.set)
        except RuntimeError:  # the loop is closed: the daemon is gone
            pass

    streams.add(ready)
    mailbox.set_waker(wake)
    try:
        while not streams.shutting_down:
            ready.clear()
            items = mailbox.drain()
            for item in items:
                yield item
            if not items:
                if mailbox.closed:
                    break
                await ready.wait()
        if context is not None:
            reason = END_SHUTDOWN if streams.shutting_down else END_CLOSED
            context.set_trailing_metadata(((END_KEY, reason),))
    finally:
        mailbox.set_waker(None)
        streams.discard(ready)
