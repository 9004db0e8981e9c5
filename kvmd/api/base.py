"""What every servicer shares: the core Host, the pool for blocking work, the registry of
open streams, and the caller's identity."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc.aio

from kvmd.api.auth import ADMIN, authorized_vm, current_grant, current_identity
from kvmd.api.interceptors import run_blocking
from kvmd.api.pool import CallPool
from kvmd.api.streams import StreamRegistry, follow
from kvmd.core.errors import InvalidArgument, Reason
from kvmd.core.events import Mailbox
from kvmd.core.host import Host, missing_vm
from kvmd.core.vcpu import ManagedVcpu, PauseTicket
from kvmd.core.vm import ManagedVm
from kvmd.state.format import read_varint
from kvmd_proto import vmm_pb2 as pb

T = TypeVar("T")
MiB = 1 << 20
DEFAULT_CHUNK = MiB
# Room for the non-payload fields of a streamed message.
MESSAGE_OVERHEAD = 4096


# Cleanup tasks still running for calls that were cancelled (see ServicerBase._cleanup).
_CLEANUPS: set[asyncio.Future[Any]] = set()


def data_field_view(wire: bytes, tag: int) -> memoryview | None:
    """When the serialized message `wire` is exactly one length-delimited field with wire
    tag `tag` (a bulk `bytes data` field alone), a view of its contents: no copy, no
    protobuf parse. None for anything else (the caller parses it as a message)."""
    if wire[:1] != bytes([tag]):
        return None
    try:
        head = read_varint(wire, 1)
    except ValueError:
        return None
    if head is None or head[1] + head[0] != len(wire):
        return None
    return memoryview(wire)[head[1]:]


def caller_identity() -> str:
    """The authenticated identity of the caller ("local" on the Unix socket)."""
    return current_identity.get()


@dataclass
class Runtime:
    """What async handlers need besides the core: the pool for blocking work and the
    registry of open streams."""

    pool: CallPool
    streams: StreamRegistry


class ServicerBase:
    def __init__(self, host: Host, runtime: Runtime) -> None:
        self.host = host
        self.runtime = runtime

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking core work (ioctls, copies, locks) from an async handler."""
        result: T = await run_blocking(self.runtime.pool, fn, *args)
        return result

    def _in_pool_held(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`fn(*args)` in the pool as a task held until it is done: the loop keeps only weak
        references to tasks, and a cancelled caller's work could be collected half way."""
        task = asyncio.ensure_future(self._blocking(fn, *args))
        _CLEANUPS.add(task)
        task.add_done_callback(_CLEANUPS.discard)
        return task

    async def _cleanup(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run blocking cleanup (release a VM half-built, a handler, a held pause) to its
        end, even when this call is being cancelled: a cancelled task is cancelled again at
        each await, which would abandon the cleanup half way and leak what it releases."""
        task = self._in_pool_held(fn, *args)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            pass  # the cleanup finishes in the pool; the cancellation goes on

    async def _acquire(self, fn: Callable[..., T], *args: Any,
                       release: Callable[[T], Any]) -> T:
        """Run blocking work that makes something the call must give back (a claim, a
        migration), and return it. Cancelling the await does not stop the pool thread: if
        this call is cancelled before the work returns, its result is released when it does,
        so a client that gives up at the wrong moment leaves nothing behind."""
        task = self._in_pool_held(fn, *args)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            def undo(done: asyncio.Future[T]) -> None:
                if not done.cancelled() and done.exception() is None:
                    self._in_pool_held(release, done.result())

            task.add_done_callback(undo)
            raise

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
        """The VM the call was authorized for (see auth.authorized_vm), if it still exists
        as that very object; NotFound otherwise, never another VM that took its id. Only
        admins reach a VM the authorizer did not name."""
        if not vm_id:
            raise InvalidArgument("vm_id is required", reason=Reason.FIELD_REQUIRED, field="vm_id")
        bound = authorized_vm.get()
        if bound is not None and bound[0] == vm_id:
            vm = bound[1]
            if self.host.get_vm(vm_id) is not vm:
                raise missing_vm(vm_id)
            return vm
        grant = current_grant.get()
        if grant is None or grant.role != ADMIN:
            self.host.get_vm(vm_id)  # a bad id is still INVALID_ARGUMENT
            raise missing_vm(vm_id)
        return self.host.get_vm(vm_id)

    def _check_id(self, vm_id: str) -> None:
        """For calls that act on an id rather than a VM object (an incoming migration's
        reserved id): the VM authorized, if there was one, is still the one under the id,
        and a caller other than an admin still owns the id (NotFound otherwise)."""
        if not vm_id:
            raise InvalidArgument("vm_id is required", reason=Reason.FIELD_REQUIRED, field="vm_id")
        bound = authorized_vm.get()
        if bound is not None and bound[0] == vm_id:
            self._vm(vm_id)
            return
        grant = current_grant.get()
        if (grant is None or grant.role != ADMIN) and \
                self.host.owner_of(vm_id) != caller_identity():
            raise missing_vm(vm_id)

    def _vcpu(self, ref: pb.VcpuRef) -> ManagedVcpu:
        return self._vm(ref.vm_id).vcpu(ref.vcpu_id)

    def _chunk_size(self, requested: int) -> int:
        limit = self.host.limits.max_message_bytes - MESSAGE_OVERHEAD
        return max(1, min(requested or DEFAULT_CHUNK, limit))


