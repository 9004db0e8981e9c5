"""The client's conversions between messages and plain values (kvmd_client._convert), as its
docstrings promise them: `message_to_dict` for `kvmctl --json` and `merge_into`/`coerce`
for partial updates (`set_regs(vm, 0, rip=0x1000)`), `unflatten` for kvmctl's dotted keys.
No daemon: these run on the messages alone."""

from __future__ import annotations

import pytest

from kvmd_client._convert import coerce, merge_into, message_to_dict, unflatten
from kvmd_proto import vmm_pb2 as pb

U64_MAX = (1 << 64) - 1


def test_every_field_is_present_with_integers_kept_and_enums_named() -> None:
    ioevent = pb.Ioevent(vm_id="v", space=pb.MMIO, address=U64_MAX, length=4)
    assert message_to_dict(ioevent) == {
        "vm_id": "v", "ioevent_id": "", "space": "MMIO", "address": U64_MAX, "length": 4,
        "datamatch": None, "fired": 0}


def test_an_optional_scalar_set_to_zero_is_zero_not_none() -> None:
    assert message_to_dict(pb.Ioevent(datamatch=0))["datamatch"] == 0


def test_an_enum_number_without_a_name_stays_a_number() -> None:
    assert message_to_dict(pb.Ioevent(space=7))["space"] == 7


def test_bytes_become_lowercase_hex() -> None:
    assert message_to_dict(pb.ConsoleOutput(data=b"\x01\xAB"))["data"] == "01ab"


def test_only_the_set_member_of_a_oneof_is_present() -> None:
    route = pb.IrqRoute(gsi=5, msi=pb.MsiMessage(address=0xFEE00000, data=0x41))
    assert message_to_dict(route) == {
        "gsi": 5, "msi": {"address": 0xFEE00000, "data": 0x41, "devid": None}}
    assert "msi" not in message_to_dict(pb.IrqRoute(gsi=5))
    # Scalar members too: left out, not None as an unset optional is.
    assert message_to_dict(pb.CheckExtensionRequest(number=5)) == {"number": 5, "vm_id": ""}


def test_maps_and_repeated_fields_of_scalars_and_messages() -> None:
    stats = pb.ExitStats(vm_id="v", total={"hlt": 3},
                         vcpus={0: pb.ExitCounts(counts={"io": 1})})
    assert message_to_dict(stats) == {"vm_id": "v", "total": {"hlt": 3},
                                      "vcpus": {0: {"counts": {"io": 1}}}}
    sregs = message_to_dict(pb.Sregs(interrupt_bitmap=[1, 2]))
    assert sregs["interrupt_bitmap"] == [1, 2] and sregs["cs"]["base"] == 0
    routing = pb.SetGsiRoutingRequest(routes=[pb.IrqRoute(gsi=1), pb.IrqRoute(gsi=2)])
    assert message_to_dict(routing)["routes"] == [{"gsi": 1}, {"gsi": 2}]


def test_an_unknown_key_is_refused_naming_the_fields() -> None:
    with pytest.raises(ValueError, match=r"IrqChipPin has no field 'pins' .*chip, pin"):
        merge_into(pb.IrqChipPin(), {"pins": 1})


@pytest.mark.parametrize(("given", "chip"), [
    ("pic-slave", pb.IrqChipPin.PIC_SLAVE), (" ioapic ", pb.IrqChipPin.IOAPIC),
    ("PIC_MASTER", pb.IrqChipPin.PIC_MASTER), (2, pb.IrqChipPin.IOAPIC),
])
def test_enums_take_a_name_in_any_case_or_a_number(given: object, chip: int) -> None:
    assert merge_into(pb.IrqChipPin(chip=pb.IrqChipPin.PIC_SLAVE), {"chip": given}).chip == chip


def test_an_unknown_enum_name_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"IrqChipPin.chip: unknown value 'apic' \(choose "
                                         r"from PIC_MASTER, PIC_SLAVE, IOAPIC\)"):
        merge_into(pb.IrqChipPin(), {"chip": "apic"})


@pytest.mark.parametrize("given", ["01ab", b"\x01\xab", bytearray(b"\x01\xab")])
def test_bytes_take_bytes_or_hex(given: object) -> None:
    assert merge_into(pb.ConsoleOutput(), {"data": given}).data == b"\x01\xab"


@pytest.mark.parametrize(("given", "value"), [("0x10", 16), ("0o10", 8), ("0b10", 2),
                                               ("10", 10), (12, 12)])
def test_integers_take_ints_or_strings_in_any_base(given: object, value: int) -> None:
    assert merge_into(pb.Segment(), {"base": given}).base == value


@pytest.mark.parametrize("given", [True, 1.0, [1]])
def test_integers_refuse_other_types(given: object) -> None:
    with pytest.raises(TypeError, match=r"Segment.limit takes an integer, not "):
        merge_into(pb.Segment(), {"limit": given})


def test_booleans_take_truthiness() -> None:
    assert merge_into(pb.SetIrqLineRequest(), {"active": 1}).active is True
    assert merge_into(pb.SetIrqLineRequest(active=True), {"active": 0}).active is False


def test_a_nested_mapping_merges_into_what_is_there() -> None:
    sregs = pb.Sregs(cs=pb.Segment(base=5, limit=7))
    merge_into(sregs, {"cs": {"limit": 9}, "cr0": "0x11"})
    assert (sregs.cs.base, sregs.cs.limit, sregs.cr0) == (5, 9, 0x11)


def test_a_nested_message_is_copied_and_none_clears_it() -> None:
    segment = pb.Segment(base=3)
    sregs = merge_into(pb.Sregs(cs=pb.Segment(limit=7)), {"cs": segment})
    assert sregs.cs == segment and sregs.cs is not segment
    assert not merge_into(sregs, {"cs": None}).HasField("cs")


def test_an_empty_mapping_selects_a_oneof_member() -> None:
    route = merge_into(pb.IrqRoute(irqchip=pb.IrqChipPin(pin=3)), {"msi": {}})
    assert route.WhichOneof("target") == "msi"


def test_a_nested_field_refuses_a_scalar() -> None:
    with pytest.raises(TypeError, match=r"Sregs\.cs takes a mapping or a Segment, not int"):
        merge_into(pb.Sregs(), {"cs": 1})


def test_repeated_fields_are_replaced_whole() -> None:
    routing = pb.SetGsiRoutingRequest(routes=[pb.IrqRoute(gsi=9)])
    merge_into(routing, {"routes": [{"gsi": 1, "msi": {"data": 2}}, pb.IrqRoute(gsi=3)]})
    assert [r.gsi for r in routing.routes] == [1, 3] and routing.routes[0].msi.data == 2
    sregs = merge_into(pb.Sregs(interrupt_bitmap=[7, 7, 7]), {"interrupt_bitmap": ["0x1", 2]})
    assert list(sregs.interrupt_bitmap) == [1, 2]
    assert list(merge_into(sregs, {"interrupt_bitmap": None}).interrupt_bitmap) == []


@pytest.mark.parametrize("given", ["12", b"12", {"gsi": 1}])
def test_repeated_fields_refuse_a_string_bytes_or_a_mapping(given: object) -> None:
    with pytest.raises(TypeError, match="expected a sequence"):
        merge_into(pb.SetGsiRoutingRequest(), {"routes": given})


def test_maps_are_replaced_whole() -> None:
    request = pb.CreateVmRequest(labels={"a": "1"})
    assert dict(merge_into(request, {"labels": {"b": "2"}}).labels) == {"b": "2"}
    stats = pb.ExitStats(vcpus={5: pb.ExitCounts(counts={"old": 1})})
    merge_into(stats, {"vcpus": {0: {"counts": {"io": 1}}, 1: pb.ExitCounts(counts={"hlt": 2})}})
    assert {k: dict(v.counts) for k, v in stats.vcpus.items()} == {0: {"io": 1},
                                                                   1: {"hlt": 2}}
    assert dict(merge_into(stats, {"total": {"hlt": "0x3"}}).total) == {"hlt": 3}


def test_none_clears_an_optional_scalar() -> None:
    ioevent = pb.Ioevent(datamatch=5)
    assert not merge_into(ioevent, {"datamatch": None}).HasField("datamatch")


def test_coerce_builds_from_a_message_a_mapping_or_nothing_then_applies_fields() -> None:
    pin = pb.IrqChipPin(chip=pb.IrqChipPin.IOAPIC, pin=4)
    built = coerce(pb.IrqChipPin, pin, pin=5)
    assert (built.chip, built.pin, pin.pin) == (pb.IrqChipPin.IOAPIC, 5, 4)  # a copy
    assert coerce(pb.IrqChipPin, {"chip": "pic-slave", "pin": 1}, pin=2) == pb.IrqChipPin(
        chip=pb.IrqChipPin.PIC_SLAVE, pin=2)
    assert coerce(pb.IrqChipPin, None) == pb.IrqChipPin()
    with pytest.raises(TypeError, match="expected IrqChipPin, not MsiMessage"):
        coerce(pb.IrqChipPin, pb.MsiMessage())


def test_unflatten_nests_dotted_keys() -> None:
    assert unflatten({"cs.base": 0, "cs.limit": 1, "rip": 2, "gdt.base": 3}) == {
        "cs": {"base": 0, "limit": 1}, "rip": 2, "gdt": {"base": 3}}


@pytest.mark.parametrize(("assignments", "says"), [
    ({"cs": 1, "cs.base": 0}, "'cs' is both a value and a message"),
    ({"cs.base": 0, "cs": 1}, r"'cs': is a message, assign its fields \(cs.FIELD=...\)"),
])
def test_unflatten_refuses_a_key_that_is_both_value_and_message(
        assignments: dict[str, int], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        unflatten(assignments)
