"""MigrationOptions (kvmd.migration.precopy) at the edges of their documented ranges: the
last value each range allows is taken, the next one is INVALID_ARGUMENT naming its field,
and 0 means the default."""

from __future__ import annotations

import pytest

from kvmd.core.errors import InvalidArgument, Reason
from kvmd.migration.precopy import (
    DEFAULT_MAX_DOWNTIME_MS,
    DEFAULT_MAX_ROUNDS,
    DEFAULT_TIMEOUT_MS,
    MAX_ROUNDS_LIMIT,
    MigrationOptions,
)

EDGES = [  # (field, the last value allowed, the first refused)
    ("max_downtime_ms", 60_000, 60_001),
    ("max_rounds", MAX_ROUNDS_LIMIT, MAX_ROUNDS_LIMIT + 1),
    ("timeout_ms", 600_000, 600_001),
    ("bandwidth_bytes_per_second", 64 * 1024, 64 * 1024 - 1),
]


@pytest.mark.parametrize(("field", "allowed", "refused"), EDGES, ids=[e[0] for e in EDGES])
def test_each_range_ends_where_documented(field: str, allowed: int, refused: int) -> None:
    assert getattr(MigrationOptions(**{field: allowed}).validated(), field) == allowed
    for bad in (refused, -1):
        with pytest.raises(InvalidArgument) as err:
            MigrationOptions(**{field: bad}).validated()
        assert err.value.reason == Reason.VALUE_OUT_OF_RANGE
        assert err.value.field == f"options.{field}"


def test_zero_means_the_default() -> None:
    options = MigrationOptions().validated()
    assert (options.max_downtime_ms, options.max_rounds, options.timeout_ms,
            options.bandwidth_bytes_per_second) == (
        DEFAULT_MAX_DOWNTIME_MS, DEFAULT_MAX_ROUNDS, DEFAULT_TIMEOUT_MS, 0)
    assert MigrationOptions(max_rounds=1, max_downtime_ms=10, timeout_ms=1).validated() == \
        MigrationOptions(max_rounds=1, max_downtime_ms=10, timeout_ms=1)
