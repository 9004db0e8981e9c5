"""Stopping the daemon while guests run and clients are attached ends everything."""

from __future__ import annotations

import threading
from collections.abc import Callable

from guests import SPIN
from guests_runctl import CLAIM_PORT, in_twice_program
from polling import wait_until
from runctl_api import Api, vcpu_threads

from kvmd_proto import vmm_pb2 as pb


def test_daemon_stop_with_running_vms_watchers_and_a_waiting_handler(
        api_factory: Callable[..., Api]) -> None:
    api = api_factory()
    api.boot("spinner", SPIN)
    api.boot("waiter", in_twice_program())
    handler = api.handler("waiter", [pb.AddressRange(space=pb.PIO, base=CLAIM_PORT,
                                                     length=1)], deadline_ms=30_000)
    handler.claimed()
    watch = api.watch("spinner")
    console = api.vms.StreamConsole(pb.StreamConsoleRequest(vm_id="spinner", backlog=True),
                                    timeout=60)
    api.start("spinner")
    api.start("waiter")
    handler.next_exit()  # vCPU of "waiter" now waits for us
    assert len(vcpu_threads()) == 2

    stopper = threading.Thread(target=api.stop_daemon, daemon=True)
    stopper.start()
    stopper.join(20)
    assert not stopper.is_alive(), "Daemon.stop() hung with clients attached"
    assert api.daemon.host is not None and api.daemon.host.vm_count() == 0
    wait_until(lambda: not vcpu_threads(), 10, "every vCPU thread to end")
    assert handler.wait_ended() is not None
    assert watch.wait_ended() is not None
    console.cancel()
