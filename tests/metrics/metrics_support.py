"""Helpers for the metrics tests: an in-process kvmd with /metrics on a free loopback port,
a PIO-loop guest driven over gRPC, scrape parsing, and the PromQL metric-name extractor.

The guest is `out 0x80, al; jmp -4` at 0x1000 in real mode: port 0x80 is unclaimed, so the C
run loop completes every access itself and counts it as an `io_out` exit (about 7.5 us per
exit on these nested-virtualization hosts).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from polling import wait_until
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from kvmd.server import Config, Daemon
from kvmd_proto import vmm_pb2 as pb
from kvmd_proto import vmm_pb2_grpc as rpc

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULES_PATH = PROMETHEUS_DIR / "rules.yml"
PROMETHEUS_CONFIG_PATH = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD_PATH = REPO / "deploy" / "grafana" / "kvmd-dashboard.json"

CODE_ADDR = 0x1000
RAM_SIZE = 0x10000
PIO_PORT = 0x80
PIO_LOOP = bytes([
    0xE6, PIO_PORT,  # loop: out 0x80, al   (unclaimed port: completed in C, an io_out exit)
    0xEB, 0xFC,      #       jmp loop
])
RPC_TIMEOUT = 30.0
WAIT_SECONDS = 20.0  # bounded waits for things that take milliseconds


def tool(name: str) -> str | None:
    """Path of a Prometheus binary (PATH, then /usr/bin), or None when not installed."""
    return shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists()
                                  else None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = WAIT_SECONDS,
             interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy and return it; fail with `what` after `timeout`."""
    return wait_until(predicate, timeout, what, interval)


@dataclass
class Scrape:
    """One /metrics response."""

    content_type: str
    body: str

    def samples(self) -> list[Sample]:
        return [s for fam in text_string_to_metric_families(self.body) for s in fam.samples]

    def families(self) -> dict[str, str]:
        """Family name (as declared by # TYPE, counters without _total) -> type."""
        return {fam.name: fam.type for fam in text_string_to_metric_families(self.body)}

    def find(self, name: str, **labels: str) -> list[Sample]:
        """Samples of `name` whose labels include `labels`."""
        return [s for s in self.samples() if s.name == name
                and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        """The value of the one sample of `name` with exactly these labels."""
        found = [s for s in self.find(name, **labels) if s.labels == labels]
        assert len(found) == 1, f"expected one {name}{labels}, found {found}"
        return float(found[0].value)

    def exported_names(self) -> set[str]:
        """Every series name a PromQL query could use against this scrape: the sample names,
        plus the names implied by declared families that have no sample yet (a counter
        family `x` is queried as `x_total`; a histogram as `x_bucket`/`x_sum`/`x_count`)."""
        names = {s.name for s in self.samples()}
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "summary": ("", "_sum", "_count")}
        for fam, kind in self.families().items():
            for suffix in suffixes.get(kind, ("",)):
                names.add(fam + suffix)
        return names


class MetricsDaemon:
    """An in-process kvmd on a Unix socket with /metrics on a free loopback port, and
    stubs for it."""

    def __init__(self, directory: Path, **config: Any) -> None:
        self.socket_path = directory / "kvmd.sock"
        self.address = f"unix://{self.socket_path}"
        config.setdefault("metrics_listen", "127.0.0.1:0")
        config.setdefault("log_level", "warning")
        self.daemon = Daemon(Config(listen=[self.address], **config))
        self.daemon.start()
        self.channel = grpc.insecure_channel(self.address)
        self.vms = rpc.VmsStub(self.channel)
        self.memory = rpc.MemoryStub(self.channel)
        self.vcpus = rpc.VcpusStub(self.channel)
        self.hypervisor = rpc.HypervisorStub(self.channel)

    @property
    def metrics_port(self) -> int:
        assert self.daemon.metrics_server is not None, "metrics are off"
        return int(self.daemon.metrics_server.port)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def scrape(self, accept: str | None = None) -> Scrape:
        return self.scrape_with_timeout(RPC_TIMEOUT, accept)

    def scrape_with_timeout(self, timeout: float, accept: str | None = None) -> Scrape:
        headers = {"Accept": accept} if accept else {}
        req = urllib.request.Request(self.metrics_url, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            assert resp.status == 200
            return Scrape(resp.headers["Content-Type"], resp.read().decode())

    # -- guests ---------------------------------------------------------------------------

    def create_guest(self, vm_id: str, program: bytes = PIO_LOOP, vcpus: int = 1) -> None:
        """A VM with 64 KiB of RAM, `program` at CODE_ADDR and `vcpus` real-mode vCPUs
        entering it (not started)."""
        self.vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id), timeout=RPC_TIMEOUT)
        self.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
            vm_id=vm_id, guest_addr=0, size=RAM_SIZE), timeout=RPC_TIMEOUT)
        self.memory.WriteGuestMemory(iter([pb.WriteGuestMemoryRequest(
            vm_id=vm_id, guest_addr=CODE_ADDR, data=program)]), timeout=RPC_TIMEOUT)
        for vcpu_id in range(vcpus):
            self.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=vcpu_id),
                                  timeout=RPC_TIMEOUT)
            ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=vcpu_id)
            sregs = self.vcpus.GetSregs(ref, timeout=RPC_TIMEOUT)
            sregs.cs.base = 0
            sregs.cs.selector = 0
            self.vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref, sregs=sregs), timeout=RPC_TIMEOUT)
            self.vcpus.SetRegs(pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(
                rip=CODE_ADDR, rflags=2)), timeout=RPC_TIMEOUT)

    def start_pio_guest(self, vm_id: str, vcpus: int = 1, min_exits: int = 100) -> None:
        """Create and start a PIO-loop guest; return once it made `min_exits` io_out exits."""
        self.create_guest(vm_id, PIO_LOOP, vcpus)
        self.vms.StartVm(pb.VmRef(vm_id=vm_id), timeout=RPC_TIMEOUT)
        wait_for(lambda: self.exit_stats(vm_id).total["io_out"] >= min_exits,
                 f"{min_exits} io_out exits from {vm_id}")

    def crash_guest(self, vm_id: str) -> pb.Vm:
        """A one-vCPU guest that crashes at once: it executes from guest-physical 0x10000,
        which no slot backs (real mode, CS base 0x10000), so KVM reports an internal error
        (emulation failure). Returns the VM once it is crashed."""
        self.create_guest(vm_id, bytes([0xF4]))  # hlt (never reached)
        ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=0)
        sregs = self.vcpus.GetSregs(ref, timeout=RPC_TIMEOUT)
        sregs.cs.base = RAM_SIZE
        sregs.cs.selector = RAM_SIZE >> 4
        self.vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref, sregs=sregs), timeout=RPC_TIMEOUT)
        self.vcpus.SetRegs(pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(rip=0, rflags=2)),
                           timeout=RPC_TIMEOUT)
        self.vms.StartVm(pb.VmRef(vm_id=vm_id), timeout=RPC_TIMEOUT)
        return wait_for(lambda: (lambda vm: vm if vm.state == "crashed" else None)(
            self.vms.GetVm(pb.GetVmRequest(vm_id=vm_id), timeout=RPC_TIMEOUT)),
            f"{vm_id} to crash")

    def exit_stats(self, vm_id: str) -> pb.ExitStats:
        return self.vms.GetExitStats(pb.VmRef(vm_id=vm_id), timeout=RPC_TIMEOUT)

    def pause(self, vm_id: str) -> None:
        self.vms.PauseVm(pb.VmRef(vm_id=vm_id), timeout=RPC_TIMEOUT)

    def delete(self, vm_id: str) -> None:
        self.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id), timeout=RPC_TIMEOUT)

    def close(self) -> None:
        self.channel.close()
        self.daemon.stop()


class KvmdProcess(MetricsDaemon):
    """kvmd as a process (the console script next to this interpreter), with /metrics on a
    free loopback port; the same stubs and guest helpers as the in-process daemon. `stop()`
    sends SIGTERM and, if the daemon does not exit within STOP_SECONDS, SIGKILL."""

    STOP_SECONDS = 10.0

    def __init__(self, directory: Path, *flags: str) -> None:
        self.socket_path = directory / "kvmd.sock"
        self.address = f"unix://{self.socket_path}"
        self.port = free_port()
        script = Path(sys.executable).with_name("kvmd")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "kvmd.launch"]
        self.log_path = directory / "kvmd.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*command, "--listen", self.address, "--metrics-listen", f"127.0.0.1:{self.port}",
             "--log-level", "info", *flags], stdout=self._log, stderr=subprocess.STDOUT)
        self.killed = False
        self.stopped = False
        self.channel = grpc.insecure_channel(self.address)
        self.vms = rpc.VmsStub(self.channel)
        self.memory = rpc.MemoryStub(self.channel)
        self.vcpus = rpc.VcpusStub(self.channel)
        self.hypervisor = rpc.HypervisorStub(self.channel)

        def ready() -> bool:
            assert self.proc.poll() is None, f"kvmd exited early:\n{self.log()}"
            try:
                self.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=1)
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except (grpc.RpcError, OSError):
                return False

        wait_for(ready, "kvmd to serve gRPC and /metrics", 30.0, 0.1)

    @property
    def metrics_port(self) -> int:
        return self.port

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if needed; the exit code (negative: killed by a signal)."""
        if self.stopped:
            return self.proc.returncode
        self.stopped = True
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.killed = True
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=self.STOP_SECONDS)
        self._log.close()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()


# -- PromQL metric names -------------------------------------------------------------------

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "inf", "nan", "atan2", "start", "end",
}
# Series Prometheus itself attaches to every scrape target (not exported by the daemon).
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped",
                        "scrape_samples_post_metric_relabeling", "scrape_series_added"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_TOKEN = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?|[A-Za-z_:][\w:]*|\S")


def promql_metric_names(expr: str) -> set[str]:
    """Metric (and recording-rule) names an expression selects: identifiers that are not
    functions (followed by "("), keywords, label names (inside {...} or by/without (...)),
    durations, numbers or Grafana variables."""
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VAR.sub("1", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    tokens = _TOKEN.findall(text)
    names = set()
    for i, tok in enumerate(tokens):
        if not re.fullmatch(r"[A-Za-z_:][\w:]*", tok) or tok.lower() in PROMQL_KEYWORDS:
            continue
        if i + 1 < len(tokens) and tokens[i + 1] == "(":
            continue  # a function or aggregation
        names.add(tok)
    return names


_LABEL_VALUES = re.compile(r"^\s*label_values\s*\((.*),\s*([A-Za-z_]\w*)\s*\)\s*$", re.S)


def grafana_query_metric_names(query: str) -> set[str]:
    """Metric names of a Grafana template-variable query: label_values(metric, label),
    label_values(label) (none), query_result(expr), or a plain PromQL expression."""
    m = _LABEL_VALUES.match(query)
    if m:
        return promql_metric_names(m.group(1))
    if re.fullmatch(r"\s*label_values\s*\(\s*\w+\s*\)\s*", query):
        return set()
    m = re.fullmatch(r"\s*(?:query_result|metrics)\s*\((.*)\)\s*", query, re.S)
    if m:
        return promql_metric_names(m.group(1))
    return promql_metric_names(query)


def rule_expressions(rules_yaml: str) -> list[tuple[str, str, str]]:
    """(kind, name, expr) of every rule, kind "record" or "alert", from a rules file written
    as deploy/prometheus/rules.yml is (`- record: NAME` / `- alert: NAME`, then `expr:` on one
    line or as a `|` block). Not a YAML parser: it fails on a rule whose expression it
    cannot find, so a restyled file fails the tests instead of passing them unread."""
    rules: list[tuple[str, str, str]] = []
    lines = rules_yaml.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)-\s+(record|alert):\s*(\S+)\s*$", lines[i])
        if not m:
            i += 1
            continue
        kind, name, indent = m.group(2), m.group(3), len(m.group(1)) + 2
        expr = None
        i += 1
        while i < len(lines) and not re.match(r"^\s*-\s", lines[i]):
            e = re.match(r"^\s*expr:\s*(.*)$", lines[i])
            if e and e.group(1).strip() in ("|", ">", "|-", ">-"):
                block = []
                i += 1
                while i < len(lines) and (not lines[i].strip() or
                                          len(lines[i]) - len(lines[i].lstrip()) > indent):
                    block.append(lines[i].strip())
                    i += 1
                expr = " ".join(block).strip()
                continue
            if e:
                expr = e.group(1).strip()
            i += 1
        assert expr, f"{kind} rule {name} has no expr this parser understands"
        rules.append((kind, name, expr))
    return rules


def recording_rules(rules_yaml: str) -> dict[str, str]:
    """record name -> expression."""
    return {name: expr for kind, name, expr in rule_expressions(rules_yaml) if kind == "record"}


def resolve_recorded(names: set[str], recorded: dict[str, str]) -> set[str]:
    """Replace recording-rule names by the metric names of their expressions (recursively)."""
    out: set[str] = set()
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in recorded:
            todo.extend(promql_metric_names(recorded[name]))
        else:
            out.add(name)
    return out


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, expression) for every panel target (rows' nested panels included) and every
    query-type template variable."""
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr"):
                yield f"panel {p.get('title')!r} target {t.get('refId')}", t["expr"]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var.get("query")
            text = q.get("query", "") if isinstance(q, dict) else q or var.get("definition", "")
            yield f"variable ${var['name']}", text
