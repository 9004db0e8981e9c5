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
from kvmd.metrics_http import DEFAULT_WORKERS

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
