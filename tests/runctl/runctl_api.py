"""A gRPC client for the run-control tests: an in-process daemon on a temporary Unix
socket, stubs, a WatchVm collector and a HandleExits client.

Every unary call gets a deadline (so a daemon bug fails a test instead of hanging it);
waits on guest events use generous timeouts and never assert on speed.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from kvmd_stubs import DefaultTimeout
from polling import wait_until

from kvmd.server import Config, Daemon
from kvmd_proto import vmm_pb2 as pb
from kvmd_proto import vmm_pb2_grpc as rpc

CALL_TIMEOUT = 20.0    # deadline of every unary call
WAIT = 10.0            # how long to wait for a guest to reach a state or an event
STREAM_TIMEOUT = 120.0  # deadline of long-lived streams (watch, console, exit handlers)

Code = grpc.StatusCode


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def vcpu_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vcpu-") and t.is_alive()]


class Watcher:
    """Collects a VM's WatchVm events (include_current=True) in a background thread. Made,
    it has subscribed: it waits for the current state, which the daemon sends only after
    subscribing, so no later change can happen before the watch and be missed."""

    def __init__(self, stub: rpc.VmsStub, vm_id: str) -> None:
        self.call = stub.WatchVm(pb.WatchVmRequest(vm_id=vm_id, include_current=True),
                                 timeout=STREAM_TIMEOUT)
        self.events: list[pb.VmEvent] = []
        self.ended = False
        self.code: grpc.StatusCode | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True, name=f"watch-{vm_id}")
        self._thread.start()
        with self._cond:
            self._cond.wait_for(lambda: self.events or self.ended, WAIT)

    def _read(self) -> None:
        code = Code.OK
        try:
            for event in self.call:
                with self._cond:
                    self.events.append(event)
                    self._cond.notify_all()
        except grpc.RpcError as exc:
            code = exc.code()
        with self._cond:
            self.ended, self.code = True, code
            self._cond.notify_all()

    def types(self) -> list[str]:
        with self._cond:
            return [e.type for e in self.events]

    def wait_for(self, type_: str, nth: int = 1, timeout: float = WAIT) -> pb.VmEvent:
        """The nth event of this type (waiting for it)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.events if e.type == type_]
                if len(found) >= nth:
                    return found[nth - 1]
                left = deadline - time.monotonic()
                if left <= 0 or self.ended:
                    raise AssertionError(f"no {type_!r} event #{nth} within {timeout} s; "
                                         f"saw {[e.type for e in self.events]} "
                                         f"(stream ended: {self.ended}, {self.code})")
                self._cond.wait(left)

    def wait_ended(self, timeout: float = WAIT) -> grpc.StatusCode | None:
        with self._cond:
            self._cond.wait_for(lambda: self.ended, timeout)
            return self.code if self.ended else None

    def cancel(self) -> None:
        self.call.cancel()
        self._thread.join(5)


class ExitHandler:
    """One HandleExits stream: sends the claim, then lets the test read exits and reply.

    `serve(fn)` instead answers every exit with fn(exit) from a background thread.
    """

    def __init__(self, stub: rpc.ExitHandlersStub, vm_id: str, ranges: list[pb.AddressRange],
                 deadline_ms: int = 0, *, first: pb.ExitHandlerMessage | None = None) -> None:
        self._requests: queue.Queue[pb.ExitHandlerMessage | None] = queue.Queue()
        self._requests.put(first or pb.ExitHandlerMessage(claim=pb.ClaimRequest(
            vm_id=vm_id, ranges=ranges, deadline_ms=deadline_ms)))
        self.call = stub.HandleExits(self._outgoing(), timeout=STREAM_TIMEOUT)
        self.incoming: queue.Queue[pb.ExitHandlerEvent | None] = queue.Queue()
        self.ended = threading.Event()
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.served = 0
        self._reader = threading.Thread(target=self._read, daemon=True, name="exit-handler")
        self._reader.start()
        self._server: threading.Thread | None = None

    def _outgoing(self) -> Iterator[pb.ExitHandlerMessage]:
        while True:
            msg = self._requests.get()
            if msg is None:
                return
            yield msg

    def _read(self) -> None:
        code, details = Code.OK, ""
        try:
            for event in self.call:
                self.incoming.put(event)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        self.code, self.details = code, details
        self.ended.set()
        self.incoming.put(None)

    def _next(self, timeout: float) -> pb.ExitHandlerEvent | None:
        try:
            return self.incoming.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message from HandleExits within {timeout} s") from None

    def claimed(self, timeout: float = WAIT) -> pb.Claimed:
        event = self._next(timeout)
        assert event is not None, f"claim refused: {self.code}: {self.details}"
        assert event.WhichOneof("event") == "claimed", event
        return event.claimed

    def next_exit(self, timeout: float = WAIT) -> pb.ExitRequest:
        event = self._next(timeout)
        assert event is not None, f"stream ended: {self.code}: {self.details}"
        assert event.WhichOneof("event") == "exit", event
        return event.exit

    def reply(self, exit_id: int, data: bytes = b"") -> None:
        self._requests.put(pb.ExitHandlerMessage(reply=pb.ExitReply(exit_id=exit_id, data=data)))

    def send(self, msg: pb.ExitHandlerMessage) -> None:
        self._requests.put(msg)

    def serve(self, answer: Callable[[pb.ExitRequest], bytes],
              log: list[pb.ExitRequest] | None = None) -> None:
        """Answer every exit from a background thread until the stream ends."""
        def loop() -> None:
            while True:
                event = self.incoming.get()
                if event is None:
                    return
                if event.WhichOneof("event") != "exit":
                    continue
                if log is not None:
                    log.append(event.exit)
                self.reply(event.exit.exit_id, answer(event.exit))
                self.served += 1
        self._server = threading.Thread(target=loop, daemon=True, name="exit-server")
        self._server.start()

    def close(self) -> None:
        """End our side of the stream (the daemon then ends its side)."""
        self._requests.put(None)

    def cancel(self) -> None:
        """Drop the stream, as a client that dies would."""
        self.call.cancel()

    def wait_ended(self, timeout: float = WAIT) -> grpc.StatusCode | None:
        self.ended.wait(timeout)
        return self.code


def pio(base: int, length: int = 1) -> pb.AddressRange:
    return pb.AddressRange(space=pb.PIO, base=base, length=length)


def mmio(base: int, length: int) -> pb.AddressRange:
    return pb.AddressRange(space=pb.MMIO, base=base, length=length)


class Api:
    """An in-process kvmd on a temporary Unix socket and a client for it."""

    def __init__(self, socket_path: str, **config: Any) -> None:
        self.socket_path = socket_path
        self.address = f"unix://{socket_path}"
        config.setdefault("log_level", "warning")
        self.daemon = Daemon(Config(listen=[self.address], **config))
        self.daemon.start()
        self.channel = grpc.intercept_channel(grpc.insecure_channel(self.address),
                                              DefaultTimeout(CALL_TIMEOUT, streams=False))
        self.vms = rpc.VmsStub(self.channel)
        self.vcpus = rpc.VcpusStub(self.channel)
        self.memory = rpc.MemoryStub(self.channel)
        self.exits = rpc.ExitHandlersStub(self.channel)
        self.ioevents = rpc.IoEventsStub(self.channel)
        self.hypervisor = rpc.HypervisorStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self._watchers: list[Watcher] = []
        self._handlers: list[ExitHandler] = []
        self._stopped = False

    def stop_daemon(self) -> None:
        """Stop the daemon (once), with whatever clients are still attached."""
        if not self._stopped:
            self._stopped = True
            self.daemon.stop()

    def close(self) -> None:
        for w in self._watchers:
            w.call.cancel()
        for h in self._handlers:
            h.call.cancel()
        self.channel.close()
        self.stop_daemon()

    # -- health and errors ----------------------------------------------------------------

    def assert_healthy(self) -> None:
        resp = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        assert self.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=10).api_version == 12
        self.vms.ListVms(pb.ListVmsRequest(), timeout=10)

    def assert_code(self, fn: Callable[[], Any], code: grpc.StatusCode) -> grpc.RpcError:
        """`fn()` must fail with exactly `code` (with kvmd's ErrorInfo details); then the
        daemon must still be healthy."""
        try:
            fn()
        except grpc.RpcError as exc:
            err = exc
        else:
            raise AssertionError(f"expected {code.name}, the call succeeded")
        got = err.code()
        assert got == code, f"expected {code.name}, got {got.name}: {err.details()}"
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
        assert status is not None, f"{code.name} without rich status details"
        infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
        assert infos, f"{code.name} without google.rpc.ErrorInfo"
        self.assert_healthy()
        return err

    # -- VMs and guests -------------------------------------------------------------------

    def create_vm(self, vm_id: str, **options: Any) -> pb.Vm:
        return self.vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id,
                                                    options=pb.VmOptions(**options)))

    def write(self, vm_id: str, addr: int, data: bytes) -> None:
        self.memory.WriteGuestMemory(iter([pb.WriteGuestMemoryRequest(
            vm_id=vm_id, guest_addr=addr, data=data)]))

    def read(self, vm_id: str, addr: int, length: int) -> bytes:
        return b"".join(c.data for c in self.memory.ReadGuestMemory(
            pb.ReadGuestMemoryRequest(vm_id=vm_id, guest_addr=addr, length=length),
            timeout=CALL_TIMEOUT))

    def setup_real_mode(self, vm_id: str, vcpu_id: int, entry: int, **regs: int) -> None:
        ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=vcpu_id)
        sregs = self.vcpus.GetSregs(ref)
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            getattr(sregs, name).base = 0
            getattr(sregs, name).selector = 0
        self.vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref, sregs=sregs))
        regs.setdefault("rsp", 0x8000)
        self.vcpus.SetRegs(pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(rip=entry, rflags=2,
                                                                      **regs)))

    def boot(self, vm_id: str, code: bytes | dict[int, bytes], *, entries: dict[int, int]
             | None = None, mem_size: int = 0x10000, **options: Any) -> pb.Vm:
        """A real-mode VM: RAM at 0, `code` at 0x1000 (or {addr: code}), one vCPU per
        entry of `entries` ({vcpu_id: entry}; default {0: 0x1000}). Not started."""
        vm = self.create_vm(vm_id, **options)
        self.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(vm_id=vm_id, guest_addr=0,
                                                              size=mem_size))
        blobs = code if isinstance(code, dict) else {0x1000: code}
        for addr, blob in blobs.items():
            self.write(vm_id, addr, blob)
        for vcpu_id, entry in (entries or {0: 0x1000}).items():
            self.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=vcpu_id))
            self.setup_real_mode(vm_id, vcpu_id, entry)
        return vm

    def watch(self, vm_id: str) -> Watcher:
        watcher = Watcher(self.vms, vm_id)
        self._watchers.append(watcher)
        return watcher

    def handler(self, vm_id: str, ranges: list[pb.AddressRange], deadline_ms: int = 0,
                **kw: Any) -> ExitHandler:
        handler = ExitHandler(self.exits, vm_id, ranges, deadline_ms, **kw)
        self._handlers.append(handler)
        return handler

    # -- run control shorthands -----------------------------------------------------------

    def start(self, vm_id: str) -> pb.Vm:
        return self.vms.StartVm(pb.VmRef(vm_id=vm_id))

    def pause(self, vm_id: str) -> pb.Vm:
        return self.vms.PauseVm(pb.VmRef(vm_id=vm_id))

    def resume(self, vm_id: str) -> pb.Vm:
        return self.vms.ResumeVm(pb.VmRef(vm_id=vm_id))

    def stop(self, vm_id: str) -> pb.Vm:
        return self.vms.StopVm(pb.VmRef(vm_id=vm_id))

    def delete(self, vm_id: str) -> None:
        self.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id))

    def get_vm(self, vm_id: str) -> pb.Vm:
        return self.vms.GetVm(pb.GetVmRequest(vm_id=vm_id))

    def regs(self, vm_id: str, vcpu_id: int = 0) -> pb.Regs:
        return self.vcpus.GetRegs(pb.VcpuRef(vm_id=vm_id, vcpu_id=vcpu_id))

    def set_regs(self, vm_id: str, regs: pb.Regs, vcpu_id: int = 0) -> pb.Regs:
        return self.vcpus.SetRegs(pb.SetRegsRequest(
            vcpu=pb.VcpuRef(vm_id=vm_id, vcpu_id=vcpu_id), regs=regs))

    def vcpu_state(self, vm_id: str, vcpu_id: int = 0) -> pb.Vcpu:
        return self.vcpus.GetVcpuState(pb.VcpuRef(vm_id=vm_id, vcpu_id=vcpu_id))

    def stats(self, vm_id: str) -> pb.ExitStats:
        return self.vms.GetExitStats(pb.VmRef(vm_id=vm_id))

    def wait_vm_state(self, vm_id: str, state: str, timeout: float = WAIT) -> pb.Vm:
        last: list[pb.Vm] = []

        def reached() -> pb.Vm | None:
            vm = self.get_vm(vm_id)
            last[:] = [vm]
            return vm if vm.state == state else None
        try:
            return wait_until(reached, timeout, f"vm {vm_id} to be {state}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen: {last[0] if last else None}") from None

    def wait_vcpu_state(self, vm_id: str, state: str, vcpu_id: int = 0,
                        timeout: float = WAIT) -> pb.Vcpu:
        return wait_until(
            lambda: (v := self.vcpu_state(vm_id, vcpu_id)).state == state and v,
            timeout, f"vcpu {vcpu_id} of {vm_id} to be {state}")
