"""The threads of a daemon process, shared by the test layers (a uniquely named module)."""

from __future__ import annotations

import os


def own_thread_nices(pid: int) -> dict[int, int]:
    """Each thread of process `pid` that is the daemon's own: its nice value by native id.
    Not KVM's own workers (kvm-nx-lpage-recovery: a kernel thread the first KVM_RUN adds to
    the process, with the attributes of the vCPU thread that made it), nor threads that end
    while being read."""
    out = {}
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as comm:
                if comm.read().startswith("kvm-"):
                    continue
            out[tid] = os.getpriority(os.PRIO_PROCESS, tid)
        except OSError:  # the thread ended meanwhile
            continue
    return out
