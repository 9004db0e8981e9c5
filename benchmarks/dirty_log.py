"""GetDirtyLog throughput over gRPC against the raw KVM_GET_DIRTY_LOG ioctl, in the same run.

Two VMs, each with one 4 GiB dirty-logged slot (memfd-backed and sparse: nothing is
touched, so it costs no RAM): one owned by an in-process kvmd reached over a Unix socket,
one made directly with the binding (`kvmd.kvm` `Vm.get_dirty_log`). Both fetch (and reset)
the whole 128 KiB bitmap each call. The script prints calls per second, guest memory
covered per second and bitmap bytes per second for each, and the gRPC/raw time ratio.
For scale it also times a bare grpcio server (benchmarks/rpc_latency.py's echo) returning a
bitmap-sized payload, unary and as a one-message stream: the floor any gRPC path pays here.
Not a test: it asserts nothing about speed.

    .venv/bin/python benchmarks/dirty_log.py [--seconds S] [--slot-gib N]

Target: gRPC within 2x of the raw ioctl.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable

import grpc
from rpc_latency import ECHO_METHOD, ECHO_STREAM_METHOD, start_echo_server

from kvmd.api.gen import vmm_pb2 as pb
from kvmd.api.gen import vmm_pb2_grpc as rpc
from kvmd.kvm import Kvm, dirty_log_bitmap_size
from kvmd.server import Config, Daemon

GiB = 1 << 30
GUEST_ADDR = 1 << 32  # above the 32-bit hole, as a large RAM slot would be
TARGET_RATIO = 2.0


def measure(fn: Callable[[], int], seconds: float, warmup: int = 20) -> tuple[int, float]:
    """(calls, elapsed) of calling fn back to back for about `seconds`."""
    for _ in range(warmup):
        fn()
    calls = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        fn()
        calls += 1
        now = time.perf_counter()
        if now >= deadline:
            return calls, now - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--slot-gib", type=int, default=4, help="slot size in GiB")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    size = args.slot_gib * GiB
    bitmap_bytes = dirty_log_bitmap_size(size)

    with tempfile.TemporaryDirectory(prefix="kvmd-bench-") as tmp, Kvm() as kvm:
        address = f"unix://{tmp}/kvmd.sock"
        daemon = Daemon(Config(listen=[address], log_level="warning",
                               max_memory_per_vm_bytes=2 * size,
                               max_memory_total_bytes=2 * size))
        daemon.start()
        echo_server = start_echo_server(f"unix://{tmp}/echo.sock")
        echo_channel = grpc.insecure_channel(f"unix://{tmp}/echo.sock", options=[
            ("grpc.max_receive_message_length", 16 << 20)])
        channel = grpc.insecure_channel(address)
        raw_vm = kvm.create_vm()
        try:
            memory = rpc.MemoryStub(channel)
            rpc.VmsStub(channel).CreateVm(pb.CreateVmRequest(vm_id="dirty"))
            region = memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
                vm_id="dirty", guest_addr=GUEST_ADDR, size=size, log_dirty=True))
            raw_slot = raw_vm.add_memory_region(GUEST_ADDR, size, log_dirty=True)

            def raw() -> int:
                return len(raw_vm.get_dirty_log(raw_slot))

            def over_grpc(chunk_size: int = 0) -> Callable[[], int]:
                request = pb.GetDirtyLogRequest(vm_id="dirty", slot=region.slot,
                                                chunk_size=chunk_size,
                                                form=pb.GetDirtyLogRequest.BITMAP)

                def call() -> int:
                    bitmap = b"".join(c.bitmap for c in memory.GetDirtyLog(request))
                    return len(bitmap)
                return call

            payload = bytes(bitmap_bytes)
            echo = echo_channel.unary_unary(ECHO_METHOD)
            echo_stream = echo_channel.unary_stream(ECHO_STREAM_METHOD)

            def bare_echo() -> int:
                return len(echo(payload))

            def bare_echo_stream() -> int:
                return len(b"".join(echo_stream(payload)))

            assert raw() == over_grpc()() == bare_echo() == bare_echo_stream() == bitmap_bytes
            results = [
                ("raw KVM_GET_DIRTY_LOG (binding)", measure(raw, args.seconds)),
                ("GetDirtyLog over gRPC (1 chunk)", measure(over_grpc(), args.seconds)),
                ("GetDirtyLog over gRPC (16 KiB chunks)",
                 measure(over_grpc(16 << 10), args.seconds)),
                ("reference: bare grpcio echo, unary", measure(bare_echo, args.seconds)),
                ("reference: bare grpcio echo, stream", measure(bare_echo_stream,
                                                                args.seconds)),
            ]
        finally:
            echo_channel.close()
            echo_server.stop(None)
            channel.close()
            daemon.stop()
            raw_vm.close()

    print(f"dirty log of a {args.slot_gib} GiB slot ({size // 4096} pages, "
          f"{bitmap_bytes // 1024} KiB bitmap), nothing dirty")
    header = (f"{'path':<40} {'calls/s':>9} {'us/call':>9} {'GiB guest/s':>12} "
              f"{'MiB bitmap/s':>13} {'time ratio':>11}")
    print(header)
    print("-" * len(header))
    raw_per_call = results[0][1][1] / results[0][1][0]
    stream_floor = results[-1][1][1] / results[-1][1][0]
    worst = 0.0
    for name, (calls, elapsed) in results:
        per_call = elapsed / calls
        ratio = per_call / raw_per_call
        if name.startswith("GetDirtyLog"):
            worst = max(worst, ratio)
        print(f"{name:<40} {calls / elapsed:>9.0f} {per_call * 1e6:>9.1f} "
              f"{size / GiB / per_call:>12.0f} {bitmap_bytes / (1 << 20) / per_call:>13.0f} "
              f"{ratio:>10.2f}x")
    verdict = "within" if worst <= TARGET_RATIO else "OUTSIDE"
    print(f"worst gRPC/raw ratio {worst:.2f}x: {verdict} the {TARGET_RATIO}x target")
    grpc_1chunk = results[1][1][1] / results[1][1][0]
    print(f"GetDirtyLog (1 chunk) vs the bare grpcio stream of the same bytes: "
          f"{grpc_1chunk / stream_floor:.2f}x")


if __name__ == "__main__":
    main()
