"""The ``kvmctl demo`` scenario as a library function: boot a tiny guest and report on it.

:func:`run_demo` creates a VM, maps memory, loads :data:`kvmd_client.demo_guest.IMAGE`, points one
vCPU at it in real mode, subscribes to the console (with backlog) and to the VM's events, starts
the VM, waits for the debug exit, collects the console text and the exit counters, and deletes
the VM unless asked to keep it.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmd_client import demo_guest
from kvmd_client.errors import DeadlineExceededError, KvmdError, NotFoundError
from kvmd_client.kvmd_client import KvmdClient, Watch
from kvmd_proto import vmm_pb2

__all__ = ["DemoResult", "console_backlog", "new_demo_vm_id", "run_demo"]

#: How long to wait for the console backlog message once the guest has stopped.
BACKLOG_TIMEOUT = 2.0
#: How long to let the live console stream catch up with the backlog after the guest stopped.
CATCH_UP_TIMEOUT = 2.0


def new_demo_vm_id() -> str:
    """``demo-`` and six random hex digits."""
    return f"demo-{secrets.token_hex(3)}"


@dataclass
class DemoResult:
    """What happened to the demo guest.

    Attributes:
        vm_id: the VM's id.
        console: everything the guest wrote on COM1 (decoded as UTF-8).
        state: the VM state at the end (``stopped`` after a debug exit).
        reason: why it stopped (``debug_exit``), or crashed.
        exit_code: the code written to the debug-exit port, None if there was none.
        exit_counts: per-VM exit counters that are not zero, by reason.
        vcpu_exit_counts: the same per vCPU.
        elapsed_seconds: from StartVm returning to the final event.
        deleted: whether the VM was deleted afterwards.
    """

    vm_id: str
    console: str = ""
    state: str = ""
    reason: str = ""
    exit_code: int | None = None
    exit_counts: dict[str, int] = field(default_factory=dict)
    vcpu_exit_counts: dict[int, dict[str, int]] = field(default_factory=dict)
    elapsed_seconds: float = 0.0
    deleted: bool = False

    @property
    def ok(self) -> bool:
        """True when the guest ran to its debug exit with the expected code."""
        return self.reason == "debug_exit" and self.exit_code == demo_guest.EXIT_CODE

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly summary (vCPU ids become strings, as JSON object keys must)."""
        return {
            "vm_id": self.vm_id,
            "console": self.console,
            "state": self.state,
            "reason": self.reason,
            "exit_code": self.exit_code,
            "expected_exit_code": demo_guest.EXIT_CODE,
            "ok": self.ok,
            "exit_counts": self.exit_counts,
            "vcpu_exit_counts": {str(k): v for k, v in sorted(self.vcpu_exit_counts.items())},
            "elapsed_seconds": round(self.elapsed_seconds, 6),
            "deleted": self.deleted,
        }


def console_backlog(client: KvmdClient, vm_id: str, timeout: float = BACKLOG_TIMEOUT) -> bytes:
    """The VM's buffered console output, without following it (``timeout`` is unused: the
    daemon ends a ``no_follow`` stream right after the backlog)."""
    return client.console_backlog(vm_id)


class _LiveConsole:
    """Reads a console stream on a thread and hands each chunk to ``on_output`` until
    :meth:`finish`, counting what it delivered."""

    def __init__(self, watch: Watch[vmm_pb2.ConsoleOutput],
                 on_output: Callable[[bytes], None] | None) -> None:
        self._watch = watch
        self._on_output = on_output
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._received = bytearray()
        self._finished = False
        self.error: KvmdError | None = None
        self._thread = threading.Thread(target=self._run, name="kvmctl-demo-console",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for chunk in self._watch:
                with self._lock:
                    if self._finished:
                        return
                    if self._on_output is not None:
                        self._on_output(bytes(chunk.data))
                    self._received += chunk.data
                    self._changed.notify_all()
        except KvmdError as e:  # e.g. the VM was deleted under us
            self.error = e

    def finish(self, complete: bytes, timeout: float) -> None:
        """Wait up to ``timeout`` s for the stream to deliver ``complete`` (the backlog), stop
        it, then hand over whatever it did not deliver."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._received) < len(complete) and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(min(remaining, 0.05))
            self._finished = True
            received = bytes(self._received)
        self._watch.cancel()
        if complete.startswith(received) and self._on_output is not None:
            tail = complete[len(received):]
            if tail:
                self._on_output(tail)
        self._thread.join(1.0)


def _nonzero(counts: Any) -> dict[str, int]:
    return {reason: int(n) for reason, n in sorted(counts.items()) if n}


def run_demo(
    client: KvmdClient,
    vm_id: str | None = None,
    *,
    keep: bool = False,
    within: float = 30.0,
    on_output: Callable[[bytes], None] | None = None,
    on_started: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the demo guest in a new VM and report what it did.

    Args:
        client: a connected client.
        vm_id: the VM's id (default: :func:`new_demo_vm_id`); ALREADY_EXISTS if taken.
        keep: leave the VM behind (stopped) instead of deleting it.
        within: give up after this many seconds without the guest stopping
            (DeadlineExceededError; the VM is still deleted unless ``keep``).
        on_output: called with each chunk of console output as it arrives (from a reader
            thread; never concurrently with itself), and once more with anything the live
            stream had not delivered when the guest stopped.
        on_started: called with the VM id once the VM is set up, just before StartVm.

    Raises:
        KvmdError: a request failed (the VM, if it was created, is deleted unless ``keep``).
    """
    vm_id = vm_id or new_demo_vm_id()
    result = DemoResult(vm_id=vm_id)
    client.create_vm(vm_id, {"created-by": "kvmctl-demo"})
    live: _LiveConsole | None = None
    events: Watch[vmm_pb2.VmEvent] | None = None
    try:
        client.add_memory_region(vm_id, 0, demo_guest.MEMORY_SIZE)
        client.write_memory(vm_id, demo_guest.LOAD_ADDRESS, demo_guest.IMAGE)
        client.create_vcpu(vm_id, 0)
        flat = {"base": 0, "selector": 0}
        client.set_sregs(vm_id, 0, {seg: flat for seg in ("cs", "ds", "es", "ss")})
        client.set_regs(vm_id, 0, rip=demo_guest.LOAD_ADDRESS, rsp=demo_guest.STACK_TOP,
                        rflags=0x2)
        # Subscribe before starting. The console backlog covers output written before the
        # daemon has set up the stream; the events stream is known to be subscribed once its
        # first (current-state) event arrived, so it cannot miss the debug exit.
        live = _LiveConsole(client.stream_console(vm_id, backlog=True), on_output)
        events = client.watch_vm(vm_id, include_current=True)
        if events.next(within) is None:
            raise DeadlineExceededError(f"no current-state event from vm {vm_id} "
                                        f"within {within:g}s")
        if on_started is not None:
            on_started(vm_id)
        client.start_vm(vm_id)
        started = time.monotonic()
        deadline = started + within
        while True:
            event = events.next(max(deadline - time.monotonic(), 0.0))
            if event is None:
                raise DeadlineExceededError(
                    f"the demo guest in vm {vm_id} did not stop within {within:g}s")
            if event.type == "debug_exit" or event.state in ("stopped", "crashed"):
                break
        result.elapsed_seconds = time.monotonic() - started
        result.state, result.reason = event.state, event.reason
        if event.HasField("exit_code"):
            result.exit_code = event.exit_code
        backlog = console_backlog(client, vm_id)
        live.finish(backlog, CATCH_UP_TIMEOUT)
        result.console = backlog.decode("utf-8", errors="replace")
        stats = client.exit_stats(vm_id)
        result.exit_counts = _nonzero(stats.total)
        result.vcpu_exit_counts = {v: _nonzero(c.counts) for v, c in sorted(stats.vcpus.items())}
    finally:
        if events is not None:
            events.cancel()
        if live is not None:
            live.finish(b"", 0)
        if not keep:
            try:
                client.delete_vm(vm_id)
            except NotFoundError:
                pass
            result.deleted = True
    return result
