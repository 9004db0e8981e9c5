"""The kvmd daemon: configuration, listeners, server wiring, signals.

    kvmd [--listen ADDR]... [--config FILE] [--log-level LEVEL] [limits...]

Listens on unix:///run/kvmd/kvmd.sock by default (socket mode 0660). TCP listeners without
TLS are allowed on loopback only.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Coroutine
from concurrent import futures
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from kvmd import __version__
from kvmd.api.auth import AuthInterceptor, Authorizer, Policy
from kvmd.api.budget import Budget, BudgetInterceptor
from kvmd.api.gate import Gate
from kvmd.api.handover import HandoverService
from kvmd.api.interceptors import CallChain, HandlerRegistry
from kvmd.api.pool import CallPool
from kvmd.api.services import Runtime, add_services
from kvmd.api.streams import StreamRegistry
from kvmd.api.tls import TlsFiles
from kvmd.config import (
    Config,
    ConfigError,
    Listener,
    confine_api_cpus,
    migration_tls_files,
    parse_listen,
)
from kvmd.core.errors import DomainError
from kvmd.core.host import Host
from kvmd.core.images import DEFAULT_IMAGES_DIR, validate_images_dir
from kvmd.core.sched import (
    api_cpus,
    daemon_cpus,
    format_cpu_list,
    report_api_slice,
    shorten_api_slice,
)
from kvmd.handover import Handover, HandoverError, leave_placeholder
from kvmd.metrics import (
    MetricsInterceptor,
    MetricsServer,
    build_registry,
)
from kvmd.migration.registry import Migrations
from kvmd.migration.transport import MigrationTls
from kvmd.state.store import SnapshotStore
from kvmd.systemd import Watchdog, notify, under_systemd, watchdog_interval
from kvmd_proto import vmm_pb2_grpc as rpc

SOCKET_MODE = 0o660
# The umask while grpc binds a Unix socket, so it is born 0660: no window in which another
# user could connect and be taken for the "local" identity.
SOCKET_UMASK = 0o117
SHUTDOWN_GRACE_SECONDS = 2.0
# Keepalive pings the daemon accepts: one every 10 s or slower per connection, with or
# without open calls. gRPC's default allows one every 5 minutes and answers the third
# faster one with GOAWAY too_many_pings, which would cut the long streams (watches, console,
# migrations) of every client that keeps them alive: kvmd-client pings every 20 s
# (kvmd_client.channel), grpc-go and grpc-java clients are often set to 10-30 s.
KEEPALIVE_MIN_PING_INTERVAL_MS = 10_000
KEEPALIVE_SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MIN_PING_INTERVAL_MS),
    # Clients that keep an idle connection warm (no call open) are not punished for it.
    ("grpc.keepalive_permit_without_calls", 1),
]
EXIT_CONFIG_ERROR = 2
EXIT_HANDOVER_FAILED = 1
T = TypeVar("T")

log = logging.getLogger("kvmd")


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


def leave_placeholder_socket(path: str, group: str) -> None:
    """At a stop that keeps the VMs: a placeholder where the socket was, so clients wait for
    the next daemon (kvmd.handover.leave_placeholder), of the socket's group and mode: a
    client of that group denied (EACCES) would give up instead."""
    if not leave_placeholder(path):
        return
    try:
        finish_unix_socket(path, group)
    except (ConfigError, OSError) as exc:
        log.warning("placeholder socket left without its group", extra={
            "path": path, "group": group, "error": str(exc)})


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


class GenericHandlersOnly(HandlerRegistry):
    """The part of a grpc.aio server that generated `add_*_to_server` functions use, with
    every method served through its service's generic handler only.

    Generated code also registers each method ("registered methods"). grpc.aio's server
    then keeps one pending request per registered method and, for every call, waits on all
    of them at once (asyncio.wait over ~85 futures here, twice per call): about 300 us of
    the event loop's time per call, more than the rest of a GetVm. Through the generic
    handler a call costs one lookup, and CallChain caches the wrapped handler per method.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        """Dropped: the same handlers came with the service's generic handler."""


# -- the daemon ----------------------------------------------------------------------------

class Daemon:
    """A running kvmd: the core Host plus a grpc.aio server on the configured listeners.

    The server runs on the process's gRPC event loop (`grpc_loop`, its own thread), so
    `start()` and `stop()` are plain blocking calls for the CLI and for tests. Unary
    handlers run in a pool of `max_concurrent_rpcs` threads; streams wait on the loop and
    cost no thread.
    """

    def __init__(self, cfg: Config, take_over: bool = False,
                 handover: Handover | None = None) -> None:
        self.cfg = cfg
        # Hand-over (kvmd.handover): restart and upgrade without losing VMs. `handover`:
        # VMs already received (kvmd.launch restores them before importing the server).
        self.take_over = take_over
        self.gate = Gate()
        self.handover = handover
        self.exit_requested = threading.Event()  # main() stops the daemon when set
        self._handed_over = False
        self.limits = cfg.limits()
        self.listeners = [parse_listen(a, bool(cfg.tls_cert)) for a in cfg.listen]
        try:
            self.policy = Policy.from_config(cfg.authorization)
        except ValueError as exc:
            raise ConfigError(f"authorization: {exc}") from None
        self.tls = TlsFiles(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) if cfg.tls_cert \
            else None
        if cfg.images_dir:
            problem = validate_images_dir(cfg.images_dir,
                                          required=cfg.images_dir != DEFAULT_IMAGES_DIR)
            if problem:
                raise ConfigError(problem)
        self.watchdog: Watchdog | None = None
        self.host: Host | None = handover.host if handover is not None else None
        self.authorizer: Authorizer | None = None
        self.server: grpc.aio.Server | None = None
        self.health: Any = None  # grpc_health's aio HealthServicer (untyped)
        self.metrics_server: MetricsServer | None = None
        self.executor: CallPool | None = None
        self.streams = StreamRegistry()
        self.budget = Budget(self.limits.max_concurrent_rpcs, self.limits.max_calls_per_identity,
                             self.limits.max_streams, self.limits.max_streams_per_identity)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopped = threading.Event()
        self._owned_sockets: list[str] = []
        self.ports: dict[str, int] = {}
        self.migrations: Migrations | None = None

    # -- the event loop -------------------------------------------------------------------

    def on_loop(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the server's loop from another thread and wait for it."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # -- start and stop -------------------------------------------------------------------

    def start(self) -> None:
        # Before this starts any thread (done already when started from the command line).
        report_api_slice(shorten_api_slice(self.cfg.api_slice_us), self.cfg.api_slice_us)
        confine_api_cpus(self.cfg)
        tune_allocator()
        images_dir = self.cfg.images_dir or None
        if images_dir is None or not os.path.isdir(images_dir):
            log.info("no images directory: file-backed guest memory is off",
                     extra={"images_dir": images_dir or "-"})
        if self.host is None:
            try:
                self.host = Host(self.limits, self.cfg.kvm_device, images_dir,
                                 vcpu_nice=self.cfg.vcpu_nice,
                                 vcpu_policy=self.cfg.vcpu_policy,
                                 vcpu_cpus=self.cfg.vcpu_cpu_set())
            except DomainError as exc:
                raise ConfigError(f"cannot open {self.cfg.kvm_device}: {exc.message}") \
                    from None
        # What the host holds (it may have been made before the server, by the hand-over).
        vcpu_cpus = self.host.shared.vcpu_cpus
        if self.cfg.vcpu_cpus and vcpu_cpus is not None:  # not api_cpus' widening
            log.info("vCPU threads confined to vcpu_cpus", extra={
                "vcpu_cpus": format_cpu_list(vcpu_cpus),
                "cpus_without_guests": format_cpu_list(daemon_cpus() - vcpu_cpus) or "none"})
        if self.cfg.api_cpus:
            log.info("the daemon's other threads confined to api_cpus", extra={
                "api_cpus": format_cpu_list(api_cpus())})
        registry, rpc_metrics = build_registry(self.host, self.cfg.metrics_vcpu_label)
        authorizer = Authorizer(self.policy, self.host, rpc_metrics.count_denial)
        self.authorizer = authorizer
        self.host.fds.privileged = authorizer.privileged
        if not self.policy.enabled:
            log.warning("no authorization policy: every caller that can connect is an admin")
        self.executor = CallPool(max_workers=self.limits.max_concurrent_rpcs,
                                 thread_name_prefix="kvmd-rpc")
        self.loop = grpc_loop()
        if self.handover is None:
            # Before binding: VMs handed over by the previous daemon run again as soon as
            # they are restored (a take-over waits here until the old daemon freed its
            # listeners).
            self.handover = Handover.for_config(self.cfg, self.host)
            self.handover.receive(self.take_over)
        self.handover.attach(self)
        try:
            names = self.on_loop(self._serve(authorizer, rpc_metrics))
        except BaseException:
            self._remove_sockets()
            raise
        if self.cfg.metrics_listen != "off":
            try:
                self.metrics_server = MetricsServer(
                    registry, self.cfg.metrics_listen, tls_cert=self.cfg.metrics_tls_cert,
                    tls_key=self.cfg.metrics_tls_key,
                    tls_client_ca=self.cfg.metrics_tls_client_ca)
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
        self.handover.serving()
        stranded = len(self.handover.stranded.all())
        notify(f"READY=1\nSTATUS=serving on {', '.join(self.cfg.listen)}" + (
            f"; {stranded} VMs stranded by the hand-over (kvmctl handover stranded)"
            if stranded else ""))
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
            *KEEPALIVE_SERVER_OPTIONS,
        ]
        server = grpc.aio.server(
            migration_thread_pool=self.executor,
            interceptors=[CallChain(self.executor, [self.gate, AuthInterceptor(authorizer),
                                                     BudgetInterceptor(self.budget)],
                                    metrics=MetricsInterceptor(rpc_metrics))],
            options=options,
        )
        runtime = Runtime(self.executor, self.streams)
        store = SnapshotStore(self.cfg.state_dir) if self.cfg.state_dir else None
        tls_files = migration_tls_files(self.cfg)
        self.migrations = Migrations(self.host, MigrationTls(*tls_files) if tls_files else None)
        tcp = [listener.target for listener in self.listeners if listener.unix_path is None]
        if tcp:
            self.migrations.data_host = tcp[0].rpartition(":")[0].strip("[]")
        if self.tls is not None:
            self.migrations.data_tls = (self.tls.cert, self.tls.key, self.tls.client_ca)
        services = GenericHandlersOnly(server)
        names = add_services(services, self.host, runtime, authorizer.visible, store,
                             self.migrations)
        assert self.handover is not None
        rpc.add_HandoverServicer_to_server(HandoverService(self.host, runtime, self.handover),
                                           services)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, services)
        # (enable_server_reflection would pick the aio servicer for a grpc.aio.Server only)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(  # type: ignore[attr-defined]
                [*names, health.SERVICE_NAME, reflection.SERVICE_NAME]), services)
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

    def stop(self, keep_vms: bool = False) -> bool:
        """Stop accepting, end streams, release every VM, remove the sockets (once). With
        `keep_vms` (SIGTERM under systemd, on_stop = "keep"), the VMs are paused, saved and
        their memory put in systemd's fd store for the next daemon first. True if the VMs
        were handed over so (the next daemon waits for this process to end)."""
        if self.stopped.is_set():
            return False
        notify("STOPPING=1\nSTATUS=stopping")
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.migrations is not None:
            self.migrations.close()  # outgoing ones cancelled: their VMs run on here
        kept = False
        if self.handover is not None:
            self.handover.stop_listening()
            if keep_vms and self.host is not None:
                kept = self.handover.to_fd_store()
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
            if self.handover is not None:
                self.handover.stranded.forget_all()
                if kept:
                    self.handover.close_vms()  # in parallel: the guests wait for it
            self.host.close()
        if self.authorizer is not None:
            self.authorizer.denial_log.flush()
        paths = list(self._owned_sockets)
        self._remove_sockets()
        if kept:
            for path in paths:
                leave_placeholder_socket(path, self.cfg.socket_group)
        self.stopped.set()
        log.info("kvmd stopped", extra={
            "vms": "handed over" if kept or self._handed_over else "ended"})
        return kept

    # -- hand-over hooks (kvmd.handover.DaemonHooks) --------------------------------------

    def close_api(self) -> None:
        self.gate.close()

    def open_api(self) -> None:
        self.gate.open()

    def calls_in_flight(self, timeout: float, long_lived: bool) -> dict[str, int]:
        return self.gate.wait_idle(timeout, long_lived)

    def end_streams(self) -> None:
        self._call_on_loop(self.streams.shutdown)

    def end_migrations(self) -> None:
        if self.migrations is not None:
            self.migrations.cancel_all("cancelled: the daemon is handing its VMs over")

    def reopen_streams(self) -> None:
        self._call_on_loop(self.streams.reopen)

    def _call_on_loop(self, fn: Callable[[], None]) -> None:
        if self.loop is None:
            fn()
            return

        async def call() -> None:
            fn()
        self.on_loop(call(), timeout=10)

    def release_listeners(self) -> None:
        """A take-over committed: free every listener (gRPC sockets, /metrics) for the new
        daemon, which binds them once told."""
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        if self.loop is not None and self.server is not None:
            try:
                self.on_loop(self._shutdown_server(), timeout=SHUTDOWN_GRACE_SECONDS + 5)
            except (futures.TimeoutError, RuntimeError):
                log.warning("the gRPC server did not stop in time")
            self.server = None
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        self._remove_sockets()

    def handed_over(self) -> None:
        """Every VM is the new daemon's now: this one exits (0)."""
        notify("STATUS=handed over to a new daemon")
        self._handed_over = True
        self.exit_requested.set()

    def _remove_sockets(self) -> None:
        for path in self._owned_sockets:
            if os.path.lexists(path):
                os.unlink(path)
        self._owned_sockets.clear()


# glibc malloc tuning for the daemon process (mallopt parameters).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD = 8 << 20
MALLOC_TRIM_THRESHOLD = 64 << 20


def tune_allocator() -> None:
    """Keep the buffers snapshots and migrations churn through (1-4 MiB frames and
    messages, hundreds a second) in malloc's free lists. By default glibc maps each one
    fresh and unmaps it on free, so every buffer costs a page fault per page (about 6 us
    each on nested hosts: more than copying the bytes); here up to MALLOC_TRIM_THRESHOLD of
    freed memory per arena stays for reuse."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its defaults stand
        pass


def freeze_startup_objects() -> None:
    """Move what start-up built (modules, protobuf descriptors, the daemon's own structures,
    VMs handed over) out of the collector's reach: it lives as long as the process, yet each
    full collection walked all of it, 12-50 ms here, holding the GIL that every call and
    every vCPU thread needs. Garbage goes first; later objects are collected as before."""
    gc.collect()
    gc.freeze()
    log.info("start-up objects frozen", extra={"objects": gc.get_freeze_count()})


def run(args: Any, cfg: Config, handover: Handover | None = None,
        slice_outcome: str = "") -> int:
    """The daemon's life: start, serve until a signal (or a take-over), stop. `handover`:
    VMs kvmd.launch restored already. Should the start fail once VMs were received, they
    go back to systemd's fd store (when there is one) rather than end. `slice_outcome`:
    what kvmd.launch's shorten_api_slice did, logged once the configuration is known to
    be good (a refused one gets its one line on stderr, nothing before it)."""
    try:
        daemon = Daemon(cfg, take_over=args.take_over, handover=handover)
    except ConfigError as exc:
        print(f"kvmd: {exc}", file=sys.stderr)
        if handover is not None and under_systemd():
            handover.to_fd_store()
        if handover is not None:
            handover.host.close()
        return EXIT_CONFIG_ERROR
    report_api_slice(slice_outcome, cfg.api_slice_us)
    signalled = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal received, shutting down", extra={"signal": signal.Signals(signum).name})
        signalled.set()
        daemon.exit_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, lambda signum, frame: daemon.reload_tls())
    try:
        daemon.start()
    except ConfigError as exc:
        print(f"kvmd: {exc}", file=sys.stderr)
        daemon.stop(keep_vms=under_systemd())
        return EXIT_CONFIG_ERROR
    except HandoverError as exc:
        print(f"kvmd: {exc}", file=sys.stderr)
        daemon.stop()
        return EXIT_HANDOVER_FAILED
    freeze_startup_objects()
    while not daemon.exit_requested.wait(1.0):
        pass
    keep = signalled.is_set() and cfg.on_stop == "keep"
    if keep and not under_systemd():
        log.info("not under systemd: no fd store to keep the VMs in; they end (upgrade with "
                 "kvmd --take-over to keep them)")
    if daemon.stop(keep_vms=keep and under_systemd()):
        # The next daemon starts once this process is gone and the guests wait for it:
        # everything is saved, stored and closed, so skip the interpreter's teardown.
        logging.shutdown()
        os._exit(0)
    return 0

