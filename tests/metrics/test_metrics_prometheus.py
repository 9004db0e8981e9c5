"""A real Prometheus server (Debian package `prometheus`) scraping a daemon that runs a guest
doing PIO exits, every second, with deploy/prometheus/rules.yml loaded; the test asks
Prometheus's HTTP API what it sees."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from metrics_support import RULES_PATH, MetricsDaemon, free_port, tool, wait_for

# Bounded waits: Prometheus starts in about a second and scrapes every second.
READY_SECONDS = 30.0
QUERY_SECONDS = 40.0
VM = "prom-vm"


class Prometheus:
    """A Prometheus server on a free loopback port, its data in a temporary directory."""

    def __init__(self, binary: str, directory: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = directory / "prometheus.yml"
        self.config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "rule_files:\n"
            f"  - {json.dumps(str(RULES_PATH))}\n"
            "scrape_configs:\n"
            "  - job_name: kvmd\n"
            "    static_configs:\n"
            f"      - targets: [{json.dumps(target)}]\n")
        self.log_path = directory / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config}",
             f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as resp:
            return json.loads(resp.read())

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited early:\n{self.log()}"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result vector."""
        body = self.get("/api/v1/query", query=expr)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_query(self, expr: str, timeout: float = QUERY_SECONDS) -> list[dict[str, Any]]:
        try:
            return wait_for(lambda: self.query(expr), f"a result for {expr}", timeout, 0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ntargets: {self.get('/api/v1/targets')}\n"
                                 f"log:\n{self.log()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


@pytest.fixture
def prometheus_binary() -> str:
    path = tool("prometheus")
    if path is None:
        pytest.skip("the prometheus binary is not installed (Debian package 'prometheus'; "
                    ".ci/run installs it)")
    return path


@pytest.fixture
def scraped(mkvmd: MetricsDaemon, prometheus_binary: str,
            tmp_path: Path) -> Iterator[tuple[MetricsDaemon, Prometheus]]:
    """The daemon running a PIO guest, and a Prometheus scraping it every second."""
    mkvmd.start_pio_guest(VM)
    prom = Prometheus(prometheus_binary, tmp_path, f"127.0.0.1:{mkvmd.metrics_port}")
    try:
        wait_for(prom.ready, "prometheus to be ready", READY_SECONDS, 0.2)
        yield mkvmd, prom
    finally:
        prom.stop()
        mkvmd.delete(VM)
    assert prom.proc.returncode == 0, f"prometheus did not shut down cleanly:\n{prom.log()}"


def test_prometheus_scrapes_exit_rates_and_kernel_stats(
        scraped: tuple[MetricsDaemon, Prometheus]) -> None:
    _daemon, prom = scraped
    rate = prom.wait_query(
        f'rate(kvmd_vcpu_exits_total{{reason="io_out", vm="{VM}"}}[5s]) > 0')
    assert len(rate) == 1
    assert rate[0]["metric"]["job"] == "kvmd"
    assert float(rate[0]["value"][1]) > 0

    up = prom.query('up{job="kvmd"}')
    assert [float(u["value"][1]) for u in up] == [1.0]
    # The kernel's statistics for the VM, scraped as series of their own.
    for name in ("kvmd_kvm_vcpu_exits_total", "kvmd_kvm_vcpu_io_exits_total",
                 "kvmd_kvm_vcpu_halt_exits_total", "kvmd_kvm_vcpu_insn_emulation_total"):
        series = prom.query(f'{name}{{vm="{VM}"}}')
        assert len(series) == 1, (name, series)
    kernel_exits = prom.wait_query(f'rate(kvmd_kvm_vcpu_exits_total{{vm="{VM}"}}[5s]) > 0')
    assert len(kernel_exits) == 1
    names = prom.get("/api/v1/label/__name__/values")["data"]
    assert any(n.startswith("kvmd_kvm_vm_") for n in names)
    assert "kvmd_kvm_vcpu_halt_wait_hist_seconds_bucket" in names
    # Prometheus sees no scrape problems (a malformed exposition would fail the target).
    targets = prom.get("/api/v1/targets")["data"]["activeTargets"]
    assert [(t["health"], t["lastError"]) for t in targets] == [("up", "")]


def test_recording_rules_and_alerts_evaluate_on_real_data(
        scraped: tuple[MetricsDaemon, Prometheus]) -> None:
    daemon, prom = scraped
    recorded = prom.wait_query(
        f'kvmd:vcpu_exits:rate1m{{vm="{VM}", reason="io_out"}} > 0')
    assert recorded[0]["metric"]["instance"] == f"127.0.0.1:{daemon.metrics_port}"
    prom.wait_query(f'kvmd:vcpu_exits_by_vm:rate1m{{vm="{VM}"}} > 0')

    def rules_evaluated() -> list[dict[str, Any]] | None:
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("health") == "ok" for r in rules) else None

    rules = wait_for(rules_evaluated, "every rule evaluated without error", QUERY_SECONDS, 0.5)
    assert {r["name"] for r in rules if r["type"] == "alerting"} == {
        "KvmdDown", "KvmdVmCrashed", "KvmdExitRateSpike", "KvmdRpcErrorRatio"}
    # A healthy daemon: nothing fires (KvmdExitRateSpike needs 5 minutes).
    firing = [a for a in prom.get("/api/v1/alerts")["data"]["alerts"]
              if a["state"] == "firing"]
    assert firing == []
