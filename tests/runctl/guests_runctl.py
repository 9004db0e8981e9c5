"""Guest programs for the run-control tests (and benchmarks/run_control.py).

Extends `tests/guests.py` (read-only here) with what run control needs: labels for
backward jumps, the debug-exit port, UART polling, an IVT handler for injected interrupts,
and 32-bit protected-mode sregs for a real triple fault. Every encoding is written beside
its instruction and was checked with `ndisasm -b 16` when written.

All programs are real mode (16-bit, CS base 0) and are loaded at CODE_ADDR unless a test
says otherwise.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from guests import (
    CODE_ADDR,
    DATA_ADDR,
    HLT,
    IN_AL_DX,
    OUT_DX_AL,
    UART_PORT,
    mov_al,
    mov_ax,
    mov_ds_ax,
    mov_dx,
)

from kvmd_proto import vmm_pb2 as pb

DEBUG_EXIT_PORT = 0x501      # the daemon's default debug-exit port
UART_LSR = UART_PORT + 5     # line status register; bit 0 = data ready
CLAIM_PORT = 0x300           # a port no in-daemon device uses: tests claim it remotely
UNCLAIMED_PORT = 0x60        # nobody claims it: reads all-ones, writes dropped
OUT_SPAM_PORT = 0xE9         # unclaimed port the counting programs write to
MMIO_BASE = 0x10000          # just beyond the 64 KiB RAM slot: MMIO
DIRTY_SLOT_ADDR = 0x20000    # a dirty-logged slot of DIRTY_SLOT_PAGES pages
DIRTY_SLOT_PAGES = 4
DIRTY_PAGE = 1               # the one page of that slot the scenario stores to

OUT_DX_AX = bytes([0xEF])    # out dx, ax
IN_AX_DX = bytes([0xED])     # in ax, dx
UD2 = bytes([0x0F, 0x0B])    # ud2
INT3 = bytes([0xCC])         # int3


class Asm:
    """A tiny assembler: raw encodings plus labels for short jumps and 16-bit addresses.

    `origin` is the guest address of the first byte (real mode, CS base 0), so a label's
    value is the address an IVT entry or `mov di, label` needs.
    """

    def __init__(self, origin: int = CODE_ADDR) -> None:
        self.origin = origin
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self._rel8: list[tuple[int, str]] = []    # (offset of the rel8 byte, label)
        self._abs16: list[tuple[int, str]] = []   # (offset of the imm16, label)

    def __call__(self, *parts: bytes | Iterable[int]) -> Asm:
        for p in parts:
            self.code += bytes(p)
        return self

    def label(self, name: str) -> Asm:
        self.labels[name] = self.origin + len(self.code)
        return self

    def _jump(self, opcode: int, target: str) -> Asm:
        self.code.append(opcode)
        self._rel8.append((len(self.code), target))
        self.code.append(0)
        return self

    def jmp(self, target: str) -> Asm:
        return self._jump(0xEB, target)          # jmp short target

    def jz(self, target: str) -> Asm:
        return self._jump(0x74, target)          # jz short target

    def jnz(self, target: str) -> Asm:
        return self._jump(0x75, target)          # jnz short target

    def loop(self, target: str) -> Asm:
        return self._jump(0xE2, target)          # loop target (dec cx; jnz)

    def mov_word_mem_label(self, offset: int, target: str) -> Asm:
        """`mov word [offset], target` (DS-relative; e.g. an IVT entry's IP)."""
        self.code += bytes([0xC7, 0x06]) + struct.pack("<H", offset)
        self._abs16.append((len(self.code), target))
        self.code += b"\0\0"
        return self

    def bytes(self) -> bytes:
        out = bytearray(self.code)
        for at, target in self._rel8:
            disp = self.labels[target] - (self.origin + at + 1)
            if not -128 <= disp <= 127:
                raise ValueError(f"jump to {target} is out of rel8 range ({disp})")
            out[at] = disp & 0xFF
        for at, target in self._abs16:
            out[at : at + 2] = struct.pack("<H", self.labels[target])
        return bytes(out)


def debug_exit(code: int, port: int = DEBUG_EXIT_PORT) -> bytes:
    """Write `code` to the debug-exit port: a byte if it fits, else a 16-bit word."""
    if code < 0x100:
        return mov_dx(port) + mov_al(code) + OUT_DX_AL  # mov dx, port; mov al, code; out dx, al
    return mov_dx(port) + mov_ax(code) + OUT_DX_AX  # mov dx, port; mov ax, code; out dx, ax


def debug_exit_ax(port: int = DEBUG_EXIT_PORT) -> bytes:
    """Write AX (as computed by the program) to the debug-exit port."""
    return mov_dx(port) + OUT_DX_AX                             # mov dx, port; out dx, ax


def print_program(text: bytes, code: int) -> bytes:
    """Print `text` on COM1 (one OUT per byte), then debug-exit with `code`."""
    body = [mov_dx(UART_PORT)]                                  # mov dx, 0x3f8
    for b in text:
        body += [mov_al(b), OUT_DX_AL]                          # mov al, b; out dx, al
    return b"".join(body) + debug_exit(code)


def echo_program(terminator: int = 0x0A, buf: int = DATA_ADDR) -> bytes:
    """Poll COM1's LSR for data, read each byte, echo it to COM1 and store it at
    buf, buf+1, ...; after `terminator` debug-exit with the number of bytes read."""
    a = Asm()
    a([0x31, 0xC0], mov_ds_ax())                                # xor ax, ax; mov ds, ax
    a([0xBF], struct.pack("<H", buf))                           # mov di, buf
    a.label("poll")
    a(mov_dx(UART_LSR), IN_AL_DX)                               # mov dx, 0x3fd; in al, dx
    a([0xA8, 0x01])                                             # test al, 1
    a.jz("poll")                                                # jz poll
    a(mov_dx(UART_PORT), IN_AL_DX, OUT_DX_AL)  # mov dx, 0x3f8; in al, dx; out dx, al
    a([0x88, 0x05], [0x47])                                     # mov [di], al; inc di
    a([0x3C, terminator])                                       # cmp al, terminator
    a.jnz("poll")                                               # jnz poll
    a([0x89, 0xF8], [0x2D], struct.pack("<H", buf))             # mov ax, di; sub ax, buf
    a(debug_exit_ax())
    return a.bytes()


def counting_loop() -> bytes:
    """`loop: inc ebx; jmp loop`: spins without exits; EBX counts iterations."""
    return bytes([
        0x66, 0x43,  # loop: inc ebx
        0xEB, 0xFC,  #       jmp loop
    ])


COUNTING_LOOP_LEN = len(counting_loop())


def halt_then_exit(code: int) -> bytes:
    """`cli; hlt`, then (once resumed) debug-exit with `code`."""
    return bytes([0xFA]) + HLT + debug_exit(code)               # cli; hlt; <debug exit>


def interrupt_program(vector: int, code_base: int = 0x100, *, halt: bool = True) -> bytes:
    """Point IVT entry `vector` at a handler, then `sti; hlt` (with halt=False just `sti`)
    and spin, should the halt ever end without the interrupt. The handler debug-exits with
    code_base + vector."""
    a = Asm()
    a([0xFA], [0x31, 0xC0], mov_ds_ax())                        # cli; xor ax, ax; mov ds, ax
    a.mov_word_mem_label(vector * 4, "handler")                 # mov word [v*4], handler
    a([0xC7, 0x06], struct.pack("<HH", vector * 4 + 2, 0))      # mov word [v*4+2], 0
    a([0xFB], HLT if halt else b"")                             # sti; (hlt)
    a.label("spin").jmp("spin")                                 # spin: jmp spin
    a.label("handler")
    a(debug_exit(code_base + vector))
    return a.bytes()


COUNTERS = DATA_ADDR  # where two_vector_counter_program counts its interrupts


def two_vector_counter_program(v1: int, v2: int, *, masked_spin: bool = False) -> bytes:
    """IVT entries for two vectors whose handlers count into bytes COUNTERS and
    COUNTERS+1 and `iret`; the main loop is `sti; hlt; jmp` (one HLT exit per wait).

    With masked_spin, the program instead spins with interrupts disabled (`jmp $`) right
    after setting up the IVT; a test moves RIP to MASKED_IDLE to enter the idle loop."""
    a = Asm()
    a([0xFA], [0x31, 0xC0], mov_ds_ax())                        # cli; xor ax, ax; mov ds, ax
    for vector, handler in ((v1, "h1"), (v2, "h2")):
        a.mov_word_mem_label(vector * 4, handler)               # mov word [v*4], handler
        a([0xC7, 0x06], struct.pack("<HH", vector * 4 + 2, 0))  # mov word [v*4+2], 0
    if masked_spin:
        a.label("masked").jmp("masked")                         # masked: jmp masked
    a.label("idle")
    a([0xFB], HLT)                                              # idle: sti; hlt
    a.jmp("idle")                                               #       jmp idle
    for i, handler in enumerate(("h1", "h2")):
        a.label(handler)
        a([0xFE, 0x06], struct.pack("<H", COUNTERS + i))        # inc byte [COUNTERS+i]
        a([0xCF])                                               # iret
    assert not masked_spin or a.labels["idle"] == MASKED_IDLE
    return a.bytes()


# Where two_vector_counter_program(masked_spin=True) has its `sti; hlt` idle loop.
MASKED_IDLE = CODE_ADDR + 0x1F


def unclaimed_in_program(port: int = UNCLAIMED_PORT) -> bytes:
    """`in ax, port`, then debug-exit with the word read (0xffff if unclaimed)."""
    return mov_dx(port) + IN_AX_DX + debug_exit_ax()            # mov dx, port; in ax, dx; ...


def outs_then_hlt(count: int, port: int = OUT_SPAM_PORT) -> bytes:
    """`count` OUTs to `port` (a `loop`), then `cli; hlt`."""
    a = Asm()
    a(mov_dx(port), mov_al(0x55), [0xB9], struct.pack("<H", count))  # mov dx; mov al; mov cx, count
    a.label("again")
    a(OUT_DX_AL)                                                # out dx, al
    a.loop("again")                                             # loop again
    a([0xFA], HLT)                                              # cli; hlt
    return a.bytes()


def in_twice_program(port: int = CLAIM_PORT) -> bytes:
    """Read `port` into BL, halt; once resumed read it again into BH and debug-exit with
    BX. So exit code = (second read << 8) | first read."""
    return (mov_dx(port) + IN_AL_DX + bytes([0x88, 0xC3])  # mov dx, port; in al, dx; mov bl, al
            + bytes([0xFA]) + HLT                               # cli; hlt
            + IN_AL_DX + bytes([0x88, 0xC7])                    # in al, dx; mov bh, al
            + bytes([0x89, 0xD8]) + debug_exit_ax())            # mov ax, bx; <debug exit ax>


STRING_SRC = DATA_ADDR          # string_io_program's OUT source
STRING_IN = DATA_ADDR + 0x100   # where it stores 4 bytes of `rep insb`
STRING_IN32 = DATA_ADDR + 0x200  # and 3 dwords of `rep insd`


def string_io_program(text_len: int, in_port: int) -> bytes:
    """`rep outsb` of `text_len` bytes at STRING_SRC to COM1, `rep insb` of 4 bytes from
    `in_port` to STRING_IN, `rep insd` of 3 dwords from `in_port` to STRING_IN32, then
    debug-exit 0x11. DS = ES = 0."""
    return b"".join([
        bytes([0xBE]), struct.pack("<H", STRING_SRC),           # mov si, STRING_SRC
        bytes([0xB9]), struct.pack("<H", text_len),             # mov cx, text_len
        mov_dx(UART_PORT), bytes([0xF3, 0x6E]),                 # mov dx, 0x3f8; rep outsb
        bytes([0xBF]), struct.pack("<H", STRING_IN),            # mov di, STRING_IN
        bytes([0xB9]), struct.pack("<H", 4),                    # mov cx, 4
        mov_dx(in_port), bytes([0xF3, 0x6C]),                   # mov dx, in_port; rep insb
        bytes([0xBF]), struct.pack("<H", STRING_IN32),          # mov di, STRING_IN32
        bytes([0xB9]), struct.pack("<H", 3),                    # mov cx, 3
        bytes([0x66, 0xF3, 0x6D]),                              # rep insd
        debug_exit(0x11),
    ])


def scenario_program() -> bytes:
    """The kvm-ioctls-style program: OUT 'K' to COM1; IN from CLAIM_PORT (into BL);
    MMIO write of BL to MMIO_BASE; MMIO read from MMIO_BASE+8 (into CL); store CL at
    page DIRTY_PAGE of the dirty-logged slot; HLT."""
    seg_mmio = MMIO_BASE >> 4
    seg_dirty = DIRTY_SLOT_ADDR >> 4
    return b"".join([
        mov_dx(UART_PORT), mov_al(ord("K")), OUT_DX_AL,  # mov dx, 0x3f8; mov al, 'K'; out dx, al
        mov_dx(CLAIM_PORT), IN_AL_DX, bytes([0x88, 0xC3]),  # mov dx, 0x300; in al, dx; mov bl, al
        mov_ax(seg_mmio), mov_ds_ax(),                          # mov ax, 0x1000; mov ds, ax
        bytes([0x88, 0x1E]), struct.pack("<H", 0),              # mov [0], bl      -> MMIO write
        bytes([0x8A, 0x0E]), struct.pack("<H", 8),              # mov cl, [8]      -> MMIO read
        mov_ax(seg_dirty), mov_ds_ax(),                         # mov ax, 0x2000; mov ds, ax
        bytes([0x88, 0x0E]), struct.pack("<H", DIRTY_PAGE * 0x1000 + 0x10),  # mov [page+0x10], cl
        HLT,                                                    # hlt
    ])


def port_loop(port: int, value: int = 0) -> bytes:
    """`out port, al` forever with an 8-bit immediate port (or via DX for larger ones)."""
    if port < 0x100:
        # mov al; loop: out port, al; jmp loop
        return mov_al(value) + bytes([0xE6, port, 0xEB, 0xFC])
    # ...; loop: out dx, al; jmp loop
    return mov_dx(port) + mov_al(value) + bytes([0xEE, 0xEB, 0xFD])


# -- 32-bit protected mode (for a genuine triple fault) -----------------------------------

def flat_segment(selector: int, *, code: bool) -> pb.Segment:
    """A flat 4 GiB 32-bit segment: execute/read code (type 11) or read/write data (3)."""
    return pb.Segment(base=0, limit=0xFFFFFFFF, selector=selector, type=11 if code else 3,
                      present=1, dpl=0, db=1, s=1, l=0, g=1)


def protected_mode_idt0(sregs: pb.Sregs) -> pb.Sregs:
    """CR0.PE with flat 32-bit segments (paging off) and an IDT of limit 0: any exception
    then becomes #GP, #DF and a triple fault (KVM_EXIT_SHUTDOWN)."""
    sregs.cs.CopyFrom(flat_segment(0x08, code=True))
    for name in ("ds", "es", "fs", "gs", "ss"):
        getattr(sregs, name).CopyFrom(flat_segment(0x10, code=False))
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr0 |= 1
    return sregs
