"""Vms service: CreateVm, GetVm, ListVms (label selector), DeleteVm."""

from __future__ import annotations

import time

import grpc
import pytest
from api_support import RunningDaemon

from kvmd_proto import vmm_pb2 as pb

NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXISTS = grpc.StatusCode.ALREADY_EXISTS


def test_create_get_vm(api: RunningDaemon) -> None:
    before = int(time.time() * 1000)
    created = api.create_vm("web-1.prod_a", labels={"role": "web", "env": "prod"})
    assert created.vm_id == "web-1.prod_a"
    assert dict(created.labels) == {"role": "web", "env": "prod"}
    assert created.state == "created"
    assert (created.vcpu_count, created.memory_slot_count, created.memory_bytes) == (0, 0, 0)
    assert before - 1000 <= created.created_unix_ms <= int(time.time() * 1000) + 1000
    assert created.owner == "local"
    got = api.vms.GetVm(pb.GetVmRequest(vm_id="web-1.prod_a"))
    assert got == created


def test_get_vm_counts_resources(api: RunningDaemon) -> None:
    api.create_vm("counted")
    api.add_memory("counted", 0, 0x10000)
    api.add_memory("counted", 0x100000, 0x2000)
    api.create_vcpu("counted", 0)
    api.create_vcpu("counted", 1)
    vm = api.vms.GetVm(pb.GetVmRequest(vm_id="counted"))
    assert (vm.vcpu_count, vm.memory_slot_count, vm.memory_bytes) == (2, 2, 0x12000)


def test_create_vm_with_irqchip_and_pit(api: RunningDaemon) -> None:
    vm = api.create_vm("chips", irqchip=True, pit=True)
    assert (vm.options.irqchip, vm.options.pit) == (True, True)
    assert api.vms.GetVm(pb.GetVmRequest(vm_id="chips")).options == vm.options


def test_create_vm_with_explicit_tss_and_identity_map(api: RunningDaemon) -> None:
    options = pb.VmOptions(tss_address=0xFEFFD000, identity_map_address=0xFEFFC000)
    vm = api.vms.CreateVm(pb.CreateVmRequest(vm_id="tss", options=options))
    assert (vm.options.tss_address, vm.options.identity_map_address) == (
        0xFEFFD000, 0xFEFFC000)


def test_list_vms_and_label_selector(api: RunningDaemon) -> None:
    assert list(api.vms.ListVms(pb.ListVmsRequest()).vms) == []
    api.create_vm("c", labels={"role": "db", "env": "prod"})
    api.create_vm("a", labels={"role": "web", "env": "prod"})
    api.create_vm("b", labels={"role": "web", "env": "dev"})

    def ids(selector: dict[str, str]) -> list[str]:
        resp = api.vms.ListVms(pb.ListVmsRequest(label_selector=selector))
        return [v.vm_id for v in resp.vms]

    assert ids({}) == ["a", "b", "c"]
    assert ids({"role": "web"}) == ["a", "b"]
    assert ids({"env": "prod"}) == ["a", "c"]
    assert ids({"role": "web", "env": "prod"}) == ["a"]
    assert ids({"role": "cache"}) == []
    assert ids({"missing": ""}) == []


def test_delete_vm(api: RunningDaemon) -> None:
    api.create_vm("gone", irqchip=True)
    api.add_memory("gone", 0, 0x10000)
    api.create_vcpu("gone")
    api.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(vm_id="gone", irqfd_id="i", gsi=5))
    api.ioevents.RegisterIoevent(pb.RegisterIoeventRequest(
        vm_id="gone", ioevent_id="e", space=pb.PIO, address=0x10))
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="gone"))
    api.assert_code(lambda: api.vms.GetVm(pb.GetVmRequest(vm_id="gone")), NOT_FOUND)
    assert list(api.vms.ListVms(pb.ListVmsRequest()).vms) == []
    assert api.hypervisor.GetInfo(pb.GetInfoRequest()).memory_in_use_bytes == 0
    # The id is free again.
    api.create_vm("gone")


def test_unknown_vm(api: RunningDaemon) -> None:
    api.assert_code(lambda: api.vms.GetVm(pb.GetVmRequest(vm_id="nope")), NOT_FOUND)
    api.assert_code(lambda: api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="nope")), NOT_FOUND)
    api.create_vm("once")
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="once"))
    api.assert_code(lambda: api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="once")), NOT_FOUND)


def test_duplicate_vm_id(api: RunningDaemon) -> None:
    api.create_vm("dup", labels={"k": "v"})
    err = api.assert_code(lambda: api.create_vm("dup"), EXISTS)
    assert "dup" in err.details()  # type: ignore[attr-defined]
    # The original is untouched.
    assert dict(api.vms.GetVm(pb.GetVmRequest(vm_id="dup")).labels) == {"k": "v"}


@pytest.mark.parametrize("vm_id", [
    "", "x" * 65, "has space", "slash/id", "-leading-dash", ".leading-dot", "ünïcode",
    "tab\tid", "new\nline", "semi;colon",
])
def test_create_vm_bad_id(api: RunningDaemon, vm_id: str) -> None:
    api.assert_code(lambda: api.create_vm(vm_id), INVALID)
    assert list(api.vms.ListVms(pb.ListVmsRequest()).vms) == []


def test_create_vm_longest_id(api: RunningDaemon) -> None:
    assert api.create_vm("x" * 64).vm_id == "x" * 64


def test_create_vm_pit_without_irqchip(api: RunningDaemon) -> None:
    api.assert_code(lambda: api.create_vm("pit", pit=True), INVALID)
    assert list(api.vms.ListVms(pb.ListVmsRequest()).vms) == []


def test_create_vm_bad_labels(api: RunningDaemon) -> None:
    api.assert_code(lambda: api.create_vm("l1", labels={"": "v"}), INVALID)
    api.assert_code(lambda: api.create_vm("l2", labels={"k" * 257: "v"}), INVALID)
    api.assert_code(lambda: api.create_vm("l3", labels={"k": "v" * 257}), INVALID)
    api.assert_code(lambda: api.create_vm("l4", labels={f"k{i}": "" for i in range(65)}),
                    INVALID)
    assert list(api.vms.ListVms(pb.ListVmsRequest()).vms) == []
    # The documented limits themselves are taken: 64 labels, keys and values of 256.
    for vm_id, labels in (("most-labels", {f"k{i}": "" for i in range(64)}),
                          ("longest-key", {"k" * 256: "v"}),
                          ("longest-value", {"k": "v" * 256})):
        api.create_vm(vm_id, labels=labels)
        assert dict(api.vms.GetVm(pb.GetVmRequest(vm_id=vm_id)).labels) == labels


def test_list_vms_pages_follow_their_tokens(api: RunningDaemon) -> None:
    for vm_id in ("c", "a", "b"):
        api.create_vm(vm_id)
    seen, token = [], ""
    for _ in range(4):
        page = api.vms.ListVms(pb.ListVmsRequest(page_size=1, page_token=token))
        seen += [v.vm_id for v in page.vms]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["a", "b", "c"] and token == ""


def test_create_vm_bad_tss_address_releases_the_vm(api: RunningDaemon) -> None:
    options = pb.VmOptions(tss_address=(1 << 64) - 1)
    api.assert_code(lambda: api.vms.CreateVm(pb.CreateVmRequest(vm_id="t", options=options)),
                    INVALID)
    assert list(api.vms.ListVms(pb.ListVmsRequest()).vms) == []
    api.create_vm("t")  # the id was not left reserved
