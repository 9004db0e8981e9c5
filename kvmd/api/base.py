"""What every servicer shares: the core Host, the pool for blocking work, the registry of
open streams, and the caller's identity."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc.aio

from kvmd.api.auth import current_identity
from kvmd.api.gen import vmm_pb2 as pb
from kvmd.api.interceptors import run_blocking
from kvmd.api.streams import StreamRegistry, follow
from kvmd.core.errors import InvalidArgument
from kvmd.core.events import Mailbox
from kvmd.core.host import Host
from kvmd.core.vcpu import ManagedVcpu, PauseTicket
from kvmd.core.vm import ManagedVm

T = TypeVar("T")
MiB = 1 << 20
DEFAULT_CHUNK = MiB
# Room for the non-payload fields of a streamed message.
MESSAGE_OVERHEAD = 4096


def caller_identity() -> str:
    """The authenticated identity of the caller ("local" on the Unix socket)."""
    return current_identity.get()


@dataclass
class Runtime:
    """What async handlers need besides the core: the pool for blocking work and the
    registry of open streams."""

    pool: futures.ThreadPoolExecutor
    streams: StreamRegistry


class ServicerBase:
    def __init__(self, host: Host, runtime: Runtime) -> None:
        self.host = host
        self.runtime = runtime

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking core work (ioctls, copies, locks) from an async handler."""
        result: T = await run_blocking(self.runtime.pool, fn, *args)
        return result

    async def _paused(self, vcpus: list[ManagedVcpu],
                      request: Callable[[], list[tuple[ManagedVcpu, PauseTicket]]]) -> None:
        """Run `request` (it kicks some of `vcpus` and returns what to wait for), then wait on
        the event loop, holding no thread, until each of those vCPUs paused (or ended): the
        same outcomes as ManagedVcpu.wait_paused in a thread (ABORTED when a resume came
        first, INTERNAL after the timeout). The vCPUs' state changes wake the loop through
        listeners, installed before the kick so that after it the loop only awaits."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wake() -> None:  # from the vCPU's thread, under its lock
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the loop is closed: the daemon is stopping
                pass

        for vcpu in vcpus:
            vcpu.add_listener(wake)
        try:
            waits = request()
            if not waits:
                return
            deadline = loop.time() + max(vcpu.pause_timeout() for vcpu, _ticket in waits)
            for vcpu, ticket in waits:
                while True:
                    ready.clear()
                    if vcpu.pause_done(ticket):
                        break
                    left = deadline - loop.time()
                    if left <= 0:
                        raise vcpu.timed_out("pause")
                    try:
                        async with asyncio.timeout(left):
                            await ready.wait()
                    except TimeoutError:
                        pass
        finally:
            for vcpu in vcpus:
                vcpu.remove_listener(wake)

    def _follow(self, mailbox: Mailbox[T], context: grpc.aio.ServicerContext
                ) -> AsyncIterator[T]:
        return follow(mailbox, self.runtime.streams, context)

    def _vm(self, vm_id: str) -> ManagedVm:
        if not vm_id:
            raise InvalidArgument("vm_id is required")
        return self.host.get_vm(vm_id)

    def _vcpu(self, ref: pb.VcpuRef) -> ManagedVcpu:
        return self._vm(ref.vm_id).vcpu(ref.vcpu_id)

    def _chunk_size(self, requested: int) -> int:
        limit = self.host.limits.max_message_bytes - MESSAGE_OVERHEAD
        return max(1, min(requested or DEFAULT_CHUNK, limit))


