"""Limits enforced by the core (each a daemon flag)."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one daemon allows. Exceeding any gives ResourceExhausted."""

    max_vms: int = 64
    max_vcpus_per_vm: int = 64
    max_memory_per_vm_bytes: int = 64 * GiB
    max_memory_total_bytes: int = 256 * GiB
    max_memory_slots_per_vm: int = 256
    max_irqfds_per_vm: int = 256
    max_ioevents_per_vm: int = 256
    max_message_bytes: int = 16 * MiB
    # Threads serving unary calls; streams wait on the event loop and cost none.
    max_concurrent_rpcs: int = 64
    # Unary calls one identity may have in flight.
    max_calls_per_identity: int = 16
    # Open streams (watch, console, exit handlers, memory transfers) in all, and per identity.
    max_streams: int = 4096
    max_streams_per_identity: int = 256
