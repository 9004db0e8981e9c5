"""Prometheus metrics for kvmd."""
