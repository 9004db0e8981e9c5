"""systemd integration: sd_notify (READY, STATUS, STOPPING) and watchdog pings."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send one sd_notify datagram; False when not run under systemd (no NOTIFY_SOCKET)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(message.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify failed", extra={"error": str(exc)})
        return False


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
