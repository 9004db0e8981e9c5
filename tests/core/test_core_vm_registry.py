"""The Host's VM registry: a creation that fails gives back what it charged, a delete aimed
at one VM object never removes another made under the same id since, and the labels' room
in an answer is measured to the byte."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kvmd.core.errors import InvalidArgument, NotFound, Reason
from kvmd.core.host import VCPU_STATE_BYTES, VM_ANSWER_OVERHEAD, Host
from kvmd.core.limits import Limits
from kvmd.core.vm import VmOptions

ROOM = 100  # bytes of labels an answer about a VM has room for, in `small` below


@pytest.fixture
def small() -> Iterator[Host]:
    """A Host whose max_message_bytes leaves labels exactly ROOM bytes."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is absent: the core tests drive real VMs")
    limits = Limits(max_vms=4, max_vcpus_per_vm=2,
                    max_message_bytes=VM_ANSWER_OVERHEAD + 2 * VCPU_STATE_BYTES + ROOM)
    h = Host(limits)
    yield h
    h.close()


def test_a_failed_creation_gives_its_descriptors_back(host: Host) -> None:
    """A VM that cannot be built (its options are refused after the VM's descriptors were
    charged) leaves the descriptor budget as it was: nothing stays charged to its owner."""
    before = host.fds.in_use
    with pytest.raises(InvalidArgument):
        host.create_vm("bad", {}, VmOptions(debug_exit_port=0x3F9), owner="o")  # inside COM1
    assert host.fds.in_use == before and host.fds.held_by("o") == 0
    assert host.vm_count() == 0


def test_a_delete_of_a_vm_that_is_gone_spares_its_successor(host: Host) -> None:
    """delete_vm(id, expected) deletes only that very VM object: once it was deleted and
    another made under its id, the stale delete is NotFound and the new VM stays."""
    old = host.create_vm("same", {}, VmOptions())
    host.delete_vm("same")
    new = host.create_vm("same", {"gen": "2"}, VmOptions())
    with pytest.raises(NotFound):
        host.delete_vm("same", old)
    assert host.get_vm("same") is new and new.labels == {"gen": "2"}
    host.delete_vm("same", new)
    assert host.vm_count() == 0


def test_labels_that_fill_the_answer_exactly_fit_and_one_byte_more_does_not(
        small: Host) -> None:
    """check_labels_fit: labels of exactly the room an answer leaves (key + value + 8 bytes
    each) are accepted; one byte more is INVALID_ARGUMENT (VALUE_OUT_OF_RANGE, labels)."""
    fits = {"k": "v" * (ROOM - 1 - 8)}
    small.create_vm("fits", fits, VmOptions())
    with pytest.raises(InvalidArgument) as err:
        small.create_vm("over", {"k": "v" * (ROOM - 8)}, VmOptions())
    assert err.value.reason == Reason.VALUE_OUT_OF_RANGE and err.value.field == "labels"
    assert [v.id for v in small.list_vms()] == ["fits"]


def test_an_id_being_made_is_owned_by_who_reserved_it(host: Host) -> None:
    """owner_of (what authorization asks for calls on an id) answers the reserver of an id
    whose VM is still being made (a restore, an incoming migration), the VM's owner once
    registered, and None once neither holds it."""
    host.reserve_id("incoming", "alice")
    try:
        assert host.owner_of("incoming") == "alice"
        assert host.owner_of("other") is None
    finally:
        host.release_id("incoming")
    assert host.owner_of("incoming") is None
    host.create_vm("made", {}, VmOptions(), owner="bob")
    assert host.owner_of("made") == "bob"
