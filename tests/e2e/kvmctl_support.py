"""Running kvmctl from the e2e tests: in-process (the `kvmctl` fixture) or as the installed
console script (`kvmctl_command`). A uniquely named module, so no other test directory's
conftest shadows it."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from kvmd_client.kvmctl import main


@dataclass
class Result:
    """One kvmctl run: exit code and captured output."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        """stdout parsed as JSON (fails the test if it is not valid JSON)."""
        return json.loads(self.out)


Kvmctl = Callable[..., Result]


@pytest.fixture
def kvmctl(address: str, capsys: pytest.CaptureFixture[str]) -> Kvmctl:
    """Run kvmctl in-process against the session daemon."""

    def run(*args: str) -> Result:
        capsys.readouterr()  # drop anything printed before
        code = main(["--address", address, *args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def ok(result: Result) -> Result:
    """Assert success (showing stderr otherwise) and pass the result on."""
    assert result.code == 0, f"exit {result.code}: {result.err}"
    assert result.err == ""
    return result


def kvmctl_command(*args: str) -> list[str]:
    """The installed kvmctl console script next to this interpreter."""
    script = os.path.join(os.path.dirname(sys.executable), "kvmctl")
    if os.path.exists(script):
        return [script, *args]
    return [sys.executable, "-m", "kvmd_client.kvmctl", *args]
