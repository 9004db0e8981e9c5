"""A VM's saved state counts every guest write to an ioevent and every resample of an irqfd,
also those its eventfds still hold because the daemon's fd watcher has not taken them yet:
the eventfds themselves do not travel with a snapshot, a migration or a hand-over. Counts
add up over every take, and watchers are told each take's count."""

from __future__ import annotations

from polling import wait_until

from kvmd.core.host import Host
from kvmd.core.vm import Fired, VmOptions
from kvmd.kvm import IoSpace


def test_counts_the_fd_watcher_has_not_taken_yet_are_saved(host: Host) -> None:
    vm = host.create_vm("counts", {}, VmOptions(irqchip=True))
    vm.register_ioevent("out", IoSpace.PIO, 0x99, 1, None)
    vm.register_irqfd("level", 5, True)
    ioevent = vm._ioevents()["out"]
    irqfd = vm._irqfds()["level"]
    assert irqfd.resample is not None
    # As if the watcher were still busy elsewhere: its callbacks for these fds do nothing.
    with vm._watcher.quiet():
        for fd in (ioevent.event.fileno(), irqfd.resample.fileno()):
            vm._watcher._callbacks[fd] = lambda: None
    ioevent.event.write(3)  # three guest writes KVM signalled
    irqfd.resample.write(2)  # two end-of-interrupts
    state = vm.save_state()
    assert [(e.ioevent_id, e.fired) for e in state.ioevents] == [("out", 3)]
    assert [(e.irqfd_id, e.resamples) for e in state.irqfds] == [("level", 2)]


def test_counts_add_up_over_many_takes(host: Host) -> None:
    """Each take of an eventfd's count adds to the total: the fd watcher's, then a save's,
    then another save's."""
    vm = host.create_vm("sums", {}, VmOptions(irqchip=True))
    ioevent = vm.register_ioevent("out", IoSpace.PIO, 0x99, 1, None)
    irqfd = vm.register_irqfd("level", 5, True)
    assert irqfd.resample is not None
    ioevent.event.write(2)
    irqfd.resample.write(2)
    wait_until(lambda: (ioevent.fired, irqfd.resamples) == (2, 2), 10, "the watcher's take")
    with vm._watcher.quiet():
        for fd in (ioevent.event.fileno(), irqfd.resample.fileno()):
            vm._watcher._callbacks[fd] = lambda: None
    for more in (3, 4):
        ioevent.event.write(more)
        irqfd.resample.write(more)
        state = vm.save_state()
    assert [(e.ioevent_id, e.fired) for e in state.ioevents] == [("out", 9)]
    assert [(e.irqfd_id, e.resamples) for e in state.irqfds] == [("level", 9)]


def test_watchers_are_told_how_many_times_an_eventfd_fired(host: Host) -> None:
    """A watcher of ioevents or of resamples is told the count the eventfd held (three
    guest writes at once are one report of three), not one per report."""
    vm = host.create_vm("told", {}, VmOptions(irqchip=True))
    ioevent = vm.register_ioevent("out", IoSpace.PIO, 0x99, 1, None)
    irqfd = vm.register_irqfd("level", 5, True)
    assert irqfd.resample is not None
    fired, resampled = vm.watch_ioevents(), vm.watch_resamples()
    ioevent.event.write(3)
    irqfd.resample.write(2)
    assert fired.get(10) == Fired("out", 3)
    assert resampled.get(10) == Fired("level", 2)
    fired.close()
    resampled.close()
