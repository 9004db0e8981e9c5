"""The target's tokens (kvmd.migration.incoming) on a real Host, without gRPC: how many may
wait unused at once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmd.core.errors import Reason, ResourceExhausted
from kvmd.core.host import Host
from kvmd.core.limits import Limits
from kvmd.migration.incoming import MAX_PENDING, IncomingMigrations


@pytest.fixture
def incoming() -> Iterator[IncomingMigrations]:
    host = Host(Limits(max_vms=2 * MAX_PENDING))
    migrations = IncomingMigrations(host)
    try:
        yield migrations
    finally:
        migrations.close()
        host.close()


def test_at_most_max_pending_unused_tokens(incoming: IncomingMigrations) -> None:
    """MAX_PENDING (64) tokens may wait unused; one more is refused with its limit, and a
    cancelled one makes room again (max_vms, twice that here, is not what stops it)."""
    for i in range(MAX_PENDING):
        incoming.prepare(f"in-{i}", "local")
    with pytest.raises(ResourceExhausted) as err:
        incoming.prepare("one-more", "local")
    assert err.value.reason == Reason.LIMIT_MIGRATIONS
    assert incoming.cancel("in-0")
    incoming.prepare("one-more", "local")
