"""End-to-end tests of kvmctl against the kvmd process.

Most tests call ``kvmd_client.kvmctl.main([...])`` in-process (output captured with capsys); the
``test_subprocess_*`` tests run the installed ``kvmctl`` console script for real.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from guests import PIC_VECTOR_BASE
from interrupt_guests import COUNTERS, LAPIC_BASE, READY, counter_program, counts, lapic_enabled
from kvmctl_support import Kvmctl, kvmctl_command, ok
from polling import wait_until

from kvmd_client import KvmdClient
from kvmd_client._convert import message_to_dict
from kvmd_client.kvmctl import COMMANDS, build_parser, main, to_json
from kvmd_proto import vmm_pb2

Healthy = Callable[[], None]


@pytest.fixture
def vm(vm_id: str, kvmctl: Kvmctl) -> str:
    """A VM with an in-kernel irqchip and 1 MiB of memory at 0 (slot 0, dirty logging)."""
    ok(kvmctl("vm", "create", vm_id, "--irqchip"))
    ok(kvmctl("mem", "add", vm_id, "0", "1M", "--log-dirty"))
    return vm_id


# ---------------------------------------------------------------------------------------------
# help and usage


def _command_paths(parser: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:  # aliases
                    continue
                seen.add(id(sub))
                yield (*prefix, name)
                yield from _command_paths(sub, (*prefix, name))


ALL_COMMANDS = list(_command_paths(build_parser()))


def test_every_command_is_there() -> None:
    names = {" ".join(p) for p in ALL_COMMANDS}
    for expected in [
        "info", "vm create", "vm get", "vm list", "vm delete",
        "mem add", "mem rm", "mem ls", "mem write", "mem read", "dirty-log",
        "irq line", "irq route", "irq msi", "irq irqfd-add", "irq irqfd-trigger",
        "irq irqfd-rm", "irq irqfd-ls", "irq watch-resamples",
        "ioevent add", "ioevent rm", "ioevent ls", "ioevent watch",
        "vcpu create", "vcpu ls", "vcpu regs", "vcpu set-regs", "vcpu sregs", "vcpu fpu",
        "vcpu cpuid", "vcpu msrs", "vcpu mpstate", "vcpu lapic", "vcpu events",
        "vm start", "vm pause", "vm resume", "vm stop", "vm watch", "vm wait", "vm stats",
        "vm console", "vm console-write", "vcpu start", "vcpu pause", "vcpu resume",
        "vcpu stop", "vcpu state", "vcpu inject",
    ]:  # fmt: skip
        assert expected in names


def test_each_command_is_one_declaration() -> None:
    """Every command is one entry of COMMANDS with a call (output declared) or a run of its
    own, not both; the parser is built from the table, one sub-parser per entry."""
    paths = [command.path for command in COMMANDS]
    assert len(paths) == len(set(paths))
    for command in COMMANDS:
        assert (command.call is None) != (command.run is None), command.path
    assert set(paths) <= {" ".join(p) for p in ALL_COMMANDS}


def test_the_json_view_is_derived_from_the_result() -> None:
    region = vmm_pb2.MemoryRegion(slot=1, guest_addr=0x1000, size=4096)
    assert to_json({"regions": [region], "data": b"\x01\xff", "pair": (1, "x"), "n": 3}) == {
        "regions": [message_to_dict(region)], "data": "01ff", "pair": [1, "x"], "n": 3}
    assert to_json(region) == message_to_dict(region)


@pytest.mark.parametrize("path", [(), *ALL_COMMANDS], ids=lambda p: " ".join(p) or "kvmctl")
def test_help_everywhere(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kvmctl")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["vm"],
        ["vm", "create"],
        ["vm", "create", "x", "--label", "novalue"],
        ["vm", "create", "x", "--label", "=value"],             # an empty key
        ["mem", "add", "x", "0xZZ", "4096"],
        ["mem", "add", "x", "0", "-5"],
        ["mem", "write", "x", "0"],
        ["mem", "write", "x", "0", "--data-hex", "abc"],
        ["mem", "read", "x", "0"],
        ["irq", "line", "x", "4", "sideways"],
        ["irq", "route", "x", "--irqchip", "0:nochip:1"],
        ["vcpu", "set-regs", "x", "0"],
        ["vcpu", "set-regs", "x", "0", "rip"],
        ["vcpu", "mpstate", "x", "0", "dancing"],
        ["--timeout", "soon", "info"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "usage:" in captured.err or "error:" in captured.err


def test_a_negative_number_is_a_usage_error_before_any_call(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vcpu", "create", "x", "-1"]) == 2
    assert "must not be negative: '-1'" in capsys.readouterr().err


def test_usage_errors_found_after_parsing(kvmctl: Kvmctl, vm: str) -> None:
    ok(kvmctl("vcpu", "create", vm, "0"))
    result = kvmctl("vcpu", "set-regs", vm, "0", "rpi=0x1000")  # no such register
    assert result.code == 2
    assert "rpi" in result.err
    result = kvmctl("vcpu", "sregs", vm, "0", "cs.base=notanumber")
    assert result.code == 2
    result = kvmctl("vcpu", "sregs", vm, "0", "cs=5")  # a segment given a number
    assert result.code == 2
    assert "takes a mapping" in result.err and "Traceback" not in result.err
    assert kvmctl("irq", "route", vm).code == 2  # an empty table needs --clear


# ---------------------------------------------------------------------------------------------
# exit codes for server errors and an unreachable daemon


def test_not_found_exits_1(kvmctl: Kvmctl, assert_healthy: Healthy) -> None:
    result = kvmctl("vm", "get", "no-such-vm")
    assert result.code == 1
    assert result.out == ""
    assert result.err.startswith("error: NOT_FOUND (VM_NOT_FOUND): ")
    assert "no-such-vm" in result.err
    assert kvmctl("vm", "delete", "no-such-vm").code == 1
    assert kvmctl("mem", "ls", "no-such-vm").code == 1
    assert_healthy()


def test_server_errors_exit_1(kvmctl: Kvmctl, vm: str, assert_healthy: Healthy) -> None:
    result = kvmctl("vm", "create", vm)
    assert (result.code, result.err.split(":")[:2]) == (
        1, ["error", " ALREADY_EXISTS (VM_ALREADY_EXISTS)"])
    result = kvmctl("mem", "add", vm, "0x1001", "4096")
    assert result.code == 1
    assert result.err.startswith("error: INVALID_ARGUMENT (ADDRESS_UNALIGNED): ")
    result = kvmctl("vm", "create", "bad/name")
    assert result.err.startswith("error: INVALID_ARGUMENT (ID_INVALID): ")
    assert_healthy()


def test_unreachable_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--address", f"unix://{tmp_path}/nobody.sock", "vm", "list"])
    err = capsys.readouterr().err
    assert code == 3
    assert err.startswith("error: UNAVAILABLE: ")


# ---------------------------------------------------------------------------------------------
# commands


def test_info(kvmctl: Kvmctl) -> None:
    text = ok(kvmctl("info")).out
    assert "KVM API version  12" in text
    assert "KVM_CAP_IRQFD" in text
    assert "limits:" in text
    data = ok(kvmctl("info", "--json")).json()
    assert data["api_version"] == 12
    assert data["capabilities"]["KVM_CAP_IRQFD"] > 0
    assert isinstance(data["limits"]["max_memory_total_bytes"], int)
    everything = ok(kvmctl("info", "--all")).out
    assert len(everything.splitlines()) >= len(text.splitlines())
    # global options work before the subcommand as well as after it
    assert ok(kvmctl("--json", "info")).json()["api_version"] == 12


def test_cap_and_supported_cpuid(kvmctl: Kvmctl) -> None:
    assert ok(kvmctl("cap", "irqfd")).out.startswith("irqfd: ")
    assert ok(kvmctl("cap", "KVM_CAP_IRQFD", "--json")).json()["value"] > 0
    assert ok(kvmctl("cap", "32", "--json")).json()["value"] > 0
    entries = ok(kvmctl("supported-cpuid", "--json")).json()
    assert any(e["function"] == 0 for e in entries)
    assert "FUNCTION" in ok(kvmctl("supported-cpuid")).out


def test_vm_create_list_get_delete(kvmctl: Kvmctl, vm_ids: Callable[[], str]) -> None:
    a, b = vm_ids(), vm_ids()
    text = ok(kvmctl("vm", "create", a, "--label", "team=infra", "-l", "env=dev",
                     "--irqchip", "--pit")).out
    assert f"vm            {a}" in text
    assert "irqchip,pit" in text
    created = ok(kvmctl("vm", "create", b, "--json")).json()
    assert created["vm_id"] == b and created["state"] == "created"

    table = ok(kvmctl("vm", "list")).out.splitlines()
    assert table[0].split()[:3] == ["VM", "STATE", "VCPUS"]
    assert any(line.startswith(a + " ") for line in table)
    listed = ok(kvmctl("vm", "ls", "--label", "team=infra", "--json")).json()
    assert [v["vm_id"] for v in listed] == [a]
    assert listed[0]["labels"] == {"team": "infra", "env": "dev"}
    assert listed[0]["options"]["irqchip"] is True

    got = ok(kvmctl("vm", "get", a, "--json")).json()
    assert got["vm_id"] == a and got["options"]["pit"] is True
    assert "env=dev,team=infra" in ok(kvmctl("vm", "get", a)).out

    assert ok(kvmctl("vm", "delete", a, b)).out.splitlines() == [
        f"deleted vm {a}", f"deleted vm {b}"]
    assert kvmctl("vm", "get", a).code == 1
    assert ok(kvmctl("vm", "list", "--label", "team=infra")).out.strip() == "No VMs."


def test_mem_add_ls_rm(kvmctl: Kvmctl, vm_id: str) -> None:
    ok(kvmctl("vm", "create", vm_id))
    region = ok(kvmctl("mem", "add", vm_id, "0x0", "2M", "--json")).json()
    assert region == {"slot": 0, "guest_addr": 0, "size": 2 << 20, "read_only": False,
                      "log_dirty": False, "allocated_bytes": 0, "mappings": [],
                      "file": {"name": "", "offset": 0, "read_only": False}}
    text = ok(kvmctl("mem", "add", vm_id, "0x400000", "16K", "--read-only")).out
    assert "read-only" in text and "16 KiB" in text
    ok(kvmctl("mem", "add", vm_id, "8388608", "4096", "--log-dirty"))
    table = ok(kvmctl("mem", "ls", vm_id)).out.splitlines()
    assert table[0].split() == ["SLOT", "GUEST", "ADDR", "LAST", "ADDR", "SIZE", "FLAGS"]
    assert len(table) == 4
    assert "0x000000400000" in table[2] and "0x000000403fff" in table[2]
    regions = ok(kvmctl("mem", "ls", vm_id, "--json")).json()
    assert [r["slot"] for r in regions] == [0, 1, 2]
    assert ok(kvmctl("mem", "rm", vm_id, "1")).out.startswith("removed slot 1 (0x400000")
    assert [r["slot"] for r in ok(kvmctl("mem", "ls", vm_id, "--json")).json()] == [0, 2]
    assert kvmctl("mem", "rm", vm_id, "1").code == 1


def test_mem_write_read_roundtrip(kvmctl: Kvmctl, vm: str, tmp_path: Path) -> None:
    written = ok(kvmctl("mem", "write", vm, "0x1000", "--data-hex", "b8 34 12 a3 00 40 f4"))
    assert written.out.startswith("wrote 7 bytes")
    dump = ok(kvmctl("mem", "read", vm, "0x1000", "--length", "16")).out.splitlines()
    assert dump[0].startswith("00001000  b8 34 12 a3 00 40 f4 00")
    assert dump[-1] == "00001010"
    data = ok(kvmctl("mem", "read", vm, "0x1000", "-n", "7", "--json")).json()
    assert data == {"vm_id": vm, "guest_addr": 0x1000, "length": 7, "data": "b83412a30040f4"}

    payload = os.urandom(300 * 1024 + 5)
    src = tmp_path / "in.bin"
    src.write_bytes(payload)
    result = ok(kvmctl("mem", "write", vm, "0x20000", "--file", str(src), "--json"))
    assert result.json()["bytes_written"] == len(payload)
    dst = tmp_path / "out.bin"
    ok(kvmctl("mem", "read", vm, "0x20000", "--length", str(len(payload)), "--out", str(dst)))
    assert dst.read_bytes() == payload


def test_mem_errors(kvmctl: Kvmctl, vm: str, tmp_path: Path, assert_healthy: Healthy) -> None:
    result = kvmctl("mem", "read", vm, "0xffffc", "--length", "8")  # straddles the end
    assert result.code == 1
    assert result.err.startswith("error: INVALID_ARGUMENT (RANGE_OUTSIDE_MEMORY): ")
    result = kvmctl("mem", "write", vm, "0", "--file", str(tmp_path / "missing.bin"))
    assert result.code == 1 and "missing.bin" in result.err
    assert_healthy()


def test_dirty_log(kvmctl: Kvmctl, vm: str) -> None:
    ok(kvmctl("mem", "write", vm, "0x3000", "--data-hex", "ff"))  # host writes stay clean
    assert ok(kvmctl("dirty-log", vm, "0")).out.strip() == "slot 0: 0 of 256 pages dirty"
    data = ok(kvmctl("dirty-log", vm, "0", "--json")).json()
    assert data == {"vm_id": vm, "slot": 0, "dirty_count": 0, "total_pages": 256, "pages": []}
    # --stream reads the same log through GetDirtyLog's chunks instead of PollDirtyLog.
    assert ok(kvmctl("dirty-log", vm, "0", "--stream", "--json")).json() == data
    assert kvmctl("dirty-log", vm, "7").code == 1
    assert kvmctl("dirty-log", vm, "7", "--stream").code == 1


def test_irqfds(kvmctl: Kvmctl, vm: str) -> None:
    added = ok(kvmctl("irq", "irqfd-add", vm, "net0", "5", "--json")).json()
    assert added == {"vm_id": vm, "irqfd_id": "net0", "gsi": 5, "resample": False,
                     "triggers": 0, "resamples": 0}
    assert "yes" in ok(kvmctl("irq", "irqfd-add", vm, "blk0", "0x0a", "--resample")).out
    assert ok(kvmctl("irq", "irqfd-trigger", vm, "net0")).out.strip() == "triggered irqfd net0"
    ok(kvmctl("irq", "irqfd-trigger", vm, "net0", "--count", "2"))
    table = ok(kvmctl("irq", "irqfd-ls", vm)).out.splitlines()
    assert table[0].split() == ["IRQFD", "GSI", "RESAMPLE", "TRIGGERS", "RESAMPLES"]
    assert table[1].split() == ["blk0", "10", "yes", "0", "0"]
    assert table[2].split() == ["net0", "5", "no", "3", "0"]
    ok(kvmctl("irq", "irqfd-rm", vm, "net0"))
    assert [i["irqfd_id"] for i in ok(kvmctl("irq", "irqfd-ls", vm, "--json")).json()] == [
        "blk0"]
    result = kvmctl("irq", "irqfd-rm", vm, "net0")
    assert result.code == 1 and result.err.startswith("error: NOT_FOUND (IRQFD_NOT_FOUND): ")


def _guest_counts(kvmctl: Kvmctl, vm: str) -> dict[int, int]:
    """The counting guest's interrupt counters, read with kvmctl mem read."""
    data = ok(kvmctl("mem", "read", vm, hex(COUNTERS), "--length", "256", "--json")).json()
    return counts(bytes.fromhex(data["data"]))


def _wait_counts(kvmctl: Kvmctl, vm: str, expected: dict[int, int]) -> None:
    wait_until(lambda: _guest_counts(kvmctl, vm) == expected, 10,
               f"the guest to count {expected}")


def test_irq_line_route_msi(kvmctl: Kvmctl, vm: str, tmp_path: Path) -> None:
    """Raise a line, signal MSIs, route GSIs: each reaches a guest that counts its
    interrupts (tests/interrupt_guests.py), all set up and observed with kvmctl."""
    program = counter_program(pic_irqs=(4,), lapic_vectors=(0x30, 0x31))
    ok(kvmctl("mem", "write", vm, "0x1000", "--data-hex", program.hex()))
    ok(kvmctl("vcpu", "create", vm, "0"))
    ok(kvmctl("vcpu", "sregs", vm, "0", "cs.base=0", "cs.selector=0",
              f"es.base={LAPIC_BASE:#x}", "es.selector=0"))  # ES: the handlers' LAPIC EOI
    ok(kvmctl("vcpu", "set-regs", vm, "0", "rip=0x1000", "rsp=0x8000", "rflags=2"))
    # The LAPIC is software-disabled after reset: the MSI is refused.
    assert ok(kvmctl("irq", "msi", vm, "0xfee00000", "0x30")).out.strip() == (
        "MSI not delivered (blocked by the guest)")
    assert ok(kvmctl("irq", "msi", vm, "0xfee00000", "0x30", "--json")).json() == {
        "vm_id": vm, "delivered": False}
    ok(kvmctl("vcpu", "lapic", vm, "0", "--out", str(tmp_path / "lapic")))
    (tmp_path / "lapic").write_bytes(lapic_enabled((tmp_path / "lapic").read_bytes()))
    ok(kvmctl("vcpu", "lapic", vm, "0", "--load", str(tmp_path / "lapic")))
    ok(kvmctl("vm", "start", vm))
    wait_until(lambda: ok(kvmctl("mem", "read", vm, hex(READY), "--length", "1", "--json")
                          ).json()["data"] == "01", 10, "the guest to be ready")

    # irq line: with the default routes GSI 4 is PIC pin 4, which the guest unmasked.
    assert ok(kvmctl("irq", "line", vm, "4", "1")).out.strip() == f"irq 4 raised in vm {vm}"
    assert ok(kvmctl("irq", "line", vm, "4", "low")).out.strip() == f"irq 4 lowered in vm {vm}"
    _wait_counts(kvmctl, vm, {PIC_VECTOR_BASE + 4: 1})
    # irq msi: delivered now, and taken.
    assert ok(kvmctl("irq", "msi", vm, "0xfee00000", "0x30")).out.strip() == "MSI delivered"
    _wait_counts(kvmctl, vm, {PIC_VECTOR_BASE + 4: 1, 0x30: 1})

    # irq route: the table replaces the defaults; an irqfd on an MSI-routed GSI reaches the
    # guest as that MSI's vector, one on a GSI routed to PIC pin 4 as vector 0x24.
    out = ok(kvmctl("irq", "route", vm, "--irqchip", "0:pic-master:0",
                    "--irqchip", "4:ioapic:4", "--irqchip", "30:pic-master:4",
                    "--msi", "24:0xfee00000:0x31")).out
    assert "set 4 GSI routes" in out and "IOAPIC pin 4" in out and "PIC_MASTER pin 4" in out
    ok(kvmctl("irq", "irqfd-add", vm, "msi", "24"))
    ok(kvmctl("irq", "irqfd-add", vm, "pin4", "30"))
    ok(kvmctl("irq", "irqfd-trigger", vm, "msi"))
    _wait_counts(kvmctl, vm, {PIC_VECTOR_BASE + 4: 1, 0x30: 1, 0x31: 1})
    ok(kvmctl("irq", "irqfd-trigger", vm, "pin4"))
    _wait_counts(kvmctl, vm, {PIC_VECTOR_BASE + 4: 2, 0x30: 1, 0x31: 1})
    routes = ok(kvmctl("irq", "route", vm, "--msi", "24:0xfee00000:0x31:7", "--json")).json()
    assert routes["routes"] == [{"gsi": 24, "msi": {"address": 0xFEE00000, "data": 0x31,
                                                    "devid": 7}}]
    ok(kvmctl("irq", "irqfd-trigger", vm, "msi"))  # a devid is accepted and ignored on x86
    _wait_counts(kvmctl, vm, {PIC_VECTOR_BASE + 4: 2, 0x30: 1, 0x31: 2})
    # An empty table: neither the irqfds nor line 4 reach the guest any more.
    ok(kvmctl("irq", "route", vm, "--clear"))
    ok(kvmctl("irq", "irqfd-trigger", vm, "msi"))
    ok(kvmctl("irq", "irqfd-trigger", vm, "pin4"))
    ok(kvmctl("irq", "line", vm, "4", "1"))
    time.sleep(0.2)
    assert _guest_counts(kvmctl, vm) == {PIC_VECTOR_BASE + 4: 2, 0x30: 1, 0x31: 2}


def test_ioevents(kvmctl: Kvmctl, vm: str) -> None:
    added = ok(kvmctl("ioevent", "add", vm, "uart", "0x2f8", "--length", "1", "--json")).json()
    assert added == {"vm_id": vm, "ioevent_id": "uart", "space": "PIO", "address": 0x2F8,
                     "length": 1, "datamatch": None, "fired": 0}
    text = ok(kvmctl("ioevent", "add", vm, "bell", "0xd0000000", "--mmio", "--length", "4",
                     "--datamatch", "0x1234")).out
    assert "MMIO" in text and "0x1234" in text
    table = ok(kvmctl("ioevent", "ls", vm)).out.splitlines()
    assert table[0].split() == ["IOEVENT", "SPACE", "ADDRESS", "LENGTH", "DATAMATCH", "FIRED"]
    assert table[1].split() == ["bell", "MMIO", "0xd0000000", "4", "0x1234", "0"]
    assert table[2].split() == ["uart", "PIO", "0x2f8", "1", "-", "0"]
    ok(kvmctl("ioevent", "rm", vm, "uart"))
    assert [e["ioevent_id"] for e in ok(kvmctl("ioevent", "ls", vm, "--json")).json()] == [
        "bell"]
    result = kvmctl("ioevent", "add", vm, "odd", "0x80", "--length", "3")
    assert result.code == 1
    assert result.err.startswith("error: INVALID_ARGUMENT (VALUE_OUT_OF_RANGE): ")


def test_watch_commands_end_cleanly(kvmctl: Kvmctl, vm: str) -> None:
    ok(kvmctl("ioevent", "add", vm, "uart", "0x2f8"))
    result = kvmctl("ioevent", "watch", vm, "--duration", "0.3")
    assert result.code == 0 and result.out == ""
    result = kvmctl("irq", "watch-resamples", vm, "--duration", "0.3", "--json")
    assert result.code == 0 and result.out == ""
    result = kvmctl("ioevent", "watch", "no-such-vm", "--duration", "5")
    assert result.code == 1 and "NOT_FOUND" in result.err


def test_vcpu_commands(kvmctl: Kvmctl, vm: str) -> None:
    assert ok(kvmctl("vcpu", "create", vm, "0")).out.startswith(f"created vcpu 0 in vm {vm}")
    assert ok(kvmctl("vcpu", "create", vm, "1", "--json")).json()["vcpu_id"] == 1
    table = ok(kvmctl("vcpu", "ls", vm)).out.splitlines()
    assert [line.split() for line in table] == [["VCPU", "STATE", "CPU"],
                                                ["0", "created", "0.00s"],
                                                ["1", "created", "0.00s"]]

    regs_text = ok(kvmctl("vcpu", "regs", vm, "0")).out
    assert "rip 0x000000000000fff0" in regs_text
    new = ok(kvmctl("vcpu", "set-regs", vm, "0", "rip=0x1000", "rax=42", "--json")).json()
    assert (new["rip"], new["rax"], new["rflags"]) == (0x1000, 42, 0x2)  # rflags kept
    assert ok(kvmctl("vcpu", "regs", vm, "0", "--json")).json() == new
    assert "rip 0x0000000000001000" in ok(kvmctl("vcpu", "set-regs", vm, "0", "rbx=1")).out

    sregs = ok(kvmctl("vcpu", "sregs", vm, "0", "cs.base=0", "cs.selector=0", "--json")).json()
    assert (sregs["cs"]["base"], sregs["cs"]["selector"]) == (0, 0)
    assert "cr0" in ok(kvmctl("vcpu", "sregs", vm, "0")).out

    assert ok(kvmctl("vcpu", "fpu", vm, "0", "fcw=0x27f", "--json")).json()["fcw"] == 0x27F
    assert "fcw" in ok(kvmctl("vcpu", "fpu", vm, "0")).out

    cpuid = ok(kvmctl("vcpu", "cpuid", vm, "0", "--set-supported", "--json")).json()
    assert any(e["function"] == 0 for e in cpuid)

    msrs = ok(kvmctl("vcpu", "msrs", vm, "0", "--set", "0x174=0x10", "--json")).json()
    assert msrs == [{"index": 0x174, "value": 0x10}]
    assert "0x00000174" in ok(kvmctl("vcpu", "msrs", vm, "0", "0x174")).out

    assert ok(kvmctl("vcpu", "mpstate", vm, "0")).out.strip() == "RUNNABLE"
    assert ok(kvmctl("vcpu", "mpstate", vm, "0", "halted", "--json")).json() == {
        "state": "HALTED"}

    lapic = ok(kvmctl("vcpu", "lapic", vm, "0", "--json")).json()
    assert len(bytes.fromhex(lapic["regs"])) == 1024
    assert ok(kvmctl("vcpu", "lapic", vm, "0")).out.splitlines()[-1] == "00000400"

    events = ok(kvmctl("vcpu", "events", vm, "0", "nmi_pending=1", "--json")).json()
    assert events["nmi_pending"] == 1
    assert "nmi_pending" in ok(kvmctl("vcpu", "events", vm, "0")).out

    result = kvmctl("vcpu", "regs", vm, "7")
    assert result.code == 1 and result.err.startswith("error: NOT_FOUND (VCPU_NOT_FOUND): ")


def test_daemon_state_matches(kvmctl: Kvmctl, vm: str, client: KvmdClient) -> None:
    """What kvmctl did is what the library sees."""
    ok(kvmctl("vcpu", "create", vm, "0"))
    ok(kvmctl("vcpu", "set-regs", vm, "0", "rip=0x7c00"))
    assert client.get_regs(vm, 0).rip == 0x7C00
    assert client.get_vm(vm).memory_bytes == 1 << 20


def test_run_a_guest(kvmctl: Kvmctl, vm_id: str) -> None:
    """The whole story from the shell: load a real-mode program, point the vCPU at it, run it,
    and read back its console output, its memory store, its dirty page and its exit code."""
    program = (
        "ba f8 03 b0 48 ee b0 69 ee"  # mov dx, 0x3f8; out 'H'; out 'i'   (COM1)
        "b8 34 12 a3 00 40"           # mov ax, 0x1234; mov [0x4000], ax
        "ba 01 05 b0 2a ee f4"        # mov dx, 0x501; mov al, 42; out dx, al (debug exit)
    )
    ok(kvmctl("vm", "create", vm_id))
    ok(kvmctl("mem", "add", vm_id, "0", "64K", "--log-dirty"))
    ok(kvmctl("mem", "write", vm_id, "0x1000", "--data-hex", program))
    ok(kvmctl("vcpu", "create", vm_id, "0"))
    flat = [f"{seg}.{field}=0" for seg in ("cs", "ds", "ss") for field in ("base", "selector")]
    ok(kvmctl("vcpu", "sregs", vm_id, "0", *flat))
    ok(kvmctl("vcpu", "set-regs", vm_id, "0", "rip=0x1000", "rsp=0x8000"))
    assert ok(kvmctl("vm", "start", vm_id)).out.startswith(f"vm {vm_id}: ")
    final = ok(kvmctl("vm", "wait", vm_id, "--within", "30", "--json")).json()
    assert (final["state"], final["reason"], final["exit_code"]) == ("stopped", "debug_exit", 42)
    assert "exit code     42" in ok(kvmctl("vm", "get", vm_id)).out
    assert ok(kvmctl("vm", "console", vm_id, "--duration", "0.5")).out == "Hi"
    assert ok(kvmctl("dirty-log", vm_id, "0")).out.splitlines() == [
        "slot 0: 1 of 16 pages dirty", "pages: 4"]
    assert ok(kvmctl("mem", "read", vm_id, "0x4000", "-n", "2", "--json")).json()["data"] == (
        "3412")
    stats = ok(kvmctl("vm", "stats", vm_id)).out.splitlines()
    assert stats[0].split() == ["REASON", "TOTAL", "VCPU0"]
    assert ["io_out", "3", "3"] in [line.split() for line in stats]  # 'H', 'i', debug exit
    state = ok(kvmctl("vcpu", "state", vm_id, "0", "--json")).json()
    assert state["state"] == "stopped" and state["cpu_seconds"] > 0
    assert re.fullmatch(rf"vcpu 0 of vm {vm_id}: stopped \(.*\), \d+\.\d\d s of CPU\n",
                        ok(kvmctl("vcpu", "state", vm_id, "0")).out)
    result = kvmctl("vm", "wait", vm_id, "--event", "halted", "--within", "0.3")
    assert result.code == 1 and result.err.startswith("error: DEADLINE_EXCEEDED: ")


DIRTIED_FIRST = [0x20, 0x41, 0x42, 0x43, 0x9F]  # across 64-page words of the bitmap
DIRTIED_THEN = [0x05, 0x80, 0xFF]


def _store_to_pages(pages: list[int]) -> str:
    """Real mode: one byte stored at the start of each page (below 1 MiB), as hex."""
    # mov ax, page << 8 (the segment of the page); mov ds, ax; mov [0], al
    return "".join(f"b8 00 {p:02x} 8e d8 a2 00 00 " for p in pages)


def test_guest_dirtied_pages_through_the_api_and_kvmctl(kvmctl: Kvmctl, client: KvmdClient,
                                                         vm_id: str) -> None:
    """A started guest stores to chosen pages of a dirty-logged slot, halts, then stores to
    others and exits: GetDirtyLog (client, whole and chunked) and kvmctl dirty-log report
    exactly the pages of each round, and reading resets the log."""
    program = (_store_to_pages(DIRTIED_FIRST) + "fa f4 "   # cli; hlt
               + _store_to_pages(DIRTIED_THEN) + "ba 01 05 b0 2a ee")  # debug exit 42
    ok(kvmctl("vm", "create", vm_id))
    ok(kvmctl("mem", "add", vm_id, "0", "1M", "--log-dirty"))  # 256 pages
    ok(kvmctl("mem", "write", vm_id, "0x1000", "--data-hex", program))
    ok(kvmctl("vcpu", "create", vm_id, "0"))
    ok(kvmctl("vcpu", "sregs", vm_id, "0", "cs.base=0", "cs.selector=0"))
    ok(kvmctl("vcpu", "set-regs", vm_id, "0", "rip=0x1000", "rflags=2"))
    ok(kvmctl("vm", "start", vm_id))
    wait_until(lambda: client.get_vcpu_state(vm_id, 0).state == "halted", 10,
               "the guest's first round of stores")
    log = client.dirty_log(vm_id, 0)
    assert (log.pages(), log.dirty_count, log.total_pages) == (DIRTIED_FIRST, 5, 256)
    assert client.dirty_pages(vm_id, 0) == []  # the read reset it; the guest is halted

    ok(kvmctl("vcpu", "resume", vm_id, "0"))
    assert ok(kvmctl("vm", "wait", vm_id, "--json")).json()["exit_code"] == 42
    chunks = list(client.iter_dirty_log(vm_id, 0, chunk_size=8))  # 64 pages a chunk
    assert [c.dirty_pages for c in chunks] == [1, 0, 1, 1]
    assert [c.first_page + bit for c in chunks for bit in range(64)
            if int.from_bytes(c.bitmap, "little") >> bit & 1] == DIRTIED_THEN
    # Read above (chunked): gone now. Dirty the same pages again for kvmctl to report.
    ok(kvmctl("vcpu", "set-regs", vm_id, "0", "rip=0x1000"))
    ok(kvmctl("vm", "start", vm_id))
    wait_until(lambda: client.get_vcpu_state(vm_id, 0).state == "halted", 10,
               "the guest's first round of stores, again")
    assert ok(kvmctl("dirty-log", vm_id, "0")).out.splitlines() == [
        "slot 0: 5 of 256 pages dirty", "pages: 32,65-67,159"]
    ok(kvmctl("vcpu", "resume", vm_id, "0"))
    ok(kvmctl("vm", "wait", vm_id))
    assert ok(kvmctl("dirty-log", vm_id, "0", "--json")).json() == {
        "vm_id": vm_id, "slot": 0, "dirty_count": 3, "total_pages": 256,
        "pages": DIRTIED_THEN}
    assert ok(kvmctl("dirty-log", vm_id, "0")).out.splitlines() == [
        "slot 0: 0 of 256 pages dirty"]


def test_pause_resume_from_the_shell(kvmctl: Kvmctl, vm_id: str) -> None:
    ok(kvmctl("vm", "create", vm_id))
    ok(kvmctl("mem", "add", vm_id, "0", "64K"))
    ok(kvmctl("mem", "write", vm_id, "0x1000", "-x", "eb fe"))  # jmp $
    ok(kvmctl("vcpu", "create", vm_id, "0"))
    ok(kvmctl("vcpu", "sregs", vm_id, "0", "cs.base=0", "cs.selector=0"))
    ok(kvmctl("vcpu", "set-regs", vm_id, "0", "rip=0x1000"))
    assert ok(kvmctl("vm", "start", vm_id, "--json")).json()["state"] == "running"
    assert ok(kvmctl("vm", "pause", vm_id)).out.strip() == f"vm {vm_id}: paused"
    result = kvmctl("vm", "pause", vm_id)
    assert result.code == 1
    assert result.err.startswith("error: FAILED_PRECONDITION (VM_NOT_RUNNING): ")
    assert ok(kvmctl("vm", "resume", vm_id)).out.strip() == f"vm {vm_id}: running"
    assert ok(kvmctl("vm", "stop", vm_id)).out.startswith(f"vm {vm_id}: stopped")


# ---------------------------------------------------------------------------------------------
# the real console script


def _run(address: str | None, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the kvmctl script with KVMD_ADDRESS (not --address) pointing at ``address``."""
    env = dict(os.environ)
    env.pop("KVMD_ADDRESS", None)
    if address is not None:
        env["KVMD_ADDRESS"] = address
    return subprocess.run(kvmctl_command(*args), env=env, capture_output=True, timeout=60)


def test_subprocess_info_json(address: str) -> None:
    proc = _run(address, "info", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["api_version"] == 12


def test_subprocess_vm_roundtrip(address: str, vm_id: str) -> None:
    assert _run(address, "vm", "create", vm_id, "-l", "via=subprocess").returncode == 0
    proc = _run(address, "vm", "list", "--label", "via=subprocess", "--json")
    assert [v["vm_id"] for v in json.loads(proc.stdout)] == [vm_id]
    assert _run(address, "mem", "add", vm_id, "0", "64K").returncode == 0
    assert _run(address, "mem", "write", vm_id, "0x100", "-x", "68656c6c6f").returncode == 0
    proc = _run(address, "mem", "read", vm_id, "0x100", "-n", "5", "--raw")
    assert (proc.returncode, proc.stdout) == (0, b"hello")
    proc = _run(address, "vm", "delete", vm_id)
    assert proc.returncode == 0 and proc.stdout == f"deleted vm {vm_id}\n".encode()


def test_subprocess_exit_codes(address: str, tmp_path: Path) -> None:
    proc = _run(address, "vm", "get", "no-such-vm")
    assert proc.returncode == 1
    assert proc.stderr.startswith(b"error: NOT_FOUND (VM_NOT_FOUND): ")
    proc = _run(address, "vm", "frobnicate")
    assert proc.returncode == 2
    assert b"usage:" in proc.stderr
    proc = _run(f"unix://{tmp_path}/nobody.sock", "info")
    assert proc.returncode == 3
    assert proc.stderr.startswith(b"error: UNAVAILABLE: ")
    proc = _run(None, "--address", address, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith(b"usage: kvmctl")


def test_subprocess_over_mutual_tls(
    start_kvmd: Callable[..., Any], tls_files: Any, tcp_port: int
) -> None:
    address = f"127.0.0.1:{tcp_port}"
    start_kvmd("--listen", address, "--tls-cert", str(tls_files.server_cert),
               "--tls-key", str(tls_files.server_key), "--tls-client-ca", str(tls_files.ca))
    tls = ["--tls-ca", str(tls_files.ca), "--tls-cert", str(tls_files.client_cert),
           "--tls-key", str(tls_files.client_key)]
    proc = _run(address, "info", "--json", *tls)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["api_version"] == 12
    proc = _run(address, "info")  # no certificate: the handshake fails
    assert proc.returncode == 3
    proc = _run(address, "info", "--tls-ca", str(tls_files.ca), "--tls-cert",
                str(tls_files.client_cert))  # a certificate without its key
    assert proc.returncode == 2
    assert b"tls_cert and tls_key go together" in proc.stderr
