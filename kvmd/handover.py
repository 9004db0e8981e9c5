"""Restart and upgrade the daemon without losing a VM.

KVM binds VM and vCPU fds to the process that created them, so VMs cannot move between
processes as fds: the new daemon re-creates each VM from saved state (kvmd.state.handover:
the snapshot format without memory), and only guest memory passes as it is, as memfds,
never copied (QEMU's CPR transfer mode does the same). Two ways to pass them:

- Under systemd (`on_stop = "keep"`): on SIGTERM the daemon pauses and saves every VM,
  writes the states to <runtime_dir>/handover/ (<vm>.state, 0600, and manifest.json), puts
  every memfd in systemd's fd store (FDSTORE=1, FDNAME=kvmd-mem.<slot>.<vm>, then BARRIER=1)
  and exits. The next daemon (a restart; or a start after a stop, where systemd keeps the
  store: FileDescriptorStorePreserve=, systemd 254+) gets the memfds as LISTEN_FDS, matches
  them with the state files and restores.
- `kvmd --take-over`: the new daemon connects to the running one on <socket>.handover (a
  Unix socket of mode 0600; the peer must be the same user or root) and asks it to hand
  over. The old daemon stops admitting calls, pauses and saves every VM and sends the
  states and memfds (SCM_RIGHTS). The new one restores them, parked, and answers; the old
  one then commits (its VMs never run again), frees its listeners and exits 0, while the new
  one resumes the guests and serves in its place. Until the commit, any failure (the new
  daemon dies, refuses, restores nothing) makes the old one resume its VMs and serve on.

    new -> old   {"op": "hello"}                   old -> new  {"op": "accepted"} | refused
    old -> new   {"op": "manifest", ...}, then per VM: its state (a blob frame) and its
                 memfds (fd frames: names, and the fds as SCM_RIGHTS), then {"op": "sent"}
    new -> old   {"op": "restored", "results": {vm: error or ""}} | {"op": "abort"}
    old -> new   {"op": "commit"}, then {"op": "released"} once its sockets are gone

Frames: a 4-byte big-endian length, a kind byte (J: JSON, B: bytes, F: fds), the payload.

While the hand-over holds the API closed (kvmd.api.gate.Gate), calls fail at once with
UNAVAILABLE and trailing metadata `kvmd-retry: handover`: the call did nothing, any call may
be retried.
Long-lived streams end with `kvmd-stream-end: shutdown` (clients re-open them).

A VM the new daemon cannot restore is stranded, never dropped: its state and memory stay
(state file in the runtime directory, memfds held open and in the fd store) for a retry or a
forced delete (the Handover service, `kvmctl handover`), and travel on with the next
hand-over. The outage is measured and logged: each guest's pause, the API's unavailability,
and save / start / restore times (`Report`, the Handover service's GetHandoverReport).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvmd import __version__
from kvmd.config import Config, parse_listen
from kvmd.core.errors import DomainError, InvalidState, NotFound, Reason
from kvmd.core.host import Host
from kvmd.core.vcpu import PAUSABLE
from kvmd.core.vm import ManagedVm
from kvmd.state import handover as carry
from kvmd.state.handover import HandoverRecord, boottime_ns, parse_memfd_name
from kvmd.systemd import SCM_MAX_FD, fd_store, fd_store_remove, listen_fds, under_systemd

log = logging.getLogger("kvmd.handover")

PROTOCOL_VERSION = 1
SOCKET_SUFFIX = ".handover"
STATE_SUBDIR = "handover"
MANIFEST = "manifest.json"
# Calls still in flight when a hand-over closes the API get this long to finish.
DRAIN_SECONDS = 5.0
# The old daemon waits this long for the new one's verdict, the new one for the states.
EXCHANGE_SECONDS = 120.0
FD_BATCH = min(250, SCM_MAX_FD)
RESTORE_WORKERS = 4
MAX_FRAME = 1 << 30


class HandoverError(Exception):
    """A hand-over could not happen (before the switch: the old daemon serves on)."""


def runtime_dir(cfg: Config) -> str:
    """Where hand-over state lives: runtime_dir, else systemd's RuntimeDirectory= (its first
    path), else the directory of the first Unix socket ("" with TCP listeners only)."""
    if cfg.runtime_dir:
        return cfg.runtime_dir
    env = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if env:
        return env
    paths = unix_paths(cfg)
    return os.path.dirname(paths[0]) if paths else ""


def unix_paths(cfg: Config) -> list[str]:
    return [x.unix_path for x in (parse_listen(a, bool(cfg.tls_cert)) for a in cfg.listen)
            if x.unix_path]


def pending(cfg: Config) -> bool:
    """A previous daemon handed VMs over to this start: systemd passed fds, or state files
    wait in the runtime directory."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and \
            os.environ.get("LISTEN_FDS", "0") not in ("", "0"):
        return True
    directory = runtime_dir(cfg)
    return bool(directory) and StateFiles(os.path.join(directory, STATE_SUBDIR)).present()


def receive_early(cfg: Config) -> Handover | None:
    """kvmd.launch: open /dev/kvm and restore what a previous daemon handed over, before
    the server is even loaded. None if /dev/kvm cannot be opened (the server reports it)."""
    try:
        host = Host(cfg.limits(), cfg.kvm_device, cfg.images_dir or None,
                    vcpu_nice=cfg.vcpu_nice, vcpu_policy=cfg.vcpu_policy,
                    vcpu_cpus=cfg.vcpu_cpu_set())
    except DomainError:
        return None
    handover = Handover.for_config(cfg, host)
    handover.receive(False)
    return handover


def socket_path(unix_path: str) -> str:
    """The hand-over socket beside a daemon's main Unix socket."""
    return unix_path + SOCKET_SUFFIX


def process_start_ns() -> int:
    """When this process started, in CLOCK_BOOTTIME nanoseconds (/proc/self/stat)."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(int(fields[19]) * 1_000_000_000 // os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return boottime_ns()


# -- what travels ----------------------------------------------------------------------------

@dataclass
class Carried:
    """One VM on its way to the next daemon: its state's bytes and its memfds by name (fds
    owned here), or a VM stranded earlier (`stranded`: why) travelling on."""

    vm_id: str
    data: bytes
    fds: dict[str, int] = field(default_factory=dict)
    stranded: str = ""
    state_file: str = ""

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = {}

    def dup(self) -> Carried:
        return Carried(self.vm_id, self.data,
                       {n: os.dup(fd) for n, fd in self.fds.items()}, self.stranded,
                       self.state_file)


@dataclass
class Stranded:
    """A VM the new daemon could not restore, kept for a retry or a forced delete."""

    carried: Carried
    reason: str
    since_unix_ms: int
    id_reserved: bool
    memory_bytes: int = 0


@dataclass
class VmReport:
    vm_id: str
    restored: bool
    error: str = ""
    paused_seconds: float = 0.0
    was_running: bool = False


@dataclass
class Report:
    """The outage of the last hand-over this daemon received, measured."""

    mode: str
    unix_ms: int
    previous_version: str = ""
    save_seconds: float = 0.0
    start_seconds: float = 0.0
    restore_seconds: float = 0.0
    api_unavailable_seconds: float = 0.0
    startup_seconds: float = 0.0
    vms: list[VmReport] = field(default_factory=list)

    @property
    def restored(self) -> int:
        return sum(1 for v in self.vms if v.restored)

    @property
    def max_paused_seconds(self) -> float:
        return max((v.paused_seconds for v in self.vms if v.restored), default=0.0)


# -- the old daemon: pause and save --------------------------------------------------------

class Outgoing:
    """Every VM of a host held paused and saved for a hand-over. `resume()` if it fails
    before the switch (each VM runs again as it did); after the switch, the VMs are only
    ever closed (their memory is the new daemon's now)."""

    def __init__(self, host: Host, frozen_ns: int) -> None:
        self.host = host
        self.frozen_ns = frozen_ns  # when the API closed
        self.saved_ns = 0
        self._stack = contextlib.ExitStack()
        self.held: list[tuple[ManagedVm, dict[int, str], int]] = []
        self.saved: list[carry.SavedForHandover] = []
        self.failed: dict[str, str] = {}

    def pause_all(self) -> None:
        for vm in self.host.list_vms():
            self._hold(vm)

    def pause_failed_again(self) -> None:
        """A second try for the VMs whose pause failed, where a failure loses them (the fd
        store: they end with this daemon): a vCPU slow to park on a loaded host, or one
        waiting for a remote handler whose stream has ended since, parks now."""
        failed, self.failed = self.failed, {}
        for vm_id, reason in failed.items():
            try:
                vm = self.host.get_vm(vm_id)
            except DomainError:
                self.failed[vm_id] = reason  # deleted meanwhile: nothing to hand over
                continue
            log.warning("vm pause failed for the hand-over: trying again",
                        extra={"vm_id": vm_id, "error": reason})
            self._hold(vm)

    def _hold(self, vm: ManagedVm) -> None:
        try:
            hold = self._stack.enter_context(vm.held_paused("handover", True))
        except DomainError as exc:
            self.failed[vm.id] = exc.message
            return
        self.held.append((vm, hold.run_states, boottime_ns()))

    def save_all(self) -> None:
        for vm, before, paused_ns in self.held:
            try:
                self.saved.append(carry.save_vm(vm, before, paused_ns))
            except DomainError as exc:
                self.failed[vm.id] = exc.message
            except OSError as exc:
                self.failed[vm.id] = f"{exc.strerror or exc}"
        self.saved_ns = boottime_ns()

    def resume(self) -> None:
        """The hand-over failed: every vCPU that was running or halted runs again."""
        self._stack.close()
        for vm, before, _ in self.held:
            for vcpu in vm.vcpus():
                if before.get(vcpu.id) in PAUSABLE:
                    with contextlib.suppress(DomainError):
                        vcpu.resume()
        self.held = []

    def carried(self) -> list[Carried]:
        """The saved VMs as they travel (the memfds dup'ed: valid after the VMs close)."""
        return [Carried(s.vm_id, s.data, {n: os.dup(fd) for n, fd in s.memfds.items()})
                for s in self.saved]

    def manifest(self, stranded: list[Carried]) -> dict[str, Any]:
        return {
            "kvmd_handover": PROTOCOL_VERSION, "kvmd_version": __version__,
            "pid": os.getpid(), "frozen_ns": self.frozen_ns, "saved_ns": self.saved_ns,
            "crashes": dict(self.host.crashes),
            "vms": [{"vm_id": s.vm_id, "memfds": sorted(s.memfds), "was_running":
                     s.was_running} for s in self.saved]
            + [{"vm_id": c.vm_id, "memfds": sorted(c.fds), "stranded": c.stranded}
               for c in stranded],
        }


# -- the new daemon: restore ----------------------------------------------------------------

@dataclass
class Restored:
    vm: ManagedVm
    record: HandoverRecord
    carried: Carried
    resumed_ns: int = 0


class Incoming:
    """Restores carried VMs into a host: parked first (`restore`), running again once the
    switch is certain (`resume`), or closed again if it never comes (`abort`)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.restored: list[Restored] = []
        self.failed: list[tuple[Carried, str]] = []
        self.started_ns = 0
        self.finished_ns = 0

    def restore(self, items: list[Carried]) -> None:
        """Restore every item, a few at a time: most of a restore is kernel work (creating
        the VM, its irqchip, vCPUs, mappings) that runs without the GIL."""
        self.started_ns = boottime_ns()
        workers = max(1, min(RESTORE_WORKERS, len(items)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvmd-restore") as pool:
            results = list(pool.map(self._restore_one, items))
        for item, result in zip(items, results, strict=True):
            if isinstance(result, Restored):
                self.restored.append(result)
            else:
                self.failed.append((item, result))
        self.finished_ns = boottime_ns()

    def _restore_one(self, item: Carried) -> Restored | str:
        try:
            record = carry.read_state(item.data, item.vm_id)
            return Restored(carry.restore_vm(self.host, record, item.fds), record, item)
        except DomainError as exc:
            reason = exc.message
            if item.stranded and item.stranded not in reason:
                reason = f"{reason} (stranded before: {item.stranded})"
            log.error("vm not restored: kept for a retry or a forced delete",
                      extra={"vm_id": item.vm_id, "error": reason})
            return reason
        except Exception as exc:  # a bug must not cost the other VMs
            log.exception("vm not restored", extra={"vm_id": item.vm_id})
            return f"{type(exc).__name__}: {exc}"

    def resume(self, before_each: Callable[[Restored], None] | None = None) -> None:
        """Each VM back in its run state (before_each runs first, e.g. removing its state
        file so a crash from here on never restores the stale state over newer memory)."""
        for r in self.restored:
            if before_each is not None:
                before_each(r)
            try:
                carry.resume(r.vm, r.record.state)
            except DomainError as exc:
                log.error("vm restored but not resumed", extra={"vm_id": r.vm.id,
                                                                "error": exc.message})
            r.resumed_ns = boottime_ns()

    def abort(self) -> None:
        """The switch did not happen: close what was restored (memory untouched)."""
        for r in self.restored:
            with contextlib.suppress(DomainError):
                self.host.delete_vm(r.vm.id)
        self.restored = []

    def report(self, mode: str, manifest: dict[str, Any]) -> Report:
        frozen, saved = int(manifest.get("frozen_ns", 0)), int(manifest.get("saved_ns", 0))
        rep = Report(mode, int(time.time() * 1000), str(manifest.get("kvmd_version", "")))
        if frozen and saved:
            rep.save_seconds = (saved - frozen) / 1e9
        if saved:
            rep.start_seconds = max(0, self.started_ns - saved) / 1e9
        rep.restore_seconds = (self.finished_ns - self.started_ns) / 1e9
        for r in self.restored:
            paused = r.record.extras.paused_boottime_ns
            rep.vms.append(VmReport(r.vm.id, True, "", (r.resumed_ns - paused) / 1e9
                                    if paused and r.resumed_ns else 0.0,
                                    r.record.was_running))
        for item, reason in self.failed:
            rep.vms.append(VmReport(item.vm_id, False, reason))
        return rep


# -- stranded VMs ----------------------------------------------------------------------------

class StrandedVms:
    """VMs a hand-over could not restore: their state and memfds, held for a retry or a
    forced delete (ids kept reserved meanwhile)."""

    def __init__(self, host: Host, files: StateFiles | None) -> None:
        self.host = host
        self.files = files
        self._lock = threading.Lock()
        self._vms: dict[str, Stranded] = {}

    def add(self, item: Carried, reason: str) -> None:
        reserved = True
        try:
            self.host.reserve_id(item.vm_id, "local")
        except DomainError:
            reserved = False  # over the VM limit, or a duplicate: kept all the same
        memory = 0
        with contextlib.suppress(OSError):
            memory = sum(os.fstat(fd).st_size for fd in item.fds.values())
        with self._lock:
            old = self._vms.pop(item.vm_id, None)
            self._vms[item.vm_id] = Stranded(item, reason, int(time.time() * 1000), reserved,
                                             memory)
        if old is not None:  # the same id twice (orphan memfds, then a state): keep both fds
            item.fds = {**old.carried.fds, **item.fds}
            if old.id_reserved and not reserved:
                self._vms[item.vm_id].id_reserved = True

    def all(self) -> list[Stranded]:
        with self._lock:
            return sorted(self._vms.values(), key=lambda s: s.carried.vm_id)

    def _get(self, vm_id: str) -> Stranded:
        with self._lock:
            s = self._vms.get(vm_id)
        if s is None:
            raise NotFound(f"no stranded vm {vm_id!r}", resource=f"stranded/{vm_id}")
        return s

    def retry(self, vm_id: str) -> ManagedVm:
        """Restore a stranded VM again; on success it runs as it did and its saved state
        and memfds are released. A failure keeps it stranded, with the new reason."""
        s = self._get(vm_id)
        with self._lock:
            if self._vms.get(vm_id) is not s:
                raise NotFound(f"no stranded vm {vm_id!r}", resource=f"stranded/{vm_id}")
            del self._vms[vm_id]
        item = s.carried
        try:
            if not item.data:
                raise InvalidState(f"vm {vm_id}: {s.reason}", resource=f"stranded/{vm_id}",
                                   reason=Reason.HANDOVER_STATE_UNUSABLE)
            record = carry.read_state(item.data, vm_id)
            vm = carry.restore_vm(self.host, record, item.fds, id_reserved=s.id_reserved)
        except DomainError as exc:
            s.reason = exc.message
            with self._lock:
                self._vms[vm_id] = s
            raise
        if self.files is not None:
            self.files.remove(vm_id)
        carry.resume(vm, record.state)
        if s.id_reserved:
            self.host.release_id(vm_id)
        self._release(item)
        log.info("stranded vm restored", extra={"vm_id": vm_id})
        return vm

    def delete(self, vm_id: str) -> None:
        """Give a stranded VM up for good: its state file and memory are released."""
        s = self._get(vm_id)
        with self._lock:
            self._vms.pop(vm_id, None)
        if self.files is not None:
            self.files.remove(vm_id)
        if s.id_reserved:
            self.host.release_id(vm_id)
        self._release(s.carried)
        log.warning("stranded vm deleted: its saved state and memory are gone",
                    extra={"vm_id": vm_id})

    def _release(self, item: Carried) -> None:
        if under_systemd():
            fd_store_remove(item.fds)
        item.close()

    def take_all(self) -> list[Carried]:
        """For the next hand-over: every stranded VM travels on (copies of its fds)."""
        with self._lock:
            return [Carried(s.carried.vm_id, s.carried.data,
                            {n: os.dup(fd) for n, fd in s.carried.fds.items()}, s.reason,
                            s.carried.state_file) for s in self._vms.values()]

    def forget_all(self) -> None:
        """This daemon ends: close the fds (the fd store, or the next daemon, has them)."""
        with self._lock:
            vms, self._vms = list(self._vms.values()), {}
        for s in vms:
            if s.id_reserved:
                self.host.release_id(s.carried.vm_id)
            s.carried.close()


# -- state files (systemd) -------------------------------------------------------------------

class StateFiles:
    """<runtime_dir>/handover/: one <vm>.state per VM (mode 0600) and manifest.json."""

    def __init__(self, directory: str) -> None:
        self.dir = directory

    def path(self, vm_id: str) -> str:
        return os.path.join(self.dir, f"{vm_id}.state")

    def write(self, manifest: dict[str, Any], items: list[Carried]) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        for item in items:
            item.state_file = self.path(item.vm_id)
            if item.data:
                _write_atomic(item.state_file, item.data)
            for entry in manifest["vms"]:
                if entry["vm_id"] == item.vm_id:
                    entry["state_file"] = os.path.basename(item.state_file)
        _write_atomic(os.path.join(self.dir, MANIFEST), json.dumps(manifest).encode())

    def present(self) -> bool:
        try:
            return any(n.endswith(".state") or n == MANIFEST for n in os.listdir(self.dir))
        except OSError:
            return False

    def load(self, fds: list[tuple[str, int]]) -> tuple[dict[str, Any], list[Carried]]:
        """The manifest (or {} if it is missing or unreadable: the state files alone are
        enough) and one Carried per VM: its state file's bytes ("" if none) and the memfds
        named for it. Fds of other names are closed."""
        manifest: dict[str, Any] = {}
        try:
            with open(os.path.join(self.dir, MANIFEST), "rb") as fh:
                manifest = json.loads(fh.read())
            if not isinstance(manifest, dict):
                manifest = {}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("hand-over manifest unreadable: using the state files alone",
                        extra={"error": str(exc)})
        items = {c.vm_id: c for c in group_fds(fds)}
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            names = []
        for entry in names:
            if not entry.endswith(".state"):
                continue
            vm_id = entry[:-len(".state")]
            item = items.setdefault(vm_id, Carried(vm_id, b""))
            item.state_file = os.path.join(self.dir, entry)
            try:
                with open(item.state_file, "rb") as fh:
                    item.data = fh.read()
            except OSError as exc:
                item.stranded = f"cannot read its state file: {exc.strerror}"
        for entry in manifest.get("vms", []):
            if isinstance(entry, dict) and entry.get("stranded") and entry.get("vm_id") in items:
                items[entry["vm_id"]].stranded = str(entry["stranded"])
        return manifest, [items[k] for k in sorted(items)]

    def remove(self, vm_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(vm_id))

    def rewrite_manifest(self, stranded: list[Stranded]) -> None:
        """After a restore: the manifest lists what is still kept (none: it goes). The
        directory is made again if it went (memfds passed without their states)."""
        path = os.path.join(self.dir, MANIFEST)
        if not stranded:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        _write_atomic(path, json.dumps({
            "kvmd_handover": PROTOCOL_VERSION, "kvmd_version": __version__,
            "vms": [{"vm_id": s.carried.vm_id, "memfds": sorted(s.carried.fds),
                     "stranded": s.reason, "state_file": os.path.basename(
                         s.carried.state_file)} for s in stranded]}).encode())


def _no_state(item: Carried) -> str:
    return item.stranded or ("its memory was passed but its saved state is missing"
                             if item.fds else "no saved state")


def group_fds(fds: list[tuple[str, int]]) -> list[Carried]:
    """Passed memfds grouped by the VM their name says; fds of other names are closed."""
    items: dict[str, Carried] = {}
    for name, fd in fds:
        parsed = parse_memfd_name(name)
        if parsed is None:
            log.warning("an fd of an unknown name was passed: closed", extra={"fd_name": name})
            os.close(fd)
            continue
        items.setdefault(parsed[0], Carried(parsed[0], b"")).fds[name] = fd
    return list(items.values())


def _write_atomic(path: str, data: bytes) -> None:
    """Write to a temporary name, then rename: never seen half-written. No fsync: a state
    is worth something only while its memfds live, and they do not outlive the boot."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)


# -- the wire (take-over) --------------------------------------------------------------------

_HEAD = struct.Struct(">IB")


class Channel:
    """Framed messages, blobs and fd batches over a connected Unix stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send_json(self, message: dict[str, Any]) -> None:
        self._send(b"J", json.dumps(message).encode())

    def send_blob(self, data: bytes) -> None:
        self._send(b"B", data)

    def send_fds(self, named: dict[str, int]) -> None:
        items = list(named.items())
        for i in range(0, len(items), FD_BATCH):
            batch = items[i:i + FD_BATCH]
            payload = json.dumps([n for n, _ in batch]).encode()
            socket.send_fds(self.sock, [_HEAD.pack(len(payload), ord("F")) + payload],
                            [fd for _, fd in batch])

    def _send(self, kind: bytes, payload: bytes) -> None:
        self.sock.sendall(_HEAD.pack(len(payload), kind[0]))
        self.sock.sendall(payload)

    def recv(self, timeout: float) -> tuple[str, Any, list[int]]:
        """The next frame: ("J", dict, []), ("B", bytes, []) or ("F", names, fds)."""
        self.sock.settimeout(timeout)
        fds: list[int] = []
        head = b""
        try:
            while len(head) < _HEAD.size:
                data, got, flags, _ = socket.recv_fds(self.sock, _HEAD.size - len(head),
                                                      FD_BATCH, socket.MSG_CMSG_CLOEXEC)
                fds.extend(got)
                if flags & socket.MSG_CTRUNC:
                    raise HandoverError("fds were lost in transit (MSG_CTRUNC)")
                if not data:
                    raise HandoverError("the peer closed the hand-over connection")
                head += data
            length, kind = _HEAD.unpack(head)
            if length > MAX_FRAME:
                raise HandoverError(f"a hand-over frame of {length} bytes")
            payload = bytearray()
            while len(payload) < length:
                chunk = self.sock.recv(min(length - len(payload), 1 << 20))
                if not chunk:
                    raise HandoverError("the peer closed the hand-over connection")
                payload += chunk
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        if kind == ord("J"):
            return "J", json.loads(payload), fds
        if kind == ord("F"):
            names = json.loads(payload)
            if len(names) != len(fds):
                for fd in fds:
                    os.close(fd)
                raise HandoverError(f"{len(names)} fd names but {len(fds)} fds arrived")
            return "F", names, fds
        return "B", bytes(payload), fds

    def expect(self, op: str, timeout: float) -> dict[str, Any]:
        kind, message, fds = self.recv(timeout)
        for fd in fds:
            os.close(fd)
        if kind != "J" or not isinstance(message, dict):
            raise HandoverError(f"expected {op!r}, got a {kind} frame")
        if message.get("op") != op:
            reason = message.get("reason") or message.get("op")
            raise HandoverError(f"expected {op!r}, got {reason!r}")
        return message

    def close(self) -> None:
        self.sock.close()


def peer_allowed(sock: socket.socket) -> tuple[bool, int, int]:
    """(allowed, pid, uid): the peer runs as this process's user, or as root."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (os.geteuid(), 0), pid, uid


# -- the controller ----------------------------------------------------------------------------

class DaemonHooks(Protocol):
    """What the hand-over needs of the daemon it runs in (kvmd.server.Daemon: its API
    gate, kvmd.api.gate.Gate, and its streams)."""

    def close_api(self) -> None: ...

    def open_api(self) -> None: ...

    def calls_in_flight(self, timeout: float, long_lived: bool) -> dict[str, int]:
        """Wait up to `timeout` for calls in flight to finish (but long-lived streams,
        unless `long_lived`); what is still running."""

    def end_streams(self) -> None: ...

    def end_migrations(self) -> None:
        """Cancel outgoing live migrations (their VMs stay, to be handed over)."""

    def reopen_streams(self) -> None: ...

    def release_listeners(self) -> None: ...

    def handed_over(self) -> None: ...


class Handover:
    """A daemon's part in hand-overs: receiving at start (fd store or take-over), giving
    at SIGTERM (fd store) or when a new daemon asks (take-over), and the stranded VMs."""

    def __init__(self, host: Host, runtime_dir: str, unix_path: str | None) -> None:
        self.host = host
        self.hooks: DaemonHooks | None = None  # set once the daemon serves (attach)
        self.unix_path = unix_path
        self.files = StateFiles(os.path.join(runtime_dir, STATE_SUBDIR)) if runtime_dir \
            else None
        self.stranded = StrandedVms(host, self.files)
        self.report: Report | None = None
        self._lock = threading.Lock()  # one hand-over at a time
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._pending_manifest: dict[str, Any] = {}
        self._started_ns = process_start_ns()
        self.given_away = False  # a take-over committed: the VMs here are another's

    # -- receiving ------------------------------------------------------------------------

    def receive(self, take_over: bool) -> None:
        """At start, before serving: restore what a previous daemon handed over. With
        `take_over`, ask the daemon on our socket for its VMs (HandoverError: it refused or
        failed; it serves on). Otherwise the fd store's memfds (LISTEN_FDS) and the state
        files, if any."""
        if take_over:
            self._take_over()
            return
        fds = listen_fds()
        if not fds and (self.files is None or not self.files.present()):
            return
        manifest: dict[str, Any] = {}
        if self.files is None:
            log.error("memfds were passed but there is no runtime directory for their state",
                      extra={"fds": len(fds)})
            items = group_fds(fds)
        else:
            manifest, items = self.files.load(fds)
        self._pending_manifest = manifest
        incoming = Incoming(self.host)
        for item in items:
            if not item.data:
                self._strand(item, _no_state(item))
        incoming.restore([i for i in items if i.data])
        for item, reason in incoming.failed:
            self._strand(item, reason)
        files = self.files

        def taken(r: Restored) -> None:
            # Before the guest runs again: from now on the saved state is stale.
            if files is not None:
                files.remove(r.carried.vm_id)

        incoming.resume(taken)
        self.host.crashes.update(self._pending_manifest.get("crashes") or {})
        for r in incoming.restored:
            if under_systemd():
                fd_store_remove(r.carried.fds)
            r.carried.close()
        if self.files is not None:
            self.files.rewrite_manifest(self.stranded.all())
        self.report = incoming.report("fd-store", self._pending_manifest)

    def _strand(self, item: Carried, reason: str) -> None:
        log.error("vm stranded: its state and memory are kept for a retry or a forced delete",
                  extra={"vm_id": item.vm_id, "error": reason,
                         "memfds": ",".join(sorted(item.fds)) or "-"})
        self.stranded.add(item, reason)

    def _take_over(self) -> None:
        if self.unix_path is None:
            raise HandoverError("--take-over needs a Unix socket listener (the old daemon is "
                                "found beside it)")
        path = socket_path(self.unix_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise HandoverError(f"no daemon to take over at {path}: {exc.strerror}") from None
        ok, pid, uid = peer_allowed(sock)
        if not ok:
            sock.close()
            raise HandoverError(f"the daemon at {path} runs as uid {uid}, not as this user")
        chan = Channel(sock)
        incoming = Incoming(self.host)
        items: list[Carried] = []
        committed = False
        try:
            chan.send_json({"op": "hello", "version": PROTOCOL_VERSION,
                            "kvmd_version": __version__, "pid": os.getpid()})
            chan.expect("accepted", 30)
            log.info("taking over", extra={"from_pid": pid})
            manifest = chan.expect("manifest", EXCHANGE_SECONDS)
            items = self._receive_items(chan, manifest)
            live = [i for i in items if i.data]
            incoming.restore(live)
            if live and not incoming.restored:
                reasons = "; ".join(f"{c.vm_id}: {r}" for c, r in incoming.failed[:3])
                chan.send_json({"op": "abort", "reason": f"no VM could be restored "
                                f"({reasons})"})
                raise HandoverError(f"no VM could be restored here: {reasons}")
            chan.send_json({"op": "restored", "results": {
                **{r.vm.id: "" for r in incoming.restored},
                **{c.vm_id: reason for c, reason in incoming.failed}}})
            chan.expect("commit", EXCHANGE_SECONDS)
            committed = True
            incoming.resume()
            try:
                chan.expect("released", 30)
            except (HandoverError, OSError) as exc:
                log.warning("the old daemon did not confirm it released its listeners",
                            extra={"error": str(exc)})
        except Exception as exc:  # before the switch: the old daemon resumes its VMs
            if not committed:
                incoming.abort()
                for item in items:
                    item.close()
                raise HandoverError(f"take-over failed: {exc}") from None
            log.exception("after the switch")
        finally:
            chan.close()
        for item, reason in incoming.failed:
            self._strand(item, reason)
        for item in items:
            if not item.data:
                self._strand(item, _no_state(item))
        for r in incoming.restored:
            r.carried.close()
        self.host.crashes.update(manifest.get("crashes") or {})
        self._pending_manifest = manifest
        self.report = incoming.report("take-over", manifest)

    def _receive_items(self, chan: Channel, manifest: dict[str, Any]) -> list[Carried]:
        items: dict[str, Carried] = {}
        entries = {e["vm_id"]: e for e in manifest.get("vms", [])}
        current: Carried | None = None
        try:
            while True:
                kind, message, fds = chan.recv(EXCHANGE_SECONDS)
                if kind == "J":
                    if message.get("op") == "sent":
                        break
                    if message.get("op") == "vm":
                        vm_id = str(message["vm_id"])
                        current = items.setdefault(vm_id, Carried(
                            vm_id, b"", stranded=str(entries.get(vm_id, {}).get(
                                "stranded", ""))))
                        continue
                    raise HandoverError(f"unexpected message {message.get('op')!r}")
                if current is None:
                    for fd in fds:
                        os.close(fd)
                    raise HandoverError("data before its VM")
                if kind == "B":
                    current.data = message
                else:
                    current.fds.update(zip(message, fds, strict=True))
        except BaseException:
            for item in items.values():
                item.close()
            raise
        return list(items.values())

    def serving(self) -> None:
        """The API serves: finish the report (the outage is over), log it, and open the
        hand-over socket for the next take-over."""
        report = self.report
        if report is not None:
            now = boottime_ns()
            frozen = int(self._pending_manifest.get("frozen_ns", 0))
            report.api_unavailable_seconds = (now - frozen) / 1e9 if frozen else 0.0
            report.startup_seconds = (now - self._started_ns) / 1e9
            for v in report.vms:
                if v.restored:
                    log.info("vm handed over", extra={
                        "vm_id": v.vm_id, "paused_ms": round(v.paused_seconds * 1000, 1),
                        "running": v.was_running})
            log.info("hand-over complete", extra={
                "mode": report.mode, "vms": len(report.vms), "restored": report.restored,
                "stranded": len(report.vms) - report.restored,
                "save_ms": round(report.save_seconds * 1000, 1),
                "start_ms": round(report.start_seconds * 1000, 1),
                "restore_ms": round(report.restore_seconds * 1000, 1),
                "max_pause_ms": round(report.max_paused_seconds * 1000, 1),
                "api_unavailable_ms": round(report.api_unavailable_seconds * 1000, 1),
                "startup_ms": round(report.startup_seconds * 1000, 1),
                "from_version": report.previous_version})
        if self.unix_path is not None:
            self._listen(socket_path(self.unix_path))

    # -- giving: the fd store ----------------------------------------------------------------

    def to_fd_store(self) -> bool:
        """SIGTERM under systemd with on_stop = "keep": pause and save every VM, write the
        states, put every memfd in systemd's fd store. True if the VMs were handed over
        (the caller then closes them: they must never run here again)."""
        if self.files is None:
            log.error("no runtime directory: the VMs end with this daemon")
            return False
        with self._lock:
            if self.given_away or (not self.host.vm_count() and not self.stranded.all()):
                return False  # nothing here is ours to keep (a take-over took it all)
            frozen = boottime_ns()
            self._freeze(strict=False)
            out = Outgoing(self.host, frozen)
            out.pause_all()
            self._end_streams()
            out.pause_failed_again()
            out.save_all()
            stranded = self.stranded.take_all()
            for vm_id, reason in out.failed.items():
                log.error("vm cannot be handed over: it ends with this daemon",
                          extra={"vm_id": vm_id, "error": reason})
            items = out.carried()
            manifest = out.manifest(stranded)
            try:
                self.files.write(manifest, items + stranded)
                fd_store({n: fd for item in items + stranded for n, fd in item.fds.items()})
            except (OSError, ValueError) as exc:
                log.error("the VMs could not be handed to systemd's fd store: they end with "
                          "this daemon", extra={"error": str(exc)})
                for item in items:
                    self.files.remove(item.vm_id)
                return False
            finally:
                for item in items + stranded:
                    item.close()
            log.info("vms handed to the fd store", extra={
                "vms": len(items), "stranded": len(stranded),
                "memfds": sum(len(i.memfds) for i in out.saved),
                "save_ms": round((out.saved_ns - out.frozen_ns) / 1e6, 1)})
            self.stranded.forget_all()
            return True

    def close_vms(self) -> None:
        """Close every VM (handed over: they never run here again) a few at a time: most
        of it is the kernel's teardown of each VM and its mappings."""
        vms = self.host.list_vms()
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvmd-close") as pool:
            list(pool.map(lambda vm: vm.close(), vms))

    @classmethod
    def for_config(cls, cfg: Config, host: Host) -> Handover:
        paths = unix_paths(cfg)
        return cls(host, runtime_dir(cfg), paths[0] if paths else None)

    def attach(self, hooks: DaemonHooks) -> None:
        self.hooks = hooks

    def _freeze(self, strict: bool) -> None:
        """Close the API: no new call; calls in flight finish (but long-lived streams);
        then VMs can be paused (remote exit handlers still answer) and streams end
        (`_end_streams`). With `strict`, calls that do not finish in time fail the
        hand-over (HandoverError)."""
        if self.hooks is None:
            return  # not serving yet: nothing to close
        self.hooks.close_api()
        self.hooks.end_migrations()  # a migrating VM is handed over as any other
        busy = self.hooks.calls_in_flight(DRAIN_SECONDS, long_lived=False)
        if busy:
            if strict:
                self.hooks.open_api()
                raise HandoverError(f"calls still in flight after {DRAIN_SECONDS:g} s: "
                                    f"{', '.join(sorted(busy))}")
            log.warning("calls still in flight at the hand-over", extra={
                "methods": ",".join(sorted(busy))})

    def _end_streams(self) -> None:
        if self.hooks is None:
            return
        self.hooks.end_streams()
        busy = self.hooks.calls_in_flight(DRAIN_SECONDS, long_lived=True)
        if busy:
            log.warning("streams still open at the hand-over", extra={
                "methods": ",".join(sorted(busy))})

    def _thaw(self) -> None:
        if self.hooks is not None:
            self.hooks.reopen_streams()
            self.hooks.open_api()

    # -- giving: take-over ---------------------------------------------------------------

    def _listen(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # ours: the main socket proved no daemon runs here
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            log.warning("no hand-over socket: --take-over cannot reach this daemon",
                        extra={"path": path, "error": exc.strerror})
            return
        finally:
            os.umask(old)
        sock.listen(2)
        self._listener = sock
        self._thread = threading.Thread(target=self._accept_loop, args=(sock, path),
                                        name="kvmd-handover", daemon=True)
        self._thread.start()

    def _accept_loop(self, sock: socket.socket, path: str) -> None:
        while not self._closing:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            try:
                if self._serve_take_over(Channel(conn)):
                    return
            except Exception:
                log.exception("hand-over failed")
            finally:
                conn.close()

    def stop_listening(self) -> None:
        self._closing = True
        sock, self._listener = self._listener, None
        if sock is not None:
            path = sock.getsockname()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            if isinstance(path, str) and path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _serve_take_over(self, chan: Channel) -> bool:
        """One new daemon asks for our VMs. True once they are its (we exit)."""
        ok, pid, uid = peer_allowed(chan.sock)
        if not ok:
            log.warning("hand-over refused: another user asked", extra={"pid": pid,
                                                                       "uid": uid})
            return False
        hello = chan.expect("hello", 30)
        if hello.get("version") != PROTOCOL_VERSION:
            chan.send_json({"op": "refused", "reason": f"hand-over protocol "
                            f"{hello.get('version')}, this daemon speaks {PROTOCOL_VERSION}"})
            return False
        if not self._lock.acquire(blocking=False):
            chan.send_json({"op": "refused", "reason": "another hand-over is in progress"})
            return False
        out: Outgoing | None = None
        committed = False
        try:
            log.info("handing over", extra={"to_pid": pid,
                                            "to_version": hello.get("kvmd_version", "")})
            chan.send_json({"op": "accepted"})
            frozen = boottime_ns()
            try:
                self._freeze(strict=True)
            except HandoverError as exc:
                chan.send_json({"op": "refused", "reason": str(exc)})
                return False
            out = Outgoing(self.host, frozen)
            out.pause_all()
            self._end_streams()
            out.save_all()
            if out.failed:
                reasons = "; ".join(f"{k}: {v}" for k, v in sorted(out.failed.items()))
                chan.send_json({"op": "refused", "reason": f"cannot hand over: {reasons}"})
                raise HandoverError(f"cannot hand over: {reasons}")
            stranded = self.stranded.take_all()
            try:
                manifest = out.manifest(stranded)
                chan.send_json({"op": "manifest", **manifest})
                for s in out.saved:
                    chan.send_json({"op": "vm", "vm_id": s.vm_id})
                    chan.send_blob(s.data)
                    chan.send_fds(s.memfds)
                for c in stranded:
                    chan.send_json({"op": "vm", "vm_id": c.vm_id})
                    if c.data:
                        chan.send_blob(c.data)
                    chan.send_fds(c.fds)
                chan.send_json({"op": "sent"})
            finally:
                for c in stranded:
                    c.close()
            verdict = chan.expect("restored", EXCHANGE_SECONDS)
            # The switch: from here on these VMs are the new daemon's and never run here.
            chan.send_json({"op": "commit"})
            committed = self.given_away = True
            failed = {k: v for k, v in verdict.get("results", {}).items() if v}
            log.info("vms handed over", extra={
                "vms": len(out.saved), "stranded_there": len(failed),
                "save_ms": round((out.saved_ns - out.frozen_ns) / 1e6, 1)})
            self.stranded.forget_all()
            self._closing = True
            self.stop_listening()
            assert self.hooks is not None
            self.hooks.release_listeners()
            with contextlib.suppress(OSError):
                chan.send_json({"op": "released"})
            self.hooks.handed_over()
            return True
        except (HandoverError, OSError, ValueError) as exc:
            if committed:
                log.exception("after the switch")
                return True
            log.error("hand-over failed: resuming the VMs and serving on",
                      extra={"error": str(exc)})
            if out is not None:
                out.resume()
            self._thaw()
            return False
        finally:
            self._lock.release()


def leave_placeholder(path: str) -> bool:
    """A socket file nobody listens on, where the daemon's socket was: clients connecting
    meanwhile get ECONNREFUSED rather than ENOENT, and retry (a daemon is coming back);
    the next daemon replaces it as stale. Mode 0660; whether it was made (not when
    something is at `path` already)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o117)
    try:
        sock.bind(path)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            log.debug("no placeholder socket", extra={"path": path, "error": exc.strerror})
        return False
    finally:
        os.umask(old)
        sock.close()
    return True


