"""The data socket of a migration: the snapshot bytes beside the gRPC stream.

A bare TCP stream carries several times what a gRPC stream does (grpcio copies and frames
every message twice over), so guest memory leaves gRPC: the target, when it accepts a
migration, listens on a one-shot port (its migration host, port 0) that takes exactly one
connection, opened by a random 32-byte secret that only the stream's peer learnt. The
source writes the very frames it would have put into `data` messages; the target reads them
into one reused buffer and feeds its Restorer, in a thread of its own. Everything else
(accept, finish with the byte count, ready, commit) stays on the stream. When the stream is
TLS the data socket is too, with the same certificates (mutual).

Either end closing its socket, or the stream ending, fails the migration as a broken stream
does: the target applies nothing more and discards the VM.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable

from kvmd.core.errors import DomainError, InvalidArgument, Reason, Unavailable

log = logging.getLogger(__name__)

SECRET_BYTES = 32
RECEIVE_BUFFER = 4 << 20
IOV_MAX = 512  # buffers per sendmsg (Linux allows 1024)


def server_context(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
    """The target's TLS for data sockets: its certificate, peers signed by `client_ca`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """The source's TLS for data sockets: the target must be signed by `ca` (the system's
    roots when empty); this daemon's certificate goes along when it has one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        ctx.load_verify_locations(ca)
    else:
        ctx.load_default_certs()
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


class DataListener:
    """The target's one-shot data socket for one incoming migration. `feed` is called, in
    this object's thread, with each received piece (a view of a reused buffer: it must not
    be kept). `received` counts what was applied; `wait` blocks until a byte count is."""

    def __init__(self, host: str, feed: Callable[[memoryview], None],
                 tls: ssl.SSLContext | None, idle_seconds: float) -> None:
        self.secret = secrets.token_bytes(SECRET_BYTES)
        self._feed = feed
        self._tls = tls
        self._idle = idle_seconds
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener: socket.socket | None = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.bind((host, 0))
            self._listener.listen(1)
        except OSError:
            self._listener.close()
            raise
        self._listener.settimeout(idle_seconds)
        self.port: int = self._listener.getsockname()[1]
        self._conn: socket.socket | None = None
        self._cond = threading.Condition()
        self.received = 0
        self.last_activity = time.monotonic()
        self.error: DomainError | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="migration-data-in")
        self._thread.start()

    def _fail(self, error: DomainError) -> None:
        with self._cond:
            if self.error is None and not self._closed:
                self.error = error
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            self._receive()
        except DomainError as exc:
            self._fail(exc)
        except (OSError, ValueError) as exc:  # ValueError: a socket closed under us
            self._fail(Unavailable(f"the migration data socket broke: {exc}",
                                   reason=Reason.PEER_UNAVAILABLE))
        except BaseException as exc:  # a Restorer failure other than a domain error
            log.exception("migration data socket failed")
            self._fail(InvalidArgument(f"migration data failed: {type(exc).__name__}: {exc}",
                                       reason=Reason.STREAM_INVALID))
        finally:
            with self._cond:
                self._cond.notify_all()

    def _receive(self) -> None:
        listener = self._listener
        assert listener is not None
        try:
            conn, _peer = listener.accept()
        except TimeoutError:
            return  # the source did not connect (it sends `data` messages instead)
        conn.settimeout(self._idle)
        with self._cond:
            self._listener = None
            closed = self._closed
            if not closed:
                self._conn = conn
        listener.close()
        if closed:
            conn.close()
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            conn = self._tls.wrap_socket(conn, server_side=True)
            with self._cond:
                self._conn = conn
        secret = bytearray()
        while len(secret) < SECRET_BYTES:
            chunk = conn.recv(SECRET_BYTES - len(secret))
            if not chunk:
                break
            secret += chunk
        if not hmac.compare_digest(bytes(secret), self.secret):
            raise InvalidArgument("the migration data socket was opened without its secret",
                                  reason=Reason.STREAM_INVALID)
        # Blocking from here: a silent source is the stream's to time out (it watches
        # last_activity), and closing the socket wakes this thread. (With a timeout set,
        # Python polls before each recv, and MSG_DONTWAIT would wait.)
        conn.settimeout(None)
        log.info("migration data socket open", extra={"port": self.port,
                                                      "tls": self._tls is not None})
        buffer = bytearray(RECEIVE_BUFFER)
        view = memoryview(buffer)
        plain = self._tls is None
        while True:
            n = conn.recv_into(view)
            if not n:
                return  # the source is done writing (the finish says how much it wrote)
            if plain:  # take what else has arrived: fewer, larger feeds
                while n < len(view):
                    try:
                        more = conn.recv_into(view[n:], 0, socket.MSG_DONTWAIT)
                    except (BlockingIOError, InterruptedError):
                        break
                    if not more:
                        break
                    n += more
            self._feed(view[:n])
            with self._cond:
                self.received += n
                self.last_activity = time.monotonic()
                self._cond.notify_all()

    def wait(self, total: int, timeout: float) -> None:
        """Return once `total` bytes were applied; raise the socket's failure, or
        Unavailable when nothing arrives for `timeout` seconds."""
        with self._cond:
            while self.received < total:
                if self.error is not None:
                    raise self.error
                if not self._thread.is_alive():
                    raise Unavailable(f"the migration data socket ended after {self.received} "
                                      f"of {total} bytes", reason=Reason.PEER_UNAVAILABLE)
                if time.monotonic() - self.last_activity > timeout:
                    raise Unavailable(f"the migration source sent no data for {timeout:g} s",
                                      reason=Reason.PEER_UNAVAILABLE)
                self._cond.wait(0.2)
            if self.received > total:
                raise InvalidArgument(f"the migration source wrote {self.received} bytes on "
                                      f"its data socket, not {total}",
                                      reason=Reason.STREAM_INVALID)

    def close(self) -> None:
        """Close both sockets and wait for the thread (no feed runs once this returns)."""
        with self._cond:
            self._closed = True
            listener, conn = self._listener, self._conn
            self._listener = None
        for sock in (conn, listener):
            if sock is not None:
                _shut(sock)
        self._thread.join()


class DataSender:
    """The source's end of a data socket: connected, secret sent, then frames."""

    def __init__(self, host: str, port: int, secret: bytes, tls: ssl.SSLContext | None,
                 server_name: str, timeout: float) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=server_name or host)
            sock.sendall(secret)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._plain = tls is None
        self.sent = 0

    def send(self, frames: list[bytes]) -> None:
        """Write `frames` in order (no joining); OSError when the link breaks, TimeoutError
        when the target stops reading."""
        sock = self._sock
        if not self._plain:
            for frame in frames:
                sock.sendall(frame)
                self.sent += len(frame)
            return
        views = [memoryview(f).cast("B") for f in frames if len(f)]
        at = 0
        while at < len(views):
            n = sock.sendmsg(views[at:at + IOV_MAX])
            self.sent += n
            while at < len(views) and n >= len(views[at]):
                n -= len(views[at])
                at += 1
            if n:
                views[at] = views[at][n:]

    def close(self) -> None:
        _shut(self._sock)


def _shut(sock: socket.socket) -> None:
    """Shut down and close `sock`, waking a thread blocked on it (the plain socket's
    shutdown even for a TLS one: no TLS close exchange with a peer that may be gone)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
