"""Plain-text rendering for kvmctl: tables, key/value blocks, hex dumps, sizes, page ranges.

No third-party dependencies; output is plain ASCII apart from what the caller passes in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "format_kv",
    "format_ranges",
    "format_table",
    "hexdump",
    "human_bytes",
]


def _is_number(cell: str) -> bool:
    """A cell as rendered (ints are digit strings by then; a bool is a word)."""
    return cell.isdigit() or cell.startswith("0x") or cell == "-"


def format_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    empty: str = "(none)",
) -> str:
    """Render rows under upper-case headers, columns separated by two spaces.

    Numeric columns (every non-empty cell an int, a digit string or a 0x string) are
    right-aligned; the last column is not padded. An empty table renders as ``empty``.
    """
    cells = [["" if c is None else str(c) for c in row] for row in rows]
    if not cells:
        return empty
    ncols = len(headers)
    widths = [len(h) for h in headers]
    for row in cells:
        if len(row) != ncols:
            raise ValueError(f"row has {len(row)} cells, expected {ncols}")
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    numeric = [
        all(_is_number(row[i]) for row in cells if row[i] != "") for i in range(ncols)
    ]
    lines = []
    for row in [[h.upper() for h in headers], *cells]:
        parts = []
        for i, cell in enumerate(row):
            last = i == ncols - 1
            if numeric[i]:
                parts.append(cell.rjust(widths[i]))
            elif last:
                parts.append(cell)
            else:
                parts.append(cell.ljust(widths[i]))
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def format_kv(pairs: Iterable[tuple[str, object]], *, indent: int = 0) -> str:
    """Render ``key  value`` lines with the values aligned in one column."""
    items = [(k, "" if v is None else str(v)) for k, v in pairs]
    if not items:
        return ""
    width = max(len(k) for k, _ in items)
    pad = " " * indent
    return "\n".join(f"{pad}{k.ljust(width)}  {v}".rstrip() for k, v in items)


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``; exact byte counts below 1 KiB."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            text = f"{value:.1f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
    raise AssertionError("unreachable")


def format_ranges(numbers: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (input in ascending order)."""
    out: list[str] = []
    start: int | None = None
    prev: int | None = None
    for n in numbers:
        if start is None:
            start = prev = n
        elif prev is not None and n == prev + 1:
            prev = n
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = n
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(out)


def hexdump(data: bytes, base: int = 0, *, width: int = 16, collapse: bool = True) -> str:
    """A ``hexdump -C`` style dump with addresses starting at ``base``.

    Runs of identical lines collapse into a single ``*`` line (as ``hexdump`` does); the final
    line always shows the end address.
    """
    lines: list[str] = []
    addr_width = max(8, len(f"{base + len(data):x}"))
    previous: bytes | None = None
    starred = False
    for offset in range(0, len(data), width):
        chunk = data[offset : offset + width]
        if collapse and chunk == previous and len(chunk) == width:
            if not starred:
                lines.append("*")
                starred = True
            continue
        previous, starred = chunk, False
        hex_left = " ".join(f"{b:02x}" for b in chunk[:8])
        hex_right = " ".join(f"{b:02x}" for b in chunk[8:])
        hex_part = f"{hex_left:<23}  {hex_right:<23}" if width == 16 else " ".join(
            f"{b:02x}" for b in chunk
        )
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{base + offset:0{addr_width}x}  {hex_part}  |{text}|")
    lines.append(f"{base + len(data):0{addr_width}x}")
    return "\n".join(lines)
