"""Build hook of kvmd-client: generate the ``kvmd_proto`` package from the .proto files.

The stubs are generated at build time (never committed) with grpcio-tools, a build-time
dependency only: the wheel holds plain Python (``py3-none-any``). The .proto files come from
the repository's ``proto/`` (two levels up) when building from a checkout, or from ``proto/``
next to this file when building from an sdist, which carries a copy of them.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

from setuptools import setup
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "kvmd_proto"


def proto_dir() -> str:
    """Where the .proto files are: the sdist's own copy first, else the repository's."""
    for candidate in (os.path.join(HERE, "proto"), os.path.join(HERE, "..", "..", "proto")):
        if os.path.isfile(os.path.join(candidate, "vmm.proto")):
            return os.path.normpath(candidate)
    sys.exit("kvmd-client: proto/vmm.proto not found (build from a kvmd checkout or sdist)")


def protos(directory: str) -> list[str]:
    """The .proto files of ``directory`` (not of its subdirectories), sorted."""
    return sorted(f for f in os.listdir(directory) if f.endswith(".proto"))


def generate_protos() -> None:
    """Run grpc_tools.protoc over the .proto files into kvmd_proto/ (a package of its own)."""
    import grpc_tools
    from grpc_tools import protoc

    source = proto_dir()
    names = protos(source)
    out = os.path.join(HERE, PACKAGE)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "__init__.py"), "w") as f:
        f.write('"""kvmd.v1 protobuf and gRPC stubs, generated from proto/ at build time; '
                'do not edit."""\n')
    # PEP 561: type checkers use the generated vmm_pb2.pyi of the installed package.
    with open(os.path.join(out, "py.typed"), "w"):
        pass
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = [
        "protoc",
        f"-I{source}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[os.path.join(source, p) for p in names],
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    # protoc emits absolute imports ("import vmm_pb2"); make them package-relative.
    for name in os.listdir(out):
        if name.endswith("_grpc.py"):
            path = os.path.join(out, name)
            with open(path) as f:
                text = f.read()
            for p in names:
                mod = p[: -len(".proto")] + "_pb2"
                text = text.replace(f"import {mod} as", f"from . import {mod} as")
            with open(path, "w") as f:
                f.write(text)


class SdistWithProtos(sdist):
    """An sdist that carries the .proto files (they live outside this directory in the
    repository, where MANIFEST.in cannot reach), so a wheel builds from the sdist alone."""

    def make_release_tree(self, base_dir: str, files: Any) -> None:
        super().make_release_tree(base_dir, files)
        source = proto_dir()
        os.makedirs(os.path.join(base_dir, "proto"), exist_ok=True)
        for name in protos(source):
            shutil.copyfile(os.path.join(source, name), os.path.join(base_dir, "proto", name))


generate_protos()
setup(cmdclass={"sdist": SdistWithProtos})
