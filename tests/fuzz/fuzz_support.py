"""Property-based fuzzing of every kvmd RPC: a world to fuzz, generic strategies from the
message descriptors, hand-written ones for the interesting requests, and the invariants.

A uniquely named module (tests/fuzz is on sys.path through its conftest).

* `FuzzDaemon`: an in-process kvmd with small limits (so limit paths are hit) on a
  temporary Unix socket, a client channel, and a *world*: VMs with memory, vCPUs, an
  irqfd and an ioevent, built the same way before every example that needs it.
* `METHODS`: every RPC of every kvmd service, from the generated descriptors of every
  module in kvmd_proto (a new RPC or service is fuzzed without touching this file);
  `test_reflection_serves_exactly_the_fuzzed_methods` checks server reflection agrees.
* `request_strategy(method)`: a hand-written strategy where one exists, else a generic one
  built from the request's descriptor (random values plus boundary values per field type).
* `FuzzDaemon.check_call(...)`: one call and every invariant: the code is a documented
  one (never UNKNOWN or INTERNAL), daemon errors carry kvmd's ErrorInfo, the health check
  is SERVING and GetInfo answers, and a failed (or read-only) call changed nothing an
  earlier call created (ListVms, GetVm, ListMemoryRegions, ListIrqfds, ListIoevents,
  ListVcpus before and after), and nothing leaks (call/stream budgets back to zero, claims
  released, GetInfo's memory and VM counts equal to what the List RPCs show).

Profiles: `KVMD_FUZZ_PROFILE=ci` (the default: few examples, derandomized, for `make test`)
or `soak` (`make soak`: many more examples, random seeds).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import string
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory, text_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from polling import wait_until

import kvmd_proto
from kvmd.api.auth import READ_ONLY_METHODS
from kvmd.api.errors import reason_code
from kvmd.core.errors import Reason
from kvmd.server import Config, Daemon
from kvmd_proto import vmm_pb2 as pb
from kvmd_proto import vmm_pb2_grpc as rpc

Code = grpc.StatusCode
FieldDescriptor = _descriptor.FieldDescriptor

# -- hypothesis profiles ------------------------------------------------------------------

PROFILE = os.environ.get("KVMD_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "soak"):
    raise RuntimeError(f"KVMD_FUZZ_PROFILE={PROFILE!r}: use ci or soak")
# How many times more examples (and state-machine runs) the soak profile gives each test.
SOAK_FACTOR = int(os.environ.get("KVMD_FUZZ_SOAK_FACTOR", "10"))
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
             HealthCheck.large_base_example]


def fuzz_settings(ci_examples: int, **extra: Any) -> settings:
    """Settings for one fuzz test: `ci_examples` derandomized examples in CI, SOAK_FACTOR
    times as many with random seeds under `make soak`. No deadline: a call may wait on a
    kernel or a vCPU; the test's own timeouts bound it."""
    if PROFILE == "soak":
        return settings(max_examples=ci_examples * SOAK_FACTOR, deadline=None,
                        derandomize=False, database=None, suppress_health_check=_SUPPRESS,
                        print_blob=True, **extra)
    return settings(max_examples=ci_examples, deadline=None, derandomize=True,
                    database=None, suppress_health_check=_SUPPRESS, print_blob=True, **extra)


# -- what the daemon may answer -----------------------------------------------------------

# Every code kvmd documents (proto/vmm.proto, README "Status codes"). DEADLINE_EXCEEDED only
# where a deadline applies (a long-lived stream under the fuzzer's short deadline, or a
# remote handler's missed deadline); never UNKNOWN or INTERNAL for bad input.
DOCUMENTED = frozenset({
    Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS,
    Code.FAILED_PRECONDITION, Code.ABORTED, Code.RESOURCE_EXHAUSTED, Code.PERMISSION_DENIED,
    Code.UNIMPLEMENTED, Code.OUT_OF_RANGE,
})
# Streams that follow a resource until the client leaves: the fuzzer gives them a short
# deadline and accepts DEADLINE_EXCEEDED as "the stream was open and well". A new
# long-lived stream must be added here (the fuzzer otherwise reports it as a hang).
LONG_LIVED = frozenset({
    "kvmd.v1.Vms/WatchVm", "kvmd.v1.Vms/StreamConsole",
    "kvmd.v1.Interrupts/WatchIrqfdResamples", "kvmd.v1.IoEvents/WatchIoevents",
    "kvmd.v1.ExitHandlers/HandleExits",
})
FOLLOW_TIMEOUT = 0.25  # deadline of a long-lived stream in the fuzzer
CALL_TIMEOUT = 15.0    # deadline of every other call: reaching it is a hang, a failure
# RPCs that change nothing the List/Get RPCs show (auth's viewer set, plus reads of
# memory, dirty logs, consoles and watches): after one of these, even a successful one, the
# snapshot must be unchanged.
NON_MUTATING = frozenset({f"kvmd.v1.{m}" for m in READ_ONLY_METHODS} | {
    "kvmd.v1.Memory/ReadGuestMemory", "kvmd.v1.Memory/GetDirtyLog",
    "kvmd.v1.Memory/PollDirtyLog",
    "kvmd.v1.Vms/StreamConsole", "kvmd.v1.Interrupts/WatchIrqfdResamples",
    "kvmd.v1.IoEvents/WatchIoevents",
})

# Small limits, so the fuzzer reaches every limit path.
LIMITS: dict[str, int] = dict(
    max_vms=4, max_vcpus_per_vm=2, max_memory_per_vm_bytes=256 << 10,
    max_memory_total_bytes=512 << 10, max_memory_slots_per_vm=4, max_irqfds_per_vm=2,
    max_ioevents_per_vm=2, max_message_bytes=256 << 10, max_concurrent_rpcs=8,
    max_calls_per_identity=8, max_streams=16, max_streams_per_identity=8,
)
CLIENT_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
                  ("grpc.max_send_message_length", 64 << 20)]

# -- every method of every kvmd service ---------------------------------------------------


def _kvmd_files() -> list[_descriptor.FileDescriptor]:
    files = []
    for info in pkgutil.iter_modules(kvmd_proto.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"kvmd_proto.{info.name}")
            files.append(module.DESCRIPTOR)
    return files


@dataclass(frozen=True)
class Method:
    """One RPC: its descriptor and how to call it."""

    desc: _descriptor.MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.desc.containing_service.full_name}/{self.desc.name}"

    @property
    def name(self) -> str:  # "kvmd.v1.Vms/CreateVm"
        return self.path[1:]

    @property
    def short(self) -> str:  # "Vms/CreateVm"
        return f"{self.desc.containing_service.name}/{self.desc.name}"

    @property
    def client_streaming(self) -> bool:
        return bool(self.desc.client_streaming)

    @property
    def server_streaming(self) -> bool:
        return bool(self.desc.server_streaming)

    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.desc.input_type)

    def response_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.desc.output_type)


def all_methods() -> list[Method]:
    """Every RPC of every service in kvmd's generated modules, in a stable order."""
    methods = []
    for f in _kvmd_files():
        for service in f.services_by_name.values():
            methods += [Method(m) for m in service.methods]
    return sorted(methods, key=lambda m: m.name)


METHODS = all_methods()
METHODS_BY_NAME = {m.name: m for m in METHODS}


def reflected_methods(channel: grpc.Channel) -> set[str]:
    """Every method of every non-grpc service the server lists through reflection."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    def ask(req: reflection_pb2.ServerReflectionRequest
            ) -> reflection_pb2.ServerReflectionResponse:
        return next(iter(stub.ServerReflectionInfo(iter([req]), timeout=10)))

    services = [s.name for s in ask(reflection_pb2.ServerReflectionRequest(
        list_services="")).list_services_response.service
        if not s.name.startswith("grpc.")]
    from google.protobuf import descriptor_pb2

    found: set[str] = set()
    for name in services:
        resp = ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=name))
        for raw in resp.file_descriptor_response.file_descriptor_proto:
            fdp = descriptor_pb2.FileDescriptorProto.FromString(raw)
            for svc in fdp.service:
                full = f"{fdp.package}.{svc.name}" if fdp.package else svc.name
                if full == name:
                    found |= {f"{full}/{m.name}" for m in svc.method}
    return found


# -- calling any method -------------------------------------------------------------------


@dataclass
class Outcome:
    """How one call ended."""

    method: str
    code: grpc.StatusCode
    details: str = ""
    responses: int = 0
    error_info: error_details_pb2.ErrorInfo | None = None
    cancelled: bool = False  # the client cancelled the stream

    @property
    def ok(self) -> bool:
        return self.code == Code.OK


def _error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except ValueError:
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def invoke(channel: grpc.Channel, method: Method, request: Message | list[Message],
           timeout: float | None = None, cancel_after: int | None = None) -> Outcome:
    """Call `method` (any of the four kinds) with `request` (a list for client streams)
    and read every response; returns the outcome instead of raising. With `cancel_after`,
    a server stream is cancelled by the client after that many responses (0: at once), as
    a client that goes away would."""
    long_lived = method.name in LONG_LIVED
    if timeout is None:
        timeout = FOLLOW_TIMEOUT if long_lived else CALL_TIMEOUT
    serialize = _serialize
    deserialize = method.response_class().FromString
    kind = ("stream" if method.client_streaming else "unary") + "_" + (
        "stream" if method.server_streaming else "unary")
    callable_ = getattr(channel, kind)(method.path, request_serializer=serialize,
                                       response_deserializer=deserialize)
    arg: Any = iter(list(request)) if method.client_streaming else request
    responses = 0
    cancelled = False
    try:
        if method.server_streaming:
            call = callable_(arg, timeout=timeout)
            if cancel_after == 0:
                cancelled = call.cancel() or True
            for _ in call:
                responses += 1
                if cancel_after is not None and responses >= cancel_after:
                    cancelled = call.cancel() or True
        else:
            callable_(arg, timeout=timeout)
            responses = 1
    except grpc.RpcError as err:
        return Outcome(method.name, err.code(), err.details() or "",  # type: ignore[attr-defined]
                       responses, _error_info(err), cancelled)
    return Outcome(method.name, Code.OK, "", responses, None, cancelled)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def describe(request: Message | list[Message]) -> str:
    msgs = request if isinstance(request, list) else [request]
    out = []
    for m in msgs:
        text = text_format.MessageToString(m, as_one_line=True)
        out.append(f"{type(m).__name__}{{{text[:400]}{'...' if len(text) > 400 else ''}}}")
    return ", ".join(out)


# -- values: boundaries and the world's names ---------------------------------------------

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
PAGE = 0x1000
MESSAGE_LIMIT = LIMITS["max_message_bytes"]

VM_A, VM_B, VM_C = "fz-a", "fz-b", "fz-c"   # the world's VMs (see FuzzDaemon.build_world)
VM_NEW = "fz-new"                            # valid, absent: creating it may succeed
IRQFD_A, IOEVENT_A = "irq-a", "io-a"
INVALID_IDS = ["", " ", "-a", ".a", "_a", "a/b", "../a", "a b", "é", "a\x00b", "A" * 65,
               "x" * 300, "vm:1", "\u202e", "a\nb"]
HUGE_STRING = "h" * (MESSAGE_LIMIT + 1024)   # larger than the daemon's receive limit

U32_BOUNDS = [0, 1, 2, 3, 7, 8, 0xFF, 0x100, 0x3F8, 0x501, 0xFFFF, 0x10000, 0x7FFFFFFF,
              0x80000000, U32_MAX - 1, U32_MAX]
U64_BOUNDS = [0, 1, 0xFFF, PAGE, PAGE + 1, 0x10000, 0x20000, 0x22000, U32_MAX, 1 << 32,
              (1 << 52) - PAGE, 1 << 52, (1 << 63) - 1, 1 << 63, U64_MAX - PAGE + 1,
              U64_MAX]
I32_BOUNDS = [0, 1, -1, -2, 0x7FFFFFFF, -0x80000000]
I64_BOUNDS = [0, 1, -1, (1 << 63) - 1, -(1 << 63)]
BYTES_SIZES = [0, 1, 2, 4, 8, 15, 16, 17, 1023, 1024, 1025, PAGE, 0x10001,
               MESSAGE_LIMIT + 1]


def ints(lo: int, hi: int, bounds: Iterable[int]) -> st.SearchStrategy[int]:
    """Random integers in [lo, hi], often one of the boundary values."""
    edge = sorted({b for b in bounds if lo <= b <= hi})
    return st.one_of(st.sampled_from(edge), st.integers(lo, hi))


def id_strategy(known: list[str]) -> st.SearchStrategy[str]:
    """Ids of things the world has (often), valid absent ids, invalid ids, random text."""
    return st.one_of(
        st.sampled_from(known),
        st.sampled_from(INVALID_IDS),
        st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=70),
        st.text(max_size=20),
        st.just(HUGE_STRING),
    )


def bytes_strategy(max_random: int = 64) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=max_random),
                     st.sampled_from(BYTES_SIZES).map(lambda n: b"\xa5" * n))


VM_IDS = id_strategy([VM_A, VM_B, VM_C, VM_NEW])
IRQFD_IDS = id_strategy([IRQFD_A, "irq-new"])
IOEVENT_IDS = id_strategy([IOEVENT_A, "io-new"])
ADDRESSES = ints(0, U64_MAX, [*U64_BOUNDS, 0x600, 0x3F8, 0x3FF, 0x400, 0xFFFF, 0xFEE00000,
                              0xFEC00000])


def _named(field_: FieldDescriptor) -> st.SearchStrategy[Any] | None:
    """A strategy for a field known by name across messages (ids, slots, addresses)."""
    name = field_.name
    if field_.type == FieldDescriptor.TYPE_STRING:
        if name == "vm_id":
            return VM_IDS
        if name == "irqfd_id":
            return IRQFD_IDS
        if name == "ioevent_id":
            return IOEVENT_IDS
    if field_.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64):
        hi = U32_MAX if field_.type == FieldDescriptor.TYPE_UINT32 else U64_MAX
        if name in ("vcpu_id", "slot", "gsi", "irq", "pin", "vector"):
            return ints(0, hi, [0, 1, 2, 3, 4, 5, 15, 16, 23, 24, 255, 256, 1023, 1024,
                                4095, 4096, U32_MAX, hi])
        if name in ("guest_addr", "address", "base"):
            return ints(0, hi, [*U64_BOUNDS, 0x600, 0x3F8, 0xFFFF, 0xFEE00000])
    return None


def scalar_strategy(field_: FieldDescriptor) -> st.SearchStrategy[Any]:
    named = _named(field_)
    if named is not None:
        return named
    t = field_.type
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.text(max_size=40), st.sampled_from(["", "a" * 256, "a" * 257]),
                         st.just(HUGE_STRING))
    if t == FieldDescriptor.TYPE_BYTES:
        return bytes_strategy()
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return ints(0, U32_MAX, U32_BOUNDS)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return ints(0, U64_MAX, U64_BOUNDS)
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32,
             FieldDescriptor.TYPE_SFIXED32):
        return ints(-(1 << 31), (1 << 31) - 1, I32_BOUNDS)
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64,
             FieldDescriptor.TYPE_SFIXED64):
        return ints(-(1 << 63), (1 << 63) - 1, I64_BOUNDS)
    if t == FieldDescriptor.TYPE_ENUM:
        # proto3 enums are open: unknown numbers reach the server as they are.
        known = [v.number for v in field_.enum_type.values]
        return st.one_of(st.sampled_from(known),
                         st.sampled_from([-1, max(known) + 1, 99, (1 << 31) - 1]))
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    raise NotImplementedError(f"no strategy for field {field_.full_name} of type {t}")


REPEATED_SIZES = [0, 1, 2, 3, 4, 5, 17, 255, 256, 257, 1025]


def _synthetic(field_: FieldDescriptor) -> bool:
    """A proto3 `optional` field (its oneof is synthetic)."""
    oneof = field_.containing_oneof
    return oneof is not None and oneof.name == "_" + field_.name and len(oneof.fields) == 1


def _repeated(field_: FieldDescriptor, element: st.SearchStrategy[Any]
              ) -> st.SearchStrategy[list[Any]]:
    """Short random lists, and sometimes one value repeated to a boundary length."""
    return st.one_of(st.lists(element, max_size=5),
                     st.tuples(element, st.sampled_from(REPEATED_SIZES)).map(
                         lambda t: [t[0]] * t[1]))


def message_strategy(desc: _descriptor.Descriptor, depth: int = 0,
                     overrides: dict[str, st.SearchStrategy[Any]] | None = None
                     ) -> st.SearchStrategy[Message]:
    """A generic strategy for any message: each field present or not, with random or
    boundary values; one member (or none) of each oneof; nested messages to depth 3.
    `overrides` maps field names of this message to hand-written strategies."""
    cls = message_factory.GetMessageClass(desc)
    overrides = overrides or {}
    plain = [f for f in desc.fields if f.containing_oneof is None or _synthetic(f)]
    oneofs = [o for o in desc.oneofs if not (len(o.fields) == 1 and o.name == "_"
                                              + o.fields[0].name)]

    def value(field_: FieldDescriptor) -> st.SearchStrategy[Any]:
        if field_.name in overrides:
            return overrides[field_.name]
        if field_.type == FieldDescriptor.TYPE_MESSAGE:
            mt = field_.message_type
            if mt.GetOptions().map_entry:
                k, v = mt.fields_by_name["key"], mt.fields_by_name["value"]
                vs = (message_strategy(v.message_type, depth + 1)
                      if v.type == FieldDescriptor.TYPE_MESSAGE else scalar_strategy(v))
                return st.one_of(
                    st.dictionaries(scalar_strategy(k), vs, max_size=3),
                    st.integers(60, 70).map(
                        lambda n: {_key(k, i): _default(v) for i in range(n)}))
            if depth >= 3:
                return st.just(message_factory.GetMessageClass(mt)())
            element = message_strategy(mt, depth + 1)
        else:
            element = scalar_strategy(field_)
        if field_.is_repeated:
            return _repeated(field_, element)
        return element

    field_values = {f.name: value(f) for f in plain}
    for o in oneofs:
        for f in o.fields:
            field_values[f.name] = value(f)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        for f in plain:
            if draw(st.booleans()):
                _set(msg, f, draw(field_values[f.name]))
        for o in oneofs:
            chosen = draw(st.sampled_from([None, *o.fields]))
            if chosen is not None:
                _set(msg, chosen, draw(field_values[chosen.name]))
        return msg

    return build()


def _key(k: FieldDescriptor, i: int) -> Any:
    return f"k{i}" if k.type == FieldDescriptor.TYPE_STRING else i


def _default(v: FieldDescriptor) -> Any:
    if v.type == FieldDescriptor.TYPE_MESSAGE:
        return message_factory.GetMessageClass(v.message_type)()
    if v.type == FieldDescriptor.TYPE_STRING:
        return "v"
    if v.type == FieldDescriptor.TYPE_BYTES:
        return b"v"
    if v.type == FieldDescriptor.TYPE_BOOL:
        return True
    return 1


def _set(msg: Message, f: FieldDescriptor, value: Any) -> None:
    target = getattr(msg, f.name)
    if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
        for k, v in value.items():
            if isinstance(v, Message):
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif f.is_repeated:
        target.extend(value)
    elif f.type == FieldDescriptor.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(msg, f.name, value)


# -- hand-written strategies for the interesting requests ---------------------------------

PAGE_ADDRS = ints(0, U64_MAX, [0, PAGE, 0x8000, 0xF000, 0x10000, 0x11000, 0x20000, 0x21000,
                               0x22000, 0x30000, 0x40000, (1 << 52) - PAGE, 1 << 52,
                               U64_MAX - PAGE + 1])
ALIGNED_ADDRS = st.one_of(PAGE_ADDRS, st.integers(0, 0x100).map(lambda n: n * PAGE))
SIZES = ints(0, U64_MAX, [0, 1, 0xFFF, PAGE, PAGE + 1, 0x2000, 0x10000, 0x20000,
                          (256 << 10) - 0x10000, 256 << 10, (256 << 10) + 1, 512 << 10,
                          1 << 32, 1 << 63, U64_MAX - PAGE + 2, U64_MAX])


def _msg(cls: type[Message], **fields_: st.SearchStrategy[Any]) -> st.SearchStrategy[Message]:
    """A message whose listed fields come from the given strategies (each always set;
    st.none() leaves one unset)."""
    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        for name, strategy in fields_.items():
            v = draw(strategy)
            if v is None:
                continue
            _set(msg, msg.DESCRIPTOR.fields_by_name[name], v)
        return msg
    return build()


def _maybe(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), s)


VM_OPTIONS = _msg(
    pb.VmOptions, irqchip=st.booleans(), pit=st.booleans(),
    tss_address=ints(0, U64_MAX, [0, 1, 0xFFFBD000, 0xFFFBD001, 0xFFFFF000, 1 << 32,
                                  U64_MAX]),
    identity_map_address=ints(0, U64_MAX, [0, 0xFFFBC000, 0xFFFBC001, 1 << 32, U64_MAX]),
    debug_exit_port=ints(0, U32_MAX, [0, 1, 0x3F7, 0x3F8, 0x3FF, 0x400, 0x501, 0xFFFF,
                                      0x10000, U32_MAX]),
    strict_io=st.booleans(),
    console_buffer_bytes=ints(0, U32_MAX, [0, 1, 16, 65536, U32_MAX]))

LABELS = st.one_of(
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    st.sampled_from([{"": "x"}, {"k" * 257: "v"}, {"k": "v" * 257}, {"k" * 256: "v" * 256}]),
    st.integers(64, 66).map(lambda n: {f"l{i}": "v" for i in range(n)}))


def _write_stream() -> st.SearchStrategy[list[Message]]:
    first = _msg(pb.WriteGuestMemoryRequest, vm_id=VM_IDS, guest_addr=PAGE_ADDRS.flatmap(
        lambda a: st.sampled_from([a, min(a + 1, U64_MAX), max(0, a - 1)])),
        data=_maybe(bytes_strategy(0x1100)))
    rest = _msg(pb.WriteGuestMemoryRequest, vm_id=_maybe(VM_IDS),
                guest_addr=_maybe(ADDRESSES), data=bytes_strategy(0x1100))
    return st.one_of(st.just([]), st.tuples(first, st.lists(rest, max_size=3)).map(
        lambda t: [t[0], *t[1]]))


def _claims() -> st.SearchStrategy[list[Message]]:
    rng = _msg(pb.AddressRange, space=st.sampled_from([0, 1, 2, -1]),
               base=ints(0, U64_MAX, [0, 0x300, 0x3F8, 0x3FF, 0x400, 0x500, 0x501, 0x600,
                                      0xFFFF, 0x10000, 0x10000 - 1, 1 << 32, (1 << 52) - 1,
                                      1 << 52, U64_MAX]),
               length=ints(0, U64_MAX, [0, 1, 2, 8, 0x100, 0x10000, 1 << 52, U64_MAX]))
    ranges = st.one_of(st.lists(rng, max_size=4),
                       st.tuples(rng, st.sampled_from([1024, 1025])).map(
                           lambda t: [t[0]] * t[1]))
    claim = _msg(pb.ExitHandlerMessage, claim=_msg(
        pb.ClaimRequest, vm_id=VM_IDS, ranges=ranges,
        deadline_ms=ints(0, U32_MAX, [0, 1, 1000, 60000, 60001, U32_MAX])))
    reply = _msg(pb.ExitHandlerMessage, reply=_msg(
        pb.ExitReply, exit_id=ints(0, U64_MAX, [0, 1, U64_MAX]), data=bytes_strategy()))
    empty = st.just(pb.ExitHandlerMessage())
    return st.one_of(
        st.tuples(claim, st.lists(st.one_of(reply, claim, empty), max_size=2)).map(
            lambda t: [t[0], *t[1]]),
        st.lists(st.one_of(reply, empty), max_size=2))


VCPU_REF = _msg(pb.VcpuRef, vm_id=VM_IDS, vcpu_id=_named(pb.VcpuRef.DESCRIPTOR
                                                         .fields_by_name["vcpu_id"]))
MSR_INDICES = ints(0, U32_MAX, [0, 0x10, 0x1B, 0x174, 0x175, 0x176, 0x277, 0x8B,
                                0xC0000080, 0xC0000081, 0xC0000100, 0x4B564D00, 0x4B564D01,
                                0x40000000, U32_MAX])

HAND_WRITTEN: dict[str, st.SearchStrategy[Any]] = {
    "kvmd.v1.Vms/CreateVm": _msg(pb.CreateVmRequest, vm_id=VM_IDS, labels=_maybe(LABELS),
                                 options=_maybe(VM_OPTIONS)),
    "kvmd.v1.Vms/ListVms": _msg(pb.ListVmsRequest, label_selector=_maybe(LABELS)),
    "kvmd.v1.Vms/WriteConsole": _msg(pb.WriteConsoleRequest, vm_id=VM_IDS,
                                     data=bytes_strategy()),
    "kvmd.v1.Memory/AddMemoryRegion": _msg(
        pb.AddMemoryRegionRequest, vm_id=VM_IDS,
        guest_addr=st.one_of(ALIGNED_ADDRS, ADDRESSES), size=SIZES,
        read_only=st.booleans(), log_dirty=st.booleans()),
    "kvmd.v1.Memory/RemoveMemoryRegion": _msg(
        pb.RemoveMemoryRegionRequest, vm_id=VM_IDS,
        slot=ints(0, U32_MAX, [0, 1, 2, 3, 4, 32767, 32768, 0x10000, U32_MAX])),
    "kvmd.v1.Memory/WriteGuestMemory": _write_stream(),
    "kvmd.v1.Memory/ReadGuestMemory": _msg(
        pb.ReadGuestMemoryRequest, vm_id=VM_IDS,
        guest_addr=st.one_of(PAGE_ADDRS, ADDRESSES),
        length=ints(0, U64_MAX, [0, 1, 0xFFF, PAGE, 0x10000, 0x10001, 0x12000, 0x22000,
                                 MESSAGE_LIMIT, 1 << 32, U64_MAX]),
        chunk_size=ints(0, U32_MAX, [0, 1, 7, PAGE, MESSAGE_LIMIT, U32_MAX])),
    "kvmd.v1.Memory/GetDirtyLog": _msg(
        pb.GetDirtyLogRequest, vm_id=VM_IDS, slot=ints(0, U32_MAX, [0, 1, 2, 3, U32_MAX]),
        chunk_size=ints(0, U32_MAX, [0, 1, 2, 8, U32_MAX])),
    "kvmd.v1.Memory/PollDirtyLog": _msg(
        pb.PollDirtyLogRequest, vm_id=VM_IDS, slot=ints(0, U32_MAX, [0, 1, 2, 3, U32_MAX]),
        form=st.sampled_from([0, 1, 2, 3, -1])),
    "kvmd.v1.IoEvents/RegisterIoevent": _msg(
        pb.RegisterIoeventRequest, vm_id=VM_IDS, ioevent_id=IOEVENT_IDS,
        space=st.sampled_from([0, 1, 2, -1]),
        address=ints(0, U64_MAX, [0, 0x600, 0x3F8, 0x501, 0xFFFF, 0x10000, 0x10000 - 8,
                                  0x20000, U64_MAX - 7, U64_MAX]),
        length=ints(0, U32_MAX, [0, 1, 2, 3, 4, 5, 8, 16, U32_MAX]),
        datamatch=_maybe(ints(0, U64_MAX, [0, 1, 0xFF, 0x100, 0xFFFF, 0x10000, U32_MAX,
                                           1 << 32, U64_MAX]))),
    "kvmd.v1.Interrupts/RegisterIrqfd": _msg(
        pb.RegisterIrqfdRequest, vm_id=VM_IDS, irqfd_id=IRQFD_IDS,
        gsi=ints(0, U32_MAX, [0, 1, 2, 5, 23, 24, 1023, 1024, 4095, 4096, U32_MAX]),
        resample=st.booleans()),
    "kvmd.v1.Interrupts/SetGsiRouting": _msg(
        pb.SetGsiRoutingRequest, vm_id=VM_IDS, routes=st.one_of(
            st.lists(message_strategy(pb.IrqRoute.DESCRIPTOR), max_size=5),
            st.tuples(message_strategy(pb.IrqRoute.DESCRIPTOR),
                      st.sampled_from([1024, 4096, 4097])).map(lambda t: [t[0]] * t[1]))),
    "kvmd.v1.ExitHandlers/HandleExits": _claims(),
    "kvmd.v1.Vcpus/GetMsrs": _msg(pb.GetMsrsRequest, vcpu=VCPU_REF, indices=st.one_of(
        st.lists(MSR_INDICES, max_size=5),
        st.sampled_from([255, 256]).map(lambda n: [0x10] * n))),
    "kvmd.v1.Vcpus/SetMsrs": _msg(pb.SetMsrsRequest, vcpu=VCPU_REF, msrs=st.one_of(
        st.lists(_msg(pb.Msr, index=MSR_INDICES, value=ints(0, U64_MAX, U64_BOUNDS)),
                 max_size=4),
        st.sampled_from([255, 256]).map(lambda n: [pb.Msr(index=0x174 + i % 3)
                                                   for i in range(n)]))),
    "kvmd.v1.Vcpus/SetCpuid": _msg(
        pb.SetCpuidRequest, vcpu=VCPU_REF, use_supported=st.booleans(),
        entries=st.one_of(st.lists(message_strategy(pb.CpuidEntry.DESCRIPTOR), max_size=3),
                          st.sampled_from([256, 257]).map(
                              lambda n: [pb.CpuidEntry(function=i) for i in range(n)]))),
    "kvmd.v1.Vcpus/SetLapic": _msg(pb.SetLapicRequest, vcpu=VCPU_REF, lapic=_maybe(_msg(
        pb.Lapic, regs=st.sampled_from([0, 1, 1023, 1024, 1025]).map(
            lambda n: b"\0" * n)))),
    "kvmd.v1.Vcpus/InjectInterrupt": _msg(
        pb.InjectInterruptRequest, vcpu=VCPU_REF,
        vector=ints(0, U32_MAX, [0, 2, 8, 32, 255, 256, U32_MAX])),
    "kvmd.v1.Vcpus/SetFpu": _msg(pb.SetFpuRequest, vcpu=VCPU_REF, fpu=_maybe(st.one_of(
        message_strategy(pb.Fpu.DESCRIPTOR),
        _msg(pb.Fpu, fpr=st.sampled_from([7, 8, 9]).map(lambda n: [b"\0" * 16] * n),
             xmm=st.sampled_from([15, 16]).map(lambda n: [b"\0" * 16] * n),
             fcw=ints(0, U32_MAX, [0, 0x37F, 0xFFFF, 0x10000]),
             mxcsr=ints(0, U32_MAX, [0, 0x1F80, 0xFFFF, 0x10000, U32_MAX]))))),
    "kvmd.v1.Hypervisor/CheckExtension": st.one_of(
        _msg(pb.CheckExtensionRequest, name=st.one_of(
            st.sampled_from(["", "irqfd", "KVM_CAP_IRQFD", "kvm_cap_irqfd", "KVM_CAP_",
                             "nope", "x" * 300]), st.text(max_size=10)),
            vm_id=_maybe(VM_IDS)),
        _msg(pb.CheckExtensionRequest, number=ints(0, U32_MAX, [0, 1, 4, 236, 237, 1000,
                                                                U32_MAX]),
             vm_id=_maybe(VM_IDS)),
        _msg(pb.CheckExtensionRequest, vm_id=_maybe(VM_IDS))),
}


def request_strategy(method: Method) -> st.SearchStrategy[Any]:
    """Hand-written where one exists (half the time), else generic from the descriptor.
    Client-streaming methods get a list of 0-4 messages."""
    generic: st.SearchStrategy[Any] = message_strategy(method.desc.input_type)
    if method.client_streaming:
        generic = st.lists(generic, max_size=4)
    hand = HAND_WRITTEN.get(method.name)
    return generic if hand is None else st.one_of(hand, generic)


# -- the world and the daemon -------------------------------------------------------------

# Real-mode guest code, at 0x1000 of VM_A and VM_B: `cli; hlt; jmp hlt` (in-kernel HLT on
# VM_A, which has the irqchip: its vCPU stays "running", blocked, using no CPU).
HALT_LOOP = bytes([0xFA, 0xF4, 0xEB, 0xFD])   # cli; hlt; jmp short -3 (back to hlt)
SPIN_LOOP = bytes([0xEB, 0xFE])               # jmp $
CODE_ADDR = 0x1000
SPIN_ADDR = 0x1100

Snapshot = dict[str, dict[str, Any]]


@dataclass(repr=False)
class FuzzDaemon:
    """An in-process kvmd, a channel to it, and the world the fuzzer acts on."""

    daemon: Daemon
    address: str
    socket_path: str
    channel: grpc.Channel
    tmp: Any
    pristine: Snapshot | None = None
    fd_baseline: int = 0
    last: Snapshot | None = None
    calls: int = 0
    codes: dict[str, int] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"FuzzDaemon({self.address}, {self.calls} calls)"

    @classmethod
    def start(cls, **config: Any) -> FuzzDaemon:
        tmp = tempfile.TemporaryDirectory(prefix="kvmd-fuzz-")
        path = os.path.join(tmp.name, "kvmd.sock")
        address = f"unix://{path}"
        merged: dict[str, Any] = {**LIMITS, "log_level": "error", **config}
        daemon = Daemon(Config(listen=[address], **merged))
        daemon.start()
        channel = grpc.insecure_channel(address, options=CLIENT_OPTIONS)
        return cls(daemon, address, path, channel, tmp)

    def stop(self) -> None:
        self.channel.close()
        self.daemon.stop()
        self.tmp.cleanup()

    # stubs
    @property
    def vms(self) -> rpc.VmsStub:
        return rpc.VmsStub(self.channel)

    @property
    def memory(self) -> rpc.MemoryStub:
        return rpc.MemoryStub(self.channel)

    @property
    def vcpus(self) -> rpc.VcpusStub:
        return rpc.VcpusStub(self.channel)

    @property
    def interrupts(self) -> rpc.InterruptsStub:
        return rpc.InterruptsStub(self.channel)

    @property
    def ioevents(self) -> rpc.IoEventsStub:
        return rpc.IoEventsStub(self.channel)

    @property
    def hypervisor(self) -> rpc.HypervisorStub:
        return rpc.HypervisorStub(self.channel)

    # -- the world ------------------------------------------------------------------------

    def delete_all(self) -> None:
        for vm in self.vms.ListVms(pb.ListVmsRequest(), timeout=CALL_TIMEOUT).vms:
            try:
                self.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm.vm_id), timeout=CALL_TIMEOUT)
            except grpc.RpcError as err:
                if err.code() != Code.NOT_FOUND:  # type: ignore[attr-defined]
                    raise

    def real_mode(self, vm_id: str, vcpu_id: int, rip: int) -> None:
        ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=vcpu_id)
        sregs = self.vcpus.GetSregs(ref, timeout=CALL_TIMEOUT)
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            getattr(sregs, name).base = 0
            getattr(sregs, name).selector = 0
        self.vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref, sregs=sregs), timeout=CALL_TIMEOUT)
        self.vcpus.SetRegs(pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(
            rip=rip, rflags=2, rsp=0x8000)), timeout=CALL_TIMEOUT)

    def write(self, vm_id: str, addr: int, data: bytes) -> None:
        self.memory.WriteGuestMemory(iter([pb.WriteGuestMemoryRequest(
            vm_id=vm_id, guest_addr=addr, data=data)]), timeout=CALL_TIMEOUT)

    def build_world(self) -> Snapshot:
        """VM_A: irqchip, 64 KiB at 0 (dirty-logged) with the halt loop, vCPU 0 started
        (blocked in the kernel's HLT), irqfd IRQFD_A on GSI 5, ioevent IOEVENT_A on port
        0x600. VM_B: no irqchip, 64 KiB at 0 and a read-only 8 KiB slot at 0x20000, vCPU 0
        created and set up (not started). VM_C: empty. Returns its snapshot."""
        self.delete_all()
        t = CALL_TIMEOUT
        self.vms.CreateVm(pb.CreateVmRequest(vm_id=VM_A, labels={"role": "a"},
                                             options=pb.VmOptions(irqchip=True)), timeout=t)
        self.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
            vm_id=VM_A, guest_addr=0, size=0x10000, log_dirty=True), timeout=t)
        self.write(VM_A, CODE_ADDR, HALT_LOOP)
        self.write(VM_A, SPIN_ADDR, SPIN_LOOP)
        self.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=VM_A, vcpu_id=0), timeout=t)
        self.real_mode(VM_A, 0, CODE_ADDR)
        self.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(vm_id=VM_A, irqfd_id=IRQFD_A,
                                                              gsi=5), timeout=t)
        self.ioevents.RegisterIoevent(pb.RegisterIoeventRequest(
            vm_id=VM_A, ioevent_id=IOEVENT_A, space=pb.PIO, address=0x600, length=1),
            timeout=t)
        self.vms.StartVm(pb.VmRef(vm_id=VM_A), timeout=t)

        self.vms.CreateVm(pb.CreateVmRequest(vm_id=VM_B, labels={"role": "b"}), timeout=t)
        self.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
            vm_id=VM_B, guest_addr=0, size=0x10000), timeout=t)
        self.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
            vm_id=VM_B, guest_addr=0x20000, size=0x2000, read_only=True), timeout=t)
        self.write(VM_B, CODE_ADDR, HALT_LOOP)
        self.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=VM_B, vcpu_id=0), timeout=t)
        self.real_mode(VM_B, 0, CODE_ADDR)

        self.vms.CreateVm(pb.CreateVmRequest(vm_id=VM_C), timeout=t)
        snap = self.snapshot()
        assert snap[VM_A]["vm"].state == "running", snap[VM_A]["vm"]
        return snap

    def ensure_world(self, snap: Snapshot | None) -> Snapshot:
        """The pristine world: `snap` if it is that, else rebuilt."""
        if self.pristine is None:
            self.pristine = self.build_world()
            return self.pristine
        if snap is not None and _same_world(snap, self.pristine):
            return snap
        rebuilt = self.build_world()
        assert _same_world(rebuilt, self.pristine), _diff(self.pristine, rebuilt)
        return rebuilt

    # -- observation ----------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Everything the List/Get RPCs show: per VM, GetVm, ListMemoryRegions,
        ListIrqfds, ListIoevents and ListVcpus; plus GetInfo's counts (as "" entry)."""
        t = CALL_TIMEOUT
        out: Snapshot = {}
        for vm in self.vms.ListVms(pb.ListVmsRequest(), timeout=t).vms:
            ref = vm.vm_id
            try:
                vcpus = list(self.vcpus.ListVcpus(pb.ListVcpusRequest(vm_id=ref),
                                                  timeout=t).vcpus)
                for vcpu in vcpus:  # a running guest's CPU time grows by itself, not a call
                    vcpu.cpu_seconds = 0
                out[ref] = {
                    "listed": vm,
                    "vm": self.vms.GetVm(pb.GetVmRequest(vm_id=ref), timeout=t),
                    "regions": list(self.memory.ListMemoryRegions(
                        pb.ListMemoryRegionsRequest(vm_id=ref), timeout=t).regions),
                    "irqfds": list(self.interrupts.ListIrqfds(
                        pb.ListIrqfdsRequest(vm_id=ref), timeout=t).irqfds),
                    "ioevents": list(self.ioevents.ListIoevents(
                        pb.ListIoeventsRequest(vm_id=ref), timeout=t).ioevents),
                    "vcpus": vcpus,
                }
            except grpc.RpcError as err:  # pragma: no cover - reported with context
                raise AssertionError(f"snapshot of {ref}: {err.code()}: "  # type: ignore[attr-defined]
                                     f"{err.details()}") from None  # type: ignore[attr-defined]
        return out

    def assert_healthy(self) -> None:
        """grpc.health.v1 Check is SERVING and GetInfo answers."""
        health = health_pb2_grpc.HealthStub(self.channel)
        resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        info = self.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=10)
        assert info.api_version == 12

    def assert_accounted(self, snap: Snapshot) -> None:
        """GetInfo's counts equal what the List RPCs show; no call, stream or claim is
        left over once every call has ended (checked in-process, with a bound)."""
        info = self.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=10)
        assert info.vm_count == len(snap), (info.vm_count, sorted(snap))
        listed = sum(r.size for v in snap.values() for r in v["regions"])
        assert info.memory_in_use_bytes == listed, (info.memory_in_use_bytes, listed)
        host = self.daemon.host
        assert host is not None
        budget = self.daemon.budget

        def settled() -> bool:
            return (budget.calls == 0 and budget.streams == 0
                    and not any(vm.claims.handlers() for vm in host.list_vms()))
        wait_until(settled, 10, "calls, streams and claims to be released "
                   f"(calls={budget.calls}, streams={budget.streams})")

    # -- one checked call -----------------------------------------------------------------

    def check_call(self, method: Method, request: Any, before: Snapshot,
                   cancel_after: int | None = None) -> tuple[Outcome, Snapshot]:
        """Call, then check every invariant; returns the outcome and the new snapshot.
        `cancel_after`: see `invoke` (for server streams)."""
        outcome = invoke(self.channel, method, request, cancel_after=cancel_after)
        self.calls += 1
        self.codes[outcome.code.name] = self.codes.get(outcome.code.name, 0) + 1
        context = f"{method.name}({describe(request)}) -> {outcome.code.name}: " \
                  f"{outcome.details[:300]}"
        assert_documented(method, outcome, context)
        self.assert_healthy()
        after = self.snapshot()
        if not outcome.ok or method.name in NON_MUTATING:
            assert _same_state(before, after), (
                f"{'failed' if not outcome.ok else 'read-only'} call changed state: "
                f"{context}\n{_diff(before, after)}")
        self.assert_accounted(after)
        return outcome, after


def assert_documented(method: Method, outcome: Outcome, context: str) -> None:
    """The code is a documented one, with kvmd's ErrorInfo where the daemon made it."""
    code = outcome.code
    if outcome.cancelled and code == Code.CANCELLED:
        return  # the client's own doing
    if code == Code.DEADLINE_EXCEEDED:
        assert method.name in LONG_LIVED, f"a call hung past its deadline: {context}"
        return
    assert code in DOCUMENTED, f"undocumented code: {context}"
    if code == Code.OK:
        return
    if outcome.error_info is None:
        # grpc's own refusal of an oversized request carries no kvmd details: the daemon's
        # ("Received message larger than max"), or the fuzzing client's, which never sent a
        # request past its own send limit ("CLIENT: Sent message larger than max"). An
        # oversized response (the server's "Sent message larger than max") is the daemon's
        # failure.
        assert code == Code.RESOURCE_EXHAUSTED and (
            "Received message larger than max" in outcome.details
            or outcome.details.startswith("CLIENT: Sent message larger than max")), \
            f"{code.name} without kvmd's google.rpc.ErrorInfo: {context}"
        return
    assert outcome.error_info.domain == "kvmd" and outcome.error_info.reason, context
    # AIP-193: a specific reason of kvmd's, sent with the one code it belongs to.
    reason = Reason.__members__.get(outcome.error_info.reason)
    assert reason is not None, f"reason {outcome.error_info.reason!r} is no Reason: {context}"
    assert reason_code(reason) == code, f"{reason} sent with {code.name}: {context}"


def _same_state(a: Snapshot, b: Snapshot) -> bool:
    return a == b


def _same_world(a: Snapshot, b: Snapshot) -> bool:
    """Equal but for creation times (a rebuilt world is the same world)."""
    if sorted(a) != sorted(b):
        return False
    for vm_id in a:
        x, y = a[vm_id], b[vm_id]
        for key in x:
            if key in ("vm", "listed"):
                xv, yv = type(x[key])(), type(y[key])()
                xv.CopyFrom(x[key])
                yv.CopyFrom(y[key])
                xv.created_unix_ms = yv.created_unix_ms = 0
                if xv != yv:
                    return False
            elif x[key] != y[key]:
                return False
    return True


def _diff(a: Snapshot, b: Snapshot) -> str:
    lines = []
    for vm_id in sorted(set(a) | set(b)):
        if vm_id not in a or vm_id not in b:
            lines.append(f"  vm {vm_id}: {'added' if vm_id in b else 'removed'}")
            continue
        for key in a[vm_id]:
            if a[vm_id][key] != b[vm_id][key]:
                lines.append(f"  {vm_id}.{key}: {_short(a[vm_id][key])} -> "
                             f"{_short(b[vm_id][key])}")
    return "\n".join(lines) or "  (no difference)"


def _short(v: Any) -> str:
    if isinstance(v, list):
        return "[" + "; ".join(_short(x) for x in v) + "]"
    if isinstance(v, Message):
        return text_format.MessageToString(v, as_one_line=True)
    return repr(v)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def settle(fz: FuzzDaemon, snap: Snapshot) -> Snapshot:
    """Pause every vCPU that is running (between calls of a sequence), so no guest acts
    while the next call is checked; returns the new snapshot."""
    paused = False
    for vm_id, v in snap.items():
        for vcpu in v["vcpus"]:
            if vcpu.state == "running":
                outcome = invoke(fz.channel, METHODS_BY_NAME["kvmd.v1.Vcpus/PauseVcpu"],
                                 pb.VcpuRef(vm_id=vm_id, vcpu_id=vcpu.vcpu_id))
                assert outcome.code in (Code.OK, Code.FAILED_PRECONDITION), outcome
                paused = True
    return fz.snapshot() if paused else snap

