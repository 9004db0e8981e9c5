"""The shipped systemd files: the unit's directives (the issue's list), `systemd-analyze
verify` and `systemd-analyze security --offline=yes`, the sysusers/tmpfiles entries, and the
example configuration (loadable by the daemon, its policy example included)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_support import kvmd_script

from kvmd.config import ConfigError, build_parser, load_config
from kvmd.server import Daemon

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "kvmd.service"
SYSUSERS = REPO / "deploy" / "systemd" / "kvmd.sysusers"
TMPFILES = REPO / "deploy" / "systemd" / "kvmd.tmpfiles"
CONFIG = REPO / "deploy" / "config" / "kvmd.toml"
INSTALLED_KVMD = "/opt/kvmd/venv/bin/kvmd"
# The target for `systemd-analyze security --offline=yes`.
MAX_EXPOSURE = 1.5
# Directives newer than the systemd here that the unit sets on purpose (it explains each):
# {key: first systemd version that knows it}. An older `systemd-analyze verify` warns
# "Unknown key" about them and nothing else.
NEWER_DIRECTIVES = {"FileDescriptorStorePreserve": 254}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}} (continuation lines joined, comments dropped)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    logical, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    for line in logical:
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


def comments(path: Path) -> str:
    return "\n".join(line for line in path.read_text().splitlines()
                     if line.lstrip().startswith("#"))


def test_unit_is_notify_with_watchdog_and_reload(service: dict[str, list[str]]) -> None:
    assert service["Type"] == ["notify"]
    assert service.get("NotifyAccess", ["main"])[-1] in ("main", "exec", "all")
    assert service["WatchdogSec"], "WATCHDOG_USEC is only set with WatchdogSec="
    assert service["Restart"] == ["on-failure"]
    exec_start = service["ExecStart"][-1].split()
    assert exec_start[0] == INSTALLED_KVMD
    assert exec_start[exec_start.index("--config") + 1] == "/etc/kvmd/kvmd.toml"
    assert any("-HUP" in v or "SIGHUP" in v for v in service.get("ExecReload", [])), \
        "systemctl reload should send SIGHUP (certificate reload)"


def test_unit_runtime_directory_holds_the_configured_socket(
        service: dict[str, list[str]]) -> None:
    assert service["RuntimeDirectory"] == ["kvmd"]
    cfg = load_config(build_parser().parse_args(["--config", str(CONFIG)]))
    sockets = [a for a in cfg.listen if a.startswith("unix:")]
    assert sockets and all(a.startswith("unix:///run/kvmd/") for a in sockets), cfg.listen
    # The group that may use the socket is the one sysusers creates.
    assert cfg.socket_group == "kvmd"
    assert service["Group"] == ["kvmd"]


@pytest.mark.parametrize(("key", "expected"), [
    ("DevicePolicy", "closed"),
    ("DeviceAllow", "/dev/kvm rw"),
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
])
def test_unit_hardening_directive(service: dict[str, list[str]], key: str,
                                  expected: str) -> None:
    assert service.get(key, [])[-1:] == [expected], (key, service.get(key))


def test_unit_hardening_lists_and_limits(service: dict[str, list[str]]) -> None:
    families = " ".join(service["RestrictAddressFamilies"]).split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    # Minimal capabilities: the last assignment leaves the bounding set empty.
    assert service["CapabilityBoundingSet"][-1] == ""
    assert service["SystemCallFilter"], "no system call filter"
    assert any("@system-service" in v for v in service["SystemCallFilter"])
    for limit in ("LimitMEMLOCK", "LimitNOFILE", "TasksMax"):
        assert service.get(limit), f"{limit}= is not set"
    assert int(service["LimitNOFILE"][-1].split(":")[-1]) >= 4096


@pytest.mark.parametrize("directive", ["PrivateUsers", "PrivateNetwork", "IPAddressDeny"])
def test_left_out_directives_say_why(service: dict[str, list[str]], directive: str) -> None:
    """Standard hardening the daemon cannot live with is absent, with a comment."""
    assert directive not in service
    assert f"{directive}=" in comments(UNIT), f"no comment says why {directive}= is left out"


def test_sysusers_and_tmpfiles_entries() -> None:
    users = [line.split() for line in SYSUSERS.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert ["g", "kvmd"] in [u[:2] for u in users]
    entries = [line.split() for line in TMPFILES.read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    run = [e for e in entries if e[1] == "/run/kvmd"]
    assert run and run[0][0] == "d", entries
    mode, owner, group = run[0][2:5]
    assert group == "kvmd" and owner == "kvmd", run[0]  # the unit's User= and Group=
    assert int(mode, 8) & 0o007 == 0, f"/run/kvmd is open to others: {mode}"


def test_example_config_and_its_policy_example_load(tmp_path: Path) -> None:
    """The shipped config is accepted by the daemon's own loader, and so is its commented
    [authorization] example once uncommented."""
    cfg = load_config(build_parser().parse_args(["--config", str(CONFIG)]))
    assert cfg.metrics_listen.startswith("127.0.0.1:")
    text = CONFIG.read_text()
    start = text.index("# [authorization]")
    example = "\n".join(line.removeprefix("# ") for line in text[start:].splitlines()
                        if line.startswith("# "))
    policy_file = tmp_path / "kvmd.toml"
    policy_file.write_text(text[:start] + example + "\n")
    cfg = load_config(build_parser().parse_args(["--config", str(policy_file)]))
    roles = {i["name"]: i["role"] for i in cfg.authorization["identities"]}
    assert roles["local"] == "admin"
    try:
        Daemon(cfg)  # parses the policy; nothing is started
    except ConfigError as exc:
        pytest.fail(f"the example policy is rejected: {exc}")


# -- systemd-analyze -----------------------------------------------------------------------

def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed")
    return found


def runnable_unit(directory: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's kvmd, so the binary exists."""
    text = UNIT.read_text().replace(f"ExecStart={INSTALLED_KVMD}", f"ExecStart={kvmd_script()}")
    assert kvmd_script() in text
    unit = directory / "kvmd.service"
    unit.write_text(text)
    return unit


def systemd_version(tool: str) -> int:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    match = re.match(r"systemd (\d+)", out)
    assert match, out
    return int(match.group(1))


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify passes; its only complaints are "Unknown key" for directives newer than this
    systemd (each documented in the unit)."""
    tool = systemd_analyze()
    version = systemd_version(tool)
    unit = runnable_unit(tmp_path)
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "kvmd.service" in line]
    expected = {key for key, since in NEWER_DIRECTIVES.items() if version < since}
    unknown = {m.group(1) for line in complaints
               if (m := re.search(r"Unknown key '(\w+)' in section \[Service\]", line))}
    assert unknown <= expected, complaints
    assert all("Unknown key" in line for line in complaints), complaints
    text = UNIT.read_text()
    for key in expected:
        assert f"{key}=" in text and str(NEWER_DIRECTIVES[key]) in comments(UNIT), key


def test_systemd_analyze_security_exposure(tmp_path: Path,
                                           record_property: pytest.RecordProperty) -> None:
    tool = systemd_analyze()
    unit = runnable_unit(tmp_path)
    result = subprocess.run([tool, "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for kvmd\.service:\s*([0-9.]+)\s+(\S+)",
                      result.stdout)
    assert match, result.stdout + result.stderr
    exposure, rating = float(match.group(1)), match.group(2)
    record_property("systemd_exposure", exposure)
    print(f"\nsystemd-analyze security: kvmd.service exposure {exposure} {rating}")
    assert exposure <= MAX_EXPOSURE, (exposure, rating)
    assert rating in ("PERFECT", "SAFE", "OK", "MEDIUM"), rating
