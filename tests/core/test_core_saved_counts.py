"""A VM's saved state counts every guest write to an ioevent and every resample of an irqfd,
also those its eventfds still hold because the daemon's fd watcher has not taken them yet:
the eventfds themselves do not travel with a snapshot, a migration or a hand-over."""

from __future__ import annotations

from kvmd.core.host import Host
from kvmd.core.vm import VmOptions
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
