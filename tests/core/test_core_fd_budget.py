"""The descriptor budget's bookkeeping (kvmd.core.fds and the Host that makes one): what it
counts as already open, the per-identity share it is given, what each refusal names, and
that giving back never frees more than an account holds."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kvmd.core.errors import Reason, ResourceExhausted
from kvmd.core.fds import UNLIMITED, FdBudget, nofile_limit, open_fds, reserve
from kvmd.core.host import Host
from kvmd.core.limits import Limits
from kvmd.core.vm import VmOptions


def _live_fds() -> int:
    """Descriptors open now, counted without opening one (fstat of each listed number)."""
    listed = [int(name) for name in os.listdir("/proc/self/fd")]
    live = 0
    for fd in listed:  # the listing's own descriptor is closed by now
        try:
            os.fstat(fd)
            live += 1
        except OSError:
            pass
    return live


@pytest.fixture
def extra_fds() -> Iterator[int]:
    """200 more descriptors open in this process for the test's duration."""
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(200)]
    try:
        yield len(fds)
    finally:
        for fd in fds:
            os.close(fd)


def test_open_fds_counts_exactly_what_is_open() -> None:
    """open_fds() is the number of descriptors the process holds: the one the listing of
    /proc/self/fd uses itself is not counted."""
    assert open_fds() == _live_fds()


def test_max_fds_leaves_out_what_is_already_open(extra_fds: int) -> None:
    """A Host never budgets descriptors that are already open: with 200 extra open, the
    budget is at most RLIMIT_NOFILE less what was open and the reserve (Host's own few
    opened since come off too), however high max_fds asks."""
    nofile, before = nofile_limit(), open_fds()
    host = Host(Limits(max_vms=4, max_fds=UNLIMITED, max_fds_per_identity=UNLIMITED))
    try:
        allowed = nofile - before - reserve(nofile)
        assert allowed - 64 <= host.fds.limit <= allowed
        assert host.limits.max_fds == host.fds.limit
    finally:
        host.close()


def test_the_host_enforces_max_fds_per_identity() -> None:
    """The per-identity share configured (max_fds_per_identity) is the Host's budget's:
    an owner at its share is refused (LIMIT_FDS, naming max_fds_per_identity) while another
    owner still gets descriptors."""
    host = Host(Limits(max_vms=4, max_fds=1000, max_fds_per_identity=6))
    try:
        host.create_vm("a1", {}, VmOptions(), owner="a")
        host.create_vm("a2", {}, VmOptions(), owner="a")  # 2 x 3 descriptors: a's share
        with pytest.raises(ResourceExhausted) as err:
            host.create_vm("a3", {}, VmOptions(), owner="a")
        assert err.value.reason == Reason.LIMIT_FDS
        assert err.value.metadata["limit"] == "max_fds_per_identity"
        host.create_vm("b1", {}, VmOptions(), owner="b")
        assert host.fds.held_by("a") == 6 and host.fds.held_by("b") == 3
        assert [v.id for v in host.list_vms()] == ["a1", "a2", "b1"]
    finally:
        host.close()


def test_each_refusal_names_the_limit_it_hit() -> None:
    """A refusal's ErrorInfo metadata names the limit that refused: max_fds_per_identity
    for an owner at its share, max_fds (the whole budget) for the admins' reserve and for a
    full budget; all with reason LIMIT_FDS."""
    budget = FdBudget(80, 30, privileged=lambda owner: owner == "admin")
    a = budget.account("a", 30)
    with pytest.raises(ResourceExhausted) as share:
        a.take(1)
    budget.account("b", 30)
    c = budget.account("c", 10)
    with pytest.raises(ResourceExhausted) as reserve:
        c.take(1)  # the last eighth (10) is the admins'
    admin = budget.account("admin", 10)
    with pytest.raises(ResourceExhausted) as full:
        admin.take(1)
    assert [e.value.reason for e in (share, reserve, full)] == [Reason.LIMIT_FDS] * 3
    assert share.value.metadata == {"limit": "max_fds_per_identity", "limit_value": "30"}
    assert reserve.value.metadata == {"limit": "max_fds", "limit_value": "80"}
    assert full.value.metadata == {"limit": "max_fds", "limit_value": "80"}
    assert budget.in_use == 80


def test_a_late_give_back_frees_nothing_more() -> None:
    """give() after the account was closed (an object released after its VM went) returns
    nothing it no longer holds: the budget's count stays right and the limit holds."""
    budget = FdBudget(10, 10, privileged=lambda owner: True)
    a = budget.account("a", 10)
    a.close()
    a.give(4)
    a.close()
    assert (budget.in_use, budget.held_by("a"), a.held) == (0, 0, 0)
    b = budget.account("b", 10)
    with pytest.raises(ResourceExhausted):
        b.take(1)
    assert budget.in_use == 10
