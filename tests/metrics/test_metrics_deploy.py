"""deploy/prometheus (promtool check rules/config, alert unit tests) and
deploy/grafana/kvmd-dashboard.json (importable, templated, and every metric its queries use
is one a live daemon exports)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from metrics_support import (
    DASHBOARD_PATH,
    PROMETHEUS_CONFIG_PATH,
    PROMETHEUS_SYNTHETIC,
    RPC_TIMEOUT,
    RULES_PATH,
    MetricsDaemon,
    dashboard_queries,
    grafana_query_metric_names,
    promql_metric_names,
    recording_rules,
    resolve_recorded,
    rule_expressions,
)

from kvmd.config import build_parser, load_config
from kvmd.metrics import DEFAULT_METRICS_LISTEN
from kvmd_proto import vmm_pb2 as pb

RULES_TEST_PATH = Path(__file__).with_name("rules_test.yml")


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


# -- Prometheus ------------------------------------------------------------------------------

def test_rules_pass_promtool_check_rules(promtool: str) -> None:
    result = run([promtool, "check", "rules", str(RULES_PATH)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_prometheus_config_passes_promtool_check_config(promtool: str) -> None:
    # rule_files is relative to the config file: promtool resolves it, and checks the rules.
    result = run([promtool, "check", "config", str(PROMETHEUS_CONFIG_PATH)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_alert_rules_fire_when_they_should(promtool: str) -> None:
    """promtool test rules: each alert fires on the series that should trigger it (the first
    crash of a reason included) and stays quiet on the ones that should not."""
    result = run([promtool, "test", "rules", str(RULES_TEST_PATH)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_define_the_recordings_and_alerts_operators_rely_on() -> None:
    kinds = {(kind, name) for kind, name, _ in rule_expressions(RULES_PATH.read_text())}
    assert {("record", "kvmd:vcpu_exits:rate1m"), ("record", "kvmd:vcpu_exits_by_vm:rate1m"),
            ("alert", "KvmdDown"), ("alert", "KvmdVmCrashed"),
            ("alert", "KvmdExitRateSpike"), ("alert", "KvmdRpcErrorRatio")} <= kinds
    recorded = recording_rules(RULES_PATH.read_text())
    assert "by (instance, job, vm, reason)" in recorded["kvmd:vcpu_exits:rate1m"]


def test_prometheus_config_targets_the_documented_default_port() -> None:
    cfg = load_config(build_parser().parse_args([]))
    assert cfg.metrics_listen == DEFAULT_METRICS_LISTEN == "127.0.0.1:9474"
    text = PROMETHEUS_CONFIG_PATH.read_text()
    assert re.search(r"job_name:\s*kvmd\b", text)  # KvmdDown matches up{job="kvmd"}
    targets = re.findall(r"targets:\s*\[([^\]]*)\]", text)
    assert [t.strip().strip("\"'") for t in targets] == [DEFAULT_METRICS_LISTEN]
    assert re.search(r"rule_files:\s*\n\s*-\s*rules\.yml", text)


# -- the PromQL name extractor the checks below rely on -----------------------------------

@pytest.mark.parametrize(("expr", "names"), [
    ('histogram_quantile(0.99, sum by (method, le) (rate(kvmd_grpc_request_duration_seconds_'
     'bucket{instance=~"$instance", code!="OK"}[$__rate_interval])))',
     {"kvmd_grpc_request_duration_seconds_bucket"}),
    ("(increase(kvmd_vm_crashes_total[10m]) > 0) or (kvmd_vm_crashes_total > 0 unless "
     "kvmd_vm_crashes_total offset 10m)", {"kvmd_vm_crashes_total"}),
    ("a:b:rate1m > 3 * on (vm) group_left(reason) c_total and bool up{job='x'} > 1e3",
     {"a:b:rate1m", "c_total", "up"}),
    ('topk(10, sum without (vcpu) (rate(x_total{vm=~"${vm}"}[5m])) / 2) or vector(0)',
     {"x_total"}),
])
def test_promql_metric_name_extractor(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_grafana_variable_query_names() -> None:
    assert grafana_query_metric_names('label_values(kvmd_vm_state{instance=~"$instance"}, vm)') \
        == {"kvmd_vm_state"}
    assert grafana_query_metric_names("label_values(instance)") == set()
    assert resolve_recorded({"kvmd:vcpu_exits:rate1m", "up"},
                            recording_rules(RULES_PATH.read_text())) == {
        "kvmd_vcpu_exits_total", "up"}


# -- Grafana ---------------------------------------------------------------------------------

def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_PATH.read_text())


def all_panels(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in items:
        out.append(p)
        out.extend(all_panels(p.get("panels", [])))
    return out


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    d = load_dashboard()
    assert d["title"] and d["uid"] and len(d["uid"]) <= 40
    assert d["id"] is None  # so importing creates the dashboard instead of overwriting one
    assert 36 <= d["schemaVersion"] <= 41
    variables = {v["name"]: v for v in d["templating"]["list"]}
    # A data source variable, which every panel and target uses.
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ds = {"type": "prometheus", "uid": "${datasource}"}
    # Templated on instance and vm, both from label_values queries on kvmd metrics.
    for name in ("instance", "vm"):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"] == ds
        assert var["query"]["query"].startswith("label_values(")
        assert var["query"]["query"].rstrip(") ").endswith(name)
        assert var["multi"] and var["includeAll"]
    panels = all_panels(d["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    queried = [p for p in panels if p["type"] != "row"]
    assert len(queried) >= 10
    for p in queried:
        assert p["datasource"] == ds, p["title"]
        assert p["targets"], p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds and t["expr"].strip(), p["title"]
            # Panels follow the template variables (only topk and the daemon-wide stats
            # look across VMs).
            assert "$instance" in t["expr"], (p["title"], t["expr"])
    # No two panels overlap on the grid.
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_dashboard_covers_what_operators_need() -> None:
    used: set[str] = set()
    for _where, expr in dashboard_queries(load_dashboard()):
        used |= grafana_query_metric_names(expr)
    used = resolve_recorded(used, recording_rules(RULES_PATH.read_text()))
    assert {
        "kvmd_vcpu_exits_total",                       # exits/s by reason, top VMs
        "kvmd_kvm_vcpu_exits_total", "kvmd_kvm_vcpu_halt_exits_total",
        "kvmd_kvm_vcpu_io_exits_total", "kvmd_kvm_vcpu_insn_emulation_total",  # kernel
        "kvmd_vm_state", "kvmd_vcpus", "kvmd_vms",     # VMs and vCPUs by state
        "kvmd_guest_memory_bytes", "kvmd_dirty_pages_total",  # memory, dirty-page rate
        "kvmd_grpc_requests_total", "kvmd_grpc_request_duration_seconds_bucket",  # RPC
        "kvmd_remote_exit_seconds_bucket",             # remote exit wait quantiles
    } <= used
    exprs = " ".join(e for _w, e in dashboard_queries(load_dashboard()))
    assert "topk(" in exprs and "histogram_quantile(" in exprs


def test_dashboard_and_rules_use_only_metrics_the_daemon_exports(
        metrics_daemon: Callable[..., MetricsDaemon]) -> None:
    """Every metric name in the dashboard's queries and variables and in the rules'
    expressions (recording-rule names resolved to their sources) is exported by a live
    daemon running a guest (Prometheus's own `up` aside)."""
    d = metrics_daemon()
    d.start_pio_guest("live")
    d.crash_guest("crashed")
    with pytest.raises(grpc.RpcError):
        d.vms.GetVm(pb.GetVmRequest(vm_id="missing"), timeout=RPC_TIMEOUT)
    exported = d.scrape().exported_names()
    assert "kvmd_vm_crashes_total" in exported and "kvmd_kvm_vcpu_exits_total" in exported

    recorded = recording_rules(RULES_PATH.read_text())
    sources: list[tuple[str, str]] = list(dashboard_queries(load_dashboard()))
    sources += [(f"rules.yml {kind} {name}", expr)
                for kind, name, expr in rule_expressions(RULES_PATH.read_text())]
    missing = []
    checked = set()
    for where, expr in sources:
        names = resolve_recorded(grafana_query_metric_names(expr), recorded)
        assert names, f"{where}: no metric found in {expr!r}"
        for name in names - PROMETHEUS_SYNTHETIC:
            checked.add(name)
            if name not in exported:
                missing.append(f"{where}: {name}")
    assert not missing, "metrics not exported by kvmd:\n" + "\n".join(missing)
    assert len(checked) >= 20
    d.delete("live")
    d.delete("crashed")
