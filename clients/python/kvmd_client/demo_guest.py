"""The guest program ``kvmctl demo`` runs: a few hundred bytes of 16-bit real-mode code.

It prints a greeting on the COM1 UART, counts from 1 to 9 (each number also written to the
unclaimed port 0x80, so the exit counters show unclaimed port I/O), says goodbye, and ends the
VM by writing :data:`EXIT_CODE` to the debug-exit port 0x501. Before every byte it polls the
UART's line status register until the transmitter is empty, as a real driver would.

The bytes are hand-assembled; the NASM source they correspond to is::

    bits 16
    org 0x1000                  ; loaded at LOAD_ADDRESS, cs = ds = ss = 0
    start:  mov si, greeting    ; "Hello from a kvmd guest!\\ncounting:"
            call puts
            mov bl, '1'
    count:  mov al, ' '
            call putc
            mov al, bl
            call putc
            out 0x80, al        ; unclaimed port: counted, dropped
            inc bl
            cmp bl, '9' + 1
            jne count
            mov si, bye         ; "\\nbye!\\n"
            call puts
            mov dx, 0x501       ; debug exit: the VM stops with code al
            mov al, 0x2a
            out dx, al
    halt:   hlt                 ; never reached
            jmp halt
    puts:   lodsb               ; print the NUL-terminated string at ds:si
            test al, al
            jz .done
            call putc
            jmp puts
    .done:  ret
    putc:   mov ah, al          ; print al once the transmitter holding register is empty
            mov dx, 0x3fd       ; COM1 line status register
    .wait:  in al, dx
            test al, 0x20       ; THRE
            jz .wait
            mov al, ah
            mov dx, 0x3f8       ; COM1 transmitter holding register
            out dx, al
            ret
    times 0x100 - ($ - $$) db 0
    greeting: db "Hello from a kvmd guest!", 10, "counting:", 0
    times 0x140 - ($ - $$) db 0
    bye:      db 10, "bye!", 10, 0

At about 0.45 us per emulated instruction and 8 us per exit on a nested-virtualization host the
whole run takes a few milliseconds: 58 characters make 116 UART exits, plus 9 writes to port
0x80 and the debug exit.
"""

from __future__ import annotations

__all__ = [
    "BYE",
    "BYE_OFFSET",
    "CODE",
    "COUNT_PORT",
    "DEBUG_EXIT_PORT",
    "EXIT_CODE",
    "EXPECTED_CONSOLE",
    "GREETING",
    "GREETING_OFFSET",
    "IMAGE",
    "LOAD_ADDRESS",
    "MEMORY_SIZE",
    "STACK_TOP",
]

#: Guest-physical address the image is loaded at (and where the vCPU starts, cs = 0).
LOAD_ADDRESS = 0x1000
#: Initial stack pointer (ss = 0); the stack grows down through free memory below it.
STACK_TOP = 0x8000
#: Guest memory the demo maps at guest address 0.
MEMORY_SIZE = 64 << 10
#: The code the guest writes to the debug-exit port.
EXIT_CODE = 0x2A
#: The daemon's default debug-exit port.
DEBUG_EXIT_PORT = 0x501
#: The unclaimed port each count is written to.
COUNT_PORT = 0x80

# fmt: off
#: The instructions, hand-assembled (offsets relative to LOAD_ADDRESS).
CODE = bytes([
    # start:
    0xBE, 0x00, 0x11,        # 00  mov si, 0x1100          ; greeting
    0xE8, 0x24, 0x00,        # 03  call puts (0x2a)
    0xB3, 0x31,              # 06  mov bl, '1'
    # count:
    0xB0, 0x20,              # 08  mov al, ' '
    0xE8, 0x28, 0x00,        # 0a  call putc (0x35)
    0x88, 0xD8,              # 0d  mov al, bl
    0xE8, 0x23, 0x00,        # 0f  call putc (0x35)
    0xE6, 0x80,              # 12  out 0x80, al            ; unclaimed port
    0xFE, 0xC3,              # 14  inc bl
    0x80, 0xFB, 0x3A,        # 16  cmp bl, '9' + 1
    0x75, 0xED,              # 19  jne count (0x08)
    0xBE, 0x40, 0x11,        # 1b  mov si, 0x1140          ; bye
    0xE8, 0x09, 0x00,        # 1e  call puts (0x2a)
    0xBA, 0x01, 0x05,        # 21  mov dx, 0x501           ; debug-exit port
    0xB0, 0x2A,              # 24  mov al, 0x2a            ; exit code 42
    0xEE,                    # 26  out dx, al              ; the VM stops here
    # halt:
    0xF4,                    # 27  hlt
    0xEB, 0xFD,              # 28  jmp halt (0x27)
    # puts:  print the NUL-terminated string at ds:si
    0xAC,                    # 2a  lodsb
    0x84, 0xC0,              # 2b  test al, al
    0x74, 0x05,              # 2d  jz .done (0x34)
    0xE8, 0x03, 0x00,        # 2f  call putc (0x35)
    0xEB, 0xF6,              # 32  jmp puts (0x2a)
    0xC3,                    # 34  .done: ret
    # putc:  print al on COM1 once the transmitter is empty
    0x88, 0xC4,              # 35  mov ah, al
    0xBA, 0xFD, 0x03,        # 37  mov dx, 0x3fd           ; line status register
    0xEC,                    # 3a  .wait: in al, dx
    0xA8, 0x20,              # 3b  test al, 0x20           ; THRE: holding register empty
    0x74, 0xFB,              # 3d  jz .wait (0x3a)
    0x88, 0xE0,              # 3f  mov al, ah
    0xBA, 0xF8, 0x03,        # 41  mov dx, 0x3f8           ; transmitter holding register
    0xEE,                    # 44  out dx, al
    0xC3,                    # 45  ret
])
# fmt: on

#: Offsets (from LOAD_ADDRESS) of the two strings, as the ``mov si`` immediates above say.
GREETING_OFFSET = 0x100
BYE_OFFSET = 0x140
#: The NUL-terminated strings the guest prints.
GREETING = b"Hello from a kvmd guest!\ncounting:\x00"
BYE = b"\nbye!\n\x00"


def _image() -> bytes:
    """Code, zero padding, then the strings at their fixed offsets."""
    assert len(CODE) <= GREETING_OFFSET
    assert GREETING_OFFSET + len(GREETING) <= BYE_OFFSET
    image = bytearray(BYE_OFFSET + len(BYE))
    image[: len(CODE)] = CODE
    image[GREETING_OFFSET : GREETING_OFFSET + len(GREETING)] = GREETING
    image[BYE_OFFSET:] = BYE
    return bytes(image)


#: The whole image written at LOAD_ADDRESS.
IMAGE = _image()

#: What the guest prints on COM1, exactly.
EXPECTED_CONSOLE = (
    GREETING[:-1] + b"".join(b" %d" % n for n in range(1, 10)) + BYE[:-1]
).decode("ascii")
