"""Run a command under seccomp filters that mimic a systemd unit's sandbox, without systemd.

    python seccomp_exec.py SPEC.json COMMAND [ARGS...]

SPEC keys (each optional):

* "allow": system call names; every other call fails with "errno" (SystemCallFilter= in
  allow-list mode, SystemCallErrorNumber=).
* "errno": the errno of a filtered call (default EPERM).
* "mdwe": true for MemoryDenyWriteExecute=yes (mmap W+X, mprotect/pkey_mprotect +X and
  shmat SHM_EXEC fail with EPERM, as systemd does it).
* "families": address families socket() may use (RestrictAddressFamilies=); others fail
  with EAFNOSUPPORT.

Filters are loaded through libseccomp (ctypes) with no_new_privs set, then COMMAND is exec'd:
seccomp filters survive execve.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import sys

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_NE, SCMP_CMP_EQ, SCMP_CMP_GT, SCMP_CMP_MASKED_EQ = 1, 4, 6, 7
SHM_EXEC = 0o100000
PR_SET_NO_NEW_PRIVS = 38


def scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def load_libseccomp() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    lib.seccomp_load.restype = ctypes.c_int
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


class Filter:
    def __init__(self, lib: ctypes.CDLL, default_action: int) -> None:
        self.lib = lib
        self.ctx = lib.seccomp_init(default_action)
        if not self.ctx:
            raise OSError("seccomp_init failed")

    def rule(self, action: int, name: str, *conds: tuple[int, int, int, int]) -> bool:
        nr = self.lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0 and nr != -10101:  # unknown here (__NR_SCMP_ERROR); pseudo-calls are < 0
            return False
        array = (ArgCmp * max(len(conds), 1))(*[ArgCmp(*c) for c in conds])
        return self.lib.seccomp_rule_add_array(self.ctx, action, nr, len(conds), array) == 0

    def load(self) -> None:
        rc = self.lib.seccomp_load(self.ctx)
        self.lib.seccomp_release(self.ctx)
        if rc != 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")


def main() -> None:
    with open(sys.argv[1]) as fh:
        spec = json.load(fh)
    command = sys.argv[2:]
    lib = load_libseccomp()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    eperm = scmp_act_errno(errno.EPERM)
    filters: list[Filter] = []
    if spec.get("mdwe"):
        f = Filter(lib, SCMP_ACT_ALLOW)
        wx = mmap.PROT_WRITE | mmap.PROT_EXEC
        f.rule(eperm, "mmap", (2, SCMP_CMP_MASKED_EQ, wx, wx))
        for name in ("mprotect", "pkey_mprotect"):
            f.rule(eperm, name, (2, SCMP_CMP_MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC))
        f.rule(eperm, "shmat", (2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        filters.append(f)
    if "families" in spec:
        f = Filter(lib, SCMP_ACT_ALLOW)
        allowed = sorted(int(a) for a in spec["families"])
        deny = scmp_act_errno(errno.EAFNOSUPPORT)
        for family in range(0, allowed[-1]):
            if family not in allowed:
                f.rule(deny, "socket", (0, SCMP_CMP_EQ, family, 0))
        f.rule(deny, "socket", (0, SCMP_CMP_GT, allowed[-1], 0))
        filters.append(f)
    # The allow list goes last: it may itself forbid seccomp(), which loading needs.
    if "allow" in spec:
        f = Filter(lib, scmp_act_errno(int(spec.get("errno", errno.EPERM))))
        for name in spec["allow"]:
            f.rule(SCMP_ACT_ALLOW, name)
        filters.append(f)
    for f in filters:
        f.load()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
