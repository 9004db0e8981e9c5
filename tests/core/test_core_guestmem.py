"""The core of guest memory discard and file backing, without gRPC: names resolved strictly
inside the images directory (with openat2, and with the realpath fallback used where openat2
is missing or filtered), the start-up check of the directory, file identities, and
ManagedVm's records and "pages the guest has" on a real VM."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmd.core.errors import InvalidArgument, InvalidState, NotFound, PermissionDenied
from kvmd.core.host import Host
from kvmd.core.images import (
    FileIdentity,
    ImagesDir,
    MemoryFile,
    normalize_name,
    validate_images_dir,
)
from kvmd.core.limits import Limits
from kvmd.core.vm import VmOptions

P = 4096


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "images"
    r.mkdir(mode=0o750)
    (r / "a.img").write_bytes(b"a" * (4 * P))
    (r / "sub").mkdir()
    (r / "sub" / "b.img").write_bytes(b"b" * P)
    out = tmp_path / "out"
    out.mkdir()
    (out / "secret").write_bytes(b"s" * P)
    (r / "in-link").symlink_to("sub/b.img")
    (r / "out-link").symlink_to("../out/secret")
    (r / "abs-out").symlink_to(out / "secret")
    (r / "sub" / "dir-out").symlink_to("../../out")
    (r / "loop").symlink_to("loop")
    (r / "proc-magic").symlink_to("/proc/self/fd/0")
    return r


@pytest.fixture(params=["openat2", "fallback"])
def images(request: pytest.FixtureRequest, root: Path,
           monkeypatch: pytest.MonkeyPatch) -> ImagesDir:
    """The images directory, opened with openat2 or (as without it) the fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(ImagesDir, "_openat2", staticmethod(lambda *args: None))
    return ImagesDir(str(root))


def test_names_are_normalized_or_refused() -> None:
    assert normalize_name("a.img") == "a.img"
    assert normalize_name("./sub//b.img") == "sub/b.img"
    for bad in ["", "/etc/passwd", "../x", "sub/../a.img", "a\0b", ".", "./", "x" * 5000]:
        with pytest.raises(InvalidArgument):
            normalize_name(bad)


def test_files_inside_open_and_escapes_are_refused(images: ImagesDir, root: Path) -> None:
    with images.open("a.img", writable=True) as opened:
        assert opened.name == "a.img" and opened.writable
        assert opened.path == str(root / "a.img")
        assert opened.identity == FileIdentity.of(os.stat(root / "a.img"))
        fd = opened.fd
        assert os.pread(fd, 1, 0) == b"a"
    assert opened.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    with images.open("in-link", writable=False) as opened:    # a symlink that stays inside
        assert opened.identity.same_file(os.stat(root / "sub" / "b.img"))
        # Read-only means the descriptor cannot write (root could open it either way).
        assert fcntl.fcntl(opened.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    # A sibling directory whose name begins with the images directory's is still outside.
    sibling = root.parent / (root.name + "-evil")
    sibling.mkdir()
    (sibling / "secret").write_bytes(b"s" * P)
    (root / "sibling-link").symlink_to(f"../{sibling.name}/secret")
    for name in ("out-link", "sub/dir-out/secret", "proc-magic", "sibling-link"):
        with pytest.raises(PermissionDenied):
            images.open(name, writable=False)
    with pytest.raises(PermissionDenied):
        images.open("loop", writable=False)
    with pytest.raises(NotFound):
        images.open("missing.img", writable=False)
    with pytest.raises(InvalidArgument):
        images.open("sub", writable=False)            # a directory
    with pytest.raises(InvalidArgument):
        images.open("a.img/x", writable=False)        # a file used as a directory
    assert images.stat("a.img").st_size == 4 * P


def test_absolute_symlink_inside_is_refused_by_openat2(root: Path) -> None:
    # RESOLVE_BENEATH treats any absolute symlink as leaving the directory, even one that
    # points back inside; the fallback accepts it. Either way nothing outside opens.
    (root / "abs-in").symlink_to(root / "a.img")
    with pytest.raises(PermissionDenied):
        ImagesDir(str(root)).open("abs-in", writable=False)
    with pytest.raises(PermissionDenied):
        ImagesDir(str(root)).open("abs-out", writable=False)


def test_missing_directory_is_a_failed_precondition(tmp_path: Path) -> None:
    with pytest.raises(InvalidState):
        ImagesDir(str(tmp_path / "nope")).open("a.img", writable=False)


def test_images_dir_start_up_check(tmp_path: Path) -> None:
    assert validate_images_dir(str(tmp_path), required=True) is None
    assert validate_images_dir(str(tmp_path / "missing"), required=False) is None
    assert "does not exist" in str(validate_images_dir(str(tmp_path / "missing"),
                                                       required=True))
    assert "absolute" in str(validate_images_dir("images", required=False))
    (tmp_path / "f").write_bytes(b"")
    assert "not a directory" in str(validate_images_dir(str(tmp_path / "f"), required=False))
    (tmp_path / "ww").mkdir()
    os.chmod(tmp_path / "ww", 0o777)
    assert "everyone" in str(validate_images_dir(str(tmp_path / "ww"), required=False))


@pytest.fixture
def host(root: Path) -> Iterator[Host]:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is absent: the core tests drive real VMs")
    h = Host(Limits(max_vms=4), images_dir=str(root))
    yield h
    h.close()


def test_guest_pages_and_allocated_bytes_are_one_notion(host: Host) -> None:
    vm = host.create_vm("pages", {}, VmOptions())
    slot = vm.add_memory_region(0, 64 * P, False, False).slot
    file_slot = vm.add_file_memory_region(0x100000, 4 * P, False, False,
                                          MemoryFile("a.img")).slot
    assert vm.guest_pages(slot) == [] and vm.slot_allocated_bytes(slot) == 0
    vm.write_memory(3 * P, b"\x01")
    vm.write_memory(10 * P, bytes(2 * P))             # populated, but zeros
    assert vm.guest_pages(slot) == [(3 * P, P), (10 * P, 2 * P)]
    assert [run for lo, n in vm.guest_pages(slot)
            for run in vm.data_pages_within(slot, lo, n)] == [(3 * P, P)]
    assert vm.slot_allocated_bytes(slot) == 3 * P == vm.memory_allocated_bytes()
    assert vm.discard_memory(0, 16 * P) == 3 * P
    assert vm.guest_pages(slot) == [] and vm.memory_allocated_bytes() == 0
    assert vm.discarded_bytes_total == 3 * P
    # A file-backed slot holds none of the daemon's memory: its pages are the file's.
    assert vm.guest_pages(file_slot) == [] and vm.slot_allocated_bytes(file_slot) == 0
    with pytest.raises(NotFound):
        vm.guest_pages(9)


def test_file_backed_ranges_record_what_snapshots_need(host: Host, root: Path) -> None:
    vm = host.create_vm("files", {}, VmOptions())
    slot = vm.add_memory_region(0, 16 * P, True, False).slot
    info = vm.add_file_memory_region(0x100000, 2 * P, False, False,
                                     MemoryFile("./a.img", offset=2 * P, read_only=True))
    assert info.read_only                            # a read-only file: a read-only slot
    mapping = vm.map_file(slot, 4 * P, P, MemoryFile("in-link"))
    part, whole = vm.file_backed_ranges()             # by guest address
    assert (whole.slot, whole.guest_addr, whole.offset, whole.size, whole.image,
            whole.file_offset, whole.writable, whole.whole_slot) == (
        info.slot, 0x100000, 0, 2 * P, "a.img", 2 * P, False, True)
    assert whole.identity.same_file(os.stat(root / "a.img"))
    assert part == mapping
    assert (part.image, part.offset, part.size, part.writable, part.whole_slot) == (
        "in-link", 4 * P, P, True, False)
    assert part.identity.same_file(os.stat(root / "sub" / "b.img"))
    assert vm.region_files(slot) == [part]
    vm.remove_memory_region(info.slot)
    assert vm.file_backed_ranges() == [part]
    assert vm.unmap_file(slot, 4 * P, P) == part
    assert vm.file_backed_ranges() == []


def test_the_budget_credits_a_discard_while_the_pages_stay_free(host: Host) -> None:
    budget = host.budget
    vm = host.create_vm("credit", {}, VmOptions())
    slot = vm.add_memory_region(0, 64 * P, False, False).slot
    vm.write_memory(0, b"\x01" * (32 * P))            # 32 of 64 pages allocated
    assert vm.discard_memory(0, 16 * P) == 16 * P
    assert (budget.in_use, budget.credited) == (48 * P, 16 * P)
    # Pages never touched before do not eat the credit while the slot has room for it...
    vm.write_memory(32 * P, b"\x02" * (16 * P))       # 32 allocated
    assert (budget.in_use, budget.credited) == (48 * P, 16 * P)
    # ...beyond that the kernel cannot tell them from discarded ones: charged again.
    vm.write_memory(0, b"\x03" * (8 * P))             # 40 allocated: 24 free
    assert (budget.in_use, budget.credited) == (48 * P, 16 * P)
    vm.write_memory(8 * P, b"\x03" * (8 * P))         # 48 allocated: 16 free
    assert (budget.in_use, budget.credited) == (48 * P, 16 * P)
    vm.write_memory(48 * P, b"\x03" * (8 * P))        # 56 allocated: 8 free
    assert (budget.in_use, budget.credited) == (56 * P, 8 * P)
    # The credit does not come back when pages are freed other than by a discard...
    assert vm.discard_memory(0, 8 * P) == 8 * P       # ...and a discard adds what it freed
    assert (budget.in_use, budget.credited) == (48 * P, 16 * P)
    vm.remove_memory_region(slot)
    assert (budget.in_use, budget.credited) == (0, 0)
