"""kvmd.service's least privilege and resource policy, read from the shipped files: the
dedicated user (sysusers run in a test root), /dev/kvm for the kvm group (tmpfiles run in
a test root), limits sized to the daemon's configured maxima, the OOM policy, the fd store,
the ports it may bind, and an explanation in the unit for every exposure
`systemd-analyze security` still counts. (test_deploy_sandbox.py runs the daemon under the
same unit.)"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from test_deploy_unit import comments, runnable_unit
from unit_sandbox import SYSUSERS, TMPFILES, UNIT, unit_values, unit_words

from kvmd.config import Config, build_parser, load_config
from kvmd.core.fds import derived_max_fds, fds_per_vm
from kvmd.core.limits import Limits

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "config" / "kvmd.toml"
# What the daemon's user and runtime need; no InaccessiblePaths= may cover them.
NEEDED_PATHS = ("/opt/kvmd", "/etc/kvmd", "/run/kvmd", "/var/lib/kvmd", "/dev/kvm", "/usr",
                "/etc/passwd", "/etc/group", "/etc/ssl", "/run/systemd")


def example_config() -> Config:
    return load_config(build_parser().parse_args(["--config", str(CONFIG)]))


def last(key: str) -> str:
    values = unit_values(key)
    assert values, f"the unit does not set {key}="
    return values[-1]


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


# -- identity --------------------------------------------------------------------------------

def test_unit_runs_as_a_dedicated_user_in_the_kvm_group() -> None:
    assert last("User") == "kvmd" and last("Group") == "kvmd"
    assert unit_words("SupplementaryGroups") == ["kvm"]
    assert "DynamicUser" not in UNIT.read_text()  # a static user owns /var/lib/kvmd
    assert example_config().socket_group == last("Group")  # the socket needs no chown


def sysusers_root(tmp_path: Path) -> Path:
    """A test root whose /etc/passwd and /etc/group are this host's, after the shipped
    sysusers.d file ran in it (so the ids it picks are free here)."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group"):
        shutil.copyfile(f"/etc/{name}", root / "etc" / name)
    result = subprocess.run([tool("systemd-sysusers"), f"--root={root}", str(SYSUSERS)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return root


def entries(path: Path) -> dict[str, list[str]]:
    return {line.split(":")[0]: line.split(":") for line in path.read_text().splitlines()
            if line}


def test_sysusers_creates_the_user_its_group_and_the_kvm_group(tmp_path: Path) -> None:
    root = sysusers_root(tmp_path)
    users, groups = entries(root / "etc" / "passwd"), entries(root / "etc" / "group")
    assert "kvmd" in users and "kvmd" in groups and "kvm" in groups
    _name, _pw, uid, gid, _gecos, home, shell = users["kvmd"]
    assert 0 < int(uid) < 1000, "not a system user"
    assert gid == groups["kvmd"][2], "the primary group is not kvmd"
    assert "kvmd" in groups["kvm"][3].split(","), "kvmd is not in the kvm group"
    assert shell.endswith("nologin") and home == "/var/lib/kvmd"


def test_sysusers_keeps_an_existing_kvmd_group(tmp_path: Path) -> None:
    """An upgrade from the root-run kvmd: its sysusers made only the group kvmd."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    shutil.copyfile("/etc/passwd", root / "etc" / "passwd")
    group = Path("/etc/group").read_text()
    free = max(int(line.split(":")[2]) for line in group.splitlines() if line
               if int(line.split(":")[2]) < 1000) + 1
    (root / "etc" / "group").write_text(group + f"kvmd:x:{free}:\n")
    subprocess.run([tool("systemd-sysusers"), f"--root={root}", str(SYSUSERS)],
                   capture_output=True, check=True, timeout=60)
    users = entries(root / "etc" / "passwd")
    assert users["kvmd"][3] == str(free)


def test_tmpfiles_gives_dev_kvm_to_the_kvm_group_and_the_directories_to_kvmd(
        tmp_path: Path) -> None:
    """In a test root (after sysusers): a 0600 root:root /dev/kvm node becomes 0660
    root:kvm; /run/kvmd, /var/lib/kvmd belong to kvmd; /etc/kvmd is root:kvmd 0750."""
    if os.geteuid() != 0:
        pytest.skip("mknod and chown need root")
    root = sysusers_root(tmp_path)
    groups = entries(root / "etc" / "group")
    users = entries(root / "etc" / "passwd")
    (root / "dev").mkdir()
    rdev = os.stat("/dev/kvm").st_rdev if os.path.exists("/dev/kvm") else os.makedev(10, 232)
    os.mknod(root / "dev" / "kvm", 0o600 | stat.S_IFCHR, rdev)
    result = subprocess.run([tool("systemd-tmpfiles"), f"--root={root}", "--create",
                             str(TMPFILES)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    kvmd_uid, kvmd_gid, kvm_gid = int(users["kvmd"][2]), int(groups["kvmd"][2]), \
        int(groups["kvm"][2])

    def owner(path: str) -> tuple[int, int, int]:
        st = os.lstat(root / path.lstrip("/"))
        return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid

    assert owner("/dev/kvm") == (0o660, 0, kvm_gid)
    assert stat.S_ISCHR(os.lstat(root / "dev" / "kvm").st_mode)
    assert owner("/run/kvmd") == (0o750, kvmd_uid, kvmd_gid)
    assert owner("/var/lib/kvmd") == (0o700, kvmd_uid, kvmd_gid)
    assert owner("/etc/kvmd") == (0o750, 0, kvmd_gid)


# -- devices and file system -----------------------------------------------------------------

def test_private_dev_with_only_dev_kvm_bound_in() -> None:
    assert last("PrivateDevices") == "yes"
    assert "/dev/kvm" in unit_words("BindPaths")
    assert last("DevicePolicy") == "closed" and "/dev/kvm rw" in unit_values("DeviceAllow")
    pre = unit_values("ExecStartPre")
    assert pre == ["+/usr/bin/systemd-tmpfiles --create --prefix=/dev/kvm "
                   "/usr/lib/tmpfiles.d/kvmd.conf"], pre
    z = [line.split() for line in TMPFILES.read_text().splitlines()
         if line.startswith("z ")]
    assert z == [["z", "/dev/kvm", "0660", "root", "kvm", "-"]]


def test_private_dev_shm_and_ipc() -> None:
    shm = [w for w in unit_words("TemporaryFileSystem") if w.startswith("/dev/shm")]
    assert shm and "noexec" in shm[0] and "size=" in shm[0], shm
    assert last("PrivateIPC") == "yes"


def test_inaccessible_paths_hide_secrets_and_boot_but_nothing_the_daemon_needs() -> None:
    paths = [p.lstrip("-") for p in unit_words("InaccessiblePaths")]
    for secret in ("/etc/shadow", "/etc/gshadow", "/etc/ssh", "/boot"):
        assert secret in paths, secret
    assert all(p.startswith("/") and p != "/" for p in paths)
    for needed in NEEDED_PATHS:
        for p in paths:
            assert not (needed == p or needed.startswith(p.rstrip("/") + "/")), (p, needed)
    assert all(w.startswith("-") for w in unit_words("InaccessiblePaths")), \
        "a path missing on some host must not stop the unit"


def test_state_directory_and_private_modes() -> None:
    assert last("StateDirectory") == "kvmd" and last("StateDirectoryMode") == "0700"
    assert last("RuntimeDirectory") == "kvmd"
    assert int(last("RuntimeDirectoryMode"), 8) & 0o007 == 0
    assert last("ConfigurationDirectory") == "kvmd"
    assert int(last("UMask"), 8) & 0o077 == 0o077


# -- limits ----------------------------------------------------------------------------------

def maxima() -> Limits:
    return example_config().limits()


def needed_threads(lim: Limits) -> int:
    """A thread per vCPU, the gRPC workers, a reader per remote-exit stream (each holds an
    RPC), and a few of the daemon's own."""
    return lim.max_vms * lim.max_vcpus_per_vm + 2 * lim.max_concurrent_rpcs + 32


def needed_fds(lim: Limits) -> int:
    """Every VM at the per-VM limits inside the descriptor budget the daemon derives from
    LimitNOFILE (kvmd.core.fds: what is left after its own reserve)."""
    return lim.max_vms * fds_per_vm(lim)


def test_task_and_thread_limits_cover_the_configured_maxima() -> None:
    need = needed_threads(maxima())
    assert int(last("TasksMax")) >= need, (last("TasksMax"), need)
    # RLIMIT_NPROC counts the kvmd user's threads: it must not be lower than TasksMax=.
    assert int(last("LimitNPROC")) >= need


def test_descriptor_limit_covers_the_configured_maxima() -> None:
    need = needed_fds(maxima())
    nofile = int(last("LimitNOFILE").split(":")[-1])
    assert derived_max_fds(nofile) >= need, (last("LimitNOFILE"), need)


def test_fd_store_holds_a_memfd_per_memory_slot_of_every_vm() -> None:
    lim = maxima()
    assert int(last("FileDescriptorStoreMax")) >= lim.max_vms * lim.max_memory_slots_per_vm
    assert last("FileDescriptorStorePreserve") == "yes"
    notes = comments(UNIT)
    assert "254" in notes and "252" in notes, "say which systemd honours the preserve setting"


def test_memory_and_oom_policy_protect_the_daemon_and_leave_room_for_guests() -> None:
    memory_max = last("MemoryMax")
    match = re.fullmatch(r"(\d+)%", memory_max)
    assert match, f"MemoryMax={memory_max}: a share of the host, guests are most of it"
    assert 50 <= int(match.group(1)) < 100
    adjust = int(last("OOMScoreAdjust"))
    assert -1000 < adjust <= -500, "the OOM killer must prefer other processes, not never die"
    assert last("ManagedOOMPreference") == "avoid"
    notes = comments(UNIT).lower()
    for phrase in ("guest memory", "max_memory_total_bytes", "oom"):
        assert phrase in notes, f"the memory policy comment does not mention {phrase!r}"


# -- network ---------------------------------------------------------------------------------

def configured_tcp_ports() -> set[int]:
    """TCP ports in the example config: metrics_listen and every host:port listen address,
    the commented-out examples included."""
    ports = set()
    text = CONFIG.read_text()
    for match in re.finditer(r'^#?\s*(?:listen|metrics_listen)\s*=\s*(.+)$', text, re.M):
        ports |= {int(p) for p in re.findall(r'"[^"/]*:(\d+)"', match.group(1))}
    ports.add(int(example_config().metrics_listen.rpartition(":")[2]))
    return ports


def test_socket_bind_allows_exactly_the_configured_ports() -> None:
    allowed = {int(rule.rpartition(":")[2]) for rule in unit_values("SocketBindAllow")}
    assert all(rule.startswith("tcp:") for rule in unit_values("SocketBindAllow"))
    assert allowed == configured_tcp_ports(), (allowed, configured_tcp_ports())
    assert last("SocketBindDeny") == "any"


# -- systemd-analyze security ----------------------------------------------------------------

def test_every_remaining_exposure_is_explained_in_the_unit(tmp_path: Path) -> None:
    """Each setting `systemd-analyze security --offline=yes` still counts against the unit
    is named in a comment of the unit that says why."""
    unit = runnable_unit(tmp_path)
    result = subprocess.run([tool("systemd-analyze"), "security", "--offline=yes",
                             "--no-pager", str(unit)], capture_output=True, text=True,
                            timeout=60, check=False)
    flagged = {m.group(1) for m in re.finditer(r"^✗ (\w+)=", result.stdout, re.M)}
    assert flagged, result.stdout + result.stderr
    notes = comments(UNIT)
    unexplained = sorted(name for name in flagged if f"{name}=" not in notes)
    assert not unexplained, f"exposures without a comment in the unit: {unexplained}"
