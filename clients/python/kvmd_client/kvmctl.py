"""kvmctl: the command-line interface to a kvmd daemon.

Human-readable tables by default, ``--json`` for scripts. Exit codes: 0 success, 1 the daemon
refused or failed the request (``error: <CODE>: <message>`` on stderr), 2 usage error, 3 the
daemon cannot be reached. Numbers accept decimal and ``0x`` hex; sizes also take K/M/G/T
suffixes (binary: 2M = 2 MiB).
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

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

#: A command handler; it may return an exit code (None means success).
Handler = Callable[[KvmdClient, argparse.Namespace], int | None]

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


def _show(a: argparse.Namespace, message: Any, text: Callable[[Any], str]) -> None:
    """Print ``message`` as JSON with --json, else as ``text(message)``."""
    if a.json:
        _emit_json(message_to_dict(message))
    else:
        _out(text(message))


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
# command handlers


def cmd_health(c: KvmdClient, a: argparse.Namespace) -> int:
    """The daemon's grpc.health.v1 status; with --wait, first wait until it serves."""
    if a.wait:
        c.wait_ready(a.wait)
    status = c.health()
    if a.json:
        _emit_json({"status": status})
    else:
        _out(status)
    return EXIT_OK if status == "SERVING" else EXIT_SERVER_ERROR


def cmd_info(c: KvmdClient, a: argparse.Namespace) -> None:
    info = c.info()
    if a.json:
        _emit_json(message_to_dict(info))
        return
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
    _out(f"{text}\n\nlimits:\n{limit_text}\n\ncapabilities ({what}):\n{cap_table}")


def cmd_cap(c: KvmdClient, a: argparse.Namespace) -> None:
    capability: str | int
    try:
        capability = int(a.capability, 0)
    except ValueError:
        capability = a.capability
    value = c.check_extension(capability, a.vm)
    if a.json:
        _emit_json({"capability": a.capability, "vm_id": a.vm, "value": value})
    else:
        _out(f"{a.capability}: {value}{'' if value else ' (absent)'}")


def cmd_supported_cpuid(c: KvmdClient, a: argparse.Namespace) -> None:
    entries = c.supported_cpuid()
    if a.json:
        _emit_json([message_to_dict(e) for e in entries])
    else:
        _out(_cpuid_table(entries))


def cmd_vm_create(c: KvmdClient, a: argparse.Namespace) -> None:
    vm = c.create_vm(
        a.vm,
        dict(a.label or ()),
        irqchip=a.irqchip,
        pit=a.pit,
        tss_address=a.tss_address,
        identity_map_address=a.identity_map_address,
        dirty_tracking=a.dirty_tracking,
        dirty_ring_bytes=a.dirty_ring_bytes,
    )
    _show(a, vm, _vm_details)


def cmd_vm_get(c: KvmdClient, a: argparse.Namespace) -> None:
    _show(a, c.get_vm(a.vm), _vm_details)


def cmd_vm_list(c: KvmdClient, a: argparse.Namespace) -> None:
    vms = c.list_vms(dict(a.label or ()))
    if a.json:
        _emit_json([message_to_dict(vm) for vm in vms])
        return
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
    _out(format_table(["vm", "state", "vcpus", "slots", "memory", "created", "labels"], rows,
                      empty="No VMs."))


def cmd_vm_delete(c: KvmdClient, a: argparse.Namespace) -> None:
    for vm_id in a.vm:
        c.delete_vm(vm_id)
        if not a.json:
            _out(f"deleted vm {vm_id}")
    if a.json:
        _emit_json({"deleted": a.vm})


def cmd_mem_add(c: KvmdClient, a: argparse.Namespace) -> None:
    if a.offset and a.file is None:
        raise UsageError("--offset needs --file")
    region = c.add_memory_region(
        a.vm, a.guest_addr, a.size, read_only=a.read_only, log_dirty=a.log_dirty,
        file=a.file, file_offset=a.offset,
    )
    _show(a, region, lambda r: _regions_table([r]))


def cmd_mem_rm(c: KvmdClient, a: argparse.Namespace) -> None:
    region = c.remove_memory_region(a.vm, a.slot)
    if a.json:
        _emit_json(message_to_dict(region))
    else:
        _out(f"removed slot {region.slot} ({_hex(region.guest_addr)}, "
             f"{human_bytes(region.size)}) from vm {a.vm}")


def cmd_mem_ls(c: KvmdClient, a: argparse.Namespace) -> None:
    regions = sorted(c.list_memory_regions(a.vm), key=lambda r: r.slot)
    if a.json:
        _emit_json([message_to_dict(r) for r in regions])
    else:
        _out(_regions_table(regions))


def cmd_mem_write(c: KvmdClient, a: argparse.Namespace) -> None:
    if a.file is not None:
        written = c.write_file(a.vm, a.guest_addr, a.file, chunk_size=a.chunk_size)
    else:
        written = c.write_memory(a.vm, a.guest_addr, a.data_hex, chunk_size=a.chunk_size)
    if a.json:
        _emit_json({"vm_id": a.vm, "guest_addr": a.guest_addr, "bytes_written": written})
    else:
        _out(f"wrote {written} bytes ({human_bytes(written)}) at {_hex(a.guest_addr)} "
             f"in vm {a.vm}")


def cmd_mem_read(c: KvmdClient, a: argparse.Namespace) -> None:
    if a.out is not None:
        count = c.read_to_file(a.vm, a.guest_addr, a.length, a.out)
        if a.json:
            _emit_json({"vm_id": a.vm, "guest_addr": a.guest_addr, "length": count,
                        "path": a.out})
        else:
            _out(f"read {count} bytes ({human_bytes(count)}) from {_hex(a.guest_addr)} "
                 f"into {a.out}")
        return
    data = c.read_memory(a.vm, a.guest_addr, a.length)
    if a.json:
        _emit_json({"vm_id": a.vm, "guest_addr": a.guest_addr, "length": len(data),
                    "data": data.hex()})
    elif a.raw:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        _out(hexdump(data, a.guest_addr))


# -- mem discard / map / unmap / sync (guest memory: discard and files) --


def _mapping_line(m: vmm_pb2.GuestFileMapping) -> str:
    mode = "read-only" if m.file.read_only else "read-write"
    return (f"slot {m.slot} {_hex(m.offset)}+{human_bytes(m.size)} (guest {_hex(m.guest_addr)}): "
            f"{m.file.name} from {_hex(m.file.offset)}, {mode}")


def cmd_mem_discard(c: KvmdClient, a: argparse.Namespace) -> None:
    released = c.discard_guest_memory(a.vm, a.guest_addr, a.size)
    if a.json:
        _emit_json({"vm_id": a.vm, "guest_addr": a.guest_addr, "size": a.size,
                    "released_bytes": released})
    else:
        _out(f"discarded {_hex(a.guest_addr)}+{human_bytes(a.size)} in vm {a.vm}: "
             f"{human_bytes(released)} ({released} bytes) of host memory released")


def cmd_mem_map(c: KvmdClient, a: argparse.Namespace) -> None:
    mapping = c.map_guest_memory(a.vm, a.slot, a.offset, a.size, a.file,
                                 file_offset=a.file_offset, read_only=a.read_only)
    _show(a, mapping, lambda m: "mapped " + _mapping_line(m))


def cmd_mem_unmap(c: KvmdClient, a: argparse.Namespace) -> None:
    mapping = c.unmap_guest_memory(a.vm, a.slot, a.offset, a.size)
    _show(a, mapping, lambda m: "unmapped " + _mapping_line(m))


def cmd_mem_sync(c: KvmdClient, a: argparse.Namespace) -> None:
    synced = c.sync_guest_memory(a.vm, a.slot, a.offset, a.size)
    if a.json:
        _emit_json({"vm_id": a.vm, "slot": a.slot, "synced_bytes": synced})
    else:
        _out(f"synced {human_bytes(synced)} ({synced} bytes) of slot {a.slot} to its files")


def cmd_dirty_log(c: KvmdClient, a: argparse.Namespace) -> None:
    log = c.dirty_log(a.vm, a.slot)
    pages = log.pages()
    if a.clear and pages:  # manual mode: the pages read are handled
        runs: list[tuple[int, int]] = []
        for p in pages:
            if runs and runs[-1][0] + runs[-1][1] == p:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((p, 1))
        c.clear_dirty_log(a.vm, a.slot, runs)
    if a.json:
        _emit_json({"vm_id": a.vm, "slot": a.slot, "dirty_count": log.dirty_count,
                    "total_pages": log.total_pages, "pages": pages})
        return
    lines = [f"slot {a.slot}: {log.dirty_count} of {log.total_pages} pages dirty"]
    if pages:
        lines.append(f"pages: {format_ranges(pages)}")
    _out("\n".join(lines))


def cmd_dirty_logging(c: KvmdClient, a: argparse.Namespace) -> None:
    region = c.set_dirty_logging(a.vm, a.slot, a.state == "on")
    _show(a, region, lambda r: f"slot {r.slot}: dirty logging "
          f"{'on' if r.log_dirty else 'off'}")


def cmd_dirty_rate(c: KvmdClient, a: argparse.Namespace) -> None:
    rate = c.measure_dirty_rate(a.vm, int(a.duration * 1000))
    _show(a, rate, lambda r: f"vm {a.vm}: {r.dirty_pages_per_second:.0f} pages/s "
          f"({r.dirty_pages} pages in {r.seconds:.2f} s)")


def cmd_irq_line(c: KvmdClient, a: argparse.Namespace) -> None:
    c.set_irq_line(a.vm, a.irq, a.level)
    if a.json:
        _emit_json({"vm_id": a.vm, "irq": a.irq, "active": a.level})
    else:
        _out(f"irq {a.irq} {'raised' if a.level else 'lowered'} in vm {a.vm}")


def cmd_irq_route(c: KvmdClient, a: argparse.Namespace) -> None:
    routes = [*(a.irqchip or ()), *(a.msi or ())]
    if not routes and not a.clear:
        raise UsageError("give --irqchip and/or --msi routes, or --clear for an empty table")
    c.set_gsi_routing(a.vm, routes)
    if a.json:
        _emit_json({"vm_id": a.vm, "routes": [message_to_dict(r) for r in routes]})
        return
    rows = []
    for r in sorted(routes, key=lambda r: r.gsi):
        if r.HasField("irqchip"):
            rows.append([r.gsi, "irqchip",
                         f"{vmm_pb2.IrqChipPin.Chip.Name(r.irqchip.chip)} pin {r.irqchip.pin}"])
        else:
            devid = f" devid {r.msi.devid}" if r.msi.HasField("devid") else ""
            rows.append([r.gsi, "msi", f"address {_hex(r.msi.address)} data "
                                       f"{_hex(r.msi.data)}{devid}"])
    _out(f"set {len(routes)} GSI routes in vm {a.vm}")
    if rows:
        _out(format_table(["gsi", "type", "target"], rows))


def cmd_irq_msi(c: KvmdClient, a: argparse.Namespace) -> None:
    delivered = c.signal_msi(a.vm, a.msi_address, a.data, a.devid)
    if a.json:
        _emit_json({"vm_id": a.vm, "delivered": delivered})
    else:
        _out("MSI delivered" if delivered else "MSI not delivered (blocked by the guest)")


def cmd_irqfd_add(c: KvmdClient, a: argparse.Namespace) -> None:
    irqfd = c.register_irqfd(a.vm, a.irqfd, a.gsi, resample=a.resample)
    _show(a, irqfd, lambda i: _irqfds_table([i]))


def cmd_irqfd_trigger(c: KvmdClient, a: argparse.Namespace) -> None:
    for _ in range(a.count):
        c.trigger_irqfd(a.vm, a.irqfd)
    if a.json:
        _emit_json({"vm_id": a.vm, "irqfd_id": a.irqfd, "triggered": a.count})
    else:
        times = "" if a.count == 1 else f" {a.count} times"
        _out(f"triggered irqfd {a.irqfd}{times}")


def cmd_irqfd_rm(c: KvmdClient, a: argparse.Namespace) -> None:
    c.unregister_irqfd(a.vm, a.irqfd)
    if a.json:
        _emit_json({"vm_id": a.vm, "unregistered": a.irqfd})
    else:
        _out(f"unregistered irqfd {a.irqfd}")


def cmd_irqfd_ls(c: KvmdClient, a: argparse.Namespace) -> None:
    irqfds = sorted(c.list_irqfds(a.vm), key=lambda i: i.irqfd_id)
    if a.json:
        _emit_json([message_to_dict(i) for i in irqfds])
    else:
        _out(_irqfds_table(irqfds))


def _run_stream(watch: Any, a: argparse.Namespace, kind: str,
                line: Callable[[Any], str]) -> None:
    """Print a watch's events as they come (JSON lines with --json) until --count events,
    --duration seconds, Ctrl-C or the end of the stream."""
    if not a.json:
        sys.stderr.write(f"watching {kind} of vm {a.vm}; Ctrl-C to stop\n")
        sys.stderr.flush()
    timer = None
    if a.duration is not None:
        timer = threading.Timer(a.duration, watch.cancel)
        timer.daemon = True
        timer.start()
    seen = 0
    try:
        for event in watch:
            seen += 1
            if a.json:
                _emit_json_line(message_to_dict(event))
            else:
                _out(line(event))
                sys.stdout.flush()
            if a.count is not None and seen >= a.count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        if timer is not None:
            timer.cancel()
        watch.cancel()


def _count_line(id_field: str) -> Callable[[Any], str]:
    def line(event: Any) -> str:
        return f"{time.strftime('%H:%M:%S')}  {getattr(event, id_field)}  count={event.count}"

    return line


def cmd_irq_watch(c: KvmdClient, a: argparse.Namespace) -> None:
    _run_stream(c.watch_irqfd_resamples(a.vm), a, "irqfd resamples", _count_line("irqfd_id"))


def cmd_ioevent_add(c: KvmdClient, a: argparse.Namespace) -> None:
    ioevent = c.register_ioevent(
        a.vm, a.ioevent, a.io_address, a.length, space=a.space, datamatch=a.datamatch
    )
    _show(a, ioevent, lambda e: _ioevents_table([e]))


def cmd_ioevent_rm(c: KvmdClient, a: argparse.Namespace) -> None:
    c.unregister_ioevent(a.vm, a.ioevent)
    if a.json:
        _emit_json({"vm_id": a.vm, "unregistered": a.ioevent})
    else:
        _out(f"unregistered ioevent {a.ioevent}")


def cmd_ioevent_ls(c: KvmdClient, a: argparse.Namespace) -> None:
    ioevents = sorted(c.list_ioevents(a.vm), key=lambda e: e.ioevent_id)
    if a.json:
        _emit_json([message_to_dict(e) for e in ioevents])
    else:
        _out(_ioevents_table(ioevents))


def cmd_ioevent_watch(c: KvmdClient, a: argparse.Namespace) -> None:
    _run_stream(c.watch_ioevents(a.vm), a, "ioevents", _count_line("ioevent_id"))


def cmd_vcpu_create(c: KvmdClient, a: argparse.Namespace) -> None:
    vcpu = c.create_vcpu(a.vm, a.vcpu)
    if a.json:
        _emit_json(message_to_dict(vcpu))
    else:
        _out(f"created vcpu {vcpu.vcpu_id} in vm {vcpu.vm_id} ({vcpu.state or 'created'})")


def cmd_vcpu_ls(c: KvmdClient, a: argparse.Namespace) -> None:
    vcpus = sorted(c.list_vcpus(a.vm), key=lambda v: v.vcpu_id)
    if a.json:
        _emit_json([message_to_dict(v) for v in vcpus])
    else:
        _out(format_table(["vcpu", "state"], [[v.vcpu_id, v.state] for v in vcpus],
                          empty="No vCPUs."))


def cmd_vcpu_regs(c: KvmdClient, a: argparse.Namespace) -> None:
    _show(a, c.get_regs(a.vm, a.vcpu), _regs_text)


def cmd_vcpu_set_regs(c: KvmdClient, a: argparse.Namespace) -> None:
    _show(a, c.set_regs(a.vm, a.vcpu, _assignments(a.assignments)), _regs_text)


def cmd_vcpu_sregs(c: KvmdClient, a: argparse.Namespace) -> None:
    updates = _assignments(a.assignments)
    sregs = c.set_sregs(a.vm, a.vcpu, updates) if updates else c.get_sregs(a.vm, a.vcpu)
    _show(a, sregs, _sregs_text)


def cmd_vcpu_fpu(c: KvmdClient, a: argparse.Namespace) -> None:
    updates = _assignments(a.assignments)
    fpu = c.set_fpu(a.vm, a.vcpu, updates) if updates else c.get_fpu(a.vm, a.vcpu)
    _show(a, fpu, _fpu_text)


def cmd_vcpu_cpuid(c: KvmdClient, a: argparse.Namespace) -> None:
    if a.set_supported:
        entries = c.set_cpuid(a.vm, a.vcpu, use_supported=True)
    else:
        entries = c.get_cpuid(a.vm, a.vcpu)
    if a.json:
        _emit_json([message_to_dict(e) for e in entries])
    else:
        _out(_cpuid_table(entries))


def cmd_vcpu_msrs(c: KvmdClient, a: argparse.Namespace) -> None:
    if a.set:
        values = c.set_msrs(a.vm, a.vcpu, dict(a.set))
        if a.indices:
            values = {**values, **c.get_msrs(a.vm, a.vcpu, a.indices)}
    elif a.indices:
        values = c.get_msrs(a.vm, a.vcpu, a.indices)
    else:
        raise UsageError("give MSR indices to read and/or --set INDEX=VALUE")
    if a.json:
        _emit_json([{"index": i, "value": v} for i, v in values.items()])
    else:
        _out(format_table(["msr", "value"],
                          [[_hex(i, 8), _hex(v, 16)] for i, v in values.items()]))


def cmd_vcpu_mpstate(c: KvmdClient, a: argparse.Namespace) -> None:
    try:
        state = (c.set_mp_state(a.vm, a.vcpu, a.state) if a.state is not None
                 else c.get_mp_state(a.vm, a.vcpu))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if a.json:
        _emit_json({"state": state})
    else:
        _out(state)


def cmd_vcpu_lapic(c: KvmdClient, a: argparse.Namespace) -> None:
    if a.load is not None:
        with open(a.load, "rb") as f:
            regs = c.set_lapic(a.vm, a.vcpu, f.read())
    else:
        regs = c.get_lapic(a.vm, a.vcpu)
    if a.out is not None:
        with open(a.out, "wb") as f:
            f.write(regs)
    if a.json:
        _emit_json({"regs": regs.hex()})
    elif a.out is not None:
        _out(f"wrote {len(regs)} bytes of LAPIC state to {a.out}")
    else:
        _out(hexdump(regs))


def cmd_vcpu_events(c: KvmdClient, a: argparse.Namespace) -> None:
    updates = _assignments(a.assignments)
    events = (c.set_vcpu_events(a.vm, a.vcpu, updates) if updates
              else c.get_vcpu_events(a.vm, a.vcpu))
    _show(a, events, _message_kv)


def _vm_state_line(vm: vmm_pb2.Vm) -> str:
    extra = f" ({vm.reason})" if vm.reason else ""
    if vm.HasField("exit_code"):
        extra += f" exit code {vm.exit_code}"
    return f"vm {vm.vm_id}: {vm.state}{extra}"


def _vm_action(action: str) -> Handler:
    def run(c: KvmdClient, a: argparse.Namespace) -> None:
        vm = getattr(c, f"{action}_vm")(a.vm)
        _show(a, vm, _vm_state_line)

    run.__doc__ = f"kvmctl vm {action}"
    return run


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


def cmd_vm_watch(c: KvmdClient, a: argparse.Namespace) -> None:
    watch = c.watch_vm(a.vm, include_current=a.current)
    _run_stream(watch, a, "events", _event_line)


def cmd_vm_wait(c: KvmdClient, a: argparse.Namespace) -> None:
    states = a.state or ([] if a.event else ["stopped", "crashed"])
    event = c.wait_vm(a.vm, states=states, events=a.event or (), timeout=a.within)
    _show(a, event, _event_line)


def _exit_counts(c: KvmdClient, a: argparse.Namespace) -> tuple[
        vmm_pb2.ExitStats, list[int]]:
    """The VM's exit stats and the vCPU ids to show (all, or the one --vcpu names)."""
    stats = c.exit_stats(a.vm)
    if a.vcpu is None:
        return stats, sorted(stats.vcpus)
    if a.vcpu not in stats.vcpus:
        c.get_vcpu_state(a.vm, a.vcpu)  # NOT_FOUND if there is no such vCPU
    return stats, [a.vcpu]


def cmd_exits(c: KvmdClient, a: argparse.Namespace) -> None:
    """Exit counters by reason: the VM total and one column per vCPU (only reasons with
    exits unless --all; only one vCPU with --vcpu)."""
    stats, vcpu_ids = _exit_counts(c, a)

    def counts(vcpu_id: int) -> Any:
        return stats.vcpus[vcpu_id].counts if vcpu_id in stats.vcpus else {}

    def shown(values: Any) -> dict[str, int]:
        return {r: int(n) for r, n in sorted(values.items()) if n or a.all}

    if a.json:
        if a.vcpu is not None:
            _emit_json({"vm_id": stats.vm_id, "vcpu_id": a.vcpu, "counts": shown(counts(a.vcpu))})
        else:
            _emit_json({"vm_id": stats.vm_id, "total": shown(stats.total),
                        "vcpus": {str(v): shown(counts(v)) for v in vcpu_ids}})
        return
    if a.vcpu is not None:
        column = counts(a.vcpu)
        reasons = sorted(set(stats.total) | set(column))
        rows = [[r, column.get(r, 0)] for r in reasons if a.all or column.get(r, 0)]
        _out(format_table(["reason", f"vcpu{a.vcpu}"], rows, empty="No exits yet."))
        return
    reasons = [r for r in sorted(stats.total) if a.all or stats.total[r]]
    rows = [[r, stats.total[r], *(counts(v).get(r, 0) for v in vcpu_ids)] for r in reasons]
    _out(format_table(["reason", "total", *(f"vcpu{v}" for v in vcpu_ids)], rows,
                      empty="No exits yet."))


def _write_console_output(a: argparse.Namespace, data: bytes) -> None:
    if a.json:
        _emit_json_line({"data": data.decode("latin-1")})
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


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


def _snapshot_row(i: vmm_pb2.SnapshotInfo) -> list[Any]:
    return [i.file or "-", i.vm_id, "diff" if i.diff else "full", human_bytes(i.size_bytes),
            human_bytes(i.guest_memory_bytes), _timestamp(i.created_unix_ms), i.owner,
            i.snapshot_id[:12]]


SNAPSHOT_COLUMNS = ["file", "vm", "kind", "size", "guest memory", "created", "owner", "id"]


def cmd_vm_snapshot(c: KvmdClient, a: argparse.Namespace) -> None:
    if a.state_dir_name:
        info = c.snapshot_vm_to_state_dir(a.vm, a.state_dir_name, diff=a.diff,
                                          leave_paused=a.leave_paused)
    else:
        if not a.file:
            raise KvmdError("give FILE (on this machine), or --to-state-dir NAME")
        _data, info = c.snapshot_vm(a.vm, a.file, diff=a.diff, leave_paused=a.leave_paused)
    if a.json:
        _emit_json(message_to_dict(info))
        return
    where = f"state directory file {info.file}" if info.file else a.file
    _out(f"{'diff' if info.diff else 'full'} snapshot {info.snapshot_id} of vm {info.vm_id} "
         f"-> {where}: {human_bytes(info.size_bytes)}, {info.memory_pages} pages of guest "
         f"memory, vm held {info.seconds * 1000:.1f} ms")


def cmd_vm_restore(c: KvmdClient, a: argparse.Namespace) -> None:
    if a.from_state_dir:
        vm = c.restore_vm(a.vm, start=a.start, files=a.from_state_dir)
    else:
        if not a.file:
            raise KvmdError("give FILE (on this machine), or --from-state-dir NAME")
        vm = c.restore_vm(a.vm, *(a.base or []), a.file, start=a.start)
    _show(a, vm, _vm_details)


def cmd_snapshot_list(c: KvmdClient, a: argparse.Namespace) -> None:
    infos = c.list_snapshots()
    if a.json:
        _emit_json([message_to_dict(i) for i in infos])
        return
    _out(format_table(SNAPSHOT_COLUMNS, [_snapshot_row(i) for i in infos],
                      empty="No snapshot files."))


def cmd_snapshot_delete(c: KvmdClient, a: argparse.Namespace) -> None:
    for name in a.name:
        c.delete_snapshot(name)
        if not a.json:
            _out(f"deleted snapshot file {name}")


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


def cmd_vm_migrate(c: KvmdClient, a: argparse.Namespace) -> None:
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


def cmd_migration_prepare(c: KvmdClient, a: argparse.Namespace) -> None:
    incoming = c.prepare_incoming_migration(a.vm, ttl_seconds=a.ttl)
    if a.json:
        _emit_json(message_to_dict(incoming))
        return
    _out(incoming.token)


def cmd_migration_list(c: KvmdClient, a: argparse.Namespace) -> None:
    infos = c.list_migrations()
    if a.json:
        _emit_json([message_to_dict(i) for i in infos])
        return
    rows = [[i.vm_id, i.direction, i.peer or "-", i.state,
             human_bytes(i.progress.bytes_sent) if i.direction == "outgoing" else "-",
             str(i.progress.round) if i.direction == "outgoing" else "-"] for i in infos]
    _out(format_table(["vm", "direction", "peer", "state", "sent", "round"], rows,
                      empty="No migrations in progress."))


def cmd_migration_cancel(c: KvmdClient, a: argparse.Namespace) -> None:
    c.cancel_migration(a.vm)
    if not a.json:
        _out(f"cancelled the migration of vm {a.vm}; it runs on here")


def cmd_handover_report(c: KvmdClient, a: argparse.Namespace) -> None:
    r = c.handover_report()
    if a.json:
        _emit_json(message_to_dict(r))
        return
    if not r.mode:
        _out("This daemon did not take VMs over from another.")
        return
    _out(f"hand-over ({r.mode}) at {_timestamp(r.unix_ms)} from kvmd "
         f"{r.previous_version or '?'}: {r.restored} of {r.vms} VMs restored, "
         f"{r.stranded} stranded\n"
         f"  save {r.save_seconds * 1000:.1f} ms, start {r.start_seconds * 1000:.1f} ms, "
         f"restore {r.restore_seconds * 1000:.1f} ms; longest guest pause "
         f"{r.max_paused_seconds * 1000:.1f} ms; API unavailable "
         f"{r.api_unavailable_seconds * 1000:.1f} ms; this daemon's start-up "
         f"{r.startup_seconds * 1000:.1f} ms")
    rows = [[v.vm_id, "restored" if v.restored else "stranded",
             f"{v.paused_seconds * 1000:.1f} ms" if v.restored else "-", v.error or ""]
            for v in r.vm_reports]
    _out(format_table(["vm", "result", "paused", "error"], rows, empty="No VMs."))


def cmd_handover_stranded(c: KvmdClient, a: argparse.Namespace) -> None:
    vms = c.list_stranded_vms()
    if a.json:
        _emit_json([message_to_dict(v) for v in vms])
        return
    _out(format_table(["vm", "memory", "since", "state file", "reason"],
                      [[v.vm_id, human_bytes(v.memory_bytes), _timestamp(v.since_unix_ms),
                        v.state_file or "-", v.reason] for v in vms],
                      empty="No stranded VMs."))


def cmd_handover_retry(c: KvmdClient, a: argparse.Namespace) -> None:
    for vm_id in a.vm:
        vm = c.retry_stranded_vm(vm_id)
        if not a.json:
            _out(f"restored vm {vm.vm_id}: {vm.state}")


def cmd_handover_delete(c: KvmdClient, a: argparse.Namespace) -> None:
    for vm_id in a.vm:
        c.delete_stranded_vm(vm_id)
        if not a.json:
            _out(f"deleted stranded vm {vm_id}: its saved state and memory are gone")


def cmd_vm_console(c: KvmdClient, a: argparse.Namespace) -> None:
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
    timer = None
    if a.duration is not None:
        timer = threading.Timer(a.duration, watch.cancel)
        timer.daemon = True
        timer.start()
    try:
        for chunk in watch:
            _write_console_output(a, chunk.data)
    except KeyboardInterrupt:
        pass
    finally:
        if timer is not None:
            timer.cancel()
        watch.cancel()


def cmd_vm_console_write(c: KvmdClient, a: argparse.Namespace) -> None:
    data = a.hex if a.hex is not None else (a.text or "").encode()
    if a.newline:
        data += b"\n"
    accepted = c.write_console(a.vm, data)
    if a.json:
        _emit_json({"vm_id": a.vm, "accepted": accepted})
    else:
        _out(f"sent {accepted} bytes to the console of vm {a.vm}")


def _vcpu_line(vcpu: vmm_pb2.Vcpu) -> str:
    extra = f" ({vcpu.reason})" if vcpu.reason else ""
    return f"vcpu {vcpu.vcpu_id} of vm {vcpu.vm_id}: {vcpu.state}{extra}"


def _vcpu_action(action: str) -> Handler:
    method = "get_vcpu_state" if action == "state" else f"{action}_vcpu"

    def run(c: KvmdClient, a: argparse.Namespace) -> None:
        _show(a, getattr(c, method)(a.vm, a.vcpu), _vcpu_line)

    run.__doc__ = f"kvmctl vcpu {action}"
    return run


def cmd_vcpu_inject(c: KvmdClient, a: argparse.Namespace) -> None:
    vcpu = c.inject_interrupt(a.vm, a.vcpu, a.vector)
    if a.json:
        _emit_json(message_to_dict(vcpu))
    else:
        _out(f"queued vector {_hex(a.vector)} for vcpu {a.vcpu} of vm {a.vm}")


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


def cmd_demo(c: KvmdClient, a: argparse.Namespace) -> int:
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
# parser


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


def _leaf(
    subs: Any, name: str, handler: Handler, help_text: str, *, aliases: Sequence[str] = ()
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subs.add_parser(
        name, help=help_text, description=help_text, aliases=list(aliases),
        formatter_class=_Formatter,
    )
    p.set_defaults(func=handler)
    return p


def _finish(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_common(p, top=False)
    return p


def _vm_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("vm", metavar="VM", help="VM id")


def _vcpu_args(p: argparse.ArgumentParser) -> None:
    _vm_arg(p)
    p.add_argument("vcpu", metavar="VCPU", type=parse_int, help="vCPU id")


def _assign_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("assignments", metavar="FIELD=VALUE", nargs="*", type=parse_assignment,
                   help=f"set these {what} fields (merged with the current state) before "
                   "showing them")


def _watch_args(p: argparse.ArgumentParser) -> None:
    _vm_arg(p)
    p.add_argument("--count", type=parse_int, help="stop after this many events")
    p.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this long")


def _exits_args(p: argparse.ArgumentParser) -> None:
    _vm_arg(p)
    p.add_argument("--vcpu", type=parse_int, metavar="N", help="only this vCPU's counters")
    p.add_argument("--all", action="store_true", help="show reasons with no exits too")


def build_parser() -> argparse.ArgumentParser:
    """The kvmctl argument parser."""
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

    # info, cap, supported-cpuid
    p = _leaf(top, "health", cmd_health,
              "the daemon's health (SERVING: exit 0); --wait for one that is starting")
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="wait up to SECONDS for the daemon to serve")
    _finish(p)
    p = _leaf(top, "info", cmd_info, "KVM and daemon information, limits, capabilities")
    p.add_argument("--all", action="store_true", help="list absent capabilities too")
    _finish(p)
    p = _leaf(top, "cap", cmd_cap, "check one KVM capability (KVM_CHECK_EXTENSION)")
    p.add_argument("capability", metavar="CAP", help="name (KVM_CAP_IRQFD or irqfd) or number")
    p.add_argument("--vm", help="ask on this VM's fd")
    _finish(p)
    _finish(_leaf(top, "supported-cpuid", cmd_supported_cpuid,
                  "the host's supported CPUID entries"))

    # vm
    vm = top.add_parser("vm", help="create, inspect, list, run and delete VMs",
                        description="Create, inspect, list, run and delete VMs.")
    vms = _subparsers(vm, "vm_command")
    p = _leaf(vms, "create", cmd_vm_create, "create a VM")
    _vm_arg(p)
    p.add_argument("--label", "-l", metavar="KEY=VALUE", action="append", type=parse_label,
                   help="attach a label (repeatable)")
    p.add_argument("--irqchip", action="store_true", help="in-kernel PIC/IOAPIC/LAPIC")
    p.add_argument("--dirty-tracking", choices=["bitmap", "manual", "ring"], default="",
                   help="how KVM reports dirty pages (default bitmap; see kvmctl info)")
    p.add_argument("--dirty-ring-bytes", type=parse_size, default=0, metavar="SIZE",
                   help="per-vCPU dirty ring size with --dirty-tracking ring (default 64K)")
    p.add_argument("--pit", action="store_true", help="in-kernel PIT (needs --irqchip)")
    p.add_argument("--tss-address", type=parse_int, default=0, metavar="ADDR",
                   help="KVM_SET_TSS_ADDR (default: the daemon's)")
    p.add_argument("--identity-map-address", type=parse_int, default=0, metavar="ADDR",
                   help="KVM_SET_IDENTITY_MAP_ADDR (default: the daemon's)")
    _finish(p)
    p = _leaf(vms, "get", cmd_vm_get, "show one VM", aliases=["show"])
    _vm_arg(p)
    _finish(p)
    p = _leaf(vms, "list", cmd_vm_list, "list VMs", aliases=["ls"])
    p.add_argument("--label", "-l", metavar="KEY=VALUE", action="append", type=parse_label,
                   help="only VMs carrying this label (repeatable: all must match)")
    _finish(p)
    p = _leaf(vms, "delete", cmd_vm_delete, "delete VMs (stops vCPUs, frees everything)",
              aliases=["rm"])
    p.add_argument("vm", metavar="VM", nargs="+", help="VM ids")
    _finish(p)
    for action, text in [
        ("start", "start every vCPU in its own thread"),
        ("pause", "pause every running vCPU"),
        ("resume", "resume every paused vCPU"),
        ("stop", "stop every vCPU (the VM can be inspected and started again)"),
    ]:
        p = _leaf(vms, action, _vm_action(action), text)
        _vm_arg(p)
        _finish(p)
    p = _leaf(vms, "watch", cmd_vm_watch,
              "stream state changes (one JSON object per line with --json)")
    _watch_args(p)
    p.add_argument("--current", action="store_true", help="first show the current state")
    _finish(p)
    p = _leaf(vms, "wait", cmd_vm_wait,
              "wait until the VM reaches a state (default: stopped or crashed) or an event")
    _vm_arg(p)
    p.add_argument("--state", action="append", metavar="STATE",
                   help="a state to wait for (repeatable)")
    p.add_argument("--event", action="append", metavar="TYPE",
                   help="an event type to wait for, e.g. halted, debug_exit (repeatable)")
    p.add_argument("--within", type=float, default=30.0, metavar="SECONDS",
                   help="give up after this long (default 30; exit code 1)")
    _finish(p)
    p = _leaf(vms, "stats", cmd_exits, "VM exit counters by reason, per vCPU "
              "(the same as kvmctl exits)")
    _exits_args(p)
    _finish(p)
    p = _leaf(vms, "console", cmd_vm_console,
              "the guest's COM1 output: backlog, then live (raw bytes on stdout); "
              "Ctrl-C quits")
    _vm_arg(p)
    p.add_argument("--no-backlog", action="store_true", help="only new output")
    p.add_argument("--no-follow", action="store_true",
                   help="print the backlog and return (like cat, not tail -f)")
    p.add_argument("--backlog-wait", type=float, default=1.0, metavar="SECONDS",
                   help="with --no-follow, how long to wait for the backlog (default 1; "
                   "an empty backlog always takes this long)")
    p.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this long")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--interactive", "-i", dest="interactive", action="store_true",
                      default=None,
                      help="send stdin lines to the guest (default when stdin is a terminal)")
    mode.add_argument("--no-interactive", dest="interactive", action="store_false",
                      help="never read stdin")
    _finish(p)
    p = _leaf(vms, "console-write", cmd_vm_console_write, "send input to the guest's COM1")
    _vm_arg(p)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("text", metavar="TEXT", nargs="?", help="text to send")
    data.add_argument("--hex", "-x", type=parse_hex_data, help="bytes to send, in hex")
    p.add_argument("--newline", "-n", action="store_true", help="append a newline")
    _finish(p)

    p = _leaf(vms, "snapshot", cmd_vm_snapshot,
              "save the VM's complete state and memory into FILE on this machine (the VM is "
              "held paused meanwhile, then runs again unless --leave-paused)")
    _vm_arg(p)
    p.add_argument("file", metavar="FILE", nargs="?", help="where to write it, locally")
    p.add_argument("--diff", action="store_true",
                   help="only pages dirtied since the VM's last snapshot (restore with --base)")
    p.add_argument("--leave-paused", action="store_true", help="keep the VM paused afterwards")
    p.add_argument("--to-state-dir", dest="state_dir_name", metavar="NAME",
                   help="write it to NAME in the daemon's state directory instead")
    _finish(p)
    p = _leaf(vms, "restore", cmd_vm_restore,
              "create VM NEWID from a snapshot FILE on this machine (paused unless --start)")
    p.add_argument("vm", metavar="NEWID", help="the new VM's id")
    p.add_argument("file", metavar="FILE", nargs="?", help="the snapshot (the last diff)")
    p.add_argument("--base", metavar="FILE", action="append",
                   help="the full snapshot FILE is a diff on (repeat for a chain, oldest first)")
    p.add_argument("--start", action="store_true", help="run it at once")
    p.add_argument("--from-state-dir", metavar="NAME", action="append",
                   help="restore from NAME in the daemon's state directory (repeat: the full "
                   "snapshot first, then its diffs)")
    _finish(p)

    p = _leaf(vms, "migrate", cmd_vm_migrate,
              "live-migrate the VM to the kvmd at --to (host:port, as this daemon reaches it): "
              "the VM runs on there and is deleted here; any failure before the switch-over "
              "leaves it running here")
    _vm_arg(p)
    p.add_argument("--to", metavar="ADDRESS", required=True,
                   help="the target daemon's gRPC address (host:port), dialed by the source")
    p.add_argument("--token", metavar="TOKEN",
                   help="from 'kvmctl migration prepare' on the target (default: kvmctl "
                   "prepares the target itself, through --target-address)")
    p.add_argument("--target-address", metavar="ADDR",
                   help="the target daemon as kvmctl reaches it (default: --to)")
    p.add_argument("--target-vm", metavar="ID", help="the VM's id on the target (default VM)")
    p.add_argument("--max-downtime-ms", type=parse_int, default=0, metavar="N",
                   help="longest pause for the switch-over (default 300)")
    p.add_argument("--bandwidth", type=parse_size, metavar="BYTES",
                   help="bytes per second for the pre-copy rounds, e.g. 100M (default: as "
                   "fast as the link goes)")
    p.add_argument("--max-rounds", type=parse_int, default=0, metavar="N",
                   help="dirty rounds before giving up (default 30)")
    p.add_argument("--auto-converge", action="store_true",
                   help="throttle the guest while it dirties memory faster than the link")
    p.add_argument("--migration-server-name", metavar="NAME",
                   help="the name the target's certificate must carry (default: --to's host)")
    _finish(p)

    mig = top.add_parser("migration", help="live migrations: prepare a target, list, cancel",
                         description="Live migrations. A target daemon hands out a one-time "
                         "token for an incoming VM; 'kvmctl vm migrate' on the source uses it.")
    migs = _subparsers(mig, "migration_command")
    p = _leaf(migs, "prepare", cmd_migration_prepare,
              "on the target daemon: expect VM (its id here), print the one-time token")
    _vm_arg(p)
    p.add_argument("--ttl", type=parse_int, default=0, metavar="SECONDS",
                   help="how long the token is valid (default 300)")
    _finish(p)
    _finish(_leaf(migs, "list", cmd_migration_list, "migrations in progress", aliases=["ls"]))
    p = _leaf(migs, "cancel", cmd_migration_cancel,
              "cancel the VM's outgoing migration (before its switch-over)")
    _vm_arg(p)
    _finish(p)

    # snapshot files
    snap = top.add_parser("snapshot", help="snapshot files in the daemon's state directory",
                          description="Snapshot files in the daemon's state directory "
                          "(kvmd --state-dir). Take them with kvmctl vm snapshot VM "
                          "--to-state-dir NAME.")
    snaps = _subparsers(snap, "snapshot_command")
    _finish(_leaf(snaps, "list", cmd_snapshot_list, "list snapshot files", aliases=["ls"]))
    p = _leaf(snaps, "delete", cmd_snapshot_delete, "delete snapshot files", aliases=["rm"])
    p.add_argument("name", metavar="NAME", nargs="+", help="file names")
    _finish(p)

    # hand-over: stranded VMs and the last hand-over's outage
    hand = top.add_parser("handover", help="daemon restarts and upgrades: the last hand-over, "
                          "stranded VMs",
                          description="A restarted or upgraded daemon (systemd fd store, or "
                          "kvmd --take-over) re-creates every VM. One it could not restore is "
                          "stranded: its state and memory are kept until retried or deleted.")
    hands = _subparsers(hand, "handover_command")
    _finish(_leaf(hands, "report", cmd_handover_report,
                  "the last hand-over this daemon received: outage and results"))
    _finish(_leaf(hands, "stranded", cmd_handover_stranded,
                  "VMs a hand-over could not restore, and why", aliases=["list", "ls"]))
    p = _leaf(hands, "retry", cmd_handover_retry, "restore stranded VMs again")
    p.add_argument("vm", metavar="VM", nargs="+", help="stranded VM ids")
    _finish(p)
    p = _leaf(hands, "delete", cmd_handover_delete,
              "give stranded VMs up: their saved state and memory are released",
              aliases=["rm"])
    p.add_argument("vm", metavar="VM", nargs="+", help="stranded VM ids")
    _finish(p)

    # exits, demo
    p = _leaf(top, "exits", cmd_exits,
              "VM exit counters by reason: the VM total and per vCPU")
    _exits_args(p)
    _finish(p)
    p = _leaf(top, "demo", cmd_demo,
              "run a tiny guest that greets you on its console, counts and exits: "
              "shows the console and the exit counters, then deletes the VM")
    p.add_argument("--vm-id", metavar="ID", help="the VM's id (default demo-<random>)")
    p.add_argument("--keep", action="store_true",
                   help="keep the VM afterwards (inspect it with vm get, exits, vm console)")
    p.add_argument("--within", type=float, default=30.0, metavar="SECONDS",
                   help="give up if the guest has not stopped after this long (default 30)")
    _finish(p)

    # mem
    mem = top.add_parser("mem", help="guest memory regions and contents",
                         description="Guest memory regions and contents.")
    mems = _subparsers(mem, "mem_command")
    p = _leaf(mems, "add", cmd_mem_add, "map new zeroed memory into the guest")
    _vm_arg(p)
    p.add_argument("guest_addr", metavar="ADDR", type=parse_int, help="page-aligned address")
    p.add_argument("size", metavar="SIZE", type=parse_size, help="bytes (K/M/G suffixes)")
    p.add_argument("--read-only", action="store_true",
                   help="guest writes exit as MMIO (with --file: the file is opened read-only)")
    p.add_argument("--log-dirty", action="store_true", help="track dirty pages")
    p.add_argument("--file", metavar="NAME",
                   help="back the slot with this file of the daemon's images directory "
                   "(shared: guest writes reach it)")
    p.add_argument("--offset", type=parse_int, default=0, metavar="N",
                   help="with --file: where the slot starts in the file (page aligned)")
    _finish(p)
    p = _leaf(mems, "rm", cmd_mem_rm, "remove a memory region", aliases=["remove"])
    _vm_arg(p)
    p.add_argument("slot", metavar="SLOT", type=parse_int)
    _finish(p)
    p = _leaf(mems, "ls", cmd_mem_ls, "list memory regions", aliases=["list"])
    _vm_arg(p)
    _finish(p)
    p = _leaf(mems, "write", cmd_mem_write, "write bytes into guest memory")
    _vm_arg(p)
    p.add_argument("guest_addr", metavar="ADDR", type=parse_int)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", "-f", metavar="PATH", help="stream this file")
    source.add_argument("--data-hex", "-x", metavar="HEX", type=parse_hex_data,
                        help="these bytes, in hex (e.g. f4 or 'b8 01 00 f4')")
    p.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE,
                   help="bytes per streamed message (default 1M)")
    _finish(p)
    p = _leaf(mems, "read", cmd_mem_read, "read guest memory (hex dump, raw, or to a file)")
    _vm_arg(p)
    p.add_argument("guest_addr", metavar="ADDR", type=parse_int)
    p.add_argument("--length", "-n", type=parse_size, required=True, help="bytes to read")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", "-o", metavar="PATH", help="write the bytes to this file")
    out.add_argument("--raw", action="store_true", help="write the raw bytes to stdout")
    _finish(p)
    # mem discard / map / unmap / sync
    p = _leaf(mems, "discard", cmd_mem_discard,
              "give the host pages behind a guest range back (balloon inflate); the range "
              "reads zeros until the guest writes it again")
    _vm_arg(p)
    p.add_argument("guest_addr", metavar="ADDR", type=parse_int, help="page-aligned address")
    p.add_argument("size", metavar="SIZE", type=parse_size, help="page-aligned bytes")
    _finish(p)
    p = _leaf(mems, "map", cmd_mem_map,
              "map a file of the daemon's images directory over part of a slot")
    _vm_arg(p)
    p.add_argument("slot", metavar="SLOT", type=parse_int)
    p.add_argument("offset", metavar="OFFSET", type=parse_int, help="within the slot")
    p.add_argument("size", metavar="SIZE", type=parse_size, help="page-aligned bytes")
    p.add_argument("--file", metavar="NAME", required=True,
                   help="file name relative to the images directory")
    p.add_argument("--file-offset", type=parse_int, default=0, metavar="N",
                   help="where the mapping starts in the file (page aligned)")
    p.add_argument("--read-only", action="store_true",
                   help="open and map the file read-only (needs a read-only slot)")
    _finish(p)
    p = _leaf(mems, "unmap", cmd_mem_unmap,
              "unmap a file mapped over part of a slot (msync first)")
    _vm_arg(p)
    p.add_argument("slot", metavar="SLOT", type=parse_int)
    p.add_argument("offset", metavar="OFFSET", type=parse_int)
    p.add_argument("size", metavar="SIZE", type=parse_size)
    _finish(p)
    p = _leaf(mems, "sync", cmd_mem_sync,
              "write guest writes to a slot's files back to disk (msync)")
    _vm_arg(p)
    p.add_argument("slot", metavar="SLOT", type=parse_int)
    p.add_argument("--offset", type=parse_int, default=0, metavar="N",
                   help="start within the slot (default 0)")
    p.add_argument("--size", type=parse_size, default=0, metavar="N",
                   help="bytes (default: to the end of the slot)")
    _finish(p)

    # dirty-log
    p = _leaf(top, "dirty-log", cmd_dirty_log,
              "dirty pages of a slot since the last read (reading resets the log, except in "
              "manual mode: see --clear)")
    _vm_arg(p)
    p.add_argument("slot", metavar="SLOT", type=parse_int)
    p.add_argument("--clear", action="store_true",
                   help="manual mode: then mark the pages read clean (ClearDirtyLog)")
    _finish(p)
    p = _leaf(top, "dirty-logging", cmd_dirty_logging,
              "turn dirty logging of an existing slot on or off")
    _vm_arg(p)
    p.add_argument("slot", metavar="SLOT", type=parse_int)
    p.add_argument("state", choices=["on", "off"])
    _finish(p)
    p = _leaf(top, "dirty-rate", cmd_dirty_rate,
              "measure the VM's dirty rate (pages per second) over a period")
    _vm_arg(p)
    p.add_argument("--duration", type=float, default=1.0, metavar="SECONDS",
                   help="how long to measure (default 1)")
    _finish(p)

    # irq
    irq = top.add_parser("irq", help="irq lines, GSI routing, MSIs, irqfds",
                         description="Interrupts: irq lines, GSI routing, MSIs, irqfds.")
    irqs = _subparsers(irq, "irq_command")
    p = _leaf(irqs, "line", cmd_irq_line, "raise or lower an in-kernel irqchip line")
    _vm_arg(p)
    p.add_argument("irq", metavar="IRQ", type=parse_int)
    p.add_argument("level", metavar="LEVEL", type=parse_level, help="1/high/on or 0/low/off")
    _finish(p)
    p = _leaf(irqs, "route", cmd_irq_route, "replace the whole GSI routing table")
    _vm_arg(p)
    p.add_argument("--irqchip", metavar="GSI:CHIP:PIN", action="append",
                   type=parse_irqchip_route,
                   help="route GSI to an irqchip pin; CHIP is pic-master, pic-slave or ioapic")
    p.add_argument("--msi", metavar="GSI:ADDR:DATA[:DEVID]", action="append",
                   type=parse_msi_route, help="route GSI to an MSI")
    p.add_argument("--clear", action="store_true", help="allow an empty table")
    _finish(p)
    p = _leaf(irqs, "msi", cmd_irq_msi, "inject an MSI")
    _vm_arg(p)
    p.add_argument("msi_address", metavar="ADDR", type=parse_int)
    p.add_argument("data", metavar="DATA", type=parse_int)
    p.add_argument("--devid", type=parse_int)
    _finish(p)
    p = _leaf(irqs, "irqfd-add", cmd_irqfd_add, "bind a new daemon-owned irqfd to a GSI")
    _vm_arg(p)
    p.add_argument("irqfd", metavar="ID")
    p.add_argument("gsi", metavar="GSI", type=parse_int)
    p.add_argument("--resample", action="store_true", help="level-triggered, with resample")
    _finish(p)
    p = _leaf(irqs, "irqfd-trigger", cmd_irqfd_trigger, "signal an irqfd (inject its irq)")
    _vm_arg(p)
    p.add_argument("irqfd", metavar="ID")
    p.add_argument("--count", type=parse_int, default=1, help="times to trigger (default 1)")
    _finish(p)
    p = _leaf(irqs, "irqfd-rm", cmd_irqfd_rm, "unregister an irqfd")
    _vm_arg(p)
    p.add_argument("irqfd", metavar="ID")
    _finish(p)
    p = _leaf(irqs, "irqfd-ls", cmd_irqfd_ls, "list irqfds")
    _vm_arg(p)
    _finish(p)
    p = _leaf(irqs, "watch-resamples", cmd_irq_watch,
              "stream resample events (one JSON object per line with --json)")
    _watch_args(p)
    _finish(p)

    # ioevent
    ioe = top.add_parser("ioevent", help="daemon-owned ioeventfds",
                         description="Guest PIO/MMIO writes observed through ioeventfds.")
    ioes = _subparsers(ioe, "ioevent_command")
    p = _leaf(ioes, "add", cmd_ioevent_add, "watch guest writes to a PIO or MMIO address")
    _vm_arg(p)
    p.add_argument("ioevent", metavar="ID")
    p.add_argument("io_address", metavar="ADDR", type=parse_int)
    space = p.add_mutually_exclusive_group()
    space.add_argument("--pio", dest="space", action="store_const", const="pio",
                       help="port I/O address (default)")
    space.add_argument("--mmio", dest="space", action="store_const", const="mmio",
                       help="MMIO address")
    p.set_defaults(space="pio")
    p.add_argument("--length", type=parse_int, default=0,
                   help="access size 1, 2, 4 or 8 (default 0: any)")
    p.add_argument("--datamatch", type=parse_int, help="only writes of this value")
    _finish(p)
    p = _leaf(ioes, "rm", cmd_ioevent_rm, "unregister an ioevent", aliases=["remove"])
    _vm_arg(p)
    p.add_argument("ioevent", metavar="ID")
    _finish(p)
    p = _leaf(ioes, "ls", cmd_ioevent_ls, "list ioevents", aliases=["list"])
    _vm_arg(p)
    _finish(p)
    p = _leaf(ioes, "watch", cmd_ioevent_watch,
              "stream ioevent firings (one JSON object per line with --json)")
    _watch_args(p)
    _finish(p)

    # vcpu
    vcpu = top.add_parser("vcpu", help="vCPUs: run control and register state",
                          description="Create, run and pause vCPUs; get and set their state.")
    vcpus = _subparsers(vcpu, "vcpu_command")
    p = _leaf(vcpus, "create", cmd_vcpu_create, "create a vCPU")
    _vcpu_args(p)
    _finish(p)
    p = _leaf(vcpus, "ls", cmd_vcpu_ls, "list vCPUs", aliases=["list"])
    _vm_arg(p)
    _finish(p)
    for action, text in [
        ("start", "start one vCPU's thread"),
        ("pause", "pause one vCPU"),
        ("resume", "resume one vCPU"),
        ("stop", "stop one vCPU"),
        ("state", "show one vCPU's run state"),
    ]:
        p = _leaf(vcpus, action, _vcpu_action(action), text)
        _vcpu_args(p)
        _finish(p)
    p = _leaf(vcpus, "inject", cmd_vcpu_inject,
              "queue an external interrupt (VMs without the in-kernel irqchip)")
    _vcpu_args(p)
    p.add_argument("vector", metavar="VECTOR", type=parse_int)
    _finish(p)
    p = _leaf(vcpus, "regs", cmd_vcpu_regs, "show general-purpose registers")
    _vcpu_args(p)
    _finish(p)
    p = _leaf(vcpus, "set-regs", cmd_vcpu_set_regs,
              "set general-purpose registers, e.g. rip=0x1000 rflags=0x2")
    _vcpu_args(p)
    p.add_argument("assignments", metavar="REG=VALUE", nargs="+", type=parse_assignment,
                   help="registers to change; the others keep their values")
    _finish(p)
    p = _leaf(vcpus, "sregs", cmd_vcpu_sregs,
              "show (or set, e.g. cr0=0x10 cs.base=0 cs.selector=0) special registers")
    _vcpu_args(p)
    _assign_arg(p, "special register")
    _finish(p)
    p = _leaf(vcpus, "fpu", cmd_vcpu_fpu, "show (or set, e.g. fcw=0x37f) the FPU/SSE state")
    _vcpu_args(p)
    _assign_arg(p, "FPU")
    _finish(p)
    p = _leaf(vcpus, "cpuid", cmd_vcpu_cpuid, "show the vCPU's CPUID entries")
    _vcpu_args(p)
    p.add_argument("--set-supported", action="store_true",
                   help="first set the host's supported CPUID")
    _finish(p)
    p = _leaf(vcpus, "msrs", cmd_vcpu_msrs, "read (and/or write) MSRs")
    _vcpu_args(p)
    p.add_argument("indices", metavar="INDEX", nargs="*", type=parse_int,
                   help="MSRs to read, e.g. 0x10 0x174")
    p.add_argument("--set", metavar="INDEX=VALUE", action="append",
                   type=parse_msr_assignment, help="write an MSR (repeatable)")
    _finish(p)
    p = _leaf(vcpus, "mpstate", cmd_vcpu_mpstate, "show (or set) the multiprocessing state")
    _vcpu_args(p)
    p.add_argument("state", metavar="STATE", nargs="?",
                   choices=[v.name.lower() for v in vmm_pb2.MpState.State.DESCRIPTOR.values],
                   type=str.lower, help="set this state first: %(choices)s")
    _finish(p)
    p = _leaf(vcpus, "lapic", cmd_vcpu_lapic, "show (save, load) the local APIC page")
    _vcpu_args(p)
    p.add_argument("--out", "-o", metavar="PATH", help="save the 1024-byte page to a file")
    p.add_argument("--load", metavar="PATH", help="first load the page from a file")
    _finish(p)
    p = _leaf(vcpus, "events", cmd_vcpu_events,
              "show (or set, e.g. nmi_pending=1) pending exceptions/interrupts/NMIs")
    _vcpu_args(p)
    _assign_arg(p, "vCPU event")
    _finish(p)
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
