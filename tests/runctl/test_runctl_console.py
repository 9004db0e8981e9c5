"""The in-daemon COM1 UART and debug-exit port, through StreamConsole/WriteConsole/WatchVm."""

from __future__ import annotations

import threading

import grpc
from guests_runctl import DATA_ADDR, echo_program, print_program
from polling import wait_until
from runctl_api import STREAM_TIMEOUT, WAIT, Api, Code

from kvmd_proto import vmm_pb2 as pb


class ConsoleReader:
    """Reads a StreamConsole stream into a buffer from a background thread."""

    def __init__(self, api: Api, vm_id: str, backlog: bool) -> None:
        self.call = api.vms.StreamConsole(pb.StreamConsoleRequest(vm_id=vm_id, backlog=backlog),
                                          timeout=STREAM_TIMEOUT)
        self.data = bytearray()
        self.chunks = 0
        self.code: grpc.StatusCode | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for chunk in self.call:
                with self._lock:
                    self.data += chunk.data
                    self.chunks += 1
            self.code = Code.OK
        except grpc.RpcError as exc:
            self.code = exc.code()

    def text(self) -> bytes:
        with self._lock:
            return bytes(self.data)

    def wait_for(self, expected: bytes, timeout: float = WAIT) -> bytes:
        wait_until(lambda: expected in self.text(), timeout,
                   f"{expected!r} on the console (have {self.text()!r})")
        return self.text()

    def cancel(self) -> None:
        self.call.cancel()
        self._thread.join(5)


GREETING = b"hello from the guest\r\n"


def test_guest_prints_through_uart_live_and_backlog_replayed(api: Api) -> None:
    api.boot("printer", print_program(GREETING, 0x2A))
    live = ConsoleReader(api, "printer", backlog=False)
    # The subscription is registered once the stream's first message is requested: wait
    # until the daemon has it before starting the guest.
    vm_obj = api.daemon.host.get_vm("printer")  # type: ignore[union-attr]
    wait_until(lambda: vm_obj.console._live.subscriber_count == 1, WAIT, "the subscriber")
    watch = api.watch("printer")
    api.start("printer")
    assert live.wait_for(GREETING) == GREETING
    assert watch.wait_for("debug_exit").exit_code == 0x2A

    # A late subscriber asking for the backlog gets everything printed so far, first.
    late = ConsoleReader(api, "printer", backlog=True)
    assert late.wait_for(GREETING) == GREETING
    # A late subscriber without backlog gets nothing of the past.
    late_live = ConsoleReader(api, "printer", backlog=False)
    wait_until(lambda: vm_obj.console._live.subscriber_count == 3, WAIT, "3 subscribers")
    assert late_live.text() == b""
    for reader in (live, late, late_live):
        reader.cancel()
    api.delete("printer")


def test_console_backlog_is_bounded_to_console_buffer_bytes(api: Api) -> None:
    text = bytes(range(0x41, 0x41 + 26)) + b"0123456789"  # 36 bytes
    api.boot("small-ring", print_program(text, 1), console_buffer_bytes=16)
    watch = api.watch("small-ring")
    api.start("small-ring")
    watch.wait_for("debug_exit")
    late = ConsoleReader(api, "small-ring", backlog=True)
    assert late.wait_for(text[-16:]) == text[-16:]  # only the newest 16 bytes are kept
    late.cancel()
    api.delete("small-ring")


def test_guest_reads_console_input_and_echoes_it(api: Api) -> None:
    api.boot("echo", echo_program())
    console = ConsoleReader(api, "echo", backlog=True)
    watch = api.watch("echo")
    # Some input before the guest runs, the rest while it polls the LSR.
    assert api.vms.WriteConsole(pb.WriteConsoleRequest(vm_id="echo", data=b"ping")).accepted == 4
    api.start("echo")
    console.wait_for(b"ping")
    api.vms.WriteConsole(pb.WriteConsoleRequest(vm_id="echo", data=b" pong\n"))
    event = watch.wait_for("debug_exit")
    assert event.exit_code == len(b"ping pong\n")  # bytes the guest counted
    assert console.wait_for(b"ping pong\n") == b"ping pong\n"
    assert api.read("echo", DATA_ADDR, 10) == b"ping pong\n"  # and stored in its memory
    console.cancel()
    api.delete("echo")


def test_console_rpcs_on_a_missing_vm(api: Api) -> None:
    api.assert_code(lambda: api.vms.WriteConsole(
        pb.WriteConsoleRequest(vm_id="ghost", data=b"x")), Code.NOT_FOUND)
    api.assert_code(lambda: list(api.vms.StreamConsole(
        pb.StreamConsoleRequest(vm_id="ghost"), timeout=WAIT)), Code.NOT_FOUND)
    api.assert_code(lambda: list(api.vms.WatchVm(
        pb.WatchVmRequest(vm_id="ghost"), timeout=WAIT)), Code.NOT_FOUND)


def test_debug_exit_reports_code_in_watch_and_getvm(api: Api) -> None:
    api.boot("dexit", print_program(b"", 0x1234))
    watch = api.watch("dexit")
    assert watch.wait_for("state").state == "created"
    api.start("dexit")
    event = watch.wait_for("debug_exit")
    assert event.exit_code == 0x1234
    assert event.state == "stopped"
    types = watch.types()
    assert types.index("state") < types.index("started") < types.index("debug_exit")
    vm = api.get_vm("dexit")
    assert vm.state == "stopped"
    assert vm.HasField("exit_code") and vm.exit_code == 0x1234
    assert vm.reason == "debug_exit"
    assert vm.vcpu_states[0] == "stopped"
    # A debug-exited VM can be inspected and deleted; it is not running.
    api.assert_code(lambda: api.pause("dexit"), Code.FAILED_PRECONDITION)
    api.delete("dexit")
    assert watch.wait_ended() is not None  # the watch ends with the VM


def test_debug_exit_on_a_custom_port(api: Api) -> None:
    api.boot("dexit-port", print_program(b"", 9).replace(b"\x01\x05", b"\x34\x12"),
             debug_exit_port=0x1234)
    watch = api.watch("dexit-port")
    api.start("dexit-port")
    assert watch.wait_for("debug_exit").exit_code == 9
    assert api.get_vm("dexit-port").options.debug_exit_port == 0x1234
    api.delete("dexit-port")


def test_debug_exit_port_on_the_uart_is_refused(api: Api) -> None:
    """Each of COM1's eight ports (0x3f8-0x3ff) is refused as the debug-exit port, as a
    bad argument; the ports just outside it are taken."""
    for port in (0x3F8, 0x3FA, 0x3FF):
        api.assert_code(lambda port=port: api.create_vm("bad-port", debug_exit_port=port),
                        Code.INVALID_ARGUMENT)
    for port in (0x3F7, 0x400):
        api.create_vm("next-to-com1", debug_exit_port=port)
        api.delete("next-to-com1")
    api.assert_code(lambda: api.create_vm("bad-port", debug_exit_port=0x10000),
                    Code.INVALID_ARGUMENT)


def test_console_input_larger_than_the_buffer_is_invalid_argument(api: Api) -> None:
    """Input that could never fit the COM1 input buffer (4096 bytes) is a bad argument, not
    a limit a retry could get past: INVALID_ARGUMENT. Input that fits the buffer but not its
    free room now is RESOURCE_EXHAUSTED (retryable); nothing is queued either way."""
    api.create_vm("flood")
    api.assert_code(lambda: api.vms.WriteConsole(pb.WriteConsoleRequest(
        vm_id="flood", data=b"x" * 5000)), Code.INVALID_ARGUMENT)
    api.assert_code(lambda: api.vms.WriteConsole(pb.WriteConsoleRequest(
        vm_id="flood", data=b"x" * 4097)), Code.INVALID_ARGUMENT)
    # The guest does not run: nothing drains the buffer.
    assert api.vms.WriteConsole(pb.WriteConsoleRequest(
        vm_id="flood", data=b"y" * 4000)).accepted == 4000
    api.assert_code(lambda: api.vms.WriteConsole(pb.WriteConsoleRequest(
        vm_id="flood", data=b"z" * 97)), Code.RESOURCE_EXHAUSTED)
    assert api.vms.WriteConsole(pb.WriteConsoleRequest(
        vm_id="flood", data=b"z" * 96)).accepted == 96
    api.delete("flood")
    api.create_vm("full")  # input exactly the buffer's size fits an empty buffer
    assert api.vms.WriteConsole(pb.WriteConsoleRequest(
        vm_id="full", data=b"x" * 4096)).accepted == 4096
    api.delete("full")


def test_deleting_the_vm_ends_console_streams(api: Api) -> None:
    api.boot("console-gone", print_program(b"bye", 0))
    watch = api.watch("console-gone")
    api.start("console-gone")
    watch.wait_for("debug_exit")
    reader = ConsoleReader(api, "console-gone", backlog=True)
    reader.wait_for(b"bye")
    api.delete("console-gone")
    wait_until(lambda: reader.code is not None, WAIT, "the console stream to end")
    api.assert_healthy()
