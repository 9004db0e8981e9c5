"""ReadGuestMemory checks its whole range before it sends anything: a range with a hole
between two slots is refused up front, never streamed half-way."""

from __future__ import annotations

import grpc
from api_support import RunningDaemon

from kvmd.core.errors import Reason
from kvmd_proto import vmm_pb2 as pb


def test_a_read_across_a_hole_between_slots_is_refused_before_any_chunk(
        api: RunningDaemon) -> None:
    """Slots at [0, 64 KiB) and [128 KiB, 192 KiB): reading [0, 192 KiB) in 4 KiB chunks
    fails INVALID_ARGUMENT (RANGE_OUTSIDE_MEMORY, field guest_addr) with no chunk sent,
    though its first and last bytes are guest memory."""
    api.create_vm("holes")
    api.add_memory("holes", 0, 0x10000)
    api.add_memory("holes", 0x20000, 0x10000)
    received: list[pb.GuestMemoryChunk] = []

    def read() -> None:
        try:
            for chunk in api.memory.ReadGuestMemory(pb.ReadGuestMemoryRequest(
                    vm_id="holes", guest_addr=0, length=0x30000, chunk_size=0x1000)):
                received.append(chunk)
        finally:
            assert received == [], "chunks were streamed before the refusal"

    api.assert_code(read, grpc.StatusCode.INVALID_ARGUMENT,
                    reason=Reason.RANGE_OUTSIDE_MEMORY, field="guest_addr")
    assert len(api.read("holes", 0x8000, 0x10000 - 0x8000)) == 0x8000  # a part is fine
