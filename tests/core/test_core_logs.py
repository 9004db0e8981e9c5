"""The daemon's log formats (kvmd.logs): logfmt values quoted where a reader would split
them, one line per record whatever the message holds, and JSON with the same keys."""

from __future__ import annotations

import json
import logging

import pytest

from kvmd.logs import JsonFormatter, KeyValueFormatter, logfmt_value


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
