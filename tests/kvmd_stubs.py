"""gRPC client plumbing shared by the test layers: a stub per kvmd service on one channel,
and an interceptor that gives calls a default deadline so a daemon bug fails a test instead
of hanging it. (A uniquely named module: importable from every test directory.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from kvmd_proto import vmm_pb2_grpc as rpc


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class DefaultTimeout(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Give calls that set no deadline `timeout` seconds; with `streams=False`, only calls
    with a single response (long-lived streams then set their own deadline)."""

    def __init__(self, timeout: float, streams: bool = True) -> None:
        self.timeout = timeout
        self.streams = streams

    def _details(self, details: Any, streaming_response: bool = False) -> Any:
        if details.timeout is not None or (streaming_response and not self.streams):
            return details
        return _CallDetails(details.method, self.timeout, details.metadata,
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details, True), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details, True), requests)


@dataclass
class Stubs:
    """One channel and a stub per kvmd service (plus health)."""

    channel: grpc.Channel
    hypervisor: rpc.HypervisorStub
    vms: rpc.VmsStub
    memory: rpc.MemoryStub
    interrupts: rpc.InterruptsStub
    ioevents: rpc.IoEventsStub
    vcpus: rpc.VcpusStub
    exits: rpc.ExitHandlersStub
    health: health_pb2_grpc.HealthStub
    snapshots: rpc.SnapshotsStub
    migration: rpc.MigrationStub

    @classmethod
    def of(cls, channel: grpc.Channel) -> Any:
        return cls(channel, rpc.HypervisorStub(channel), rpc.VmsStub(channel),
                   rpc.MemoryStub(channel), rpc.InterruptsStub(channel),
                   rpc.IoEventsStub(channel), rpc.VcpusStub(channel),
                   rpc.ExitHandlersStub(channel), health_pb2_grpc.HealthStub(channel),
                   rpc.SnapshotsStub(channel), rpc.MigrationStub(channel))

    def close(self) -> None:
        self.channel.close()
