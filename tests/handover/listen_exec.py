"""What systemd does between fork and exec for a service with stored fds: the fds from
fd 3 on, LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (this process's pid, which exec keeps),
then exec the service. Used by handover_support.FakeSystemd:

    listen_exec.py COMMAND... with LISTEN_FDS_FROM=fd,fd,... and LISTEN_FDNAMES in the env
"""

import fcntl
import os
import sys

sources = [int(x) for x in os.environ.pop("LISTEN_FDS_FROM", "").split(",") if x]
# Move them out of the way first: a source may sit where another must go.
base = 3 + len(sources) + max(sources, default=0)
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base) for fd in sources]
for fd in sources:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(high))
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[1], sys.argv[1:])
