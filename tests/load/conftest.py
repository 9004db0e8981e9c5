"""The load tests run the daemon as a separate process: they need real KVM."""

from __future__ import annotations

import os

import pytest

if not os.path.exists("/dev/kvm"):
    pytest.skip("/dev/kvm is absent: the load tests need real KVM", allow_module_level=True)
