"""Parsing `[authorization]` (kvmd.api.auth.Policy.from_config): entries the daemon must
refuse at start rather than guess at, and the edge cases it accepts. A policy decides who
may do what, so an ambiguous one (a name twice, an empty name, a quota of `true`) is an
error, never a silent choice."""

from __future__ import annotations

from typing import Any

import pytest

from kvmd.api.auth import Authorizer, Policy


@pytest.mark.parametrize(("entries", "words"), [
    # One name, two grants: which applies would be an accident of order.
    ([{"name": "x", "role": "operator"}, {"name": "x", "role": "admin"}], "twice"),
    ([{"name": "", "role": "admin"}], "name"),
    ([{"name": "x", "role": "operator", "max_vms": True}], "max_vms"),  # a bool, not 1
    ([{"name": "x", "role": "operator", "max_vms": False}], "max_vms"),
    ([{"name": "x", "role": "operator", "vm_prefix": 5}], "vm_prefix"),
    ([{"name": "x", "role": "operator", "vm_prefix": ["a-"]}], "vm_prefix"),
])
def test_ambiguous_or_malformed_identities_are_refused(entries: list[dict[str, Any]],
                                                      words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Policy.from_config({"identities": entries})


def test_accepted_edge_cases() -> None:
    policy = Policy.from_config({"identities": [
        {"name": "a", "role": "operator", "max_vms": 0},  # 0: no quota
        {"name": "b", "role": "operator"},  # several identities without a prefix
        {"name": "c", "role": "viewer"},
    ]})
    assert policy.enabled
    assert (policy.grants["a"].max_vms, policy.grants["b"].vm_prefix) == (0, "")


def test_an_empty_identity_list_is_a_policy_that_grants_nothing() -> None:
    """`identities = []` enables authorization with no grants (every call but health and
    reflection denied); it must not fall back to "no policy", where every caller is an
    admin."""
    policy = Policy.from_config({"identities": []})
    assert policy.enabled and policy.grants == {}
    assert policy.grant_for(["local"]) is None
    # Only a missing (or empty) table means no policy.
    for table in (None, {}):
        assert not Policy.from_config(table).enabled


def test_who_is_privileged_and_who_sees_a_vm() -> None:
    """Authorizer.privileged (exempt from per-identity shares of host resources) and
    visible (listed by ListVms): without a policy every caller is an admin; with one, only
    admins are privileged, and an operator sees its own VMs only."""
    none = Authorizer(Policy(), host=None)  # type: ignore[arg-type]
    assert none.privileged("local") and none.privileged("anyone")
    assert none.visible("anyone", "someone-else")
    policy = Policy.from_config({"identities": [
        {"name": "adm", "role": "admin"}, {"name": "op", "role": "operator"},
        {"name": "view", "role": "viewer"}]})
    authz = Authorizer(policy, host=None)  # type: ignore[arg-type]
    assert [authz.privileged(n) for n in ("adm", "op", "view", "stranger")] == \
        [True, False, False, False]
    assert [authz.visible(n, "adm") for n in ("adm", "op", "view", "stranger")] == \
        [True, False, True, False]
    assert authz.visible("op", "op")
