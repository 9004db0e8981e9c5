"""Build hook: compile the cffi KVM binding.

`kvmd/kvm/_kvm_cffi*.so` is generated at build time (never committed) from
`kvmd/kvm/_build.py`. The gRPC stubs are not built here: they are the `kvmd_proto` package of
the kvmd-client distribution (clients/python), a dependency of this one.
"""

from __future__ import annotations

from setuptools import setup

setup(cffi_modules=["kvmd/kvm/_build.py:ffibuilder"])
