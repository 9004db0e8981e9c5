"""Guest memory discard and files, deployed: who may call DiscardGuestMemory,
MapGuestMemory, UnmapGuestMemory, SyncGuestMemory and AddMemoryRegion with a file (admins
and the owning operator, over mTLS; never a viewer nor another operator), the rule table
itself, and the console script refusing a bad --images-dir (exit 2, one line)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from deploy_support import RPC_TIMEOUT, Stubs, TlsDaemon, codes, run_kvmd

from kvmd.api.auth import HOST_METHODS, READ_ONLY_METHODS, Authorizer, Policy
from kvmd.core.errors import NotFound, PermissionDenied
from kvmd_proto import vmm_pb2 as pb

P = 4096
DATA = 0x100000
OK, DENIED = "OK", "PERMISSION_DENIED"
GUESTMEM_METHODS = ("Memory/DiscardGuestMemory", "Memory/MapGuestMemory",
                    "Memory/UnmapGuestMemory", "Memory/SyncGuestMemory")
POLICY: list[dict[str, Any]] = [
    {"name": "admin-1", "role": "admin"},
    {"name": "operator-a", "role": "operator"},
    {"name": "operator-b", "role": "operator"},
    {"name": "viewer-1", "role": "viewer"},
]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir(mode=0o750)
    (root / "disk.img").write_bytes(b"\x40" * (16 * P))
    return root


@pytest.fixture
def d(tls_daemon: Callable[..., TlsDaemon], images: Path) -> TlsDaemon:
    return tls_daemon(policy=POLICY, images_dir=str(images))


def guestmem_calls(s: Stubs, vm_id: str) -> dict[str, Callable[[], Any]]:
    """One call of each guest-memory RPC on `vm_id` (slot 0: 16 pages at DATA, with
    disk.img mapped at its page 8 by `prepare`). In order, each succeeds for an allowed
    caller."""
    t = RPC_TIMEOUT
    disk = pb.MemoryFile(name="disk.img")
    return {
        "Memory/AddMemoryRegion+file": lambda: s.memory.AddMemoryRegion(
            pb.AddMemoryRegionRequest(vm_id=vm_id, guest_addr=0x200000, size=4 * P,
                                      file=disk), timeout=t),
        "Memory/DiscardGuestMemory": lambda: s.memory.DiscardGuestMemory(
            pb.DiscardGuestMemoryRequest(vm_id=vm_id, guest_addr=DATA, size=4 * P),
            timeout=t),
        "Memory/MapGuestMemory": lambda: s.memory.MapGuestMemory(
            pb.MapGuestMemoryRequest(vm_id=vm_id, slot=0, offset=0, size=P, file=disk),
            timeout=t),
        "Memory/SyncGuestMemory": lambda: s.memory.SyncGuestMemory(
            pb.SyncGuestMemoryRequest(vm_id=vm_id, slot=0), timeout=t),
        "Memory/UnmapGuestMemory": lambda: s.memory.UnmapGuestMemory(
            pb.UnmapGuestMemoryRequest(vm_id=vm_id, slot=0, offset=8 * P, size=P),
            timeout=t),
    }


def prepare(s: Stubs, vm_id: str) -> None:
    s.create_vm(vm_id)
    s.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(vm_id=vm_id, guest_addr=DATA,
                                                       size=16 * P), timeout=RPC_TIMEOUT)
    s.memory.MapGuestMemory(pb.MapGuestMemoryRequest(
        vm_id=vm_id, slot=0, offset=8 * P, size=P, file=pb.MemoryFile(name="disk.img")),
        timeout=RPC_TIMEOUT)


def state(s: Stubs, vm_id: str) -> Any:
    regions = s.memory.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm_id=vm_id),
                                         timeout=RPC_TIMEOUT).regions
    vm = s.get_vm(vm_id)
    return [r.SerializeToString() for r in regions], vm.discarded_bytes


def test_owning_operator_and_admin_may(d: TlsDaemon) -> None:
    a, admin = d.tls("operator-a"), d.tls("admin-1")
    prepare(a, "vm-a")
    assert codes(guestmem_calls(a, "vm-a")) == dict.fromkeys(
        guestmem_calls(a, "vm-a"), OK)
    # An admin may act on an operator's VM too.
    prepare(a, "vm-a2")
    assert codes(guestmem_calls(admin, "vm-a2")) == dict.fromkeys(
        guestmem_calls(admin, "vm-a2"), OK)
    assert len(a.memory.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm_id="vm-a2"),
                                          timeout=RPC_TIMEOUT).regions) == 2


@pytest.mark.parametrize("who", ["viewer-1", "operator-b"])
def test_viewer_and_other_operator_are_refused(d: TlsDaemon, images: Path, who: str) -> None:
    a, other = d.tls("operator-a"), d.tls(who)
    prepare(a, "vm-a")
    before = state(a, "vm-a")
    results = codes(guestmem_calls(other, "vm-a"))
    # Another operator's VM does not exist for it (NOT_FOUND, as a missing VM).
    assert results == dict.fromkeys(results, DENIED if who == "viewer-1" else "NOT_FOUND")
    assert state(a, "vm-a") == before
    assert (images / "disk.img").read_bytes() == b"\x40" * (16 * P)
    # A viewer may still read the regions, files included; another operator may not.
    code = codes({"list": lambda: other.memory.ListMemoryRegions(
        pb.ListMemoryRegionsRequest(vm_id="vm-a"), timeout=RPC_TIMEOUT)})["list"]
    assert code == (OK if who == "viewer-1" else "NOT_FOUND")


class _Host:
    """Just enough of Host for the Authorizer: VMs and their owners."""

    def __init__(self, owners: dict[str, str]) -> None:
        self.owners = owners

    def get_vm(self, vm_id: str) -> Any:
        return type("Vm", (), {"owner": self.owners[vm_id]})()

    def owner_of(self, vm_id: str) -> str | None:
        return self.owners.get(vm_id)


def test_rule_table_for_the_new_methods() -> None:
    for method in GUESTMEM_METHODS:
        assert method not in READ_ONLY_METHODS and method not in HOST_METHODS
    policy = Policy.from_config({"identities": POLICY})
    authz = Authorizer(policy, _Host({"vm-a": "operator-a"}))  # type: ignore[arg-type]
    grants = {name: policy.grants[name] for name in ("admin-1", "operator-a", "operator-b",
                                                     "viewer-1")}
    requests = {
        "Memory/DiscardGuestMemory": pb.DiscardGuestMemoryRequest(vm_id="vm-a"),
        "Memory/MapGuestMemory": pb.MapGuestMemoryRequest(vm_id="vm-a"),
        "Memory/UnmapGuestMemory": pb.UnmapGuestMemoryRequest(vm_id="vm-a"),
        "Memory/SyncGuestMemory": pb.SyncGuestMemoryRequest(vm_id="vm-a"),
        "Memory/AddMemoryRegion": pb.AddMemoryRegionRequest(
            vm_id="vm-a", file=pb.MemoryFile(name="disk.img")),
    }
    for method, request in requests.items():
        full = f"/kvmd.v1.{method}"
        for name in ("admin-1", "operator-a"):
            authz.check(full, grants[name], name, request)
        with pytest.raises(PermissionDenied):
            authz.check(full, grants["viewer-1"], "viewer-1", request)
        with pytest.raises(NotFound):  # another tenant's VM: as if it did not exist
            authz.check(full, grants["operator-b"], "operator-b", request)
        with pytest.raises(PermissionDenied):
            authz.check(full, None, "stranger", request)
        with pytest.raises(PermissionDenied):    # an operator must name the VM
            authz.check(full, grants["operator-a"], "operator-a", type(request)())
    # Reading the regions (and their files) stays a viewer's right.
    authz.check("/kvmd.v1.Memory/ListMemoryRegions", grants["viewer-1"], "viewer-1",
                pb.ListMemoryRegionsRequest(vm_id="vm-a"))


def test_console_script_refuses_a_bad_images_dir(short_dir: Path) -> None:
    sock = f"{short_dir}/kvmd.sock"
    (short_dir / "file").write_bytes(b"")
    for value, words in (("relative/images", ["images_dir", "absolute"]),
                         (str(short_dir / "missing"), ["images_dir", "does not exist"]),
                         (str(short_dir / "file"), ["images_dir", "not a directory"])):
        result: subprocess.CompletedProcess[str] = run_kvmd(
            "--listen", f"unix://{sock}", "--metrics-listen", "off", "--images-dir", value,
            socket_path=sock)
        err = result.stderr.strip()
        assert result.returncode == 2, (result.returncode, result.stderr)
        assert len(err.splitlines()) == 1 and err.startswith("kvmd: "), err
        for word in words:
            assert word in err, (word, err)
