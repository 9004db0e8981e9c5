"""A typed Python client for the kvmd daemon (proto/vmm.proto, package kvmd.v1).

Usage::

    from kvmd_client import KvmdClient

    with KvmdClient("unix:///run/kvmd/kvmd.sock") as kvm:
        kvm.wait_ready(5)
        kvm.create_vm("vm1", labels={"team": "infra"}, irqchip=True)
        kvm.add_memory_region("vm1", 0x0, 2 << 20)
        kvm.write_memory("vm1", 0x1000, b"\\xf4")          # hlt
        kvm.create_vcpu("vm1", 0)
        kvm.set_regs("vm1", 0, rip=0x1000, rflags=0x2)   # merged with the current registers

Conventions:

- Methods return the generated protobuf messages (typed by ``vmm_pb2.pyi``); list RPCs return
  Python lists; responses that wrap a single value are unwrapped (``check_extension`` -> int,
  ``get_mp_state`` -> state name, ``get_lapic`` -> bytes, ``get_msrs`` -> ``{index: value}``).
- Setters take either a message or a mapping of field names; a mapping (and keyword fields) is
  a partial update merged with the vCPU's current state.
- Every ``grpc.RpcError`` is raised as a :class:`kvmd_client.errors.KvmdError` subclass.
- Every call has a default deadline except the streams meant to stay open (watches, the
  console, exit handlers, migrations); idempotent calls are retried on UNAVAILABLE; open
  calls are kept alive with pings. :mod:`kvmd_client.channel` has the details.
- Daemon restarts and upgrades (kvmd hands its VMs over to a new process) show as a short
  UNAVAILABLE: within ``retry_timeout`` the client retries idempotent calls, and any call the
  daemon refused unexecuted during a hand-over, and re-opens watch and console streams (a
  console resumes at its offset: no byte repeated or lost) and exit handler claims.
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmd_client._convert import coerce, merge_into
from kvmd_client.channel import (
    DEFAULT_TIMEOUT,
    DEFAULT_TRANSFER_TIMEOUT,
    MAX_MESSAGE_BYTES,
)
from kvmd_client.channel import channel_options as _channel_options
from kvmd_client.errors import (
    CancelledError,
    DeadlineExceededError,
    KvmdError,
    UnavailableError,
    from_rpc_error,
)
from kvmd_proto import vmm_pb2, vmm_pb2_grpc

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_RETRY_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TRANSFER_TIMEOUT",
    "MAX_MESSAGE_BYTES",
    "ConsoleWatch",
    "DirtyLog",
    "ExitHandlerSession",
    "KvmdClient",
    "Watch",
    "address_range",
    "irqchip_route",
    "msi_route",
    "normalize_address",
]

#: The daemon's default listening socket.
DEFAULT_ADDRESS = "unix:///run/kvmd/kvmd.sock"
#: Bytes per streamed chunk of guest memory (well below the 4 MiB default message limit).
DEFAULT_CHUNK_SIZE = 1 << 20
#: How long calls and streams ride out a daemon restart or hand-over by default (seconds).
DEFAULT_RETRY_TIMEOUT = 30.0
# Trailing metadata of the daemon: a call refused, unexecuted, during a hand-over; why a
# stream ended (kvmd/api/gate.py, kvmd/api/streams.py).
_RETRY_KEY, _RETRY_HANDOVER = "kvmd-retry", "handover"
_END_KEY, _RESTART_ENDS = "kvmd-stream-end", ("shutdown", "lagged")
# Unary calls that may run twice with the same effect: retried on any UNAVAILABLE.
_IDEMPOTENT_PREFIXES = ("Get", "List", "Check", "Set", "Sync", "Measure")
_FIRST_BACKOFF, _MAX_BACKOFF = 0.05, 1.0

T = TypeVar("T")
Req = TypeVar("Req")
Resp = TypeVar("Resp")

_CHIPS = {
    "pic-master": "PIC_MASTER",
    "pic_master": "PIC_MASTER",
    "pic-slave": "PIC_SLAVE",
    "pic_slave": "PIC_SLAVE",
    "ioapic": "IOAPIC",
}
_SPACES = {"pio": "PIO", "mmio": "MMIO"}


def normalize_address(address: str) -> tuple[str, bool]:
    """Return ``(grpc_target, is_unix)`` for a kvmd address.

    Accepts ``unix:///abs/path`` (the gRPC form), ``unix:relative/path``, a bare absolute path
    (``/run/kvmd/kvmd.sock``), ``host:port`` and ``tcp://host:port``.
    """
    address = address.strip()
    if not address:
        raise ValueError("empty address")
    if address.startswith(("unix:", "unix-abstract:")):
        return address, True
    if address.startswith("/"):
        return f"unix://{address}", True
    if address.startswith("tcp://"):
        return address[len("tcp://") :], False
    return address, False


def irqchip_route(gsi: int, chip: str | int, pin: int) -> vmm_pb2.IrqRoute:
    """A GSI route to an in-kernel irqchip pin; ``chip`` is pic-master, pic-slave or ioapic."""
    if isinstance(chip, str):
        try:
            chip_name = _CHIPS[chip.lower()]
        except KeyError:
            raise ValueError(
                f"unknown irqchip {chip!r} (choose pic-master, pic-slave or ioapic)"
            ) from None
    else:
        chip_name = vmm_pb2.IrqChipPin.Chip.Name(chip)
    return vmm_pb2.IrqRoute(gsi=gsi, irqchip=vmm_pb2.IrqChipPin(chip=chip_name, pin=pin))


def msi_route(gsi: int, address: int, data: int, devid: int | None = None) -> vmm_pb2.IrqRoute:
    """A GSI route that delivers an MSI (address/data, optional device id)."""
    return vmm_pb2.IrqRoute(gsi=gsi, msi=_msi(address, data, devid))


def _msi(address: int, data: int, devid: int | None) -> vmm_pb2.MsiMessage:
    msi = vmm_pb2.MsiMessage(address=address, data=data)
    if devid is not None:
        msi.devid = devid
    return msi


def runs_to_bitmap(runs: Iterable[tuple[int, int]], total_pages: int) -> bytearray:
    """A dirty bitmap (bit i, least significant first: page i) from (first page, pages)
    runs: whole bytes at once inside a run, so the cost follows the bitmap and the runs."""
    bitmap = bytearray((total_pages + 7) // 8)
    for first, pages in runs:
        end = first + pages
        while first < end and first % 8:
            bitmap[first >> 3] |= 1 << (first & 7)
            first += 1
        whole = (end - first) // 8
        if whole:
            bitmap[first >> 3:(first >> 3) + whole] = b"\xff" * whole
            first += whole * 8
        while first < end:
            bitmap[first >> 3] |= 1 << (first & 7)
            first += 1
    return bitmap


@dataclass(frozen=True)
class DirtyLog:
    """A slot's dirty-page bitmap (one bit per page, LSB first), as read by ``GetDirtyLog``.

    Unpacks as ``bitmap, dirty_count = client.dirty_log(vm, slot)``.
    """

    slot: int
    bitmap: bytes
    dirty_count: int
    total_pages: int

    def __iter__(self) -> Iterator[Any]:
        return iter((self.bitmap, self.dirty_count))

    def pages(self) -> list[int]:
        """Indices (within the slot) of the dirty pages, ascending."""
        return _set_bits(self.bitmap, 0, self.total_pages)


def _set_bits(bitmap: bytes, first_page: int, limit: int) -> list[int]:
    pages: list[int] = []
    for offset, byte in enumerate(bitmap):
        if not byte:
            continue
        base = first_page + offset * 8
        for bit in range(8):
            if byte >> bit & 1 and base + bit < limit:
                pages.append(base + bit)
    return pages


def _metadata(call: Any, key: str) -> str:
    try:
        pairs = call.trailing_metadata() or ()
    except Exception:
        return ""
    return next((str(v) for k, v in pairs if k == key), "")


class _Reconnect:
    """Backoff and deadline of one attempt to ride out a daemon restart."""

    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.backoff = _FIRST_BACKOFF

    def wait(self, cancelled: threading.Event | None = None) -> bool:
        """Sleep before the next attempt; False once the deadline passed (or cancelled)."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            return False
        pause = min(left, self.backoff * (0.5 + random.random() / 2))
        self.backoff = min(self.backoff * 2, _MAX_BACKOFF)
        if cancelled is not None:
            return not cancelled.wait(pause)
        time.sleep(pause)
        return True


class Watch(Generic[T]):
    """A cancellable iterator over a server stream (``watch_ioevents``, ...).

    Iterate it for events; call :meth:`cancel` (from any thread) or leave its ``with`` block to
    end the stream, after which iteration stops quietly. Other stream failures are raised as
    :class:`KvmdError`.

    Given ``reopen`` (a function opening the stream again) it survives a daemon restart or
    hand-over: a stream the daemon ended because it is going away (trailing metadata
    ``kvmd-stream-end: shutdown``), or that broke with UNAVAILABLE, is opened again, for up
    to ``retry_timeout`` seconds; events in between are not replayed (a re-opened
    ``watch_vm`` starts with the current state).
    """

    def __init__(self, call: Any, reopen: Callable[[], Any] | None = None,
                 retry_timeout: float = 0.0) -> None:
        self._call = call
        self._cancelled = threading.Event()
        self._reopen = reopen
        self._retry_timeout = retry_timeout
        self._lock = threading.Lock()
        #: Times the stream was opened again after a daemon restart or hand-over.
        self.reopened = 0

    def __iter__(self) -> Watch[T]:
        return self

    def __next__(self) -> T:
        retry: _Reconnect | None = None
        while True:
            try:
                item: T = next(self._call)
            except StopIteration:
                if self._cancelled.is_set() or self._reopen is None or \
                        _metadata(self._call, _END_KEY) not in _RESTART_ENDS:
                    raise
                retry = retry or _Reconnect(self._retry_timeout)
                if not retry.wait(self._cancelled):
                    raise
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                if self._cancelled.is_set() and isinstance(error, CancelledError):
                    raise StopIteration from None
                if self._reopen is None or not isinstance(error, UnavailableError):
                    raise error from e
                retry = retry or _Reconnect(self._retry_timeout)
                if not retry.wait(self._cancelled):
                    if self._cancelled.is_set():
                        raise StopIteration from None
                    raise error from e
            else:
                self._seen(item)
                return item
            with self._lock:
                if self._cancelled.is_set():
                    raise StopIteration
                self._call = self._reopen()
                self.reopened += 1

    def _seen(self, item: T) -> None:
        """Called with every item received (resumable streams note their position)."""

    def next(self, timeout: float | None = None) -> T | None:
        """The next event, or None if ``timeout`` seconds pass (the stream is then cancelled)
        or the stream ended."""
        timer = threading.Timer(timeout, self.cancel) if timeout is not None else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            return next(self, None)
        finally:
            if timer is not None:
                timer.cancel()

    def cancel(self) -> None:
        """End the stream; a blocked ``next()`` returns with StopIteration."""
        self._cancelled.set()
        with self._lock:
            self._call.cancel()

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._cancelled.is_set()

    def collect(self, count: int | None = None, duration: float | None = None) -> list[T]:
        """Gather events until ``count`` arrived or ``duration`` seconds passed, then cancel."""
        timer = threading.Timer(duration, self.cancel) if duration is not None else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        events: list[T] = []
        try:
            for event in self:
                events.append(event)
                if count is not None and len(events) >= count:
                    break
        finally:
            if timer is not None:
                timer.cancel()
            self.cancel()
        return events

    def __enter__(self) -> Watch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class ConsoleWatch(Watch[vmm_pb2.ConsoleOutput]):
    """A console stream that resumes where it was after a daemon restart or hand-over: it
    re-opens at the offset after the last byte received (``StreamConsoleRequest.from_offset``),
    so no byte is repeated, and none is lost while the daemon's backlog still holds it (a
    message whose ``offset`` is past :attr:`next_offset` shows a gap)."""

    def __init__(self, open_at: Callable[[int], Any], retry_timeout: float,
                 from_offset: int = 0) -> None:
        self.next_offset = from_offset  # 0 until the first message: unknown
        self._open_at = open_at
        super().__init__(open_at(from_offset), lambda: self._open_at(self.next_offset),
                         retry_timeout)

    def _seen(self, item: vmm_pb2.ConsoleOutput) -> None:
        self.next_offset = item.offset + len(item.data)


def address_range(space: str | int, base: int, length: int) -> vmm_pb2.AddressRange:
    """A PIO or MMIO address range for :meth:`KvmdClient.handle_exits`."""
    return vmm_pb2.AddressRange(space=_space_name(space), base=base, length=length)


def _space_name(space: str | int) -> str:
    if isinstance(space, str):
        try:
            return _SPACES[space.lower()]
        except KeyError:
            raise ValueError(f"unknown address space {space!r} (pio or mmio)") from None
    return vmm_pb2.AddressSpace.Name(space)


class ExitHandlerSession(Watch[vmm_pb2.ExitRequest]):
    """PIO/MMIO ranges of a VM claimed by this client (remote device emulation).

    Iterate it for :class:`ExitRequest` s (each a guest access that waits for an answer),
    and answer each with :meth:`reply` (the read data; nothing for writes) before the claim's
    deadline. :meth:`serve` does both with a callback. Leaving the ``with`` block (or
    :meth:`close`) releases the claims after the queued replies went out; :meth:`cancel`
    releases them at once.

    Attributes:
        handler_id: the daemon's id for this handler.
        ranges: the claimed ranges as the daemon confirmed them.
    """

    def __init__(self, method: Callable[..., Any], claim: vmm_pb2.ClaimRequest,
                 retry_timeout: float = 0.0) -> None:
        self._method = method
        self._claim = claim
        self._outbox: queue.Queue[vmm_pb2.ExitHandlerMessage | None] = queue.Queue()
        self._open_exits: set[int] = set()
        super().__init__(self._open(), self._reclaim if retry_timeout else None,
                         retry_timeout)
        self._confirm()

    def _open(self) -> Any:
        """Open the stream with the claim as its first message (a fresh outbox each time:
        replies queued for a stream that ended are dropped with it)."""
        outbox: queue.Queue[vmm_pb2.ExitHandlerMessage | None] = queue.Queue()
        outbox.put(vmm_pb2.ExitHandlerMessage(claim=self._claim))
        self._outbox.put(None)  # ends the previous stream's requests
        self._outbox = outbox
        self._open_exits = set()

        def requests() -> Iterator[vmm_pb2.ExitHandlerMessage]:
            while (message := outbox.get()) is not None:
                yield message

        try:
            return self._method(requests())
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    def _confirm(self) -> None:
        try:
            first = next(self._call)
        except grpc.RpcError as e:
            self._outbox.put(None)
            raise from_rpc_error(e) from e
        except StopIteration:
            self._outbox.put(None)
            raise KvmdError("the daemon ended the exit handler stream before confirming "
                            "the claim", code=grpc.StatusCode.UNKNOWN) from None
        self.handler_id: str = first.claimed.handler_id
        self.ranges: list[vmm_pb2.AddressRange] = list(first.claimed.ranges)

    def _reclaim(self) -> Any:
        """The daemon restarted or handed over: claim the same ranges again (the new
        daemon's first message confirms them, with a new handler id: see __next__)."""
        return self._open()

    def __next__(self) -> vmm_pb2.ExitRequest:
        while True:
            event: Any = super().__next__()
            if event.WhichOneof("event") == "claimed":  # after a re-claim
                self.handler_id = event.claimed.handler_id
                continue
            if event.WhichOneof("event") == "exit":
                exit_request: vmm_pb2.ExitRequest = event.exit
                self._open_exits.add(exit_request.exit_id)
                return exit_request

    def reply(self, exit_id: int, data: bytes = b"") -> None:
        """Answer one exit: ``data`` is exactly the access size for reads, empty for writes.
        A reply to an exit of a stream that ended since (a daemon restart) is dropped: that
        access was completed without it."""
        if exit_id not in self._open_exits:
            return
        self._open_exits.discard(exit_id)
        reply = vmm_pb2.ExitReply(exit_id=exit_id, data=bytes(data))
        self._outbox.put(vmm_pb2.ExitHandlerMessage(reply=reply))

    def serve(
        self,
        handler: Callable[[vmm_pb2.ExitRequest], bytes | None],
        count: int | None = None,
    ) -> int:
        """Answer exits with ``handler(exit)`` (read data, or None) until the stream ends or
        ``count`` exits were handled; returns the number handled."""
        handled = 0
        for exit_request in self:
            self.reply(exit_request.exit_id, handler(exit_request) or b"")
            handled += 1
            if count is not None and handled >= count:
                break
        return handled

    def close(self, timeout: float = 2.0) -> None:
        """Release the claims gracefully: finish sending queued replies, half-close, and wait
        up to ``timeout`` seconds for the daemon to end the stream (then cancel it)."""
        self._reopen = None
        self._outbox.put(None)
        timer = threading.Timer(timeout, super().cancel)
        timer.daemon = True
        timer.start()
        try:
            for _ in self:  # exits arriving now cannot be answered: the vCPU times out
                pass
        except KvmdError:
            pass
        finally:
            timer.cancel()
            super().cancel()

    def cancel(self) -> None:
        """Release the claims at once, dropping replies not yet sent."""
        self._reopen = None
        self._outbox.put(None)
        super().cancel()

    def __exit__(self, *exc: object) -> None:
        self.close()


_UNSET: Any = object()


class KvmdClient:
    """A connection to one kvmd daemon, with a typed method for every kvmd.v1 RPC.

    Args:
        address: ``unix:///path.sock`` (default ``unix:///run/kvmd/kvmd.sock``), a bare
            absolute socket path, or ``host:port`` for TCP.
        tls_ca: PEM file of the CA that signed the daemon's certificate; with a TCP address it
            turns on TLS.
        tls_cert: PEM client certificate (mutual TLS), with ``tls_key``.
        tls_key: PEM private key of ``tls_cert``.
        tls_server_name: expected server name when it differs from the host in ``address``.
        timeout: deadline in seconds of unary calls (None: none).
        transfer_timeout: deadline in seconds of transfers: guest memory and dirty-log
            streams, snapshots, restores, console backlogs (None: none).
        retry_timeout: how long to ride out a daemon restart or hand-over, in seconds (0:
            never retry). Idempotent unary calls (Get*, List*, Check*, Set*, Sync*,
            Measure*, the health check) are retried on UNAVAILABLE, any unary call the daemon
            refused unexecuted during a hand-over (``kvmd-retry: handover``) or that could not
            reach it, each within its own deadline; watch, console and exit handler streams
            are re-opened. A client that never reached the daemon, on a Unix socket that does
            not exist, is not kept waiting (no daemon runs there): only gRPC's own short
            retries apply.
        channel_options: gRPC channel arguments added to, or replacing, the client's own
            (:func:`kvmd_client.channel.channel_options`).

    Watches, followed consoles, exit handlers and migrations have no default deadline (see
    :mod:`kvmd_client.channel`, which also describes gRPC's own retries of short outages and
    the keepalive).
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_server_name: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        transfer_timeout: float | None = DEFAULT_TRANSFER_TIMEOUT,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        target, is_unix = normalize_address(address)
        self.address = address
        self.target = target
        self.timeout = timeout
        self.transfer_timeout = transfer_timeout
        self.retry_timeout = retry_timeout
        self._socket_path = _unix_path(target) if is_unix else None
        self._reached = False  # some call got an answer from a daemon
        options = _channel_options(channel_options)
        use_tls = tls_ca is not None or tls_cert is not None or tls_key is not None
        if use_tls:
            if is_unix:
                raise ValueError("TLS options apply to TCP addresses, not Unix sockets")
            if (tls_cert is None) != (tls_key is None):
                raise ValueError("tls_cert and tls_key go together")
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca),
                private_key=_read(tls_key),
                certificate_chain=_read(tls_cert),
            )
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._raw_channel = self._channel
        if retry_timeout > 0:
            self._channel = grpc.intercept_channel(self._channel, _RetryInterceptor(self))
        self.tls = use_tls
        #: The channel arguments the client's channel was made with.
        self.channel_options: list[tuple[str, Any]] = options
        self._hypervisor = vmm_pb2_grpc.HypervisorStub(self._channel)
        self._vms = vmm_pb2_grpc.VmsStub(self._channel)
        self._memory = vmm_pb2_grpc.MemoryStub(self._channel)
        self._interrupts = vmm_pb2_grpc.InterruptsStub(self._channel)
        self._ioevents = vmm_pb2_grpc.IoEventsStub(self._channel)
        self._vcpus = vmm_pb2_grpc.VcpusStub(self._channel)
        self._exit_handlers = vmm_pb2_grpc.ExitHandlersStub(self._channel)
        self._snapshots = vmm_pb2_grpc.SnapshotsStub(self._channel)
        self._migration = vmm_pb2_grpc.MigrationStub(self._channel)
        self._handover = vmm_pb2_grpc.HandoverStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; in-flight calls and watches are cancelled."""
        self._raw_channel.close()

    def __enter__(self) -> KvmdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KvmdClient({self.address!r}, tls={self.tls})"

    # -- plumbing --------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is _UNSET else timeout

    def _unary(self, method: Callable[..., Resp], request: Any, timeout: Any = _UNSET) -> Resp:
        try:
            return method(request, timeout=self._deadline(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    def _server_stream(self, method: Callable[..., Any], request: Any,
                       timeout: float | object | None = ...) -> Iterator[Any]:
        """Iterate a transfer's server stream (memory, dirty log, snapshot; `timeout`: the
        whole stream's deadline, by default ``transfer_timeout``); stopping early cancels
        the call."""
        try:
            call = method(request, timeout=self.transfer_timeout if timeout is ... else timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        try:
            yield from call
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            call.cancel()  # no-op once complete; ends the stream if the caller stopped early

    def _watch(self, method: Callable[..., Any], request: Any, timeout: float | None,
               reopen_request: Any = None) -> Watch[T]:
        """A server stream, re-opened (with `reopen_request` if given) after a daemon
        restart or hand-over within retry_timeout."""
        again = reopen_request if reopen_request is not None else request
        try:
            return Watch(method(request, timeout=timeout),
                         (lambda: method(again, timeout=timeout)) if self.retry_timeout
                         else None, self.retry_timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    # -- retries across daemon restarts ----------------------------------------------------

    def _may_retry(self, method: str, call: Any) -> bool:
        """Whether a unary call that failed with UNAVAILABLE may be sent again."""
        if _metadata(call, _RETRY_KEY) == _RETRY_HANDOVER:
            return True  # refused during a hand-over: it did nothing
        if not self._reached and self._socket_path is not None and \
                not os.path.exists(self._socket_path):
            return False  # no daemon here, and none ever answered this client
        if not self._reached and self._socket_path is None:
            return False  # TCP: a daemon that never answered (address, TLS) is not coming
        short = method.rsplit("/", 1)[-1]
        if short.startswith(_IDEMPOTENT_PREFIXES):
            return True
        details = (call.details() or "").lower()
        return "failed to connect" in details  # never sent

    # -- health ----------------------------------------------------------------------------

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status of ``service`` ("" = the daemon), e.g. ``"SERVING"``."""
        response = self._unary(
            self._health.Check, health_pb2.HealthCheckRequest(service=service)
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the daemon reports SERVING on the health service.

        Raises:
            UnavailableError: not SERVING within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UnavailableError(
                    f"kvmd at {self.target} not ready after {timeout:g}s ({last})"
                )
            try:
                response = self._health.Check(
                    health_pb2.HealthCheckRequest(service=""),
                    timeout=min(remaining, 1.0),
                    wait_for_ready=True,
                )
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                if not isinstance(error, (UnavailableError, DeadlineExceededError)):
                    raise error from e
                last = str(error)
            else:
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))

    # -- Hypervisor ------------------------------------------------------------------------

    def info(self) -> vmm_pb2.HypervisorInfo:
        """KVM API version, capabilities by name, vCPU mmap size, limits, daemon version."""
        return self._unary(self._hypervisor.GetInfo, vmm_pb2.GetInfoRequest())

    def check_extension(self, capability: str | int, vm_id: str | None = None) -> int:
        """KVM_CHECK_EXTENSION for a capability name ("KVM_CAP_IRQFD"/"irqfd") or number.

        With ``vm_id`` the question is asked on that VM's fd. Returns the value (0 = absent).
        """
        request = vmm_pb2.CheckExtensionRequest(vm_id=vm_id or "")
        if isinstance(capability, int):
            request.number = capability
        else:
            request.name = capability
        return self._unary(self._hypervisor.CheckExtension, request).value

    def supported_cpuid(self) -> list[vmm_pb2.CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID: the CPUID entries this host can give a guest."""
        response = self._unary(
            self._hypervisor.GetSupportedCpuid, vmm_pb2.GetSupportedCpuidRequest()
        )
        return list(response.entries)

    # -- Vms -------------------------------------------------------------------------------

    def create_vm(
        self,
        vm_id: str,
        labels: Mapping[str, str] | None = None,
        *,
        irqchip: bool = False,
        pit: bool = False,
        tss_address: int = 0,
        identity_map_address: int = 0,
        dirty_tracking: str = "",
        dirty_ring_bytes: int = 0,
    ) -> vmm_pb2.Vm:
        """Create a VM with a caller-chosen id (ALREADY_EXISTS if taken).

        ``irqchip`` creates the in-kernel PIC/IOAPIC/LAPIC; ``pit`` the in-kernel PIT (needs
        ``irqchip``). Zero addresses mean the daemon's defaults. ``dirty_tracking`` is
        "bitmap" (default), "manual" or "ring" (see ``info().dirty_log_modes``).
        """
        request = vmm_pb2.CreateVmRequest(
            vm_id=vm_id,
            labels=dict(labels or {}),
            options=vmm_pb2.VmOptions(
                irqchip=irqchip,
                pit=pit,
                tss_address=tss_address,
                identity_map_address=identity_map_address,
                dirty_tracking=dirty_tracking,
                dirty_ring_bytes=dirty_ring_bytes,
            ),
        )
        return self._unary(self._vms.CreateVm, request)

    def get_vm(self, vm_id: str) -> vmm_pb2.Vm:
        """The VM's labels, options, state and resource counts."""
        return self._unary(self._vms.GetVm, vmm_pb2.GetVmRequest(vm_id=vm_id))

    def list_vms(self, labels: Mapping[str, str] | None = None) -> list[vmm_pb2.Vm]:
        """Every VM, or only those carrying all of ``labels`` (all pages)."""
        vms: list[vmm_pb2.Vm] = []
        token = ""
        while True:
            request = vmm_pb2.ListVmsRequest(label_selector=dict(labels or {}),
                                             page_token=token)
            page = self._unary(self._vms.ListVms, request)
            vms += page.vms
            token = page.next_page_token
            if not token:
                return vms

    def delete_vm(self, vm_id: str) -> None:
        """Stop the VM's vCPUs and release everything it owns."""
        self._unary(self._vms.DeleteVm, vmm_pb2.DeleteVmRequest(vm_id=vm_id))

    # -- run control (Vms) -----------------------------------------------------------------

    def start_vm(self, vm_id: str) -> vmm_pb2.Vm:
        """Start every vCPU (created or stopped) in its own daemon thread."""
        return self._unary(self._vms.StartVm, vmm_pb2.VmRef(vm_id=vm_id))

    def pause_vm(self, vm_id: str) -> vmm_pb2.Vm:
        """Kick every running or halted vCPU out of the guest; returns once all are paused."""
        return self._unary(self._vms.PauseVm, vmm_pb2.VmRef(vm_id=vm_id))

    def resume_vm(self, vm_id: str) -> vmm_pb2.Vm:
        """Continue every paused (or halted) vCPU where it stopped."""
        return self._unary(self._vms.ResumeVm, vmm_pb2.VmRef(vm_id=vm_id))

    def stop_vm(self, vm_id: str) -> vmm_pb2.Vm:
        """Stop every vCPU thread; the VM can be inspected or started again."""
        return self._unary(self._vms.StopVm, vmm_pb2.VmRef(vm_id=vm_id))

    def watch_vm(
        self, vm_id: str, *, include_current: bool = False, timeout: float | None = None
    ) -> Watch[vmm_pb2.VmEvent]:
        """A stream of the VM's state changes (started, paused, halted, stopped, crashed,
        debug_exit, ...); with ``include_current``, first one ``state`` event. Re-opened
        after a daemon restart, it starts again with a ``state`` event (the changes in
        between are not replayed)."""
        request = vmm_pb2.WatchVmRequest(vm_id=vm_id, include_current=include_current)
        return self._watch(self._vms.WatchVm, request, timeout,
                           vmm_pb2.WatchVmRequest(vm_id=vm_id, include_current=True))

    def wait_vm(
        self,
        vm_id: str,
        *,
        states: Iterable[str] = ("stopped", "crashed"),
        events: Iterable[str] = (),
        timeout: float = 30.0,
    ) -> vmm_pb2.VmEvent:
        """Block until the VM is in one of ``states`` or one of ``events`` happens.

        Returns the matching event (a ``state`` event if the VM already was there).

        Raises:
            DeadlineExceededError: nothing matched within ``timeout`` seconds.
        """
        wanted_states, wanted_events = set(states), set(events)
        with self.watch_vm(vm_id, include_current=True) as watch:
            deadline = time.monotonic() + timeout
            while True:
                event = watch.next(max(deadline - time.monotonic(), 0.0))
                if event is None:
                    raise DeadlineExceededError(
                        f"vm {vm_id} reached none of states {sorted(wanted_states)} / events "
                        f"{sorted(wanted_events)} within {timeout:g}s"
                    )
                if event.state in wanted_states or event.type in wanted_events:
                    return event

    def exit_stats(self, vm_id: str) -> vmm_pb2.ExitStats:
        """VM exit counters by reason, summed per VM and per vCPU."""
        return self._unary(self._vms.GetExitStats, vmm_pb2.VmRef(vm_id=vm_id))

    def stream_console(
        self, vm_id: str, *, backlog: bool = True, timeout: float | None = None,
        from_offset: int = 0,
    ) -> ConsoleWatch:
        """The guest's COM1 output: the buffered backlog first (with ``backlog``), then live;
        with ``from_offset``, from that offset of everything the guest printed (each
        message's ``offset`` says where its bytes lie). After a daemon restart or hand-over
        the stream resumes after the last byte received."""
        method = self._vms.StreamConsole

        def open_at(offset: int) -> Any:
            request = vmm_pb2.StreamConsoleRequest(vm_id=vm_id, backlog=backlog or offset > 0,
                                                   from_offset=offset)
            return method(request, timeout=timeout)

        try:
            return ConsoleWatch(open_at, self.retry_timeout, from_offset)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    def console_backlog(self, vm_id: str) -> bytes:
        """The buffered console output now, without following it."""
        request = vmm_pb2.StreamConsoleRequest(vm_id=vm_id, backlog=True, no_follow=True)
        try:
            return b"".join(bytes(m.data) for m in self._vms.StreamConsole(
                request, timeout=self.transfer_timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def write_console(self, vm_id: str, data: bytes) -> int:
        """Queue input for the guest's COM1 receiver; returns the bytes accepted."""
        request = vmm_pb2.WriteConsoleRequest(vm_id=vm_id, data=bytes(data))
        return int(self._unary(self._vms.WriteConsole, request).accepted)

    # -- Memory ----------------------------------------------------------------------------

    def add_memory_region(
        self,
        vm_id: str,
        guest_addr: int,
        size: int,
        *,
        read_only: bool = False,
        log_dirty: bool = False,
        file: str | None = None,
        file_offset: int = 0,
    ) -> vmm_pb2.MemoryRegion:
        """Map ``size`` bytes of new zeroed memory at ``guest_addr``; returns it with its slot.

        With ``file`` (a name in the daemon's images directory), the slot is that file from
        ``file_offset`` instead, mapped shared (guest writes reach the file; see
        :meth:`sync_guest_memory`); ``read_only`` then opens and maps the file read-only too.
        """
        request = vmm_pb2.AddMemoryRegionRequest(
            vm_id=vm_id,
            guest_addr=guest_addr,
            size=size,
            read_only=read_only,
            log_dirty=log_dirty,
        )
        if file is not None:
            request.file.CopyFrom(
                vmm_pb2.MemoryFile(name=file, offset=file_offset, read_only=read_only)
            )
        elif file_offset:
            raise ValueError("file_offset needs a file")
        return self._unary(self._memory.AddMemoryRegion, request)

    def remove_memory_region(self, vm_id: str, slot: int) -> vmm_pb2.MemoryRegion:
        """Unmap the slot; returns the region that was removed."""
        request = vmm_pb2.RemoveMemoryRegionRequest(vm_id=vm_id, slot=slot)
        return self._unary(self._memory.RemoveMemoryRegion, request).region

    def list_memory_regions(self, vm_id: str) -> list[vmm_pb2.MemoryRegion]:
        """The VM's memory regions."""
        request = vmm_pb2.ListMemoryRegionsRequest(vm_id=vm_id)
        return list(self._unary(self._memory.ListMemoryRegions, request).regions)

    def write_chunks(self, vm_id: str, guest_addr: int, chunks: Iterable[bytes]) -> int:
        """Stream ``chunks`` into guest memory, one after another from ``guest_addr``.

        Each chunk becomes one message, so keep chunks at or below a few MiB. Returns the number
        of bytes the daemon wrote.
        """

        def requests() -> Iterator[vmm_pb2.WriteGuestMemoryRequest]:
            first = True
            for chunk in chunks:
                if first:
                    yield vmm_pb2.WriteGuestMemoryRequest(
                        vm_id=vm_id, guest_addr=guest_addr, data=bytes(chunk)
                    )
                    first = False
                elif chunk:
                    yield vmm_pb2.WriteGuestMemoryRequest(data=bytes(chunk))
            if first:  # nothing to write: still name the target
                yield vmm_pb2.WriteGuestMemoryRequest(vm_id=vm_id, guest_addr=guest_addr)

        response = self._unary(self._memory.WriteGuestMemory, requests(),
                               timeout=self.transfer_timeout)
        return int(response.bytes_written)

    def write_memory(
        self,
        vm_id: str,
        guest_addr: int,
        data: bytes | bytearray | memoryview,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> int:
        """Write ``data`` at ``guest_addr``, streamed in ``chunk_size`` chunks.

        Host writes do not mark pages dirty. Returns the number of bytes written.
        """
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        view = memoryview(data).cast("B")
        chunks = (view[i : i + chunk_size].tobytes() for i in range(0, len(view), chunk_size))
        return self.write_chunks(vm_id, guest_addr, chunks)

    def write_file(
        self,
        vm_id: str,
        guest_addr: int,
        path: str | os.PathLike[str],
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> int:
        """Stream a file (a kernel image, a test program) into guest memory at ``guest_addr``."""
        with open(path, "rb") as f:
            return self.write_stream(vm_id, guest_addr, f, chunk_size)

    def write_stream(
        self,
        vm_id: str,
        guest_addr: int,
        stream: IO[bytes],
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> int:
        """Stream everything readable from a binary file object into guest memory."""
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        return self.write_chunks(vm_id, guest_addr, iter(lambda: stream.read(chunk_size), b""))

    def iter_memory(
        self, vm_id: str, guest_addr: int, length: int, chunk_size: int = 0
    ) -> Iterator[vmm_pb2.GuestMemoryChunk]:
        """Stream ``length`` bytes from ``guest_addr`` as chunks (default 1 MiB each)."""
        request = vmm_pb2.ReadGuestMemoryRequest(
            vm_id=vm_id, guest_addr=guest_addr, length=length, chunk_size=chunk_size
        )
        return self._server_stream(self._memory.ReadGuestMemory, request)

    def read_memory(
        self, vm_id: str, guest_addr: int, length: int, chunk_size: int = 0
    ) -> bytes:
        """Read ``length`` bytes of guest memory from ``guest_addr``."""
        out = bytearray()
        for chunk in self.iter_memory(vm_id, guest_addr, length, chunk_size):
            out += chunk.data
        if len(out) != length:
            raise KvmdError(
                f"short read: {len(out)} of {length} bytes", code=grpc.StatusCode.DATA_LOSS
            )
        return bytes(out)

    def read_to_file(
        self,
        vm_id: str,
        guest_addr: int,
        length: int,
        path: str | os.PathLike[str],
        chunk_size: int = 0,
    ) -> int:
        """Stream ``length`` bytes of guest memory into a file; returns the bytes written."""
        written = 0
        with open(path, "wb") as f:
            for chunk in self.iter_memory(vm_id, guest_addr, length, chunk_size):
                f.write(chunk.data)
                written += len(chunk.data)
        if written != length:
            raise KvmdError(
                f"short read: {written} of {length} bytes", code=grpc.StatusCode.DATA_LOSS
            )
        return written

    def iter_dirty_log(
        self, vm_id: str, slot: int, chunk_size: int = 0, form: str = "bitmap"
    ) -> Iterator[vmm_pb2.DirtyLogChunk]:
        """Stream the slot's dirty pages in chunks, as a bitmap (default), "ranges", or
        "auto" (whichever is shorter); reading resets the log, as KVM does."""
        request = vmm_pb2.GetDirtyLogRequest(vm_id=vm_id, slot=slot, chunk_size=chunk_size,
                                             form=form.upper())
        return self._server_stream(self._memory.GetDirtyLog, request)

    def poll_dirty_log(self, vm_id: str, slot: int, form: str = "auto"
                       ) -> vmm_pb2.DirtyLogChunk:
        """The slot's whole dirty log as one chunk, in one round trip (``PollDirtyLog``;
        resets the log as KVM does): "auto" (runs or bitmap, whichever is shorter),
        "bitmap" or "ranges". A slot whose log might not fit one message is refused
        (RESOURCE_EXHAUSTED, reason ``LIMIT_MESSAGE``) before its log is read:
        :meth:`iter_dirty_log` streams any size."""
        request = vmm_pb2.PollDirtyLogRequest(vm_id=vm_id, slot=slot, form=form.upper())
        return self._unary(self._memory.PollDirtyLog, request).log

    def dirty_log(self, vm_id: str, slot: int, chunk_size: int = 0) -> DirtyLog:
        """The slot's whole dirty bitmap and dirty-page count (resets the log): in one
        round trip (``PollDirtyLog``) unless the slot is too big for one message (or
        ``chunk_size`` asks for chunks), streamed by ``GetDirtyLog`` then.

        Unpacks as ``bitmap, dirty_count``; ``.pages()`` lists the dirty page indices.
        """
        chunks: Iterable[vmm_pb2.DirtyLogChunk] | None = None
        if not chunk_size:
            try:
                chunks = [self.poll_dirty_log(vm_id, slot)]
            except KvmdError as exc:
                # Too big for one message, or a daemon before PollDirtyLog: nothing was
                # read, so the stream gets every page.
                if exc.reason != "LIMIT_MESSAGE" and \
                        exc.code != grpc.StatusCode.UNIMPLEMENTED:
                    raise
        if chunks is None:
            chunks = self.iter_dirty_log(vm_id, slot, chunk_size, form="auto")
        bitmap = bytearray()
        runs: list[tuple[int, int]] = []  # when the daemon sent runs (the shorter form)
        dirty = 0
        total_dirty: int | None = None
        total_pages = 0
        for chunk in chunks:
            bitmap += chunk.bitmap
            runs += zip(chunk.run_first_pages, chunk.run_pages, strict=True)
            dirty += chunk.dirty_pages
            total_pages = max(total_pages, chunk.total_pages)
            if chunk.last:
                total_dirty = chunk.total_dirty_pages
        if total_pages == 0:
            total_pages = len(bitmap) * 8
        if runs or not bitmap:
            bitmap = runs_to_bitmap(runs, total_pages)
        count = total_dirty if total_dirty is not None else dirty
        return DirtyLog(slot=slot, bitmap=bytes(bitmap), dirty_count=count, total_pages=total_pages)

    def clear_dirty_log(self, vm_id: str, slot: int,
                        ranges: Iterable[tuple[int, int]]) -> None:
        """Manual mode: mark pages clean, as (first_page, pages) ranges."""
        request = vmm_pb2.ClearDirtyLogRequest(vm_id=vm_id, slot=slot, ranges=[
            vmm_pb2.PageRange(first_page=a, pages=n) for a, n in ranges])
        self._unary(self._memory.ClearDirtyLog, request)

    def set_dirty_logging(self, vm_id: str, slot: int, enabled: bool) -> vmm_pb2.MemoryRegion:
        """Turn dirty logging of an existing slot on or off (its memory stays)."""
        request = vmm_pb2.SetDirtyLoggingRequest(vm_id=vm_id, slot=slot, enabled=enabled)
        return self._unary(self._memory.SetDirtyLogging, request)

    def measure_dirty_rate(self, vm_id: str, duration_ms: int = 1000
                           ) -> vmm_pb2.MeasureDirtyRateResponse:
        """The VM's dirty rate over ``duration_ms`` (pages per second)."""
        request = vmm_pb2.MeasureDirtyRateRequest(vm_id=vm_id, duration_ms=duration_ms)
        timeout = None if self.timeout is None else self.timeout + duration_ms / 1000
        return self._unary(self._memory.MeasureDirtyRate, request, timeout)

    def dirty_pages(self, vm_id: str, slot: int) -> list[int]:
        """Indices (within the slot) of the pages dirtied since the last read (resets the log)."""
        return self.dirty_log(vm_id, slot).pages()

    # -- Memory: discard and files of the images directory ---------------------------------

    def discard_guest_memory(self, vm_id: str, guest_addr: int, size: int) -> int:
        """Give the host pages behind ``[guest_addr, guest_addr+size)`` back (balloon
        inflate; page aligned, not file-backed). The range reads zeros afterwards; the guest
        touching it again gets fresh pages. Returns the bytes of host memory released."""
        request = vmm_pb2.DiscardGuestMemoryRequest(vm_id=vm_id, guest_addr=guest_addr, size=size)
        return int(self._unary(self._memory.DiscardGuestMemory, request).released_bytes)

    def map_guest_memory(
        self,
        vm_id: str,
        slot: int,
        offset: int,
        size: int,
        file: str,
        *,
        file_offset: int = 0,
        read_only: bool = False,
    ) -> vmm_pb2.GuestFileMapping:
        """Map ``size`` bytes of ``file`` (a name in the images directory, from
        ``file_offset``) over ``[offset, offset+size)`` of ``slot``. A read-only file needs a
        read-only slot."""
        request = vmm_pb2.MapGuestMemoryRequest(
            vm_id=vm_id,
            slot=slot,
            offset=offset,
            size=size,
            file=vmm_pb2.MemoryFile(name=file, offset=file_offset, read_only=read_only),
        )
        return self._unary(self._memory.MapGuestMemory, request)

    def unmap_guest_memory(
        self, vm_id: str, slot: int, offset: int, size: int
    ) -> vmm_pb2.GuestFileMapping:
        """Undo :meth:`map_guest_memory` (msync first); the slot's own memory reappears.
        Returns the mapping removed."""
        request = vmm_pb2.UnmapGuestMemoryRequest(vm_id=vm_id, slot=slot, offset=offset, size=size)
        return self._unary(self._memory.UnmapGuestMemory, request).mapping

    def sync_guest_memory(self, vm_id: str, slot: int, offset: int = 0, size: int = 0) -> int:
        """msync the writable files mapped in ``[offset, offset+size)`` of ``slot`` (size 0:
        to the slot's end); returns the bytes written back."""
        request = vmm_pb2.SyncGuestMemoryRequest(vm_id=vm_id, slot=slot, offset=offset, size=size)
        return int(self._unary(self._memory.SyncGuestMemory, request).synced_bytes)

    # -- Interrupts ------------------------------------------------------------------------

    def set_irq_line(self, vm_id: str, irq: int, active: bool) -> None:
        """Raise (``active=True``) or lower an in-kernel irqchip line (KVM_IRQ_LINE)."""
        request = vmm_pb2.SetIrqLineRequest(vm_id=vm_id, irq=irq, active=active)
        self._unary(self._interrupts.SetIrqLine, request)

    def set_gsi_routing(
        self, vm_id: str, routes: Iterable[vmm_pb2.IrqRoute | Mapping[str, Any]]
    ) -> None:
        """Replace the VM's whole GSI routing table (see :func:`irqchip_route`, :func:`msi_route`).
        """
        request = vmm_pb2.SetGsiRoutingRequest(
            vm_id=vm_id, routes=[coerce(vmm_pb2.IrqRoute, r) for r in routes]
        )
        self._unary(self._interrupts.SetGsiRouting, request)

    def signal_msi(
        self, vm_id: str, address: int, data: int, devid: int | None = None
    ) -> bool:
        """Inject an MSI (KVM_SIGNAL_MSI); True if the guest accepted it."""
        request = vmm_pb2.SignalMsiRequest(vm_id=vm_id, msi=_msi(address, data, devid))
        return bool(self._unary(self._interrupts.SignalMsi, request).delivered)

    def register_irqfd(
        self, vm_id: str, irqfd_id: str, gsi: int, *, resample: bool = False
    ) -> vmm_pb2.Irqfd:
        """Bind a new daemon-owned eventfd to ``gsi`` (level-triggered with ``resample``)."""
        request = vmm_pb2.RegisterIrqfdRequest(
            vm_id=vm_id, irqfd_id=irqfd_id, gsi=gsi, resample=resample
        )
        return self._unary(self._interrupts.RegisterIrqfd, request)

    def trigger_irqfd(self, vm_id: str, irqfd_id: str) -> None:
        """Signal the irqfd's eventfd: injects its interrupt."""
        request = vmm_pb2.TriggerIrqfdRequest(vm_id=vm_id, irqfd_id=irqfd_id)
        self._unary(self._interrupts.TriggerIrqfd, request)

    def unregister_irqfd(self, vm_id: str, irqfd_id: str) -> None:
        """Detach and close the irqfd."""
        request = vmm_pb2.UnregisterIrqfdRequest(vm_id=vm_id, irqfd_id=irqfd_id)
        self._unary(self._interrupts.UnregisterIrqfd, request)

    def list_irqfds(self, vm_id: str) -> list[vmm_pb2.Irqfd]:
        """The VM's irqfds with their trigger and resample counts."""
        request = vmm_pb2.ListIrqfdsRequest(vm_id=vm_id)
        return list(self._unary(self._interrupts.ListIrqfds, request).irqfds)

    def watch_irqfd_resamples(
        self, vm_id: str, timeout: float | None = None
    ) -> Watch[vmm_pb2.IrqfdResample]:
        """A stream of resample events (the guest acknowledged a resample irqfd's interrupt)."""
        request = vmm_pb2.WatchIrqfdResamplesRequest(vm_id=vm_id)
        return self._watch(self._interrupts.WatchIrqfdResamples, request, timeout)

    # -- IoEvents --------------------------------------------------------------------------

    def register_ioevent(
        self,
        vm_id: str,
        ioevent_id: str,
        address: int,
        length: int = 0,
        *,
        space: str | int = "pio",
        datamatch: int | None = None,
    ) -> vmm_pb2.Ioevent:
        """Watch guest writes to a PIO or MMIO address through a daemon-owned ioeventfd.

        ``length`` 0 matches any access size, else 1, 2, 4 or 8; ``datamatch`` restricts the
        event to writes of that value (needs a length).
        """
        space_name = _space_name(space)
        request = vmm_pb2.RegisterIoeventRequest(
            vm_id=vm_id, ioevent_id=ioevent_id, space=space_name, address=address, length=length
        )
        if datamatch is not None:
            request.datamatch = datamatch
        return self._unary(self._ioevents.RegisterIoevent, request)

    def unregister_ioevent(self, vm_id: str, ioevent_id: str) -> None:
        """Detach and close the ioevent."""
        request = vmm_pb2.UnregisterIoeventRequest(vm_id=vm_id, ioevent_id=ioevent_id)
        self._unary(self._ioevents.UnregisterIoevent, request)

    def list_ioevents(self, vm_id: str) -> list[vmm_pb2.Ioevent]:
        """The VM's ioevents with their fired counts."""
        request = vmm_pb2.ListIoeventsRequest(vm_id=vm_id)
        return list(self._unary(self._ioevents.ListIoevents, request).ioevents)

    def watch_ioevents(
        self, vm_id: str, timeout: float | None = None
    ) -> Watch[vmm_pb2.IoeventFired]:
        """A stream of (ioevent id, count) each time guest writes fire an ioevent."""
        request = vmm_pb2.WatchIoeventsRequest(vm_id=vm_id)
        return self._watch(self._ioevents.WatchIoevents, request, timeout)

    # -- Vcpus -----------------------------------------------------------------------------

    @staticmethod
    def _ref(vm_id: str, vcpu_id: int) -> vmm_pb2.VcpuRef:
        return vmm_pb2.VcpuRef(vm_id=vm_id, vcpu_id=vcpu_id)

    def create_vcpu(self, vm_id: str, vcpu_id: int) -> vmm_pb2.Vcpu:
        """Create vCPU ``vcpu_id`` in the VM."""
        request = vmm_pb2.CreateVcpuRequest(vm_id=vm_id, vcpu_id=vcpu_id)
        return self._unary(self._vcpus.CreateVcpu, request)

    def list_vcpus(self, vm_id: str) -> list[vmm_pb2.Vcpu]:
        """The VM's vCPUs and their states."""
        request = vmm_pb2.ListVcpusRequest(vm_id=vm_id)
        return list(self._unary(self._vcpus.ListVcpus, request).vcpus)

    def start_vcpu(self, vm_id: str, vcpu_id: int) -> vmm_pb2.Vcpu:
        """Start one vCPU's thread."""
        return self._unary(self._vcpus.StartVcpu, self._ref(vm_id, vcpu_id))

    def pause_vcpu(self, vm_id: str, vcpu_id: int) -> vmm_pb2.Vcpu:
        """Pause one vCPU; returns once it is out of the guest."""
        return self._unary(self._vcpus.PauseVcpu, self._ref(vm_id, vcpu_id))

    def resume_vcpu(self, vm_id: str, vcpu_id: int) -> vmm_pb2.Vcpu:
        """Continue one paused (or halted) vCPU."""
        return self._unary(self._vcpus.ResumeVcpu, self._ref(vm_id, vcpu_id))

    def stop_vcpu(self, vm_id: str, vcpu_id: int) -> vmm_pb2.Vcpu:
        """Stop one vCPU's thread."""
        return self._unary(self._vcpus.StopVcpu, self._ref(vm_id, vcpu_id))

    def get_vcpu_state(self, vm_id: str, vcpu_id: int) -> vmm_pb2.Vcpu:
        """One vCPU's run state (created, running, paused, halted, stopped, crashed)."""
        return self._unary(self._vcpus.GetVcpuState, self._ref(vm_id, vcpu_id))

    def inject_interrupt(self, vm_id: str, vcpu_id: int, vector: int) -> vmm_pb2.Vcpu:
        """Queue an external interrupt (KVM_INTERRUPT) for a VM without in-kernel irqchip."""
        request = vmm_pb2.InjectInterruptRequest(vcpu=self._ref(vm_id, vcpu_id), vector=vector)
        return self._unary(self._vcpus.InjectInterrupt, request)

    def get_regs(self, vm_id: str, vcpu_id: int) -> vmm_pb2.Regs:
        """The vCPU's general-purpose registers (KVM_GET_REGS)."""
        return self._unary(self._vcpus.GetRegs, self._ref(vm_id, vcpu_id))

    def set_regs(
        self,
        vm_id: str,
        vcpu_id: int,
        regs: vmm_pb2.Regs | Mapping[str, int] | None = None,
        **fields: int,
    ) -> vmm_pb2.Regs:
        """Set general-purpose registers; returns them as the daemon now reports them.

        A ``Regs`` message is set as given (with ``fields`` applied on top). A mapping and/or
        keyword fields (``set_regs(vm, 0, rip=0x1000)``) are merged into the current registers.
        """
        new = self._merged(self.get_regs, vm_id, vcpu_id, vmm_pb2.Regs, regs, fields)
        request = vmm_pb2.SetRegsRequest(vcpu=self._ref(vm_id, vcpu_id), regs=new)
        return self._unary(self._vcpus.SetRegs, request)

    def get_sregs(self, vm_id: str, vcpu_id: int) -> vmm_pb2.Sregs:
        """The vCPU's special registers: segments, descriptor tables, control registers."""
        return self._unary(self._vcpus.GetSregs, self._ref(vm_id, vcpu_id))

    def set_sregs(
        self,
        vm_id: str,
        vcpu_id: int,
        sregs: vmm_pb2.Sregs | Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> vmm_pb2.Sregs:
        """Set special registers; mappings merge into the current ones, nested too.

        ``set_sregs(vm, 0, cr0=0x11, cs={"base": 0, "selector": 0})`` changes only those.
        """
        new = self._merged(self.get_sregs, vm_id, vcpu_id, vmm_pb2.Sregs, sregs, fields)
        request = vmm_pb2.SetSregsRequest(vcpu=self._ref(vm_id, vcpu_id), sregs=new)
        return self._unary(self._vcpus.SetSregs, request)

    def get_fpu(self, vm_id: str, vcpu_id: int) -> vmm_pb2.Fpu:
        """The vCPU's x87/SSE state (KVM_GET_FPU)."""
        return self._unary(self._vcpus.GetFpu, self._ref(vm_id, vcpu_id))

    def set_fpu(
        self,
        vm_id: str,
        vcpu_id: int,
        fpu: vmm_pb2.Fpu | Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> vmm_pb2.Fpu:
        """Set the x87/SSE state; mappings and keyword fields merge into the current state."""
        new = self._merged(self.get_fpu, vm_id, vcpu_id, vmm_pb2.Fpu, fpu, fields)
        request = vmm_pb2.SetFpuRequest(vcpu=self._ref(vm_id, vcpu_id), fpu=new)
        return self._unary(self._vcpus.SetFpu, request)

    def get_cpuid(self, vm_id: str, vcpu_id: int) -> list[vmm_pb2.CpuidEntry]:
        """The vCPU's CPUID entries (KVM_GET_CPUID2)."""
        return list(self._unary(self._vcpus.GetCpuid, self._ref(vm_id, vcpu_id)).entries)

    def set_cpuid(
        self,
        vm_id: str,
        vcpu_id: int,
        entries: Iterable[vmm_pb2.CpuidEntry | Mapping[str, int]] | None = None,
        *,
        use_supported: bool = False,
    ) -> list[vmm_pb2.CpuidEntry]:
        """Set the vCPU's CPUID entries, or with ``use_supported`` the host's supported set."""
        request = vmm_pb2.SetCpuidRequest(
            vcpu=self._ref(vm_id, vcpu_id),
            entries=[coerce(vmm_pb2.CpuidEntry, e) for e in entries or ()],
            use_supported=use_supported,
        )
        return list(self._unary(self._vcpus.SetCpuid, request).entries)

    def get_msrs(self, vm_id: str, vcpu_id: int, indices: Iterable[int]) -> dict[int, int]:
        """Read MSRs: ``{index: value}``."""
        request = vmm_pb2.GetMsrsRequest(vcpu=self._ref(vm_id, vcpu_id), indices=list(indices))
        return {m.index: m.value for m in self._unary(self._vcpus.GetMsrs, request).msrs}

    def set_msrs(self, vm_id: str, vcpu_id: int, msrs: Mapping[int, int]) -> dict[int, int]:
        """Write MSRs from ``{index: value}``; returns what the daemon reports back."""
        request = vmm_pb2.SetMsrsRequest(
            vcpu=self._ref(vm_id, vcpu_id),
            msrs=[vmm_pb2.Msr(index=i, value=v) for i, v in msrs.items()],
        )
        return {m.index: m.value for m in self._unary(self._vcpus.SetMsrs, request).msrs}

    def get_mp_state(self, vm_id: str, vcpu_id: int) -> str:
        """The vCPU's multiprocessing state name (RUNNABLE, HALTED, ...)."""
        response = self._unary(self._vcpus.GetMpState, self._ref(vm_id, vcpu_id))
        return str(vmm_pb2.MpState.State.Name(response.state))

    def set_mp_state(self, vm_id: str, vcpu_id: int, state: str | int) -> str:
        """Set the multiprocessing state by name (case-insensitive) or number."""
        mp_state = coerce(vmm_pb2.MpState, {"state": state})
        request = vmm_pb2.SetMpStateRequest(vcpu=self._ref(vm_id, vcpu_id), mp_state=mp_state)
        response = self._unary(self._vcpus.SetMpState, request)
        return str(vmm_pb2.MpState.State.Name(response.state))

    def get_lapic(self, vm_id: str, vcpu_id: int) -> bytes:
        """The vCPU's local APIC register page (1024 bytes; needs an in-kernel irqchip)."""
        return bytes(self._unary(self._vcpus.GetLapic, self._ref(vm_id, vcpu_id)).regs)

    def set_lapic(self, vm_id: str, vcpu_id: int, regs: bytes) -> bytes:
        """Load the local APIC register page; returns it as the daemon now reports it."""
        request = vmm_pb2.SetLapicRequest(
            vcpu=self._ref(vm_id, vcpu_id), lapic=vmm_pb2.Lapic(regs=bytes(regs))
        )
        return bytes(self._unary(self._vcpus.SetLapic, request).regs)

    def get_vcpu_events(self, vm_id: str, vcpu_id: int) -> vmm_pb2.VcpuEvents:
        """Pending/injected exceptions, interrupts, NMIs and SMIs (KVM_GET_VCPU_EVENTS)."""
        return self._unary(self._vcpus.GetVcpuEvents, self._ref(vm_id, vcpu_id))

    def set_vcpu_events(
        self,
        vm_id: str,
        vcpu_id: int,
        events: vmm_pb2.VcpuEvents | Mapping[str, int] | None = None,
        **fields: int,
    ) -> vmm_pb2.VcpuEvents:
        """Set vCPU events; mappings and keyword fields merge into the current events."""
        new = self._merged(
            self.get_vcpu_events, vm_id, vcpu_id, vmm_pb2.VcpuEvents, events, fields
        )
        request = vmm_pb2.SetVcpuEventsRequest(vcpu=self._ref(vm_id, vcpu_id), events=new)
        return self._unary(self._vcpus.SetVcpuEvents, request)

    # -- ExitHandlers ----------------------------------------------------------------------

    def handle_exits(
        self,
        vm_id: str,
        ranges: Iterable[vmm_pb2.AddressRange | tuple[str | int, int, int]],
        *,
        deadline_ms: int = 0,
    ) -> ExitHandlerSession:
        """Claim PIO/MMIO ranges of a VM and handle the guest's accesses to them remotely.

        ``ranges`` holds :func:`address_range` messages or ``(space, base, length)`` tuples;
        ``deadline_ms`` is how long a vCPU waits for each reply (0: the daemon's 1000 ms).
        Overlapping claims raise AlreadyExistsError.
        """
        claim = vmm_pb2.ClaimRequest(
            vm_id=vm_id,
            ranges=[r if isinstance(r, vmm_pb2.AddressRange) else address_range(*r)
                    for r in ranges],
            deadline_ms=deadline_ms,
        )
        return ExitHandlerSession(self._exit_handlers.HandleExits, claim, self.retry_timeout)

    # -- Handover --------------------------------------------------------------------------

    def list_stranded_vms(self) -> list[vmm_pb2.StrandedVm]:
        """VMs a daemon hand-over could not restore, kept (state and memory) for a retry or
        a forced delete, each with the reason."""
        response = self._unary(self._handover.ListStrandedVms,
                               vmm_pb2.ListStrandedVmsRequest())
        return list(response.vms)

    def retry_stranded_vm(self, vm_id: str) -> vmm_pb2.Vm:
        """Restore a stranded VM again; it runs if it was running."""
        return self._unary(self._handover.RetryStrandedVm, vmm_pb2.StrandedVmRef(vm_id=vm_id))

    def delete_stranded_vm(self, vm_id: str) -> None:
        """Give a stranded VM up: its saved state and guest memory are released."""
        self._unary(self._handover.DeleteStrandedVm, vmm_pb2.StrandedVmRef(vm_id=vm_id))

    def handover_report(self) -> vmm_pb2.HandoverReport:
        """The outage of the last hand-over the daemon received (mode "" if none)."""
        return self._unary(self._handover.GetHandoverReport,
                           vmm_pb2.GetHandoverReportRequest())

    # -- Snapshots -------------------------------------------------------------------------

    def iter_snapshot(
        self, vm_id: str, *, diff: bool = False, leave_paused: bool = False,
        chunk_size: int = 0,
    ) -> Iterator[vmm_pb2.SnapshotVmResponse]:
        """Stream a snapshot of the VM: ``data`` messages, then the ``done`` summary. The VM
        is held paused while it streams (it runs again afterwards unless ``leave_paused``);
        stop iterating early and the VM is left as it was."""
        request = vmm_pb2.SnapshotVmRequest(vm_id=vm_id, diff=diff, leave_paused=leave_paused,
                                            chunk_size=chunk_size)
        return self._server_stream(self._snapshots.SnapshotVm, request)

    def snapshot_vm(
        self, vm_id: str, out: IO[bytes] | str | os.PathLike[str] | None = None, *,
        diff: bool = False, leave_paused: bool = False,
    ) -> tuple[bytes, vmm_pb2.SnapshotInfo]:
        """Snapshot a VM to the client: into ``out`` (a path or a binary file object; the
        bytes returned are then empty), or returned as bytes. Returns (bytes, summary).
        ``diff`` carries only the pages dirtied since the VM's last snapshot."""
        if isinstance(out, str | os.PathLike):
            with open(out, "wb") as fh:
                return self.snapshot_vm(vm_id, fh, diff=diff, leave_paused=leave_paused)
        parts: list[bytes] = []
        done = None
        for msg in self.iter_snapshot(vm_id, diff=diff, leave_paused=leave_paused):
            if msg.WhichOneof("payload") == "data":
                if out is None:
                    parts.append(msg.data)
                else:
                    out.write(msg.data)
            else:
                done = msg.done
        if done is None:
            raise KvmdError("the snapshot stream ended without its summary",
                            code=grpc.StatusCode.DATA_LOSS)
        return b"".join(parts), done

    def snapshot_vm_to_state_dir(
        self, vm_id: str, name: str, *, diff: bool = False, leave_paused: bool = False,
    ) -> vmm_pb2.SnapshotInfo:
        """Snapshot a VM into a file of the daemon's state directory (a name, not a path)."""
        request = vmm_pb2.SnapshotVmRequest(vm_id=vm_id, diff=diff, leave_paused=leave_paused,
                                            file=name)
        last = None
        for msg in self._server_stream(self._snapshots.SnapshotVm, request):
            last = msg
        assert last is not None and last.WhichOneof("payload") == "done"
        return last.done

    def restore_vm(
        self, vm_id: str, *sources: bytes | IO[bytes] | str | os.PathLike[str],
        start: bool = False, files: Iterable[str] = (), chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> vmm_pb2.Vm:
        """Create VM ``vm_id`` from snapshots on the client's side: ``sources`` are bytes,
        binary file objects or paths, a full snapshot first, then diffs on it. Or, with
        ``files``, from names in the daemon's state directory. Restored paused unless
        ``start``; a bad snapshot leaves nothing behind."""
        names = list(files)
        if names and sources:
            raise ValueError("give snapshot sources or state-directory files, not both")

        def chunks(source: bytes | IO[bytes] | str | os.PathLike[str]) -> Iterator[bytes]:
            if isinstance(source, bytes | bytearray | memoryview):
                view = memoryview(source)
                for i in range(0, len(view), chunk_size):
                    yield view[i:i + chunk_size].tobytes()
            elif isinstance(source, str | os.PathLike):
                with open(source, "rb") as fh:
                    yield from iter(lambda: fh.read(chunk_size), b"")
            else:
                yield from iter(lambda: source.read(chunk_size), b"")

        def requests() -> Iterator[vmm_pb2.RestoreVmRequest]:
            yield vmm_pb2.RestoreVmRequest(options=vmm_pb2.RestoreVmOptions(
                vm_id=vm_id, start=start, files=names))
            for source in sources:
                for chunk in chunks(source):
                    yield vmm_pb2.RestoreVmRequest(data=chunk)

        return self._unary(self._snapshots.RestoreVm, requests(), timeout=self.transfer_timeout)

    def list_snapshots(self) -> list[vmm_pb2.SnapshotInfo]:
        """Snapshot files in the daemon's state directory (of VMs this caller may see)."""
        response = self._unary(self._snapshots.ListSnapshots, vmm_pb2.ListSnapshotsRequest())
        return list(response.snapshots)

    def delete_snapshot(self, name: str) -> None:
        """Delete a snapshot file of the daemon's state directory."""
        self._unary(self._snapshots.DeleteSnapshot, vmm_pb2.DeleteSnapshotRequest(file=name))

    # -- Migration -----------------------------------------------------------------------

    def prepare_incoming_migration(self, vm_id: str, *, ttl_seconds: int = 0
                                   ) -> vmm_pb2.IncomingMigration:
        """On the target daemon: expect VM ``vm_id`` (reserved meanwhile); returns the
        one-time ``token`` the source's :meth:`migrate_vm` must present (valid
        ``ttl_seconds``, default 300)."""
        request = vmm_pb2.PrepareIncomingMigrationRequest(vm_id=vm_id, ttl_seconds=ttl_seconds)
        return self._unary(self._migration.PrepareIncomingMigration, request)

    def iter_migrate_vm(
        self, vm_id: str, target: str, token: str, *, max_downtime_ms: int = 0,
        bandwidth_bytes_per_second: int = 0, max_rounds: int = 0, auto_converge: bool = False,
        tls_server_name: str = "", timeout_ms: int = 0, deadline: float | None = None,
    ) -> Iterator[vmm_pb2.MigrationProgress]:
        """On the source daemon: live-migrate the VM to the daemon at ``target`` (host:port)
        with the target's ``token``; yields progress until the VM runs there (the last
        message has phase COMPLETED). Stop iterating before that and the migration is
        cancelled: the VM keeps running here. ``deadline``: seconds for the whole migration
        (default none, whatever the client's timeout)."""
        request = vmm_pb2.MigrateVmRequest(
            vm_id=vm_id, target=target, token=token, options=vmm_pb2.MigrationOptions(
                max_downtime_ms=max_downtime_ms,
                bandwidth_bytes_per_second=bandwidth_bytes_per_second, max_rounds=max_rounds,
                auto_converge=auto_converge, tls_server_name=tls_server_name,
                timeout_ms=timeout_ms))
        # Stopping early cancels the call, and with it the migration.
        yield from self._server_stream(self._migration.MigrateVm, request, deadline)

    def migrate_vm(
        self, vm_id: str, target: str, token: str, *,
        on_progress: Callable[[vmm_pb2.MigrationProgress], None] | None = None,
        **options: Any,
    ) -> vmm_pb2.MigrationProgress:
        """Live-migrate and wait: returns the final progress (phase COMPLETED, with the
        measured ``downtime_ms``); ``on_progress`` sees every update. Options as
        :meth:`iter_migrate_vm`. Failures raise, and leave the VM running here (an
        :class:`UnknownOutcomeError` leaves it paused: check the target)."""
        last = None
        for progress in self.iter_migrate_vm(vm_id, target, token, **options):
            last = progress
            if on_progress is not None:
                on_progress(progress)
        if last is None or last.phase != vmm_pb2.MigrationProgress.COMPLETED:
            raise KvmdError("the migration stream ended before the migration completed",
                            code=grpc.StatusCode.DATA_LOSS)
        return last

    def cancel_migration(self, vm_id: str) -> None:
        """Cancel the VM's outgoing migration (before its switch-over): it keeps running
        here."""
        self._unary(self._migration.CancelMigration,
                    vmm_pb2.CancelMigrationRequest(vm_id=vm_id))

    def list_migrations(self) -> list[vmm_pb2.MigrationInfo]:
        """Migrations in progress on this daemon, outgoing and incoming."""
        return list(self._unary(self._migration.ListMigrations,
                                vmm_pb2.ListMigrationsRequest()).migrations)

    @staticmethod
    def _merged(
        getter: Callable[[str, int], Any],
        vm_id: str,
        vcpu_id: int,
        cls: type[Any],
        value: Any,
        fields: Mapping[str, Any],
    ) -> Any:
        """A full message: ``value`` as given if it is one, else current state + updates."""
        if isinstance(value, cls):
            return merge_into(coerce(cls, value), fields)
        if value is None and not fields:
            raise ValueError(f"nothing to set: pass a {cls.__name__}, a mapping or fields")
        current = getter(vm_id, vcpu_id)
        if value is not None:
            merge_into(current, value)
        return merge_into(current, fields)


def _unix_path(target: str) -> str | None:
    if target.startswith("unix://"):
        return target[len("unix://"):]
    if target.startswith("unix:"):
        return target[len("unix:"):]
    return None


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, base: Any, timeout: float | None, wait_for_ready: bool | None) -> None:
        self.method = base.method
        self.timeout = timeout
        self.metadata = base.metadata
        self.credentials = base.credentials
        self.wait_for_ready = wait_for_ready
        self.compression = base.compression


class _RetryInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Unary calls across a daemon restart or hand-over (see KvmdClient's retry_timeout):
    each call keeps its own deadline; retries wait for the channel to connect."""

    def __init__(self, client: KvmdClient) -> None:
        self.client = client

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        started = time.monotonic()
        retry: _Reconnect | None = None
        attempt_details = details
        unavailable = None
        while True:
            call = continuation(attempt_details, request)
            code = call.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and unavailable is not None and (
                    details.timeout is None or time.monotonic() - started < details.timeout):
                return unavailable  # a retry waited for a daemon that did not come back
            if code != grpc.StatusCode.UNAVAILABLE:
                self.client._reached = True
                return call
            if not self.client._may_retry(details.method, call):
                return call
            unavailable = call
            retry = retry or _Reconnect(self.client.retry_timeout)
            if not retry.wait():
                return call
            left = retry.deadline - time.monotonic()
            if details.timeout is not None:
                left = min(left, details.timeout - (time.monotonic() - started))
                if left <= 0:
                    return call
            attempt_details = _CallDetails(details, max(left, 0.001), True)


def _read(path: str | os.PathLike[str] | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()
