"""kvmd: a gRPC control plane for Linux KVM."""

__version__ = "0.1.0"
