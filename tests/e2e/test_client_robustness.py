"""KvmdClient's channel: retries of idempotent calls, default deadlines, keepalive
(kvmd_client/channel.py).

Most tests talk to a fake kvmd.v1 server in this process (a few RPCs that fail as told and
record each attempt with its deadline and gRPC's ``grpc-previous-rpc-attempts`` header), so
that attempts are counted exactly. One test restarts a real daemon under a retrying GetVm;
one runs a daemon with its keepalive policy, scaled down twentyfold, under pinging clients.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

import kvmd.server as server_module
from kvmd.server import (
    KEEPALIVE_MIN_PING_INTERVAL_MS,
    KEEPALIVE_SERVER_OPTIONS,
    Config,
    Daemon,
)
from kvmd_client import KvmdClient, UnavailableError
from kvmd_client import channel as ch
from kvmd_client.errors import AbortedError, InternalError, ResourceExhaustedError
from kvmd_proto import vmm_pb2 as pb

Code = grpc.StatusCode
UNAVAILABLE = Code.UNAVAILABLE
NO_DEADLINE = 1e9  # seconds: a time remaining beyond this is no deadline at all
# The grpc-timeout header carries a deadline rounded up to a coarser unit (grpc core sends
# one of several minutes as whole seconds): the server may see up to a second more than
# the client set.
ROUNDING = 1.0


@dataclass
class Attempt:
    """One attempt of one call, as the fake server saw it."""

    method: str
    time_remaining: float | None
    previous_attempts: int


@dataclass
class FakeDaemon:
    """A kvmd.v1 server with a handful of RPCs: each fails with the codes queued for it in
    ``plan`` (one per attempt, in order), then succeeds. Watches stay open and silent."""

    address: str
    plan: dict[str, list[Code]] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    server: grpc.Server | None = None

    def start(self, options: list[tuple[str, Any]] | None = None) -> FakeDaemon:
        handlers = {
            "kvmd.v1.Vms": {
                "GetVm": grpc.unary_unary_rpc_method_handler(
                    self._vm("GetVm"), pb.GetVmRequest.FromString, pb.Vm.SerializeToString),
                "CreateVm": grpc.unary_unary_rpc_method_handler(
                    self._vm("CreateVm"), pb.CreateVmRequest.FromString,
                    pb.Vm.SerializeToString),
                "DeleteVm": grpc.unary_unary_rpc_method_handler(
                    self._deleted, pb.DeleteVmRequest.FromString,
                    pb.DeleteVmResponse.SerializeToString),
                "ListVms": grpc.unary_unary_rpc_method_handler(
                    self._list, pb.ListVmsRequest.FromString,
                    pb.ListVmsResponse.SerializeToString),
                "WatchVm": grpc.unary_stream_rpc_method_handler(
                    self._watch, pb.WatchVmRequest.FromString, pb.VmEvent.SerializeToString),
            },
            "kvmd.v1.Memory": {
                "ReadGuestMemory": grpc.unary_stream_rpc_method_handler(
                    self._read, pb.ReadGuestMemoryRequest.FromString,
                    pb.GuestMemoryChunk.SerializeToString),
                "GetDirtyLog": grpc.unary_stream_rpc_method_handler(
                    self._dirty, pb.GetDirtyLogRequest.FromString,
                    pb.DirtyLogChunk.SerializeToString),
                "PollDirtyLog": grpc.unary_unary_rpc_method_handler(
                    self._poll, pb.PollDirtyLogRequest.FromString,
                    pb.PollDirtyLogResponse.SerializeToString),
            },
        }
        server = grpc.server(futures.ThreadPoolExecutor(8), options=options or [])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(name, methods)
                                         for name, methods in handlers.items()])
        server.add_insecure_port(self.address)
        server.start()
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(None)

    def count(self, method: str) -> int:
        """Attempts of ``method`` so far."""
        return sum(a.method == method for a in self.attempts)

    def _attempt(self, method: str, context: grpc.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata())
        remaining = context.time_remaining()
        if remaining is not None and remaining > NO_DEADLINE:
            remaining = None  # grpc reports "no deadline" as about 9.2e18 s
        self.attempts.append(Attempt(method, remaining,
                                     int(metadata.get("grpc-previous-rpc-attempts", 0))))
        queued = self.plan.get(method)
        if queued:
            code = queued.pop(0)
            context.abort(code, f"fake {method} attempt {self.count(method)}: {code.name}")

    def _vm(self, method: str) -> Callable[[Any, grpc.ServicerContext], pb.Vm]:
        def handle(request: Any, context: grpc.ServicerContext) -> pb.Vm:
            self._attempt(method, context)
            return pb.Vm(vm_id=request.vm_id, state="created")
        return handle

    def _list(self, request: Any, context: grpc.ServicerContext) -> pb.ListVmsResponse:
        self._attempt("ListVms", context)
        return pb.ListVmsResponse()

    def _deleted(self, request: Any, context: grpc.ServicerContext) -> pb.DeleteVmResponse:
        self._attempt("DeleteVm", context)
        return pb.DeleteVmResponse()

    def _watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[pb.VmEvent]:
        self._attempt("WatchVm", context)
        if request.include_current:
            # A first message commits the call: gRPC retries it no more, so a broken
            # connection then surfaces as UNAVAILABLE instead of a silent new attempt.
            yield pb.VmEvent(vm_id=request.vm_id, type="state", state="created")
        while context.is_active():
            time.sleep(0.05)

    def _read(self, request: Any, context: grpc.ServicerContext) -> Iterator[pb.GuestMemoryChunk]:
        self._attempt("ReadGuestMemory", context)
        yield pb.GuestMemoryChunk(guest_addr=request.guest_addr, data=bytes(request.length))

    def _dirty(self, request: Any, context: grpc.ServicerContext) -> Iterator[pb.DirtyLogChunk]:
        self._attempt("GetDirtyLog", context)
        yield pb.DirtyLogChunk(slot=request.slot, total_pages=8, last=True)

    def _poll(self, request: Any, context: grpc.ServicerContext) -> pb.PollDirtyLogResponse:
        self._attempt("PollDirtyLog", context)
        return pb.PollDirtyLogResponse(log=pb.DirtyLogChunk(
            slot=request.slot, total_pages=8, last=True, bitmap=b"\x00"))


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeDaemon]:
    daemon = FakeDaemon(f"unix://{tmp_path}/fake.sock").start()
    yield daemon
    daemon.stop()


# ---------------------------------------------------------------------------------------------
# which RPCs are retried

_MUTATING_VERBS = ("Create", "Delete", "Set", "Start", "Stop", "Pause", "Resume", "Register",
                   "Unregister", "Add", "Remove", "Write", "Trigger", "Inject", "Signal",
                   "Clear", "Discard", "Map", "Unmap", "Sync", "Snapshot", "Restore",
                   "Prepare", "Migrate", "Cancel", "Receive", "Handle")


def _all_methods() -> dict[str, Any]:
    return {f"{service.full_name}/{method.name}": method
            for service in pb.DESCRIPTOR.services_by_name.values()
            for method in service.methods}


def test_every_read_rpc_is_classified() -> None:
    """A new Get/List/Watch RPC must be put in RETRIED_METHODS or NOT_RETRIED_READS."""
    methods = _all_methods()
    retried = {f"{service}/{method}" for service, names in ch.RETRIED_METHODS.items()
               for method in names}
    kvmd_retried = {name for name in retried if name.startswith("kvmd.v1.")}
    assert kvmd_retried <= set(methods), kvmd_retried - set(methods)
    assert set(ch.NOT_RETRIED_READS) <= set(methods)
    assert not retried & set(ch.NOT_RETRIED_READS)
    reads = {name for name in methods
             if name.split("/")[1].startswith(("Get", "List", "Watch"))}
    unclassified = reads - retried - set(ch.NOT_RETRIED_READS)
    assert not unclassified, f"decide whether these are idempotent: {sorted(unclassified)}"


def test_no_mutation_is_retried() -> None:
    methods = _all_methods()
    for service, names in ch.RETRIED_METHODS.items():
        for name in names:
            assert not name.startswith(_MUTATING_VERBS), f"{service}/{name} changes state"
            if service.startswith("kvmd.v1."):
                method = methods[f"{service}/{name}"]
                assert not method.client_streaming, f"{service}/{name} streams requests"


def test_the_service_config_names_every_retried_method() -> None:
    [config] = ch.service_config()["methodConfig"]
    names = {(n["service"], n["method"]) for n in config["name"]}
    assert names == {(s, m) for s, ms in ch.RETRIED_METHODS.items() for m in ms}
    assert config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 2 <= config["retryPolicy"]["maxAttempts"] <= 5  # gRPC caps attempts at 5
    assert "timeout" not in config  # deadlines are the client's (a config one could not be
    # raised by a caller: gRPC takes the smaller of the two)


def test_an_idempotent_call_is_retried_on_unavailable(fake: FakeDaemon) -> None:
    fake.plan["GetVm"] = [UNAVAILABLE, UNAVAILABLE]
    with KvmdClient(fake.address) as c:
        assert c.get_vm("vm1").vm_id == "vm1"
    assert [a.previous_attempts for a in fake.attempts] == [0, 1, 2]


def test_a_retried_stream_is_retried_before_its_first_message(fake: FakeDaemon) -> None:
    fake.plan["ReadGuestMemory"] = [UNAVAILABLE]
    with KvmdClient(fake.address) as c:
        assert c.read_memory("vm1", 0x1000, 16) == bytes(16)
    assert fake.count("ReadGuestMemory") == 2


def test_retries_give_up_after_five_attempts(fake: FakeDaemon) -> None:
    fake.plan["GetVm"] = [UNAVAILABLE] * 10
    # retry_timeout=0: gRPC's policy alone (the client's own retries ride out hand-overs,
    # tests/handover/test_handover_client.py)
    with KvmdClient(fake.address, retry_timeout=0) as c, pytest.raises(UnavailableError):
        c.get_vm("vm1")
    assert fake.count("GetVm") == ch.RETRY_POLICY["maxAttempts"] == 5


@pytest.mark.parametrize(("method", "call"), [
    ("GetVm", lambda c: c.get_vm("vm1")),
    ("ListVms", lambda c: c.list_vms()),
])
def test_an_idempotent_call_outlasts_grpcs_attempts_within_the_retry_timeout(
        fake: FakeDaemon, method: str, call: Callable[[KvmdClient], Any]) -> None:
    """A daemon that answered once and now fails (restarting, not refusing for a hand-over):
    Get and List calls are sent again by the client itself once gRPC's five attempts are
    spent, until retry_timeout."""
    with KvmdClient(fake.address, retry_timeout=10) as c:
        c.get_vm("vm0")  # the daemon was reached
        fake.plan[method] = [UNAVAILABLE] * 7
        call(c)
    assert fake.count(method) == 8 + (method == "GetVm")


@pytest.mark.parametrize("call", [
    pytest.param(lambda c: c.create_vm("vm1"), id="CreateVm"),
    pytest.param(lambda c: c.delete_vm("vm1"), id="DeleteVm"),
    pytest.param(lambda c: c.dirty_log("vm1", 0), id="PollDirtyLog"),
    pytest.param(lambda c: list(c.iter_dirty_log("vm1", 0)), id="GetDirtyLog"),
])
def test_a_call_that_is_not_idempotent_is_not_retried(fake: FakeDaemon,
                                                     call: Callable[[KvmdClient], Any],
                                                     request: pytest.FixtureRequest) -> None:
    method = request.node.callspec.id
    fake.plan[method] = [UNAVAILABLE]
    with KvmdClient(fake.address) as c, pytest.raises(UnavailableError):
        call(c)
    assert fake.count(method) == 1


def test_dirty_log_streams_when_the_daemon_has_no_poll(fake: FakeDaemon) -> None:
    fake.plan["PollDirtyLog"] = [Code.UNIMPLEMENTED]  # a daemon before PollDirtyLog
    with KvmdClient(fake.address) as c:
        log = c.dirty_log("vm1", 0)
        assert (log.total_pages, log.dirty_count) == (8, 0)
        assert (fake.count("PollDirtyLog"), fake.count("GetDirtyLog")) == (1, 1)
        c.dirty_log("vm1", 0)  # PollDirtyLog answers now: no stream
        assert (fake.count("PollDirtyLog"), fake.count("GetDirtyLog")) == (2, 1)


@pytest.mark.parametrize(("code", "error"), [(Code.INTERNAL, InternalError),
                                             (Code.ABORTED, AbortedError),
                                             (Code.RESOURCE_EXHAUSTED, ResourceExhaustedError)])
def test_only_unavailable_is_retried(fake: FakeDaemon, code: Code, error: type) -> None:
    fake.plan["GetVm"] = [code]
    with KvmdClient(fake.address) as c, pytest.raises(error):
        c.get_vm("vm1")
    assert fake.count("GetVm") == 1


def test_a_get_vm_retries_across_a_daemon_restart(start_kvmd: Callable[..., Any]) -> None:
    """The daemon at an address is replaced by another process while a GetVm retries.

    The new daemon is started first (under another name) and its socket is moved to the
    address the moment the client's first connection attempt has failed: the outage is real
    (the old daemon is gone, the call is answered by another process) but as short as the
    retry policy needs to show, whatever the machine's load does to a daemon's start-up."""
    old, new = start_kvmd(name="old"), start_kvmd(name="new")
    with KvmdClient(new.address) as c:
        c.create_vm("survivor", labels={"daemon": "new"})
    address, path = old.address, old.socket
    assert old.stop() == 0 and not path.exists()
    with KvmdClient(address) as control, pytest.raises(UnavailableError):
        control.create_vm("nobody")  # not retried: the address really has no daemon now

    swapped = threading.Event()

    def on_state(state: grpc.ChannelConnectivity) -> None:
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE and not swapped.is_set():
            os.rename(new.socket, path)  # the first connection attempt has failed
            swapped.set()

    with KvmdClient(address) as c:
        c._channel.subscribe(on_state)
        vm = c.get_vm("survivor")
        c._channel.unsubscribe(on_state)
    assert swapped.is_set(), "the first attempt did not fail: nothing was retried"
    assert vm.labels["daemon"] == "new"
    new.kill()  # its socket moved: a clean stop would look for it in the old place
    path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# deadlines


def test_a_unary_call_without_a_timeout_gets_the_default_deadline(fake: FakeDaemon) -> None:
    with KvmdClient(fake.address) as c:
        c.get_vm("vm1")
    [attempt] = fake.attempts
    assert attempt.time_remaining is not None
    assert ch.DEFAULT_TIMEOUT - 10 < attempt.time_remaining <= ch.DEFAULT_TIMEOUT + ROUNDING
    assert ch.DEFAULT_TIMEOUT == 30


def test_the_client_timeout_sets_the_deadline(fake: FakeDaemon) -> None:
    with KvmdClient(fake.address, timeout=4) as c:
        c.get_vm("vm1")
    with KvmdClient(fake.address, timeout=None) as c:
        c.get_vm("vm1")
    first, second = fake.attempts
    assert first.time_remaining is not None and 0 < first.time_remaining <= 4 + ROUNDING
    assert second.time_remaining is None  # explicitly none


def test_a_transfer_gets_the_transfer_deadline(fake: FakeDaemon) -> None:
    with KvmdClient(fake.address, timeout=4) as c:
        c.read_memory("vm1", 0, 8)
    [attempt] = fake.attempts
    assert attempt.time_remaining is not None
    assert attempt.time_remaining > ch.DEFAULT_TRANSFER_TIMEOUT - 60
    assert attempt.time_remaining <= ch.DEFAULT_TRANSFER_TIMEOUT + ROUNDING
    assert ch.DEFAULT_TRANSFER_TIMEOUT == 600


def test_a_watch_has_no_default_deadline(fake: FakeDaemon) -> None:
    with KvmdClient(fake.address) as c, c.watch_vm("vm1") as watch:
        assert watch.next(0.5) is None  # silent: the watch stays open until cancelled
    [attempt] = fake.attempts
    assert attempt.method == "WatchVm" and attempt.time_remaining is None


# ---------------------------------------------------------------------------------------------
# keepalive


def test_the_channel_keeps_open_calls_alive() -> None:
    with KvmdClient("unix:///nonexistent/kvmd.sock") as c:
        options = dict(c.channel_options)
    assert options["grpc.keepalive_time_ms"] == ch.KEEPALIVE_TIME_MS == 20_000
    assert options["grpc.keepalive_timeout_ms"] == ch.KEEPALIVE_TIMEOUT_MS == 10_000
    assert options["grpc.http2.max_pings_without_data"] == 0  # quiet watches keep pinging
    assert options["grpc.keepalive_permit_without_calls"] == 0  # idle channels do not
    assert options["grpc.enable_retries"] == 1 and "retryPolicy" in options[
        "grpc.service_config"]


def test_channel_options_can_be_replaced() -> None:
    with KvmdClient("unix:///nonexistent/kvmd.sock",
                    channel_options=[("grpc.keepalive_time_ms", 60_000)]) as c:
        assert [v for k, v in c.channel_options if k == "grpc.keepalive_time_ms"] == [60_000]


def test_the_daemon_accepts_the_client_ping_rate() -> None:
    options = dict(KEEPALIVE_SERVER_OPTIONS)
    interval = options["grpc.http2.min_ping_interval_without_data_ms"]
    assert interval == KEEPALIVE_MIN_PING_INTERVAL_MS
    # Timers jitter: the client pings at no more than half the rate the daemon allows.
    assert 2 * interval <= ch.KEEPALIVE_TIME_MS


def test_the_daemon_lets_pinging_streams_live(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon (in this process) with kvmd's keepalive server options, their interval
    scaled to 0.5 s, against a client pinging every second on a quiet watch; the control, a
    server with gRPC's defaults, cuts the same client off (GOAWAY too_many_pings) after its
    third ping. (Both watches have had their first event: an unanswered watch would be
    retried on a new connection, silently.)"""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is absent: the daemon needs a KVM host")
    scaled = [(k, 500 if k == "grpc.http2.min_ping_interval_without_data_ms" else v)
              for k, v in KEEPALIVE_SERVER_OPTIONS]
    monkeypatch.setattr(server_module, "KEEPALIVE_SERVER_OPTIONS", scaled)
    daemon = Daemon(Config(listen=[f"unix://{tmp_path}/kvmd.sock"], log_level="warning"))
    daemon.start()
    control = FakeDaemon(f"unix://{tmp_path}/control.sock").start()
    fast = [("grpc.keepalive_time_ms", 1000)]
    outcome: dict[str, BaseException | None] = {}
    try:
        with KvmdClient(f"unix://{tmp_path}/kvmd.sock", channel_options=fast) as a, \
                KvmdClient(control.address, channel_options=fast, retry_timeout=0) as b:
            a.create_vm("quiet")
            with a.watch_vm("quiet", include_current=True) as kept, \
                    b.watch_vm("quiet", include_current=True) as cut:
                assert next(kept).type == next(cut).type == "state"

                def follow(name: str, watch: Any) -> None:
                    try:
                        watch.next(6.0)  # quiet for 6 s: 6 pings, a GOAWAY after the 3rd
                        outcome[name] = None
                    except BaseException as e:  # reported below
                        outcome[name] = e

                threads = [threading.Thread(target=follow, args=(name, watch))
                           for name, watch in (("kept", kept), ("cut", cut))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(30)
            a.delete_vm("quiet")
    finally:
        control.stop()
        daemon.stop()
    assert outcome["kept"] is None, outcome["kept"]
    assert isinstance(outcome["cut"], UnavailableError), outcome["cut"]
    assert "too_many_pings" in str(outcome["cut"]) or "Too many pings" in str(outcome["cut"])
