"""Malformed ids on every RPC that takes one: INVALID_ARGUMENT, whatever the RPC does.

Ids are 1-64 characters of [A-Za-z0-9._-] starting with a letter or digit (proto/vmm.proto).
An id that breaks that rule can never name anything, so it is a bad argument regardless of
state (INVALID_ARGUMENT), not a missing resource (NOT_FOUND). The RPC list is read from the
proto's descriptors, so RPCs added later are covered without touching this file.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import grpc
from api_support import RunningDaemon
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor

from kvmd_proto import vmm_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EMPTY = ""
OVERLONG = "x" * 65
BAD_CHARACTERS = ["has space", "slash/id", "-dash-first", "ünï", "new\nline"]
CALL_TIMEOUT = 5.0


def _methods() -> list[MethodDescriptor]:
    return [m for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods]


def _request_with_vm_id(method: MethodDescriptor, vm_id: str) -> Any | None:
    """The method's request naming `vm_id` (None if it takes no vm id)."""
    cls = message_factory.GetMessageClass(method.input_type)
    fields = method.input_type.fields_by_name
    if "vm_id" in fields:
        req = cls(vm_id=vm_id)
        if method.name == "CheckExtension":
            req.name = "irqfd"
        return req
    if "vcpu" in fields:
        return cls(vcpu=pb.VcpuRef(vm_id=vm_id))
    if method.name == "RestoreVm":  # the first message's options name the new VM
        return cls(options=pb.RestoreVmOptions(vm_id=vm_id))
    if method.name == "HandleExits":
        return cls(claim=pb.ClaimRequest(vm_id=vm_id, ranges=[
            pb.AddressRange(space=pb.PIO, base=0x3F0, length=1)]))
    if method.name == "RestoreVm":  # names the VM it creates
        return cls(options=pb.RestoreVmOptions(vm_id=vm_id))
    return None


def _call(channel: grpc.Channel, method: MethodDescriptor, request: Any) -> grpc.StatusCode:
    """Invoke any kvmd RPC generically; returns its final status code."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    out = message_factory.GetMessageClass(method.output_type)
    kinds = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
             (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    stub = kinds[(method.client_streaming, method.server_streaming)](
        path, request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=out.FromString)
    hold_open: queue.Queue[None] = queue.Queue()

    def requests() -> Iterator[Any]:
        yield request
        if method.server_streaming:  # bidi: keep our side open until the server answers
            try:
                hold_open.get(timeout=CALL_TIMEOUT)
            except queue.Empty:
                pass

    arg = requests() if method.client_streaming else request
    try:
        result = stub(arg, timeout=CALL_TIMEOUT)
        if method.server_streaming:
            for _ in result:
                pass
    except grpc.RpcError as err:
        return err.code()  # type: ignore[attr-defined,no-any-return]
    finally:
        hold_open.put(None)
    return grpc.StatusCode.OK


def _codes_for_vm_id(api: RunningDaemon, vm_id: str) -> dict[str, str]:
    codes = {}
    for method in _methods():
        request = _request_with_vm_id(method, vm_id)
        if request is None or (method.name == "CheckExtension" and vm_id == EMPTY):
            continue  # CheckExtension: no vm_id means "ask /dev/kvm"
        codes[f"{method.containing_service.name}.{method.name}"] = _call(
            api.stubs.channel, method, request).name
    api.assert_healthy()
    return codes


def test_every_vm_scoped_rpc_is_covered() -> None:
    without = [m.name for m in _methods() if _request_with_vm_id(m, "a") is None]
    # ReceiveMigration names no VM: the daemons' stream is authorized by its token.
    assert without == ["GetInfo", "GetSupportedCpuid", "ListVms", "ListSnapshots",
                       "DeleteSnapshot", "ListMigrations", "ReceiveMigration",
                       "ListStrandedVms", "GetHandoverReport"]


def test_empty_vm_id_is_invalid_argument_on_every_rpc(api: RunningDaemon) -> None:
    api.create_vm("exists")
    codes = _codes_for_vm_id(api, EMPTY)
    wrong = {rpc: code for rpc, code in codes.items() if code != INVALID.name}
    assert wrong == {}, f"RPCs not answering INVALID_ARGUMENT for an empty vm_id: {wrong}"


def test_overlong_vm_id_is_invalid_argument_on_every_rpc(api: RunningDaemon) -> None:
    codes = _codes_for_vm_id(api, OVERLONG)
    wrong = {rpc: code for rpc, code in codes.items() if code != INVALID.name}
    assert wrong == {}, f"RPCs not answering INVALID_ARGUMENT for a 65-char vm_id: {wrong}"


def test_bad_character_vm_id_is_invalid_argument_on_every_rpc(api: RunningDaemon) -> None:
    wrong: dict[str, list[str]] = {}
    for vm_id in BAD_CHARACTERS:
        for rpc, code in _codes_for_vm_id(api, vm_id).items():
            if code != INVALID.name:
                wrong.setdefault(f"{code} for {vm_id!r}", []).append(rpc)
    assert wrong == {}, f"RPCs not answering INVALID_ARGUMENT for malformed vm_ids: {wrong}"


def test_malformed_irqfd_and_ioevent_ids_are_invalid_argument(api: RunningDaemon) -> None:
    api.create_vm("ids", irqchip=True)
    i, io = api.interrupts, api.ioevents
    wrong: dict[str, list[str]] = {}
    for bad_id in [EMPTY, OVERLONG, *BAD_CHARACTERS]:
        calls = {
            "RegisterIrqfd": lambda b=bad_id: i.RegisterIrqfd(pb.RegisterIrqfdRequest(
                vm_id="ids", irqfd_id=b, gsi=5)),
            "TriggerIrqfd": lambda b=bad_id: i.TriggerIrqfd(pb.TriggerIrqfdRequest(
                vm_id="ids", irqfd_id=b)),
            "UnregisterIrqfd": lambda b=bad_id: i.UnregisterIrqfd(pb.UnregisterIrqfdRequest(
                vm_id="ids", irqfd_id=b)),
            "RegisterIoevent": lambda b=bad_id: io.RegisterIoevent(pb.RegisterIoeventRequest(
                vm_id="ids", ioevent_id=b, space=pb.PIO, address=0x10)),
            "UnregisterIoevent": lambda b=bad_id: io.UnregisterIoevent(
                pb.UnregisterIoeventRequest(vm_id="ids", ioevent_id=b)),
        }
        for name, call in calls.items():
            try:
                call()
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name  # type: ignore[attr-defined]
            if code != INVALID.name:
                wrong.setdefault(f"{code} for {bad_id!r}", []).append(name)
    api.assert_healthy()
    assert wrong == {}, f"RPCs not answering INVALID_ARGUMENT for malformed ids: {wrong}"
