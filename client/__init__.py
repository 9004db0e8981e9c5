"""The kvmd Python client library and the kvmctl CLI."""
