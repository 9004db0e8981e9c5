"""A real Prometheus (Debian package `prometheus`) scraping the /metrics endpoint over TLS
with a client certificate (mTLS), as deploy/prometheus/prometheus.yml shows; a job without
a client certificate is refused (up == 0). The endpoint closes idle connections after
half a second, so Prometheus's keep-alive connections are closed between its 1 s scrapes
and it reconnects."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from metrics_support import free_port, tool, wait_for
from prometheus_client import CollectorRegistry, Counter
from test_metrics_prometheus import READY_SECONDS, Prometheus

from kvmd.metrics import MetricsServer


class TlsPrometheus(Prometheus):
    def __init__(self, binary: str, directory: Path, scrape_configs: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = directory / "prometheus.yml"
        self.config.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                               "scrape_configs:\n" + scrape_configs)
        self.log_path = directory / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config}",
             f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)


def job(name: str, port: int, ca: str, cert: str | None = None, key: str | None = None) -> str:
    client = (f"      cert_file: {json.dumps(cert)}\n      key_file: {json.dumps(key)}\n"
              if cert else "")
    return (f"  - job_name: {name}\n    scheme: https\n    tls_config:\n"
            f"      ca_file: {json.dumps(ca)}\n      server_name: localhost\n{client}"
            f"    static_configs:\n      - targets: [\"127.0.0.1:{port}\"]\n")


@pytest.fixture
def prometheus_binary() -> str:
    path = tool("prometheus")
    if path is None:
        pytest.skip("the prometheus binary is not installed (Debian package 'prometheus')")
    return path


@pytest.fixture
def mtls_scrape(tmp_path: Path, prometheus_binary: str) -> Iterator[TlsPrometheus]:
    ca = trustme.CA()
    files = {"ca": str(tmp_path / "ca.pem")}
    Path(files["ca"]).write_bytes(ca.cert_pem.bytes())
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("prometheus.clients.test")
    for name, leaf in [("server", server), ("client", client)]:
        files[name] = str(tmp_path / f"{name}.pem")
        files[f"{name}-key"] = str(tmp_path / f"{name}.key")
        Path(files[name]).write_bytes(leaf.cert_chain_pems[0].bytes())
        Path(files[f"{name}-key"]).write_bytes(leaf.private_key_pem.bytes())
    registry = CollectorRegistry(auto_describe=False)
    Counter("kvmd_test_scrapes", "A sample to find", registry=registry).inc()
    endpoint = MetricsServer(registry, "127.0.0.1:0", tls_cert=files["server"],
                             tls_key=files["server-key"], tls_client_ca=files["ca"],
                             idle_timeout=0.5)
    prom = TlsPrometheus(prometheus_binary, tmp_path,
                         job("kvmd", endpoint.port, files["ca"], files["client"],
                             files["client-key"]) +
                         job("stranger", endpoint.port, files["ca"]))
    try:
        wait_for(prom.ready, "prometheus to be ready", READY_SECONDS, 0.2)
        yield prom
    finally:
        prom.stop()
        endpoint.close()


def test_prometheus_scrapes_over_mtls_and_a_job_without_a_certificate_is_refused(
        mtls_scrape: TlsPrometheus) -> None:
    prom = mtls_scrape
    assert prom.wait_query('up{job="kvmd"} == 1')
    assert prom.wait_query('kvmd_test_scrapes_total{job="kvmd"} == 1')
    assert prom.wait_query('up{job="stranger"} == 0')
    assert not prom.query('kvmd_test_scrapes_total{job="stranger"}')
    # Several scrapes in a row succeed although the endpoint closes idle connections
    # between them.
    assert prom.wait_query('sum_over_time(up{job="kvmd"}[10s]) >= 3')
