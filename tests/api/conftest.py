"""Fixtures of the API tests; the helpers live in api_support (a uniquely named module, so
test files of other directories' conftests never shadow it)."""

from api_support import api, assert_code, daemon_factory

__all__ = ["api", "assert_code", "daemon_factory"]
