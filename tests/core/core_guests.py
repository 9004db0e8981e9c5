"""Guest programs of the core tests (boot them with guests.boot)."""

from __future__ import annotations

DEBUG_EXIT = 0x501


def debug_exit_program(code: int) -> bytes:
    return bytes([
        0xBA, DEBUG_EXIT & 0xFF, DEBUG_EXIT >> 8,  # mov dx, 0x501
        0xB0, code,                                # mov al, code
        0xEE,                                      # out dx, al
        0xF4,                                      # hlt (not reached)
    ])


SPIN = bytes([
    0x40,        # inc ax
    0xEB, 0xFD,  # jmp back to inc ax
])
