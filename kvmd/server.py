"""The kvmd daemon: configuration, listeners, server wiring, signals.

    kvmd [--listen ADDR]... [--config FILE] [--log-level LEVEL] [limits...]

Listens on unix:///run/kvmd/kvmd.sock by default (socket mode 0660). TCP listeners without
TLS are allowed on loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import tomllib
from collections.abc import Coroutine, Sequence
from concurrent import futures
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvmd import __version__
from kvmd.api.auth import AuthInterceptor, Authorizer, Policy
from kvmd.api.budget import Budget, BudgetInterceptor
from kvmd.api.interceptors import BlockingAdapter, ErrorInterceptor
from kvmd.api.services import Runtime, add_services
from kvmd.api.streams import StreamRegistry
from kvmd.api.tls import TlsFiles
from kvmd.core.errors import DomainError
from kvmd.core.host import Host
from kvmd.core.images import DEFAULT_IMAGES_DIR, validate_images_dir
from kvmd.core.limits import Limits
from kvmd.metrics import (
    DEFAULT_METRICS_LISTEN,
    MetricsInterceptor,
    MetricsServer,
    build_registry,
)
from kvmd.systemd import Watchdog, notify, watchdog_interval

DEFAULT_LISTEN = "unix:///run/kvmd/kvmd.sock"
SOCKET_MODE = 0o660
# The umask while grpc binds a Unix socket, so it is born 0660: no window in which another
# user could connect and be taken for the "local" identity.
SOCKET_UMASK = 0o117
SHUTDOWN_GRACE_SECONDS = 2.0
EXIT_CONFIG_ERROR = 2
T = TypeVar("T")

log = logging.getLogger("kvmd")


class ConfigError(Exception):
    """The configuration is unusable; the daemon exits 2 with this one-line reason."""


# -- logging -------------------------------------------------------------------------------

_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class KeyValueFormatter(logging.Formatter):
    """One line per event: ts=... level=... logger=... msg="..." key=value (vm_id, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"ts={ts}.{int(record.msecs):03d}Z", f"level={record.levelname.lower()}",
                 f"logger={record.name}", f"msg={json.dumps(record.getMessage())}"]
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                text = str(value)
                parts.append(f"{key}={json.dumps(text) if ' ' in text or not text else text}")
        if record.exc_info:
            parts.append(f"exc={json.dumps(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# -- configuration -------------------------------------------------------------------------

@dataclass
class Config:
    """Daemon settings: the TOML config file mirrors these names; flags win."""

    listen: list[str] = field(default_factory=lambda: [DEFAULT_LISTEN])
    log_level: str = "info"
    kvm_device: str = "/dev/kvm"
    socket_group: str = ""
    max_vms: int = Limits.max_vms
    max_vcpus_per_vm: int = Limits.max_vcpus_per_vm
    max_memory_per_vm_bytes: int = Limits.max_memory_per_vm_bytes
    max_memory_total_bytes: int = Limits.max_memory_total_bytes
    max_memory_slots_per_vm: int = Limits.max_memory_slots_per_vm
    max_irqfds_per_vm: int = Limits.max_irqfds_per_vm
    max_ioevents_per_vm: int = Limits.max_ioevents_per_vm
    max_message_bytes: int = Limits.max_message_bytes
    max_concurrent_rpcs: int = Limits.max_concurrent_rpcs
    max_calls_per_identity: int = Limits.max_calls_per_identity
    max_streams: int = Limits.max_streams
    max_streams_per_identity: int = Limits.max_streams_per_identity
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    authorization: dict[str, Any] = field(default_factory=dict)
    # Embedded daemons (tests) serve no metrics unless asked; the CLI defaults to the port.
    metrics_listen: str = "off"
    metrics_vcpu_label: bool = False
    # Files that may back guest memory (AddMemoryRegion/MapGuestMemory name them relative to
    # it). The default may be absent (file-backed memory is then off); any other setting
    # must be an existing directory.
    images_dir: str = DEFAULT_IMAGES_DIR

    def limits(self) -> Limits:
        names = {f.name for f in fields(Limits)}
        return Limits(**{k: v for k, v in vars(self).items() if k in names})


def build_parser() -> argparse.ArgumentParser:
    # Defaults are in the help texts: unset flags are None so the config file can fill them.
    p = argparse.ArgumentParser(prog="kvmd", description="Serve the Linux KVM API over gRPC.")
    p.add_argument("--config", metavar="FILE",
                   help="TOML file whose keys mirror these flags (flags win)")
    p.add_argument("--listen", action="append", metavar="ADDR",
                   help=f"unix:///path or host:port; repeatable (default {DEFAULT_LISTEN})")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="default info")
    p.add_argument("--kvm-device", metavar="PATH", help="KVM device path (default /dev/kvm)")
    p.add_argument("--socket-group", metavar="GROUP",
                   help="group owning Unix sockets (default: unchanged)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help=f"Prometheus /metrics address, or 'off' (default "
                        f"{DEFAULT_METRICS_LISTEN})")
    p.add_argument("--metrics-vcpu-label", action="store_const", const=True,
                   help="add a vcpu label to kvmd_vcpu_exits_total")
    p.add_argument("--tls-cert", metavar="PEM", help="server certificate for TCP listeners")
    p.add_argument("--tls-key", metavar="PEM", help="server private key for TCP listeners")
    p.add_argument("--tls-client-ca", metavar="PEM",
                   help="require client certificates signed by this CA (mTLS)")
    p.add_argument("--images-dir", metavar="DIR",
                   help="directory of the files guest memory may be backed by (default "
                        f"{DEFAULT_IMAGES_DIR}; absent: file-backed memory is off)")
    for f in fields(Limits):
        p.add_argument("--" + f.name.replace("_", "-"), type=int, metavar="N",
                       help=f"limit (default {f.default})")
    p.add_argument("--version", action="version", version=f"kvmd {__version__}")
    return p


def load_config(args: argparse.Namespace) -> Config:
    cfg = Config(metrics_listen=DEFAULT_METRICS_LISTEN)
    known = {f.name for f in fields(Config)}
    if args.config:
        try:
            with open(args.config, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {args.config}: {exc}") from None
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown key {key!r} in {args.config}")
            if name == "listen" and isinstance(value, str):
                value = [value]
            if name == "authorization" and not isinstance(value, dict):
                raise ConfigError(f"[authorization] in {args.config} must be a table")
            expected = type(getattr(cfg, name))
            if not isinstance(value, expected):
                raise ConfigError(f"{key} in {args.config} must be a {expected.__name__}")
            setattr(cfg, name, value)
    for name in known:
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, value)
    for f in fields(Limits):
        if getattr(cfg, f.name) <= 0:
            raise ConfigError(f"{f.name} must be positive")
    validate_tls(cfg)
    return cfg


def validate_tls(cfg: Config) -> None:
    """Refuse TLS settings that cannot work or would silently weaken security."""
    if cfg.tls_client_ca and not cfg.tls_cert:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key: clients can only "
                          "be verified over TLS")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    for what, path in (("certificate", cfg.tls_cert), ("key", cfg.tls_key),
                       ("client CA", cfg.tls_client_ca)):
        if path:
            try:
                with open(path, "rb") as fh:
                    if b"-----BEGIN" not in fh.read():
                        raise ConfigError(f"TLS {what} {path} is not PEM")
            except OSError as exc:
                raise ConfigError(f"cannot read TLS {what} {path}: {exc.strerror}") from None


# -- listeners -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Listener:
    address: str  # as given
    target: str  # what grpc binds
    unix_path: str | None


def parse_listen(address: str, tls: bool = False) -> Listener:
    if address.startswith("unix:"):
        path = address[len("unix://"):] if address.startswith("unix://") else address[5:]
        if not path.startswith("/"):
            raise ConfigError(f"unix listen address {address!r} needs an absolute path "
                              "(unix:///run/kvmd/kvmd.sock)")
        return Listener(address, f"unix://{path}", path)
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"listen address {address!r} is neither unix:///path nor host:port")
    bare = host.strip("[]")
    if not tls and not _is_loopback(bare):
        raise ConfigError(f"refusing plain TCP on non-loopback address {address!r}: "
                          "use --tls-cert/--tls-key, or listen on loopback")
    return Listener(address, address, None)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare_unix_socket(path: str) -> None:
    """Create the directory; replace a stale socket, refuse if a daemon answers on it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if not os.path.lexists(path):
        return
    import stat

    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: left by a daemon that died
        log.info("replaced stale socket", extra={"path": path})
        return
    except OSError as exc:
        raise ConfigError(f"cannot probe existing socket {path}: {exc}") from None
    finally:
        probe.close()
    raise ConfigError(f"another daemon is already listening on {path}")


def finish_unix_socket(path: str, group: str) -> None:
    if group:
        import grp

        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"socket group {group!r} does not exist") from None
        # Under systemd (Group=kvmd) the socket already has the group: no CAP_CHOWN needed.
        if os.stat(path).st_gid != gid:
            try:
                os.chown(path, -1, gid)
            except PermissionError:
                raise ConfigError(f"cannot give {path} to group {group!r}: run the daemon "
                                  "with that group (systemd Group=) or as root") from None
    os.chmod(path, SOCKET_MODE)


# -- the event loop ------------------------------------------------------------------------

_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_loop_anchor: Any = None


def grpc_loop() -> asyncio.AbstractEventLoop:
    """The process's one event loop for gRPC, in its own daemon thread ("kvmd-grpc").

    grpc.aio keeps one completion queue per process, bound to the loop that first used it
    and torn down when its last server or channel goes away; a loop that stops, or a
    teardown racing its poller, breaks every other aio object in the process. So every
    Daemon of a process (one in production, several in tests) shares this loop, which
    never stops, and a never-used channel created on it keeps grpc.aio initialised.
    """
    global _loop, _loop_anchor
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="kvmd-grpc", daemon=True).start()

            async def anchor() -> Any:
                return grpc.aio.insecure_channel("unix:///nonexistent/kvmd-grpc-anchor")

            _loop_anchor = asyncio.run_coroutine_threadsafe(anchor(), loop).result()
            _loop = loop
        return _loop


# -- the daemon ----------------------------------------------------------------------------

class Daemon:
    """A running kvmd: the core Host plus a grpc.aio server on the configured listeners.

    The server runs on the process's gRPC event loop (`grpc_loop`, its own thread), so
    `start()` and `stop()` are plain blocking calls for the CLI and for tests. Unary
    handlers run in a pool of `max_concurrent_rpcs` threads; streams wait on the loop and
    cost no thread.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.limits = cfg.limits()
        self.listeners = [parse_listen(a, bool(cfg.tls_cert)) for a in cfg.listen]
        try:
            self.policy = Policy.from_config(cfg.authorization)
        except ValueError as exc:
            raise ConfigError(f"authorization: {exc}") from None
        self.tls = TlsFiles(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) if cfg.tls_cert \
            else None
        problem = validate_images_dir(cfg.images_dir,
                                      required=cfg.images_dir != DEFAULT_IMAGES_DIR)
        if problem:
            raise ConfigError(problem)
        self.watchdog: Watchdog | None = None
        self.host: Host | None = None
        self.server: grpc.aio.Server | None = None
        self.health: Any = None  # grpc_health's aio HealthServicer (untyped)
        self.metrics_server: MetricsServer | None = None
        self.executor: futures.ThreadPoolExecutor | None = None
        self.streams = StreamRegistry()
        self.budget = Budget(self.limits.max_concurrent_rpcs, self.limits.max_calls_per_identity,
                             self.limits.max_streams, self.limits.max_streams_per_identity)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopped = threading.Event()
        self._owned_sockets: list[str] = []
        self.ports: dict[str, int] = {}

    # -- the event loop -------------------------------------------------------------------

    def on_loop(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the server's loop from another thread and wait for it."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # -- start and stop -------------------------------------------------------------------

    def start(self) -> None:
        if not os.path.isdir(self.cfg.images_dir):
            log.info("no images directory: file-backed guest memory is off",
                     extra={"images_dir": self.cfg.images_dir})
        try:
            self.host = Host(self.limits, self.cfg.kvm_device, self.cfg.images_dir)
        except DomainError as exc:
            raise ConfigError(f"cannot open {self.cfg.kvm_device}: {exc.message}") from None
        registry, rpc_metrics = build_registry(self.host, self.cfg.metrics_vcpu_label)
        authorizer = Authorizer(self.policy, self.host, rpc_metrics.count_denial)
        if not self.policy.enabled:
            log.warning("no authorization policy: every caller that can connect is an admin")
        self.executor = futures.ThreadPoolExecutor(max_workers=self.limits.max_concurrent_rpcs,
                                                   thread_name_prefix="kvmd-rpc")
        self.loop = grpc_loop()
        try:
            names = self.on_loop(self._serve(authorizer, rpc_metrics))
        except BaseException:
            self._remove_sockets()
            raise
        if self.cfg.metrics_listen != "off":
            try:
                self.metrics_server = MetricsServer(registry, self.cfg.metrics_listen)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot serve metrics on {self.cfg.metrics_listen}: "
                                  f"{exc}") from None
            log.info("metrics listening", extra={"address": self.cfg.metrics_listen,
                                                 "port": self.metrics_server.port})
        for listener in self.listeners:
            if listener.unix_path:
                finish_unix_socket(listener.unix_path, self.cfg.socket_group)
        self.on_loop(self._set_serving(["", *names]))
        log.info("kvmd listening", extra={"version": __version__,
                                          "listen": ",".join(self.cfg.listen)})
        notify(f"READY=1\nSTATUS=serving on {', '.join(self.cfg.listen)}")
        interval = watchdog_interval()
        if interval:
            self.watchdog = Watchdog(interval, self.healthy)
            self.watchdog.start()

    async def _serve(self, authorizer: Authorizer, rpc_metrics: Any) -> list[str]:
        """Build, bind and start the server (on the loop); returns the service names."""
        assert self.host is not None and self.executor is not None
        # grpc core queues calls the server has not picked up yet and, past a soft limit
        # (1,000 by default), rejects them at random (CANCELLED): a burst of streams within
        # our own budgets must never meet that, so its limits sit above the budgets.
        pending = self.limits.max_streams + 4 * self.limits.max_concurrent_rpcs
        options = [
            ("grpc.max_receive_message_length", self.limits.max_message_bytes),
            ("grpc.max_send_message_length", self.limits.max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", 2 * pending),
        ]
        server = grpc.aio.server(
            migration_thread_pool=self.executor,
            interceptors=[MetricsInterceptor(rpc_metrics), ErrorInterceptor(),
                          AuthInterceptor(authorizer), BudgetInterceptor(self.budget),
                          BlockingAdapter(self.executor)],
            options=options,
        )
        runtime = Runtime(self.executor, self.streams)
        names = add_services(server, self.host, runtime, authorizer.visible)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        for listener in self.listeners:
            self._bind(server, listener)
        await server.start()
        self.server = server
        return names

    def _bind(self, server: grpc.aio.Server, listener: Listener) -> None:
        if listener.unix_path:
            prepare_unix_socket(listener.unix_path)
        old_umask = os.umask(SOCKET_UMASK) if listener.unix_path else None
        try:
            if listener.unix_path is None and self.tls is not None:
                port = server.add_secure_port(listener.target, self.tls.credentials())
            else:
                port = server.add_insecure_port(listener.target)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {listener.address}: {exc}") from None
        finally:
            if old_umask is not None:
                os.umask(old_umask)
        if listener.unix_path:
            self._owned_sockets.append(listener.unix_path)
            return
        self.ports[listener.address] = port
        if self.tls is None:
            log.warning("listening on plain TCP without TLS (loopback only)",
                        extra={"address": listener.address, "port": port})
        else:
            log.info("listening with TLS", extra={
                "address": listener.address, "port": port,
                "mtls": bool(self.cfg.tls_client_ca)})

    async def _set_serving(self, names: list[str]) -> None:
        assert self.health is not None
        for name in names:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def healthy(self) -> bool:
        """The daemon's own health check: KVM answers and the server is up."""
        if self.host is None or self.server is None or self.stopped.is_set():
            return False
        try:
            self.host.kvm.check_extension("KVM_CAP_USER_MEMORY")
        except Exception:
            return False
        return True

    def reload_tls(self) -> None:
        """Re-read certificates now (SIGHUP); they are also re-read when the files change."""
        if self.tls is not None:
            self.tls.force_reload()
            log.info("TLS certificates will be reloaded on the next handshake")

    async def _shutdown_server(self) -> None:
        """End every stream cleanly, then stop accepting; unary calls in flight get the
        grace period."""
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        self.streams.shutdown()
        if self.server is not None:
            await self.server.stop(SHUTDOWN_GRACE_SECONDS)
            await self.server.wait_for_termination()

    def stop(self) -> None:
        """Stop accepting, end streams, release every VM, remove the sockets (once)."""
        if self.stopped.is_set():
            return
        notify("STOPPING=1\nSTATUS=stopping")
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.loop is not None:
            try:
                self.on_loop(self._shutdown_server(), timeout=SHUTDOWN_GRACE_SECONDS + 5)
            except (futures.TimeoutError, RuntimeError):
                log.warning("the gRPC server did not stop in time")
            self.server = None
        # grpc does not own the executor: end its worker threads too.
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.host is not None:
            self.host.close()
        self._remove_sockets()
        self.stopped.set()
        log.info("kvmd stopped")

    def _remove_sockets(self) -> None:
        for path in self._owned_sockets:
            if os.path.lexists(path):
                os.unlink(path)
        self._owned_sockets.clear()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args)
        setup_logging(cfg.log_level)
        daemon = Daemon(cfg)
    except ConfigError as exc:
        print(f"kvmd: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal received, shutting down", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, lambda signum, frame: daemon.reload_tls())
    try:
        daemon.start()
    except ConfigError as exc:
        print(f"kvmd: {exc}", file=sys.stderr)
        daemon.stop()
        return EXIT_CONFIG_ERROR
    while not stop.wait(1.0):
        pass
    daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
