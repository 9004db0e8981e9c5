"""deploy/install.sh into a staging root (DESTDIR): one install, one re-run (idempotent,
an edited config is kept), --uninstall (keeps the config), --uninstall --purge.

SLOW: the install creates a virtualenv and pip-installs the project (~20-60 s); it is done
once, and every check runs on that one staged tree."""

from __future__ import annotations

import filecmp
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import grpc
import pytest
from deploy_support import Stubs
from polling import wait_until

from kvmd_proto import vmm_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "deploy" / "install.sh"
INSTALL_TIMEOUT = 300


def run_install(stage: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["DESTDIR"] = str(stage)
    # The system's python3, not this test's venv: install.sh makes its own virtualenv.
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":")
                           if not p.startswith(str(REPO)))
    result = subprocess.run(["bash", str(INSTALL), *args], env=env, capture_output=True,
                            text=True, timeout=INSTALL_TIMEOUT, check=False)
    assert result.returncode == 0, f"install.sh {args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Everything under root outside the virtualenv: {relative path: (mode, content)}."""
    out: dict[str, tuple[int, bytes]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[:3] == ("opt", "kvmd", "venv"):
            continue
        st = path.lstat()
        out[str(rel)] = (st.st_mode, path.read_bytes() if path.is_file() else b"")
    return out


def serve_once(kvmd: Path, directory: Path) -> None:
    """Start the installed daemon on a private socket, check it serves, SIGTERM -> 0."""
    sock = directory / "kvmd.sock"
    proc = subprocess.Popen([str(kvmd), "--listen", f"unix://{sock}", "--metrics-listen",
                             "off"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: sock.exists() or proc.poll() is not None, 30,
                   "the installed kvmd to listen")
        assert proc.poll() is None, proc.communicate()[1]
        stubs = Stubs.of(grpc.insecure_channel(f"unix://{sock}"))
        try:
            wait_until(lambda: _serving(stubs), 10, "SERVING")
            info = stubs.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=10)
            assert info.api_version == 12
        finally:
            stubs.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _serving(stubs: Stubs) -> bool:
    try:
        return stubs.serving()
    except grpc.RpcError:
        return False


@pytest.mark.slow
def test_install_reinstall_uninstall_purge(tmp_path: Path, short_dir: Path) -> None:
    host_opt_before = os.path.exists("/opt/kvmd")
    stage = tmp_path / "stage"
    run_install(stage)

    venv = stage / "opt" / "kvmd" / "venv"
    kvmd = venv / "bin" / "kvmd"
    unit = stage / "etc" / "systemd" / "system" / "kvmd.service"
    config = stage / "etc" / "kvmd" / "kvmd.toml"
    sysusers = stage / "usr" / "lib" / "sysusers.d" / "kvmd.conf"
    tmpfiles = stage / "usr" / "lib" / "tmpfiles.d" / "kvmd.conf"

    assert os.access(kvmd, os.X_OK), "no kvmd console script in the installed venv"
    assert os.access(venv / "bin" / "kvmctl", os.X_OK)
    version = subprocess.run([str(kvmd), "--version"], capture_output=True, text=True,
                             timeout=60, check=False)
    assert version.returncode == 0 and version.stdout.startswith("kvmd "), version
    assert filecmp.cmp(unit, REPO / "deploy" / "systemd" / "kvmd.service", shallow=False)
    assert filecmp.cmp(sysusers, REPO / "deploy" / "systemd" / "kvmd.sysusers", shallow=False)
    assert filecmp.cmp(tmpfiles, REPO / "deploy" / "systemd" / "kvmd.tmpfiles", shallow=False)
    assert filecmp.cmp(config, REPO / "deploy" / "config" / "kvmd.toml", shallow=False)
    assert stat.S_IMODE(config.stat().st_mode) & 0o007 == 0, "the config is world-readable"
    if os.path.exists("/dev/kvm"):
        serve_once(kvmd, short_dir)

    # The installed unit verifies with its ExecStart pointed at the staged venv.
    analyze = shutil.which("systemd-analyze")
    if analyze:
        staged_unit = tmp_path / "kvmd.service"
        staged_unit.write_text(unit.read_text().replace("ExecStart=/opt/kvmd/venv/bin/kvmd",
                                                        f"ExecStart={kvmd}"))
        verify = subprocess.run([analyze, "verify", str(staged_unit)], capture_output=True,
                                text=True, timeout=60, check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr

    # Re-run: idempotent, and an edited config is kept.
    edited = config.read_text() + "\n# edited by the operator\nmax_vms = 8\n"
    config.write_text(edited)
    before = tree(stage)
    run_install(stage)
    assert config.read_text() == edited, "install.sh overwrote an edited config"
    assert tree(stage) == before, "a second install changed files outside the venv"
    assert subprocess.run([str(kvmd), "--version"], capture_output=True, timeout=60,
                          check=False).returncode == 0

    # Uninstall keeps the configuration ...
    run_install(stage, "--uninstall")
    for gone in (unit, sysusers, tmpfiles, stage / "opt" / "kvmd"):
        assert not gone.exists(), f"{gone} survived --uninstall"
    assert config.read_text() == edited, "--uninstall removed or changed the config"
    # ... and --purge removes it.
    run_install(stage, "--uninstall", "--purge")
    assert not (stage / "etc" / "kvmd").exists(), "--purge kept /etc/kvmd"
    assert os.path.exists("/opt/kvmd") == host_opt_before, "DESTDIR install touched /opt"
