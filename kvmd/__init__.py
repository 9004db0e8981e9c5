"""kvmd: a gRPC control plane for Linux KVM."""

import os

# grpc core reads these once, when it starts, and kvmd imports grpc after this: core logs
# errors only (GRPC_VERBOSITY), and traces nothing (GRPC_TRACE), unless the environment
# asks for more. The daemon relays what core prints in its own format (kvmd.logs).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
os.environ.setdefault("GRPC_TRACE", "")

__version__ = "0.1.0"
