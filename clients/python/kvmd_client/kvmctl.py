"""kvmctl: the command-line interface to a kvmd daemon.

Human-readable tables by default, ``--json`` for scripts. Exit codes: 0 success, 1 the daemon
refused or failed the request (``error: <CODE> (<REASON>): <message>`` on stderr; the
AIP-193 reason when the daemon sent one), 2 usage error, 3 the
daemon cannot be reached. Numbers accept decimal and ``0x`` hex; sizes also take K/M/G/T
suffixes (binary: 2M = 2 MiB).
"""

from __future__ import annotations

import argparse
import codecs
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from google.protobuf.message import Message

from kvmd_client import demo_guest
from kvmd_client._convert import message_to_dict, unflatten
from kvmd_client._format import format_kv, format_ranges, format_table, hexdump, human_bytes
from kvmd_client.demo import DemoResult, console_backlog, new_demo_vm_id, run_demo
from kvmd_client.errors import KvmdError, UnavailableError
from kvmd_client.kvmd_client import (
    DEFAULT_ADDRESS,
    DEFAULT_CHUNK_SIZE,
    KvmdClient,
    Watch,
    irqchip_route,
    msi_route,
)
from kvmd_proto import vmm_pb2

EXIT_OK = 0
EXIT_SERVER_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

# ---------------------------------------------------------------------------------------------
# argument types (raise ArgumentTypeError, so argparse reports a usage error and exits 2)

_SIZE_SUFFIXES = {"k": 10, "m": 20, "g": 30, "t": 40}


def parse_int(text: str) -> int:
    """A non-negative integer in decimal, ``0x`` hex, ``0o`` octal or ``0b`` binary."""
    try:
        value = int(text.replace("_", ""), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def parse_size(text: str) -> int:
    """A byte count: a number (decimal or hex) with an optional K/M/G/T(iB) suffix."""
    body = text.strip().lower().replace("_", "")
    for tail in ("ib", "b"):
        if body.endswith(tail) and len(body) > len(tail) and body[-len(tail) - 1] in "kmgt":
            body = body[: -len(tail)]
            break
    shift = 0
    if body and body[-1] in _SIZE_SUFFIXES and not body.startswith("0x"):
        shift = _SIZE_SUFFIXES[body[-1]]
        body = body[:-1]
    return parse_int(body) << shift if body else parse_int(text)


def parse_label(text: str) -> tuple[str, str]:
    """``key=value``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_assignment(text: str) -> tuple[str, str]:
    """``field=value`` or ``msg.field=value`` (the value is converted by the field's type)."""
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    return key.strip().lower(), value.strip()


def parse_msr_assignment(text: str) -> tuple[int, int]:
    """``INDEX=VALUE``, both numbers."""
    index, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected INDEX=VALUE, got {text!r}")
    return parse_int(index), parse_int(value)


def parse_level(text: str) -> bool:
    """An irq line level: 1/high/on/raise or 0/low/off/lower."""
    lowered = text.lower()
    if lowered in ("1", "high", "on", "raise", "true"):
        return True
    if lowered in ("0", "low", "off", "lower", "false"):
        return False
    raise argparse.ArgumentTypeError(f"level must be 1/high/on or 0/low/off, got {text!r}")


def parse_irqchip_route(text: str) -> vmm_pb2.IrqRoute:
    """``GSI:CHIP:PIN`` with CHIP pic-master, pic-slave or ioapic."""
    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected GSI:CHIP:PIN, got {text!r}")
    try:
        return irqchip_route(parse_int(parts[0]), parts[1], parse_int(parts[2]))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_msi_route(text: str) -> vmm_pb2.IrqRoute:
    """``GSI:ADDRESS:DATA[:DEVID]``."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(f"expected GSI:ADDRESS:DATA[:DEVID], got {text!r}")
    devid = parse_int(parts[3]) if len(parts) == 4 else None
    return msi_route(parse_int(parts[0]), parse_int(parts[1]), parse_int(parts[2]), devid)


def parse_hex_data(text: str) -> bytes:
    """Hex bytes; spaces, colons and a leading 0x are ignored."""
    cleaned = text.strip().lower()
    cleaned = cleaned.removeprefix("0x")
    cleaned = "".join(c for c in cleaned if c not in " :_\n\t")
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not hex data: {text!r}") from None


# ---------------------------------------------------------------------------------------------
# output helpers


def _emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False) + "\n")


def _emit_json_line(value: Any) -> None:
    sys.stdout.write(json.dumps(value, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _out(text: str) -> None:
    sys.stdout.write(text + ("\n" if text and not text.endswith("\n") else ""))


def _hex(value: int, width: int = 0) -> str:
    return f"0x{value:0{width}x}" if width else f"{value:#x}"


def _labels(labels: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _timestamp(unix_ms: int) -> str:
    if not unix_ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_ms / 1000))


def _region_flags(region: vmm_pb2.MemoryRegion) -> str:
    flags = []
    if region.read_only:
        flags.append("read-only")
    if region.log_dirty:
        flags.append("log-dirty")
    if region.file.name:
        flags.append(f"file={region.file.name}")
    if region.mappings:
        flags.append(f"files-mapped={len(region.mappings)}")
    return ",".join(flags) or "-"


def _regions_table(regions: Iterable[vmm_pb2.MemoryRegion]) -> str:
    rows = [
        [
            r.slot,
            _hex(r.guest_addr, 12),
            _hex(r.guest_addr + r.size - 1 if r.size else r.guest_addr, 12),
            human_bytes(r.size),
            _region_flags(r),
        ]
        for r in regions
    ]
    return format_table(["slot", "guest addr", "last addr", "size", "flags"], rows,
                        empty="No memory regions.")


def _vm_details(vm: vmm_pb2.Vm) -> str:
    options = []
    if vm.options.irqchip:
        options.append("irqchip")
    if vm.options.pit:
        options.append("pit")
    if vm.options.tss_address:
        options.append(f"tss={_hex(vm.options.tss_address)}")
    if vm.options.identity_map_address:
        options.append(f"identity-map={_hex(vm.options.identity_map_address)}")
    return format_kv(
        [
            ("vm", vm.vm_id),
            ("state", vm.state),
            ("labels", _labels(vm.labels)),
            ("options", ",".join(options) or "-"),
            ("vcpus", vm.vcpu_count),
            ("memory slots", vm.memory_slot_count),
            ("memory", f"{human_bytes(vm.memory_bytes)} ({vm.memory_bytes} bytes)"),
            ("allocated", f"{human_bytes(vm.memory_allocated_bytes)} "
                          f"({vm.memory_allocated_bytes} bytes of host memory)"),
            ("discarded", f"{human_bytes(vm.discarded_bytes)} "
                          f"({vm.discarded_bytes} bytes released, in all)"),
            ("owner", vm.owner or "-"),
            ("created", _timestamp(vm.created_unix_ms)),
            ("reason", vm.reason or "-"),
            ("exit code", vm.exit_code if vm.HasField("exit_code") else "-"),
            ("vcpu states",
             ", ".join(f"{k}={v}" for k, v in sorted(vm.vcpu_states.items())) or "-"),
        ]
    )


def _cpuid_table(entries: Sequence[vmm_pb2.CpuidEntry]) -> str:
    rows = [
        [
            _hex(e.function, 8),
            _hex(e.index, 2),
            _hex(e.flags, 2),
            _hex(e.eax, 8),
            _hex(e.ebx, 8),
            _hex(e.ecx, 8),
            _hex(e.edx, 8),
        ]
        for e in entries
    ]
    return format_table(
        ["function", "index", "flags", "eax", "ebx", "ecx", "edx"], rows, empty="No entries."
    )


_REG_ORDER = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags",
]  # fmt: skip


def _regs_text(regs: vmm_pb2.Regs) -> str:
    cells = [f"{name:>6} {_hex(getattr(regs, name), 16)}" for name in _REG_ORDER]
    return "\n".join("  ".join(cells[i : i + 4]) for i in range(0, len(cells), 4))


_SEGMENTS = ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"]
_SEG_FIELDS = ["base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g",
               "avl", "unusable"]


def _sregs_text(sregs: vmm_pb2.Sregs) -> str:
    seg_rows = []
    for name in _SEGMENTS:
        seg = getattr(sregs, name)
        seg_rows.append(
            [name, _hex(seg.base, 16), _hex(seg.limit, 8), _hex(seg.selector, 4)]
            + [getattr(seg, f) for f in _SEG_FIELDS[3:]]
        )
    segments = format_table(["seg", *_SEG_FIELDS], seg_rows)
    tables = format_table(
        ["table", "base", "limit"],
        [[n, _hex(getattr(sregs, n).base, 16), _hex(getattr(sregs, n).limit, 4)]
         for n in ("gdt", "idt")],
    )
    control = format_kv(
        [(n, _hex(getattr(sregs, n), 16)) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer",
                                                     "apic_base")]
        + [("interrupt_bitmap", " ".join(_hex(w, 16) for w in sregs.interrupt_bitmap) or "-")]
    )
    return f"{segments}\n\n{tables}\n\n{control}"


def _fpu_text(fpu: vmm_pb2.Fpu) -> str:
    head = format_kv(
        [
            ("fcw", _hex(fpu.fcw, 4)),
            ("fsw", _hex(fpu.fsw, 4)),
            ("ftwx", _hex(fpu.ftwx, 2)),
            ("last_opcode", _hex(fpu.last_opcode, 4)),
            ("last_ip", _hex(fpu.last_ip, 16)),
            ("last_dp", _hex(fpu.last_dp, 16)),
            ("mxcsr", _hex(fpu.mxcsr, 8)),
        ]
    )
    fpr = format_kv([(f"st{i}", bytes(v).hex()) for i, v in enumerate(fpu.fpr)])
    xmm = format_kv([(f"xmm{i}", bytes(v).hex()) for i, v in enumerate(fpu.xmm)])
    return "\n\n".join(part for part in (head, fpr, xmm) if part)


def _message_kv(message: Any) -> str:
    return format_kv((k, v) for k, v in message_to_dict(message).items())


def _irqfds_table(irqfds: Iterable[vmm_pb2.Irqfd]) -> str:
    rows = [
        [i.irqfd_id, i.gsi, "yes" if i.resample else "no", i.triggers, i.resamples]
        for i in irqfds
    ]
    return format_table(["irqfd", "gsi", "resample", "triggers", "resamples"], rows,
                        empty="No irqfds.")


def _ioevents_table(ioevents: Iterable[vmm_pb2.Ioevent]) -> str:
    rows = [
        [
            e.ioevent_id,
            vmm_pb2.AddressSpace.Name(e.space),
            _hex(e.address),
            e.length or "any",
            _hex(e.datamatch) if e.HasField("datamatch") else "-",
            e.fired,
        ]
        for e in ioevents
    ]
    return format_table(["ioevent", "space", "address", "length", "datamatch", "fired"], rows,
                        empty="No ioevents.")


def _assignments(pairs: Sequence[tuple[str, str]] | None) -> dict[str, Any]:
    return unflatten(dict(pairs or ()))


class UsageError(Exception):
    """A command-line problem found after parsing (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# more formatters: one line or table per kind of result


def _info_text(info: vmm_pb2.HypervisorInfo, a: argparse.Namespace) -> str:
    caps = sorted(info.capabilities.items())
    shown = caps if a.all else [(k, v) for k, v in caps if v]
    limits = info.limits
    text = format_kv(
        [
            ("daemon version", info.daemon_version),
            ("KVM API version", info.api_version),
            ("vCPU mmap size", info.vcpu_mmap_size),
            ("page size", info.page_size),
            ("VMs", info.vm_count),
            ("memory in use", human_bytes(info.memory_in_use_bytes)),
            ("fds in use", f"{info.fds_in_use} of {info.limits.max_fds}"),
            ("guest CPUs", format_ranges(info.vcpu_cpus)),
            ("API CPUs", format_ranges(info.api_cpus)),
        ]
    )
    limit_text = format_kv(
        [
            ("max VMs", limits.max_vms),
            ("max vCPUs per VM", limits.max_vcpus_per_vm),
            ("max memory per VM", human_bytes(limits.max_memory_per_vm_bytes)),
            ("max memory total", human_bytes(limits.max_memory_total_bytes)),
            ("max memory slots per VM", limits.max_memory_slots_per_vm),
            ("max irqfds per VM", limits.max_irqfds_per_vm),
            ("max ioevents per VM", limits.max_ioevents_per_vm),
            ("max message size", human_bytes(limits.max_message_bytes)),
            ("max concurrent RPCs", limits.max_concurrent_rpcs),
            ("max file descriptors", limits.max_fds),
            ("max file descriptors per identity", limits.max_fds_per_identity),
        ],
        indent=2,
    )
    what = "all" if a.all else f"{len(shown)} of {len(caps)} present"
    cap_table = format_table(["capability", "value"], shown)
    return f"{text}\n\nlimits:\n{limit_text}\n\ncapabilities ({what}):\n{cap_table}"


def _vms_table(vms: Iterable[vmm_pb2.Vm]) -> str:
    rows = [
        [
            vm.vm_id,
            vm.state,
            vm.vcpu_count,
            vm.memory_slot_count,
            human_bytes(vm.memory_bytes),
            _timestamp(vm.created_unix_ms),
            _labels(vm.labels),
        ]
        for vm in sorted(vms, key=lambda v: v.vm_id)
    ]
    return format_table(["vm", "state", "vcpus", "slots", "memory", "created", "labels"], rows,
                        empty="No VMs.")


def _mapping_line(m: vmm_pb2.GuestFileMapping) -> str:
    mode = "read-only" if m.file.read_only else "read-write"
    return (f"slot {m.slot} {_hex(m.offset)}+{human_bytes(m.size)} (guest {_hex(m.guest_addr)}): "
            f"{m.file.name} from {_hex(m.file.offset)}, {mode}")


def _routes_text(r: dict[str, Any], a: argparse.Namespace) -> str:
    routes: list[vmm_pb2.IrqRoute] = r["routes"]
    rows = []
    for route in sorted(routes, key=lambda route: route.gsi):
        if route.HasField("irqchip"):
            chip = vmm_pb2.IrqChipPin.Chip.Name(route.irqchip.chip)
            rows.append([route.gsi, "irqchip", f"{chip} pin {route.irqchip.pin}"])
        else:
            devid = f" devid {route.msi.devid}" if route.msi.HasField("devid") else ""
            rows.append([route.gsi, "msi", f"address {_hex(route.msi.address)} data "
                                           f"{_hex(route.msi.data)}{devid}"])
    head = f"set {len(routes)} GSI routes in vm {a.vm}"
    return f"{head}\n{format_table(['gsi', 'type', 'target'], rows)}" if rows else head


def _count_line(id_field: str) -> Callable[[Any], str]:
    def line(event: Any) -> str:
        return f"{time.strftime('%H:%M:%S')}  {getattr(event, id_field)}  count={event.count}"

    return line


def _vm_state_line(vm: vmm_pb2.Vm) -> str:
    extra = f" ({vm.reason})" if vm.reason else ""
    if vm.HasField("exit_code"):
        extra += f" exit code {vm.exit_code}"
    return f"vm {vm.vm_id}: {vm.state}{extra}"


def _vcpu_line(vcpu: vmm_pb2.Vcpu) -> str:
    extra = f" ({vcpu.reason})" if vcpu.reason else ""
    return f"vcpu {vcpu.vcpu_id} of vm {vcpu.vm_id}: {vcpu.state}{extra}"


def _vcpu_state_line(vcpu: vmm_pb2.Vcpu) -> str:
    return f"{_vcpu_line(vcpu)}, {vcpu.cpu_seconds:.2f} s of CPU"


def _event_line(event: vmm_pb2.VmEvent) -> str:
    who = f"vcpu {event.vcpu_id}" if event.vcpu_id >= 0 else "vm"
    parts = [_timestamp(event.unix_ms), f"{event.type:<10}", f"{who:<7}", f"-> {event.state}"]
    if event.reason:
        parts.append(f"({event.reason})")
    if event.HasField("exit_code"):
        parts.append(f"exit code {event.exit_code}")
    if event.type == "crashed" and event.HasField("regs"):
        parts.append(f"rip={_hex(event.regs.rip)}")
    return "  ".join(parts)


#: Exit stats and the vCPU ids to show: what ``kvmctl exits`` prints, as text or JSON.
_ExitCounts = tuple[vmm_pb2.ExitStats, list[int]]


def _exit_counts(c: KvmdClient, a: argparse.Namespace) -> _ExitCounts:
    """The VM's exit stats and the vCPU ids to show (all, or the one --vcpu names)."""
    stats = c.exit_stats(a.vm)
    if a.vcpu is None:
        return stats, sorted(stats.vcpus)
    if a.vcpu not in stats.vcpus:
        c.get_vcpu_state(a.vm, a.vcpu)  # NOT_FOUND if there is no such vCPU
    return stats, [a.vcpu]


def _vcpu_counts(stats: vmm_pb2.ExitStats, vcpu_id: int) -> Any:
    return stats.vcpus[vcpu_id].counts if vcpu_id in stats.vcpus else {}


def _exits_json(result: _ExitCounts, a: argparse.Namespace) -> dict[str, Any]:
    stats, vcpu_ids = result

    def shown(values: Any) -> dict[str, int]:
        return {r: int(n) for r, n in sorted(values.items()) if n or a.all}

    if a.vcpu is not None:
        return {"vm_id": stats.vm_id, "vcpu_id": a.vcpu,
                "counts": shown(_vcpu_counts(stats, a.vcpu))}
    return {"vm_id": stats.vm_id, "total": shown(stats.total),
            "vcpus": {str(v): shown(_vcpu_counts(stats, v)) for v in vcpu_ids}}


def _exits_text(result: _ExitCounts, a: argparse.Namespace) -> str:
    """The VM total and one column per vCPU (only reasons with exits unless --all; only one
    vCPU with --vcpu)."""
    stats, vcpu_ids = result
    if a.vcpu is not None:
        column = _vcpu_counts(stats, a.vcpu)
        reasons = sorted(set(stats.total) | set(column))
        rows = [[r, column.get(r, 0)] for r in reasons if a.all or column.get(r, 0)]
        return format_table(["reason", f"vcpu{a.vcpu}"], rows, empty="No exits yet.")
    reasons = [r for r in sorted(stats.total) if a.all or stats.total[r]]
    rows = [[r, stats.total[r], *(_vcpu_counts(stats, v).get(r, 0) for v in vcpu_ids)]
            for r in reasons]
    return format_table(["reason", "total", *(f"vcpu{v}" for v in vcpu_ids)], rows,
                        empty="No exits yet.")


def _snapshot_row(i: vmm_pb2.SnapshotInfo) -> list[Any]:
    return [i.file or "-", i.vm_id, "diff" if i.diff else "full", human_bytes(i.size_bytes),
            human_bytes(i.guest_memory_bytes), _timestamp(i.created_unix_ms), i.owner,
            i.snapshot_id[:12]]


SNAPSHOT_COLUMNS = ["file", "vm", "kind", "size", "guest memory", "created", "owner", "id"]


def _snapshot_text(info: vmm_pb2.SnapshotInfo, a: argparse.Namespace) -> str:
    where = f"state directory file {info.file}" if info.file else a.file
    return (f"{'diff' if info.diff else 'full'} snapshot {info.snapshot_id} of vm {info.vm_id} "
            f"-> {where}: {human_bytes(info.size_bytes)}, {info.memory_pages} pages of guest "
            f"memory, vm held {info.seconds * 1000:.1f} ms")


def _migrations_table(infos: Iterable[vmm_pb2.MigrationInfo]) -> str:
    rows = [[i.vm_id, i.direction, i.peer or "-", i.state,
             human_bytes(i.progress.bytes_sent) if i.direction == "outgoing" else "-",
             str(i.progress.round) if i.direction == "outgoing" else "-"] for i in infos]
    return format_table(["vm", "direction", "peer", "state", "sent", "round"], rows,
                        empty="No migrations in progress.")


def _handover_text(r: vmm_pb2.HandoverReport) -> str:
    if not r.mode:
        return "This daemon did not take VMs over from another."
    rows = [[v.vm_id, "restored" if v.restored else "stranded",
             f"{v.paused_seconds * 1000:.1f} ms" if v.restored else "-", v.error or ""]
            for v in r.vm_reports]
    return (f"hand-over ({r.mode}) at {_timestamp(r.unix_ms)} from kvmd "
            f"{r.previous_version or '?'}: {r.restored} of {r.vms} VMs restored, "
            f"{r.stranded} stranded\n"
            f"  save {r.save_seconds * 1000:.1f} ms, start {r.start_seconds * 1000:.1f} ms, "
            f"restore {r.restore_seconds * 1000:.1f} ms; longest guest pause "
            f"{r.max_paused_seconds * 1000:.1f} ms; API unavailable "
            f"{r.api_unavailable_seconds * 1000:.1f} ms; this daemon's start-up "
            f"{r.startup_seconds * 1000:.1f} ms\n"
            + format_table(["vm", "result", "paused", "error"], rows, empty="No VMs."))


def _stranded_table(vms: Iterable[vmm_pb2.StrandedVm]) -> str:
    return format_table(["vm", "memory", "since", "state file", "reason"],
                        [[v.vm_id, human_bytes(v.memory_bytes), _timestamp(v.since_unix_ms),
                          v.state_file or "-", v.reason] for v in vms],
                        empty="No stranded VMs.")


# ---------------------------------------------------------------------------------------------
# the command framework: each command is one declaration; the parser and the dispatch are
# built from the table COMMANDS below.

#: A command's request: the client and the parsed arguments in, its result out.
Call = Callable[[KvmdClient, argparse.Namespace], Any]
#: A view of a result: a string for people (bytes are written raw), or a JSON-ready value.
View = Callable[[Any, argparse.Namespace], Any]
#: A command that prints as it goes (streams, the demo); it may return an exit code.
Run = Callable[[KvmdClient, argparse.Namespace], int | None]


@dataclass(frozen=True)
class Arg:
    """One argument, declared as ``parser.add_argument(*flags, **options)`` would take it."""

    flags: tuple[str, ...]
    options: dict[str, Any]

    def add_to(self, parser: Any) -> None:
        """Add it to ``parser`` (a parser or a mutually exclusive group)."""
        parser.add_argument(*self.flags, **self.options)


def arg(*flags: str, **options: Any) -> Arg:
    """Declare an argument with ``add_argument``'s own words."""
    return Arg(flags, options)


@dataclass(frozen=True)
class OneOf:
    """Arguments that exclude each other (argparse's mutually exclusive group)."""

    args: tuple[Arg, ...]
    required: bool = False

    def add_to(self, parser: Any) -> None:
        """Add the group and its arguments to ``parser``."""
        group = parser.add_mutually_exclusive_group(required=self.required)
        for argument in self.args:
            argument.add_to(group)


def one_of(*args: Arg, required: bool = False) -> OneOf:
    """Declare mutually exclusive arguments (one of them required with ``required``)."""
    return OneOf(args, required)


def to_json(value: Any) -> Any:
    """The JSON form of a result: messages as :func:`message_to_dict`, bytes as hex, lists and
    dicts item by item, anything else as it is."""
    if isinstance(value, Message):
        return message_to_dict(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Mapping):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def _derived_json(result: Any, a: argparse.Namespace) -> Any:
    return to_json(result)


def _str_text(result: Any, a: argparse.Namespace) -> str:
    return str(result)


def _of(show: Callable[[Any], str]) -> View:
    """A view from a formatter that needs the result only, not the arguments."""
    return lambda result, a: show(result)


def _print(text: str | bytes) -> None:
    """Print a human view: text (a newline added), or raw bytes exactly as they are."""
    if isinstance(text, bytes):
        sys.stdout.flush()
        sys.stdout.buffer.write(text)
        sys.stdout.buffer.flush()
    else:
        _out(text)


@dataclass(frozen=True, kw_only=True, eq=False)  # identity: a table entry, not a value
class Command:
    """One kvmctl command: where it is, its arguments, its request and how its result shows.

    ``call`` makes the request and returns the result; ``text`` turns it into what people
    read, ``json`` into what ``--json`` prints (by default :func:`to_json` of the result;
    ``None``: nothing). With ``each`` the call yields one result per item it acts on, and
    each is printed as it is done, so that a failure midway still shows what was done; the
    JSON view then gets the list. Commands that print as they go (streams, the demo) give
    ``run`` instead and print themselves.
    """

    path: str  # "vm create": the group, then the command's name
    help: str
    args: tuple[Arg | OneOf, ...] = ()
    aliases: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)  # parser.set_defaults
    call: Call | None = None
    text: View = _str_text
    json: View | None = _derived_json
    each: bool = False
    exit_code: Callable[[Any], int] | None = None  # from the result; default 0
    run: Run | None = None

    def __call__(self, c: KvmdClient, a: argparse.Namespace) -> int | None:
        """Run the command; returns its exit code (None: success)."""
        if self.run is not None:
            return self.run(c, a)
        assert self.call is not None, self.path
        result = self.call(c, a)
        if self.each:
            done = []
            for item in result:
                done.append(item)
                if not a.json:
                    _print(self.text(item, a))
            result = done
        if a.json:
            if self.json is not None:
                _emit_json(self.json(result, a))
        elif not self.each:
            _print(self.text(result, a))
        return self.exit_code(result) if self.exit_code is not None else None


def _request(method: Callable[..., Any], *names: str, **keywords: str) -> Call:
    """A call of a client ``method`` with these arguments: positional ones by name, keyword
    ones as ``parameter="argument_name"``."""

    def call(c: KvmdClient, a: argparse.Namespace) -> Any:
        return method(c, *(getattr(a, n) for n in names),
                      **{k: getattr(a, n) for k, n in keywords.items()})

    return call


def _listing(method: Callable[[KvmdClient, str], Iterable[Any]], key: str) -> Call:
    """A call of a VM's ``list_*`` ``method``, its items sorted by the field ``key``."""
    return lambda c, a: sorted(method(c, a.vm), key=attrgetter(key))


def _each(dest: str, act: Callable[[KvmdClient, str], Any]) -> Call:
    """A call that does ``act`` on each value of the argument ``dest`` in turn (for
    ``each=True``), yielding what ``act`` returns, or the value where that is None."""

    def call(c: KvmdClient, a: argparse.Namespace) -> Iterator[Any]:
        for value in getattr(a, dest):
            result = act(c, value)
            yield value if result is None else result

    return call


# ---------------------------------------------------------------------------------------------
# calls and views with more to them than one request


def _health(c: KvmdClient, a: argparse.Namespace) -> str:
    if a.wait:
        c.wait_ready(a.wait)
    return c.health()


def _cap(c: KvmdClient, a: argparse.Namespace) -> dict[str, Any]:
    capability: str | int
    try:
        capability = int(a.capability, 0)
    except ValueError:
        capability = a.capability
    value = c.check_extension(capability, a.vm)
    return {"capability": a.capability, "vm_id": a.vm, "value": value}


def _vm_create(c: KvmdClient, a: argparse.Namespace) -> vmm_pb2.Vm:
    return c.create_vm(
        a.vm,
        dict(a.label or ()),
        irqchip=a.irqchip,
        pit=a.pit,
        tss_address=a.tss_address,
        identity_map_address=a.identity_map_address,
        dirty_tracking=a.dirty_tracking,
        dirty_ring_bytes=a.dirty_ring_bytes,
    )


def _mem_add(c: KvmdClient, a: argparse.Namespace) -> vmm_pb2.MemoryRegion:
    if a.offset and a.file is None:
        raise UsageError("--offset needs --file")
    return c.add_memory_region(
        a.vm, a.guest_addr, a.size, read_only=a.read_only, log_dirty=a.log_dirty,
        file=a.file, file_offset=a.offset,
    )


def _mem_write(c: KvmdClient, a: argparse.Namespace) -> dict[str, Any]:
    if a.file is not None:
        written = c.write_file(a.vm, a.guest_addr, a.file, chunk_size=a.chunk_size)
    else:
        written = c.write_memory(a.vm, a.guest_addr, a.data_hex, chunk_size=a.chunk_size)
    return {"vm_id": a.vm, "guest_addr": a.guest_addr, "bytes_written": written}


def _mem_read(c: KvmdClient, a: argparse.Namespace) -> dict[str, Any]:
    if a.out is not None:
        count = c.read_to_file(a.vm, a.guest_addr, a.length, a.out)
        return {"vm_id": a.vm, "guest_addr": a.guest_addr, "length": count, "path": a.out}
    data = c.read_memory(a.vm, a.guest_addr, a.length)
    return {"vm_id": a.vm, "guest_addr": a.guest_addr, "length": len(data), "data": data}


def _mem_read_text(r: dict[str, Any], a: argparse.Namespace) -> str | bytes:
    if "path" in r:
        return (f"read {r['length']} bytes ({human_bytes(r['length'])}) from "
                f"{_hex(a.guest_addr)} into {r['path']}")
    return r["data"] if a.raw else hexdump(r["data"], a.guest_addr)


def _mem_discard(c: KvmdClient, a: argparse.Namespace) -> dict[str, Any]:
    released = c.discard_guest_memory(a.vm, a.guest_addr, a.size)
    return {"vm_id": a.vm, "guest_addr": a.guest_addr, "size": a.size,
            "released_bytes": released}


DIRTY_LOG_CHUNK = 1 << 20  # kvmctl dirty-log --stream: GetDirtyLog's chunk size


def _dirty_log(c: KvmdClient, a: argparse.Namespace) -> dict[str, Any]:
    # One round trip (PollDirtyLog), or with --stream chunks of GetDirtyLog.
    log = c.dirty_log(a.vm, a.slot, chunk_size=DIRTY_LOG_CHUNK if a.stream else 0)
    pages = log.pages()
    if a.clear and pages:  # manual mode: the pages read are handled
        runs: list[tuple[int, int]] = []
        for p in pages:
            if runs and runs[-1][0] + runs[-1][1] == p:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((p, 1))
        c.clear_dirty_log(a.vm, a.slot, runs)
    return {"vm_id": a.vm, "slot": a.slot, "dirty_count": log.dirty_count,
            "total_pages": log.total_pages, "pages": pages}


def _dirty_log_text(r: dict[str, Any], a: argparse.Namespace) -> str:
    lines = [f"slot {a.slot}: {r['dirty_count']} of {r['total_pages']} pages dirty"]
    if r["pages"]:
        lines.append(f"pages: {format_ranges(r['pages'])}")
    return "\n".join(lines)


def _irq_line(c: KvmdClient, a: argparse.Namespace) -> dict[str, Any]:
    c.set_irq_line(a.vm, a.irq, a.level)
    return {"vm_id": a.vm, "irq": a.irq, "active": a.level}


def _irq_route(c: KvmdClient, a: argparse.Namespace) -> dict[str, Any]:
    routes = [*(a.irqchip or ()), *(a.msi or ())]
    if not routes and not a.clear:
        raise UsageError("give --irqchip and/or --msi routes, or --clear for an empty table")
    c.set_gsi_routing(a.vm, routes)
    return {"vm_id": a.vm, "routes": routes}


def _irqfd_trigger(c: KvmdClient, a: argparse.Namespace) -> dict[str, Any]:
    for _ in range(a.count):
        c.trigger_irqfd(a.vm, a.irqfd)
    return {"vm_id": a.vm, "irqfd_id": a.irqfd, "triggered": a.count}


def _get_or_set(get: Callable[[KvmdClient, str, int], Any],
                put: Callable[[KvmdClient, str, int, dict[str, Any]], Any]) -> Call:
    """Show a vCPU's state, or first set the FIELD=VALUE assignments given (merged with the
    current state) and show the result."""

    def call(c: KvmdClient, a: argparse.Namespace) -> Any:
        updates = _assignments(a.assignments)
        return put(c, a.vm, a.vcpu, updates) if updates else get(c, a.vm, a.vcpu)

    return call


def _vcpu_cpuid(c: KvmdClient, a: argparse.Namespace) -> list[vmm_pb2.CpuidEntry]:
    if a.set_supported:
        return c.set_cpuid(a.vm, a.vcpu, use_supported=True)
    return c.get_cpuid(a.vm, a.vcpu)


def _vcpu_msrs(c: KvmdClient, a: argparse.Namespace) -> list[dict[str, int]]:
    if a.set:
        values = c.set_msrs(a.vm, a.vcpu, dict(a.set))
        if a.indices:
            values = {**values, **c.get_msrs(a.vm, a.vcpu, a.indices)}
    elif a.indices:
        values = c.get_msrs(a.vm, a.vcpu, a.indices)
    else:
        raise UsageError("give MSR indices to read and/or --set INDEX=VALUE")
    return [{"index": i, "value": v} for i, v in values.items()]


def _vcpu_mpstate(c: KvmdClient, a: argparse.Namespace) -> dict[str, str]:
    try:
        state = (c.set_mp_state(a.vm, a.vcpu, a.state) if a.state is not None
                 else c.get_mp_state(a.vm, a.vcpu))
    except ValueError as e:
        raise UsageError(str(e)) from None
    return {"state": state}


def _vcpu_lapic(c: KvmdClient, a: argparse.Namespace) -> dict[str, bytes]:
    if a.load is not None:
        with open(a.load, "rb") as f:
            regs = c.set_lapic(a.vm, a.vcpu, f.read())
    else:
        regs = c.get_lapic(a.vm, a.vcpu)
    if a.out is not None:
        with open(a.out, "wb") as f:
            f.write(regs)
    return {"regs": regs}


def _vcpu_lapic_text(r: dict[str, bytes], a: argparse.Namespace) -> str:
    if a.out is not None:
        return f"wrote {len(r['regs'])} bytes of LAPIC state to {a.out}"
    return hexdump(r["regs"])


def _vm_snapshot(c: KvmdClient, a: argparse.Namespace) -> vmm_pb2.SnapshotInfo:
    if a.state_dir_name:
        return c.snapshot_vm_to_state_dir(a.vm, a.state_dir_name, diff=a.diff,
                                          leave_paused=a.leave_paused)
    if not a.file:
        raise KvmdError("give FILE (on this machine), or --to-state-dir NAME")
    _data, info = c.snapshot_vm(a.vm, a.file, diff=a.diff, leave_paused=a.leave_paused)
    return info


def _vm_restore(c: KvmdClient, a: argparse.Namespace) -> vmm_pb2.Vm:
    if a.from_state_dir:
        return c.restore_vm(a.vm, start=a.start, files=a.from_state_dir)
    if not a.file:
        raise KvmdError("give FILE (on this machine), or --from-state-dir NAME")
    return c.restore_vm(a.vm, *(a.base or []), a.file, start=a.start)


def _console_write(c: KvmdClient, a: argparse.Namespace) -> dict[str, Any]:
    data = a.hex if a.hex is not None else (a.text or "").encode()
    if a.newline:
        data += b"\n"
    return {"vm_id": a.vm, "accepted": c.write_console(a.vm, data)}


# ---------------------------------------------------------------------------------------------
# commands that print as they go: streams, the console, migration progress, the demo


def _follow(watch: Any, duration: float | None, show: Callable[[Any], bool | None]) -> None:
    """Hand each item of ``watch`` to ``show`` until it returns True, the stream ends,
    ``duration`` seconds pass or Ctrl-C; the watch is cancelled in every case."""
    timer = None
    if duration is not None:
        timer = threading.Timer(duration, watch.cancel)
        timer.daemon = True
        timer.start()
    try:
        for item in watch:
            if show(item):
                break
    except KeyboardInterrupt:
        pass
    finally:
        if timer is not None:
            timer.cancel()
        watch.cancel()


def _run_stream(watch: Any, a: argparse.Namespace, kind: str,
                line: Callable[[Any], str]) -> None:
    """Print a watch's events as they come (JSON lines with --json) until --count events,
    --duration seconds, Ctrl-C or the end of the stream."""
    if not a.json:
        sys.stderr.write(f"watching {kind} of vm {a.vm}; Ctrl-C to stop\n")
        sys.stderr.flush()
    seen = itertools.count(1)

    def show(event: Any) -> bool:
        if a.json:
            _emit_json_line(message_to_dict(event))
        else:
            _out(line(event))
            sys.stdout.flush()
        return a.count is not None and next(seen) >= a.count

    _follow(watch, a.duration, show)


def _watch(kind: str, open_watch: Call, line: Callable[[Any], str]) -> Run:
    """A command that streams the events of the watch ``open_watch`` returns."""

    def run(c: KvmdClient, a: argparse.Namespace) -> None:
        _run_stream(open_watch(c, a), a, kind, line)

    return run


def _write_console_output(a: argparse.Namespace, data: bytes) -> None:
    if a.json:
        _emit_json_line({"data": data.decode("latin-1")})
    else:
        _print(data)


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError, OSError):  # closed or replaced stdin
        return False


def _forward_stdin(c: KvmdClient, vm_id: str, watch: Watch[Any], end_on_eof: bool) -> None:
    """Send each stdin line (newline included) to the guest's COM1 until EOF or an error;
    at EOF on a terminal (Ctrl-D) also end the console session."""
    try:
        for line in iter(sys.stdin.readline, ""):
            if watch.cancelled:
                return
            c.write_console(vm_id, line.encode())
    except KvmdError as e:
        if not watch.cancelled:
            sys.stderr.write(f"kvmctl: console input stopped: {e}\n")
            sys.stderr.flush()
        return
    except (OSError, ValueError):  # stdin closed under us
        return
    if end_on_eof:
        watch.cancel()


def _vm_console(c: KvmdClient, a: argparse.Namespace) -> None:
    """Print the console backlog, then (unless --no-follow) live output until Ctrl-C,
    --duration or the VM's deletion; with --interactive also send stdin lines to the guest."""
    if a.no_follow:
        if a.no_backlog:
            raise UsageError("--no-follow with --no-backlog would print nothing")
        c.get_vm(a.vm)  # NOT_FOUND now rather than an empty backlog
        data = console_backlog(c, a.vm, timeout=a.backlog_wait)
        if data:
            _write_console_output(a, data)
        return
    interactive = a.interactive if a.interactive is not None else _stdin_is_tty()
    watch = c.stream_console(a.vm, backlog=not a.no_backlog)
    if interactive:
        tty = _stdin_is_tty()
        if tty and not a.json:
            sys.stderr.write(f"console of vm {a.vm}: lines you type go to the guest; "
                             "Ctrl-D stops input, Ctrl-C quits\n")
            sys.stderr.flush()
        threading.Thread(target=_forward_stdin, args=(c, a.vm, watch, tty),
                         name="kvmctl-console-input", daemon=True).start()
    _follow(watch, a.duration, lambda chunk: _write_console_output(a, chunk.data))


_PHASE_NAMES = {vmm_pb2.MigrationProgress.CONNECTING: "connecting",
                vmm_pb2.MigrationProgress.COPYING: "copying",
                vmm_pb2.MigrationProgress.SWITCHING_OVER: "switching over",
                vmm_pb2.MigrationProgress.COMPLETED: "completed"}


def _progress_line(p: vmm_pb2.MigrationProgress) -> str:
    phase = _PHASE_NAMES.get(p.phase, "?")
    line = (f"{phase:<15} round {p.round:>3}  sent {human_bytes(p.bytes_sent):>9}  "
            f"remaining {p.pages_remaining:>7} pages")
    if p.throughput_bytes_per_second:
        line += f"  link {human_bytes(int(p.throughput_bytes_per_second))}/s"
    if p.dirty_pages_per_second:
        line += f"  dirty {p.dirty_pages_per_second:,.0f} pages/s"
    if p.expected_downtime_ms:
        line += f"  expected downtime {p.expected_downtime_ms:.1f} ms"
    if p.throttle_percent:
        line += f"  throttle {p.throttle_percent}%"
    return line


def _target_client(c: KvmdClient, a: argparse.Namespace) -> KvmdClient:
    """A client of the target daemon, with kvmctl's own credentials."""
    return KvmdClient(a.target_address or a.to, tls_ca=a.tls_ca, tls_cert=a.tls_cert,
                      tls_key=a.tls_key, tls_server_name=a.tls_server_name, timeout=a.timeout)


def _vm_migrate(c: KvmdClient, a: argparse.Namespace) -> None:
    """Prepare the target (unless --token), then migrate, printing progress."""
    token = a.token
    target_vm = a.target_vm or a.vm
    if not token:
        with _target_client(c, a) as target:
            token = target.prepare_incoming_migration(target_vm).token
    last = None
    for progress in c.iter_migrate_vm(
            a.vm, a.to, token, max_downtime_ms=a.max_downtime_ms,
            bandwidth_bytes_per_second=a.bandwidth or 0, max_rounds=a.max_rounds,
            auto_converge=a.auto_converge, tls_server_name=a.migration_server_name or ""):
        last = progress
        if a.json:
            _emit_json_line(message_to_dict(progress))
        elif progress.phase != vmm_pb2.MigrationProgress.COMPLETED:
            _out(_progress_line(progress))
    if last is None or last.phase != vmm_pb2.MigrationProgress.COMPLETED:
        raise KvmdError("the migration ended before it completed")
    if not a.json:
        _out(f"vm {a.vm} migrated to {a.to} as {last.target_vm_id}: "
             f"{human_bytes(last.bytes_sent)} in {last.elapsed_seconds:.2f} s, "
             f"{last.round} dirty rounds, downtime {last.downtime_ms:.1f} ms")


# What the demo's exit counters mean for this guest.
_DEMO_EXIT_NOTES = {
    "io": "port I/O exits (KVM_EXIT_IO), split below",
    "io_in": "port reads: the UART line status register, polled before each byte",
    "io_out": "port writes: UART bytes, counts to port 0x80, the debug exit",
    "unclaimed_pio": "accesses to ports no device claims (0x80): counted, dropped",
    "hlt": "HLT instructions",
}


class _ConsolePrinter:
    """Writes console bytes to stdout as text, remembering whether a line is open."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.at_line_start = True

    def __call__(self, data: bytes) -> None:
        text = self._decoder.decode(data)
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.at_line_start = text.endswith("\n")


def _demo_outcome(result: DemoResult) -> str:
    if result.reason == "debug_exit" and result.exit_code is not None:
        code = result.exit_code
        verdict = "" if result.ok else f" (expected {demo_guest.EXIT_CODE})"
        return (f"debug exit: the guest wrote {_hex(code)} to port "
                f"{_hex(demo_guest.DEBUG_EXIT_PORT)}: exit code {code}{verdict}, "
                f"{result.elapsed_seconds * 1000:.1f} ms after StartVm")
    return f"the guest did not exit cleanly: vm {result.state} ({result.reason or 'no reason'})"


def _demo(c: KvmdClient, a: argparse.Namespace) -> int:
    """Create a VM, run the demo guest with its console live on stdout, and report its exit
    code and exit counters; exit code 1 unless the guest ended with the expected code."""
    vm_id = a.vm_id or new_demo_vm_id()
    printer = _ConsolePrinter()

    def started(vm: str) -> None:
        _out(f"kvmctl demo: vm {vm} on {c.address}\n"
             f"  {human_bytes(demo_guest.MEMORY_SIZE)} of memory at 0x0, one vCPU in real "
             f"mode, a {len(demo_guest.IMAGE)}-byte guest at {_hex(demo_guest.LOAD_ADDRESS)}\n"
             "--- guest console (COM1) ---")
        sys.stdout.flush()

    if a.json:
        result = run_demo(c, vm_id, keep=a.keep, within=a.within)
        _emit_json({"address": c.address, **result.to_json()})
        return EXIT_OK if result.ok else EXIT_SERVER_ERROR
    result = run_demo(c, vm_id, keep=a.keep, within=a.within, on_output=printer,
                      on_started=started)
    if not printer.at_line_start:
        _out("")
    _out("--- end of console ---")
    _out(_demo_outcome(result))
    counts = result.vcpu_exit_counts.get(0, result.exit_counts)
    rows = [[reason, n, _DEMO_EXIT_NOTES.get(reason, "")] for reason, n in counts.items()]
    _out("exits of vcpu 0, by reason:")
    _out(format_table(["reason", "count", "what"], rows, empty="No exits."))
    if result.deleted:
        _out(f"deleted vm {result.vm_id} (--keep keeps it)")
    else:
        _out(f"kept vm {result.vm_id}: try kvmctl exits {result.vm_id}, "
             f"kvmctl vm console {result.vm_id} --no-follow, kvmctl vm delete {result.vm_id}")
    return EXIT_OK if result.ok else EXIT_SERVER_ERROR


# ---------------------------------------------------------------------------------------------
# the commands, in the order their help lists them

VM = arg("vm", metavar="VM", help="VM id")
VCPU = (VM, arg("vcpu", metavar="VCPU", type=parse_int, help="vCPU id"))
SLOT = arg("slot", metavar="SLOT", type=parse_int)
WATCH = (VM, arg("--count", type=parse_int, help="stop after this many events"),
         arg("--duration", type=float, metavar="SECONDS", help="stop after this long"))
EXITS = (VM, arg("--vcpu", type=parse_int, metavar="N", help="only this vCPU's counters"),
         arg("--all", action="store_true", help="show reasons with no exits too"))


def _assign(what: str) -> Arg:
    return arg("assignments", metavar="FIELD=VALUE", nargs="*", type=parse_assignment,
               help=f"set these {what} fields (merged with the current state) before "
               "showing them")


def _unregister(path: str, kind: str, method: Callable[[KvmdClient, str, str], None],
                aliases: tuple[str, ...] = ()) -> Command:
    """``... rm VM ID`` for an irqfd or an ioevent (``kind``, also the ID's argument name)."""

    def call(c: KvmdClient, a: argparse.Namespace) -> dict[str, Any]:
        method(c, a.vm, getattr(a, kind))
        return {"vm_id": a.vm, "unregistered": getattr(a, kind)}

    return Command(path=path, help=f"unregister an {kind}", aliases=aliases,
                   args=(VM, arg(kind, metavar="ID")), call=call,
                   text=lambda r, a: f"unregistered {kind} {r['unregistered']}")


def _list(path: str, kinds: str, method: Callable[[KvmdClient, str], Iterable[Any]],
          key: str, table: Callable[[Any], str], aliases: tuple[str, ...]) -> Command:
    """``... ls VM``: a VM's irqfds, ioevents or vCPUs, sorted by id."""
    return Command(path=path, help=f"list {kinds}", aliases=aliases, args=(VM,),
                   call=_listing(method, key), text=_of(table))


def _vm_action(action: str, help_text: str) -> Command:
    method = getattr(KvmdClient, f"{action}_vm")
    return Command(path=f"vm {action}", help=help_text, args=(VM,),
                   call=_request(method, "vm"), text=_of(_vm_state_line))


def _vcpu_action(action: str, help_text: str) -> Command:
    method = getattr(KvmdClient, "get_vcpu_state" if action == "state" else f"{action}_vcpu")
    return Command(path=f"vcpu {action}", help=help_text, args=VCPU,
                   call=_request(method, "vm", "vcpu"),
                   text=_of(_vcpu_state_line if action == "state" else _vcpu_line))


def _exits(path: str, help_text: str) -> Command:
    return Command(path=path, help=help_text, args=EXITS, call=_exit_counts, text=_exits_text,
                   json=_exits_json)


#: The command groups: (help in the list of commands, description in the group's help).
GROUPS = {
    "vm": ("create, inspect, list, run and delete VMs",
           "Create, inspect, list, run and delete VMs."),
    "migration": ("live migrations: prepare a target, list, cancel",
                  "Live migrations. A target daemon hands out a one-time token for an "
                  "incoming VM; 'kvmctl vm migrate' on the source uses it."),
    "snapshot": ("snapshot files in the daemon's state directory",
                 "Snapshot files in the daemon's state directory (kvmd --state-dir). Take "
                 "them with kvmctl vm snapshot VM --to-state-dir NAME."),
    "handover": ("daemon restarts and upgrades: the last hand-over, stranded VMs",
                 "A restarted or upgraded daemon (systemd fd store, or kvmd --take-over) "
                 "re-creates every VM. One it could not restore is stranded: its state and "
                 "memory are kept until retried or deleted."),
    "mem": ("guest memory regions and contents", "Guest memory regions and contents."),
    "irq": ("irq lines, GSI routing, MSIs, irqfds",
            "Interrupts: irq lines, GSI routing, MSIs, irqfds."),
    "ioevent": ("daemon-owned ioeventfds",
                "Guest PIO/MMIO writes observed through ioeventfds."),
    "vcpu": ("vCPUs: run control and register state",
             "Create, run and pause vCPUs; get and set their state."),
}

COMMANDS: list[Command] = [
    Command(path="health",
            help="the daemon's health (SERVING: exit 0); --wait for one that is starting",
            args=(arg("--wait", type=float, default=0, metavar="SECONDS",
                      help="wait up to SECONDS for the daemon to serve"),),
            call=_health, json=lambda status, a: {"status": status},
            exit_code=lambda status: EXIT_OK if status == "SERVING" else EXIT_SERVER_ERROR),
    Command(path="info", help="KVM and daemon information, limits, capabilities",
            args=(arg("--all", action="store_true", help="list absent capabilities too"),),
            call=_request(KvmdClient.info), text=_info_text),
    Command(path="cap", help="check one KVM capability (KVM_CHECK_EXTENSION)",
            args=(arg("capability", metavar="CAP",
                      help="name (KVM_CAP_IRQFD or irqfd) or number"),
                  arg("--vm", help="ask on this VM's fd")),
            call=_cap,
            text=lambda r, a: f"{r['capability']}: {r['value']}"
                              f"{'' if r['value'] else ' (absent)'}"),
    Command(path="supported-cpuid", help="the host's supported CPUID entries",
            call=_request(KvmdClient.supported_cpuid), text=_of(_cpuid_table)),
    # vm
    Command(path="vm create", help="create a VM",
            args=(VM,
                  arg("--label", "-l", metavar="KEY=VALUE", action="append", type=parse_label,
                      help="attach a label (repeatable)"),
                  arg("--irqchip", action="store_true", help="in-kernel PIC/IOAPIC/LAPIC"),
                  arg("--dirty-tracking", choices=["bitmap", "manual", "ring"], default="",
                      help="how KVM reports dirty pages (default bitmap; see kvmctl info)"),
                  arg("--dirty-ring-bytes", type=parse_size, default=0, metavar="SIZE",
                      help="per-vCPU dirty ring size with --dirty-tracking ring "
                      "(default 64K)"),
                  arg("--pit", action="store_true", help="in-kernel PIT (needs --irqchip)"),
                  arg("--tss-address", type=parse_int, default=0, metavar="ADDR",
                      help="KVM_SET_TSS_ADDR (default: the daemon's)"),
                  arg("--identity-map-address", type=parse_int, default=0, metavar="ADDR",
                      help="KVM_SET_IDENTITY_MAP_ADDR (default: the daemon's)")),
            call=_vm_create, text=_of(_vm_details)),
    Command(path="vm get", help="show one VM", aliases=("show",), args=(VM,),
            call=_request(KvmdClient.get_vm, "vm"), text=_of(_vm_details)),
    Command(path="vm list", help="list VMs", aliases=("ls",),
            args=(arg("--label", "-l", metavar="KEY=VALUE", action="append", type=parse_label,
                      help="only VMs carrying this label (repeatable: all must match)"),),
            call=lambda c, a: c.list_vms(dict(a.label or ())), text=_of(_vms_table)),
    Command(path="vm delete", help="delete VMs (stops vCPUs, frees everything)",
            aliases=("rm",), args=(arg("vm", metavar="VM", nargs="+", help="VM ids"),),
            call=_each("vm", KvmdClient.delete_vm), each=True,
            text=lambda vm_id, a: f"deleted vm {vm_id}",
            json=lambda vm_ids, a: {"deleted": vm_ids}),
    _vm_action("start", "start every vCPU in its own thread"),
    _vm_action("pause", "pause every running vCPU"),
    _vm_action("resume", "resume every paused vCPU"),
    _vm_action("stop", "stop every vCPU (the VM can be inspected and started again)"),
    Command(path="vm watch", help="stream state changes (one JSON object per line with --json)",
            args=(*WATCH,
                  arg("--current", action="store_true", help="first show the current state")),
            run=_watch("events", lambda c, a: c.watch_vm(a.vm, include_current=a.current),
                       _event_line)),
    Command(path="vm wait",
            help="wait until the VM reaches a state (default: stopped or crashed) or an event",
            args=(VM,
                  arg("--state", action="append", metavar="STATE",
                      help="a state to wait for (repeatable)"),
                  arg("--event", action="append", metavar="TYPE",
                      help="an event type to wait for, e.g. halted, debug_exit (repeatable)"),
                  arg("--within", type=float, default=30.0, metavar="SECONDS",
                      help="give up after this long (default 30; exit code 1)")),
            call=lambda c, a: c.wait_vm(
                a.vm, states=a.state or ([] if a.event else ["stopped", "crashed"]),
                events=a.event or (), timeout=a.within),
            text=_of(_event_line)),
    _exits("vm stats", "VM exit counters by reason, per vCPU (the same as kvmctl exits)"),
    Command(path="vm console",
            help="the guest's COM1 output: backlog, then live (raw bytes on stdout); "
            "Ctrl-C quits",
            args=(VM,
                  arg("--no-backlog", action="store_true", help="only new output"),
                  arg("--no-follow", action="store_true",
                      help="print the backlog and return (like cat, not tail -f)"),
                  arg("--backlog-wait", type=float, default=1.0, metavar="SECONDS",
                      help="with --no-follow, how long to wait for the backlog (default 1; "
                      "an empty backlog always takes this long)"),
                  arg("--duration", type=float, metavar="SECONDS",
                      help="stop after this long"),
                  one_of(arg("--interactive", "-i", dest="interactive", action="store_true",
                             default=None, help="send stdin lines to the guest (default "
                             "when stdin is a terminal)"),
                         arg("--no-interactive", dest="interactive", action="store_false",
                             help="never read stdin"))),
            run=_vm_console),
    Command(path="vm console-write", help="send input to the guest's COM1",
            args=(VM,
                  one_of(arg("text", metavar="TEXT", nargs="?", help="text to send"),
                         arg("--hex", "-x", type=parse_hex_data, help="bytes to send, in hex"),
                         required=True),
                  arg("--newline", "-n", action="store_true", help="append a newline")),
            call=_console_write,
            text=lambda r, a: f"sent {r['accepted']} bytes to the console of vm {a.vm}"),
    Command(path="vm snapshot",
            help="save the VM's complete state and memory into FILE on this machine (the VM "
            "is held paused meanwhile, then runs again unless --leave-paused)",
            args=(VM,
                  arg("file", metavar="FILE", nargs="?", help="where to write it, locally"),
                  arg("--diff", action="store_true", help="only pages dirtied since the VM's "
                      "last snapshot (restore with --base)"),
                  arg("--leave-paused", action="store_true",
                      help="keep the VM paused afterwards"),
                  arg("--to-state-dir", dest="state_dir_name", metavar="NAME",
                      help="write it to NAME in the daemon's state directory instead")),
            call=_vm_snapshot, text=_snapshot_text),
    Command(path="vm restore",
            help="create VM NEWID from a snapshot FILE on this machine (paused unless "
            "--start)",
            args=(arg("vm", metavar="NEWID", help="the new VM's id"),
                  arg("file", metavar="FILE", nargs="?", help="the snapshot (the last diff)"),
                  arg("--base", metavar="FILE", action="append",
                      help="the full snapshot FILE is a diff on (repeat for a chain, oldest "
                      "first)"),
                  arg("--start", action="store_true", help="run it at once"),
                  arg("--from-state-dir", metavar="NAME", action="append",
                      help="restore from NAME in the daemon's state directory (repeat: the "
                      "full snapshot first, then its diffs)")),
            call=_vm_restore, text=_of(_vm_details)),
    Command(path="vm migrate",
            help="live-migrate the VM to the kvmd at --to (host:port, as this daemon reaches "
            "it): the VM runs on there and is deleted here; any failure before the "
            "switch-over leaves it running here",
            args=(VM,
                  arg("--to", metavar="ADDRESS", required=True, help="the target daemon's "
                      "gRPC address (host:port), dialed by the source"),
                  arg("--token", metavar="TOKEN",
                      help="from 'kvmctl migration prepare' on the target (default: kvmctl "
                      "prepares the target itself, through --target-address)"),
                  arg("--target-address", metavar="ADDR",
                      help="the target daemon as kvmctl reaches it (default: --to)"),
                  arg("--target-vm", metavar="ID",
                      help="the VM's id on the target (default VM)"),
                  arg("--max-downtime-ms", type=parse_int, default=0, metavar="N",
                      help="longest pause for the switch-over (default 300, at least 4)"),
                  arg("--bandwidth", type=parse_size, metavar="BYTES",
                      help="bytes per second for the pre-copy rounds, e.g. 100M (default: "
                      "as fast as the link goes)"),
                  arg("--max-rounds", type=parse_int, default=0, metavar="N",
                      help="dirty rounds before giving up (default 30)"),
                  arg("--auto-converge", action="store_true", help="throttle the guest "
                      "while it dirties memory faster than the link"),
                  arg("--migration-server-name", metavar="NAME",
                      help="the name the target's certificate must carry (default: --to's "
                      "host)")),
            run=_vm_migrate),
    # migration
    Command(path="migration prepare",
            help="on the target daemon: expect VM (its id here), print the one-time token",
            args=(VM, arg("--ttl", type=parse_int, default=0, metavar="SECONDS",
                          help="how long the token is valid (default 300)")),
            call=_request(KvmdClient.prepare_incoming_migration, "vm", ttl_seconds="ttl"),
            text=lambda incoming, a: incoming.token),
    Command(path="migration list", help="migrations in progress", aliases=("ls",),
            call=_request(KvmdClient.list_migrations), text=_of(_migrations_table)),
    Command(path="migration cancel",
            help="cancel the VM's outgoing migration (before its switch-over)", args=(VM,),
            call=_request(KvmdClient.cancel_migration, "vm"), json=None,
            text=lambda _, a: f"cancelled the migration of vm {a.vm}; it runs on here"),
    # snapshot files
    Command(path="snapshot list", help="list snapshot files", aliases=("ls",),
            call=_request(KvmdClient.list_snapshots),
            text=lambda infos, a: format_table(SNAPSHOT_COLUMNS,
                                               [_snapshot_row(i) for i in infos],
                                               empty="No snapshot files.")),
    Command(path="snapshot delete", help="delete snapshot files", aliases=("rm",),
            args=(arg("name", metavar="NAME", nargs="+", help="file names"),),
            call=_each("name", KvmdClient.delete_snapshot), each=True, json=None,
            text=lambda name, a: f"deleted snapshot file {name}"),
    # hand-over: stranded VMs and the last hand-over's outage
    Command(path="handover report",
            help="the last hand-over this daemon received: outage and results",
            call=_request(KvmdClient.handover_report), text=_of(_handover_text)),
    Command(path="handover stranded", help="VMs a hand-over could not restore, and why",
            aliases=("list", "ls"), call=_request(KvmdClient.list_stranded_vms),
            text=_of(_stranded_table)),
    Command(path="handover retry", help="restore stranded VMs again",
            args=(arg("vm", metavar="VM", nargs="+", help="stranded VM ids"),),
            call=_each("vm", KvmdClient.retry_stranded_vm), each=True, json=None,
            text=lambda vm, a: f"restored vm {vm.vm_id}: {vm.state}"),
    Command(path="handover delete",
            help="give stranded VMs up: their saved state and memory are released",
            aliases=("rm",), args=(arg("vm", metavar="VM", nargs="+", help="stranded VM ids"),),
            call=_each("vm", KvmdClient.delete_stranded_vm), each=True, json=None,
            text=lambda vm_id, a: f"deleted stranded vm {vm_id}: its saved state and memory "
                                  "are gone"),
    # exits, demo
    _exits("exits", "VM exit counters by reason: the VM total and per vCPU"),
    Command(path="demo",
            help="run a tiny guest that greets you on its console, counts and exits: shows "
            "the console and the exit counters, then deletes the VM",
            args=(arg("--vm-id", metavar="ID", help="the VM's id (default demo-<random>)"),
                  arg("--keep", action="store_true", help="keep the VM afterwards (inspect "
                      "it with vm get, exits, vm console)"),
                  arg("--within", type=float, default=30.0, metavar="SECONDS",
                      help="give up if the guest has not stopped after this long "
                      "(default 30)")),
            run=_demo),
    # mem
    Command(path="mem add", help="map new zeroed memory into the guest",
            args=(VM,
                  arg("guest_addr", metavar="ADDR", type=parse_int,
                      help="page-aligned address"),
                  arg("size", metavar="SIZE", type=parse_size, help="bytes (K/M/G suffixes)"),
                  arg("--read-only", action="store_true", help="guest writes exit as MMIO "
                      "(with --file: the file is opened read-only)"),
                  arg("--log-dirty", action="store_true", help="track dirty pages"),
                  arg("--file", metavar="NAME",
                      help="back the slot with this file of the daemon's images directory "
                      "(shared: guest writes reach it)"),
                  arg("--offset", type=parse_int, default=0, metavar="N",
                      help="with --file: where the slot starts in the file (page aligned)")),
            call=_mem_add, text=lambda region, a: _regions_table([region])),
    Command(path="mem rm", help="remove a memory region", aliases=("remove",),
            args=(VM, SLOT), call=_request(KvmdClient.remove_memory_region, "vm", "slot"),
            text=lambda r, a: f"removed slot {r.slot} ({_hex(r.guest_addr)}, "
                              f"{human_bytes(r.size)}) from vm {a.vm}"),
    Command(path="mem ls", help="list memory regions", aliases=("list",), args=(VM,),
            call=_listing(KvmdClient.list_memory_regions, "slot"), text=_of(_regions_table)),
    Command(path="mem write", help="write bytes into guest memory",
            args=(VM,
                  arg("guest_addr", metavar="ADDR", type=parse_int),
                  one_of(arg("--file", "-f", metavar="PATH", help="stream this file"),
                         arg("--data-hex", "-x", metavar="HEX", type=parse_hex_data,
                             help="these bytes, in hex (e.g. f4 or 'b8 01 00 f4')"),
                         required=True),
                  arg("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE,
                      help="bytes per streamed message (default 1M)")),
            call=_mem_write,
            text=lambda r, a: f"wrote {r['bytes_written']} bytes "
                              f"({human_bytes(r['bytes_written'])}) at {_hex(a.guest_addr)} "
                              f"in vm {a.vm}"),
    Command(path="mem read", help="read guest memory (hex dump, raw, or to a file)",
            args=(VM,
                  arg("guest_addr", metavar="ADDR", type=parse_int),
                  arg("--length", "-n", type=parse_size, required=True, help="bytes to read"),
                  one_of(arg("--out", "-o", metavar="PATH",
                             help="write the bytes to this file"),
                         arg("--raw", action="store_true",
                             help="write the raw bytes to stdout"))),
            call=_mem_read, text=_mem_read_text),
    Command(path="mem discard",
            help="give the host pages behind a guest range back (balloon inflate); the range "
            "reads zeros until the guest writes it again",
            args=(VM,
                  arg("guest_addr", metavar="ADDR", type=parse_int,
                      help="page-aligned address"),
                  arg("size", metavar="SIZE", type=parse_size, help="page-aligned bytes")),
            call=_mem_discard,
            text=lambda r, a: f"discarded {_hex(a.guest_addr)}+{human_bytes(a.size)} in vm "
                              f"{a.vm}: {human_bytes(r['released_bytes'])} "
                              f"({r['released_bytes']} bytes) of host memory released"),
    Command(path="mem map",
            help="map a file of the daemon's images directory over part of a slot",
            args=(VM, SLOT,
                  arg("offset", metavar="OFFSET", type=parse_int, help="within the slot"),
                  arg("size", metavar="SIZE", type=parse_size, help="page-aligned bytes"),
                  arg("--file", metavar="NAME", required=True,
                      help="file name relative to the images directory"),
                  arg("--file-offset", type=parse_int, default=0, metavar="N",
                      help="where the mapping starts in the file (page aligned)"),
                  arg("--read-only", action="store_true",
                      help="open and map the file read-only (needs a read-only slot)")),
            call=_request(KvmdClient.map_guest_memory, "vm", "slot", "offset", "size", "file",
                          file_offset="file_offset", read_only="read_only"),
            text=lambda m, a: "mapped " + _mapping_line(m)),
    Command(path="mem unmap", help="unmap a file mapped over part of a slot (msync first)",
            args=(VM, SLOT, arg("offset", metavar="OFFSET", type=parse_int),
                  arg("size", metavar="SIZE", type=parse_size)),
            call=_request(KvmdClient.unmap_guest_memory, "vm", "slot", "offset", "size"),
            text=lambda m, a: "unmapped " + _mapping_line(m)),
    Command(path="mem sync", help="write guest writes to a slot's files back to disk (msync)",
            args=(VM, SLOT,
                  arg("--offset", type=parse_int, default=0, metavar="N",
                      help="start within the slot (default 0)"),
                  arg("--size", type=parse_size, default=0, metavar="N",
                      help="bytes (default: to the end of the slot)")),
            call=lambda c, a: {"vm_id": a.vm, "slot": a.slot, "synced_bytes":
                               c.sync_guest_memory(a.vm, a.slot, a.offset, a.size)},
            text=lambda r, a: f"synced {human_bytes(r['synced_bytes'])} ({r['synced_bytes']} "
                              f"bytes) of slot {a.slot} to its files"),
    # dirty pages
    Command(path="dirty-log",
            help="dirty pages of a slot since the last read (reading resets the log, except "
            "in manual mode: see --clear)",
            args=(VM, SLOT, arg("--clear", action="store_true", help="manual mode: then mark "
                                "the pages read clean (ClearDirtyLog)"),
                  arg("--stream", action="store_true", help="stream the log in chunks "
                      "(GetDirtyLog) rather than one reply (PollDirtyLog; slots too big "
                      "for one message are streamed anyway)")),
            call=_dirty_log, text=_dirty_log_text),
    Command(path="dirty-logging", help="turn dirty logging of an existing slot on or off",
            args=(VM, SLOT, arg("state", choices=["on", "off"])),
            call=lambda c, a: c.set_dirty_logging(a.vm, a.slot, a.state == "on"),
            text=lambda r, a: f"slot {r.slot}: dirty logging {'on' if r.log_dirty else 'off'}"),
    Command(path="dirty-rate",
            help="measure the VM's dirty rate (pages per second) over a period",
            args=(VM, arg("--duration", type=float, default=1.0, metavar="SECONDS",
                          help="how long to measure (default 1)")),
            call=lambda c, a: c.measure_dirty_rate(a.vm, int(a.duration * 1000)),
            text=lambda r, a: f"vm {a.vm}: {r.dirty_pages_per_second:.0f} pages/s "
                              f"({r.dirty_pages} pages in {r.seconds:.2f} s)"),
    # irq
    Command(path="irq line", help="raise or lower an in-kernel irqchip line",
            args=(VM, arg("irq", metavar="IRQ", type=parse_int),
                  arg("level", metavar="LEVEL", type=parse_level,
                      help="1/high/on or 0/low/off")),
            call=_irq_line,
            text=lambda r, a: f"irq {a.irq} {'raised' if a.level else 'lowered'} in vm {a.vm}"),
    Command(path="irq route", help="replace the whole GSI routing table",
            args=(VM,
                  arg("--irqchip", metavar="GSI:CHIP:PIN", action="append",
                      type=parse_irqchip_route, help="route GSI to an irqchip pin; CHIP is "
                      "pic-master, pic-slave or ioapic"),
                  arg("--msi", metavar="GSI:ADDR:DATA[:DEVID]", action="append",
                      type=parse_msi_route, help="route GSI to an MSI"),
                  arg("--clear", action="store_true", help="allow an empty table")),
            call=_irq_route, text=_routes_text),
    Command(path="irq msi", help="inject an MSI",
            args=(VM, arg("msi_address", metavar="ADDR", type=parse_int),
                  arg("data", metavar="DATA", type=parse_int), arg("--devid", type=parse_int)),
            call=lambda c, a: {"vm_id": a.vm, "delivered":
                               c.signal_msi(a.vm, a.msi_address, a.data, a.devid)},
            text=lambda r, a: "MSI delivered" if r["delivered"]
            else "MSI not delivered (blocked by the guest)"),
    Command(path="irq irqfd-add", help="bind a new daemon-owned irqfd to a GSI",
            args=(VM, arg("irqfd", metavar="ID"), arg("gsi", metavar="GSI", type=parse_int),
                  arg("--resample", action="store_true",
                      help="level-triggered, with resample")),
            call=_request(KvmdClient.register_irqfd, "vm", "irqfd", "gsi",
                          resample="resample"),
            text=lambda irqfd, a: _irqfds_table([irqfd])),
    Command(path="irq irqfd-trigger", help="signal an irqfd (inject its irq)",
            args=(VM, arg("irqfd", metavar="ID"),
                  arg("--count", type=parse_int, default=1, help="times to trigger "
                      "(default 1)")),
            call=_irqfd_trigger,
            text=lambda r, a: f"triggered irqfd {a.irqfd}"
                              f"{'' if a.count == 1 else f' {a.count} times'}"),
    _unregister("irq irqfd-rm", "irqfd", KvmdClient.unregister_irqfd),
    _list("irq irqfd-ls", "irqfds", KvmdClient.list_irqfds, "irqfd_id", _irqfds_table, ()),
    Command(path="irq watch-resamples",
            help="stream resample events (one JSON object per line with --json)", args=WATCH,
            run=_watch("irqfd resamples", _request(KvmdClient.watch_irqfd_resamples, "vm"),
                       _count_line("irqfd_id"))),
    # ioevent
    Command(path="ioevent add", help="watch guest writes to a PIO or MMIO address",
            args=(VM, arg("ioevent", metavar="ID"),
                  arg("io_address", metavar="ADDR", type=parse_int),
                  one_of(arg("--pio", dest="space", action="store_const", const="pio",
                             help="port I/O address (default)"),
                         arg("--mmio", dest="space", action="store_const", const="mmio",
                             help="MMIO address")),
                  arg("--length", type=parse_int, default=0,
                      help="access size 1, 2, 4 or 8 (default 0: any)"),
                  arg("--datamatch", type=parse_int, help="only writes of this value")),
            defaults={"space": "pio"},
            call=_request(KvmdClient.register_ioevent, "vm", "ioevent", "io_address",
                          "length", space="space", datamatch="datamatch"),
            text=lambda ioevent, a: _ioevents_table([ioevent])),
    _unregister("ioevent rm", "ioevent", KvmdClient.unregister_ioevent, ("remove",)),
    _list("ioevent ls", "ioevents", KvmdClient.list_ioevents, "ioevent_id", _ioevents_table,
          ("list",)),
    Command(path="ioevent watch",
            help="stream ioevent firings (one JSON object per line with --json)", args=WATCH,
            run=_watch("ioevents", _request(KvmdClient.watch_ioevents, "vm"),
                       _count_line("ioevent_id"))),
    # vcpu
    Command(path="vcpu create", help="create a vCPU", args=VCPU,
            call=_request(KvmdClient.create_vcpu, "vm", "vcpu"),
            text=lambda v, a: f"created vcpu {v.vcpu_id} in vm {v.vm_id} "
                              f"({v.state or 'created'})"),
    _list("vcpu ls", "vCPUs", KvmdClient.list_vcpus, "vcpu_id",
          lambda vcpus: format_table(["vcpu", "state", "cpu"],
                                     [[v.vcpu_id, v.state, f"{v.cpu_seconds:.2f}s"]
                                      for v in vcpus], empty="No vCPUs."), ("list",)),
    _vcpu_action("start", "start one vCPU's thread"),
    _vcpu_action("pause", "pause one vCPU"),
    _vcpu_action("resume", "resume one vCPU"),
    _vcpu_action("stop", "stop one vCPU"),
    _vcpu_action("state", "show one vCPU's run state"),
    Command(path="vcpu inject",
            help="queue an external interrupt (VMs without the in-kernel irqchip)",
            args=(*VCPU, arg("vector", metavar="VECTOR", type=parse_int)),
            call=_request(KvmdClient.inject_interrupt, "vm", "vcpu", "vector"),
            text=lambda _, a: f"queued vector {_hex(a.vector)} for vcpu {a.vcpu} of vm {a.vm}"),
    Command(path="vcpu regs", help="show general-purpose registers", args=VCPU,
            call=_request(KvmdClient.get_regs, "vm", "vcpu"), text=_of(_regs_text)),
    Command(path="vcpu set-regs",
            help="set general-purpose registers, e.g. rip=0x1000 rflags=0x2",
            args=(*VCPU, arg("assignments", metavar="REG=VALUE", nargs="+",
                             type=parse_assignment,
                             help="registers to change; the others keep their values")),
            call=lambda c, a: c.set_regs(a.vm, a.vcpu, _assignments(a.assignments)),
            text=_of(_regs_text)),
    Command(path="vcpu sregs",
            help="show (or set, e.g. cr0=0x10 cs.base=0 cs.selector=0) special registers",
            args=(*VCPU, _assign("special register")),
            call=_get_or_set(KvmdClient.get_sregs, KvmdClient.set_sregs),
            text=_of(_sregs_text)),
    Command(path="vcpu fpu", help="show (or set, e.g. fcw=0x37f) the FPU/SSE state",
            args=(*VCPU, _assign("FPU")),
            call=_get_or_set(KvmdClient.get_fpu, KvmdClient.set_fpu), text=_of(_fpu_text)),
    Command(path="vcpu cpuid", help="show the vCPU's CPUID entries",
            args=(*VCPU, arg("--set-supported", action="store_true",
                             help="first set the host's supported CPUID")),
            call=_vcpu_cpuid, text=_of(_cpuid_table)),
    Command(path="vcpu msrs", help="read (and/or write) MSRs",
            args=(*VCPU,
                  arg("indices", metavar="INDEX", nargs="*", type=parse_int,
                      help="MSRs to read, e.g. 0x10 0x174"),
                  arg("--set", metavar="INDEX=VALUE", action="append",
                      type=parse_msr_assignment, help="write an MSR (repeatable)")),
            call=_vcpu_msrs,
            text=lambda msrs, a: format_table(
                ["msr", "value"], [[_hex(m["index"], 8), _hex(m["value"], 16)] for m in msrs])),
    Command(path="vcpu mpstate", help="show (or set) the multiprocessing state",
            args=(*VCPU, arg("state", metavar="STATE", nargs="?",
                             choices=[v.name.lower()
                                      for v in vmm_pb2.MpState.State.DESCRIPTOR.values],
                             type=str.lower, help="set this state first: %(choices)s")),
            call=_vcpu_mpstate, text=lambda r, a: r["state"]),
    Command(path="vcpu lapic", help="show (save, load) the local APIC page",
            args=(*VCPU,
                  arg("--out", "-o", metavar="PATH",
                      help="save the 1024-byte page to a file"),
                  arg("--load", metavar="PATH", help="first load the page from a file")),
            call=_vcpu_lapic, text=_vcpu_lapic_text),
    Command(path="vcpu events",
            help="show (or set, e.g. nmi_pending=1) pending exceptions/interrupts/NMIs",
            args=(*VCPU, _assign("vCPU event")),
            call=_get_or_set(KvmdClient.get_vcpu_events, KvmdClient.set_vcpu_events),
            text=_of(_message_kv)),
]


# ---------------------------------------------------------------------------------------------
# parser: built from GROUPS and COMMANDS


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def _add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Connection and output options, accepted both before and after the subcommand."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--address",
        metavar="ADDR",
        default=default(os.environ.get("KVMD_ADDRESS", DEFAULT_ADDRESS)),
        help=f"daemon address: unix:///path.sock or host:port (env KVMD_ADDRESS; default "
        f"{DEFAULT_ADDRESS})",
    )
    group.add_argument("--tls-ca", metavar="PEM", default=default(None),
                       help="CA certificate of the daemon (turns on TLS for TCP addresses)")
    group.add_argument("--tls-cert", metavar="PEM", default=default(None),
                       help="client certificate for mutual TLS")
    group.add_argument("--tls-key", metavar="PEM", default=default(None),
                       help="client private key for mutual TLS")
    group.add_argument("--tls-server-name", metavar="NAME", default=default(None),
                       help="expected server name in the daemon's certificate")
    group.add_argument("--timeout", metavar="SECONDS", type=float, default=default(30.0),
                       help="deadline for each call (default 30)")
    group.add_argument("--retry-timeout", metavar="SECONDS", type=float,
                       default=default(10.0),
                       help="ride out a daemon restart or hand-over this long: calls are "
                       "retried, streams re-opened (default 10; 0: never)")
    group.add_argument("--json", action="store_true", default=default(False),
                       help="machine-readable JSON on stdout")


def _subparsers(parser: argparse.ArgumentParser, dest: str) -> Any:
    return parser.add_subparsers(dest=dest, metavar="COMMAND", title="commands", required=True)


def build_parser() -> argparse.ArgumentParser:
    """The kvmctl argument parser, one sub-parser per entry of COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="kvmctl",
        description="Control a kvmd daemon: VMs, guest memory, interrupts, ioevents, vCPUs.",
        epilog="New here? Start the daemon (make run), then try: kvmctl demo\n"
        "Numbers take decimal or 0x hex; sizes also K/M/G suffixes (2M = 2 MiB).\n"
        "Exit codes: 0 ok, 1 request failed, 2 usage error, 3 daemon unreachable.",
        formatter_class=_Formatter,
    )
    _add_common(parser, top=True)
    top = _subparsers(parser, "command")
    groups: dict[str, Any] = {}
    for command in COMMANDS:
        group, _, name = command.path.rpartition(" ")
        subs = top
        if group:
            if group not in groups:  # a group's parser comes with its first command
                help_text, description = GROUPS[group]
                sub = top.add_parser(group, help=help_text, description=description)
                groups[group] = _subparsers(sub, f"{group}_command")
            subs = groups[group]
        p = subs.add_parser(name, help=command.help, description=command.help,
                            aliases=list(command.aliases), formatter_class=_Formatter)
        p.set_defaults(func=command)
        for argument in command.args:
            argument.add_to(p)
        if command.defaults:
            p.set_defaults(**command.defaults)
        _add_common(p, top=False)
    return parser


# ---------------------------------------------------------------------------------------------
# entry point


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"error: {message}\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run kvmctl with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        client = KvmdClient(
            args.address,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_server_name=args.tls_server_name,
            timeout=args.timeout,
            transfer_timeout=args.timeout,  # --timeout bounds every call, transfers too
            retry_timeout=args.retry_timeout,
        )
    except ValueError as e:
        return _fail(str(e), EXIT_USAGE)
    except OSError as e:
        return _fail(f"cannot read TLS file: {e}", EXIT_USAGE)
    try:
        with client:
            code = args.func(client, args)
            sys.stdout.flush()
    except UsageError as e:
        sys.stderr.write(f"kvmctl: error: {e}\n")
        return EXIT_USAGE
    except UnavailableError as e:
        if e.reason:  # the daemon answered (a hand-over in progress): its own words
            return _fail(str(e), EXIT_UNAVAILABLE)
        return _fail(f"{e.code_name}: cannot reach kvmd at {args.address}: {e.message}",
                     EXIT_UNAVAILABLE)
    except KvmdError as e:
        return _fail(str(e), EXIT_SERVER_ERROR)
    except (ValueError, TypeError) as e:  # a field assignment that does not fit its field
        return _fail(str(e), EXIT_USAGE)
    except BrokenPipeError:
        # stdout closed early (kvmctl ... | head): not an error worth a traceback
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_OK
    except OSError as e:
        return _fail(str(e), EXIT_SERVER_ERROR)
    except KeyboardInterrupt:
        return 130
    return code if isinstance(code, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
