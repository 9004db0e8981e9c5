"""How the daemon's threads share the CPUs with its guests (Linux scheduling is per thread).

Three levers, none above what the daemon starts with, so none needs a privilege (but
LimitNICE=+0, for a paused vCPU's way back from vcpu_nice to nice 0):

- vCPU threads run at a lower priority (`vcpu_nice`, `vcpu_policy`): spinning guests cannot
  starve the control plane.
- The other threads (event loop, call pool, grpc's own) ask the kernel for a short slice
  (`api_slice_us`; EEVDF, Linux 6.12+: `sched_attr.sched_runtime` of a SCHED_OTHER thread).
  A waking thread with a shorter slice than the running one preempts it at once, where at
  the kernel's default slice (0.7 ms x (1 + log2 CPUs)) it could wait for the running vCPU
  thread's slice to end. Threads inherit the slice of the thread that creates them, so the
  daemon sets it once, before it starts any, and every vCPU thread puts itself back to the
  kernel's default.
- vCPU threads may be confined to some of the daemon's CPUs (`vcpu_cpus`): the others are
  left to the control plane (and the rest of the host), as a housekeeping CPU is on hosts
  that dedicate cores to guests. Priorities only decide who runs next on a CPU; a CPU no
  guest may use needs no decision. Affinity is per thread too, and narrowing one's own
  needs no privilege.
- The other threads may be confined too (`api_cpus`): threads that hand a call to each
  other on one CPU wake each other there, where waking another CPU costs more (likely much
  more on a virtualized host; measured in the README: control calls 14-27% faster, a
  pause's p99 below 5 ms). They take it from the thread that starts the daemon, as they
  take the slice; each vCPU thread then confines itself to vcpu_cpus, or to every CPU the
  daemon had.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct

log = logging.getLogger(__name__)

# Scheduling policies a vCPU thread may run under (vcpu_policy): normal time sharing at
# vcpu_nice, batch (never preempts on wake-up), or idle (runs only when nothing else wants
# the CPU: every other thread of the host, the API's first, preempts it at once).
POLICIES = {"other": os.SCHED_OTHER, "batch": os.SCHED_BATCH, "idle": os.SCHED_IDLE}

# The kernel clamps a requested slice to 0.1-100 ms; 0 asks for its default.
MIN_SLICE_US = 100
MAX_SLICE_US = 100_000
KERNEL_DEFAULT = 0

# x86-64 system call numbers (kvmd drives x86 KVM only).
_SYS_SCHED_SETATTR = 314
_SYS_SCHED_GETATTR = 315
# struct sched_attr, SCHED_ATTR_SIZE_VER0: size, policy, flags, nice, priority, runtime,
# deadline, period.
_ATTR = struct.Struct("=IIQiIQQQ")

# PyDLL: these system calls return at once, so they keep the GIL. Through CDLL the caller
# would drop it and then queue for it again behind the vCPU threads a resume just woke.
_libc = ctypes.PyDLL(None, use_errno=True)
_warned: set[str] = set()
# The slice shorten_api_slice gave the daemon's threads (a paused vCPU gets it too).
_api_slice_us = KERNEL_DEFAULT
# Every CPU the daemon may use, as it started: set when confine_api_threads narrows the
# starting thread's own affinity (None: not narrowed, the thread's affinity says).
_daemon_cpus: frozenset[int] | None = None


def _syscall(number: int, *args: int | ctypes.Array[ctypes.c_char]) -> None:
    if _libc.syscall(number, *args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _get_attr(tid: int) -> list[int]:
    buf = ctypes.create_string_buffer(_ATTR.size)
    _syscall(_SYS_SCHED_GETATTR, tid, buf, _ATTR.size, 0)
    return list(_ATTR.unpack(buf.raw))


def thread_slice_ns(tid: int) -> int:
    """The slice the kernel gives thread `tid` (0: the calling one), in ns; 0 where the
    kernel has no per-thread slices."""
    return _get_attr(tid)[5]


def set_thread_slice(tid: int, slice_us: int) -> bool:
    """Ask for a slice of `slice_us` (KERNEL_DEFAULT: the kernel's) for thread `tid` (0: the
    calling one), keeping its policy and nice value. Returns whether the kernel took it: a
    kernel without per-thread slices (before 6.12) accepts and ignores it. OSError where
    the call is refused (a system call filter without sched_setattr)."""
    _set_slice(tid, slice_us)
    return slice_us == KERNEL_DEFAULT or thread_slice_ns(tid) == slice_us * 1000


def _set_slice(tid: int, slice_us: int) -> None:
    attr = _get_attr(tid)
    attr[0], attr[2], attr[5] = _ATTR.size, 0, slice_us * 1000
    attr[6] = attr[7] = 0
    _syscall(_SYS_SCHED_SETATTR, tid, ctypes.create_string_buffer(_ATTR.pack(*attr)), 0)


_PR_SET_NAME = 15
COMM_BYTES = 15  # a thread's name (comm) holds at most 15 bytes


def name_thread(name: str) -> None:
    """Give the calling thread `name` as the kernel shows it (comm: top -H, ps -L,
    /proc/PID/task/TID/comm, py-spy), cut to 15 bytes. Python names its threads for itself
    only: every other thread shows the process's name."""
    _libc.prctl(_PR_SET_NAME, name.encode()[:COMM_BYTES], 0, 0, 0)


def thread_cpu_clock(tid: int) -> int:
    """The clock id of thread `tid`'s CPU time (user and system; a vCPU thread's guest time
    is user time), for time.clock_gettime_ns from any thread of the process: the kernel's
    encoding of a per-thread CPU clock (CPUCLOCK_PERTHREAD | CPUCLOCK_SCHED, ~tid << 3),
    what pthread_getcpuclockid returns, without the pthread handle of a thread that may
    have ended. Reading it fails (EINVAL) once the thread is gone."""
    return (~tid << 3) | 6


def parse_cpu_list(text: str) -> frozenset[int]:
    """The CPUs of a Linux CPU list ("1-3", "0,2,4-7"). ValueError if it is malformed or
    empty."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{text!r} is not a CPU list such as 1-3 or 0,2,4-7")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"{part.strip()!r} in {text!r} is a descending range")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: frozenset[int] | set[int]) -> str:
    """`cpus` as a Linux CPU list, runs as ranges: {0, 1, 2, 5} -> "0-2,5"."""
    runs: list[str] = []
    ordered = sorted(cpus)
    start = 0
    for i, cpu in enumerate(ordered):
        if i + 1 == len(ordered) or ordered[i + 1] != cpu + 1:
            first = ordered[start]
            runs.append(str(cpu) if first == cpu else f"{first}-{cpu}")
            start = i + 1
    return ",".join(runs)


def confine_thread(tid: int, cpus: frozenset[int]) -> bool:
    """Let thread `tid` (0: the calling one) run only on `cpus` (a vCPU thread: vcpu_cpus).
    Returns whether it worked; the first failure is logged, later ones are not."""
    try:
        os.sched_setaffinity(tid, cpus)
        return True
    except OSError as exc:
        if "affinity" not in _warned:
            _warned.add("affinity")
            log.warning("cannot set a vCPU thread's CPU affinity (vcpu_cpus)", extra={
                "cpus": format_cpu_list(cpus), "error": str(exc)})
        return False


def confine_api_threads(cpus: frozenset[int] | None) -> None:
    """Run the calling thread, and so every thread it starts after this, on `cpus` only
    (api_cpus; None: every CPU the daemon may use). Call before the daemon starts threads,
    as shorten_api_slice. OSError if the kernel refuses (a CPU gone offline meanwhile)."""
    global _daemon_cpus
    if _daemon_cpus is None:
        if cpus is None:
            return  # never narrowed: nothing to undo
        _daemon_cpus = frozenset(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus if cpus is not None else _daemon_cpus)


def daemon_cpus() -> frozenset[int]:
    """Every CPU the daemon may use (systemd's CPUAffinity=, AllowedCPUs=), whatever
    api_cpus narrowed its own threads to."""
    if _daemon_cpus is not None:
        return _daemon_cpus
    return frozenset(os.sched_getaffinity(0))


def api_cpus() -> frozenset[int]:
    """The CPUs the daemon's threads but vCPUs run on: api_cpus, else every CPU."""
    return frozenset(os.sched_getaffinity(0))


def api_slice_us() -> int:
    """The slice the daemon's threads run with (KERNEL_DEFAULT when none was set)."""
    return _api_slice_us


def set_vcpu_slice(tid: int, boosted: bool) -> None:
    """A vCPU thread's slice: the API's while a pause is pending (`boosted`), so it leaves
    the guest as promptly as the API thread that asked; the kernel's default again when it
    is resumed, before it is woken (its nice value it lowers itself, on its way into the
    guest: kvmd.kvm.ThreadScheduling). With the API's short slice each woken thread would
    preempt the resumer at once, twice a vCPU (woken, then waiting for the GIL the resumer
    holds). Nothing to do when the daemon's threads have the kernel's slice too. A failure
    is logged once."""
    if _api_slice_us == KERNEL_DEFAULT:
        return
    try:
        _set_slice(tid, _api_slice_us if boosted else KERNEL_DEFAULT)
    except OSError as exc:
        if "vcpu slice" not in _warned:
            _warned.add("vcpu slice")
            log.warning("cannot set a vCPU thread's scheduler slice",
                        extra={"error": str(exc)})


def report_priority_failure(policy: str, nice: int, error: str) -> None:
    """Log, once for the daemon, that a vCPU thread could not be put under `policy` at
    `nice`: by set_thread_priority, or by the thread itself on its way into the guest
    (kvmd.kvm.ThreadScheduling)."""
    if "priority" not in _warned:
        _warned.add("priority")
        log.warning("cannot set a vCPU thread's priority", extra={
            "policy": policy, "nice": nice, "error": error})


def shorten_api_slice(slice_us: int) -> str:
    """Give the calling thread, and so every thread it starts after this, a slice of
    `slice_us` (KERNEL_DEFAULT: the kernel's default, whatever the parent process had).
    Call before the daemon starts threads (before logging, whose relay is one); returns
    what happened, for report_api_slice: "" (nothing to say), "set", "unsupported" (a
    kernel without per-thread slices) or an error."""
    global _api_slice_us
    try:
        if thread_slice_ns(0) == slice_us * 1000:
            _api_slice_us = slice_us
            return ""  # done already (the command line, then the daemon)
        applied = set_thread_slice(0, slice_us)
    except OSError as exc:
        return str(exc)
    _api_slice_us = slice_us if applied else KERNEL_DEFAULT
    return "" if slice_us == KERNEL_DEFAULT else "set" if applied else "unsupported"


def report_api_slice(outcome: str, slice_us: int) -> None:
    """Log what shorten_api_slice did."""
    if outcome == "set":
        log.info("API threads' scheduler slice set", extra={"slice_us": slice_us})
    elif outcome == "unsupported":
        log.info("this kernel has no per-thread scheduler slices (Linux 6.12+): "
                 "api_slice_us has no effect", extra={"slice_us": slice_us})
    elif outcome and "api slice" not in _warned:
        _warned.add("api slice")
        log.warning("cannot set the API threads' scheduler slice",
                    extra={"slice_us": slice_us, "error": outcome})


def set_thread_priority(tid: int, policy: str, nice: int) -> bool:
    """Put a thread (`tid`, its native id) under `policy` at `nice` (Linux: per thread).
    Lowering a priority needs no privilege; raising it back needs CAP_SYS_NICE or
    RLIMIT_NICE (the unit's LimitNICE=). Returns whether it worked; the first failure is
    logged, later ones are not."""
    try:
        if policy == "other":  # leave idle/batch first, then the nice value
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        else:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            os.sched_setscheduler(tid, POLICIES[policy], os.sched_param(0))
        return True
    except OSError as exc:
        report_priority_failure(policy, nice, str(exc))
        return False
