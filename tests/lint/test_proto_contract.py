"""The contract's guards: buf lint and buf breaking (buf.yaml, Makefile target ``proto``).

``make test`` runs both on the repository; these tests show that they can fail: on a copy
of the repository's buf workspace, an undocumented field fails the lint, and a renamed field,
a renumbered one or a removed RPC fails the breaking-change check against the released
baseline. buf is the one the Makefile installs from npm (node_modules/.bin/buf).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUF = REPO / "node_modules" / ".bin" / "buf"
RELEASED = REPO / "proto-released"
BUF_TIMEOUT = 120


def _baseline() -> str:
    """PROTO_BASELINE of the Makefile (the last released proto)."""
    match = re.search(r"^PROTO_BASELINE := (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert match, "the Makefile sets no PROTO_BASELINE"
    return match.group(1)


def buf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if not BUF.exists():
        pytest.fail(f"{BUF} is missing: `make pytest` (or `make proto`) installs it with npm")
    return subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=BUF_TIMEOUT, check=False)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A copy of the repository's buf workspace: buf.yaml, proto/ and proto-released/."""
    shutil.copy(REPO / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(REPO / "proto", tmp_path / "proto")
    shutil.copytree(RELEASED, tmp_path / "proto-released")
    return tmp_path


def _edit(workspace: Path, old: str, new: str) -> None:
    path = workspace / "proto" / "vmm.proto"
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def test_the_contract_passes_lint() -> None:
    result = buf("lint", cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_contract_keeps_the_released_one() -> None:
    result = buf("breaking", "--against", _baseline(), cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_baseline_is_the_last_release() -> None:
    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in path.name.removeprefix("v").split("."))

    releases = sorted((p for p in RELEASED.iterdir() if p.is_dir()), key=version)
    assert releases, "proto-released/ holds no release"
    assert _baseline() == f"proto-released/{releases[-1].name}"
    assert (releases[-1] / "vmm.proto").is_file()


def test_lint_refuses_an_undocumented_field(workspace: Path) -> None:
    _edit(workspace, "  // The VM to watch.\n  string vm_id = 1;\n  // First send",
          "  string vm_id = 1;\n  // First send")
    result = buf("lint", cwd=workspace)
    assert result.returncode != 0
    assert 'Field "vm_id" should have a non-empty comment' in result.stdout, result.stdout


def test_lint_refuses_a_trailing_comment_only(workspace: Path) -> None:
    _edit(workspace, "  // The VM to watch.\n  string vm_id = 1;\n  // First send",
          "  string vm_id = 1;  // the VM to watch\n  // First send")
    result = buf("lint", cwd=workspace)
    assert result.returncode != 0, "buf took a trailing comment for documentation"


@pytest.mark.parametrize(("old", "new", "complaint"), [
    ("  bool include_current = 2;", "  bool include_current_state = 2;", "changed name"),
    ("  bool include_current = 2;", "  bool include_current = 9;", "deleted"),
    ("  // The guest's COM1 output: the buffered backlog first (if asked), then live bytes.\n"
     "  rpc StreamConsole(StreamConsoleRequest) returns (stream ConsoleOutput);\n", "",
     "StreamConsole"),
], ids=["renamed-field", "renumbered-field", "removed-rpc"])
def test_breaking_refuses_an_incompatible_change(workspace: Path, old: str, new: str,
                                                 complaint: str) -> None:
    _edit(workspace, old, new)
    result = buf("breaking", "--against", _baseline(), cwd=workspace)
    assert result.returncode != 0
    assert complaint in result.stdout, result.stdout


def test_breaking_allows_an_added_field(workspace: Path) -> None:
    _edit(workspace, "  bool include_current = 2;\n",
          "  bool include_current = 2;\n  // A new field.\n  bool also = 3;\n")
    result = buf("breaking", "--against", _baseline(), cwd=workspace)
    assert result.returncode == 0, result.stdout + result.stderr
