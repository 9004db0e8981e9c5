"""Live migration between two kvmd processes over TCP loopback, against a bare TCP loopback
stream of the same bytes measured in the same run.

* throughput: a 1 GiB guest with 256 MiB touched (host-written, non-zero), migrated from
  daemon A to daemon B; guest bytes sent per second, and the total time, beside a bare
  loopback TCP stream of the same 256 MiB (Python sockets, 1 MiB sendall/recv_into, the
  receiver reusing one buffer), and beside a bare grpcio bidi stream of them to a grpc.aio
  server in another process (the ceiling of any link over gRPC, as the daemons' is).
  Each figure is the best of three runs (kvmd's: three migrations of a fresh VM).
  kvmd's number includes finding the pages (SEEK_DATA, the zero-page scan of the 1 GiB),
  framing and XXH3 on the source, parsing, checking and writing every page into fresh
  guest memory on the target (pwritev into its memfd), and the pre-copy round that finds
  nothing dirty. For scale, the time to write the same bytes into a fresh memfd: the
  target's page allocation and copy alone. Also with mutual TLS (`--tls`, needs trustme).
* downtime: the self-checking working-set guest of tests/migration (4 MiB rewritten
  continuously, one page fault per page per round), migrated back and forth; the downtime
  each migration measured (pause on the source to the target's confirmation that it runs).

    .venv/bin/python benchmarks/migration.py [--touched-mib N] [--guest-mib N] [--hops N]

Targets (issue 11): throughput >= 0.5x the bare stream; downtime with a 4 MiB hot set under
50 ms. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for sub in ("tests", "tests/state", "tests/migration"):
    sys.path.insert(0, str(HERE.parent / sub))

from migration_support import Host, Pki, wait_for  # noqa: E402

from kvmd_proto import vmm_pb2 as pb  # noqa: E402

MiB = 1 << 20
THROUGHPUT_TARGET = 0.5
DOWNTIME_TARGET_MS = 50.0


def _receive_all(server: socket.socket, got: list[int]) -> None:
    conn, _ = server.accept()
    view = memoryview(bytearray(MiB))
    while n := conn.recv_into(view):
        got[0] += n
    conn.close()


def bare_tcp_seconds(data: memoryview, rounds: int = 3) -> float:
    """Best time to stream `data` over a loopback TCP connection (1 MiB sends)."""
    best = float("inf")
    for _ in range(rounds):
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        got = [0]
        thread = threading.Thread(target=_receive_all, args=(server, got))
        thread.start()
        client = socket.create_connection(server.getsockname())
        started = time.perf_counter()
        for at in range(0, len(data), MiB):
            client.sendall(data[at:at + MiB])
        client.shutdown(socket.SHUT_WR)
        thread.join()
        best = min(best, time.perf_counter() - started)
        client.close()
        server.close()
        assert got[0] == len(data)
    return best


def fresh_memfd_seconds(data: memoryview, rounds: int = 3) -> float:
    """Best time to write `data` into a fresh memfd with pwritev, 4 MiB at a time: what the
    target pays for the pages alone (their allocation and one copy), whatever the link."""
    best = float("inf")
    piece = 4 * MiB
    for _ in range(rounds):
        fd = os.memfd_create("kvmd-bench-fresh", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, len(data))
            started = time.perf_counter()
            for at in range(0, len(data), piece):
                os.pwritev(fd, [data[at:at + piece]], at)
            best = min(best, time.perf_counter() - started)
        finally:
            os.close(fd)
    return best


GRPC_SINK_METHOD = "/bench.Sink/Take"


def grpc_sink_server(port: int) -> None:
    """A bare grpc.aio server (as the daemon's) counting a bidi stream's bytes."""
    import asyncio

    import grpc.aio

    async def take(requests, context):  # type: ignore[no-untyped-def]
        n = 0
        async for message in requests:
            n += len(message)
        yield str(n).encode()

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * MiB)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Sink", {"Take": grpc.stream_stream_rpc_method_handler(take)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())


def bare_grpc_seconds(data: memoryview, rounds: int = 3) -> float:
    """Best time to stream `data` in 2 MiB messages of a grpcio bidi stream to a bare
    grpc.aio server in another process over TCP loopback: what any gRPC link carries at
    most here, whatever it does with the bytes."""
    import subprocess

    import grpc
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--grpc-sink", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        channel = grpc.insecure_channel(f"127.0.0.1:{port}",
                                        [("grpc.max_send_message_length", 64 * MiB)])
        call = channel.stream_stream(GRPC_SINK_METHOD, None, None)
        messages = [data[at:at + 2 * MiB].tobytes() for at in range(0, len(data), 2 * MiB)]
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            (reply,) = list(call(iter(messages)))
            best = min(best, time.perf_counter() - started)
            assert int(reply) == len(data)
        channel.close()
    finally:
        proc.kill()
        proc.wait()
    return best


def throughput(a: Host, b: Host, guest_mib: int, touched_mib: int,
               rounds: int = 3) -> tuple[list[float], float, int]:
    """(the seconds of each, guest bytes sent, bytes of the stream) of `rounds` migrations
    A -> B of a fresh VM each: the references are each the best of three runs, so kvmd's
    figure is too (one run alone ranged 0.19-0.48x of the bare stream here)."""
    times: list[float] = []
    for _ in range(rounds):
        seconds, guest_bytes, stream = _one_migration(a, b, guest_mib, touched_mib)
        times.append(seconds)
    return times, guest_bytes, stream


def _one_migration(a: Host, b: Host, guest_mib: int, touched_mib: int
                   ) -> tuple[float, float, int]:
    vm_id = "big"
    a.stubs.vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id))
    a.stubs.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id=vm_id, guest_addr=0, size=guest_mib * MiB, log_dirty=True))
    pattern = bytes(range(256)) * (MiB // 256)
    for at in range(0, touched_mib * MiB, 16 * MiB):
        a.node.write(vm_id, at, pattern * 16)
    a.stubs.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=0))
    started = time.perf_counter()
    progress = a.migrate(vm_id, b, timeout=600)
    seconds = time.perf_counter() - started
    b.stubs.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id))
    return seconds, progress[-1].pages_sent * 4096, progress[-1].bytes_sent


def downtimes(a: Host, b: Host, hops: int) -> list[float]:
    vm_id = "hot"
    a.boot_working_set(vm_id)
    a.node.start(vm_id)
    wait_for(lambda: a.passes(vm_id) > 20, 30, "passes")
    out = []
    src, dst = a, b
    for _ in range(hops):
        progress = src.migrate(vm_id, dst)
        out.append(progress[-1].downtime_ms)
        passes = dst.passes(vm_id)
        wait_for(lambda d=dst, p=passes: d.passes(vm_id) > p + 5, 30, "passes after a hop")
        src, dst = dst, src
    vm = src.vm(vm_id)
    assert vm.state == "running" and not vm.HasField("exit_code"), vm
    src.stubs.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--guest-mib", type=int, default=1024)
    parser.add_argument("--touched-mib", type=int, default=256)
    parser.add_argument("--hops", type=int, default=6)
    parser.add_argument("--tls", action="store_true", help="also measure with mutual TLS")
    parser.add_argument("--grpc-sink", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.grpc_sink:
        grpc_sink_server(args.grpc_sink)
        return
    tmp = Path(tempfile.mkdtemp(prefix="kvmd-bench-migration-"))
    data = memoryview((bytes(range(256)) * (MiB // 256)) * args.touched_mib)
    ref = bare_tcp_seconds(data)
    ref_rate = len(data) / ref
    print(f"bare TCP loopback stream of {args.touched_mib} MiB: {ref * 1000:.0f} ms "
          f"({ref_rate / 1e9:.2f} GB/s)")
    fresh = fresh_memfd_seconds(data)
    print(f"the same bytes written into a fresh memfd (pwritev, as the target applies them): "
          f"{fresh * 1000:.0f} ms = {fresh / ref:.2f}x the bare TCP stream's time")
    ref_grpc = bare_grpc_seconds(data)
    print(f"bare grpcio bidi stream of the same bytes (2 MiB messages, another process): "
          f"{ref_grpc * 1000:.0f} ms ({len(data) / ref_grpc / 1e9:.2f} GB/s) = "
          f"{ref / ref_grpc:.2f}x the bare TCP stream: the most a gRPC link carries here")
    setups: list[tuple[str, Pki | None]] = [("plain TCP", None)]
    if args.tls:
        setups.append(("mutual TLS", Pki(tmp / "pki")))
    for name, pki in setups:
        a = Host(tmp / f"{name[:5]}-a", pki, "bench-a")
        b = Host(tmp / f"{name[:5]}-b", pki, "bench-b")
        try:
            runs, guest_bytes, stream = throughput(a, b, args.guest_mib, args.touched_mib)
            seconds = min(runs)
            rate = guest_bytes / seconds
            print(f"{name}: {args.guest_mib} MiB guest, {args.touched_mib} MiB touched: "
                  f"migrated in {seconds * 1000:.0f} ms (best of "
                  f"{', '.join(f'{t * 1000:.0f}' for t in runs)}), {rate / 1e9:.2f} GB/s of guest "
                  f"pages ({stream / MiB:.1f} MiB on the wire) = {rate / ref_rate:.2f}x the "
                  f"bare stream (target >= {THROUGHPUT_TARGET}x), "
                  f"{rate * ref_grpc / len(data):.2f}x the bare grpcio stream")
            times = downtimes(a, b, args.hops)
            print(f"{name}: 4 MiB hot set, {args.hops} migrations: downtime p50 "
                  f"{statistics.median(times):.1f} ms, max {max(times):.1f} ms, all "
                  f"{', '.join(f'{t:.1f}' for t in times)} (target < {DOWNTIME_TARGET_MS:g} ms)")
        finally:
            a.stop()
            b.stop()


if __name__ == "__main__":
    main()
