"""What GetInfo reports of the descriptor limits: the limits that apply, so a per-identity
share configured above max_fds shows as max_fds."""

from __future__ import annotations

from api_support import DaemonFactory

from kvmd_proto import vmm_pb2 as pb


def test_a_per_identity_share_above_max_fds_is_reported_as_max_fds(
        daemon_factory: DaemonFactory) -> None:
    """max_fds_per_identity larger than max_fds cannot apply: GetInfo reports it as
    max_fds (what the budget enforces), never the larger configured value."""
    api = daemon_factory(max_fds=100, max_fds_per_identity=1000)
    limits = api.hypervisor.GetInfo(pb.GetInfoRequest()).limits
    assert (limits.max_fds, limits.max_fds_per_identity) == (100, 100)
    assert api.daemon.host is not None
    assert api.daemon.host.fds.per_identity == 100
