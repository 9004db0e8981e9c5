"""The non-admin counts of kvmd.api.budget.Budget are the non-admins' alone: an admin's calls
and streams, however many come and go, neither use up nor free the share non-admin callers
have (max minus the admins' reserve), and every count is back to zero once all ended."""

from __future__ import annotations

import pytest

from kvmd.api.budget import Budget
from kvmd.core.errors import ResourceExhausted


@pytest.mark.parametrize("stream", [False, True])
def test_admin_traffic_leaves_the_non_admin_share_as_it_was(stream: bool) -> None:
    budget = Budget(max_calls=8, max_calls_per_identity=100, max_streams=8,
                    max_streams_per_identity=100)
    share = 8 - 1  # the reserve of 8 is 1

    def fill_share() -> None:
        for i in range(share):
            budget.take(f"op-{i}", False, stream)
        with pytest.raises(ResourceExhausted):
            budget.take("op-x", False, stream)
        for i in range(share):
            budget.give(f"op-{i}", False, stream)

    for _ in range(3):  # an admin's traffic comes and goes
        budget.take("admin", True, stream)
        budget.take("admin", True, stream)
        budget.give("admin", True, stream)
        budget.give("admin", True, stream)
    fill_share()  # exactly the share, neither less (a leak) nor more (a credit)
    # And while an admin holds one, the non-admins' share is unchanged.
    budget.take("admin", True, stream)
    fill_share()
    budget.give("admin", True, stream)
    assert (budget.calls, budget.streams, budget.non_admin_calls, budget.non_admin_streams) \
        == (0, 0, 0, 0)


def test_only_an_admin_grant_draws_on_the_reserve() -> None:
    """The budget stage takes the caller as AuthInterceptor left it: a caller without a
    grant (an unidentified peer on health, a certificate with no role presenting a
    migration token) is no admin, nor is an operator or a viewer."""
    import contextvars

    from kvmd.api.auth import Grant, current_grant, current_identity
    from kvmd.api.budget import BudgetInterceptor

    def token(grant: Grant | None, kind: str) -> tuple[str, bool, bool]:
        def enter() -> tuple[str, bool, bool]:
            current_identity.set("who")
            current_grant.set(grant)
            stage = BudgetInterceptor(Budget(8, 8, 8, 8))
            return stage.enter("/m", kind, None, None)
        return contextvars.copy_context().run(enter)

    assert token(None, "unary_stream") == ("who", False, True)
    assert token(Grant("who", "viewer"), "unary_unary") == ("who", False, False)
    assert token(Grant("who", "operator"), "stream_unary") == ("who", False, True)
    assert token(Grant("who", "admin"), "stream_stream") == ("who", True, True)
