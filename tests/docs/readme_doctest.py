"""The README doc-test machinery: parse fenced blocks, run them in order against a kvmd
process, compare printed output. The convention it implements is described at the top of
tests/docs/test_readme.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from kvmd_client import KvmdClient, KvmdError

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DEFAULT_ADDRESS = "unix:///run/kvmd/kvmd.sock"
RUN_LANGUAGES = {"sh", "console", "python"}
CHECKED_LANGUAGES = RUN_LANGUAGES | {"output", "toml"}
TEXT_LANGUAGES = {"", "text"}
FLAGS = {"norun"}
COMMAND_TIMEOUT = 60.0
PLACEHOLDER = re.compile(r"<[a-z0-9][a-z0-9_-]*>")


@dataclass
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int              # 1-based line of the opening fence
    language: str
    flags: set[str]
    text: str
    expected_output: Block | None = None  # the ```output block after a ```python one

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.line}-{self.language}"

    @property
    def runs(self) -> bool:
        return self.language in CHECKED_LANGUAGES - {"output"} and "norun" not in self.flags


def parse_blocks(path: Path = README) -> list[Block]:
    """Every fenced block, in order; an ```output block is attached to the ```python block
    right before it (and stays in the list)."""
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        # A fence (CommonMark): 3+ backticks, an info string without backticks; it closes
        # at a line of at least as many backticks alone.
        m = re.match(r"^(`{3,})([^`]*)$", lines[i])
        if not m:
            i += 1
            continue
        fence, words = m.group(1), m.group(2).split()
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and not re.fullmatch(f"{fence}`*\\s*", lines[i]):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{path.name}:{start + 1}: unclosed code block")
        i += 1
        block = Block(path, start + 1, words[0] if words else "", set(words[1:]),
                      "\n".join(body) + "\n")
        if block.language == "output" and blocks and blocks[-1].language == "python":
            blocks[-1].expected_output = block
        blocks.append(block)
    return blocks


def convention_errors(blocks: list[Block]) -> list[str]:
    """Blocks that break the convention: unknown languages or flags, an ```output block
    with no ```python block before it."""
    errors = []
    for i, b in enumerate(blocks):
        if b.language not in CHECKED_LANGUAGES | TEXT_LANGUAGES:
            errors.append(f"{b.where}: language {b.language!r} is neither run nor text: use "
                          f"sh, console, python, toml, or text")
        if b.flags - FLAGS:
            errors.append(f"{b.where}: unknown flags {sorted(b.flags - FLAGS)}")
        if b.language == "output" and (i == 0 or blocks[i - 1].language != "python"):
            errors.append(f"{b.where}: an output block must follow a python block")
    return errors


def matches(expected: str, actual: str) -> bool:
    """Line-by-line comparison, trailing whitespace and trailing blank lines ignored, with
    <placeholder>s matching any non-space run."""
    want = expected.rstrip("\n").splitlines()
    got = actual.rstrip("\n").splitlines()
    if len(want) != len(got):
        return False
    for w, g in zip(want, got, strict=True):
        pattern = "".join(
            r"\S+" if PLACEHOLDER.fullmatch(part) else re.escape(part)
            for part in re.split(f"({PLACEHOLDER.pattern})", w.rstrip()))
        if not re.fullmatch(pattern, g.rstrip()):
            return False
    return True


class DocDaemon:
    """kvmd as a process on a Unix socket in `directory` (the virtualenv's console script)."""

    def __init__(self, directory: Path) -> None:
        self.address = f"unix://{directory}/kvmd.sock"
        self.log_path = directory / "kvmd.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("kvmd")), "--listen", self.address,
             "--metrics-listen", "off", "--log-level", "warning",
             "--state-dir", str(directory / "state")],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            with KvmdClient(self.address) as client:
                client.wait_ready(20)
        except KvmdError:
            self.stop()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@dataclass
class Outcome:
    """What running one block did: None if it passed, else why it failed."""

    failure: str | None = None
    transcript: list[str] = field(default_factory=list)


class ReadmeRunner:
    """Runs a Markdown file's blocks in order in one scratch directory against one daemon;
    running block n first runs every earlier block not run yet."""

    def __init__(self, blocks: list[Block], workdir: Path, address: str) -> None:
        self.blocks = blocks
        self.workdir = workdir
        self.address = address
        self.outcomes: dict[int, Outcome] = {}
        venv_bin = Path(sys.executable).parent
        (workdir / ".venv").symlink_to(venv_bin.parent)  # `.venv/bin/kvmctl` as printed
        self.env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
                    "KVMD_ADDRESS": address, "PYTHONUNBUFFERED": "1"}

    def run_through(self, block: Block) -> Outcome:
        """Run every not yet run block up to `block`, then return `block`'s outcome; an
        earlier failure is reported as such."""
        for b in self.blocks:
            if b.runs and b.line not in self.outcomes:
                self.outcomes[b.line] = self._run(b)
            if b is block:
                break
        earlier = [(b, self.outcomes[b.line]) for b in self.blocks
                   if b.line < block.line and b.line in self.outcomes
                   and self.outcomes[b.line].failure]
        outcome = self.outcomes[block.line]
        if earlier and outcome.failure:
            first, why = earlier[0]
            outcome.failure += f"\n(an earlier block failed first: {first.where}: "
            outcome.failure += f"{why.failure})"
        return outcome

    # -- one block ------------------------------------------------------------------------

    def _localize(self, text: str) -> str:
        return text.replace(DEFAULT_ADDRESS, self.address)

    def _publish(self, text: str) -> str:
        return text.replace(self.address, DEFAULT_ADDRESS)

    def _shell(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", self._localize(command)],
                              cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=COMMAND_TIMEOUT)

    def _run(self, block: Block) -> Outcome:
        try:
            if block.language == "sh":
                return self._run_sh(block)
            if block.language == "console":
                return self._run_console(block)
            if block.language == "python":
                return self._run_python(block)
            tomllib.loads(block.text)
            return Outcome()
        except subprocess.TimeoutExpired as e:
            return Outcome(f"{block.where}: {e.cmd!r} did not finish within {e.timeout} s")
        except tomllib.TOMLDecodeError as e:
            return Outcome(f"{block.where}: not valid TOML: {e}")

    def _run_sh(self, block: Block) -> Outcome:
        outcome = Outcome()
        for line_no, command in _logical_lines(block):
            result = self._shell(command)
            outcome.transcript.append(f"$ {command}\n{self._publish(result.stdout)}")
            if result.returncode != 0:
                outcome.failure = (f"{block.path.name}:{line_no}: `{command}` exited "
                                   f"{result.returncode}:\n{self._publish(result.stdout)}")
                return outcome
        return outcome

    def _run_console(self, block: Block) -> Outcome:
        outcome = Outcome()
        for line_no, command, expected in _transcript(block):
            result = self._shell(command)
            output = self._publish(result.stdout)
            outcome.transcript.append(f"$ {command}\n{output}")
            if result.returncode != 0:
                outcome.failure = (f"{block.path.name}:{line_no}: `{command}` exited "
                                   f"{result.returncode}:\n{output}")
                return outcome
            if not matches(expected, output):
                outcome.failure = (f"{block.path.name}:{line_no}: `{command}` printed\n"
                                   f"{output}\ninstead of\n{expected}")
                return outcome
        return outcome

    def _run_python(self, block: Block) -> Outcome:
        result = subprocess.run([sys.executable, "-c", self._localize(block.text)],
                                cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        output = self._publish(result.stdout)
        outcome = Outcome(transcript=[output + self._publish(result.stderr)])
        if result.returncode != 0:
            outcome.failure = (f"{block.where}: the script exited {result.returncode}:\n"
                               f"{output}{self._publish(result.stderr)}")
        elif block.expected_output is not None and not matches(block.expected_output.text,
                                                                output):
            outcome.failure = (f"{block.where}: the script printed\n{output}\ninstead of "
                               f"({block.expected_output.where})\n"
                               f"{block.expected_output.text}")
        return outcome


def _logical_lines(block: Block) -> list[tuple[int, str]]:
    """(README line, command) of each shell line, continuations joined, blank and comment
    lines dropped."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    first = 0
    for offset, raw in enumerate(block.text.splitlines(), start=1):
        if not pending:
            first = block.line + offset
        if raw.rstrip().endswith("\\"):
            pending.append(raw.rstrip()[:-1])
            continue
        command = " ".join([*pending, raw]).strip()
        pending = []
        if command and not command.startswith("#"):
            out.append((first, command))
    if pending:
        raise ValueError(f"{block.where}: the last line continues into nothing")
    return out


def _transcript(block: Block) -> list[tuple[int, str, str]]:
    """(README line, command, expected output) of each `$ command` of a console block."""
    steps: list[tuple[int, str, list[str]]] = []
    for offset, raw in enumerate(block.text.splitlines(), start=1):
        if raw.startswith("$ "):
            steps.append((block.line + offset, raw[2:].strip(), []))
        elif steps:
            steps[-1][2].append(raw)
        elif raw.strip():
            raise ValueError(f"{block.path.name}:{block.line + offset}: console output "
                             "before any `$ command`")
    if not steps:
        raise ValueError(f"{block.where}: a console block without a `$ command`")
    return [(line, command, "\n".join(lines)) for line, command, lines in steps]
