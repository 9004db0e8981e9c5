"""ManagedVcpu: a vCPU, its daemon thread and its run-control state machine.

States: created -> running <-> paused, running -> halted (HLT without an in-kernel irqchip)
-> running, and stopped / crashed at the end. Each started vCPU has one thread running
KVM_RUN with the GIL released. Pause and stop set a flag, then kick the thread out of the
guest (immediate_exit plus a signal), so they take effect even while the guest spins.
Register access is allowed only while the vCPU is not in the guest.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from kvmd.core.cpuid import with_apic_id
from kvmd.core.errors import (
    Aborted,
    InvalidArgument,
    InvalidState,
    KernelError,
    NotFound,
    Reason,
    ResourceExhausted,
    argument_rule,
    kernel_errors,
)
from kvmd.core.remote import RemoteExit, RemoteHandler
from kvmd.core.sched import (
    COMM_BYTES,
    POLICIES,
    api_slice_us,
    confine_thread,
    name_thread,
    report_priority_failure,
    set_thread_priority,
    set_vcpu_slice,
    thread_cpu_clock,
)
from kvmd.core.state import VcpuState
from kvmd.kvm import (
    CpuidEntry,
    Fpu,
    IntrExit,
    IoExit,
    KvmError,
    MmioExit,
    MpState,
    PioMap,
    Regs,
    Sregs,
    ThreadScheduling,
    Vcpu,
    VcpuEvents,
    VcpuExit,
)
from kvmd.kvm.marshal import exact
from kvmd.kvm.vcpu import LAPIC_SIZE, MAX_MSRS_PER_CALL

log = logging.getLogger(__name__)
T = TypeVar("T")



class VcpuRunState(StrEnum):
    """A vCPU's run state (a VM's is one of these too, see ManagedVm.state); the values are
    what the API, the metrics and the logs show."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"
    STOPPED = "stopped"
    CRASHED = "crashed"


CREATED, RUNNING, PAUSED, HALTED, STOPPED, CRASHED = (
    VcpuRunState.CREATED, VcpuRunState.RUNNING, VcpuRunState.PAUSED, VcpuRunState.HALTED,
    VcpuRunState.STOPPED, VcpuRunState.CRASHED)
IN_GUEST = (RUNNING,)
# A crashed vCPU may be started again: from its registers as they are (set them first to
# reset it), as an operator restarts a machine.
STARTABLE = (CREATED, STOPPED, CRASHED)
PAUSABLE = (RUNNING, HALTED)
RESUMABLE = (PAUSED, HALTED)
ENDED = (STOPPED, CRASHED)
STATE_CHANGE_TIMEOUT = 5.0


@dataclass(frozen=True)
class PauseTicket:
    """What `wait_paused` compares against: the vCPU's park and resume counts when the
    pause was requested."""

    parks: int
    resumes: int


class Action(StrEnum):
    """What the VM's exit dispatcher tells a vCPU thread to do after an exit."""

    CONTINUE = "continue"
    HALT = "halt"
    PAUSE = "pause"
    STOP = "stop"
    CRASH = "crash"


@dataclass(frozen=True)
class Outcome:
    """What the VM's exit dispatcher tells the vCPU thread to do next."""

    action: Action
    reason: str = ""
    exit_code: int | None = None


CONTINUE = Outcome(Action.CONTINUE)
HALT = Outcome(Action.HALT)


@dataclass(frozen=True)
class VmLink:
    """What a vCPU sees of its VM: values fixed when the VM was made, and the calls its
    thread and run control make back into it. Not the VM itself: kvmd.core.vm builds one
    for each vCPU, and this module imports nothing of it."""

    vm_id: str
    irqchip: bool  # created with the in-kernel irqchip
    pio_map: PioMap  # the ports the C run loop completes without an exit
    priority: tuple[str, int]  # the host's vcpu_policy and vcpu_nice
    cpus: frozenset[int] | None  # the host's vcpu_cpus (None: any CPU)
    capabilities: Mapping[str, int]  # of /dev/kvm: what a save may read
    msr_index_list: Sequence[int]  # the MSRs to save
    is_closed: Callable[[], bool]  # the VM was deleted
    require_irqchip: Callable[[str], None]  # InvalidState unless irqchip
    dispatch: Callable[[ManagedVcpu, VcpuExit], Outcome]  # an exit -> what to do next
    record_outcome: Callable[[Outcome], None]  # the VM's reason and exit code
    on_event: Callable[[ManagedVcpu, str, str, int | None], None]  # (vcpu, event, reason,
    #                                                                  exit code)
    on_ended: Callable[[ManagedVcpu, Outcome], None]  # after a stop or crash, unlocked


def native_name(vm_id: str, vcpu_id: int) -> str:
    """The name a vCPU thread shows the kernel (top -H, ps -L): `<vm>/<vcpu>`, the VM's id
    cut so that the vCPU's number stays within the kernel's 15 bytes."""
    tail = f"/{vcpu_id}"
    return vm_id.encode()[:COMM_BYTES - len(tail)].decode(errors="ignore") + tail


class Launch:
    """A vCPU thread that exists but waits at its gate, the vCPU's state untouched: the
    first half of a start. `commit()` lets it run (the vCPU is then running); `cancel()`
    ends it unseen. A VM starts all its vCPUs this way, so a thread that cannot be created
    (a tasks limit) leaves every vCPU as it was."""

    def __init__(self, vcpu: ManagedVcpu) -> None:
        self.vcpu = vcpu
        self.go = False
        self.gate = threading.Event()
        self.thread = threading.Thread(target=vcpu._gated_loop, args=(self,), daemon=True,
                                       name=f"vcpu-{vcpu.vm_id}-{vcpu.id}")

    def commit(self) -> None:
        self.vcpu._commit(self)

    def cancel(self) -> None:
        self.vcpu._cancel(self)


class ManagedVcpu:
    """A vCPU as the daemon sees it: the binding's Vcpu, its thread and its state."""

    def __init__(self, link: VmLink, vcpu: Vcpu) -> None:
        self.link = link
        self.vm_id = link.vm_id
        self.vcpu = vcpu
        self.id = vcpu.id
        self.state: VcpuRunState = CREATED
        self.reason = ""
        self.crash_regs: Regs | None = None
        self.cond = threading.Condition(threading.RLock())
        self._thread: threading.Thread | None = None
        self._pause_requested = False
        self._stop_requested = False
        self._stop_reason = ""
        # The guest's clock ran while it did not (a host pause, a restore): tell it once it
        # runs again (KVM_KVMCLOCK_CTRL), so its soft-lockup watchdog ignores the gap.
        self._clock_stopped = False
        self._pending_irqs: deque[int] = deque()
        self._window_requested = False  # kvm_run.request_interrupt_window is set
        # Times the thread parked paused, and times a resume was granted: a pause waits for
        # the first to move, and is cancelled (ABORTED) if only the second did.
        self._parks = 0
        self._resumes = 0
        self.stuck_ring_exits = 0  # dirty-ring-full exits in a row with nothing harvested
        self._io_pending = False  # the last exit was IO/MMIO, not yet completed in KVM
        self._launching = False  # a Launch of this vCPU awaits its commit or cancel
        self._throttle_until = 0.0  # auto-converge: stay out of the guest until then
        # Set while this vCPU's thread waits for a remote exit handler's reply.
        self.waiting_remote: tuple[RemoteHandler, RemoteExit] | None = None
        # Called (under cond, from whichever thread) after every change of state, parks or
        # resumes: how a caller that cannot block on cond (an event loop) learns of them.
        # Replaced, never changed in place: _changed reads it under cond, but adding and
        # removing listeners takes only _listeners_lock, never waiting for a vCPU thread
        # (which may hold cond while it is preempted, behind a host full of spinning vCPUs).
        self._listeners: tuple[Callable[[], None], ...] = ()
        self._listeners_lock = threading.Lock()
        # vCPU threads run the guest at the host's vcpu_policy and vcpu_nice, so spinning
        # guests cannot starve the API; a pause gives the kicked thread the API's priority
        # (and scheduler slice) back, so it leaves the guest promptly even when the host is
        # busy. `_boosted`: the thread is at the API's priority (new, or paused) and lowers
        # itself on its next way into the guest, in C with the GIL released: Python it runs
        # at the lower priority could be preempted holding the GIL, behind every spinning
        # vCPU of its CPU, and stall the API's threads (with 64 vCPUs on one CPU, a GetVm
        # after a ResumeVm waited 0.4-0.7 s).
        self._priority = link.priority
        self._lowered = self._priority != ("other", 0)
        self._tid = 0  # the thread's native id, once it runs (0 again once it ended)
        self._cpu_ns_ended = 0  # CPU time of this vCPU's threads that have ended
        self._boosted = False

    @property
    def resource(self) -> str:
        return f"vm/{self.vm_id}/vcpu/{self.id}"

    # -- run control (API threads) --------------------------------------------------------

    def start(self) -> None:
        self.launch().commit()

    def launch(self) -> Launch:
        """Create the vCPU's thread, held at its gate; nothing else changes. A thread that
        cannot be created is ResourceExhausted."""
        with self.cond:
            # A caller that looked this vCPU up before a concurrent DeleteVm closed the VM:
            # checked under our lock, which the close's stop request also takes.
            if self.link.is_closed():
                raise NotFound(f"vm {self.vm_id} was deleted", resource=self.resource)
            if self.state not in STARTABLE:
                raise InvalidState(f"vcpu {self.id} of vm {self.vm_id} is {self.state}; only "
                                   "a created or stopped vcpu can be started",
                                   resource=self.resource, reason=Reason.VM_RUNNING)
            if self._launching:
                raise InvalidState(f"vcpu {self.id} of vm {self.vm_id} is being started",
                                   resource=self.resource, reason=Reason.VM_BUSY)
            self._join_finished_thread()
            launch = Launch(self)
            try:
                launch.thread.start()
            except RuntimeError as exc:  # "can't start new thread": a tasks limit
                raise ResourceExhausted(f"cannot start a thread for vcpu {self.id} of vm "
                                        f"{self.vm_id}: {exc}", resource=self.resource,
                                        reason=Reason.HOST_EXHAUSTED) from None
            self._launching = True
            return launch

    def _gated_loop(self, launch: Launch) -> None:
        launch.gate.wait()
        if launch.go:
            try:
                self._loop()
            finally:
                with self.cond:
                    self._cpu_ns_ended += time.thread_time_ns()
                    self._tid = 0

    def cpu_seconds(self) -> float:
        """CPU time of this vCPU's threads (the guest's and the exits' host side): those
        that ended (and, restored, those of the VM it was saved from) plus the running
        one's. Never goes back: see _cpu_ns."""
        with self.cond:
            return self._cpu_ns() / 1e9

    def _cpu_ns(self) -> int:
        """Under cond, where the running thread cannot end (it adds its time to
        _cpu_ns_ended under cond), so its clock can be read."""
        ns = self._cpu_ns_ended
        if self._tid:
            try:
                ns += time.clock_gettime_ns(thread_cpu_clock(self._tid))
            except OSError:  # not expected: see above
                pass
        return ns

    def _commit(self, launch: Launch) -> None:
        with self.cond:
            self._launching = False
            if self.link.is_closed():  # deleted meanwhile: its close saw no thread to stop
                launch.gate.set()
                raise NotFound(f"vm {self.vm_id} was deleted", resource=self.resource)
            self._pause_requested = self._stop_requested = False
            self._io_pending = False
            self._tid, self._boosted = 0, False  # the new thread sets its own
            self._stop_reason = self.reason = ""
            self.vcpu.set_immediate_exit(False)
            self._thread = launch.thread
            self._set_state(RUNNING, "started")
            launch.go = True
            launch.gate.set()

    def _cancel(self, launch: Launch) -> None:
        with self.cond:
            self._launching = False
        launch.gate.set()  # go stays False: the thread ends without entering the guest
        launch.thread.join(STATE_CHANGE_TIMEOUT)

    def start_paused(self) -> None:
        """Start the vCPU's thread parked, without entering the guest (a restored vCPU that
        had been running); returns once it is paused."""
        with self.cond:  # held until the flag is set: the new thread parks before KVM_RUN
            self.start()
            ticket = PauseTicket(self._parks, self._resumes)
            self._pause_requested = True
        self.wait_paused(ticket)

    def resume_halted(self) -> None:
        """A vCPU parked (by a hold, or restored parked by a hand-over or migration) that
        had been halted (HLT without an in-kernel irqchip) halts again, waiting for an
        interrupt as before, instead of running on past its HLT."""
        with self.cond:
            if self.state != PAUSED:
                raise InvalidState(f"vcpu {self.id} of vm {self.vm_id} is {self.state}, not "
                                   "paused", resource=self.resource, reason=Reason.VM_NOT_PAUSED)
            self._pause_requested = False
            self._resumes += 1
            self._set_state(HALTED, "halted", "hlt")

    def mark_ended(self, state: VcpuRunState, reason: str) -> None:
        """A restored vCPU that had stopped or crashed: record that, without a thread."""
        with self.cond:
            if self.state != CREATED or state not in ENDED:
                raise InvalidState(f"vcpu {self.id} of vm {self.vm_id} is {self.state}",
                                   resource=self.resource, reason=Reason.VM_NOT_NEW)
            self._set_state(state, state, reason)

    def request_pause(self) -> PauseTicket:
        """Ask the vCPU to leave the guest and park (kicked at once); `wait_paused` waits.
        Split so a VM kicks all its vCPUs before waiting for any."""
        with self.cond:
            if self.state not in PAUSABLE:
                raise InvalidState(f"vcpu {self.id} of vm {self.vm_id} is {self.state}; only "
                                   "a running or halted vcpu can be paused",
                                   resource=self.resource, reason=Reason.VM_NOT_RUNNING)
            ticket = PauseTicket(self._parks, self._resumes)
            self._pause_requested = True
            self.vcpu.kick()
            if self._tid and not self._boosted and self._differs_from_api():
                self._boosted = set_thread_priority(self._tid, "other", 0)
                set_vcpu_slice(self._tid, boosted=True)
            self.cond.notify_all()
            return ticket

    def wait_paused(self, ticket: PauseTicket) -> None:
        """Return once the vCPU parked since `ticket` was taken (a resume granted after
        that leaves it running: the pause did happen), or ended. A resume granted before it
        parked cancelled the pause: ABORTED, never a timeout."""
        with self.cond:
            deadline = time.monotonic() + self.pause_timeout()
            while not self.pause_done(ticket):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self.timed_out("pause")
                self.cond.wait(left)

    def pause_done(self, ticket: PauseTicket) -> bool:
        """Whether the pause of `ticket` is over: parked since, or ended (True); not yet
        (False). Raises Aborted if a resume came first. Never blocks on the vCPU."""
        with self.cond:
            if (self._parks == ticket.parks and self._resumes == ticket.resumes
                    and self.state not in ENDED):
                return False
            if self._parks == ticket.parks and self._resumes != ticket.resumes:
                raise Aborted(f"vcpu {self.id} of vm {self.vm_id} was resumed by another call "
                              "before it paused", resource=self.resource,
                              reason=Reason.CONCURRENT_CHANGE)
            return True

    def pause_timeout(self) -> float:
        """Seconds a pause may take: the usual bound, plus the deadline of a remote handler
        this vCPU waits for (it pauses once the reply, or the deadline, comes)."""
        waiting = self.waiting_remote
        return STATE_CHANGE_TIMEOUT + (waiting[0].deadline if waiting is not None else 0.0)

    def timed_out(self, what: str) -> KernelError:
        return KernelError(f"vcpu {self.id} of vm {self.vm_id} did not {what} within "
                           f"{STATE_CHANGE_TIMEOUT} s", resource=self.resource,
                           reason=Reason.VCPU_UNRESPONSIVE)

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every state change (from the changing thread, under
        cond: it must only hand the news on, e.g. wake an event loop)."""
        with self._listeners_lock:
            self._listeners = (*self._listeners, listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        with self._listeners_lock:
            if listener in self._listeners:
                rest = list(self._listeners)
                rest.remove(listener)
                self._listeners = tuple(rest)

    def _changed(self) -> None:
        """Under cond: wake waiters and listeners after a change of state, parks or
        resumes."""
        self.cond.notify_all()
        for listener in self._listeners:
            listener()

    def pause(self) -> None:
        """Kick the vCPU out of the guest; returns once it is paused (or ended)."""
        self.wait_paused(self.request_pause())

    @property
    def pause_pending(self) -> bool:
        """A pause was requested and the vCPU has not parked yet."""
        with self.cond:
            return self._pause_requested and self.state in PAUSABLE

    def resume(self) -> None:
        """Continue a paused or halted vCPU exactly where it stopped; on a vCPU whose pause
        is still in flight, cancel that pause (the last request wins)."""
        with self.cond:
            if self.state in RESUMABLE:
                self._pause_requested = False
                self._resumes += 1
                if self._boosted:
                    set_vcpu_slice(self._tid, boosted=False)
                self._set_state(RUNNING, "resumed")
            elif self.state == RUNNING and self._pause_requested:
                self._pause_requested = False
                self._resumes += 1
            else:
                raise InvalidState(f"vcpu {self.id} of vm {self.vm_id} is {self.state}; only "
                                   "a paused or halted vcpu can be resumed",
                                   resource=self.resource, reason=Reason.VM_NOT_PAUSED)
            self._changed()

    def stop(self, reason: str = "stopped by request") -> None:
        """End the vCPU's thread (from an API thread); waits for it. A crashed vCPU becomes
        stopped, keeping why it crashed, once its thread is gone (waited for when it is
        still telling the VM of the crash)."""
        with self.cond:
            if self.state == STOPPED:
                raise InvalidState(f"vcpu {self.id} of vm {self.vm_id} is already "
                                   f"{self.state}", resource=self.resource,
                                   reason=Reason.VM_STOPPED)
            if self.state == CREATED:
                self._set_state(STOPPED, "stopped", reason)
                return
            if self._stopped_if_crashed():
                return
        thread = self.request_stop(reason)
        if thread is not None:
            self.join(thread=thread)
            with self.cond:
                self._stopped_if_crashed()

    def _stopped_if_crashed(self) -> bool:
        """Under cond: a crashed vCPU whose thread has ended becomes stopped (its reason
        kept); whether it did."""
        if self.state == CRASHED and not self._thread_alive():
            self._set_state(STOPPED, "stopped")
            return True
        return False

    def throttle(self, seconds: float) -> None:
        """Keep a running vCPU out of the guest for `seconds` (kicked at once), still
        RUNNING: see VcpuThrottler."""
        with self.cond:
            if self.state == RUNNING and not self._pause_requested:
                self._throttle_until = time.monotonic() + seconds
                self.vcpu.kick()

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def request_stop(self, reason: str) -> threading.Thread | None:
        """Ask the thread to end without waiting (safe from any thread, even a vCPU's).
        Returns the thread asked (None if none runs): the one to join, as a start racing
        in later may begin another."""
        with self.cond:
            thread = self._thread
            if thread is None or not thread.is_alive():
                return None
            self._stop_requested = True
            self._stop_reason = self._stop_reason or reason
            self.vcpu.kick()
            self.cond.notify_all()
        waiting = self.waiting_remote
        if waiting is not None:
            waiting[0].abandon(waiting[1])
        return thread

    def join(self, timeout: float = STATE_CHANGE_TIMEOUT,
             thread: threading.Thread | None = None) -> None:
        """Wait for `thread` (default: the current one, if it was started) to end."""
        thread = thread if thread is not None else self._thread
        if thread is not None and thread.ident is not None \
                and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                raise KernelError(f"vcpu {self.id} of vm {self.vm_id} did not stop within "
                                  f"{timeout} s", resource=self.resource,
                                  reason=Reason.VCPU_UNRESPONSIVE)

    def inject_interrupt(self, vector: int) -> None:
        """Queue an interrupt (no in-kernel irqchip); wakes a halted vCPU."""
        if not 0 <= vector <= 255:
            raise InvalidArgument(f"interrupt vector {vector} is not 0..255",
                                  reason=Reason.VALUE_OUT_OF_RANGE, field="vector")
        if self.link.irqchip:
            raise InvalidState("with the in-kernel irqchip, inject through SetIrqLine, an "
                               "irqfd or an MSI", resource=self.resource,
                               reason=Reason.IRQCHIP_MODE)
        with self.cond:
            if self.state in (STOPPED, CRASHED):
                raise InvalidState(f"vcpu {self.id} is {self.state}", resource=self.resource,
                                   reason=Reason.VM_STOPPED)
            self._pending_irqs.append(vector)
            # A maskable interrupt ends HLT only if the guest has interrupts enabled; with
            # `cli; hlt` it stays queued until the vCPU is resumed some other way.
            if self.state == HALTED and self.vcpu.interrupts_enabled:
                self._set_state(RUNNING, "resumed", "interrupt")
            if self.state == RUNNING:
                self.vcpu.kick()  # deliver it now rather than at the next exit
            self.cond.notify_all()

    def _join_finished_thread(self) -> None:
        if self._thread is not None:
            self._thread.join(STATE_CHANGE_TIMEOUT)
            self._thread = None

    def _set_state(self, state: VcpuRunState, event: str, reason: str = "",
                   exit_code: int | None = None) -> None:
        self.state = state
        if state == PAUSED:
            self._parks += 1
        if reason:
            self.reason = reason
        self._changed()
        self.link.on_event(self, event, reason, exit_code)

    # -- the vCPU thread ------------------------------------------------------------------

    def _loop(self) -> None:
        vcpu = self.vcpu
        pio_map = self.link.pio_map
        policy, nice = self._priority
        # The thread inherited the API's priority and short slice: it takes vcpu_nice and the
        # kernel's slice on its first way into the guest, as after every pause (_boosted).
        lowering = ThreadScheduling(POLICIES[policy], nice, default_slice=bool(api_slice_us()))
        name_thread(native_name(self.vm_id, self.id))
        with self.cond:
            self._tid = threading.get_native_id()
            self._boosted = self._differs_from_api()
        # Confined before lowered: a thread seen at vcpu_nice is already on its CPUs.
        if self.link.cpus is not None:  # for good: a pause needs no other CPU
            confine_thread(self._tid, self.link.cpus)
        try:
            while True:
                with self.cond:
                    finish_io = self._io_pending and (self._pause_requested
                                                      or self._stop_requested)
                    if not finish_io and not self._wait_for_go():
                        return
                    tell_clock = self._clock_stopped and not finish_io
                    lower = False
                    if not finish_io:  # back to the guest
                        self._clock_stopped = False
                        lower, self._boosted = self._boosted, False
                if finish_io:
                    self._finish_pending_io()
                    continue
                if tell_clock:  # an ioctl: not under cond (see _listeners)
                    self._tell_guest_it_was_stopped()
                self._deliver_interrupt()
                exit_ = vcpu.run_until_unhandled(pio_map, lowering if lower else None)
                if lower:
                    self._lowered_on_entry(lowering)
                if isinstance(exit_, IntrExit):
                    # Kicked: clear the flag first, then the loop head sees why.
                    vcpu.set_immediate_exit(False)
                    continue
                self._io_pending = isinstance(exit_, (IoExit, MmioExit))
                if not self._apply(self.link.dispatch(self, exit_), exit_):
                    return
        except Exception as exc:  # the daemon must survive any guest
            log.exception("vcpu thread failed", extra={"vm_id": self.vm_id, "vcpu": self.id})
            reason = f"daemon error: {type(exc).__name__}: {exc}"
            with self.cond:
                self.link.record_outcome(Outcome(Action.CRASH, reason))
                self._crash(reason)
            self.link.on_ended(self, Outcome(Action.CRASH, reason))

    def _differs_from_api(self) -> bool:
        """The thread runs the guest at another priority or slice than the API's threads
        have: a pause boosts it to theirs, and it lowers itself again on its way in."""
        return self._lowered or bool(api_slice_us())

    def _lowered_on_entry(self, lowering: ThreadScheduling) -> None:
        """After an entry that was to lower the thread: skipped (a kick came first), it
        is still at the API's priority, to lower next time; a failure is logged once."""
        if not lowering.applied:
            with self.cond:
                self._boosted = True
        elif lowering.error:
            report_priority_failure(*self._priority, os.strerror(lowering.error))

    def _can_take_interrupt(self) -> bool:
        """Under cond: a queued interrupt can end a HLT (the guest has IF set)."""
        return bool(self._pending_irqs) and self.vcpu.interrupts_enabled

    def _deliver_interrupt(self) -> None:
        """Inject the oldest queued interrupt when the guest can take one. KVM holds only one
        KVM_INTERRUPT at a time, so the rest wait: the vCPU asks KVM for an exit as soon as
        the guest can take the next (IRQ_WINDOW_OPEN), and none is ever dropped."""
        if not self._pending_irqs and not self._window_requested:
            return  # the common case, every exit: nothing queued, no window asked for
        with self.cond:
            vector = self._pending_irqs[0] if self._pending_irqs else None
        if vector is not None and self.vcpu.ready_for_interrupt_injection:
            try:
                self.vcpu.interrupt(vector)
                delivered = True
            except KvmError as exc:
                delivered = exc.errno != errno.EEXIST  # EEXIST: retry at the next window
                if delivered:
                    log.warning("interrupt refused", extra={
                        "vm_id": self.vm_id, "vcpu": self.id, "vector": vector,
                        "error": str(exc)})
            if delivered:
                with self.cond:
                    self._pending_irqs.popleft()
        with self.cond:
            self._window_requested = bool(self._pending_irqs)
            self.vcpu.set_request_interrupt_window(self._window_requested)

    def _finish_pending_io(self) -> None:
        """KVM completes an IO/MMIO access (IN data into the register, RIP past the
        instruction) only on the next KVM_RUN. Before parking for a pause or stop, enter
        once with immediate_exit set: the access completes and no guest code runs, so the
        registers a paused vCPU shows are consistent."""
        self._io_pending = False
        self.vcpu.complete_pending_io()

    def _wait_for_go(self) -> bool:
        """Under cond: wait while paused or halted (or throttled); False when the thread
        must end."""
        while self._throttle_until and not (self._pause_requested or self._stop_requested):
            left = self._throttle_until - time.monotonic()
            if left <= 0:
                break
            self.cond.wait(left)
        self._throttle_until = 0.0
        while True:
            if self._stop_requested:
                self._set_state(STOPPED, "stopped", self._stop_reason)
                return False
            if self._pause_requested:
                if self.state != PAUSED:
                    self._set_state(PAUSED, "paused")
                self._clock_stopped = True
                self.cond.wait()
                continue
            if self.state == HALTED and not self._can_take_interrupt():
                self.cond.wait()
                continue
            if self.state != RUNNING:
                self._set_state(RUNNING, "resumed")
            return True

    def _tell_guest_it_was_stopped(self) -> None:
        """KVM_KVMCLOCK_CTRL before the first entry after a host pause or a restore, as QEMU
        does on every transition to running: KVM sets PVCLOCK_GUEST_STOPPED in the guest's
        kvmclock page. EINVAL means the guest has no kvmclock: nothing to tell."""
        try:
            self.vcpu.kvmclock_ctrl()
        except KvmError as exc:
            if exc.errno != errno.EINVAL:
                log.warning("KVM_KVMCLOCK_CTRL failed", extra={
                    "vm_id": self.vm_id, "vcpu": self.id, "error": str(exc)})

    def _apply(self, outcome: Outcome, exit_: VcpuExit) -> bool:
        """Act on the dispatcher's verdict; False when the thread must end."""
        if outcome.action is Action.CONTINUE:
            return True
        if outcome.action is Action.STOP and self._io_pending:
            # e.g. the debug-exit OUT: complete it, so a stopped vCPU's RIP is past it.
            self._finish_pending_io()
        with self.cond:
            if outcome.action is Action.HALT:
                if not self._can_take_interrupt() and not self._stop_requested:
                    self._set_state(HALTED, "halted", "hlt")
                return True
            if outcome.action is Action.PAUSE:
                self._pause_requested = True
                self._set_state(PAUSED, "paused", outcome.reason)
                return True
            self.link.record_outcome(outcome)
            if outcome.action is Action.STOP:
                self._set_state(STOPPED, outcome.reason or "stopped", outcome.reason,
                                outcome.exit_code)
            else:
                self._crash(outcome.reason)
        # Outside our lock: ending the other vCPUs takes theirs.
        self.link.on_ended(self, outcome)
        return False

    def _crash(self, reason: str) -> None:
        """Under cond: capture registers and enter the crashed state."""
        try:
            self.crash_regs = self.vcpu.get_regs()
        except KvmError:
            self.crash_regs = None
        self._set_state(CRASHED, "crashed", reason)

    # -- state access (allowed only outside the guest) ------------------------------------

    def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        with self.cond:
            if self.state in IN_GUEST:
                raise InvalidState(f"cannot {what} vcpu {self.id} of vm {self.vm_id} while it "
                                   "is running; pause it first", resource=self.resource,
                                   reason=Reason.VM_RUNNING)
            with kernel_errors(self.resource):
                return fn(*args)

    def get_regs(self) -> Regs:
        return self._call("read registers of", self.vcpu.get_regs)

    def set_regs(self, regs: Regs) -> None:
        self._call("set registers of", self.vcpu.set_regs, regs)

    def get_sregs(self) -> Sregs:
        return self._call("read registers of", self.vcpu.get_sregs)

    def set_sregs(self, sregs: Sregs) -> None:
        self._call("set registers of", self.vcpu.set_sregs, sregs)

    def get_fpu(self) -> Fpu:
        return self._call("read the FPU of", self.vcpu.get_fpu)

    def set_fpu(self, fpu: Fpu) -> None:
        self._call("set the FPU of", self.vcpu.set_fpu, fpu)

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        if not entries:
            raise InvalidArgument("no CPUID entries given",
                                  reason=Reason.FIELD_REQUIRED, field="entries")
        self._call("set CPUID of", self.vcpu.set_cpuid, entries)

    def set_supported_cpuid(self, supported: list[CpuidEntry]) -> None:
        """Set the host's supported CPUID (Host.supported_cpuid) naming this vCPU: its own
        APIC ID, the vCPU id its in-kernel LAPIC has (kvmd.core.cpuid)."""
        self.set_cpuid(with_apic_id(supported, self.id))

    def get_cpuid(self) -> list[CpuidEntry]:
        return self._call("read CPUID of", self.vcpu.get_cpuid)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        if not indices:
            raise InvalidArgument("no MSR indices given",
                                  reason=Reason.FIELD_REQUIRED, field="indices")
        return self._call("read MSRs of", self.vcpu.get_msrs, indices)

    def set_msrs(self, values: dict[int, int]) -> None:
        if not values:
            raise InvalidArgument("no MSRs given", reason=Reason.FIELD_REQUIRED, field="msrs")
        self._call("set MSRs of", self.vcpu.set_msrs, values)

    def get_mp_state(self) -> MpState:
        return self._call("read the mp_state of", self.vcpu.get_mp_state)

    def set_mp_state(self, state: int) -> None:
        if state not in set(MpState):
            raise InvalidArgument(f"unknown mp_state {state}",
                                  reason=Reason.VALUE_UNKNOWN, field="mp_state")
        self._call("set the mp_state of", self.vcpu.set_mp_state, MpState(state))

    def get_lapic(self) -> bytes:
        self.link.require_irqchip("GetLapic")
        return self._call("read the LAPIC of", self.vcpu.get_lapic)

    def set_lapic(self, regs: bytes) -> None:
        self.link.require_irqchip("SetLapic")
        argument_rule(lambda: exact(regs, LAPIC_SIZE, "LAPIC state"), field="lapic.regs",
                      reason=Reason.VALUE_OUT_OF_RANGE)  # the binding's rule, checked first
        self._call("set the LAPIC of", self.vcpu.set_lapic, regs)

    def get_vcpu_events(self) -> VcpuEvents:
        return self._call("read events of", self.vcpu.get_vcpu_events)

    def set_vcpu_events(self, events: VcpuEvents) -> None:
        self._call("set events of", self.vcpu.set_vcpu_events, events)

    def exit_counts(self) -> dict[str, int]:
        return self.vcpu.exit_counts()

    # -- save and restore -----------------------------------------------------------------

    def save_state(self, run_state: str | None = None) -> VcpuState:
        """Everything KVM lets userspace save about this vCPU, plus the daemon's own part
        (run state, queued interrupts, exit counters). The vCPU must not be in the guest:
        a paused vCPU has completed its in-flight IO, so its registers are exact.
        `run_state` is what to record as its state (the VM's state before it paused it)."""
        link = self.link
        with self.cond:
            if self.state in IN_GUEST:
                raise InvalidState(f"vcpu {self.id} of vm {self.vm_id} is running; pause it "
                                   "before saving it", resource=self.resource,
                                   reason=Reason.VM_RUNNING)
            v = self.vcpu
            with kernel_errors(self.resource):
                with_xsave = bool(link.capabilities.get("KVM_CAP_XSAVE"))
                msr_indices = v.saveable_msrs(link.msr_index_list)
                msrs: dict[int, int] = {}
                for i in range(0, len(msr_indices), MAX_MSRS_PER_CALL):
                    msrs.update(v.get_msrs(msr_indices[i:i + MAX_MSRS_PER_CALL]))
                return VcpuState(
                    vcpu_id=self.id,
                    run_state=run_state or self.state,
                    reason=self.reason,
                    cpuid=v.get_cpuid(),
                    tsc_khz=v.get_tsc_khz() if link.capabilities.get(
                        "KVM_CAP_GET_TSC_KHZ") else 0,
                    regs=v.get_regs(),
                    sregs=v.get_sregs(),
                    xsave=v.get_xsave() if with_xsave else None,
                    fpu=None if with_xsave else v.get_fpu(),
                    xcrs=v.get_xcrs() if link.capabilities.get("KVM_CAP_XCRS") else None,
                    debugregs=v.get_debugregs() if link.capabilities.get(
                        "KVM_CAP_DEBUGREGS") else None,
                    lapic=v.get_lapic() if self.link.irqchip else b"",
                    msrs=msrs,
                    mp_state=int(v.get_mp_state()),
                    events=v.get_vcpu_events(),
                    pending_irqs=list(self._pending_irqs),
                    exit_counts=v.exit_counts(),
                    cpu_ns=self._cpu_ns(),
                )

    def restore_state(self, state: VcpuState) -> None:
        """Restore into this vCPU before it has ever run, in the order the binding documents
        (kvmd.kvm.Vcpu.state_restore_order): CPUID first (it decides what the rest may
        hold), TSC rate, regs, sregs, XSAVE (or FPU), XCRs, debug registers, LAPIC, MSRs
        (after the LAPIC, for the TSC deadline), mp_state, vCPU events last. The VM-level
        state (irqchip, PIT, clock) follows every vCPU (ManagedVm.restore_state)."""
        with self.cond:
            if self.state != CREATED:
                raise InvalidState(f"vcpu {self.id} of vm {self.vm_id} has run; restore "
                                   "only into a new vcpu", resource=self.resource,
                                   reason=Reason.VM_NOT_NEW)
            v = self.vcpu
            with kernel_errors(self.resource):
                if state.cpuid:
                    v.set_cpuid(state.cpuid)
                if state.tsc_khz and state.tsc_khz != v.get_tsc_khz():
                    try:
                        v.set_tsc_khz(state.tsc_khz)
                    except KvmError as exc:  # no TSC scaling on this host: time runs on
                        log.warning("guest TSC rate not restored", extra={
                            "vm_id": self.vm_id, "vcpu": self.id, "tsc_khz": state.tsc_khz,
                            "error": str(exc)})
                v.set_regs(state.regs)
                v.set_sregs(state.sregs)
                if state.xsave is not None:
                    v.set_xsave(state.xsave)
                elif state.fpu is not None:
                    v.set_fpu(state.fpu)
                if state.xcrs is not None:
                    v.set_xcrs(state.xcrs)
                if state.debugregs is not None:
                    v.set_debugregs(state.debugregs)
                if state.lapic:
                    v.set_lapic(state.lapic)
                self._restore_msrs(state.msrs)
                v.set_mp_state(state.mp_state)
                v.set_vcpu_events(state.events)
                v.restore_exit_counts(state.exit_counts)
                self._cpu_ns_ended = state.cpu_ns
            self._pending_irqs = deque(state.pending_irqs)
            self._clock_stopped = True  # saved paused, resumed here
            self.reason = state.reason
            if state.run_state == CRASHED:
                self.crash_regs = state.regs

    def _restore_msrs(self, msrs: dict[int, int]) -> None:
        """Write the saved MSRs; one the kernel refuses in this VM's configuration (e.g.
        MSR_KVM_ASYNC_PF_INT without the in-kernel LAPIC) is logged and skipped."""
        items = list(msrs.items())
        for i in range(0, len(items), MAX_MSRS_PER_CALL):
            batch = dict(items[i:i + MAX_MSRS_PER_CALL])
            try:
                self.vcpu.set_msrs(batch)
                continue
            except KvmError:
                pass
            for index, value in batch.items():
                try:
                    self.vcpu.set_msrs({index: value})
                except KvmError as exc:
                    # A refused zero is a default this configuration has no place for
                    # (e.g. MSR_KVM_ASYNC_PF_INT without the in-kernel LAPIC): nothing lost.
                    (log.debug if value == 0 else log.warning)("MSR not restored", extra={
                        "vm_id": self.vm_id, "vcpu": self.id, "msr": hex(index),
                        "value": hex(value), "error": str(exc)})
