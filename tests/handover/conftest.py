"""Fixtures of the hand-over tests; helpers live in handover_support."""

from handover_support import fake_systemd, reap_daemons

__all__ = ["fake_systemd", "reap_daemons"]
