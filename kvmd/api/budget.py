"""Per-identity budgets for calls and streams, so nothing one client holds starves others.

- Unary calls run in a bounded thread pool (`max_concurrent_rpcs` threads). One identity may
  have at most `max_calls_per_identity` of them in flight, and callers without the admin
  role together at most the pool minus a reserve: the local admin always finds a thread.
- Streams (any RPC with a request or response stream) cost no thread: they wait on the event
  loop. Still, each is bounded: `max_streams_per_identity` per identity and `max_streams` in
  all, of which non-admin callers may use all but a reserve.
- The health check (grpc.health.v1 Check) is exempt: it answers whatever clients hold open.

A call over budget fails at once with RESOURCE_EXHAUSTED (retryable), before it takes a
thread or any VM lock.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from kvmd.api.auth import ADMIN, current_grant, current_identity
from kvmd.core.errors import Reason, ResourceExhausted, limit

EXEMPT_METHODS = frozenset({"/grpc.health.v1.Health/Check"})


def reserve_of(limit: int) -> int:
    """What non-admin callers leave free for admins: an eighth, at least 1 (0 if limit<2)."""
    return 0 if limit < 2 else max(1, limit // 8)


@dataclass
class Usage:
    """In-flight calls and open streams of one identity."""

    calls: int = 0
    streams: int = 0


class Budget:
    """Counts in-flight calls and open streams per identity; thread-safe."""

    def __init__(self, max_calls: int, max_calls_per_identity: int, max_streams: int,
                 max_streams_per_identity: int) -> None:
        self.max_calls = max_calls
        self.max_calls_per_identity = max_calls_per_identity
        self.max_streams = max_streams
        self.max_streams_per_identity = max_streams_per_identity
        self._usage: dict[str, Usage] = {}
        self._lock = threading.Lock()
        self.calls = 0
        self.streams = 0
        self.non_admin_calls = 0
        self.non_admin_streams = 0

    def _take(self, identity: str, admin: bool, stream: bool) -> None:
        with self._lock:
            # Stored only once admitted: a refused caller leaves no entry behind.
            usage = self._usage.get(identity) or Usage()
            if stream:
                if self.streams >= self.max_streams or (
                        not admin and self.non_admin_streams >= self.max_streams
                        - reserve_of(self.max_streams)):
                    raise ResourceExhausted(f"the daemon has {self.streams} open streams, "
                                            "its limit: try again later",
                                            reason=Reason.LIMIT_STREAMS,
                                            metadata=limit("max_streams", self.max_streams))
                if usage.streams >= self.max_streams_per_identity:
                    raise ResourceExhausted(
                        f"{identity!r} holds {usage.streams} open streams, the limit per "
                        "identity (max_streams_per_identity)",
                        reason=Reason.LIMIT_STREAMS,
                        metadata=limit("max_streams_per_identity", self.max_streams_per_identity))
                self._usage[identity] = usage
                usage.streams += 1
                self.streams += 1
                self.non_admin_streams += 0 if admin else 1
            else:
                if not admin and self.non_admin_calls >= self.max_calls - reserve_of(
                        self.max_calls):
                    raise ResourceExhausted(f"{self.non_admin_calls} calls are in flight, "
                                            "the limit for non-admin callers: try again",
                                            reason=Reason.LIMIT_CALLS,
                                            metadata=limit("max_concurrent_rpcs", self.max_calls))
                if usage.calls >= self.max_calls_per_identity:
                    raise ResourceExhausted(
                        f"{identity!r} has {usage.calls} calls in flight, the limit per "
                        "identity (max_calls_per_identity)",
                        reason=Reason.LIMIT_CALLS,
                        metadata=limit("max_calls_per_identity", self.max_calls_per_identity))
                self._usage[identity] = usage
                usage.calls += 1
                self.calls += 1
                self.non_admin_calls += 0 if admin else 1

    def _give(self, identity: str, admin: bool, stream: bool) -> None:
        with self._lock:
            usage = self._usage[identity]
            if stream:
                usage.streams -= 1
                self.streams -= 1
                self.non_admin_streams -= 0 if admin else 1
            else:
                usage.calls -= 1
                self.calls -= 1
                self.non_admin_calls -= 0 if admin else 1
            if not usage.calls and not usage.streams:
                del self._usage[identity]

    def usage(self, identity: str) -> Usage:
        with self._lock:
            u = self._usage.get(identity)
            return Usage(u.calls, u.streams) if u else Usage()

    def take(self, identity: str, admin: bool, stream: bool) -> None:
        """Admit one call or stream of `identity` (ResourceExhausted if over budget); pair
        with `give`."""
        self._take(identity, admin, stream)

    def give(self, identity: str, admin: bool, stream: bool) -> None:
        self._give(identity, admin, stream)

    @asynccontextmanager
    async def held(self, identity: str, admin: bool, stream: bool) -> AsyncIterator[None]:
        """take ... give around a block."""
        self.take(identity, admin, stream)
        try:
            yield
        finally:
            self.give(identity, admin, stream)


class BudgetInterceptor:
    """Admits each call against the caller's budget (identity set by AuthInterceptor, the
    stage before this one in the server's CallChain)."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget

    def applies(self, method: str, kind: str) -> bool:
        return method not in EXEMPT_METHODS

    def enter(self, method: str, kind: str, request: Any,
              context: Any) -> tuple[str, bool, bool]:
        grant = current_grant.get()
        token = (current_identity.get(), grant is not None and grant.role == ADMIN,
                 kind != "unary_unary")
        self.budget.take(*token)
        return token

    def leave(self, token: tuple[str, bool, bool]) -> None:
        self.budget.give(*token)
