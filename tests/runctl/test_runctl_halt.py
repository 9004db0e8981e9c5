"""HLT without an in-kernel irqchip: the vCPU waits without spinning until an interrupt is
injected or it is resumed (or stopped)."""

from __future__ import annotations

import os
import threading
import time

import grpc
from guests import HLT
from guests_runctl import (
    COUNTERS,
    MASKED_IDLE,
    halt_then_exit,
    interrupt_program,
    two_vector_counter_program,
)
from polling import wait_until
from runctl_api import Api, Code

from kvmd_proto import vmm_pb2 as pb
from kvmd_proto import vmm_pb2_grpc as rpc


def ref(vm_id: str, vcpu_id: int = 0) -> pb.VcpuRef:
    return pb.VcpuRef(vm_id=vm_id, vcpu_id=vcpu_id)


def vcpu_thread(vm_id: str, vcpu_id: int = 0) -> threading.Thread:
    (thread,) = [t for t in threading.enumerate() if t.name == f"vcpu-{vm_id}-{vcpu_id}"]
    return thread


def thread_cpu_seconds(thread: threading.Thread) -> float:
    """CPU time used by one thread (Linux: /proc/self/task/TID/stat utime+stime)."""
    with open(f"/proc/self/task/{thread.native_id}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_hlt_without_irqchip_halts_and_uses_no_cpu(api: Api) -> None:
    api.boot("sleeper", halt_then_exit(0x77))
    watch = api.watch("sleeper")
    api.start("sleeper")
    assert watch.wait_for("halted").vcpu_id == 0
    assert api.wait_vcpu_state("sleeper", "halted").reason == "hlt"
    assert api.get_vm("sleeper").state == "running"  # halted vCPUs count as running
    thread = vcpu_thread("sleeper")
    cpu_before = thread_cpu_seconds(thread)
    hlt_before = api.stats("sleeper").vcpus[0].counts["hlt"]
    time.sleep(0.3)
    # No busy loop: exactly one HLT exit, and the thread slept.
    assert hlt_before == 1
    assert api.stats("sleeper").vcpus[0].counts["hlt"] == 1
    assert api.vcpu_state("sleeper").state == "halted"
    assert thread_cpu_seconds(thread) - cpu_before < 0.1
    # Registers may be read while halted (the vCPU is outside the guest): RIP is past HLT.
    assert api.regs("sleeper").rip == 0x1002
    api.stop("sleeper")
    api.delete("sleeper")


def test_resume_vcpu_on_a_halted_vcpu_continues_after_the_hlt(api: Api) -> None:
    api.boot("wake", halt_then_exit(0x77))
    watch = api.watch("wake")
    api.start("wake")
    api.wait_vcpu_state("wake", "halted")
    assert api.vcpus.ResumeVcpu(ref("wake")).state in ("running", "stopped")
    event = watch.wait_for("debug_exit")
    assert event.exit_code == 0x77  # the code right after the hlt ran
    assert api.get_vm("wake").exit_code == 0x77
    api.delete("wake")


def test_resume_vm_on_a_halted_vm_continues_after_the_hlt(api: Api) -> None:
    api.boot("wake-vm", halt_then_exit(0x78))
    watch = api.watch("wake-vm")
    api.start("wake-vm")
    api.wait_vcpu_state("wake-vm", "halted")
    api.resume("wake-vm")
    assert watch.wait_for("debug_exit").exit_code == 0x78
    api.delete("wake-vm")


def test_pause_a_halted_vcpu_then_resume(api: Api) -> None:
    api.boot("nap", halt_then_exit(0x79))
    watch = api.watch("nap")
    api.start("nap")
    api.wait_vcpu_state("nap", "halted")
    assert api.pause("nap").vcpu_states[0] == "paused"
    assert api.vcpu_state("nap").state == "paused"
    api.resume("nap")
    assert watch.wait_for("debug_exit").exit_code == 0x79
    api.delete("nap")


def test_stop_a_halted_vcpu(api: Api) -> None:
    api.boot("halt-stop", HLT)
    api.start("halt-stop")
    api.wait_vcpu_state("halt-stop", "halted")
    assert api.stop("halt-stop").state == "stopped"
    api.delete("halt-stop")


def test_injected_interrupt_wakes_a_halted_vcpu(api: Api) -> None:
    vector = 0x40
    api.boot("irq", interrupt_program(vector))
    watch = api.watch("irq")
    api.start("irq")
    api.wait_vcpu_state("irq", "halted")
    assert api.read("irq", vector * 4, 4) != b"\0\0\0\0"  # the guest set its IVT entry
    api.vcpus.InjectInterrupt(pb.InjectInterruptRequest(vcpu=ref("irq"), vector=vector))
    event = watch.wait_for("debug_exit")
    assert event.exit_code == 0x100 + vector  # the IVT handler for that vector ran
    api.delete("irq")


def test_inject_interrupt_bad_inputs(api: Api) -> None:
    api.boot("irq-bad", HLT)
    api.assert_code(lambda: api.vcpus.InjectInterrupt(pb.InjectInterruptRequest(
        vcpu=ref("irq-bad"), vector=256)), Code.INVALID_ARGUMENT)
    api.assert_code(lambda: api.vcpus.InjectInterrupt(pb.InjectInterruptRequest(
        vcpu=ref("irq-bad", 3), vector=32)), Code.NOT_FOUND)
    api.create_vm("irq-chip", irqchip=True)
    api.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id="irq-chip", vcpu_id=0))
    # With the in-kernel irqchip, interrupts go through SetIrqLine/irqfd/MSI instead.
    api.assert_code(lambda: api.vcpus.InjectInterrupt(pb.InjectInterruptRequest(
        vcpu=ref("irq-chip"), vector=32)), Code.FAILED_PRECONDITION)
    api.delete("irq-bad")
    api.delete("irq-chip")


def test_injected_interrupt_reaches_a_spinning_guest(api: Api) -> None:
    vector = 0x41
    api.boot("irq-spin", interrupt_program(vector, halt=False))
    watch = api.watch("irq-spin")
    api.start("irq-spin")
    time.sleep(0.05)  # let it set up its IVT entry and enable interrupts
    assert api.vcpu_state("irq-spin").state == "running"
    api.vcpus.InjectInterrupt(pb.InjectInterruptRequest(vcpu=ref("irq-spin"), vector=vector))
    assert watch.wait_for("debug_exit").exit_code == 0x100 + vector
    api.delete("irq-spin")


def test_hlt_with_in_kernel_irqchip_stays_in_the_kernel_and_pauses(api: Api) -> None:
    """With the in-kernel irqchip KVM handles HLT itself: no HLT exit, the vCPU stays
    'running' (blocked in KVM_RUN), and PauseVm must still kick it out."""
    api.boot("kernel-hlt", halt_then_exit(0x7A), irqchip=True)
    watch = api.watch("kernel-hlt")
    api.start("kernel-hlt")
    time.sleep(0.2)
    assert api.vcpu_state("kernel-hlt").state == "running"
    thread = vcpu_thread("kernel-hlt")
    cpu_before = thread_cpu_seconds(thread)
    time.sleep(0.3)
    assert thread_cpu_seconds(thread) - cpu_before < 0.1  # blocked in the kernel, not spinning
    assert api.stats("kernel-hlt").total["hlt"] == 0
    assert api.pause("kernel-hlt").state == "paused"
    assert api.regs("kernel-hlt").rip == 0x1002  # past the hlt
    assert api.vcpus.GetMpState(ref("kernel-hlt")).state == pb.MpState.HALTED
    assert "debug_exit" not in watch.types()
    api.stop("kernel-hlt")
    api.delete("kernel-hlt")


def test_interrupt_into_cli_hlt_does_not_wake_the_guest(api: Api) -> None:
    """A guest halted with interrupts disabled (`cli; hlt`) stays halted when an interrupt
    is injected: a maskable interrupt cannot end that HLT."""
    api.boot("cli-hlt", halt_then_exit(0x77))
    watch = api.watch("cli-hlt")
    api.start("cli-hlt")
    api.wait_vcpu_state("cli-hlt", "halted")
    api.vcpus.InjectInterrupt(pb.InjectInterruptRequest(vcpu=ref("cli-hlt"), vector=0x40))
    time.sleep(0.3)
    assert api.vcpu_state("cli-hlt").state == "halted"
    assert "debug_exit" not in watch.types()
    api.stop("cli-hlt")
    api.delete("cli-hlt")


def test_two_interrupts_injected_back_to_back_are_both_delivered(api: Api) -> None:
    api.boot("two-irqs", two_vector_counter_program(0x40, 0x41))
    api.start("two-irqs")
    api.wait_vcpu_state("two-irqs", "halted")
    for vector in (0x40, 0x41, 0x40):
        api.vcpus.InjectInterrupt(pb.InjectInterruptRequest(vcpu=ref("two-irqs"),
                                                            vector=vector))
        api.wait_vcpu_state("two-irqs", "halted")  # handled, back in the idle hlt
    # Each handler counts its interrupts in memory.
    assert api.read("two-irqs", COUNTERS, 2) == bytes([2, 1])
    api.stop("two-irqs")
    api.delete("two-irqs")


def test_interrupts_queued_while_the_guest_masks_them_are_not_lost(api: Api) -> None:
    """Two vectors injected while the guest runs with interrupts disabled must both be
    delivered once it enables them. KVM_INTERRUPT (no irqchip) holds one vector; a VMM
    may only inject when kvm_run.ready_for_interrupt_injection is set (else it requests
    an interrupt window) - injecting the second one regardless loses it."""
    api.boot("masked", two_vector_counter_program(0x40, 0x41, masked_spin=True))
    api.start("masked")
    time.sleep(0.05)  # past the IVT setup, spinning with IF=0
    for vector in (0x40, 0x41):
        api.vcpus.InjectInterrupt(pb.InjectInterruptRequest(vcpu=ref("masked"),
                                                            vector=vector))
        time.sleep(0.05)
    api.pause("masked")
    regs = api.regs("masked")
    assert regs.rip == MASKED_IDLE - 2 and not regs.rflags & 0x200  # masked spin, IF=0
    regs.rip = MASKED_IDLE  # into `sti; hlt`: the queued interrupts may come in
    api.set_regs("masked", regs)
    api.resume("masked")
    wait_until(lambda: api.read("masked", COUNTERS, 2) == b"\x01\x01", 10,
               "both queued interrupts to be delivered "
               f"(counters now {api.read('masked', COUNTERS, 2).hex()})")
    api.stop("masked")
    api.delete("masked")


BURSTS = 100


def test_interrupt_bursts_into_a_halted_vcpu_are_never_lost(api: Api) -> None:
    """Two clients inject two vectors at (nearly) the same moment into a halted vCPU,
    many times over: each vector must be delivered exactly once per burst.

    The second injection kicks the vCPU while KVM may already have taken the first
    vector for delivery (kvm_run.ready_for_interrupt_injection = 0, VCPU_EVENTS
    interrupt.injected = 1); calling KVM_INTERRUPT again at that moment overwrites it on
    this host. A VMM must wait for ready_for_interrupt_injection (or request an
    interrupt window) before injecting the next vector."""
    api.boot("bursts", two_vector_counter_program(0x40, 0x41))
    api.start("bursts")
    api.wait_vcpu_state("bursts", "halted")
    other_channel = grpc.insecure_channel(api.address)
    other = rpc.VcpusStub(other_channel)

    def inject(stub: rpc.VcpusStub, vector: int) -> None:
        stub.InjectInterrupt(pb.InjectInterruptRequest(vcpu=ref("bursts"), vector=vector),
                             timeout=10)

    try:
        for n in range(1, BURSTS + 1):
            together = threading.Barrier(2)

            def second(together: threading.Barrier = together,
                       delay: float = (n % 10) * 30e-6) -> None:
                together.wait()
                time.sleep(delay)  # spread the second call over the first one's handling
                inject(other, 0x41)

            helper = threading.Thread(target=second, daemon=True)
            helper.start()
            together.wait()
            inject(api.vcpus, 0x40)
            helper.join(10)
            expected = bytes([n, n])
            try:
                wait_until(lambda e=expected: api.read("bursts", COUNTERS, 2) == e,  # type: ignore[misc]
                           3, "both interrupts of the burst to be delivered")
            except AssertionError:
                got = tuple(api.read("bursts", COUNTERS, 2))
                raise AssertionError(
                    f"burst {n}/{BURSTS}: handler counts (0x40, 0x41) are {got}, expected "
                    f"{(n, n)}: InjectInterrupt returned OK but the interrupt was lost"
                ) from None
            api.wait_vcpu_state("bursts", "halted")
    finally:
        other_channel.close()
    api.stop("bursts")
    api.delete("bursts")
