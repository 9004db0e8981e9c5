"""Which hosts a saved state may be restored on (kvmd.state.snapshot.check_host): the XSAVE
image size must match unless the saving host had none, and a VM that uses an in-kernel
irqchip or PIT needs the capability on the target."""

from __future__ import annotations

import pytest

from kvmd.core.errors import InvalidState, Reason
from kvmd.core.state import VmState
from kvmd.state.snapshot import LEGACY_XSAVE_BYTES, check_host, xsave_size
from kvmd_proto import vmm_pb2 as pb

XSAVE2 = 2 * LEGACY_XSAVE_BYTES
CAPS = {"KVM_CAP_XSAVE": 1, "KVM_CAP_XSAVE2": XSAVE2, "KVM_CAP_IRQCHIP": 1, "KVM_CAP_PIT2": 1}


def state(**options: bool) -> VmState:
    return VmState(vm_id="a", labels={}, owner="o", options=dict(options))


def test_xsave_size_of_a_host() -> None:
    assert xsave_size({}) == 0  # no KVM_CAP_XSAVE: no XSAVE image at all
    assert xsave_size({"KVM_CAP_XSAVE": 1}) == LEGACY_XSAVE_BYTES  # no XSAVE2: legacy size
    assert xsave_size({"KVM_CAP_XSAVE": 1, "KVM_CAP_XSAVE2": 1024}) == LEGACY_XSAVE_BYTES
    assert xsave_size(CAPS) == XSAVE2


def test_the_xsave_size_must_match_unless_the_saving_host_had_none() -> None:
    check_host(pb.HostFeatures(xsave_size=XSAVE2), state(), CAPS)
    check_host(pb.HostFeatures(xsave_size=0), state(), CAPS)  # saved without XSAVE
    with pytest.raises(InvalidState, match="XSAVE") as err:
        check_host(pb.HostFeatures(xsave_size=LEGACY_XSAVE_BYTES), state(), CAPS)
    assert err.value.reason == Reason.SNAPSHOT_INCOMPATIBLE


@pytest.mark.parametrize(("option", "cap"), [("irqchip", "KVM_CAP_IRQCHIP"),
                                             ("pit", "KVM_CAP_PIT2")])
def test_an_in_kernel_device_needs_its_capability_on_the_target(option: str, cap: str) -> None:
    lacking = {k: v for k, v in CAPS.items() if k != cap}
    with pytest.raises(InvalidState, match=f"in-kernel {option}.*{cap}") as err:
        check_host(pb.HostFeatures(), state(**{option: True}), lacking)
    assert err.value.reason == Reason.SNAPSHOT_INCOMPATIBLE
    check_host(pb.HostFeatures(), state(**{option: True}), CAPS)
    check_host(pb.HostFeatures(), state(**{option: False}), lacking)  # not used: fine
