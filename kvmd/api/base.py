"""What every servicer shares: the core Host, the pool for blocking work, the registry of
open streams, and the caller's identity."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc.aio

from kvmd.api.auth import current_identity
from kvmd.api.interceptors import run_blocking
from kvmd.api.streams import StreamRegistry, follow
from kvmd.core.errors import InvalidArgument
from kvmd.core.events import Mailbox
from kvmd.core.host import Host
from kvmd.core.vcpu import ManagedVcpu
from kvmd.core.vm import ManagedVm
from kvmd_proto import vmm_pb2 as pb

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


