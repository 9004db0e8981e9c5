"""A guest that debug-exits with code 0 reports the 0: the exit code is an optional field,
present (HasField) whenever the guest gave one, in GetVm and in every WatchVm event that
carries it."""

from __future__ import annotations

from guests_runctl import print_program
from polling import wait_until
from runctl_api import Api


def test_exit_code_zero_is_present_in_events_and_get_vm(api: Api) -> None:
    """debug_exit with 0: the debug_exit event, a later watcher's current state and GetVm
    all carry exit_code 0 (not an absent field)."""
    api.boot("zero", print_program(b"", 0))
    watch = api.watch("zero")
    api.start("zero")
    event = watch.wait_for("debug_exit")
    assert event.HasField("exit_code") and event.exit_code == 0
    vm = wait_until(lambda: (lambda v: v if v.state == "stopped" else None)(
        api.get_vm("zero")), 10, "the VM to stop")
    assert vm.HasField("exit_code") and vm.exit_code == 0
    current = api.watch("zero").wait_for("state")
    assert current.state == "stopped"
    assert current.HasField("exit_code") and current.exit_code == 0
    api.delete("zero")
