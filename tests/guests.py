"""Tiny hand-assembled guest programs and vCPU setup helpers, shared by every test layer.

Nothing here needs an assembler: each program is a list of bytes with the instruction it
encodes beside it (checked against nasm when written). Two CPU modes are offered:

* real mode (16-bit, CS base 0): `setup_real_mode(vcpu, entry)`, or `boot_real_mode(vm,
  code)` for memory, program, vCPU and registers in one call.
* long mode (64-bit, paging on): `setup_long_mode(vm, vcpu, entry)` writes an identity map
  of the first GiB (2 MiB pages: PML4 -> PDPT -> PD) and a flat GDT into guest memory, and
  loads `long_mode_sregs(...)`; `boot_long_mode(vm, code)` does it all.

On this project's hosts /dev/kvm is "PVM" nested virtualization: every guest instruction,
in any mode, goes through KVM's instruction emulator (~0.45 us each). Keep programs to a
few thousand instructions, and to integer instructions: SSE, and `int n` outside real
mode, end in an emulation failure there (see tests/kvm/test_kvm_pvm_quirks.py).

The standard layout, used unless a test says otherwise (all below GUEST_MEM_SIZE):

    0x0000  real-mode interrupt vector table (IVT)
    0x1000  CODE_ADDR: programs are loaded and entered here
    0x4000  DATA_ADDR: scratch data the programs read and write
    0x8000  STACK_TOP (the stack grows down from here); GDT_ADDR, the long-mode GDT
    0x9000  PML4_ADDR, PDPT at 0xA000, PD at 0xB000: long-mode page tables
    0x10000 GUEST_MEM_SIZE: end of the RAM slot; MMIO_ADDR lies beyond it
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from kvmd.kvm import KvmError, Regs, Segment, Sregs, Vcpu, VcpuExit, Vm

if TYPE_CHECKING:
    from kvmd.core.vm import ManagedVm

# True on hosts whose /dev/kvm is the "PVM" software nested virtualization (kvm_pvm module):
# every guest instruction is emulated there, and a few KVM behaviours differ (see
# tests/kvm/test_kvm_pvm_quirks.py).
ON_PVM = os.path.isdir("/sys/module/kvm_pvm")

PAGE_SIZE = 0x1000
CODE_ADDR = 0x1000
DATA_ADDR = 0x4000
STACK_TOP = 0x8000
GDT_ADDR = 0x8000
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
GUEST_MEM_SIZE = 0x10000
# An unbacked guest physical address for MMIO. Real-mode programs reach it through
# DS = MMIO_SEGMENT (physical = segment * 16 + offset).
MMIO_ADDR = 0x10000
MMIO_SEGMENT = MMIO_ADDR >> 4

DEBUG_PORT = 0xE9  # the traditional "debug console" port our programs write to
UART_PORT = 0x3F8  # COM1 data register

# Control register and EFER bits.
CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1  # bit 1 of RFLAGS always reads 1
RFLAGS_IF = 1 << 9

# Page-table entry bits.
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_HUGE = 1 << 7  # PS: a 2 MiB page in a PD entry

# GDT selectors written by setup_long_mode.
CODE64_SELECTOR = 0x08
DATA_SELECTOR = 0x10

# -- single instructions (valid in real mode; the 64-bit ones say so) ---------------------

HLT = bytes([
    0xF4,  # hlt
])
SPIN = bytes([
    0xEB, 0xFE,  # jmp $          (spins forever, never exits on its own)
])
OUT_DX_AL = bytes([
    0xEE,  # out dx, al
])
IN_AL_DX = bytes([
    0xEC,  # in al, dx
])
CLI = bytes([
    0xFA,  # cli
])
STI = bytes([
    0xFB,  # sti
])
IRET = bytes([
    0xCF,  # iret
])
UD2 = bytes([
    0x0F, 0x0B,  # ud2            (always #UD)
])


def mov_dx(value: int) -> bytes:
    """`mov dx, imm16` (real mode)."""
    return bytes([0xBA]) + struct.pack("<H", value)  # mov dx, value


def mov_al(value: int) -> bytes:
    """`mov al, imm8` (any mode)."""
    return bytes([0xB0, value & 0xFF])  # mov al, value


def mov_ax(value: int) -> bytes:
    """`mov ax, imm16` (real mode)."""
    return bytes([0xB8]) + struct.pack("<H", value)  # mov ax, value


def out_imm8_al(port: int) -> bytes:
    """`out imm8, al` (any mode; port < 256)."""
    return bytes([0xE6, port])  # out port, al


def mov_ds_ax() -> bytes:
    return bytes([
        0x8E, 0xD8,  # mov ds, ax
    ])


def mov_mem16_al(offset: int) -> bytes:
    """`mov [offset], al` (real mode, DS-relative)."""
    return bytes([0xA2]) + struct.pack("<H", offset)  # mov [offset], al


def mov_al_mem16(offset: int) -> bytes:
    """`mov al, [offset]` (real mode, DS-relative)."""
    return bytes([0xA0]) + struct.pack("<H", offset)  # mov al, [offset]


def mov_word_mem16_imm16(offset: int, value: int) -> bytes:
    """`mov word [offset], imm16` (real mode, DS-relative)."""
    return bytes([0xC7, 0x06]) + struct.pack("<HH", offset, value)  # mov word [off], value


def jmp_rel8(displacement: int) -> bytes:
    """`jmp short` by `displacement` bytes from the end of this 2-byte instruction."""
    return bytes([0xEB, displacement & 0xFF])  # jmp short $+2+displacement


# -- whole programs ----------------------------------------------------------------------


def real_mode_program(*parts: bytes | Iterable[int]) -> bytes:
    """Concatenate instruction encodings (bytes or lists of ints) into one program."""
    return b"".join(bytes(p) for p in parts)


def out_bytes_program(data: bytes, port: int = DEBUG_PORT, *, end: bytes = HLT) -> bytes:
    """Real mode: write each byte of `data` to `port` (one IO exit each), then `end`
    (HLT by default; SPIN to keep the vCPU busy afterwards)."""
    body = [mov_dx(port)]
    for b in data:
        body += [mov_al(b), OUT_DX_AL]
    return real_mode_program(*body, end)


def pio_loop_program(port: int = DEBUG_PORT, value: int = 0) -> bytes:
    """Real mode: `out port, al` forever; every iteration is one IO exit."""
    return real_mode_program(
        mov_dx(port),                # mov dx, port
        mov_al(value),               # mov al, value
        [0xEE,                       # loop: out dx, al
         0xEB, 0xFD],                #       jmp loop
    )


def in_then_out_program(in_port: int, out_port: int) -> bytes:
    """Real mode: read a byte from `in_port`, add one, write it to `out_port`, halt.

    The value the guest read is then visible twice: in AL and in the OUT exit's data.
    """
    return real_mode_program(
        mov_dx(in_port),             # mov dx, in_port
        IN_AL_DX,                    # in al, dx
        [0xFE, 0xC0],                # inc al
        mov_dx(out_port),            # mov dx, out_port
        OUT_DX_AL,                   # out dx, al
        HLT,                         # hlt
    )


def mmio_write_read_program(value: int, offset: int = 0) -> bytes:
    """Real mode: store `value` (a byte) to MMIO_ADDR+offset, load a byte back from
    MMIO_ADDR+offset+8 into AL, copy it to BL, halt. Two MMIO exits: a write, then a read."""
    return real_mode_program(
        mov_ax(MMIO_SEGMENT),        # mov ax, MMIO_SEGMENT
        mov_ds_ax(),                 # mov ds, ax
        mov_al(value),               # mov al, value
        mov_mem16_al(offset),        # mov [offset], al         -> MMIO write
        mov_al_mem16(offset + 8),    # mov al, [offset + 8]     -> MMIO read
        [0x88, 0xC3],                # mov bl, al
        HLT,                         # hlt
    )


def store_pages_program(first_page: int, count: int, stride: int = PAGE_SIZE,
                        value: int = 0xAB, *, end: bytes = HLT) -> bytes:
    """Real mode: store `value` at the first byte of `count` pages starting at guest page
    `first_page` (addresses below 64 KiB), `stride` bytes apart, then `end` (HLT by
    default; b"" to chain another program after it)."""
    addr = first_page * PAGE_SIZE
    if addr + (count - 1) * stride >= 0x10000:
        raise ValueError("store_pages_program reaches only the first 64 KiB")
    return real_mode_program(
        [0x31, 0xC0],                           # xor ax, ax
        mov_ds_ax(),                            # mov ds, ax
        [0xBB], struct.pack("<H", addr),        # mov bx, addr
        [0xB9], struct.pack("<H", count),       # mov cx, count
        # loop:
        [0xC6, 0x07, value & 0xFF],             # mov byte [bx], value
        [0x81, 0xC3], struct.pack("<H", stride),  # add bx, stride
        [0xE2, 0xF7],                           # loop loop    (dec cx; jnz)
        end,
    )


# -- vCPU setup ---------------------------------------------------------------------------


def real_mode_sregs(sregs: Sregs) -> Sregs:
    """Make a vCPU's reset sregs flat real mode: every data/code segment base and selector 0
    (the reset CS is F000:FFF0 with base 0xFFFF0000)."""
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = getattr(sregs, name)
        seg.base = 0
        seg.selector = 0
    return sregs


def setup_real_mode(vcpu: Vcpu, entry: int = CODE_ADDR, *, rsp: int = STACK_TOP,
                    rflags: int = RFLAGS_RESERVED, **regs: int) -> None:
    """Point a fresh vCPU at `entry` in real mode (CS base/selector 0, IP = entry).

    Extra keyword arguments set general registers (`rax=1`, `rbx=...`).
    """
    vcpu.set_sregs(real_mode_sregs(vcpu.get_sregs()))
    vcpu.set_regs(Regs(rip=entry, rsp=rsp, rflags=rflags, **regs))


def load_program(vm: Vm, code: bytes, addr: int = CODE_ADDR) -> None:
    """Write a program into guest memory (the slot must already exist)."""
    vm.write(addr, code)


def boot_real_mode(vm: Vm, code: bytes, *, mem_size: int = GUEST_MEM_SIZE,
                   entry: int = CODE_ADDR, vcpu_id: int = 0, **regs: int) -> Vcpu:
    """The common case in one call: RAM at 0 (slot 0), `code` at `entry`, a vCPU set up for
    real mode at `entry`. Returns the vCPU (owned by `vm`)."""
    vm.add_memory_region(0, mem_size)
    load_program(vm, code, entry)
    vcpu = vm.create_vcpu(vcpu_id)
    setup_real_mode(vcpu, entry, **regs)
    return vcpu


def identity_page_tables(pml4_addr: int = PML4_ADDR, pdpt_addr: int = PDPT_ADDR,
                         pd_addr: int = PD_ADDR) -> dict[int, bytes]:
    """Page tables mapping guest virtual = physical for the first GiB with 2 MiB pages.

    Returns {guest physical address: page contents} for the PML4, PDPT and PD.
    """
    flags = PTE_PRESENT | PTE_WRITABLE
    pml4 = struct.pack("<Q", pdpt_addr | flags).ljust(PAGE_SIZE, b"\0")
    pdpt = struct.pack("<Q", pd_addr | flags).ljust(PAGE_SIZE, b"\0")
    pd = b"".join(struct.pack("<Q", (i << 21) | flags | PTE_HUGE) for i in range(512))
    return {pml4_addr: pml4, pdpt_addr: pdpt, pd_addr: pd}


def flat_gdt() -> bytes:
    """A GDT with a null descriptor, a 64-bit code segment (CODE64_SELECTOR) and a flat
    read/write data segment (DATA_SELECTOR)."""
    return struct.pack(
        "<QQQ",
        0,                            # null
        0x00AF_9B00_0000_FFFF,        # code: base 0, limit 4G, P, DPL0, S, exec/read, L, G
        0x00CF_9300_0000_FFFF,        # data: base 0, limit 4G, P, DPL0, S, read/write, D, G
    )


def long_mode_sregs(sregs: Sregs, cr3: int = PML4_ADDR, gdt_addr: int = GDT_ADDR) -> Sregs:
    """Turn `sregs` into 64-bit long mode: CR0.PE|PG, CR4.PAE, EFER.LME|LMA, CR3 = `cr3`,
    a 64-bit code segment and flat data segments matching `flat_gdt()` at `gdt_addr`."""
    code = Segment(base=0, limit=0xFFFFFFFF, selector=CODE64_SELECTOR, type=11, present=1,
                   dpl=0, db=0, s=1, l=1, g=1)
    sregs.cs = code
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, Segment(base=0, limit=0xFFFFFFFF, selector=DATA_SELECTOR,
                                     type=3, present=1, dpl=0, db=1, s=1, l=0, g=1))
    sregs.gdt.base = gdt_addr
    sregs.gdt.limit = len(flat_gdt()) - 1
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
    sregs.cr3 = cr3
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA
    return sregs


def setup_long_mode(vm: Vm, vcpu: Vcpu, entry: int = CODE_ADDR, *, rsp: int = STACK_TOP,
                    pml4_addr: int = PML4_ADDR, gdt_addr: int = GDT_ADDR,
                    rflags: int = RFLAGS_RESERVED, **regs: int) -> None:
    """Write identity page tables and a flat GDT into guest memory (which must back
    them), then put the vCPU in 64-bit mode at `entry`."""
    tables = identity_page_tables(pml4_addr, pml4_addr + PAGE_SIZE, pml4_addr + 2 * PAGE_SIZE)
    for addr, page in tables.items():
        vm.write(addr, page)
    vm.write(gdt_addr, flat_gdt())
    vcpu.set_sregs(long_mode_sregs(vcpu.get_sregs(), pml4_addr, gdt_addr))
    vcpu.set_regs(Regs(rip=entry, rsp=rsp, rflags=rflags, **regs))


def boot_long_mode(vm: Vm, code: bytes, *, mem_size: int = GUEST_MEM_SIZE,
                   entry: int = CODE_ADDR, vcpu_id: int = 0, **regs: int) -> Vcpu:
    """RAM at 0 (slot 0), 64-bit `code` at `entry`, a vCPU in long mode at `entry`."""
    vm.add_memory_region(0, mem_size)
    load_program(vm, code, entry)
    vcpu = vm.create_vcpu(vcpu_id)
    setup_long_mode(vm, vcpu, entry, **regs)
    return vcpu


# 64-bit programs (for long mode).
LONG_MODE_OUT_HLT = bytes([
    0xBA, 0xE9, 0x00, 0x00, 0x00,  # mov edx, 0xe9
    0xB8, 0x64, 0x00, 0x00, 0x00,  # mov eax, 0x64     ('d')
    0xEE,                          # out dx, al
    0xF4,                          # hlt
])


# -- interrupts through the in-kernel 8259 PIC -------------------------------------------

PIC_MASTER_CMD = 0x20
PIC_MASTER_DATA = 0x21
PIC_VECTOR_BASE = 0x20
PIC_READY = 0xAA  # what pic_irq_program writes to its port once the PIC is programmed


def interrupt_program(vector: int, port: int = DEBUG_PORT, *, pic_irq: int | None = None,
                      pic_vector_base: int = PIC_VECTOR_BASE, entry: int = CODE_ADDR) -> bytes:
    """Real mode: an idle loop that reports each interrupt `vector` it takes.

    Points the IVT entry for `vector` at a handler, writes PIC_READY to `port`, then loops
    on `sti; hlt`. The handler writes `vector` to `port` (AL = vector) and returns with
    `iret`. So the test sees one IoExit(PIC_READY), then one IoExit(vector) per interrupt;
    with the in-kernel irqchip HLT itself stays in the kernel (no HltExit).

    With `pic_irq`, the program first initializes the master 8259 (ICW1-4, vectors from
    `pic_vector_base`) and unmasks only that pin, and the handler sends the PIC an EOI;
    `vector` must then be `pic_vector_base + pic_irq`.
    """
    if port > 0xFF or not 0 <= vector < 256:
        raise ValueError("port must be < 256 and vector 0..255")
    prefix = [CLI]                                  # cli
    eoi: list[bytes] = []
    if pic_irq is not None:
        if not 0 <= pic_irq < 8 or vector != pic_vector_base + pic_irq:
            raise ValueError("pic_irq must be 0..7 and vector pic_vector_base + pic_irq")
        prefix += [
            mov_al(0x11), out_imm8_al(PIC_MASTER_CMD),  # ICW1: edge, cascade, ICW4 follows
            mov_al(pic_vector_base), out_imm8_al(PIC_MASTER_DATA),  # ICW2: vector base
            mov_al(0x04), out_imm8_al(PIC_MASTER_DATA),  # ICW3: a slave on IR2
            mov_al(0x01), out_imm8_al(PIC_MASTER_DATA),  # ICW4: 8086 mode, normal EOI
            mov_al(~(1 << pic_irq) & 0xFF), out_imm8_al(PIC_MASTER_DATA),  # OCW1: unmask
        ]
        eoi = [mov_al(0x20), out_imm8_al(PIC_MASTER_CMD)]  # OCW2: non-specific EOI
    prefix += [
        [0x31, 0xC0],                               # xor ax, ax
        mov_ds_ax(),                                # mov ds, ax
    ]
    idle = real_mode_program(
        mov_al(PIC_READY), out_imm8_al(port),       # out port, PIC_READY
        STI,                                        # idle: sti
        HLT,                                        #       hlt
        jmp_rel8(-4),                               #       jmp idle
    )
    head = real_mode_program(*prefix)
    set_ivt_len = 2 * len(mov_word_mem16_imm16(0, 0))
    handler = entry + len(head) + set_ivt_len + len(idle)
    return real_mode_program(
        head,
        mov_word_mem16_imm16(vector * 4, handler),  # mov word [vector*4], handler  (IP)
        mov_word_mem16_imm16(vector * 4 + 2, 0),    # mov word [vector*4+2], 0      (CS)
        idle,
        # handler:
        *eoi,                                       # (PIC EOI)
        mov_al(vector), out_imm8_al(port),          # out port, vector
        IRET,                                       # iret
    )


def pic_irq_program(irq: int, port: int = DEBUG_PORT, vector_base: int = PIC_VECTOR_BASE,
                    entry: int = CODE_ADDR) -> bytes:
    """Real mode, for a VM with the in-kernel irqchip: program the master 8259 so that pin
    `irq` raises vector `vector_base + irq`, and report each such interrupt on `port`
    (see `interrupt_program`)."""
    return interrupt_program(vector_base + irq, port, pic_irq=irq,
                             pic_vector_base=vector_base, entry=entry)


# -- running and checking ---------------------------------------------------------------


def open_kvm_fds() -> dict[int, str]:
    """This process' open fds that belong to KVM (/dev/kvm, VMs, vCPUs, stats, devices) or
    to kvmd guest memory (memfd "kvmd-slot*"), as {fd: link}. Compare before/after to find
    leaks without being disturbed by unrelated fds other threads open meanwhile."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if "kvm" in link:
            fds[int(name)] = link
    return fds


def run_guarded(vcpu: Vcpu, timeout: float = 10.0) -> VcpuExit:
    """`vcpu.run()`, but kicked out after `timeout` seconds so a guest that never exits
    fails its test (with an IntrExit) instead of hanging the suite."""
    timer = threading.Timer(timeout, _kick_quietly, (vcpu,))
    timer.daemon = True
    timer.start()
    try:
        return vcpu.run()
    finally:
        timer.cancel()


def _kick_quietly(vcpu: Vcpu) -> None:
    with contextlib.suppress(KvmError):
        vcpu.kick()


def boot(vm: ManagedVm, code: bytes, vcpus: int = 1) -> None:
    """Memory at 0, the program at CODE_ADDR, vCPUs in real mode at its entry."""
    vm.add_memory_region(0, GUEST_MEM_SIZE, False, False)
    vm.write_memory(CODE_ADDR, code)
    for i in range(vcpus):
        v = vm.create_vcpu(i)
        v.set_sregs(real_mode_sregs(v.get_sregs()))
        v.set_regs(Regs(rip=CODE_ADDR, rflags=2, rsp=0x8000))
