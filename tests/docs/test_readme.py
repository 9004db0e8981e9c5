"""The README's examples run in the test suite, exactly as printed: docs that cannot drift.

The convention (the README's Development section says it in short). A fenced block's info
string says what it is: the first word is the language, further words are flags.

* ```sh: shell commands, run one line at a time (`bash -e -o pipefail -c LINE`; a line
  ending in a backslash continues on the next; blank and `#` lines are skipped); each line
  must exit 0.
* ```console: a transcript. Each `$ COMMAND` line runs the same way and must exit 0; the
  lines after it, up to the next `$`, are its expected output (stdout and stderr together),
  compared line by line, trailing spaces ignored. In expected output a placeholder `<word>`
  (lowercase letters, digits, `-` or `_` in angle brackets: `demo-<id>`, `<ms> ms`) stands
  for any run of non-space characters: use it only for what varies (ids, timings).
* ```python: run as a script with this virtualenv's interpreter; must exit 0. If the very
  next block is ```output, that is the script's expected stdout (compared as above).
* ```toml: must parse.
* the flag `norun` (```sh norun): shown, never run. Only for what a test cannot do
  (`make run`, `sudo deploy/install.sh`, systemctl); keep those few.
* ```text, or no info string: prose (synopses, trees), never run. Any other language
  (```bash, ```py, ```shell) fails the suite: label it so that it runs, or `text`.

All blocks run in README order, in one scratch directory (a file one block writes, such as
guest.bin, is there for the next), against one kvmd process on a temporary socket started
here: `kvmctl` and `python3` come first from this virtualenv on PATH, `.venv/bin/...` resolves
to it too, and KVMD_ADDRESS names the test daemon. The default address
unix:///run/kvmd/kvmd.sock in a command or script is replaced by the test daemon's, and the
test daemon's address in output is shown as the default again. Selecting one block (-k) runs
the blocks before it first. New sections' examples are picked up by these rules alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from readme_doctest import (
    README,
    Block,
    DocDaemon,
    ReadmeRunner,
    convention_errors,
    matches,
    parse_blocks,
)

if not os.path.exists("/dev/kvm"):
    pytest.skip("/dev/kvm is absent: the README's examples need real KVM",
                allow_module_level=True)

BLOCKS = parse_blocks(README)
RUNNABLE = [b for b in BLOCKS if b.runs]


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReadmeRunner]:
    """One daemon and one scratch directory for every block of the README, in order."""
    daemon = DocDaemon(tmp_path_factory.mktemp("readme-kvmd"))
    try:
        yield ReadmeRunner(BLOCKS, tmp_path_factory.mktemp("readme"), daemon.address)
    finally:
        code = daemon.stop()
        assert code == 0, f"kvmd exited with {code}; log:\n{daemon.log()}"


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_readme_block(runner: ReadmeRunner, block: Block) -> None:
    outcome = runner.run_through(block)
    if outcome.failure is not None:
        pytest.fail(outcome.failure, pytrace=False)


def test_readme_follows_the_convention() -> None:
    assert convention_errors(BLOCKS) == []
    # The README has examples of every runnable kind, and only a few blocks are not run.
    assert {b.language for b in RUNNABLE} >= {"sh", "console", "python"}
    not_run = [b.where for b in BLOCKS if "norun" in b.flags]
    assert len(not_run) <= len(RUNNABLE) // 2, f"most examples are marked norun: {not_run}"


def test_the_harness_can_fail(tmp_path: Path) -> None:
    """The parser and the comparison see what they must: a wrong language, a stray output
    block, output that differs, and placeholders that match only one word."""
    doc = tmp_path / "DOC.md"
    doc.write_text("```bash\nls\n```\n\n```output\nx\n```\n\n```sh norun\nmake run\n```\n"
                   "\n```` ```sh ```` in prose is no fence\n"
                   "\n```python\nprint(1)\n```\n```output\n1\n```\n")
    blocks = parse_blocks(doc)
    assert [(b.language, b.runs) for b in blocks] == [
        ("bash", False), ("output", False), ("sh", False), ("python", True),
        ("output", False)]
    assert blocks[3].expected_output is blocks[4]
    errors = convention_errors(blocks)
    assert len(errors) == 2 and "'bash'" in errors[0] and "DOC.md:5" in errors[1]
    assert matches("vm demo-<id> took <ms> ms", "vm demo-1a2b3c took 15.2 ms  ")
    assert not matches("vm demo-<id> took <ms> ms", "vm demo-1a2b3c took 15.2 s")
    assert not matches("vm <id>", "vm two words")
    assert not matches("a\nb", "a\nb\nc")
