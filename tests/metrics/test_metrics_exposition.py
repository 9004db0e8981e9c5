"""The /metrics endpoint: lint-clean Prometheus text (promtool check metrics), OpenMetrics
when the scraper asks for it by Accept header, the text format otherwise."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import grpc
import pytest
from metrics_support import RPC_TIMEOUT, MetricsDaemon
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from kvmd_proto import vmm_pb2 as pb

# What Prometheus 2.x sends when it scrapes (OpenMetrics preferred, text as a fallback).
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def busy_daemon(factory: Callable[..., MetricsDaemon], **config: object) -> MetricsDaemon:
    """A daemon running a PIO guest, with some failed RPCs behind it (all families filled)."""
    d = factory(**config)
    d.start_pio_guest("busy", vcpus=2)
    with pytest.raises(grpc.RpcError):
        d.vms.GetVm(pb.GetVmRequest(vm_id="missing"), timeout=RPC_TIMEOUT)
    d.vms.WriteConsole(pb.WriteConsoleRequest(vm_id="busy", data=b"x"), timeout=RPC_TIMEOUT)
    return d


@pytest.mark.parametrize("vcpu_label", [False, True], ids=["default", "vcpu-label"])
def test_scrape_of_a_running_guest_passes_promtool_check_metrics(
        metrics_daemon: Callable[..., MetricsDaemon], promtool: str, vcpu_label: bool) -> None:
    d = busy_daemon(metrics_daemon, metrics_vcpu_label=vcpu_label)
    scrape = d.scrape()
    assert "kvmd_vcpu_exits_total{" in scrape.body
    assert "kvmd_kvm_vcpu_exits_total{" in scrape.body
    result = subprocess.run([promtool, "check", "metrics"], input=scrape.body, text=True,
                            capture_output=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        f"promtool check metrics failed ({result.returncode}):\n{result.stdout}"
        f"{result.stderr}")
    d.delete("busy")


@pytest.mark.parametrize("accept", [None, "text/plain", "text/plain;version=0.0.4", "*/*"])
def test_text_format_unless_openmetrics_is_asked_for(mkvmd: MetricsDaemon,
                                                     accept: str | None) -> None:
    mkvmd.create_guest("txt")
    scrape = mkvmd.scrape(accept)
    assert scrape.content_type.startswith("text/plain"), scrape.content_type
    assert "version=0.0.4" in scrape.content_type
    assert "# EOF" not in scrape.body
    assert scrape.find("kvmd_vcpu_exits_total", vm="txt", reason="io_out")
    mkvmd.delete("txt")


@pytest.mark.parametrize("accept", ["application/openmetrics-text",
                                    "application/openmetrics-text; version=1.0.0",
                                    PROMETHEUS_ACCEPT], ids=["bare", "1.0.0", "prometheus"])
def test_openmetrics_when_asked_by_accept_header(mkvmd: MetricsDaemon, accept: str) -> None:
    mkvmd.start_pio_guest("om")
    scrape = mkvmd.scrape(accept)
    assert scrape.content_type.startswith("application/openmetrics-text"), scrape.content_type
    assert scrape.body.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(scrape.body)}  # strict parser
    exits = families["kvmd_vcpu_exits"]
    assert exits.type == "counter"
    io_out = [s for s in exits.samples
              if s.name == "kvmd_vcpu_exits_total" and s.labels == {"vm": "om",
                                                                    "reason": "io_out"}]
    assert len(io_out) == 1 and io_out[0].value > 0
    assert families["kvmd_remote_exit_seconds"].type == "histogram"
    assert families["kvmd_vms"].type == "gauge"
    mkvmd.delete("om")
