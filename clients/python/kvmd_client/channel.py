"""How :class:`~kvmd_client.KvmdClient` talks to a daemon: deadlines, retries, keepalive.

Deadlines. Every call has one unless the caller turns it off (``timeout=None``):

- unary calls and the health check: ``timeout``, :data:`DEFAULT_TIMEOUT` (30 s);
- transfers, whose length follows the data (``WriteGuestMemory``, ``ReadGuestMemory``,
  ``GetDirtyLog``, ``SnapshotVm``, ``RestoreVm``, a console backlog read without
  following): ``transfer_timeout``, :data:`DEFAULT_TRANSFER_TIMEOUT` (600 s);
- ``MeasureDirtyRate``: ``timeout`` plus the measured period.

Streams meant to stay open have none by default, as their end is the caller's to choose:
``WatchVm``, ``StreamConsole`` (following), ``WatchIoevents``, ``WatchIrqfdResamples``,
``HandleExits`` and ``MigrateVm`` (a live migration runs as long as the guest takes to
converge); each takes an explicit ``timeout``/``deadline``. Keepalive watches them instead.

Retries. Idempotent calls are retried on UNAVAILABLE (no daemon listening, a connection
reset, a daemon restarting) by gRPC itself, through the service config's retry policy
(:data:`RETRY_POLICY`): up to 5 attempts, waiting about 0.2, 0.4, 0.8 and 1.6 s between
them (gRPC jitters each wait by 20%), so an outage of up to about 3 s is bridged and a daemon
that stays away is reported UNAVAILABLE after about 3 s. Only UNAVAILABLE is retried, only
before the daemon answered anything (a stream that delivered a message is never replayed),
and never past the call's deadline (the call then ends DEADLINE_EXCEEDED).

Idempotent here means the call changes nothing, so running it twice is running it once:
the reads, Get, List and Watch RPCs (:data:`RETRIED_METHODS`, the same as the daemon's
viewer role plus the reads viewers may not make). Everything else is not retried:

- creations (``CreateVm``, ``CreateVcpu``, ``Register*``, ``AddMemoryRegion``,
  ``PrepareIncomingMigration``, ``RestoreVm``): a retry after a reply lost on the way back
  meets ALREADY_EXISTS for the caller's own resource;
- other mutations (deletes, setters, run control, interrupts, console input, writes,
  discards, syncs): even where repeating is harmless, the caller knows that, not the client;
- :data:`NOT_RETRIED_READS`: reads with side effects (``GetDirtyLog`` resets the log, so a
  retry would lose the pages the first attempt took; ``SnapshotVm`` pauses the VM and
  moves the base of the next diff);
- ``HandleExits``, ``MigrateVm`` and ``ReceiveMigration``: sessions, not requests.

Keepalive. While calls are open the client pings the daemon every
:data:`KEEPALIVE_TIME_MS` (20 s) and drops the connection if an answer takes more than
:data:`KEEPALIVE_TIMEOUT_MS` (10 s): a watch or migration on a dead link or a vanished host
ends UNAVAILABLE within about 30 s instead of hanging until the kernel gives up on the TCP
connection. Pings go on however long the stream stays silent (gRPC stops after two
without data by default). The daemon accepts pings every 10 s or slower (kvmd.server
``KEEPALIVE_SERVER_OPTIONS``; gRPC's default would be 5 minutes, and faster clients are cut
off with GOAWAY ``too_many_pings``), so these are twice as slow as the daemon allows.
An idle channel does not ping.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_TRANSFER_TIMEOUT",
    "KEEPALIVE_TIMEOUT_MS",
    "KEEPALIVE_TIME_MS",
    "MAX_MESSAGE_BYTES",
    "NOT_RETRIED_READS",
    "RETRIED_METHODS",
    "RETRY_POLICY",
    "channel_options",
    "service_config",
]

#: Default deadline (seconds) of unary calls.
DEFAULT_TIMEOUT = 30.0
#: Default deadline (seconds) of transfers: guest memory, dirty logs, snapshots, restores.
DEFAULT_TRANSFER_TIMEOUT = 600.0
#: Channel send/receive message limit.
MAX_MESSAGE_BYTES = 64 << 20
#: Interval of keepalive pings while calls are open (twice the daemon's minimum).
KEEPALIVE_TIME_MS = 20_000
#: How long a ping may go unanswered before the connection counts as dead.
KEEPALIVE_TIMEOUT_MS = 10_000
# Reconnection after a failure: first after 0.1 s, at most every second (gRPC's defaults, 1 s
# and 120 s, would leave calls failing for up to two minutes after a daemon came back).
INITIAL_RECONNECT_BACKOFF_MS = 100
MAX_RECONNECT_BACKOFF_MS = 1_000

#: The idempotent RPCs, by service: retried on UNAVAILABLE.
RETRIED_METHODS: dict[str, tuple[str, ...]] = {
    "kvmd.v1.Hypervisor": ("GetInfo", "CheckExtension", "GetSupportedCpuid"),
    "kvmd.v1.Vms": ("GetVm", "ListVms", "WatchVm", "GetExitStats", "StreamConsole"),
    "kvmd.v1.Memory": ("ListMemoryRegions", "ReadGuestMemory", "MeasureDirtyRate"),
    "kvmd.v1.Interrupts": ("ListIrqfds", "WatchIrqfdResamples"),
    "kvmd.v1.IoEvents": ("ListIoevents", "WatchIoevents"),
    "kvmd.v1.Vcpus": ("ListVcpus", "GetVcpuState", "GetRegs", "GetSregs", "GetFpu",
                      "GetCpuid", "GetMsrs", "GetMpState", "GetLapic", "GetVcpuEvents"),
    "kvmd.v1.Snapshots": ("ListSnapshots",),
    "kvmd.v1.Migration": ("ListMigrations",),
    "kvmd.v1.Handover": ("ListStrandedVms", "GetHandoverReport"),
    "grpc.health.v1.Health": ("Check", "Watch"),
}

#: Reads that are not idempotent ("Service/Method": why), so never retried.
NOT_RETRIED_READS: dict[str, str] = {
    "kvmd.v1.Memory/GetDirtyLog": "reading resets the log: a retry would lose the pages "
                                  "the first attempt took",
    "kvmd.v1.Memory/PollDirtyLog": "reading resets the log, as GetDirtyLog",
    "kvmd.v1.Snapshots/SnapshotVm": "pauses the VM while it streams, and a diff snapshot "
                                    "moves the base of the next one",
}

#: gRPC retry policy (gRFC A6) of the idempotent RPCs.
RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 5,  # gRPC's ceiling
    "initialBackoff": "0.2s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config() -> dict[str, Any]:
    """The client's gRPC service config: the retry policy on :data:`RETRIED_METHODS`."""
    names = [{"service": service, "method": method}
             for service, methods in RETRIED_METHODS.items() for method in methods]
    return {"methodConfig": [{"name": names, "retryPolicy": RETRY_POLICY}]}


def channel_options(extra: Iterable[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """Channel arguments of a KvmdClient channel; ``extra`` adds or replaces some."""
    options: dict[str, Any] = {
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
        "grpc.enable_retries": 1,
        "grpc.service_config": json.dumps(service_config()),
        "grpc.keepalive_time_ms": KEEPALIVE_TIME_MS,
        "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
        # Ping only while calls are open: an idle channel costs the daemon nothing.
        "grpc.keepalive_permit_without_calls": 0,
        # Keep pinging a stream that carries nothing for hours (a quiet watch); gRPC's
        # default stops after 2 pings without data, which leaves such streams unwatched.
        "grpc.http2.max_pings_without_data": 0,
        "grpc.initial_reconnect_backoff_ms": INITIAL_RECONNECT_BACKOFF_MS,
        "grpc.min_reconnect_backoff_ms": INITIAL_RECONNECT_BACKOFF_MS,
        "grpc.max_reconnect_backoff_ms": MAX_RECONNECT_BACKOFF_MS,
    }
    options.update(dict(extra))
    return list(options.items())
