"""The daemon-to-daemon link of a migration: the source calls the target's
Migration/ReceiveMigration, a bidirectional gRPC stream, over TLS (mutual, with the
certificates of the source's configuration) or, to a loopback target only, plain TCP.

Messages are MigrationMessage (source to target) and MigrationReply (back). Snapshot bytes
go on the data socket the target offers when it accepts (kvmd.migration.dataplane: the
frames as they are, with sendmsg), the byte count with the finish; to a target that offers
none, as `data` messages encoded here by hand: the frames are joined once, into the message.
A bounded queue between the migration thread and grpc's sending thread is the flow control:
`send` blocks while the link is full, and fails (Unavailable) when the target stops reading
for longer than the timeout. Replies are read by a small thread into a queue, so every wait
for the target has a deadline.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from kvmd import __version__
from kvmd.api.errors import DOMAIN_ERRORS
from kvmd.config import is_loopback
from kvmd.core.errors import (
    Aborted,
    DomainError,
    InvalidArgument,
    InvalidState,
    OutcomeUnknown,
    Reason,
    Unavailable,
)
from kvmd.migration.dataplane import DataSender, client_context
from kvmd.migration.precopy import MigrationOptions
from kvmd.state.format import FORMAT_VERSION, varint
from kvmd_proto import vmm_pb2 as pb

log = logging.getLogger(__name__)

METHOD = "/kvmd.v1.Migration/ReceiveMigration"
# Bytes of snapshot data per gRPC message (well under every daemon's max_message_bytes).
MAX_DATA_MESSAGE = 2 << 20
_TAG_DATA = (2 << 3) | 2  # MigrationMessage.data
QUEUE_MESSAGES = 4
_END = object()  # ends the request stream (half-close)


@dataclass(frozen=True)
class MigrationTls:
    """PEM files for outgoing migrations: this daemon's certificate and key (presented to
    the target), and the CA that must have signed the target's certificate."""

    cert: str = ""
    key: str = ""
    ca: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            if not path:
                return None
            try:
                with open(path, "rb") as fh:
                    return fh.read()
            except OSError as exc:
                raise InvalidState(f"cannot read migration TLS file {path}: "
                                   f"{exc.strerror}", reason=Reason.FEATURE_DISABLED) from None
        return grpc.ssl_channel_credentials(root_certificates=read(self.ca),
                                            private_key=read(self.key),
                                            certificate_chain=read(self.cert))


def split_target(target: str) -> tuple[str, int]:
    """host:port (or [v6]:port) of a target address; INVALID_ARGUMENT otherwise."""
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or \
            "/" in target:
        raise InvalidArgument(f"migration target {target!r} is not host:port",
                              reason=Reason.TARGET_INVALID, field="target")
    return host, int(port)


def check_target(target: str, tls: MigrationTls | None) -> None:
    """Refuse (before anything starts) a target this daemon may not migrate to."""
    host, _port = split_target(target)
    if tls is None and not is_loopback(host):
        raise InvalidState(f"refusing to migrate to {target} over plain TCP: configure "
                           "migration TLS (migration_tls_cert/key/ca, or tls_cert/key and "
                           "tls_client_ca) or migrate over loopback",
                           reason=Reason.FEATURE_DISABLED)


def _remote_reason(exc: grpc.RpcError, cls: type[DomainError]) -> Reason:
    """The target's own ErrorInfo reason when it is one of ours for `cls` (a target's
    LIMIT_VMS stays LIMIT_VMS here), else what the migration failing means here."""
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except ValueError:
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = Reason.__members__.get(info.reason)
            if reason is not None and issubclass(cls, reason.error):
                return reason
    return Reason.MIGRATION_FAILED if cls is InvalidState else cls.default_reason


def target_error(target: str, exc: grpc.RpcError) -> DomainError:
    """What a failed call to the target means here."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        hint = ""
        lowered = details.lower()
        if "ssl" in lowered or "handshake" in lowered or "certificate" in lowered:
            hint = " (TLS: check the certificates of both daemons)"
        return Unavailable(f"cannot reach migration target {target}: {details}{hint}",
                           reason=Reason.PEER_UNAVAILABLE)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return InvalidArgument(f"migration target {target} refused the token: {details}",
                               reason=Reason.MIGRATION_TOKEN_REFUSED, field="token")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return InvalidState(f"migration target {target} does not accept this daemon's "
                            f"identity ({details}): configure migration_tls_cert/key",
                            reason=Reason.FEATURE_DISABLED)
    if code == grpc.StatusCode.UNIMPLEMENTED and "ReceiveMigration" in details + METHOD and \
            "Method not found" in details:
        return InvalidState(f"{target} does not accept migrations (not a kvmd with "
                            "live migration)", reason=Reason.MIGRATION_FAILED)
    if code == grpc.StatusCode.CANCELLED:
        return Aborted(f"the link to migration target {target} was closed",
                       reason=Reason.MIGRATION_CANCELLED)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"migration target {target} did not answer in time",
                           reason=Reason.PEER_UNAVAILABLE)
    # Codes not in the table (INTERNAL, ...): the migration failed.
    cls = DOMAIN_ERRORS.get(code, InvalidState)
    return cls(f"migration target {target}: {details}", reason=_remote_reason(exc, cls))


class GrpcTransport:
    """A migration's stream to one target (see kvmd.migration.precopy.Transport)."""

    def __init__(self, target: str, token: str, tls: MigrationTls | None,
                 options: MigrationOptions) -> None:
        check_target(target, tls)
        if not token:
            raise InvalidArgument("token is required: the target's PrepareIncomingMigration "
                                  "gives it", reason=Reason.FIELD_REQUIRED, field="token")
        self.target = target
        self.token = token
        self.tls = tls
        self.server_name = options.tls_server_name
        self._data: DataSender | None = None  # the target's data socket, when it offers one
        self.timeout = options.timeout_ms / 1000
        channel_options: list[tuple[str, int | str]] = [
                           ("grpc.max_send_message_length", MAX_DATA_MESSAGE + 4096),
                           ("grpc.max_receive_message_length", 1 << 20),
                           ("grpc.enable_retries", 0)]
        if options.tls_server_name:
            channel_options.append(("grpc.ssl_target_name_override", options.tls_server_name))
        if tls is not None:
            self._channel = grpc.secure_channel(target, tls.credentials(), channel_options)
        else:
            self._channel = grpc.insecure_channel(target, channel_options)
        self._requests: queue.Queue[object] = queue.Queue(QUEUE_MESSAGES)
        self._replies: queue.Queue[pb.MigrationReply | DomainError | None] = queue.Queue()
        self._call: Any = None  # grpc's call iterator (also a grpc.Future)
        self._closed = threading.Event()
        self._failure: DomainError | None = None
        self._lock = threading.Lock()

    # -- the stream ------------------------------------------------------------------------

    def _request_stream(self) -> Iterator[bytes]:
        while True:
            try:
                item = self._requests.get(timeout=0.2)
            except queue.Empty:
                if self._closed.is_set():
                    return
                continue
            if item is _END:
                return
            assert isinstance(item, bytes)
            yield item

    def _read_replies(self) -> None:
        assert self._call is not None
        try:
            for reply in self._call:
                self._replies.put(reply)
            self._replies.put(None)  # the target ended the stream
        except grpc.RpcError as exc:
            error = target_error(self.target, exc)
            self._failure = error
            self._replies.put(error)

    def _next_reply(self, what: str, timeout: float | None = None) -> pb.MigrationReply:
        try:
            reply = self._replies.get(timeout=timeout if timeout is not None else self.timeout)
        except queue.Empty:
            raise Unavailable(f"migration target {self.target} did not answer ({what}) "
                              f"within {self.timeout:g} s",
                              reason=Reason.PEER_UNAVAILABLE) from None
        if isinstance(reply, DomainError):
            raise reply
        if reply is None:
            raise Unavailable(f"migration target {self.target} ended the migration "
                              f"({what})", reason=Reason.PEER_UNAVAILABLE)
        return reply

    def _put(self, message: bytes) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            if self._failure is not None:
                raise self._failure
            if self._closed.is_set():
                raise Aborted(f"the link to migration target {self.target} was closed",
                              reason=Reason.MIGRATION_CANCELLED)
            try:
                self._requests.put(message, timeout=0.05)
                return
            except queue.Full:
                if time.monotonic() > deadline:
                    raise Unavailable(f"migration target {self.target} stopped reading for "
                                      f"{self.timeout:g} s",
                                      reason=Reason.PEER_UNAVAILABLE) from None

    # -- Transport --------------------------------------------------------------------------

    def start(self, source_vm_id: str) -> str:
        # No wait for the channel: a target that cannot be reached (refused, unknown host,
        # a failed TLS handshake) fails the call at once, and grpc's reason comes with it.
        stream = self._channel.stream_stream(
            METHOD, request_serializer=lambda b: b,
            response_deserializer=pb.MigrationReply.FromString)
        with self._lock:
            if self._closed.is_set():
                raise Aborted(f"the link to migration target {self.target} was closed",
                              reason=Reason.MIGRATION_CANCELLED)
            self._call = stream(self._request_stream())
        threading.Thread(target=self._read_replies, daemon=True,
                         name="migration-replies").start()
        self._put(pb.MigrationMessage(start=pb.MigrationStart(
            token=self.token, source_vm_id=source_vm_id, kvmd_version=__version__,
            format_version=FORMAT_VERSION, data_socket=True)).SerializeToString())
        reply = self._next_reply("accept")
        if reply.WhichOneof("reply") != "accepted":
            raise InvalidState(f"migration target {self.target} answered "
                               f"{reply.WhichOneof('reply')} instead of accepting",
                               reason=Reason.MIGRATION_FAILED)
        if reply.accepted.data_port:
            self._open_data(reply.accepted.data_port, reply.accepted.data_secret)
        return reply.accepted.vm_id

    def _open_data(self, port: int, secret: bytes) -> None:
        """Connect to the target's data socket; on failure the bytes go on the stream."""
        host, _port = split_target(self.target)
        try:
            tls = client_context(self.tls.cert, self.tls.key, self.tls.ca) \
                if self.tls is not None else None
            sender = DataSender(host, port, secret, tls, self.server_name, self.timeout)
        except (OSError, ValueError) as exc:
            log.warning("migration data socket refused; sending on the stream",
                        extra={"target": self.target, "port": port, "error": str(exc)})
            return
        with self._lock:
            if self._closed.is_set():
                sender.close()
                raise Aborted(f"the link to migration target {self.target} was closed",
                              reason=Reason.MIGRATION_CANCELLED)
            self._data = sender

    def send(self, frames: list[bytes]) -> None:
        if self._data is not None:
            self._send_socket(self._data, frames)
            return
        message: list[bytes] = []
        size = 0
        for frame in frames:
            if size and size + len(frame) > MAX_DATA_MESSAGE:
                self._send_data(message, size)
                message, size = [], 0
            if len(frame) > MAX_DATA_MESSAGE:  # a huge state record: in pieces
                view = memoryview(frame)
                for at in range(0, len(view), MAX_DATA_MESSAGE):
                    piece = view[at:at + MAX_DATA_MESSAGE]
                    self._send_data([piece.tobytes()], len(piece))
                continue
            message.append(frame)
            size += len(frame)
        if message:
            self._send_data(message, size)

    def _send_socket(self, data: DataSender, frames: list[bytes]) -> None:
        if self._failure is not None:
            raise self._failure
        try:
            data.send(frames)
            return
        except (OSError, ValueError) as exc:
            error = exc
        if not self._closed.is_set():  # the stream may say why: let its reason through
            deadline = time.monotonic() + 1.0
            while self._failure is None and time.monotonic() < deadline and \
                    not self._closed.is_set():
                time.sleep(0.02)
        if self._failure is not None:
            raise self._failure
        if self._closed.is_set():
            raise Aborted(f"the link to migration target {self.target} was closed",
                          reason=Reason.MIGRATION_CANCELLED)
        if isinstance(error, TimeoutError):
            raise Unavailable(f"migration target {self.target} stopped reading for "
                              f"{self.timeout:g} s", reason=Reason.PEER_UNAVAILABLE)
        raise Unavailable(f"the data link to migration target {self.target} broke: {error}",
                          reason=Reason.PEER_UNAVAILABLE)

    def _send_data(self, frames: list[bytes], size: int) -> None:
        self._put(b"".join([bytes([_TAG_DATA]), varint(size), *frames]))

    def finish(self) -> None:
        sent = self._data.sent if self._data is not None else 0
        self._put(pb.MigrationMessage(finish=pb.MigrationFinish(data_bytes=sent))
                  .SerializeToString())
        reply = self._next_reply("ready")
        if reply.WhichOneof("reply") != "ready":
            raise InvalidState(f"migration target {self.target} answered "
                               f"{reply.WhichOneof('reply')} instead of ready",
                               reason=Reason.MIGRATION_FAILED)

    def commit(self) -> None:
        try:
            self._put(pb.MigrationMessage(commit=pb.MigrationCommit()).SerializeToString())
            reply = self._next_reply("commit")
        except DomainError as exc:
            raise OutcomeUnknown(f"the commit to migration target {self.target} was not "
                                 f"confirmed ({exc.message}); the VM may run there",
                                 reason=Reason.MIGRATION_OUTCOME_UNKNOWN) from exc
        if reply.WhichOneof("reply") != "committed":
            raise OutcomeUnknown(f"migration target {self.target} answered "
                                 f"{reply.WhichOneof('reply')} to the commit",
                                 reason=Reason.MIGRATION_OUTCOME_UNKNOWN)
        try:
            self._put(_END)  # type: ignore[arg-type]
        except DomainError:
            pass  # the commit is confirmed: the half-close is only a courtesy

    def close(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            call, data = self._call, self._data
        if data is not None:
            data.close()  # wakes a send blocked on it
        if call is not None:
            call.cancel()
        self._channel.close()


def connect(target: str, token: str, tls: MigrationTls | None,
            options: MigrationOptions) -> GrpcTransport:
    return GrpcTransport(target, token, tls, options)
