"""Guests for the state tests, assembled from source with GNU as and ld (binutils, installed
with gcc): real mode, linked at offset 0, loaded at CODE_ADDR and run with CS = CODE_ADDR >> 4
so label values are IP values. Assembled once per source per session."""

from __future__ import annotations

import functools
import hashlib
import subprocess
import tempfile
from pathlib import Path

CODE_ADDR = 0x1000
CODE_SEGMENT = CODE_ADDR >> 4
MEM_SIZE = 0x40000           # 256 KiB: code, data, stack, the counter's pages
COUNTER_ADDR = 0x2000        # 32-bit counter / tick count
PAGES_SEGMENT = 0x2000       # the counter guest copies its counter to 16 pages from 0x20000
PAGES_BASE = PAGES_SEGMENT << 4
PAGES = 16
STACK_TOP = 0xF000

PRINT_ROUTINES = r"""
print_dec:                      # %eax in decimal, then a newline
    mov $10, %ecx
    xor %bx, %bx
1:  xor %edx, %edx
    div %ecx
    push %dx
    inc %bx
    test %eax, %eax
    jnz 1b
2:  pop %ax
    add $0x30, %al
    call putc
    dec %bx
    jnz 2b
    mov $0x0A, %al
    call putc
    ret

putc:                           # %al to COM1, once the transmitter is empty
    mov %al, %ah
    mov $0x3FD, %dx
3:  in %dx, %al
    test $0x20, %al
    jz 3b
    mov $0x3F8, %dx
    mov %ah, %al
    out %al, %dx
    ret
"""

COUNTER_SOURCE = r"""
    .code16
start:
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0xF000, %sp
    mov $0x2000, %bx
    mov %bx, %es
next:
    incl 0x2000                 # the counter
    mov 0x2000, %eax
    xor %di, %di
copy:                           # into the first dword of 16 pages at 0x20000
    mov %eax, %es:(%di)
    add $0x1000, %di
    jnz copy
    call print_dec              # then "N\n" on COM1
    jmp next

""" + PRINT_ROUTINES

# IRQ0 of the in-kernel PIC, fed by the in-kernel PIT at 1 kHz: the handler counts ticks.
PIT_SOURCE = r"""
    .code16
start:
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0xF000, %sp
    cli
    movw $handler, 0x20         # IVT entry 8 (IRQ0 after the remap below)
    movw $0x100, 0x22
    mov $0x11, %al              # PIC: ICW1..4, vectors 8-15, IRQ0 unmasked
    out %al, $0x20
    mov $0x08, %al
    out %al, $0x21
    mov $0x04, %al
    out %al, $0x21
    mov $0x01, %al
    out %al, $0x21
    mov $0xFE, %al
    out %al, $0x21
    mov $0x34, %al              # PIT channel 0: rate generator, 1193 -> 1 kHz
    out %al, $0x43
    mov $0xA9, %al
    out %al, $0x40
    mov $0x04, %al
    out %al, $0x40
    sti
idle:
    hlt
    jmp idle

handler:
    incl 0x2000                 # ticks
    push %ax
    mov $0x20, %al              # EOI
    out %al, $0x20
    pop %ax
    iret
"""


@functools.cache
def assemble(source: str) -> bytes:
    """The flat binary of a .code16 source."""
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    with tempfile.TemporaryDirectory(prefix=f"kvmd-as-{key}-") as tmp:
        src, obj, out = Path(tmp, "g.S"), Path(tmp, "g.o"), Path(tmp, "g.bin")
        src.write_text(source)
        subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True,
                       capture_output=True)
        subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0", "-e", "start", "--oformat",
                        "binary", "-o", str(out), str(obj)], check=True, capture_output=True)
        return out.read_bytes()


def counter_numbers(text: bytes) -> list[int]:
    """The complete numbers a counter guest printed (a trailing partial line dropped)."""
    lines = text.split(b"\n")
    return [int(x) for x in lines[:-1] if x]

# Stores one word into each of 20 pages from 0x30000, 2 pages apart, with a port write (an
# exit) after each store (dirty rings behave on PVM only for guests that exit often; see
# tests/kvm/test_kvm_dirty.py), then halts. DIRTY_PAGES_STORED: the page indices (in a slot
# at 0) it dirties.
DIRTY_PAGES_SOURCE = r"""
    .code16
start:
    mov $0x3000, %bx
    mov $20, %cx
1:  mov %bx, %es
    movw $0xBEEF, %es:0
    out %al, $0x80
    add $0x200, %bx             # the next page but one (0x2000 bytes on)
    loop 1b
    hlt
"""
DIRTY_PAGES_STORED = [0x30 + 2 * i for i in range(20)]

# Increments a word in each of the 16 pages from 0x30000, over and over (for dirty rates and
# migration rounds), with a port write (an exit) after each pass.
DIRTY_LOOP_SOURCE = r"""
    .code16
start:
    mov $0x3000, %ax
    mov %ax, %es
again:
    xor %di, %di
1:  incw %es:(%di)
    add $0x1000, %di
    cmp $0x0, %di
    jne 1b
    out %al, $0x80
    jmp again
"""
