"""The /metrics endpoint itself (kvmd.metrics.MetricsServer): bounded connections with no
thread per connection, idle connections timed out, TLS and mTLS, a warning when it is
exposed beyond loopback without them.

The issue: an unprivileged local user held 95 idle connections to /metrics and took the
daemon from 11 to 99 threads (prometheus-client's server spawns a thread per connection and
never times one out). Thread counts here are read from /proc/<pid>/task.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from metrics_support import RPC_TIMEOUT, wait_for
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvmd.metrics import MetricsServer
from kvmd.metrics_http import DEFAULT_WORKERS, MAX_REQUEST_BYTES, parse_listen

HELD = 95  # idle connections, as in the report
SAMPLE = "kvmd_test_scrapes_total"
# A bounded wait for something the server does at once (or after a short idle timeout).
PROMPT = 20.0


def kvmd_script() -> str:
    script = Path(sys.executable).parent / "kvmd"
    assert script.exists(), "the kvmd console script is not installed (make install)"
    return str(script)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def tasks(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def registry_with_sample() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    Counter("kvmd_test_scrapes", "A sample to find in the scrape", registry=registry).inc()
    return registry


@pytest.fixture
def serve() -> Iterator[Callable[..., MetricsServer]]:
    """Start MetricsServer(registry_with_sample(), listen, **kw); all closed after."""
    servers: list[MetricsServer] = []

    def start(listen: str = "127.0.0.1:0", registry: CollectorRegistry | None = None,
              **kw: Any) -> MetricsServer:
        server = MetricsServer(registry or registry_with_sample(), listen, **kw)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def get(port: int, path: str = "/metrics", method: str = "GET",
        headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None,
        conn: http.client.HTTPConnection | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    """One request: (status, headers with lower-case names, body)."""
    if conn is None:
        conn = (http.client.HTTPSConnection("localhost", port, context=context,
                                            timeout=RPC_TIMEOUT) if context else
                http.client.HTTPConnection("127.0.0.1", port, timeout=RPC_TIMEOUT))
    conn.request(method, path, headers=headers or {})
    reply = conn.getresponse()
    body = reply.read()
    return reply.status, {k.lower(): v for k, v in reply.getheaders()}, body


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed `sock` (EOF or reset); never blocks."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True


def hold(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=RPC_TIMEOUT)
            for _ in range(n)]


@pytest.fixture
def held() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


# -- compatibility and formats ---------------------------------------------------------------

def test_constructor_is_backwards_compatible_and_close_ends_everything() -> None:
    """MetricsServer(registry, listen) as server.py calls it; close() frees the port and
    ends the server's threads."""
    server = MetricsServer(registry_with_sample(), "127.0.0.1:0")
    try:
        status, _headers, body = get(server.port)
        assert status == 200 and SAMPLE.encode() in body
        assert any(t.name.startswith("kvmd-metrics") for t in threading.enumerate())
    finally:
        server.close()
    assert not any(t.name.startswith("kvmd-metrics") for t in threading.enumerate())
    with socket.socket() as again:  # the port is free again
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", server.port))


def test_text_or_openmetrics_by_accept_header_gzip_and_head(
        serve: Callable[..., MetricsServer]) -> None:
    server = serve()
    status, headers, body = get(server.port)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert b"# EOF" not in body and f"{SAMPLE} 1.0".encode() in body
    status, headers, body = get(server.port, headers={
        "Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "gzip"})
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert headers.get("content-encoding") == "gzip"
    assert gzip.decompress(body).endswith(b"# EOF\n")
    status, headers, body = get(server.port, method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    # Only /metrics (and /) are served; other methods are refused.
    status, _h, body = get(server.port, "/")
    assert status == 200 and f"{SAMPLE} 1.0".encode() in body
    assert get(server.port, "/other")[0] == 404
    assert get(server.port, method="POST")[0] == 405
    status, _h, body = get(server.port, f"/metrics?name[]={SAMPLE}")
    assert status == 200 and SAMPLE.encode() in body
    assert b"kvmd_metrics_http_connections" not in body
    # gzip refused with q=0 (RFC 9110): plain text; any other weight: gzip.
    status, headers, body = get(server.port, headers={"Accept-Encoding": "gzip;q=0, identity"})
    assert "content-encoding" not in headers and f"{SAMPLE} 1.0".encode() in body
    status, headers, body = get(server.port, headers={"Accept-Encoding": "gzip; q=0.5"})
    assert headers.get("content-encoding") == "gzip"
    assert f"{SAMPLE} 1.0".encode() in gzip.decompress(body)


def test_keep_alive_serves_several_requests_on_one_connection(
        serve: Callable[..., MetricsServer]) -> None:
    server = serve()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=RPC_TIMEOUT)
    try:
        for _ in range(3):
            status, headers, _body = get(server.port, conn=conn)
            assert status == 200 and headers["connection"] == "keep-alive"
        assert server.open_connections == 1
    finally:
        conn.close()


def test_the_endpoint_counts_its_own_connections(serve: Callable[..., MetricsServer],
                                                 held: list[socket.socket]) -> None:
    server = serve(max_connections=4)
    held += hold(server.port, 10)
    wait_for(lambda: server.closed_counts()["evicted"] >= 6, "the extra connections to close")
    _s, _h, body = get(server.port)
    text = body.decode()
    assert re.search(r"^kvmd_metrics_http_connections [1-4]\.0$", text, re.M), text
    evicted = re.search(r'^kvmd_metrics_http_connections_closed_total\{reason="evicted"\} '
                        r"(\d+)\.0$", text, re.M)
    assert evicted and int(evicted.group(1)) >= 7, text


# -- bounded connections and idle timeouts ---------------------------------------------------

def test_idle_connections_cost_no_thread_and_a_scrape_still_gets_through(
        serve: Callable[..., MetricsServer], held: list[socket.socket]) -> None:
    """95 connections that send nothing: the process gains no thread for them, at most
    max_connections stay open (the longest-idle ones make room), and a fresh scrape is
    answered while the rest are held."""
    server = serve(max_connections=8)
    assert get(server.port)[0] == 200  # the render worker exists now
    before = tasks()
    held += hold(server.port, HELD)
    wait_for(lambda: server.open_connections <= 8 and
             sum(closed_by_server(s) for s in held) >= HELD - 8,
             "connections beyond max_connections to be closed")
    status, _h, body = get(server.port)
    assert status == 200 and SAMPLE.encode() in body
    grown = tasks() - before
    assert grown <= DEFAULT_WORKERS - 1, f"{grown} threads more with {HELD} idle connections"
    assert server.open_connections <= 8


def test_idle_and_slow_connections_are_closed_after_the_idle_timeout(
        serve: Callable[..., MetricsServer], held: list[socket.socket]) -> None:
    """Silent connections, a request that never finishes (slowloris) and a keep-alive
    connection after its response are all closed once idle_timeout passes."""
    server = serve(idle_timeout=0.5, max_connections=16)
    held += hold(server.port, 5)
    partial = socket.create_connection(("127.0.0.1", server.port), timeout=RPC_TIMEOUT)
    held.append(partial)
    partial.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    keep = http.client.HTTPConnection("127.0.0.1", server.port, timeout=RPC_TIMEOUT)
    assert get(server.port, conn=keep)[0] == 200
    assert keep.sock is not None
    held.append(keep.sock)
    wait_for(lambda: all(closed_by_server(s) for s in held), "idle connections to be closed",
             timeout=PROMPT)
    assert server.closed_counts()["timeout"] == 7
    assert server.open_connections == 0
    assert get(server.port)[0] == 200  # and the endpoint still serves


class BlockingCollector(Collector):
    """Blocks every collect() until released, to keep requests in progress."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        self.entered.release()
        self.release.wait(PROMPT)
        yield GaugeMetricFamily("kvmd_test_blocked", "Released", value=1)


def test_with_every_connection_busy_a_newcomer_is_closed_at_once(
        serve: Callable[..., MetricsServer]) -> None:
    """max_connections requests in progress: one more connection is closed without being
    served and without a thread; the ones in progress complete."""
    blocking = BlockingCollector()
    registry = registry_with_sample()
    registry.register(blocking)
    server = serve(registry=registry, max_connections=2, workers=2)
    results: list[int] = []
    scrapers = [threading.Thread(target=lambda: results.append(get(server.port)[0]))
                for _ in range(2)]
    try:
        for t in scrapers:
            t.start()
        for _ in range(2):
            assert blocking.entered.acquire(timeout=PROMPT), "a scrape did not start"
        before = tasks()
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=RPC_TIMEOUT)
        try:
            wait_for(lambda: closed_by_server(extra), "the extra connection to be closed")
        finally:
            extra.close()
        assert server.closed_counts()["capacity"] == 1
        assert tasks() <= before
    finally:
        blocking.release.set()
        for t in scrapers:
            t.join(PROMPT)
    assert results == [200, 200]


def test_malformed_requests_are_answered_and_closed(serve: Callable[..., MetricsServer]
                                                    ) -> None:
    server = serve()
    for request, status in [(b"GARBAGE\r\n\r\n", b"400"),
                            (b"GET /metrics HTTP/2.0\r\n\r\n", b"505"),
                            (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n",
                             b"431"),
                            (b"GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
                             b"400")]:
        with socket.create_connection(("127.0.0.1", server.port), timeout=RPC_TIMEOUT) as s:
            s.sendall(request)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 " + status), (request[:40], reply[:80])
    assert server.closed_counts()["bad_request"] == 4


def test_an_http_1_1_client_asking_to_close_gets_the_connection_closed(
        serve: Callable[..., MetricsServer]) -> None:
    """`Connection: close` from an HTTP/1.1 client (curl, a health probe reading to EOF):
    the reply says close and the server ends the connection, not at its idle timeout."""
    server = serve(idle_timeout=60)
    with socket.create_connection(("127.0.0.1", server.port), timeout=PROMPT) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):  # EOF: the server closed (a timeout would raise)
            reply += chunk
    head = reply.split(b"\r\n\r\n", 1)[0].lower()
    assert reply.startswith(b"HTTP/1.1 200") and b"connection: close" in head
    wait_for(lambda: server.open_connections == 0, "the connection to be let go")


def test_http_1_0_client_that_shuts_down_its_side_is_answered(
        serve: Callable[..., MetricsServer]) -> None:
    server = serve()
    with socket.create_connection(("127.0.0.1", server.port), timeout=RPC_TIMEOUT) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and SAMPLE.encode() in reply


def test_the_daemon_keeps_its_thread_count_with_95_idle_metrics_connections(
        tmp_path: Path) -> None:
    """The reported attack against the kvmd process itself (its /metrics as server.py sets
    it up): its thread count does not follow the number of idle connections."""
    sock = tmp_path / "kvmd.sock"
    log_path = tmp_path / "kvmd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([kvmd_script(), "--listen", f"unix://{sock}",
                                 "--metrics-listen", "127.0.0.1:0", "--log-level", "info"],
                                stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    socks: list[socket.socket] = []
    try:
        match = wait_for(lambda: proc.poll() is None and re.search(
            r'msg="metrics listening".*\bport=(\d+)', log_path.read_text()),
            "kvmd to serve metrics")
        port = int(match.group(1))
        assert get(port)[0] == 200
        before = tasks(proc.pid)
        socks = hold(port, HELD)
        status, _h, body = get(port)
        assert status == 200 and b"process_open_fds" in body
        after = tasks(proc.pid)
        assert after - before <= DEFAULT_WORKERS, (
            f"kvmd went from {before} to {after} threads with {HELD} idle connections")
    finally:
        for s in socks:
            s.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- TLS -------------------------------------------------------------------------------------

class Certs:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = trustme.CA()
        self.other_ca = trustme.CA()
        self.ca_file = self.write("ca.pem", self.ca.cert_pem.bytes())
        self.cert, self.key = self.issue_server("server")
        self.client = self.issue_client(self.ca, "prometheus")
        self.stranger = self.issue_client(self.other_ca, "stranger")

    def write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)

    def issue_server(self, stem: str) -> tuple[str, str]:
        leaf = self.ca.issue_cert("localhost", "127.0.0.1")
        return (self.write(f"{stem}.pem", leaf.cert_chain_pems[0].bytes()),
                self.write(f"{stem}.key", leaf.private_key_pem.bytes()))

    def issue_client(self, ca: trustme.CA, name: str) -> tuple[str, str]:
        leaf = ca.issue_cert(f"{name}.clients.test", common_name=name)
        return (self.write(f"{name}.pem", leaf.cert_chain_pems[0].bytes()),
                self.write(f"{name}.key", leaf.private_key_pem.bytes()))

    def client_context(self, client: tuple[str, str] | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if client is not None:
            ctx.load_cert_chain(*client)
        return ctx


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def refused(port: int, context: ssl.SSLContext) -> str:
    """How a scrape over TLS fails; the test fails if metrics come back."""
    try:
        status, _h, body = get(port, context=context)
    except (ssl.SSLError, ConnectionError, http.client.HTTPException, OSError) as exc:
        return type(exc).__name__
    raise AssertionError(f"scrape succeeded with status {status}: {body[:80]!r}")


def test_tls_scrape(serve: Callable[..., MetricsServer], certs: Certs) -> None:
    server = serve(tls_cert=certs.cert, tls_key=certs.key)
    status, _h, body = get(server.port, context=certs.client_context())
    assert status == 200 and SAMPLE.encode() in body
    # Plain HTTP to the TLS port gets no metrics.
    with socket.create_connection(("127.0.0.1", server.port), timeout=RPC_TIMEOUT) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        try:
            while chunk := s.recv(4096):
                reply += chunk
        except ConnectionResetError:
            pass
    assert SAMPLE.encode() not in reply
    wait_for(lambda: server.closed_counts()["tls_handshake"] >= 1, "the handshake to fail")


def test_mtls_refuses_a_client_without_a_certificate_or_from_another_ca(
        serve: Callable[..., MetricsServer], certs: Certs) -> None:
    server = serve(tls_cert=certs.cert, tls_key=certs.key, tls_client_ca=certs.ca_file)
    refused(server.port, certs.client_context())
    refused(server.port, certs.client_context(certs.stranger))
    status, _h, body = get(server.port, context=certs.client_context(certs.client))
    assert status == 200 and SAMPLE.encode() in body
    assert server.closed_counts()["tls_handshake"] >= 2


def served_serial(port: int, certs: Certs) -> int:
    ctx = certs.client_context()
    with socket.create_connection(("127.0.0.1", port), timeout=RPC_TIMEOUT) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_renewed_certificate_files_are_served_without_a_restart(
        serve: Callable[..., MetricsServer], certs: Certs) -> None:
    server = serve(tls_cert=certs.cert, tls_key=certs.key)
    first = served_serial(server.port, certs)
    new_cert, new_key = certs.issue_server("renewed")
    renewed = x509.load_pem_x509_certificate(Path(new_cert).read_bytes()).serial_number
    assert renewed != first
    Path(certs.key).write_bytes(Path(new_key).read_bytes())
    Path(certs.cert).write_bytes(Path(new_cert).read_bytes())
    wait_for(lambda: served_serial(server.port, certs) == renewed,
             "the renewed certificate to be served")


def test_tls_settings_that_cannot_work_are_refused(certs: Certs, tmp_path: Path) -> None:
    registry = registry_with_sample()
    with pytest.raises(ValueError, match="client CA"):
        MetricsServer(registry, "127.0.0.1:0", tls_client_ca=certs.ca_file)
    with pytest.raises(ValueError, match="go together"):
        MetricsServer(registry, "127.0.0.1:0", tls_cert=certs.cert)
    with pytest.raises(OSError):
        MetricsServer(registry, "127.0.0.1:0", tls_cert=str(tmp_path / "missing.pem"),
                      tls_key=certs.key)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(OSError):  # ssl.SSLError is an OSError
        MetricsServer(registry, "127.0.0.1:0", tls_cert=str(not_pem), tls_key=certs.key)
    with pytest.raises(ValueError):
        MetricsServer(registry, "127.0.0.1:0", max_connections=0)


# -- exposure warning ------------------------------------------------------------------------

@pytest.mark.parametrize(("listen", "tls", "warning"), [
    ("0.0.0.0:0", "none", "plain HTTP beyond loopback"),
    ("0.0.0.0:0", "tls", "without client authentication"),
    ("0.0.0.0:0", "mtls", None),
    ("127.0.0.1:0", "none", None),
    ("[::1]:0", "none", None),
    ("localhost:0", "none", None),
])
def test_warning_when_listening_beyond_loopback_without_tls_and_client_certificates(
        serve: Callable[..., MetricsServer], certs: Certs, caplog: pytest.LogCaptureFixture,
        listen: str, tls: str, warning: str | None) -> None:
    kw: dict[str, str] = {}
    if tls in ("tls", "mtls"):
        kw = {"tls_cert": certs.cert, "tls_key": certs.key}
    if tls == "mtls":
        kw["tls_client_ca"] = certs.ca_file
    if listen.startswith("[::1]") and not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    with caplog.at_level(logging.WARNING, logger="kvmd.metrics_http"):
        serve(listen, **kw)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if warning is None:
        assert not warnings, warnings
    else:
        assert len(warnings) == 1 and warning in warnings[0], warnings


# -- requests at the edges -------------------------------------------------------------------

def exchange(port: int, request: bytes, shut: bool = False) -> bytes:
    """Send raw `request` bytes (then shut down the sending side if `shut`) and read until
    the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=PROMPT) as s:
        s.sendall(request)
        if shut:
            s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):  # EOF: the server closed (a timeout would raise)
            reply += chunk
    return reply


def test_listen_addresses_are_checked_and_an_empty_host_is_loopback(
        serve: Callable[..., MetricsServer]) -> None:
    """"host:port" with a port of at most 65535, else ValueError naming the address; ":port"
    listens on 127.0.0.1, never on every interface."""
    assert parse_listen("127.0.0.1:65535") == ("127.0.0.1", 65535)
    assert parse_listen("[::1]:9474") == ("::1", 9474)
    for bad in ("127.0.0.1:65536", "127.0.0.1", "127.0.0.1:x", "127.0.0.1:-1"):
        with pytest.raises(ValueError, match="not host:port"):
            parse_listen(bad)
    assert serve(":0").address == "127.0.0.1"


@pytest.mark.parametrize("request_head", [
    b"GET /metrics HTTP/1.1 extra\r\n\r\n",  # four parts in the request line
    b"GET /metrics HTTP/1.1\r\nHost : x\r\n\r\n",  # whitespace before the colon
    b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # a body
])
def test_requests_http_forbids_are_refused_and_the_endpoint_still_serves(
        serve: Callable[..., MetricsServer], request_head: bytes) -> None:
    """A request line of more than three parts, a header name followed by whitespace (RFC
    9112 5.1: 400) and a chunked body get 400 and the connection closed; /metrics is still
    served after each."""
    server = serve()
    reply = exchange(server.port, request_head)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:80]
    assert server.closed_counts()["bad_request"] == 1
    status, _h, body = get(server.port)
    assert status == 200 and SAMPLE.encode() in body


def test_a_request_head_of_max_request_bytes_is_served_and_one_more_is_not(
        serve: Callable[..., MetricsServer]) -> None:
    """MAX_REQUEST_BYTES bounds the request head (up to the blank line): a head of exactly
    that size is answered, one byte more gets 431."""
    server = serve()
    start = b"GET /metrics HTTP/1.1\r\nX: "
    head = start + b"a" * (MAX_REQUEST_BYTES - len(start))
    assert len(head) == MAX_REQUEST_BYTES
    reply = exchange(server.port, head + b"\r\n\r\n", shut=True)
    assert reply.startswith(b"HTTP/1.1 200 ") and SAMPLE.encode() in reply, reply[:80]
    reply = exchange(server.port, head + b"a\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:80]


def test_a_method_not_allowed_names_the_allowed_ones(serve: Callable[..., MetricsServer]
                                                     ) -> None:
    """405 carries the Allow header RFC 9110 requires: GET, HEAD."""
    server = serve()
    status, headers, _body = get(server.port, method="DELETE")
    assert status == 405 and headers["allow"] == "GET, HEAD"


def test_gzip_refused_with_any_spelling_of_weight_zero(serve: Callable[..., MetricsServer]
                                                       ) -> None:
    """q=0, q=0.0, q=0.00 and q=0.000 all refuse gzip: the body is plain text."""
    server = serve()
    for weight in ("0", "0.0", "0.00", "0.000"):
        _s, headers, body = get(server.port, headers={"Accept-Encoding": f"gzip;q={weight}"})
        assert "content-encoding" not in headers and SAMPLE.encode() in body, weight


def test_an_http_1_0_client_is_answered_and_closed_unless_it_asks_to_keep_alive(
        serve: Callable[..., MetricsServer]) -> None:
    """HTTP/1.0 closes after the response by default (the server closes, the client need
    not shut down its side); with Connection: keep-alive the connection stays open."""
    server = serve(idle_timeout=60)
    reply = exchange(server.port, b"GET /metrics HTTP/1.0\r\n\r\n")
    head = reply.split(b"\r\n\r\n", 1)[0].lower()
    assert reply.startswith(b"HTTP/1.1 200") and b"connection: close" in head
    with socket.create_connection(("127.0.0.1", server.port), timeout=PROMPT) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        assert server.open_connections == 1


def test_pipelined_requests_are_answered_in_order_before_the_clients_end(
        serve: Callable[..., MetricsServer]) -> None:
    """Two requests sent at once, then the client's end of sending (before the first is
    rendered): both are answered, the first keep-alive, the last says close, and then the
    server closes."""
    blocking = BlockingCollector()
    registry = registry_with_sample()
    registry.register(blocking)
    server = serve(registry=registry, idle_timeout=60)
    with socket.create_connection(("127.0.0.1", server.port), timeout=PROMPT) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n\r\nHEAD / HTTP/1.1\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        assert blocking.entered.acquire(timeout=PROMPT), "the first scrape did not start"
        blocking.release.set()
        reply = b""
        while chunk := s.recv(65536):  # EOF: the server closed (a timeout would raise)
            reply += chunk
    first, sep, second = reply.partition(b"HTTP/1.1 200 OK\r\n")[2].partition(
        b"HTTP/1.1 200 OK\r\n")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and sep, reply[:200]
    assert b"Connection: keep-alive" in first and SAMPLE.encode() in first
    assert b"Connection: close" in second and SAMPLE.encode() not in second  # HEAD
    wait_for(lambda: server.open_connections == 0, "the connection to be let go")


class FailingCollector(Collector):
    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        raise RuntimeError("a collector bug")


def test_a_failing_render_is_500_and_the_connection_closed(
        serve: Callable[..., MetricsServer], caplog: pytest.LogCaptureFixture) -> None:
    """A collector that raises: the scrape gets 500 with Connection: close and the server
    closes the connection (a keep-alive client would wait for a body that is not coming);
    the endpoint then serves the next scrape of a working registry as before."""
    registry = registry_with_sample()
    failing = FailingCollector()
    registry.register(failing)
    server = serve(registry=registry, idle_timeout=60)
    with caplog.at_level(logging.ERROR, logger="kvmd.metrics_http"):
        reply = exchange(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 500 ") and b"Connection: close" in reply, reply[:80]
    assert any("rendering /metrics failed" in r.getMessage() for r in caplog.records)
    registry.unregister(failing)
    assert get(server.port)[0] == 200


def test_a_render_slower_than_the_idle_timeout_is_still_answered(
        serve: Callable[..., MetricsServer], held: list[socket.socket]) -> None:
    """The idle timeout bounds waiting for a request or a response's reader, not the
    server's own rendering: a scrape whose collector takes longer than idle_timeout gets
    its 200 (an idle connection opened after it has timed out meanwhile)."""
    blocking = BlockingCollector()
    registry = registry_with_sample()
    registry.register(blocking)
    server = serve(registry=registry, idle_timeout=0.3)
    results: list[int] = []
    scraper = threading.Thread(target=lambda: results.append(get(server.port)[0]))
    scraper.start()
    try:
        assert blocking.entered.acquire(timeout=PROMPT), "the scrape did not start"
        held += hold(server.port, 1)
        wait_for(lambda: closed_by_server(held[0]), "the later idle connection to time out")
    finally:
        blocking.release.set()
        scraper.join(PROMPT)
    assert results == [200]
    assert server.closed_counts()["timeout"] == 1


def test_the_connection_waiting_longest_is_the_one_evicted(
        serve: Callable[..., MetricsServer], held: list[socket.socket]) -> None:
    """Connections all taken: a newcomer replaces the one that has waited longest for a
    request, counted from its last response for a keep-alive one (not from its opening),
    and the other keeps being served."""
    server = serve(max_connections=2, idle_timeout=60)
    held += hold(server.port, 1)
    wait_for(lambda: server.open_connections == 1, "the first connection")
    held += hold(server.port, 1)
    wait_for(lambda: server.open_connections == 2, "the second connection")
    for s in held:
        s.setblocking(True)
    held[0].sendall(b"GET /metrics HTTP/1.1\r\n\r\n")  # the first one is answered:
    assert held[0].recv(65536).startswith(b"HTTP/1.1 200")  # it waits since now
    status, _h, _body = get(server.port)  # a third: evicts the second
    assert status == 200
    wait_for(lambda: closed_by_server(held[1]), "the longest-waiting connection's eviction")
    held[0].setblocking(True)
    held[0].sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
    assert held[0].recv(65536).startswith(b"HTTP/1.1 200")
    assert server.closed_counts()["evicted"] == 1


def test_a_stalled_tls_handshake_is_evicted_for_a_scrape(
        serve: Callable[..., MetricsServer], certs: Certs, held: list[socket.socket]) -> None:
    """A connection that never starts its TLS handshake holds no slot against a scrape:
    with max_connections taken by such connections, a TLS scrape still gets through."""
    server = serve(tls_cert=certs.cert, tls_key=certs.key, max_connections=1,
                   idle_timeout=60)
    held += hold(server.port, 1)
    wait_for(lambda: server.open_connections == 1, "the silent connection")
    status, _h, body = get(server.port, context=certs.client_context())
    assert status == 200 and SAMPLE.encode() in body
    assert server.closed_counts()["evicted"] == 1 and server.closed_counts()["capacity"] == 0


def test_certificate_files_that_stop_loading_leave_the_previous_ones_served(
        serve: Callable[..., MetricsServer], certs: Certs, caplog: pytest.LogCaptureFixture
        ) -> None:
    """A certificate file rewritten with something that does not load (a renewal half
    done): a warning, and scrapes go on with the certificate loaded before."""
    server = serve(tls_cert=certs.cert, tls_key=certs.key)
    first = served_serial(server.port, certs)
    with caplog.at_level(logging.WARNING, logger="kvmd.metrics_http"):
        Path(certs.cert).write_text("not a certificate")
        assert served_serial(server.port, certs) == first
    assert any("do not load" in r.getMessage() for r in caplog.records)
    status, _h, body = get(server.port, context=certs.client_context())
    assert status == 200 and SAMPLE.encode() in body


def test_a_renewal_of_the_same_size_is_noticed_by_its_modification_time(
        serve: Callable[..., MetricsServer], certs: Certs) -> None:
    """Certificate files rewritten in place with contents of the very same sizes (only the
    modification time tells): the next connection is served the renewed certificate."""
    size = 8192  # PEM ignores text around its blocks: pad every file to one size

    def padded(data: bytes) -> bytes:
        assert len(data) < size
        return data + b"\n" * (size - len(data))

    for path in (certs.cert, certs.key):
        Path(path).write_bytes(padded(Path(path).read_bytes()))
    server = serve(tls_cert=certs.cert, tls_key=certs.key)
    first = served_serial(server.port, certs)
    new_cert, new_key = certs.issue_server("renewed")
    Path(certs.key).write_bytes(padded(Path(new_key).read_bytes()))
    Path(certs.cert).write_bytes(padded(Path(new_cert).read_bytes()))
    renewed = served_serial(server.port, certs)
    assert renewed != first
    assert renewed == x509.load_pem_x509_certificate(Path(new_cert).read_bytes()).serial_number


def test_pipelined_requests_are_answered_without_waiting_for_more_input(
        serve: Callable[..., MetricsServer]) -> None:
    """Two requests in one send, the connection left open: both answers come, the second
    without the client sending anything more (it is buffered already)."""
    server = serve(idle_timeout=60)
    with socket.create_connection(("127.0.0.1", server.port), timeout=PROMPT) as s:
        s.sendall(b"HEAD /metrics HTTP/1.1\r\n\r\nHEAD / HTTP/1.1\r\n\r\n")
        reply = b""
        while reply.count(b"HTTP/1.1 200 OK") < 2:
            chunk = s.recv(65536)  # a timeout raises: the second answer never came
            assert chunk, reply
            reply += chunk


def test_an_unterminated_request_beyond_max_request_bytes_gets_431(
        serve: Callable[..., MetricsServer]) -> None:
    """A client that sends more than MAX_REQUEST_BYTES without ever ending its request head
    is answered 431 and closed at once, not buffered until its idle timeout."""
    server = serve(idle_timeout=60)
    reply = exchange(server.port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST_BYTES)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:80]
    assert server.closed_counts()["bad_request"] == 1


def test_limits_that_cannot_work_are_refused() -> None:
    """max_connections and workers of at least 1, a positive idle_timeout: anything else is
    a ValueError before the port is taken."""
    registry = registry_with_sample()
    for bad in ({"idle_timeout": 0}, {"idle_timeout": -1}, {"workers": 0},
                {"max_connections": 0}):
        with pytest.raises(ValueError):
            MetricsServer(registry, "127.0.0.1:0", **bad)



def test_close_closes_every_open_connection(held: list[socket.socket]) -> None:
    """close() ends the connections still open (idle ones, keep-alive ones): their clients
    see the end at once and the server holds no descriptor for them."""
    server = MetricsServer(registry_with_sample(), "127.0.0.1:0", idle_timeout=60)
    try:
        held += hold(server.port, 3)
        wait_for(lambda: server.open_connections == 3, "the connections")
    finally:
        server.close()
    assert server.open_connections == 0
    wait_for(lambda: all(closed_by_server(s) for s in held), "every connection closed")
