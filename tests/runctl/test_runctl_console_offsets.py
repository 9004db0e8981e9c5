"""StreamConsole offsets: every message says where its bytes lie in the guest's whole
output, both for a backlog split over several messages and for live output, so a client
can resume exactly where it stopped."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from guests_runctl import echo_program, print_program
from polling import wait_until
from runctl_api import STREAM_TIMEOUT, WAIT, Api

from kvmd.api.base import MESSAGE_OVERHEAD
from kvmd_proto import vmm_pb2 as pb

CHUNK = 64


def _contiguous(chunks: list[pb.ConsoleOutput], start: int = 0) -> None:
    offset = start
    for c in chunks:
        assert c.offset == offset, [(x.offset, len(x.data)) for x in chunks]
        offset += len(c.data)


def test_backlog_split_over_messages_carries_each_chunks_offset(
        api_factory: Callable[..., Api]) -> None:
    """A backlog longer than one message arrives in chunks whose offsets follow on."""
    api = api_factory(max_message_bytes=MESSAGE_OVERHEAD + CHUNK)
    text = bytes(0x41 + i % 26 for i in range(150))
    api.boot("long", print_program(text, 1))
    watch = api.watch("long")
    api.start("long")
    watch.wait_for("debug_exit")
    chunks = list(api.vms.StreamConsole(pb.StreamConsoleRequest(
        vm_id="long", backlog=True, no_follow=True), timeout=STREAM_TIMEOUT))
    assert [len(c.data) for c in chunks] == [CHUNK, CHUNK, 150 - 2 * CHUNK]
    assert b"".join(c.data for c in chunks) == text
    _contiguous(chunks)
    api.delete("long")


def test_live_console_messages_carry_advancing_offsets(api: Api) -> None:
    """Live output in several messages: each offset is the previous one plus its length."""
    api.boot("echo", echo_program())
    call = api.vms.StreamConsole(pb.StreamConsoleRequest(vm_id="echo"),
                                 timeout=STREAM_TIMEOUT)
    vm_obj = api.daemon.host.get_vm("echo")  # type: ignore[union-attr]
    watch = api.watch("echo")
    with ThreadPoolExecutor(1) as pool:
        # The daemon subscribes once the first message is asked for: ask, then wait for it.
        pending = pool.submit(next, call)
        wait_until(lambda: vm_obj.console._live.subscriber_count == 1, WAIT, "the subscriber")
        api.start("echo")
        api.vms.WriteConsole(pb.WriteConsoleRequest(vm_id="echo", data=b"ab"))
        first = pending.result(WAIT)
    wait_until(lambda: vm_obj.console.bytes_out >= 2, WAIT, "the echo of ab")
    chunks = [first]
    api.vms.WriteConsole(pb.WriteConsoleRequest(vm_id="echo", data=b"cd\n"))
    watch.wait_for("debug_exit")
    while sum(len(c.data) for c in chunks) < 5:
        chunks.append(next(call))
    call.cancel()
    assert len(chunks) >= 2
    assert b"".join(c.data for c in chunks) == b"abcd\n"
    _contiguous(chunks)
    api.delete("echo")
