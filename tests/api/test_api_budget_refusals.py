"""A call or stream the budget refuses (kvmd.api.budget.Budget) leaves nothing behind: no
count and no per-identity entry, or the table would grow with every identity ever refused
(every "peer:<host>" refused a health Watch stream, say), not only with those holding
something open."""

from __future__ import annotations

import pytest

from kvmd.api.budget import Budget
from kvmd.core.errors import ResourceExhausted


@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_caller_leaves_no_entry(stream: bool) -> None:
    budget = Budget(max_calls=2, max_calls_per_identity=1, max_streams=2,
                    max_streams_per_identity=1)
    budget.take("holder", False, stream)  # the non-admins' whole share (2 - reserve 1)
    for i in range(100):
        with pytest.raises(ResourceExhausted):
            budget.take(f"peer:10.0.{i}.1", False, stream)
    with pytest.raises(ResourceExhausted):
        budget.take("holder", False, stream)  # its per-identity limit
    assert set(budget._usage) == {"holder"}  # internal, but it is the leak at stake
    budget.give("holder", False, stream)
    assert budget._usage == {}
    assert (budget.calls, budget.streams, budget.non_admin_calls, budget.non_admin_streams) \
        == (0, 0, 0, 0)
