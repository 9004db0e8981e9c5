"""systemd integration: sd_notify (READY, STATUS, STOPPING), watchdog pings, and the fd
store (FDSTORE/FDSTOREREMOVE with SCM_RIGHTS, BARRIER, and LISTEN_FDS at start) that
carries guest memory across a daemon restart."""

from __future__ import annotations

import fcntl
import logging
import os
import select
import socket
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
# The kernel's limit of fds per SCM_RIGHTS message.
SCM_MAX_FD = 253


def _notify_address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    return path


def under_systemd() -> bool:
    """Started by systemd (or something speaking its notify protocol)."""
    return _notify_address() is not None


def notify(message: str) -> bool:
    """Send one sd_notify datagram; False when not run under systemd (no NOTIFY_SOCKET)."""
    try:
        return notify_fds(message, [])
    except OSError as exc:
        log.warning("sd_notify failed", extra={"error": str(exc)})
        return False


def notify_fds(message: str, fds: list[int]) -> bool:
    """One sd_notify datagram carrying `fds` (SCM_RIGHTS); False without NOTIFY_SOCKET.
    Raises OSError when the datagram cannot be sent: a caller storing fds must know."""
    path = _notify_address()
    if path is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(path)
        if fds:
            socket.send_fds(sock, [message.encode()], fds)
        else:
            sock.sendall(message.encode())
    return True


def fd_name_valid(name: str) -> bool:
    """systemd's fdname_is_valid: printable ASCII but ':', at most 255 characters."""
    return len(name) <= 255 and all(" " <= c < "\x7f" and c != ":" for c in name)


def fd_store(named: dict[str, int]) -> None:
    """Put each fd in systemd's fd store under its name (FDSTORE=1, FDNAME=); systemd
    keeps an fd it already holds once. Then waits until systemd has processed every
    message (BARRIER=1): the daemon may exit right after. Raises OSError if systemd could
    not be told or did not answer."""
    for name, fd in named.items():
        if not fd_name_valid(name):
            raise ValueError(f"{name!r} is not a valid fd store name")
        notify_fds(f"FDSTORE=1\nFDNAME={name}", [fd])
    barrier()


def fd_store_remove(names: Iterable[str]) -> None:
    """Take the fds of these names out of systemd's fd store (FDSTOREREMOVE=1)."""
    for name in names:
        notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def barrier(timeout: float = 10.0) -> None:
    """sd_notify_barrier: returns once systemd has processed every message sent before
    (it closes the pipe end it got with BARRIER=1). Raises OSError on a timeout."""
    if _notify_address() is None:
        return
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            notify_fds("BARRIER=1", [w])
        finally:
            os.close(w)
        poller = select.poll()
        poller.register(r, select.POLLHUP)
        if not poller.poll(timeout * 1000):
            raise OSError(f"systemd did not process the notify messages within {timeout} s")
    finally:
        os.close(r)


def listen_fds(unset: bool = True) -> list[tuple[str, int]]:
    """The fds systemd passed this process (sd_listen_fds_with_names): (name, fd) in
    order, from fd 3, close-on-exec; empty unless LISTEN_PID is this process. With
    `unset`, the LISTEN_* variables are removed so children do not take them."""
    pid, count = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    names_var = os.environ.get("LISTEN_FDNAMES", "")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    names = names_var.split(":") if names_var else []
    out = []
    for i in range(int(count)):
        fd = SD_LISTEN_FDS_START + i
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            log.warning("LISTEN_FDS names an fd that is not open", extra={"fd": fd})
            continue
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        out.append((names[i] if i < len(names) else "unknown", fd))
    return out


def watchdog_interval() -> float | None:
    """Half the WATCHDOG_USEC systemd asks for, if it asks this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None


class Watchdog:
    """Pings WATCHDOG=1 every interval while `healthy()` says so; stops pinging (so
    systemd restarts the daemon) when the daemon's own health check fails."""

    def __init__(self, interval: float, healthy: Callable[[], bool]) -> None:
        self.interval = interval
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvmd-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                ok = self._healthy()
            except Exception:
                log.exception("health check raised")
                ok = False
            if ok:
                notify("WATCHDOG=1")
            else:
                log.error("health check failed: not pinging the systemd watchdog")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
