"""kvmd.service's sandbox rebuilt without systemd, from the unit file itself.

systemd is not PID 1 on the test machines, so the tests rebuild what the unit asks for with
ordinary tools, in the order systemd applies it, and run the real kvmd console script
inside:

* a private mount (and IPC) namespace (`unshare`), set up by `namespace_prefix()`:
  PrivateDevices= (a fresh /dev with the API pseudo devices) with BindPaths=/dev/kvm,
  where /dev/kvm is a node of its own, 0600 root:root like on a host without udev, then
  given to the kvm group by the unit's own tmpfiles.d line (its ExecStartPre=);
  TemporaryFileSystem=/dev/shm; ProcSubset=pid and ProtectProc=invisible; the unit's
  InaccessiblePaths=; ProtectSystem=strict (a read-only / with the runtime directory
  writable). PrivateTmp= is not rebuilt: the tests' files live in /tmp.
* the unit's User=, Group= and SupplementaryGroups=, an empty capability bounding set and
  NoNewPrivileges= (`setpriv`, `identity_prefix()`), with a temporary user and groups in
  the roles of kvmd and kvm (`Identity`);
* SystemCallFilter=, MemoryDenyWriteExecute= and RestrictAddressFamilies= through seccomp
  (seccomp_exec.py, `seccomp_prefix()`).
"""

from __future__ import annotations

import errno
import grp
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from deploy_support import RPC_TIMEOUT, CertFiles, Stubs, kvmd_script
from polling import wait_until

from kvmd_proto import vmm_pb2 as pb

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
UNIT = REPO / "deploy" / "systemd" / "kvmd.service"
SYSUSERS = REPO / "deploy" / "systemd" / "kvmd.sysusers"
TMPFILES = REPO / "deploy" / "systemd" / "kvmd.tmpfiles"
SECCOMP_EXEC = HERE / "seccomp_exec.py"
FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10}


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


def unit_words(key: str) -> list[str]:
    """The space-separated items of every `key=` line."""
    return " ".join(unit_values(key)).split()


def require(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        pytest.skip(f"{tool} is needed to rebuild the unit's sandbox")
    return found


# -- an interpreter the unit's user may run ---------------------------------------------

@dataclass(frozen=True)
class UnitPython:
    """A virtualenv-like directory whose interpreter is the system's /usr/bin/python3 and
    whose site-packages are this checkout's virtualenv: what install.sh builds under
    /opt/kvmd, where the unit's user can run it. (This test venv's own interpreter may live
    under /root, which that user cannot reach; systemd runs ExecStart= with the user's
    credentials, so the test must too.)"""

    python: str
    kvmd: str

    @classmethod
    def create(cls, directory: Path) -> UnitPython:
        system = Path("/usr/bin/python3")
        if not system.exists():
            pytest.skip("/usr/bin/python3 is needed to run kvmd as an unprivileged user")
        version = subprocess.run([str(system), "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        if version != str(sys.version_info[:2]):
            pytest.skip(f"/usr/bin/python3 is {version}, this virtualenv "
                        f"{sys.version_info[:2]}: its compiled modules would not load")
        site = next(p for p in sys.path if p.startswith(sys.prefix) and
                    p.endswith("site-packages"))
        directory.chmod(0o755)
        (directory / "bin").mkdir()
        lib = directory / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" \
            / "site-packages"
        lib.mkdir(parents=True)
        (directory / "pyvenv.cfg").write_text("home = /usr/bin\n"
                                              "include-system-site-packages = false\n")
        python = directory / "bin" / "python"
        python.symlink_to(system)
        (lib / "kvmd-checkout.pth").write_text(f"import site; site.addsitedir({site!r})\n")
        kvmd = directory / "bin" / "kvmd"
        kvmd.write_text(f"#!{python}\nimport sys\nfrom kvmd.launch import main\n"
                        "sys.exit(main())\n")
        for path in directory.rglob("*"):
            if not path.is_symlink():
                path.chmod(0o755)
        return cls(str(python), str(kvmd))


# -- system calls ----------------------------------------------------------------------------

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
    groups = syscall_groups(require("systemd-analyze"))
    lines = unit_values("SystemCallFilter")
    assert lines and not lines[0].startswith("~"), "expected an allow-list filter"
    allowed = expand("@default", groups)  # systemd always adds @default to allow lists
    for line in lines:
        deny = line.startswith("~")
        names: set[str] = set()
        for item in line.lstrip("~").split():
            names |= expand(item, groups)
        allowed = allowed - names if deny else allowed | names
    if unit_values("PrivateDevices")[-1:] == ["yes"]:
        allowed -= expand("@raw-io", groups)  # PrivateDevices=yes implies ~@raw-io
    errnos = unit_values("SystemCallErrorNumber")
    code = getattr(errno, errnos[-1]) if errnos else errno.EPERM
    return sorted(allowed), code


def seccomp_prefix(python: str, directory: Path, spec: dict[str, object]) -> list[str]:
    """`python` seccomp_exec.py with `spec` (the interpreter must be one the user runs)."""
    if not any(Path(p, "libseccomp.so.2").exists() for p in
               ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib64")):
        pytest.skip("libseccomp is not installed")
    path = directory / "seccomp.json"
    path.write_text(json.dumps(spec))
    os.chmod(path, 0o644)
    return [python, str(SECCOMP_EXEC), str(path)]


def whole_seccomp_spec() -> dict[str, object]:
    allowed, code = unit_syscall_allow_list()
    families = unit_words("RestrictAddressFamilies")
    assert families and not families[0].startswith("~")
    return {"allow": allowed, "errno": code,
            "mdwe": unit_values("MemoryDenyWriteExecute")[-1:] == ["yes"],
            "families": [FAMILIES[f] for f in families]}


# -- identity --------------------------------------------------------------------------------

@dataclass
class Identity:
    """A temporary system user and two groups in the roles of the unit's kvmd user, its
    primary group kvmd (the socket's group) and the kvm group (/dev/kvm's)."""

    user: str
    group: str
    kvm_group: str
    uid: int = -1
    gid: int = -1
    kvm_gid: int = -1

    @classmethod
    def create(cls) -> Identity:
        for tool in ("groupadd", "groupdel", "useradd", "userdel"):
            require(tool)
        tag = secrets.token_hex(4)
        ident = cls(f"kvmdu{tag}", f"kvmdg{tag}", f"kvmk{tag}")
        import pwd

        for name in (ident.group, ident.kvm_group):
            subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
        subprocess.run(["useradd", "--system", "--gid", ident.group, "--groups",
                        ident.kvm_group, "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", ident.user], check=True,
                       capture_output=True)
        ident.uid = pwd.getpwnam(ident.user).pw_uid
        ident.gid = grp.getgrnam(ident.group).gr_gid
        ident.kvm_gid = grp.getgrnam(ident.kvm_group).gr_gid
        return ident

    def remove(self) -> None:
        subprocess.run(["userdel", self.user], check=False, capture_output=True)
        for name in (self.group, self.kvm_group):
            subprocess.run(["groupdel", name], check=False, capture_output=True)


def identity_prefix(ident: Identity, *extra: str) -> list[str]:
    """setpriv as the unit's User=, Group=, SupplementaryGroups= (kvmd -> the temporary user,
    kvmd -> its group, kvm -> the kvm stand-in; root stays root), then `extra` options."""
    setpriv = require("setpriv")
    user = (unit_values("User") or ["root"])[-1]
    group = (unit_values("Group") or [user])[-1]
    uid = {"root": 0, "kvmd": ident.uid}[user]
    gid = {"root": 0, "kvmd": ident.gid}[group]
    supplementary = [{"kvm": ident.kvm_gid, "kvmd": ident.gid}[g]
                     for g in unit_words("SupplementaryGroups")]
    groups = (f"--groups={','.join(map(str, supplementary))}" if supplementary
              else "--clear-groups")
    return [setpriv, f"--reuid={uid}", f"--regid={gid}", groups, *extra]


def no_privileges() -> tuple[str, ...]:
    """CapabilityBoundingSet= (empty), no inheritable capabilities, NoNewPrivileges=yes."""
    assert unit_values("CapabilityBoundingSet")[-1:] == [""]
    assert unit_values("NoNewPrivileges")[-1:] == ["yes"]
    return ("--bounding-set=-all", "--inh-caps=-all", "--no-new-privs")


# -- the mount namespace ---------------------------------------------------------------------

PSEUDO_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
                  "urandom": (1, 9), "tty": (5, 0)}


def inaccessible_paths() -> list[str]:
    return [p.lstrip("-") for p in unit_words("InaccessiblePaths")]


def temporary_file_system(path: str) -> str | None:
    """The mount options the unit gives TemporaryFileSystem=`path`, or None."""
    for item in unit_words("TemporaryFileSystem"):
        where, _, options = item.partition(":")
        if where == path:
            return options or "mode=0755"
    return None


def namespace_prefix(directory: Path, ident: Identity, runtime: Path, *,
                     tmpfiles: bool = True, dev_shm: bool = False, ipc: bool = False,
                     inaccessible: bool = False, proc_subset: bool = False,
                     read_only_root: bool = False) -> list[str]:
    """`unshare` into private mount (and with `ipc`, IPC) namespaces and build the unit's
    file system view there (see the module); the command after it runs inside."""
    unshare = require("unshare")
    assert unit_values("PrivateDevices")[-1:] == ["yes"], "the unit has no PrivateDevices=yes"
    assert "/dev/kvm" in unit_words("BindPaths"), "the unit does not bind /dev/kvm"
    rdev = os.stat("/dev/kvm").st_rdev
    ns = directory / "ns"
    ns.mkdir(exist_ok=True)
    etc = directory / "tmpfiles-etc"
    etc.mkdir(exist_ok=True)
    # The test root systemd-tmpfiles resolves names in: "kvm" is the kvm stand-in group.
    (etc / "passwd").write_text(f"root:x:0:0::/root:/bin/sh\n"
                                f"kvmd:x:{ident.uid}:{ident.gid}::/:/usr/sbin/nologin\n")
    (etc / "group").write_text(f"root:x:0:\nkvm:x:{ident.kvm_gid}:kvmd\nkvmd:x:{ident.gid}:\n")
    q = shlex.quote
    lines = [
        "set -eu",
        f"NS={q(str(ns))}",
        'mount -t tmpfs -o mode=0755 kvmd-sandbox "$NS"',
        # The host's /dev/kvm as a node of its own, 0600 root:root (no udev rule).
        'mkdir -p "$NS/root/etc" "$NS/root/dev"',
        f'cp {q(str(etc / "passwd"))} {q(str(etc / "group"))} "$NS/root/etc/"',
        f'mknod -m 0600 "$NS/root/dev/kvm" c {os.major(rdev)} {os.minor(rdev)}',
    ]
    if tmpfiles:  # the unit's ExecStartPre=+systemd-tmpfiles --prefix=/dev/kvm
        lines.append(f'{q(require("systemd-tmpfiles"))} --root="$NS/root" --create '
                     f'--prefix=/dev/kvm {q(str(TMPFILES))}')
    lines += [  # PrivateDevices=yes: API pseudo devices only, then BindPaths=/dev/kvm
        'D="$NS/dev"',
        'mkdir "$D"',
        'mount -t tmpfs -o mode=0755,nosuid kvmd-dev "$D"',
        *(f'mknod -m 0666 "$D/{name}" c {major} {minor}'
          for name, (major, minor) in PSEUDO_DEVICES.items()),
        'mkdir "$D/pts" "$D/shm" "$D/mqueue"',
        'mount --bind /dev/pts "$D/pts"',
        'ln -s pts/ptmx "$D/ptmx"',
        'ln -s /proc/self/fd "$D/fd"',
        'ln -s /proc/self/fd/0 "$D/stdin"',
        'ln -s /proc/self/fd/1 "$D/stdout"',
        'ln -s /proc/self/fd/2 "$D/stderr"',
        'touch "$D/kvm"',
        'mount --bind "$NS/root/dev/kvm" "$D/kvm"',
    ]
    shm = temporary_file_system("/dev/shm") if dev_shm else None
    if dev_shm:
        assert shm is not None, "the unit has no TemporaryFileSystem=/dev/shm"
        lines.append(f'mount -t tmpfs -o {q(shm)} kvmd-shm "$D/shm"')
    else:
        lines.append('mount --bind /dev/shm "$D/shm"')  # what PrivateDevices= alone does
    lines += ['mount -o remount,ro,nosuid,noexec "$D"', 'mount --move "$D" /dev']
    if proc_subset:
        lines.append("mount -t proc -o subset=pid,hidepid=invisible proc /proc")
    if inaccessible:
        paths = inaccessible_paths()
        assert paths, "the unit has no InaccessiblePaths="
        lines += [
            'mkdir -m 0 "$NS/inaccessible-dir"',
            ': > "$NS/inaccessible-reg"',
            'chmod 0 "$NS/inaccessible-reg"',
            f"for p in {' '.join(q(p) for p in paths)}; do",
            '  if [ -d "$p" ] && [ ! -L "$p" ]; then mount --bind "$NS/inaccessible-dir" "$p"',
            '  elif [ -e "$p" ]; then mount --bind "$NS/inaccessible-reg" "$p"; fi',
            "done",
        ]
    if read_only_root:  # ProtectSystem=strict with the RuntimeDirectory= writable
        lines += [f"mount --bind {q(str(runtime))} {q(str(runtime))}",
                  "mount -o remount,bind,ro /"]
    lines.append('exec "$@"')
    script = directory / "sandbox.sh"
    script.write_text("\n".join(lines) + "\n")
    flags = ["--mount", *(["--ipc"] if ipc else []), "--propagation", "private"]
    return [unshare, *flags, "sh", str(script)]


# -- the daemon in it ------------------------------------------------------------------------

def prepare_runtime(directory: Path, ident: Identity, tls: CertFiles) -> tuple[Path, CertFiles]:
    """The RuntimeDirectory= (owned by the unit's user, mode 0750, group kvmd) holding a copy
    of the server certificate and key the user can read."""
    directory.chmod(0o711)
    runtime = directory / "run"
    runtime.mkdir(mode=0o750)
    os.chown(runtime, ident.uid, ident.gid)
    copies = []
    for path in (tls.cert, tls.key):
        dest = runtime / Path(path).name
        shutil.copyfile(path, dest)
        os.chown(dest, ident.uid, ident.gid)
        dest.chmod(0o600)
        copies.append(str(dest))
    return runtime, CertFiles(*copies)


def start_kvmd(prefix: list[str], runtime: Path, log_path: Path, group: str, tls: CertFiles,
               kvmd: str | None = None) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [*prefix, kvmd or kvmd_script(), "--listen", f"unix://{runtime}/kvmd.sock",
             "--listen", "127.0.0.1:0", "--tls-cert", tls.cert, "--tls-key", tls.key,
             "--socket-group", group, "--metrics-listen", "127.0.0.1:0",
             "--state-dir", f"{runtime}/state",
             "--log-level", "info", "--vcpu-cpus", str(max(os.sched_getaffinity(0))),
             "--api-cpus", str(min(os.sched_getaffinity(0)))],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def run_workload(prefix: list[str], runtime: Path, log_path: Path, group: str,
                 tls: CertFiles, kvmd: str | None = None) -> dict[str, str]:
    """Run kvmd (after `prefix`) like the shipped config does (Unix socket with a group,
    metrics, a state directory) plus a TLS listener; drive a guest through it, and a
    snapshot file; SIGHUP; SIGTERM. Returns the
    metrics text and the log. Fails with the daemon's log at the first step that goes
    wrong."""
    sock = runtime / "kvmd.sock"
    proc = start_kvmd(prefix, runtime, log_path, group, tls, kvmd)

    def log_text() -> str:
        return log_path.read_text(errors="replace")

    def step(what: str) -> str:
        return f"{what}; exit code {proc.poll()}; kvmd log:\n{log_text()}"

    stubs: Stubs | None = None
    try:
        wait_until(lambda: "kvmd listening" in log_text() or proc.poll() is not None, 30,
                   "kvmd to start")
        assert proc.poll() is None, step("kvmd did not start")
        st = os.stat(sock)  # in the runtime directory, for the socket group only
        assert stat.S_IMODE(st.st_mode) == 0o660, step(f"socket mode {st.st_mode:o}")
        assert st.st_gid == grp.getgrnam(group).gr_gid, step(f"socket group {st.st_gid}")
        stubs = Stubs.of(grpc.insecure_channel(f"unix://{sock}"))
        try:
            assert stubs.serving()
            assert stubs.hypervisor.GetInfo(pb.GetInfoRequest(),
                                            timeout=RPC_TIMEOUT).api_version == 12
            stubs.boot("sandboxed")
            stubs.vms.StartVm(pb.VmRef(vm_id="sandboxed"), timeout=RPC_TIMEOUT)
            assert stubs.console_backlog("sandboxed", 2) == b"hi"
            stubs.vms.StopVm(pb.VmRef(vm_id="sandboxed"), timeout=RPC_TIMEOUT)
            # A snapshot file: written unnamed (O_TMPFILE), named through /proc/self/fd.
            list(stubs.snapshots.SnapshotVm(pb.SnapshotVmRequest(
                vm_id="sandboxed", file="saved"), timeout=RPC_TIMEOUT))
            listed = stubs.snapshots.ListSnapshots(pb.ListSnapshotsRequest(),
                                                   timeout=RPC_TIMEOUT).snapshots
            assert [s.file for s in listed] == ["saved"], step(f"listed {listed}")
            stubs.snapshots.RestoreVm(iter([pb.RestoreVmRequest(options=pb.RestoreVmOptions(
                vm_id="restored", files=["saved"]))]), timeout=RPC_TIMEOUT)
            stubs.delete_vm("restored")
            stubs.snapshots.DeleteSnapshot(pb.DeleteSnapshotRequest(file="saved"),
                                           timeout=RPC_TIMEOUT)
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
