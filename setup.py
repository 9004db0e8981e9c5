"""Build hooks: compile the cffi KVM binding and generate gRPC code from proto/.

Both outputs are generated at build time (never committed): `kvmd/kvm/_kvm_cffi*.so` from
`kvmd/kvm/_build.py`, and `kvmd/api/gen/` from `proto/*.proto`.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def generate_protos() -> None:
    """Run grpc_tools.protoc over proto/ into kvmd/api/gen (a package of its own)."""
    proto_dir = os.path.join(HERE, "proto")
    protos = sorted(f for f in os.listdir(proto_dir) if f.endswith(".proto"))
    if not protos:
        return
    import grpc_tools
    from grpc_tools import protoc

    out = os.path.join(HERE, "kvmd", "api", "gen")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "__init__.py"), "w") as f:
        f.write('"""Generated from proto/ at build time; do not edit."""\n')
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = [
        "protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[os.path.join(proto_dir, p) for p in protos],
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    # protoc emits absolute imports ("import vmm_pb2"); make them package-relative.
    for name in os.listdir(out):
        if name.endswith("_grpc.py"):
            path = os.path.join(out, name)
            with open(path) as f:
                text = f.read()
            for p in protos:
                mod = p[: -len(".proto")] + "_pb2"
                text = text.replace(f"import {mod} as", f"from . import {mod} as")
            with open(path, "w") as f:
                f.write(text)


generate_protos()
setup(cffi_modules=["kvmd/kvm/_build.py:ffibuilder"])
