"""Fixtures of the migration tests; helpers live in migration_support."""

from migration_support import host_pair, hosts, pki

__all__ = ["host_pair", "hosts", "pki"]
