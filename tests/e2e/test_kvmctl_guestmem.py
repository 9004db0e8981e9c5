"""kvmctl and the client library against a kvmd process with an images directory:
`mem discard` (the daemon process's RSS and the memfd's allocation drop by the 64 MiB
discarded), `mem add --file`, `mem map`, `mem sync`, `mem unmap`, and refusals with their
status codes and exit codes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kvmctl_support import Result, ok

from kvmd_client import (
    FailedPreconditionError,
    InvalidArgumentError,
    KvmdClient,
    NotFoundError,
    PermissionDeniedError,
)
from kvmd_client.kvmctl import main

P = 4096
MiB = 1 << 20
DATA = 0x400000


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir(mode=0o750)
    (root / "disk.img").write_bytes(b"".join(bytes([0x40 + i]) * P for i in range(16)))
    (tmp_path / "outside.img").write_bytes(b"\x55" * (16 * P))
    (root / "escape.img").symlink_to("../outside.img")
    return root


@pytest.fixture
def daemon(start_kvmd: Callable[..., Any], images: Path) -> Any:
    """A kvmd process of this test (conftest.Daemon) with the images directory."""
    return start_kvmd("--images-dir", str(images))


@pytest.fixture
def run(daemon: Any, capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """kvmctl, in-process, against the daemon with the images directory."""

    def kvmctl(*args: str) -> Result:
        capsys.readouterr()
        code = main(["--address", daemon.address, *args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return kvmctl


@pytest.fixture
def client(daemon: Any) -> Iterator[KvmdClient]:
    with KvmdClient(daemon.address, timeout=30) as c:
        yield c


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def refused(result: Result, code: str) -> None:
    assert result.code == 1, (result.code, result.err)
    assert result.err.startswith(f"error: {code}"), result.err


def test_mem_discard_releases_the_host_memory(run: Callable[..., Result], daemon: Any,
                                          tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert daemon.proc is not None
    big = tmp_path / "fill.bin"
    big.write_bytes(b"\xa5" * (64 * MiB))
    ok(run("vm", "create", "bal"))
    ok(run("mem", "add", "bal", hex(DATA), "64M"))
    ok(run("mem", "write", "bal", hex(DATA), "--file", str(big)))
    big.unlink()
    [region] = ok(run("mem", "ls", "bal", "--json")).json()
    before = region["allocated_bytes"]
    assert before >= 64 * MiB
    out = ok(run("mem", "discard", "bal", hex(DATA), "64M", "--json")).json()
    [region] = ok(run("mem", "ls", "bal", "--json")).json()
    after = region["allocated_bytes"]
    with capsys.disabled():
        print(f"\nkvmctl mem discard 64M: released {out['released_bytes']}; the slot's memfd "
              f"{before} -> {after} bytes (the daemon's RSS for guest-touched memory: "
              "tests/api/test_api_guestmem.py)")
    assert out["released_bytes"] >= 63 * MiB
    assert before - after == out["released_bytes"]
    vm = ok(run("vm", "get", "bal", "--json")).json()
    assert vm["discarded_bytes"] == out["released_bytes"]
    assert vm["memory_allocated_bytes"] < MiB
    assert "discarded" in ok(run("vm", "get", "bal")).out
    data = ok(run("mem", "read", "bal", hex(DATA + 40 * MiB), "-n", "16", "--json")).json()
    assert data["data"] == "00" * 16
    text = ok(run("mem", "discard", "bal", hex(DATA), "4K")).out
    assert text.startswith(f"discarded {hex(DATA)}+4 KiB in vm bal")
    refused(run("mem", "discard", "bal", hex(DATA + 1), "4K"), "INVALID_ARGUMENT")
    refused(run("mem", "discard", "bal", "0x0", "4K"), "INVALID_ARGUMENT")
    refused(run("mem", "discard", "nope", hex(DATA), "4K"), "NOT_FOUND")


def test_mem_add_map_sync_unmap_with_files(run: Callable[..., Result], images: Path) -> None:
    ok(run("vm", "create", "files"))
    r = ok(run("mem", "add", "files", "0x0", "16K", "--file", "disk.img", "--offset", "0x4000",
               "--json")).json()
    assert r["file"] == {"name": "disk.img", "offset": 0x4000, "read_only": False}
    assert "file=disk.img" in ok(run("mem", "ls", "files")).out
    ok(run("mem", "write", "files", "0x10", "--data-hex", "99"))
    assert "synced 16 KiB" in ok(run("mem", "sync", "files", "0")).out
    assert (images / "disk.img").read_bytes()[0x4010] == 0x99
    ro = ok(run("mem", "add", "files", "0x10000", "8K", "--file", "disk.img", "--read-only",
                "--json")).json()
    assert ro["read_only"] and ro["file"]["read_only"]
    refused(run("mem", "write", "files", "0x10000", "--data-hex", "01"), "FAILED_PRECONDITION")
    ok(run("mem", "add", "files", "0x20000", "64K"))
    m = ok(run("mem", "map", "files", "2", "0x1000", "8K", "--file", "disk.img",
               "--file-offset", "0x8000", "--json")).json()
    assert (m["slot"], m["offset"], m["size"], m["guest_addr"]) == (2, 0x1000, 0x2000, 0x21000)
    assert "files-mapped=1" in ok(run("mem", "ls", "files")).out
    ok(run("mem", "write", "files", "0x21000", "--data-hex", "7778"))
    out = ok(run("mem", "sync", "files", "2", "--offset", "0x1000", "--size", "4K",
                 "--json")).json()
    assert out["synced_bytes"] == P
    assert (images / "disk.img").read_bytes()[0x8000:0x8002] == b"\x77\x78"
    text = ok(run("mem", "unmap", "files", "2", "0x1000", "8K")).out
    assert text.startswith("unmapped slot 2 0x1000+8 KiB (guest 0x21000): disk.img")
    data = ok(run("mem", "read", "files", "0x21000", "-n", "2", "--json")).json()
    assert data["data"] == "0000"
    refused(run("mem", "unmap", "files", "2", "0x1000", "8K"), "NOT_FOUND")
    refused(run("mem", "sync", "files", "2"), "FAILED_PRECONDITION")


def test_file_refusals(run: Callable[..., Result]) -> None:
    ok(run("vm", "create", "nofile"))
    for name, code in (("../outside.img", "INVALID_ARGUMENT"),
                       ("/etc/passwd", "INVALID_ARGUMENT"),
                       ("escape.img", "PERMISSION_DENIED"),
                       ("missing.img", "NOT_FOUND")):
        refused(run("mem", "add", "nofile", "0x0", "4K", "--file", name), code)
    refused(run("mem", "add", "nofile", "0x0", "128K", "--file", "disk.img"),
            "INVALID_ARGUMENT")                       # the file is shorter than the region
    assert ok(run("mem", "ls", "nofile", "--json")).json() == []
    # Usage errors never reach the daemon.
    assert run("mem", "add", "nofile", "0x0", "4K", "--offset", "4096").code == 2
    assert run("mem", "map", "nofile", "0", "0", "4K").code == 2      # --file is required
    assert ok(run("vm", "get", "nofile", "--json")).json()["memory_slot_count"] == 0


def test_client_library(client: KvmdClient, images: Path) -> None:
    client.create_vm("lib")
    slot = client.add_memory_region("lib", DATA, 16 * P).slot
    client.write_memory("lib", DATA, b"\x01" * (16 * P))
    assert client.discard_guest_memory("lib", DATA, 4 * P) == 4 * P
    assert client.get_vm("lib").discarded_bytes == 4 * P
    m = client.map_guest_memory("lib", slot, 8 * P, P, "disk.img", file_offset=2 * P)
    assert m.file.name == "disk.img" and m.guest_addr == DATA + 8 * P
    assert client.read_memory("lib", DATA + 8 * P, 1) == b"\x42"
    assert client.sync_guest_memory("lib", slot) == P
    assert client.unmap_guest_memory("lib", slot, 8 * P, P) == m
    region = client.add_memory_region("lib", 0, 2 * P, file="disk.img", file_offset=P,
                                      read_only=True)
    assert region.read_only and region.file.offset == P
    with pytest.raises(ValueError):
        client.add_memory_region("lib", 0x800000, P, file_offset=P)
    with pytest.raises(InvalidArgumentError):
        client.discard_guest_memory("lib", DATA + 1, P)
    with pytest.raises(FailedPreconditionError):
        client.discard_guest_memory("lib", 0, P)           # the file-backed slot
    with pytest.raises(PermissionDeniedError):
        client.map_guest_memory("lib", slot, 0, P, "escape.img")
    with pytest.raises(NotFoundError):
        client.unmap_guest_memory("lib", slot, 0, P)
    client.delete_vm("lib")
