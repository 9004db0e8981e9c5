"""A max_downtime_ms no switch-over can meet (below the fixed overhead the estimate always
adds) is refused up front, instead of failing after max_rounds rounds even for a VM with
nothing dirty."""

from __future__ import annotations

import pytest

from kvmd.core.errors import InvalidArgument, Reason
from kvmd.migration.precopy import SWITCH_OVER_OVERHEAD_S, MigrationOptions


def test_a_downtime_below_the_switch_over_overhead_is_refused() -> None:
    floor = SWITCH_OVER_OVERHEAD_S * 1000
    for ms in range(1, 61):
        options = MigrationOptions(max_downtime_ms=ms)
        if ms < floor:
            with pytest.raises(InvalidArgument) as err:
                options.validated()
            assert err.value.reason == Reason.VALUE_OUT_OF_RANGE
        else:
            assert options.validated().max_downtime_ms == ms
