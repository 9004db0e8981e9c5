"""The /metrics HTTP(S) endpoint: bounded connections, no thread per connection.

prometheus-client's `start_http_server` spawns a thread for every connection and never times
an idle one out, so any local user could pile up threads in the daemon by opening
connections and sending nothing. Here one thread multiplexes every connection (accept, TLS
handshake, reading the request, writing the response) with a selector, and a fixed pool of
`workers` threads renders the metrics:

* At most `max_connections` connections are open. A new one that finds them all taken
  replaces the one that has waited longest for a request (an idle keep-alive connection, a
  client that never sent anything, a stalled handshake); when every connection has a
  request in progress, the newcomer is closed at once. Either way no thread is created, and
  a fresh scrape gets in however many idle connections others hold.
* A connection must deliver a whole request (TLS handshake included) within `idle_timeout`
  seconds of opening or of its previous response, and take a response within
  `idle_timeout`; otherwise it is closed.
* With a certificate and key it speaks TLS only; with a client CA it also requires a client
  certificate signed by that CA (mTLS). The files are re-read when they change (checked on
  each new connection), so renewed certificates need no restart.

The endpoint counts what it does in `kvmd_metrics_http_connections` and
`kvmd_metrics_http_connections_closed_total{reason}`.
"""

from __future__ import annotations

import errno
import gzip
import ipaddress
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_WORKERS = 2
MAX_REQUEST_BYTES = 8192
METRICS_PATHS = ("/metrics", "/")
# Why connections were closed by the server (exported as the `reason` label).
CLOSE_REASONS = ("capacity", "evicted", "timeout", "tls_handshake", "bad_request")
_ACCEPT_BATCH = 64
_PAUSE_ON_FD_EXHAUSTION = 0.5

# Connection states.
_HANDSHAKE, _READ, _BUSY, _WRITE = "handshake", "read", "busy", "write"


def parse_listen(listen: str) -> tuple[str, int]:
    """(host, port) of "host:port" or "[v6]:port"; an empty host is 127.0.0.1."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"metrics address {listen!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class TlsFiles:
    """A server SSLContext from certificate, key and optional client CA files, rebuilt when
    any of the files changes. A failed reload keeps the previous context (and logs)."""

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        if not cert or not key:
            raise ValueError("metrics TLS needs both a certificate and a key")
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._stamp = self._files_stamp()
        self.context = self._load()  # errors here are the caller's configuration errors

    def _paths(self) -> list[str]:
        return [p for p in (self.cert, self.key, self.client_ca) if p]

    def _files_stamp(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in self._paths():
            try:
                st = os.stat(path)
                stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                stamps.append((0, 0, 0))
        return tuple(stamps)

    def _load(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        if self.client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=self.client_ca)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def current(self) -> ssl.SSLContext:
        stamp = self._files_stamp()  # taken before reading, so a later change is not missed
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self.context = self._load()
                log.info("metrics TLS certificate reloaded", extra={"cert": self.cert})
            except (OSError, ValueError) as exc:
                log.warning("metrics TLS files changed but do not load; keeping the previous "
                            "ones", extra={"cert": self.cert, "error": str(exc)})
        return self.context


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    peer: str
    state: str
    deadline: float
    waiting_since: float  # when it last started waiting for a request (eviction order)
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: memoryview | None = None
    keep_alive: bool = True
    eof: bool = False  # the client shut down its side after sending
    closed: bool = False


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    params: dict[str, list[str]]
    headers: dict[str, str]
    keep_alive: bool


class _BadRequest(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def _parse_request(head: bytes) -> _Request:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _BadRequest("400 Bad Request")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest("505 HTTP Version Not Supported")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest("400 Bad Request")
        name = name.lower()
        headers[name] = f"{headers[name]},{value.strip()}" if name in headers \
            else value.strip()
    # Requests here have no body; one would desynchronise the connection.
    if "transfer-encoding" in headers or headers.get("content-length", "0").strip() != "0":
        raise _BadRequest("400 Bad Request")
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = ("close" not in tokens) if version == "HTTP/1.1" else ("keep-alive" in tokens)
    url = urlsplit(target)
    return _Request(method, url.path, parse_qs(url.query), headers, keep_alive)


def _gzip_accepted(header: str) -> bool:
    for item in header.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() == "gzip":
            return params.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


def _response(status: str, body: bytes, keep_alive: bool, head_only: bool = False,
              headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}",
             f"Connection: {'keep-alive' if keep_alive else 'close'}",
             *(f"{k}: {v}" for k, v in headers)]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


class _EndpointCollector(Collector):
    def __init__(self, server: MetricsHttpServer) -> None:
        self.server = server

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("kvmd_metrics_http_connections",
                                "Open connections to the /metrics endpoint",
                                value=self.server.open_connections)
        closed = CounterMetricFamily("kvmd_metrics_http_connections_closed",
                                     "Connections to /metrics the server closed, by reason",
                                     labels=["reason"])
        for reason, n in self.server.closed_counts().items():
            closed.add_metric([reason], n)
        yield closed


class MetricsHttpServer:
    """Serve `registry` over HTTP (or HTTPS) on `listen` ("host:port"); see the module."""

    def __init__(self, registry: CollectorRegistry, listen: str, *,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 tls_client_ca: str | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 workers: int = DEFAULT_WORKERS) -> None:
        if max_connections < 1 or workers < 1:
            raise ValueError("max_connections and workers must be at least 1")
        if not idle_timeout > 0:
            raise ValueError("idle_timeout must be positive")
        if tls_client_ca and not tls_cert:
            raise ValueError("a metrics client CA needs a metrics TLS certificate and key: "
                             "clients can only be verified over TLS")
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("the metrics TLS certificate and key go together")
        self.registry = registry
        self.max_connections = max_connections
        self.idle_timeout = float(idle_timeout)
        self.tls = TlsFiles(tls_cert or "", tls_key or "", tls_client_ca or "") \
            if tls_cert else None
        host, port = parse_listen(listen)
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0]
        self._listener = socket.socket(family, kind, proto)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(address)
            self._listener.listen(128)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        bound = self._listener.getsockname()
        self.address: str = bound[0]
        self.port: int = bound[1]
        self._warn_if_exposed(listen)

        self._conns: set[_Conn] = set()
        self._closed = {reason: 0 for reason in CLOSE_REASONS}
        self._done: deque[tuple[_Conn, bytes, bool]] = deque()
        self._again: deque[_Conn] = deque()
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._listener_paused_until = 0.0
        self._executor = ThreadPoolExecutor(max_workers=workers,
                                            thread_name_prefix="kvmd-metrics-render")
        self._collector = _EndpointCollector(self)
        try:
            registry.register(self._collector)
        except ValueError:
            self._listener.close()
            raise
        self._thread = threading.Thread(target=self._run, name="kvmd-metrics-http",
                                        daemon=True)
        self._thread.start()

    # -- public ------------------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def closed_counts(self) -> dict[str, int]:
        return dict(self._closed)

    def close(self) -> None:
        """Stop serving: close the listener and every connection, end the threads."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake()
        self._thread.join(timeout=10)
        self._executor.shutdown(wait=True, cancel_futures=True)
        try:
            self.registry.unregister(self._collector)
        except KeyError:
            pass
        self._wake_w.close()

    # -- setup -------------------------------------------------------------------------------

    def _warn_if_exposed(self, listen: str) -> None:
        if _is_loopback(self.address):
            return
        where = {"address": listen, "port": self.port}
        if self.tls is None:
            log.warning("metrics served over plain HTTP beyond loopback: anyone who can reach "
                        "the port can read them; set metrics_tls_cert/metrics_tls_key and "
                        "metrics_tls_client_ca, or listen on 127.0.0.1", extra=where)
        elif not self.tls.client_ca:
            log.warning("metrics served over TLS beyond loopback without client "
                        "authentication: anyone who can reach the port can read them; set "
                        "metrics_tls_client_ca", extra=where)

    # -- the loop ----------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already woken (buffer full) or closing

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                timeout = self._next_timeout(now)
                for key, _mask in self._selector.select(timeout):
                    if isinstance(key.data, _Conn):
                        self._service(key.data)
                    elif key.data == "listener":
                        self._accept()
                    else:
                        self._drain_wake()
                self._finish_rendered()
                while self._again:
                    conn = self._again.popleft()
                    if not conn.closed and conn.state == _READ:
                        self._read(conn)
                self._expire(time.monotonic())
        except Exception:
            log.exception("metrics endpoint failed; /metrics is no longer served")
        finally:
            for conn in list(self._conns):
                self._close(conn)
            self._selector.close()
            self._listener.close()
            self._wake_r.close()

    def _next_timeout(self, now: float) -> float:
        if self._again or self._done:
            return 0.0
        deadlines = [c.deadline for c in self._conns if c.state != _BUSY]
        if self._listener_paused_until:
            deadlines.append(self._listener_paused_until)
        if not deadlines:
            return 1.0
        return max(0.0, min(min(deadlines) - now, 1.0))

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _expire(self, now: float) -> None:
        if self._listener_paused_until and now >= self._listener_paused_until:
            self._listener_paused_until = 0.0
            self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        for conn in [c for c in self._conns if c.state != _BUSY and c.deadline <= now]:
            self._close(conn, "timeout")

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, peer = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting for a moment rather than spin.
                    log.warning("metrics endpoint cannot accept", extra={"error": str(exc)})
                    self._selector.unregister(self._listener)
                    self._listener_paused_until = time.monotonic() + _PAUSE_ON_FD_EXHAUSTION
                    return
                continue  # ECONNABORTED and the like: that client is gone
            if len(self._conns) >= self.max_connections and not self._evict():
                sock.close()
                self._closed["capacity"] += 1
                continue
            self._open(sock, peer)

    def _evict(self) -> bool:
        """Close the connection that has waited longest for a request; False if every
        connection has a request in progress."""
        waiting = [c for c in self._conns if c.state in (_HANDSHAKE, _READ)]
        if not waiting:
            return False
        self._close(min(waiting, key=lambda c: c.waiting_since), "evicted")
        return True

    def _open(self, sock: socket.socket, peer: tuple[str, int] | tuple[str, int, int, int]
              ) -> None:
        sock.setblocking(False)
        now = time.monotonic()
        state = _READ
        if self.tls is not None:
            try:
                sock = self.tls.current().wrap_socket(sock, server_side=True,
                                                      do_handshake_on_connect=False)
            except (OSError, ValueError):
                sock.close()
                self._closed["tls_handshake"] += 1
                return
            state = _HANDSHAKE
        conn = _Conn(sock, f"{peer[0]}:{peer[1]}", state, now + self.idle_timeout, now)
        self._conns.add(conn)
        self._selector.register(sock, selectors.EVENT_READ, conn)
        if state == _HANDSHAKE:
            self._handshake(conn)

    def _close(self, conn: _Conn, reason: str | None = None) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        if reason is not None:
            self._closed[reason] += 1
        if conn.state != _BUSY:
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        try:
            conn.sock.close()
        except OSError:
            pass

    def _interest(self, conn: _Conn, events: int) -> None:
        self._selector.modify(conn.sock, events, conn)

    def _service(self, conn: _Conn) -> None:
        if conn.closed:
            return
        if conn.state == _HANDSHAKE:
            self._handshake(conn)
        elif conn.state == _READ:
            self._read(conn)
        elif conn.state == _WRITE:
            self._write(conn)

    def _handshake(self, conn: _Conn) -> None:
        assert isinstance(conn.sock, ssl.SSLSocket)
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._interest(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._interest(conn, selectors.EVENT_WRITE)
            return
        except (OSError, ValueError) as exc:
            log.debug("metrics TLS handshake failed", extra={"peer": conn.peer,
                                                             "error": str(exc)})
            self._close(conn, "tls_handshake")
            return
        conn.state = _READ
        self._interest(conn, selectors.EVENT_READ)
        self._read(conn)  # the request may already be buffered with the handshake

    def _read(self, conn: _Conn) -> None:
        while True:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                break
            except ssl.SSLWantWriteError:
                self._interest(conn, selectors.EVENT_WRITE)
                return
            except (OSError, ValueError):
                self._close(conn)
                return
            if not data:
                if b"\r\n\r\n" not in conn.inbuf:
                    self._close(conn)  # the client is done
                    return
                conn.eof = True  # answer what it sent, then close
                break
            conn.inbuf += data
            if b"\r\n\r\n" in conn.inbuf or len(conn.inbuf) > MAX_REQUEST_BYTES:
                break
        self._dispatch(conn)

    def _dispatch(self, conn: _Conn) -> None:
        """Start the next buffered request, if a whole one is there."""
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.inbuf) > MAX_REQUEST_BYTES:
                self._reject(conn, "431 Request Header Fields Too Large")
            return
        head = bytes(conn.inbuf[:end])
        del conn.inbuf[:end + 4]
        if end > MAX_REQUEST_BYTES:
            self._reject(conn, "431 Request Header Fields Too Large")
            return
        try:
            request = _parse_request(head)
        except _BadRequest as exc:
            self._reject(conn, exc.status)
            return
        keep_alive = request.keep_alive and not conn.eof
        if request.method not in ("GET", "HEAD"):
            self._send(conn, _response("405 Method Not Allowed", b"", keep_alive,
                                       headers=(("Allow", "GET, HEAD"),)), keep_alive)
            return
        if request.path not in METRICS_PATHS:
            self._send(conn, _response("404 Not Found", b"", keep_alive), keep_alive)
            return
        conn.state = _BUSY
        self._selector.unregister(conn.sock)
        self._executor.submit(self._render, conn, request, keep_alive)

    def _reject(self, conn: _Conn, status: str) -> None:
        """Answer a malformed request and close the connection."""
        self._closed["bad_request"] += 1
        conn.inbuf.clear()
        self._send(conn, _response(status, b"", False), False)

    def _render(self, conn: _Conn, request: _Request, keep_alive: bool) -> None:
        """In a worker thread: the response to a metrics request, handed back to the loop."""
        try:
            encoder, content_type = choose_encoder(request.headers.get("accept", ""))
            registry: Collector = self.registry
            if "name[]" in request.params:
                registry = self.registry.restricted_registry(request.params["name[]"])
            body = encoder(registry)
            headers: tuple[tuple[str, str], ...] = (("Content-Type", content_type),)
            if _gzip_accepted(request.headers.get("accept-encoding", "")):
                body = gzip.compress(body)
                headers += (("Content-Encoding", "gzip"),)
            out = _response("200 OK", body, keep_alive, request.method == "HEAD", headers)
        except Exception:
            log.exception("rendering /metrics failed")
            out, keep_alive = _response("500 Internal Server Error", b"", False), False
        self._done.append((conn, out, keep_alive))
        self._wake()

    def _finish_rendered(self) -> None:
        while self._done:
            conn, out, keep_alive = self._done.popleft()
            if conn.closed:
                continue
            if self._stopping.is_set():
                self._close(conn)
                continue
            self._selector.register(conn.sock, selectors.EVENT_WRITE, conn)
            self._send(conn, out, keep_alive)

    def _send(self, conn: _Conn, out: bytes, keep_alive: bool) -> None:
        conn.state = _WRITE
        conn.outbuf = memoryview(out)
        conn.keep_alive = keep_alive
        conn.deadline = time.monotonic() + self.idle_timeout
        self._interest(conn, selectors.EVENT_WRITE)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        assert conn.outbuf is not None
        while conn.outbuf.nbytes:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, ssl.SSLWantWriteError):
                return
            except ssl.SSLWantReadError:
                self._interest(conn, selectors.EVENT_READ)
                return
            except (OSError, ValueError):
                self._close(conn)
                return
            conn.outbuf = conn.outbuf[sent:]
        conn.outbuf = None
        if not conn.keep_alive:
            self._close(conn)
            return
        now = time.monotonic()
        conn.state = _READ
        conn.deadline = now + self.idle_timeout
        conn.waiting_since = now
        self._interest(conn, selectors.EVENT_READ)
        if b"\r\n\r\n" in conn.inbuf or (isinstance(conn.sock, ssl.SSLSocket)
                                          and conn.sock.pending()):
            self._again.append(conn)  # pipelined or already decrypted: the loop reads it next
