"""Fixtures of the migration tests; helpers live in migration_support."""

from migration_support import hosts, pki

__all__ = ["hosts", "pki"]
