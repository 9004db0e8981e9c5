"""What an assertion on results cannot see, each run in a child process of its own: the
kernel writing past a buffer the binding gave it (glibc's malloc checks catch the overrun
when the buffer is freed), and descriptors running out between the two a vCPU needs."""

from __future__ import annotations

import os
import subprocess
import sys

MALLOC_DEBUG = "/lib/x86_64-linux-gnu/libc_malloc_debug.so.0"

DIRTY_LOG_CHILD = r"""
import gc
from kvmd.kvm import Kvm
with Kvm() as kvm, kvm.create_vm() as vm:
    for pages in (1, 3, 65, 100):  # not whole 64-page words: KVM still writes whole words
        slot = vm.add_memory_region(0x100000 * (pages + 1), pages * 4096, log_dirty=True)
        for _ in range(20):
            assert vm.get_dirty_log(slot) == bytes((pages + 7) // 8)
            gc.collect()
print("ok")
"""


def run_child(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_the_dirty_log_buffer_holds_the_kernels_whole_words() -> None:
    assert os.path.exists(MALLOC_DEBUG), "glibc's malloc debug library (Debian libc6)"
    done = run_child(DIRTY_LOG_CHILD, {"LD_PRELOAD": MALLOC_DEBUG, "MALLOC_CHECK_": "3",
                                       "PYTHONMALLOC": "malloc"})
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr[-2000:]


VCPU_FDS_CHILD = r"""
import errno, os, resource
from kvmd.kvm import Kvm, KvmError
with Kvm() as kvm, kvm.create_vm() as vm:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(n) for n in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 64, hard))
    fillers = []
    try:
        while True:
            fillers.append(os.dup(0))
    except OSError:
        pass
    os.close(fillers.pop())  # exactly one descriptor left: a vCPU needs two
    try:
        vm.create_vcpu(0)
        print("created")
    except KvmError as exc:
        print("refused", errno.errorcode[exc.errno])
    for fd in fillers:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    vcpu = vm.create_vcpu(0)  # the id was not taken by the refused one
    assert vcpu.stats().read()
    print("ok")
"""


def test_a_vcpu_is_refused_while_it_cannot_have_both_its_descriptors() -> None:
    """KVM cannot destroy a vCPU without its VM: one made with no descriptor left for its
    statistics would keep its id for good without them. It is refused (EMFILE) first."""
    done = run_child(VCPU_FDS_CHILD)
    assert done.stdout.split() == ["refused", "EMFILE", "ok"], done.stdout + done.stderr[-2000:]
