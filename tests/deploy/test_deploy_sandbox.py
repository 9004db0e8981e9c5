"""Can the daemon live with the sandbox its unit puts it in? systemd is not running here,
so each test rebuilds part of kvmd.service's sandbox from the unit file itself
(unit_sandbox.py) and runs the kvmd console script inside it through a real workload
(listen with the socket group, TLS, metrics, create a VM, run a guest that writes to the
console, stop, delete, SIGHUP, SIGTERM -> 0).

Every sandboxed run is the unit's User=kvmd, Group=kvmd, SupplementaryGroups=kvm (a
temporary user and groups in those roles) in a private /dev (PrivateDevices=yes) with
/dev/kvm bound in: on this host /dev/kvm is 0600 root:root, and only the unit's tmpfiles.d
line (applied by its ExecStartPre=) lets the kvm group open it. On top of that, one test per
part: SystemCallFilter=, MemoryDenyWriteExecute=, RestrictAddressFamilies=, no
capabilities, ProcSubset=pid; and one with all of them, plus the private /dev/shm, IPC
namespace, InaccessiblePaths= and a read-only /.

The issue asks that every hardening directive the daemon cannot live with be left out (with
a comment); a failure here names a directive the daemon does not survive.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_support import CertFiles, Pki
from unit_sandbox import (
    FAMILIES,
    Identity,
    UnitPython,
    identity_prefix,
    namespace_prefix,
    no_privileges,
    prepare_runtime,
    run_workload,
    seccomp_prefix,
    start_kvmd,
    unit_syscall_allow_list,
    unit_values,
    unit_words,
    whole_seccomp_spec,
)

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"),
                                reason="/dev/kvm is absent: the daemon runs on real KVM")


@pytest.fixture
def identity() -> Iterator[Identity]:
    """A temporary user in the role of the unit's User=kvmd (primary group in the role of
    kvmd, the socket's group; supplementary group in the role of kvm)."""
    ident = Identity.create()
    try:
        yield ident
    finally:
        ident.remove()


@pytest.fixture(scope="module")
def unit_python() -> Iterator[UnitPython]:
    with tempfile.TemporaryDirectory(prefix="kvmd-unit-python-") as name:
        yield UnitPython.create(Path(name))


@pytest.fixture
def runtime(short_dir: Path, identity: Identity, pki: Pki) -> tuple[Path, CertFiles]:
    return prepare_runtime(short_dir, identity, pki.server)


def sandboxed(short_dir: Path, identity: Identity, runtime: tuple[Path, CertFiles],
              prefix: list[str], python: UnitPython) -> dict[str, str]:
    return run_workload(prefix, runtime[0], short_dir / "kvmd.log", identity.group, runtime[1],
                        python.kvmd)


def base(short_dir: Path, identity: Identity, runtime: tuple[Path, CertFiles],
         **namespace: bool) -> list[str]:
    """The part every sandboxed run has: the private /dev and the unit's identity."""
    return namespace_prefix(short_dir, identity, runtime[0], **namespace)


def test_control_run_without_sandbox(short_dir: Path, identity: Identity, pki: Pki) -> None:
    """The same workload as root with no sandbox: what the other tests compare against."""
    run = short_dir / "run"
    run.mkdir()
    result = run_workload([], run, short_dir / "kvmd.log", identity.group, pki.server)
    assert "process_cpu_seconds_total" in result["metrics"]


def test_daemon_lives_as_the_units_user_in_a_private_dev(
        short_dir: Path, identity: Identity, runtime: tuple[Path, CertFiles],
        unit_python: UnitPython) -> None:
    """User=kvmd (not root), Group=kvmd, SupplementaryGroups=kvm, PrivateDevices=yes with
    /dev/kvm bound in: the socket is created in the runtime directory the user owns, with
    the socket group, and /dev/kvm opens through the kvm group."""
    assert unit_values("User")[-1:] == ["kvmd"]
    prefix = base(short_dir, identity, runtime) + identity_prefix(identity)
    sandboxed(short_dir, identity, runtime, prefix, unit_python)


def test_a_0600_root_dev_kvm_needs_the_units_tmpfiles_line(
        short_dir: Path, identity: Identity, runtime: tuple[Path, CertFiles],
        unit_python: UnitPython) -> None:
    """Without the tmpfiles.d line the unit applies before starting, a host's 0600 root:root
    /dev/kvm refuses the kvmd user (the daemon exits 2 saying so); the workload test above
    shows the same daemon serving once the line is applied."""
    exec_start_pre = unit_values("ExecStartPre")
    assert any(line.startswith("+") and "systemd-tmpfiles" in line and
               "--prefix=/dev/kvm" in line and "/usr/lib/tmpfiles.d/kvmd.conf" in line
               for line in exec_start_pre), exec_start_pre
    prefix = base(short_dir, identity, runtime, tmpfiles=False) + identity_prefix(identity)
    proc = start_kvmd(prefix, runtime[0], short_dir / "kvmd.log", identity.group, runtime[1],
                      unit_python.kvmd)
    try:
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (short_dir / "kvmd.log").read_text()
    assert code == 2 and "/dev/kvm" in log, (code, log)


def test_the_units_user_cannot_read_host_secrets_or_signal_root(
        short_dir: Path, identity: Identity, runtime: tuple[Path, CertFiles],
        unit_python: UnitPython) -> None:
    """The issue: as uid 0 (even with no capabilities) the daemon could read /etc/shadow and
    signal other root processes. As the unit's user it can do neither."""
    root_process = subprocess.Popen(["sleep", "60"])
    probe = (
        "import os, sys\n"
        "out = []\n"
        "try:\n"
        "    open('/etc/shadow', 'rb').read(1); out.append('read /etc/shadow')\n"
        "except OSError:\n"
        "    pass\n"
        "try:\n"
        "    os.kill(int(sys.argv[1]), 0); out.append('may signal a root process')\n"
        "except PermissionError:\n"
        "    pass\n"
        "print(os.getuid(), sorted(os.getgroups()), out)\n"
        "sys.exit(1 if out else 0)\n")
    try:
        prefix = base(short_dir, identity, runtime) + identity_prefix(identity, *no_privileges())
        result = subprocess.run([*prefix, unit_python.python, "-c", probe,
                                 str(root_process.pid)],
                                capture_output=True, text=True, timeout=60, check=False)
    finally:
        root_process.kill()
        root_process.wait()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"{identity.uid} "), result.stdout


def test_daemon_lives_with_the_units_system_call_filter(
        short_dir: Path, identity: Identity, runtime: tuple[Path, CertFiles],
        unit_python: UnitPython) -> None:
    allowed, code = unit_syscall_allow_list()
    prefix = (base(short_dir, identity, runtime) + identity_prefix(identity) +
              seccomp_prefix(unit_python.python, short_dir, {"allow": allowed, "errno": code}))
    log = sandboxed(short_dir, identity, runtime, prefix, unit_python)["log"]
    # The filter lets the daemon give its threads their scheduler slices (api_slice_us;
    # sched_setattr: every vCPU thread sets its own), its vCPU threads their priority
    # (setpriority, sched_setscheduler) and every thread its CPUs (vcpu_cpus and api_cpus,
    # which the workload sets: sched_setaffinity).
    assert "cannot set" not in log, log


def test_daemon_lives_with_memory_deny_write_execute(
        short_dir: Path, identity: Identity, runtime: tuple[Path, CertFiles],
        unit_python: UnitPython) -> None:
    assert unit_values("MemoryDenyWriteExecute")[-1:] == ["yes"], \
        "the unit no longer sets MemoryDenyWriteExecute=yes"
    prefix = (base(short_dir, identity, runtime) + identity_prefix(identity) +
              seccomp_prefix(unit_python.python, short_dir, {"mdwe": True}))
    sandboxed(short_dir, identity, runtime, prefix, unit_python)


def test_daemon_lives_with_the_restricted_address_families(
        short_dir: Path, identity: Identity, runtime: tuple[Path, CertFiles],
        unit_python: UnitPython) -> None:
    families = unit_words("RestrictAddressFamilies")
    assert families and not families[0].startswith("~")
    prefix = (base(short_dir, identity, runtime) + identity_prefix(identity) +
              seccomp_prefix(unit_python.python, short_dir,
                             {"families": [FAMILIES[f] for f in families]}))
    sandboxed(short_dir, identity, runtime, prefix, unit_python)


def test_daemon_lives_without_capabilities(
        short_dir: Path, identity: Identity, runtime: tuple[Path, CertFiles],
        unit_python: UnitPython) -> None:
    """CapabilityBoundingSet= (empty), NoNewPrivileges=yes, as the unit's user."""
    prefix = base(short_dir, identity, runtime) + identity_prefix(identity, *no_privileges())
    sandboxed(short_dir, identity, runtime, prefix, unit_python)


def test_process_metrics_survive_proc_subset_pid(
        short_dir: Path, identity: Identity, runtime: tuple[Path, CertFiles],
        unit_python: UnitPython) -> None:
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
    prefix = base(short_dir, identity, runtime, proc_subset=True) + identity_prefix(identity)
    result = sandboxed(short_dir, identity, runtime, prefix, unit_python)
    names = {line.split("{")[0].split(" ")[0] for line in result["metrics"].splitlines()
             if line and not line.startswith("#")}
    missing = sorted({"process_cpu_seconds_total", "process_resident_memory_bytes",
                      "process_open_fds", "process_start_time_seconds"} - names)
    assert not missing, f"under ProcSubset=pid /metrics lacks {missing}"


def test_daemon_lives_in_the_whole_sandbox(
        short_dir: Path, identity: Identity, runtime: tuple[Path, CertFiles],
        unit_python: UnitPython) -> None:
    """Every part at once, nested as systemd applies them: the mount and IPC namespaces
    (private /dev with /dev/kvm, private /dev/shm, subset /proc, InaccessiblePaths=, a
    read-only / with the runtime directory writable), then the unit's user with no
    capabilities and no_new_privs, then the seccomp filters."""
    assert unit_values("PrivateIPC")[-1:] == ["yes"]
    assert unit_values("ProtectSystem")[-1:] == ["strict"]
    prefix = [*base(short_dir, identity, runtime, dev_shm=True, ipc=True, inaccessible=True,
                    proc_subset=True, read_only_root=True),
              *identity_prefix(identity, *no_privileges()),
              *seccomp_prefix(unit_python.python, short_dir, whole_seccomp_spec())]
    result = sandboxed(short_dir, identity, runtime, prefix, unit_python)
    assert "process_cpu_seconds_total" in result["metrics"]
