"""kvmd's configuration: the TOML file, the flags that mirror it, and the one schema both go
through. Anything unusable or unsafe is refused with a one-line reason (the daemon exits 2).
"""

from __future__ import annotations

import argparse
import ipaddress
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

from kvmd import __version__
from kvmd.core.images import DEFAULT_IMAGES_DIR
from kvmd.core.limits import Limits, host_limits
from kvmd.core.sched import (
    MAX_SLICE_US,
    MIN_SLICE_US,
    confine_api_threads,
    daemon_cpus,
    format_cpu_list,
    parse_cpu_list,
)

DEFAULT_LISTEN = "unix:///run/kvmd/kvmd.sock"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9474"
DEFAULT_STATE_DIR = "/var/lib/kvmd"
DEFAULT_VCPU_NICE = 10
DEFAULT_VCPU_POLICY = "other"
VCPU_POLICIES = ("other", "batch", "idle")
DEFAULT_API_SLICE_US = 100
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("logfmt", "json")
ON_STOP = ("keep", "end")
# Guest memory limits default to what this host can hold (read once, at import).
HOST_LIMITS = host_limits()


class ConfigError(Exception):
    """The configuration is unusable; the daemon exits 2 with this one-line reason."""


@dataclass
class Config:
    """Daemon settings: the TOML config file mirrors these names; flags win. The guest
    memory limits default to what this host can hold (kvmd.core.limits.host_limits)."""

    listen: list[str] = field(default_factory=lambda: [DEFAULT_LISTEN])
    log_level: str = "info"
    log_format: str = "logfmt"
    kvm_device: str = "/dev/kvm"
    socket_group: str = ""
    # Snapshot files (SnapshotVm/RestoreVm with `file`). Embedded daemons (tests) have none
    # unless given; the CLI defaults to /var/lib/kvmd.
    state_dir: str = ""
    # Files that may back guest memory (AddMemoryRegion/MapGuestMemory name them relative to
    # it). Embedded daemons (tests) have none unless given (file-backed memory is off); the
    # CLI defaults to /var/lib/kvmd/images, which may be absent (off too). Any other setting
    # must be an existing directory.
    images_dir: str = ""
    max_vms: int = Limits.max_vms
    max_vcpus_per_vm: int = Limits.max_vcpus_per_vm
    max_memory_per_vm_bytes: int = HOST_LIMITS.max_memory_per_vm_bytes
    max_memory_total_bytes: int = HOST_LIMITS.max_memory_total_bytes
    max_memory_slots_per_vm: int = Limits.max_memory_slots_per_vm
    max_irqfds_per_vm: int = Limits.max_irqfds_per_vm
    max_ioevents_per_vm: int = Limits.max_ioevents_per_vm
    max_message_bytes: int = Limits.max_message_bytes
    max_concurrent_rpcs: int = Limits.max_concurrent_rpcs
    max_calls_per_identity: int = Limits.max_calls_per_identity
    max_streams: int = Limits.max_streams
    max_streams_per_identity: int = Limits.max_streams_per_identity
    max_fds: int = HOST_LIMITS.max_fds
    max_fds_per_identity: int = HOST_LIMITS.max_fds_per_identity
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # The one way to run TLS on the network without client certificates and without an
    # [authorization] table, where every peer would be an admin: say so explicitly.
    allow_anonymous_admin: bool = False
    authorization: dict[str, Any] = field(default_factory=dict)
    # Embedded daemons (tests) serve no metrics unless asked; the CLI defaults to the port.
    metrics_listen: str = "off"
    metrics_vcpu_label: bool = False
    # The nice value of vCPU threads (0-19; 0: the same priority as the API's threads). A
    # higher value keeps the control plane responsive while guests burn every CPU.
    vcpu_nice: int = DEFAULT_VCPU_NICE
    # Their scheduling policy: "other" (time sharing at vcpu_nice), "batch", or "idle" (they
    # run only when no other thread wants the CPU: the strongest isolation of the API).
    vcpu_policy: str = DEFAULT_VCPU_POLICY
    # The scheduler slice (us) every other thread of the daemon asks for (EEVDF, Linux
    # 6.12+): shorter than a vCPU thread's, so a waking API thread preempts a spinning
    # guest at once. 0: the kernel's default. See kvmd.core.sched.
    api_slice_us: int = DEFAULT_API_SLICE_US
    # The CPUs vCPU threads may run on, as a Linux CPU list ("1-3"); "": every CPU the
    # daemon may use. Leaving one out for the control plane keeps it responsive however
    # hard the guests spin (a housekeeping CPU). See kvmd.core.sched.
    vcpu_cpus: str = ""
    # The CPUs every other thread of the daemon (event loop, call pool, grpc's, transfers)
    # runs on, as a Linux CPU list ("0"); "": every CPU the daemon may use. Threads that
    # hand calls to each other on one CPU wake each other without waking another CPU (on
    # a virtualized host, an idle CPU is slow to wake), but every transfer then shares it.
    # vCPU threads keep vcpu_cpus, or every CPU of the daemon. See kvmd.core.sched.
    api_cpus: str = ""
    metrics_tls_cert: str = ""
    metrics_tls_key: str = ""
    metrics_tls_client_ca: str = ""
    # Outgoing live migrations: the certificate and key this daemon presents to a target,
    # and the CA the target's certificate must chain to. Unset: tls_cert, tls_key and
    # tls_client_ca (one certificate per host, one CA). Without any: plain TCP, to loopback
    # targets only.
    migration_tls_cert: str = ""
    migration_tls_key: str = ""
    migration_tls_ca: str = ""
    # What SIGTERM does to the VMs under systemd (NOTIFY_SOCKET set): "keep" hands their
    # memory to systemd's fd store and their state to runtime_dir, for the next daemon
    # (a restart, or a stop and start where systemd keeps the store); "end" ends them.
    # Without systemd there is no store: SIGTERM ends them (upgrade with --take-over).
    on_stop: str = "keep"
    # Where hand-over state files live (<runtime_dir>/handover/). "" = $RUNTIME_DIRECTORY
    # (systemd's RuntimeDirectory=), else the directory of the first Unix socket.
    runtime_dir: str = ""

    def vcpu_cpu_set(self) -> frozenset[int] | None:
        """vcpu_cpus as CPU numbers; None where vCPUs may run on every CPU (validated)."""
        return parse_cpu_list(self.vcpu_cpus) if self.vcpu_cpus else None

    def api_cpu_set(self) -> frozenset[int] | None:
        """api_cpus as CPU numbers; None where the API's threads may run on every CPU
        (validated)."""
        return parse_cpu_list(self.api_cpus) if self.api_cpus else None

    def limits(self) -> Limits:
        names = {f.name for f in fields(Limits)}
        return Limits(**{k: v for k, v in vars(self).items() if k in names})


LIMIT_NAMES = tuple(f.name for f in fields(Limits))
# The schema: each key's type as written in Config (with postponed annotations: a string).
_TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(Config)}
_CHOICES: dict[str, tuple[str, ...]] = {"log_level": LOG_LEVELS, "log_format": LOG_FORMATS,
                                        "on_stop": ON_STOP,
                                        "vcpu_policy": VCPU_POLICIES}


def check_value(name: str, value: Any, where: str) -> Any:
    """`value` for key `name`, checked against the schema (bools are not integers here,
    and a single listen address may be written as a string)."""
    kind = _TYPES[name]
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} in {where} must be an integer, not {value!r}")
        if name in LIMIT_NAMES and value <= 0:
            raise ConfigError(f"{name} in {where} must be positive, not {value}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name} in {where} must be true or false, not {value!r}")
    elif kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{name} in {where} must be a string, not {value!r}")
        choices = _CHOICES.get(name)
        if choices and value not in choices:
            raise ConfigError(f"{name} in {where} must be one of {', '.join(choices)}, not "
                              f"{value!r}")
    elif kind == "list[str]":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(
                isinstance(v, str) and v for v in value):
            raise ConfigError(f"{name} in {where} must be a non-empty list of strings, not "
                              f"{value!r}")
    elif kind.startswith("dict") and not isinstance(value, dict):
        raise ConfigError(f"[{name}] in {where} must be a table")
    return value


def build_parser() -> argparse.ArgumentParser:
    # Defaults are in the help texts: unset flags are None so the config file can fill them.
    p = argparse.ArgumentParser(prog="kvmd", description="Serve the Linux KVM API over gRPC.")
    p.add_argument("--config", metavar="FILE",
                   help="TOML file whose keys mirror these flags (flags win)")
    p.add_argument("--listen", action="append", metavar="ADDR",
                   help=f"unix:///path or host:port; repeatable (default {DEFAULT_LISTEN})")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="default info")
    p.add_argument("--log-format", choices=LOG_FORMATS,
                   help="logfmt key=value lines (default) or one JSON object per line")
    p.add_argument("--kvm-device", metavar="PATH", help="KVM device path (default /dev/kvm)")
    p.add_argument("--socket-group", metavar="GROUP",
                   help="group owning Unix sockets (default: unchanged)")
    p.add_argument("--state-dir", metavar="DIR",
                   help=f"where snapshot files live (default {DEFAULT_STATE_DIR})")
    p.add_argument("--images-dir", metavar="DIR",
                   help="directory of the files guest memory may be backed by (default "
                        f"{DEFAULT_IMAGES_DIR}; absent: file-backed memory is off)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help=f"Prometheus /metrics address, or 'off' (default "
                        f"{DEFAULT_METRICS_LISTEN})")
    p.add_argument("--metrics-vcpu-label", action="store_const", const=True,
                   help="add a vcpu label to kvmd_vcpu_exits_total")
    p.add_argument("--metrics-tls-cert", metavar="PEM", help="serve /metrics over TLS")
    p.add_argument("--metrics-tls-key", metavar="PEM", help="key for --metrics-tls-cert")
    p.add_argument("--metrics-tls-client-ca", metavar="PEM",
                   help="require scrapers' client certificates from this CA")
    p.add_argument("--migration-tls-cert", metavar="PEM",
                   help="certificate presented to migration targets (default --tls-cert)")
    p.add_argument("--migration-tls-key", metavar="PEM",
                   help="key for --migration-tls-cert (default --tls-key)")
    p.add_argument("--migration-tls-ca", metavar="PEM",
                   help="CA of migration targets' certificates (default --tls-client-ca)")
    p.add_argument("--tls-cert", metavar="PEM", help="server certificate for TCP listeners")
    p.add_argument("--tls-key", metavar="PEM", help="server private key for TCP listeners")
    p.add_argument("--tls-client-ca", metavar="PEM",
                   help="require client certificates signed by this CA (mTLS)")
    p.add_argument("--allow-anonymous-admin", action="store_const", const=True,
                   help="allow TLS on a non-loopback address without client certificates "
                        "or an authorization table (every peer is an admin)")
    p.add_argument("--on-stop", choices=ON_STOP,
                   help="under systemd, what SIGTERM does to the VMs: keep them for the next "
                        "daemon (its fd store holds their memory) or end them (default keep)")
    p.add_argument("--runtime-dir", metavar="DIR",
                   help="where hand-over state is kept (default $RUNTIME_DIRECTORY, else the "
                        "directory of the first Unix socket)")
    p.add_argument("--take-over", action="store_true", default=False,
                   help="take the VMs and the listeners over from the daemon running on the "
                        "same Unix socket, which then exits (an upgrade without systemd)")
    for f in fields(Limits):
        default = getattr(HOST_LIMITS, f.name)
        where = (", from RLIMIT_NOFILE)" if f.name.startswith("max_fds") else
                 ", from this host's memory)" if default != f.default else ")")
        p.add_argument("--" + f.name.replace("_", "-"), type=int, metavar="N",
                       help=f"limit (default {default}{where}")
    p.add_argument("--vcpu-nice", type=int, metavar="N",
                   help="nice value of vCPU threads, 0-19 (default "
                        f"{DEFAULT_VCPU_NICE}; 0: as the API's threads)")
    p.add_argument("--vcpu-policy", choices=VCPU_POLICIES,
                   help=f"scheduling policy of vCPU threads (default {DEFAULT_VCPU_POLICY})")
    p.add_argument("--api-slice-us", type=int, metavar="US",
                   help="scheduler slice of the daemon's threads but vCPUs, "
                        f"{MIN_SLICE_US}-{MAX_SLICE_US} us (default {DEFAULT_API_SLICE_US}; "
                        "0: the kernel's; Linux 6.12+)")
    p.add_argument("--vcpu-cpus", metavar="LIST",
                   help="CPUs vCPU threads may run on, e.g. 1-3 (default: all; leave one to "
                        "keep the control plane responsive under guest load)")
    p.add_argument("--api-cpus", metavar="LIST",
                   help="CPUs the daemon's other threads run on, e.g. 0 (default: all; "
                        "one CPU makes calls faster, transfers share it)")
    p.add_argument("--version", action="version", version=f"kvmd {__version__}")
    return p


def load_config(args: argparse.Namespace) -> Config:
    """The file (if any), then the flags, then the derived defaults and safety checks."""
    cfg = Config(metrics_listen=DEFAULT_METRICS_LISTEN, state_dir=DEFAULT_STATE_DIR,
                 images_dir=DEFAULT_IMAGES_DIR)
    if args.config:
        try:
            with open(args.config, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {args.config}: {exc}") from None
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in _TYPES:
                raise ConfigError(f"unknown key {key!r} in {args.config}")
            setattr(cfg, name, check_value(name, value, args.config))
    for name in _TYPES:
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, check_value(name, value, "the command line"))
    validate(cfg)
    return cfg


def check_cpu_list(name: str, text: str) -> None:
    """vcpu_cpus and api_cpus must name CPUs this process may run on (systemd's
    CPUAffinity= and AllowedCPUs= narrow them before the daemon starts)."""
    try:
        cpus = parse_cpu_list(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    allowed = daemon_cpus()
    if not cpus <= allowed:
        raise ConfigError(f"{name} {text!r} names CPUs {format_cpu_list(cpus - allowed)} "
                          f"that the daemon may not run on (it may use "
                          f"{format_cpu_list(allowed)})")


def confine_api_cpus(cfg: Config) -> None:
    """Put the calling thread, and every thread it starts after this, on api_cpus (every
    CPU the daemon may use when unset). Before the daemon starts threads."""
    try:
        confine_api_threads(cfg.api_cpu_set())
    except OSError as exc:
        raise ConfigError(f"api_cpus {cfg.api_cpus!r}: cannot run the daemon's threads "
                          f"there: {exc}") from None


def validate(cfg: Config) -> None:
    """Checks across keys: TLS settings that cannot work or would weaken security."""
    for name in _TYPES:
        check_value(name, getattr(cfg, name), "the configuration")
    if not 0 <= cfg.vcpu_nice <= 19:
        raise ConfigError(f"vcpu_nice must be 0-19, not {cfg.vcpu_nice}")
    if cfg.api_slice_us and not MIN_SLICE_US <= cfg.api_slice_us <= MAX_SLICE_US:
        raise ConfigError(f"api_slice_us must be 0 (the kernel's default) or "
                          f"{MIN_SLICE_US}-{MAX_SLICE_US}, not {cfg.api_slice_us}")
    for name in ("vcpu_cpus", "api_cpus"):
        if getattr(cfg, name):
            check_cpu_list(name, getattr(cfg, name))
    if cfg.tls_client_ca and not cfg.tls_cert:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key: clients can only "
                          "be verified over TLS")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if bool(cfg.metrics_tls_cert) != bool(cfg.metrics_tls_key):
        raise ConfigError("--metrics-tls-cert and --metrics-tls-key go together")
    if bool(cfg.migration_tls_cert) != bool(cfg.migration_tls_key):
        raise ConfigError("--migration-tls-cert and --migration-tls-key go together")
    for what, path in (("certificate", cfg.tls_cert), ("key", cfg.tls_key),
                       ("client CA", cfg.tls_client_ca),
                       ("migration certificate", cfg.migration_tls_cert),
                       ("migration key", cfg.migration_tls_key),
                       ("migration CA", cfg.migration_tls_ca)):
        if path:
            try:
                with open(path, "rb") as fh:
                    if b"-----BEGIN" not in fh.read():
                        raise ConfigError(f"TLS {what} {path} is not PEM")
            except OSError as exc:
                raise ConfigError(f"cannot read TLS {what} {path}: {exc.strerror}") from None
    listeners = [parse_listen(a, bool(cfg.tls_cert)) for a in cfg.listen]
    remote = [x.address for x in listeners if x.unix_path is None and not x.loopback]
    if (remote and cfg.tls_cert and not cfg.tls_client_ca and not cfg.authorization
            and not cfg.allow_anonymous_admin):
        raise ConfigError(
            f"refusing to serve {remote[0]} with TLS but neither client certificates "
            "(--tls-client-ca) nor an [authorization] table: every peer on the network "
            "would be an admin; add one of them, or set allow_anonymous_admin = true")


# -- listeners -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Listener:
    """One listen address: a Unix socket path, or TCP host:port (loopback or not)."""

    address: str  # as given
    target: str  # what grpc binds
    unix_path: str | None
    loopback: bool = False


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
    loopback = is_loopback(host.strip("[]"))
    if not tls and not loopback:
        raise ConfigError(f"refusing plain TCP on non-loopback address {address!r}: "
                          "use --tls-cert/--tls-key, or listen on loopback")
    return Listener(address, address, None, loopback)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def migration_tls_files(cfg: Config) -> tuple[str, str, str] | None:
    """(cert, key, ca) for outgoing migrations, or None: plain TCP to loopback only."""
    cert = cfg.migration_tls_cert or cfg.tls_cert
    key = cfg.migration_tls_key or cfg.tls_key
    ca = cfg.migration_tls_ca or cfg.tls_client_ca
    if not (cert or ca):
        return None
    return cert, key, ca
