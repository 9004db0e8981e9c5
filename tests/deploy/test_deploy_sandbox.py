"""Can the daemon live with the sandbox its unit puts it in? systemd is not running here,
so each test rebuilds one part of kvmd.service's sandbox from the unit file itself and runs
the kvmd console script inside it through a real workload (listen with the socket group,
TLS, metrics, create a VM, run a guest that writes to the console, stop, delete, SIGHUP,
SIGTERM -> 0):

* SystemCallFilter= (allow list expanded by `systemd-analyze syscall-filter`, in order,
  with SystemCallErrorNumber=): seccomp through libseccomp (seccomp_exec.py).
* MemoryDenyWriteExecute=yes and RestrictAddressFamilies=: seccomp the way systemd does.
* CapabilityBoundingSet= (empty), NoNewPrivileges=, User=root, Group=: setpriv.
* ProcSubset=pid, ProtectProc=invisible: a private mount namespace with such a /proc.

The issue asks that every hardening directive the daemon cannot live with be left out (with
a comment); a failure here names a directive the daemon does not survive.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from deploy_support import RPC_TIMEOUT, Pki, Stubs, kvmd_script
from polling import wait_until

from kvmd.api.gen import vmm_pb2 as pb

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
UNIT = REPO / "deploy" / "systemd" / "kvmd.service"
SECCOMP_EXEC = HERE / "seccomp_exec.py"
FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10}

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"),
                                reason="/dev/kvm is absent: the daemon runs on real KVM")


def unit_values(key: str) -> list[str]:
    """Every value of `key` in the unit's [Service] section, in order."""
    values: list[str] = []
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and line.startswith(key + "="):
            values.append(line[len(key) + 1:])
    return values


def syscall_groups(tool: str) -> dict[str, list[str]]:
    """{"@group": [members]} as this systemd defines them."""
    out = subprocess.run([tool, "syscall-filter", "--no-pager"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and current is not None:
            item = line.strip()
            if item and not item.startswith("#"):
                current.append(item)
        else:
            current = None
    return groups


def expand(name: str, groups: dict[str, list[str]]) -> set[str]:
    if not name.startswith("@"):
        return {name}
    out: set[str] = set()
    for member in groups[name]:
        out |= expand(member, groups)
    return out


def unit_syscall_allow_list() -> tuple[list[str], int]:
    """The unit's SystemCallFilter= lines folded as systemd does (the first assignment sets
    allow-list mode; later ones add, or remove with ~), and SystemCallErrorNumber=."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is needed to expand the unit's system call groups")
    groups = syscall_groups(tool)
    lines = unit_values("SystemCallFilter")
    assert lines and not lines[0].startswith("~"), "expected an allow-list filter"
    allowed = expand("@default", groups)  # systemd always adds @default to allow lists
    for line in lines:
        deny = line.startswith("~")
        names: set[str] = set()
        for item in line.lstrip("~").split():
            names |= expand(item, groups)
        allowed = allowed - names if deny else allowed | names
    errnos = unit_values("SystemCallErrorNumber")
    code = getattr(errno, errnos[-1]) if errnos else errno.EPERM
    return sorted(allowed), code


@pytest.fixture
def socket_group() -> Iterator[str]:
    """A temporary group in the role of the unit's Group=kvmd / socket_group = "kvmd"."""
    name = f"kvmds{secrets.token_hex(4)}"
    groupadd, groupdel = shutil.which("groupadd"), shutil.which("groupdel")
    if not (groupadd and groupdel):
        pytest.skip("groupadd/groupdel are needed for a temporary socket group")
    subprocess.run([groupadd, "--system", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run([groupdel, name], check=False, capture_output=True)


def run_workload(prefix: list[str], directory: Path, group: str, pki: Pki) -> dict[str, str]:
    """Run kvmd (after `prefix`) like the shipped config does (Unix socket with a group,
    metrics) plus a TLS listener; drive a guest through it; SIGHUP; SIGTERM. Returns the
    metrics text. Fails with the daemon's log at the first step that goes wrong."""
    sock = directory / "kvmd.sock"
    log_path = directory / "kvmd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*prefix, kvmd_script(), "--listen", f"unix://{sock}", "--listen", "127.0.0.1:0",
             "--tls-cert", pki.server.cert, "--tls-key", pki.server.key,
             "--socket-group", group, "--metrics-listen", "127.0.0.1:0",
             "--log-level", "info"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log_text() -> str:
        return log_path.read_text(errors="replace")

    def step(what: str) -> str:
        return f"{what}; exit code {proc.poll()}; kvmd log:\n{log_text()}"

    stubs: Stubs | None = None
    try:
        wait_until(lambda: "kvmd listening" in log_text() or proc.poll() is not None, 30,
                   "kvmd to start")
        assert proc.poll() is None, step("kvmd did not start")
        stubs = Stubs.of(grpc.insecure_channel(f"unix://{sock}"))
        try:
            assert stubs.serving()
            assert stubs.hypervisor.GetInfo(pb.GetInfoRequest(),
                                            timeout=RPC_TIMEOUT).api_version == 12
            stubs.boot("sandboxed")
            stubs.vms.StartVm(pb.VmRef(vm_id="sandboxed"), timeout=RPC_TIMEOUT)
            assert stubs.console_backlog("sandboxed", 2) == b"hi"
            stubs.vms.StopVm(pb.VmRef(vm_id="sandboxed"), timeout=RPC_TIMEOUT)
            stubs.delete_vm("sandboxed")
        except grpc.RpcError as exc:
            pytest.fail(step(f"RPC failed: {exc.code()} {exc.details()}"))  # type: ignore[attr-defined]
        match = re.search(r'msg="metrics listening".*\bport=(\d+)', log_text())
        assert match, step("no metrics port logged")
        with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/metrics",
                                    timeout=RPC_TIMEOUT) as reply:
            metrics = reply.read().decode()
        proc.send_signal(signal.SIGHUP)
        assert stubs.serving()
        assert proc.poll() is None, step("kvmd died on SIGHUP")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        assert code == 0, step("SIGTERM did not end kvmd with 0")
        assert "Traceback" not in log_text(), step("kvmd logged a traceback")
        return {"metrics": metrics, "log": log_text()}
    finally:
        if stubs is not None:
            stubs.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def seccomp_prefix(directory: Path, spec: dict[str, object]) -> list[str]:
    if not any(Path(p, "libseccomp.so.2").exists() for p in
               ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib64")):
        pytest.skip("libseccomp is not installed")
    path = directory / "seccomp.json"
    path.write_text(json.dumps(spec))
    return [sys.executable, str(SECCOMP_EXEC), str(path)]


def test_control_run_without_sandbox(short_dir: Path, socket_group: str, pki: Pki) -> None:
    """The same workload with no sandbox: what the other tests compare against."""
    result = run_workload([], short_dir, socket_group, pki)
    assert "process_cpu_seconds_total" in result["metrics"]


def setpriv_prefix(group: str, *drop: str) -> list[str]:
    """User=root, Group=`group` (the unit's Group=kvmd: the socket is created with that
    group), plus any further setpriv options."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is needed to run as the unit's Group=")
    assert unit_values("Group")[-1:] == ["kvmd"], "the unit's Group= changed"
    return [setpriv, "--reuid=0", f"--regid={grp.getgrnam(group).gr_gid}", "--clear-groups",
            *drop]


def test_daemon_lives_with_the_units_system_call_filter(short_dir: Path, socket_group: str,
                                                        pki: Pki) -> None:
    allowed, code = unit_syscall_allow_list()
    prefix = setpriv_prefix(socket_group) + seccomp_prefix(
        short_dir, {"allow": allowed, "errno": code})
    run_workload(prefix, short_dir, socket_group, pki)


def test_daemon_lives_with_memory_deny_write_execute(short_dir: Path, socket_group: str,
                                                     pki: Pki) -> None:
    assert unit_values("MemoryDenyWriteExecute")[-1:] == ["yes"], \
        "the unit no longer sets MemoryDenyWriteExecute=yes"
    run_workload(seccomp_prefix(short_dir, {"mdwe": True}), short_dir, socket_group, pki)


def test_daemon_lives_with_the_restricted_address_families(short_dir: Path,
                                                           socket_group: str,
                                                           pki: Pki) -> None:
    families = " ".join(unit_values("RestrictAddressFamilies")).split()
    assert families and not families[0].startswith("~")
    run_workload(seccomp_prefix(short_dir, {"families": [FAMILIES[f] for f in families]}),
                 short_dir, socket_group, pki)


def test_daemon_lives_without_capabilities(short_dir: Path, socket_group: str,
                                           pki: Pki) -> None:
    """User=root, Group=<the socket group>, CapabilityBoundingSet= (empty),
    NoNewPrivileges=yes."""
    assert unit_values("CapabilityBoundingSet")[-1:] == [""]
    assert unit_values("User")[-1:] == ["root"]
    assert unit_values("NoNewPrivileges")[-1:] == ["yes"]
    prefix = setpriv_prefix(socket_group, "--bounding-set=-all", "--inh-caps=-all",
                            "--no-new-privs")
    run_workload(prefix, short_dir, socket_group, pki)


def private_proc_prefix(unshare: str) -> list[str]:
    """A private mount namespace whose /proc is mounted as ProcSubset=pid and
    ProtectProc=invisible make it."""
    return [unshare, "--mount", "--propagation", "private", "sh", "-c",
            'mount -t proc -o subset=pid,hidepid=invisible proc /proc && exec "$@"', "sh"]


def test_process_metrics_survive_proc_subset_pid(short_dir: Path, socket_group: str,
                                                 pki: Pki) -> None:
    """ProcSubset=pid hides /proc/stat and friends. The daemon must still serve, and its
    process_* metrics (CPU, memory, fds: the dashboard's process panels) must not vanish."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is needed for a private /proc")
    assert unit_values("ProcSubset")[-1:] == ["pid"], "the unit no longer sets ProcSubset=pid"
    probe = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t proc -o subset=pid,hidepid=invisible proc /proc && "
                            "test ! -e /proc/stat"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a subset=pid /proc here: {probe.stderr!r}")
    prefix = private_proc_prefix(unshare)
    result = run_workload(prefix, short_dir, socket_group, pki)
    names = {line.split("{")[0].split(" ")[0] for line in result["metrics"].splitlines()
             if line and not line.startswith("#")}
    missing = sorted({"process_cpu_seconds_total", "process_resident_memory_bytes",
                      "process_open_fds", "process_start_time_seconds"} - names)
    assert not missing, f"under ProcSubset=pid /metrics lacks {missing}"


def test_daemon_lives_in_the_whole_sandbox(short_dir: Path, socket_group: str,
                                           pki: Pki) -> None:
    """Every part at once, nested as systemd applies them: private /proc, then Group= with
    no capabilities and no_new_privs, then the seccomp filters."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is needed for a private /proc")
    allowed, code = unit_syscall_allow_list()
    families = " ".join(unit_values("RestrictAddressFamilies")).split()
    prefix = [*private_proc_prefix(unshare),
              *setpriv_prefix(socket_group, "--bounding-set=-all", "--inh-caps=-all",
                              "--no-new-privs"),
              *seccomp_prefix(short_dir, {"allow": allowed, "errno": code, "mdwe": True,
                                          "families": [FAMILIES[f] for f in families]})]
    result = run_workload(prefix, short_dir, socket_group, pki)
    assert "process_cpu_seconds_total" in result["metrics"]
