"""The daemon's log formats (kvmd.logs): logfmt values quoted where a reader would split
them, one line per record whatever the message holds, and JSON with the same keys; grpc
core's own stderr lines relayed as records."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmd.logs import (
    JsonFormatter,
    KeyValueFormatter,
    logfmt_value,
    native_record,
    setup_logging,
)


@pytest.mark.parametrize(("value", "shown"), [
    ("vm-1", "vm-1"),
    ("two words", '"two words"'),
    ("a=b", '"a=b"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("line\nbreak", '"line\\nbreak"'),
    ("back\\slash", '"back\\\\slash"'),
    ("", '""'),
    (42, "42"),
])
def test_logfmt_values_are_quoted_where_needed(value: object, shown: str) -> None:
    assert logfmt_value(value) == shown


def record(**extra: object) -> logging.LogRecord:
    rec = logging.makeLogRecord({"name": "kvmd.test", "levelname": "INFO", "levelno": 20,
                                 "msg": "vm created\nsecond line", "args": ()})
    rec.__dict__.update(extra)
    return rec


def test_keyvalue_lines_stay_one_line_and_parse_back() -> None:
    line = KeyValueFormatter().format(record(vm_id="a b", error='x="y"\nz'))
    assert "\n" not in line
    assert ' vm_id="a b" ' in line + " "
    assert 'error="x=\\"y\\"\\nz"' in line


def test_json_format_has_the_same_keys() -> None:
    data = json.loads(JsonFormatter().format(record(vm_id="vm-1", vcpu=0)))
    assert data["level"] == "info" and data["logger"] == "kvmd.test"
    assert data["msg"] == "vm created\nsecond line"
    assert data["vm_id"] == "vm-1" and data["vcpu"] == 0
    assert data["ts"].endswith("Z")


@pytest.fixture
def local_time_not_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "JST-9")  # POSIX form: needs no tzdata
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("local_time_not_utc")
def test_logfmt_starts_with_utc_time_lowercase_level_logger_and_a_quoted_message() -> None:
    rec = record()
    rec.msg, rec.created, rec.msecs = "ready", 1764590400.0, 7.0  # 2025-12-01 12:00:00 UTC
    assert KeyValueFormatter().format(rec) == (
        'ts=2025-12-01T12:00:00.007Z level=info logger=kvmd.test msg="ready"')
    data = json.loads(JsonFormatter().format(rec))
    assert data == {"ts": "2025-12-01T12:00:00.007Z", "level": "info", "logger": "kvmd.test",
                    "msg": "ready"}


def test_private_attributes_are_not_fields() -> None:
    rec = record(vm_id="vm-1", _internal="x")
    assert "_internal" not in KeyValueFormatter().format(rec)
    assert "_internal" not in json.loads(JsonFormatter().format(rec))


def test_an_exception_goes_along_in_both_formats() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record(exc_info=sys.exc_info())
    line = KeyValueFormatter().format(rec)
    assert "\n" not in line
    exc = line.split(" exc=", 1)[1]
    assert exc.startswith('"Traceback') and "ValueError: boom" in json.loads(exc)
    assert "ValueError: boom" in json.loads(JsonFormatter().format(rec))["exc"]


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_setup_logging_leaves_one_handler_at_the_level_asked(
        root_logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging("info", "logfmt", io.StringIO())
    setup_logging("debug", "json", out)
    assert len(root_logger.handlers) == 1 and root_logger.level == logging.DEBUG
    logging.getLogger("kvmd.test").debug("seen", extra={"vm_id": "vm-1"})
    assert json.loads(out.getvalue())["vm_id"] == "vm-1"


@pytest.mark.parametrize(("line", "level", "source", "message"), [
    ("I1130 12:14:38.042336   27886 ev_epoll.cc:9] info", logging.INFO, "ev_epoll.cc:9", "info"),
    ("W1130 12:14:38.042336 1 a.cc:2] warned", logging.WARNING, "a.cc:2", "warned"),
    ("E1130 12:14:38.042336   27886 add_port.cc:83] failed", logging.ERROR, "add_port.cc:83",
     "failed"),
    ("F1130 12:14:38.042336 1 b.cc:3] fatal", logging.CRITICAL, "b.cc:3", "fatal"),
])
def test_absl_lines_keep_their_level_and_source(caplog: pytest.LogCaptureFixture, line: str,
                                               level: int, source: str, message: str) -> None:
    with caplog.at_level(logging.DEBUG):
        native_record(line)
    (rec,) = caplog.records
    assert (rec.name, rec.levelno, rec.getMessage()) == ("grpc.core", level, message)
    assert rec.__dict__["source"] == source


def test_other_native_lines_are_warnings_of_the_stderr_logger(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        native_record("something native said")
    (rec,) = caplog.records
    assert (rec.name, rec.levelno, rec.getMessage()) == (
        "stderr", logging.WARNING, "something native said")


# A daemon process's stderr: native writes to fd 2 in pieces (a line cut between two reads of
# the relay, blank lines, a last line without its newline), and a record of its own that is
# out before the relay closes (line-buffered). The relay is closed by the script (argv[1]
# "close", then again by atexit) or by atexit alone.
NATIVE_WRITES = """
import fcntl, logging, os, sys, termios, time
from kvmd.logs import setup_daemon_logging
original = os.dup(2)  # the test's file
native = setup_daemon_logging("info", "json")
logging.getLogger("kvmd.test").warning("own record")
print(os.fstat(original).st_size > 0)  # written through at once
os.write(2, b"E1130 12:14:38.042336   27886 a.cc:1] one\\n\\n   \\nW1130 12:14:38.04 1 b.cc:2] tw")
while fcntl.ioctl(native._read_end, termios.FIONREAD, bytes(4)) != bytes(4):
    time.sleep(0.001)  # the relay took the cut line: the rest comes in another read
os.write(2, b"o\\nthe last words")
if sys.argv[1] == "close":
    native.close()
    print(sys.stderr is sys.__stderr__)
"""


@pytest.mark.parametrize("closed_by", ["close", "atexit"])
def test_native_stderr_is_relayed_line_by_line_until_the_relay_closes_once(
        tmp_path: Path, closed_by: str) -> None:
    script = tmp_path / "native.py"
    script.write_text(NATIVE_WRITES)
    out = tmp_path / "stderr"
    with out.open("wb") as stderr:
        done = subprocess.run([sys.executable, str(script), closed_by], stdout=subprocess.PIPE,
                              stderr=stderr, text=True, timeout=60)
    assert done.returncode == 0, out.read_text()
    printed = done.stdout.split()
    assert printed[0] == "True", "the own record waited in a buffer"
    if closed_by == "close":
        assert printed[1] == "True"  # Python's stderr is the original again
    # Only records: atexit's second close did nothing (no traceback of a closed fd).
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["logger"], r["level"], r["msg"]) for r in records] == [
        ("kvmd.test", "warning", "own record"),
        ("grpc.core", "error", "one"), ("grpc.core", "warning", "two"),
        ("stderr", "warning", "the last words")]
