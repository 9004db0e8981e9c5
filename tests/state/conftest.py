"""Fixtures of the state tests (snapshot and restore); helpers live in state_support."""

from state_support import node, node_factory, other_process

__all__ = ["node", "node_factory", "other_process"]
