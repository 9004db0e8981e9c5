"""Running real guest code: every exit kind this host can produce, completing IN and MMIO
reads, kicking a spinning vCPU out of KVM_RUN, and the decoding of exit kinds no guest here
can produce (from hand-filled exit structs)."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest
from guests import (
    CODE_ADDR,
    DATA_ADDR,
    DEBUG_PORT,
    HLT,
    LONG_MODE_OUT_HLT,
    MMIO_ADDR,
    SPIN,
    UART_PORT,
    UD2,
    boot_long_mode,
    boot_real_mode,
    in_then_out_program,
    mmio_write_read_program,
    mov_dx,
    out_bytes_program,
    real_mode_program,
    run_guarded,
    setup_real_mode,
)

from kvmd.kvm import (
    EXIT_REASON_NAMES,
    DebugExit,
    ExceptionExit,
    FailEntryExit,
    HltExit,
    HypercallExit,
    HypervExit,
    InternalErrorExit,
    IntrExit,
    IoapicEoiExit,
    IoExit,
    IoSpace,
    KvmError,
    MmioExit,
    OtherExit,
    PioMap,
    RdMsrExit,
    ShutdownExit,
    SystemEventExit,
    ThreadScheduling,
    UartRegs,
    Vcpu,
    Vm,
    WrMsrExit,
)
from kvmd.kvm._ffi import ffi, lib
from kvmd.kvm.exits import decode_exit

# The kick, not run_guarded's own (10 s later), ended the run. How fast a kick is (the
# issue asks for 100 ms; about 0.1 ms here) is a benchmark's figure (run_control.py's
# PauseVm p99), not a test's: a loaded host delays the returning thread past any tight bound.
KICK_BOUND = 5.0
EFER_LMA = 1 << 10
MSR_EXIT_UNKNOWN = 1 << 1   # KVM_MSR_EXIT_REASON_UNKNOWN


def _out(data: bytes, port: int = DEBUG_PORT, size: int = 1) -> IoExit:
    return IoExit(is_write=True, port=port, size=size, count=1, data=data)


def _in(port: int, size: int = 1, count: int = 1) -> IoExit:
    return IoExit(is_write=False, port=port, size=size, count=count, data=b"")


def _errno_of(call: object, *args: object) -> int | None:
    with pytest.raises(KvmError) as exc:
        call(*args)  # type: ignore[operator]
    return exc.value.errno


# -- port IO -----------------------------------------------------------------------------


def test_pio_out(vm: Vm) -> None:
    vcpu = boot_real_mode(vm, out_bytes_program(b"hi", UART_PORT))
    assert run_guarded(vcpu) == _out(b"h", UART_PORT)
    assert run_guarded(vcpu) == _out(b"i", UART_PORT)
    assert isinstance(run_guarded(vcpu), HltExit)
    counts = vcpu.exit_counts()
    assert (counts["io"], counts["io_out"], counts["io_in"], counts["hlt"]) == (2, 2, 0, 1)


def test_pio_in_value_reaches_the_guest(vm: Vm) -> None:
    # The guest reads port 0x10, adds one, writes the result to port 0x11.
    vcpu = boot_real_mode(vm, in_then_out_program(0x10, 0x11))
    assert run_guarded(vcpu) == _in(0x10)
    vcpu.complete_io_in(b"\x41")
    assert run_guarded(vcpu) == _out(b"\x42", 0x11)
    assert vcpu.get_regs().rax & 0xFF == 0x42
    assert isinstance(run_guarded(vcpu), HltExit)
    assert vcpu.exit_counts()["io_in"] == 1


def test_exit_counts_restore_round_trip(vm: Vm) -> None:
    """restore_exit_counts sets every counter exit_counts reports, `other` included, so a
    restored vCPU reports what the saved one did; unknown names are ignored."""
    vcpu = vm.create_vcpu(0)
    saved = {name: i + 1 for i, name in enumerate(vcpu.exit_counts())}
    vcpu.restore_exit_counts({**saved, "no_such_counter": 7})
    assert vcpu.exit_counts() == saved


def test_count_unclaimed_counts_by_space(vm: Vm) -> None:
    """count_unclaimed adds one to the counter of the access's space: a port to
    unclaimed_pio, an MMIO access to unclaimed_mmio."""
    vcpu = vm.create_vcpu(0)
    vcpu.count_unclaimed(IoSpace.PIO)
    vcpu.count_unclaimed(IoSpace.MMIO)
    vcpu.count_unclaimed(IoSpace.MMIO)
    counts = vcpu.exit_counts()
    assert (counts["unclaimed_pio"], counts["unclaimed_mmio"]) == (1, 2)


def test_complete_pending_io_finishes_the_in_without_running_the_guest(vm: Vm) -> None:
    # KVM writes IN data into AL and moves RIP past the instruction only at the next
    # KVM_RUN; complete_pending_io does that entry with immediate_exit, running no guest code.
    vcpu = boot_real_mode(vm, in_then_out_program(0x10, 0x11))
    assert run_guarded(vcpu) == _in(0x10)
    rip_at_in = vcpu.get_regs().rip
    vcpu.complete_io_in(b"\x41")
    before = vcpu.exit_counts()
    vcpu.complete_pending_io()
    regs = vcpu.get_regs()
    assert regs.rax & 0xFF == 0x41 and regs.rip == rip_at_in + 1  # `in al, dx` is 1 byte
    assert vcpu.exit_counts() == before  # not counted as an exit
    assert run_guarded(vcpu) == _out(b"\x42", 0x11)  # and the guest goes on normally


def test_complete_io_in_refused(vm: Vm) -> None:
    vcpu = boot_real_mode(vm, in_then_out_program(0x10, 0x11))
    assert run_guarded(vcpu) == _in(0x10)
    assert _errno_of(vcpu.complete_io_in, b"\x41\x41") == errno.EINVAL   # too long
    assert _errno_of(vcpu.complete_io_in, b"") == errno.EINVAL           # too short
    assert _errno_of(vcpu.complete_mmio_read, b"\x41") == errno.EINVAL   # not an MMIO exit
    assert _errno_of(vcpu.complete_msr, 1) == errno.EINVAL               # not an MSR exit
    vcpu.complete_io_in(b"\x41")
    assert run_guarded(vcpu) == _out(b"\x42", 0x11)
    assert _errno_of(vcpu.complete_io_in, b"\x41") == errno.EINVAL       # an OUT, not an IN


def test_pio_sizes_and_string_io(vm: Vm) -> None:
    vcpu = boot_real_mode(vm, real_mode_program(
        [0x31, 0xC0],                         # xor ax, ax
        [0x8E, 0xD8],                         # mov ds, ax
        [0x8E, 0xC0],                         # mov es, ax
        [0xBE, 0x00, 0x40],                   # mov si, DATA_ADDR
        [0xBF, 0x00, 0x50],                   # mov di, DATA_ADDR + 0x1000
        [0xB9, 0x04, 0x00],                   # mov cx, 4
        mov_dx(DEBUG_PORT),                   # mov dx, DEBUG_PORT
        [0xF3, 0x6E],                         # rep outsb
        [0xB9, 0x04, 0x00],                   # mov cx, 4
        [0xF3, 0x6C],                         # rep insb
        [0xED],                               # in ax, dx
        [0xEF],                               # out dx, ax
        [0x66, 0xB8, 0x78, 0x56, 0x34, 0x12],  # mov eax, 0x12345678
        [0x66, 0xEF],                         # out dx, eax
        HLT,                                  # hlt
    ))
    vm.write(DATA_ADDR, b"WXYZ")
    # rep outsb: one exit per byte.
    for byte in b"WXYZ":
        assert run_guarded(vcpu) == _out(bytes([byte]))
    # rep insb: one exit for all four bytes (count 4), completed at once.
    assert run_guarded(vcpu) == _in(DEBUG_PORT, 1, 4)
    vcpu.complete_io_in(b"abcd")
    assert run_guarded(vcpu) == _in(DEBUG_PORT, 2)
    assert vm.read(DATA_ADDR + 0x1000, 4) == b"abcd"
    vcpu.complete_io_in(b"\x34\x12")
    assert run_guarded(vcpu) == _out(b"\x34\x12", size=2)
    assert run_guarded(vcpu) == _out(b"\x78\x56\x34\x12", size=4)
    assert isinstance(run_guarded(vcpu), HltExit)


# -- MMIO --------------------------------------------------------------------------------


def test_mmio_write_and_read(vm: Vm) -> None:
    # mmio_write_read_program: store 0x5a to MMIO_ADDR+0x10, load MMIO_ADDR+0x18 into AL,
    # copy AL to BL, hlt.
    vcpu = boot_real_mode(vm, mmio_write_read_program(0x5A, 0x10))
    assert run_guarded(vcpu) == MmioExit(address=MMIO_ADDR + 0x10, length=1, is_write=True,
                                         data=b"\x5a")
    assert run_guarded(vcpu) == MmioExit(address=MMIO_ADDR + 0x18, length=1, is_write=False,
                                         data=b"")
    assert _errno_of(vcpu.complete_mmio_read, b"\x77\x77") == errno.EINVAL   # too long
    assert _errno_of(vcpu.complete_mmio_read, b"") == errno.EINVAL           # too short
    assert _errno_of(vcpu.complete_io_in, b"\x77") == errno.EINVAL           # not an IN
    vcpu.complete_mmio_read(b"\x77")
    assert isinstance(run_guarded(vcpu), HltExit)
    assert vcpu.get_regs().rbx & 0xFF == 0x77
    counts = vcpu.exit_counts()
    assert (counts["mmio"], counts["mmio_write"], counts["mmio_read"]) == (2, 1, 1)


def test_mmio_dword_write(vm: Vm) -> None:
    vcpu = boot_real_mode(vm, real_mode_program(
        [0xB8, 0x00, 0x10],                          # mov ax, MMIO_ADDR >> 4
        [0x8E, 0xD8],                                # mov ds, ax
        [0x66, 0xB8, 0xEF, 0xBE, 0xAD, 0xDE],        # mov eax, 0xdeadbeef
        [0x66, 0xA3, 0x20, 0x00],                    # mov [0x20], eax
        HLT,                                         # hlt
    ))
    assert run_guarded(vcpu) == MmioExit(address=MMIO_ADDR + 0x20, length=4, is_write=True,
                                         data=bytes.fromhex("efbeadde"))
    counts = vcpu.exit_counts()  # a write alone: counted as one, not as a read
    assert (counts["mmio"], counts["mmio_write"], counts["mmio_read"]) == (1, 1, 0)


def test_hlt(vm: Vm) -> None:
    vcpu = boot_real_mode(vm, HLT)
    ex = run_guarded(vcpu)
    assert ex == HltExit()
    assert ex.name == "hlt"
    assert vcpu.get_regs().rip == CODE_ADDR + 1


# -- long mode ---------------------------------------------------------------------------


def test_long_mode_guest(vm: Vm) -> None:
    # 64-bit code with paging on (identity map through PML4/PDPT/PD in guest memory).
    vcpu = boot_long_mode(vm, LONG_MODE_OUT_HLT)
    assert vcpu.get_sregs().efer & EFER_LMA
    assert run_guarded(vcpu) == _out(b"d")
    assert isinstance(run_guarded(vcpu), HltExit)
    assert vcpu.get_regs().rip == CODE_ADDR + len(LONG_MODE_OUT_HLT)


def test_long_mode_mmio_through_page_tables(vm: Vm) -> None:
    # 0x200000 is mapped by the second 2 MiB page but backed by no slot.
    vcpu = boot_long_mode(vm, bytes([
        0xC6, 0x04, 0x25, 0x08, 0x00, 0x20, 0x00, 0x77,  # mov byte [0x200008], 0x77
        0x48, 0x8B, 0x1C, 0x25, 0x10, 0x00, 0x20, 0x00,  # mov rbx, [0x200010]
        0xF4,                                            # hlt
    ]))
    assert run_guarded(vcpu) == MmioExit(address=0x200008, length=1, is_write=True,
                                         data=b"\x77")
    assert run_guarded(vcpu) == MmioExit(address=0x200010, length=8, is_write=False,
                                         data=b"")
    vcpu.complete_mmio_read(bytes(range(1, 9)))
    assert isinstance(run_guarded(vcpu), HltExit)
    assert vcpu.get_regs().rbx == 0x0807060504030201


# -- kicking out of KVM_RUN --------------------------------------------------------------


def _kicked_run(vcpu: Vcpu, delay: float = 0.05) -> tuple[object, float]:
    """Run `vcpu` (a spinning guest) here; kick it from another thread after `delay`.
    Returns the exit and the time from kick() to run() returning."""
    kicked_at: list[float] = []

    def kicker() -> None:
        time.sleep(delay)
        kicked_at.append(time.monotonic())
        vcpu.kick()

    t = threading.Thread(target=kicker, daemon=True)
    t.start()
    ex = run_guarded(vcpu, timeout=10)
    returned = time.monotonic()
    t.join()
    return ex, returned - kicked_at[0]


@pytest.mark.parametrize("boot", [boot_real_mode, boot_long_mode], ids=["real", "long"])
def test_kick_spinning_guest(vm: Vm, boot: object) -> None:
    vcpu = boot(vm, SPIN)  # type: ignore[operator]
    for _ in range(3):
        ex, latency = _kicked_run(vcpu)
        assert ex == IntrExit()
        assert latency < KICK_BOUND, f"kick took {latency * 1000:.1f} ms"
        assert vcpu.get_regs().rip == CODE_ADDR   # still spinning on `jmp $`
        vcpu.set_immediate_exit(False)
    assert vcpu.exit_counts()["intr"] == 3


def test_kick_before_run(vm: Vm) -> None:
    vcpu = boot_real_mode(vm, HLT)
    vcpu.kick()   # not running: the next run returns at once
    assert vcpu.run() == IntrExit()
    assert vcpu.run() == IntrExit()   # until immediate_exit is cleared
    vcpu.set_immediate_exit(False)
    assert isinstance(run_guarded(vcpu), HltExit)


def test_immediate_exit_completes_pending_io(vm: Vm) -> None:
    # The pause pattern: after an IN exit, complete it, set immediate_exit and run once; the
    # kernel finishes the IN (AL holds the value) and returns before the next instruction.
    vcpu = boot_real_mode(vm, in_then_out_program(0x10, 0x11))
    assert run_guarded(vcpu) == _in(0x10)
    vcpu.complete_io_in(b"\x20")
    vcpu.set_immediate_exit(True)
    assert vcpu.run() == IntrExit()
    assert vcpu.get_regs().rax & 0xFF == 0x20
    vcpu.set_immediate_exit(False)
    assert run_guarded(vcpu) == _out(b"\x21", 0x11)


def test_run_in_two_threads_is_ebusy(vm: Vm) -> None:
    vcpu = boot_real_mode(vm, SPIN)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(run_guarded(vcpu)), daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while not vcpu.is_running and time.monotonic() < deadline:
        time.sleep(0.001)
    assert vcpu.is_running
    assert _errno_of(vcpu.run) == errno.EBUSY
    # Completing pending IO enters KVM_RUN too: refused, not queued behind the running one.
    assert _errno_of(vcpu.complete_pending_io) == errno.EBUSY
    vcpu.kick()
    t.join(5)
    assert result == [IntrExit()]
    assert not vcpu.is_running


def test_close_stops_a_running_vcpu(vm: Vm) -> None:
    vcpu = boot_long_mode(vm, SPIN)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(vcpu.run()), daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while not vcpu.is_running and time.monotonic() < deadline:
        time.sleep(0.001)
    vm.close()   # closes the vCPU: kicks it and waits for run() to return
    t.join(5)
    assert not t.is_alive()
    assert result == [IntrExit()]
    assert vcpu.closed


# -- run_until_unhandled: unclaimed ports completed in C ---------------------------------


def test_run_until_unhandled(vm: Vm) -> None:
    vcpu = boot_real_mode(vm, real_mode_program(
        mov_dx(0x80),            # mov dx, 0x80        (unclaimed)
        [0xB0, 0x01],            # mov al, 1
        [0xEE],                  # out dx, al          -> dropped in C
        [0xEC],                  # in al, dx           -> 0xff in C
        mov_dx(DEBUG_PORT),      # mov dx, DEBUG_PORT  (claimed)
        [0xEE],                  # out dx, al          -> returned
        HLT,                     # hlt
    ))
    pio = PioMap()
    pio.set_claimed(DEBUG_PORT, 1, True)
    assert pio.is_claimed(DEBUG_PORT) and not pio.is_claimed(0x80)
    assert vcpu.run_until_unhandled(pio) == _out(b"\xff")
    assert isinstance(vcpu.run_until_unhandled(pio), HltExit)
    counts = vcpu.exit_counts()
    assert counts["unclaimed_pio"] == 2
    assert (counts["io"], counts["io_in"], counts["io_out"]) == (3, 1, 2)


def test_uart_output_is_completed_in_c_while_it_fits_the_ring(vm: Vm) -> None:
    # A 16-byte ring and 17 OUTs: the 16th fills it exactly (still done in C), the 17th
    # does not fit and comes back to the caller, counted as a full ring, nothing changed.
    vcpu = boot_real_mode(vm, real_mode_program(
        mov_dx(UART_PORT), [0xB0, ord("A")],   # mov dx, COM1; mov al, 'A'
        [0xEE] * 17,                            # out dx, al (x17)
        HLT))
    uart = UartRegs(UART_PORT, tx_bytes=16, rx_bytes=16)
    pio = PioMap()
    pio.attach_uart(uart)
    assert vcpu.run_until_unhandled(pio) == _out(b"A", UART_PORT)
    stats = uart.stats()
    assert (stats.tx_bytes, stats.tx_pending, stats.ring_full) == (16, 16, 1)
    assert uart.take_output() == b"A" * 16
    assert uart.write(0, ord("A"))  # the caller's path completes the returned OUT
    assert isinstance(vcpu.run_until_unhandled(pio), HltExit)
    assert uart.take_output() == b"A"


def test_a_uart_takes_all_eight_of_its_ports(vm: Vm) -> None:
    """Attaching a UART hands all its eight ports to it, the last (the scratch register,
    base+7) included: a byte written there in C reads back in C."""
    vcpu = boot_real_mode(vm, real_mode_program(
        mov_dx(UART_PORT + 7), [0xB0, 0x5A, 0xEE],   # mov al, 0x5a; out dx, al (SCR)
        [0xB0, 0x00, 0xEC],                           # mov al, 0; in al, dx (SCR)
        mov_dx(DEBUG_PORT), [0xEE],                   # out dx, al (claimed: returned)
        HLT))
    uart = UartRegs(UART_PORT, tx_bytes=16, rx_bytes=16)
    pio = PioMap()
    pio.attach_uart(uart)
    pio.set_claimed(DEBUG_PORT, 1, True)
    assert vcpu.run_until_unhandled(pio) == _out(b"\x5a")
    assert vcpu.exit_counts()["unclaimed_pio"] == 0


def test_a_wide_in_from_a_uart_port_reads_ones_above_the_register(vm: Vm) -> None:
    # As Uart16550.read pads a 16-bit read, and as unclaimed ports read: 0xff.
    vcpu = boot_real_mode(vm, real_mode_program(
        mov_dx(UART_PORT + 5), [0xED],          # in ax, dx (LSR, completed in C)
        mov_dx(DEBUG_PORT), [0xEF],             # out dx, ax (claimed: returned)
        HLT))
    uart = UartRegs(UART_PORT, tx_bytes=16, rx_bytes=16)
    pio = PioMap()
    pio.attach_uart(uart)
    pio.set_claimed(DEBUG_PORT, 2, True)
    assert vcpu.run_until_unhandled(pio) == _out(b"\x60\xff", size=2)  # THRE|TEMT


def _entered_with(vcpu: Vcpu, sched: ThreadScheduling) -> tuple[object, int]:
    """Run `vcpu` once with `sched` in a thread of its own (the test's keeps its priority):
    the exit, and that thread's nice value after it."""
    out: list[tuple[object, int]] = []

    def enter() -> None:
        exit_ = vcpu.run_until_unhandled(PioMap(), sched)
        out.append((exit_, os.getpriority(os.PRIO_PROCESS, 0)))  # 0: this thread

    t = threading.Thread(target=enter)
    t.start()
    t.join(10)
    assert out, "the run did not return"
    return out[0]


def test_run_until_unhandled_lowers_the_calling_thread_first(vm: Vm) -> None:
    """The scheduling is the calling thread's before the guest runs (set in C, where the
    GIL is released); a vCPU already kicked keeps its priority (`applied` False)."""
    vcpu = boot_real_mode(vm, real_mode_program(HLT))
    lower = ThreadScheduling(os.SCHED_OTHER, 7, default_slice=False)
    vcpu.set_immediate_exit(True)  # kicked: nothing changes, the run returns at once
    exit_, nice = _entered_with(vcpu, lower)
    assert isinstance(exit_, IntrExit) and nice == 0
    assert not lower.applied and lower.error == 0
    vcpu.set_immediate_exit(False)
    exit_, nice = _entered_with(vcpu, lower)
    assert isinstance(exit_, HltExit) and nice == 7
    assert lower.applied and lower.error == 0


def test_run_until_unhandled_reports_a_scheduling_it_could_not_set(vm: Vm) -> None:
    vcpu = boot_real_mode(vm, real_mode_program(HLT))
    bad = ThreadScheduling(99, 0, default_slice=False)  # no such policy
    exit_, _nice = _entered_with(vcpu, bad)
    assert isinstance(exit_, HltExit)  # the guest still ran
    assert bad.applied and bad.error == errno.EINVAL


def test_a_pio_map_takes_one_uart() -> None:
    """A second UART on the same map is refused (EINVAL): the first stays attached."""
    pio = PioMap()
    first = UartRegs(UART_PORT, tx_bytes=16, rx_bytes=16)
    pio.attach_uart(first)
    assert _errno_of(pio.attach_uart, UartRegs(0x2F8, tx_bytes=16, rx_bytes=16)) \
        == errno.EINVAL
    assert pio.uart is first and pio.is_claimed(0x2F8) is False


def test_pio_map_range_checks() -> None:
    pio = PioMap(unclaimed=False)
    assert pio.is_claimed(0) and pio.is_claimed(0xFFFF)
    pio.set_claimed(0xFFF0, 0x10, False)
    assert not pio.is_claimed(0xFFFF)
    for first, length in ((0xFFFF, 2), (-1, 1), (0, -1)):
        assert _errno_of(pio.set_claimed, first, length, True) == errno.EINVAL


# -- other exits a guest can produce here ------------------------------------------------


def test_shutdown_on_triple_fault(vm: Vm) -> None:
    # Long mode with an empty IDT: ud2 raises #UD, whose delivery faults (#GP, then #DF):
    # a triple fault, which KVM reports as KVM_EXIT_SHUTDOWN.
    vcpu = boot_long_mode(vm, UD2)
    sregs = vcpu.get_sregs()
    sregs.idt.base, sregs.idt.limit = 0, 0
    vcpu.set_sregs(sregs)
    ex = run_guarded(vcpu)
    assert ex == ShutdownExit()
    assert ex.name == "shutdown"


@pytest.mark.parametrize("boot", [boot_real_mode, boot_long_mode], ids=["real", "long"])
def test_internal_error_on_fetch_from_mmio(vm: Vm, boot: object) -> None:
    # Executing from guest-physical memory no slot backs: KVM cannot emulate an
    # instruction fetch from MMIO and reports an emulation failure.
    vcpu = boot(vm, HLT)  # type: ignore[operator]
    regs = vcpu.get_regs()
    if boot is boot_real_mode:
        sregs = vcpu.get_sregs()   # CS:IP = 1000:0000, physical MMIO_ADDR
        sregs.cs.base, sregs.cs.selector = MMIO_ADDR, MMIO_ADDR >> 4
        vcpu.set_sregs(sregs)
        regs.rip = 0
    else:
        regs.rip = 0x200000   # identity-mapped, but no slot
    vcpu.set_regs(regs)
    ex = run_guarded(vcpu)
    assert isinstance(ex, InternalErrorExit)
    assert ex.suberror == lib.KVM_INTERNAL_ERROR_EMULATION
    assert ex.suberror_name == "emulation"


def test_debug_exit_single_step(vm: Vm) -> None:
    vcpu = boot_real_mode(vm, real_mode_program(
        [0xB0, 0x01],   # mov al, 1
        [0xB3, 0x02],   # mov bl, 2
        [0xFE, 0xC0],   # inc al
        HLT,            # hlt
    ))
    vcpu.set_single_step(True)
    for pc in (CODE_ADDR + 2, CODE_ADDR + 4, CODE_ADDR + 6):
        ex = run_guarded(vcpu)
        assert isinstance(ex, DebugExit)
        assert ex.exception == 1      # #DB
        assert ex.pc == pc
        assert ex.dr6 & (1 << 14)     # DR6.BS: single step
    vcpu.set_single_step(False)
    assert isinstance(run_guarded(vcpu), HltExit)
    assert vcpu.get_regs().rax & 0xFF == 2


def test_msr_exits(vm: Vm) -> None:
    # With KVM_CAP_X86_USER_SPACE_MSR, accesses to MSRs KVM does not know exit to userspace.
    vm.enable_cap("KVM_CAP_X86_USER_SPACE_MSR", (MSR_EXIT_UNKNOWN,))
    vcpu = boot_real_mode(vm, real_mode_program(
        [0x66, 0xB9, 0x99, 0x56, 0x4D, 0x4B],   # mov ecx, 0x4b4d5699
        [0x0F, 0x32],                           # rdmsr
        [0x0F, 0x30],                           # wrmsr   (writes back edx:eax)
        HLT,                                    # hlt
    ))
    ex = run_guarded(vcpu)
    assert ex == RdMsrExit(index=0x4B4D5699, msr_reason=MSR_EXIT_UNKNOWN)
    vcpu.complete_msr(0x11223344_55667788)
    ex = run_guarded(vcpu)
    assert ex == WrMsrExit(index=0x4B4D5699, data=0x11223344_55667788,
                           msr_reason=MSR_EXIT_UNKNOWN)
    vcpu.complete_msr()
    assert isinstance(run_guarded(vcpu), HltExit)
    regs = vcpu.get_regs()
    assert (regs.rax, regs.rdx) == (0x55667788, 0x11223344)


def test_uncompleted_msr_exit_injects_gp(vm: Vm) -> None:
    # An MSR exit the caller does not complete fails the access: the guest gets #GP, which
    # its real-mode IVT sends to the handler the test installed.
    vm.enable_cap("KVM_CAP_X86_USER_SPACE_MSR", (MSR_EXIT_UNKNOWN,))
    vcpu = boot_real_mode(vm, real_mode_program(
        [0x66, 0xB9, 0x99, 0x56, 0x4D, 0x4B],   # mov ecx, 0x4b4d5699
        [0x0F, 0x32],                           # rdmsr
        HLT,                                    # hlt
    ))
    handler = CODE_ADDR + 0x100
    vm.write(handler, out_bytes_program(b"G"))
    vm.write(13 * 4, (handler).to_bytes(2, "little") + b"\0\0")   # IVT[#GP] = 0:handler
    assert isinstance(run_guarded(vcpu), RdMsrExit)
    assert run_guarded(vcpu) == _out(b"G")


def test_exit_counts_names(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    counts = vcpu.exit_counts()
    for name in ("io", "mmio", "hlt", "shutdown", "intr", "internal_error", "debug",
                 "io_in", "io_out", "mmio_read", "mmio_write", "unclaimed_pio", "other"):
        assert counts[name] == 0, name


def test_run_from_the_reset_vector(vm: Vm) -> None:
    # A vCPU left in its reset state starts at F000:FFF0, physical 0xFFFFFFF0: a "ROM"
    # slot just below 4 GiB runs from there without any register setup.
    vm.add_memory_region(0xFFFF0000, 0x10000, read_only=True)
    vm.write(0xFFFFFFF0, out_bytes_program(b"R"))
    vcpu = vm.create_vcpu(0)
    assert run_guarded(vcpu) == _out(b"R")


def test_run_from_the_reset_vector_without_rom(vm: Vm) -> None:
    vm.add_memory_region(0, 0x10000)
    vcpu = vm.create_vcpu(0)
    assert isinstance(run_guarded(vcpu), InternalErrorExit)


def test_run_after_real_mode_setup_at_other_entry(vm: Vm) -> None:
    vm.add_memory_region(0, 0x10000)
    vm.write(0x7C00, out_bytes_program(b"!"))
    vcpu = vm.create_vcpu(0)
    setup_real_mode(vcpu, 0x7C00)
    assert run_guarded(vcpu) == _out(b"!")


# -- decoding exits no guest here produces -----------------------------------------------


def _exit(reason: int, **fields: object) -> object:
    ex = ffi.new("struct kvmd_exit *")
    ex.reason = reason
    for name, value in fields.items():
        if name == "words":
            for i, w in enumerate(value):  # type: ignore[attr-defined]
                ex.words[i] = w
            ex.ndata = len(value)  # type: ignore[arg-type]
        elif name == "data":
            ffi.memmove(ex.data, value, len(value))  # type: ignore[arg-type]
            ex.data_len = len(value)  # type: ignore[arg-type]
        else:
            setattr(ex, name, value)
    return ex


def test_decode_unknown_reason_is_other_exit() -> None:
    ex = decode_exit(_exit(200))
    assert ex == OtherExit(200)
    assert ex.name == "unknown_200"


def test_decode_reasons_without_fields() -> None:
    assert decode_exit(_exit(lib.KVM_EXIT_IRQ_WINDOW_OPEN)) == OtherExit(7)
    assert decode_exit(_exit(lib.KVM_EXIT_IRQ_WINDOW_OPEN)).name == "irq_window_open"
    ex = decode_exit(_exit(lib.KVM_EXIT_UNKNOWN, value=0x7B))
    assert ex == OtherExit(0, 0x7B)   # value: hardware_exit_reason
    assert ex.name == "unknown"
    assert decode_exit(_exit(lib.KVM_EXIT_INTR)) == IntrExit()


def test_decode_every_kind() -> None:
    cases = [
        (_exit(lib.KVM_EXIT_IO, direction=1, address=0x3F8, size=1, count=2, data=b"ab"),
         IoExit(True, 0x3F8, 1, 2, b"ab")),
        (_exit(lib.KVM_EXIT_MMIO, direction=0, address=0xFEE00000, size=4),
         MmioExit(0xFEE00000, 4, False, b"")),
        (_exit(lib.KVM_EXIT_FAIL_ENTRY, value=0x21, subtype=3), FailEntryExit(0x21, 3)),
        (_exit(lib.KVM_EXIT_EXCEPTION, subtype=6, value=0), ExceptionExit(6, 0)),
        (_exit(lib.KVM_EXIT_SYSTEM_EVENT, subtype=lib.KVM_SYSTEM_EVENT_RESET, value=1,
               words=[5, 6]), SystemEventExit(lib.KVM_SYSTEM_EVENT_RESET, 1, (5, 6))),
        (_exit(lib.KVM_EXIT_INTERNAL_ERROR,
               subtype=lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, words=[1, 2, 3]),
         InternalErrorExit(lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, (1, 2, 3))),
        (_exit(lib.KVM_EXIT_IOAPIC_EOI, value=0x31), IoapicEoiExit(0x31)),
        (_exit(lib.KVM_EXIT_HYPERCALL, value=12, words=[1, 2, 3, 4, 5, 6]),
         HypercallExit(12, (1, 2, 3, 4, 5, 6))),
        (_exit(lib.KVM_EXIT_HYPERV, subtype=2, words=[7, 8, 9]), HypervExit(2, (7, 8, 9))),
        (_exit(lib.KVM_EXIT_X86_RDMSR, address=0x10, subtype=2), RdMsrExit(0x10, 2)),
        (_exit(lib.KVM_EXIT_X86_WRMSR, address=0x10, value=5, subtype=4),
         WrMsrExit(0x10, 5, 4)),
        (_exit(lib.KVM_EXIT_DEBUG, subtype=3, value=0x1000, words=[0xFFFF0FF0, 0x400]),
         DebugExit(3, 0x1000, 0xFFFF0FF0, 0x400)),
        (_exit(lib.KVM_EXIT_HLT), HltExit()),
        (_exit(lib.KVM_EXIT_SHUTDOWN), ShutdownExit()),
    ]
    for raw, expected in cases:
        got = decode_exit(raw)
        assert got == expected
        assert got.reason == raw.reason  # type: ignore[attr-defined]
        assert got.name == EXIT_REASON_NAMES[raw.reason]  # type: ignore[attr-defined]
    assert decode_exit(cases[4][0]).event == "reset"  # type: ignore[attr-defined]
    assert decode_exit(cases[5][0]).suberror_name == "unexpected_exit_reason"  # type: ignore


def test_exit_reason_names_cover_the_header() -> None:
    assert EXIT_REASON_NAMES[lib.KVM_EXIT_IO] == "io"
    assert EXIT_REASON_NAMES[lib.KVM_EXIT_MEMORY_FAULT] == "memory_fault"
    assert len(EXIT_REASON_NAMES) == 40
