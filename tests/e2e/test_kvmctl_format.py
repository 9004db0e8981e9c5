"""kvmctl's plain-text rendering (kvmd_client._format), as its docstrings promise it: tables
with numeric columns right-aligned, aligned key/value blocks, binary sizes, page ranges and
`hexdump -C` dumps. No daemon."""

from __future__ import annotations

import pytest

from kvmd_client._format import format_kv, format_ranges, format_table, hexdump, human_bytes


def test_a_table_has_upper_case_headers_numbers_right_and_an_unpadded_last_column() -> None:
    text = format_table(["id", "size", "state", "label"],
                        [["vm-1", 4096, "running", "a"], ["v2", "0x10", "paused", None],
                         ["v3", "-", "", "long label"]])
    assert text.splitlines() == [
        "ID    SIZE  STATE    LABEL",
        "vm-1  4096  running  a",
        "v2    0x10  paused",
        "v3       -           long label",
    ]


def test_a_column_with_one_word_is_not_numeric_and_empty_cells_do_not_count() -> None:
    text = format_table(["n", "exit", "ok"], [[1, 0, True], ["x", None, False],
                                               [22, 130, True]])
    assert text.splitlines() == ["N   EXIT  OK", "1      0  True", "x         False",
                                 "22   130  True"]


def test_an_empty_table_and_a_row_of_the_wrong_length() -> None:
    assert format_table(["id"], []) == "(none)"
    assert format_table(["id"], [], empty="no vms") == "no vms"
    with pytest.raises(ValueError, match="row has 1 cells, expected 2"):
        format_table(["id", "state"], [["v"]])


def test_key_value_lines_align_their_values() -> None:
    assert format_kv([("state", "running"), ("vcpus", 2), ("exit_code", None)],
                     indent=2).splitlines() == [
        "  state      running", "  vcpus      2", "  exit_code"]
    assert format_kv([]) == ""


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"),
    (1024 * 1024 - 1, "1024 KiB"), (64 << 20, "64 MiB"), (3 << 30, "3 GiB"),
    (1 << 40, "1 TiB"), (5 << 60, "5120 PiB"),
])
def test_sizes_in_binary_units(n: int, text: str) -> None:
    assert human_bytes(n) == text


@pytest.mark.parametrize(("numbers", "text"), [
    ([], ""), ([7], "7"), ([0, 1, 2, 5, 7, 8], "0-2,5,7-8"), ([3, 4], "3-4"),
    ([1, 3, 5], "1,3,5"),
])
def test_page_ranges(numbers: list[int], text: str) -> None:
    assert format_ranges(numbers) == text


def test_a_dump_is_hexdump_c_with_repeated_lines_starred() -> None:
    data = b"kvmd\x00\x01" + bytes(10) + bytes(32) + b"end"
    assert hexdump(data, 0x1000).splitlines() == [
        "00001000  6b 76 6d 64 00 01 00 00  00 00 00 00 00 00 00 00  |kvmd............|",
        "00001010  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  |................|",
        "*",
        "00001030  65 6e 64                                          |end|",
        "00001033",
    ]


def test_each_run_of_repeated_lines_gets_one_star() -> None:
    data = bytes(64) + b"A" * 48
    assert hexdump(data).splitlines() == [
        "00000000  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  |................|",
        "*",
        "00000040  41 41 41 41 41 41 41 41  41 41 41 41 41 41 41 41  |AAAAAAAAAAAAAAAA|",
        "*",
        "00000070",
    ]


def test_a_dump_without_collapsing_and_of_nothing() -> None:
    lines = hexdump(bytes(32), collapse=False).splitlines()
    assert len(lines) == 3 and lines[1].startswith("00000010  00 00") and lines[2] == "00000020"
    assert hexdump(b"") == "00000000"


def test_a_dump_widens_its_addresses_past_32_bits_and_takes_other_widths() -> None:
    assert hexdump(b"\x7f ", 0xFFFFFFFF, width=4).splitlines() == [
        "0ffffffff  7f 20  |. |", "100000001"]
