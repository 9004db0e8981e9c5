"""Control-RPC latency of kvmd against a bare grpcio unary echo, in the same run.

Both servers run in this process on Unix sockets in a temporary directory, with the same
thread pool size and message limits: kvmd (an in-process `Daemon`) and a bare grpcio server
whose only method returns its request bytes (a generic handler, no proto). Each operation
is timed call by call after a warm-up; the rounds interleave the operations so drift in
the machine hits them all alike. The table gives p50/p99 and the ratio against the echo
doing the same number of round trips (a pair of RPCs is compared with two echoes).
Not a test: it asserts nothing about speed.

    .venv/bin/python benchmarks/rpc_latency.py [--calls N] [--warmup N] [--rounds N]

Target: control RPCs within 1.5x of the bare echo.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc

from kvmd.server import Config, Daemon
from kvmd_proto import vmm_pb2 as pb
from kvmd_proto import vmm_pb2_grpc as rpc

WORKERS = 16
MESSAGE_BYTES = 16 << 20
ECHO_METHOD = "/bench.Echo/Echo"
ECHO_STREAM_METHOD = "/bench.Echo/EchoStream"
TARGET_RATIO = 1.5


@dataclass
class Operation:
    name: str
    rpcs: int  # round trips per operation
    run: Callable[[int], None]  # run(i): one operation, i unique per call
    samples: list[float]


def _echo_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield request


def start_echo_server(address: str) -> grpc.Server:
    """A bare grpcio server returning its request (bytes in, bytes out): unary `Echo`, and
    `EchoStream`, a server stream of one message (the shape of GetDirtyLog)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKERS),
        options=[("grpc.max_receive_message_length", MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MESSAGE_BYTES)])
    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(
            lambda request, context: request,
            request_deserializer=None, response_serializer=None),
        "EchoStream": grpc.unary_stream_rpc_method_handler(
            _echo_stream, request_deserializer=None, response_serializer=None),
    })
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(address)
    server.start()
    return server


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000,
                        help="timed operations of each kind, over all rounds")
    parser.add_argument("--warmup", type=int, default=200, help="untimed operations first")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="kvmd-bench-") as tmp:
        kvmd_address = f"unix://{tmp}/kvmd.sock"
        echo_address = f"unix://{tmp}/echo.sock"
        daemon = Daemon(Config(listen=[kvmd_address], log_level="warning",
                               max_concurrent_rpcs=WORKERS, max_message_bytes=MESSAGE_BYTES,
                               max_vms=1024))
        daemon.start()
        echo_server = start_echo_server(echo_address)
        kvmd_channel = grpc.insecure_channel(kvmd_address)
        echo_channel = grpc.insecure_channel(echo_address)
        try:
            vms = rpc.VmsStub(kvmd_channel)
            memory = rpc.MemoryStub(kvmd_channel)
            vcpus = rpc.VcpusStub(kvmd_channel)
            echo = echo_channel.unary_unary(ECHO_METHOD)
            # A request of the same size as GetVm's, so the echo moves comparable bytes.
            get_request = pb.GetVmRequest(vm_id="bench")
            echo_payload = get_request.SerializeToString()
            vms.CreateVm(pb.CreateVmRequest(vm_id="bench"))

            def op_echo(i: int) -> None:
                echo(echo_payload)

            def op_get_vm(i: int) -> None:
                vms.GetVm(get_request)

            def op_add_remove(i: int) -> None:
                region = memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
                    vm_id="bench", guest_addr=0x100000, size=0x100000))
                memory.RemoveMemoryRegion(pb.RemoveMemoryRegionRequest(
                    vm_id="bench", slot=region.slot))

            steps: dict[str, list[float]] = {}

            def op_cycle(i: int) -> None:
                vm_id = f"cycle-{i}"
                clock = time.perf_counter
                t0 = clock()
                vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id))
                t1 = clock()
                memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
                    vm_id=vm_id, guest_addr=0, size=0x100000))
                t2 = clock()
                vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=0))
                t3 = clock()
                vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id))
                t4 = clock()
                for name, dt in (("CreateVm", t1 - t0), ("AddMemoryRegion", t2 - t1),
                                 ("CreateVcpu", t3 - t2), ("DeleteVm", t4 - t3)):
                    steps.setdefault(name, []).append(dt)

            ops = [
                Operation("bare echo", 1, op_echo, []),
                Operation("GetVm", 1, op_get_vm, []),
                Operation("AddMemoryRegion+RemoveMemoryRegion", 2, op_add_remove, []),
                Operation("CreateVm/AddMemoryRegion/CreateVcpu/DeleteVm", 4, op_cycle, []),
            ]
            counter = 0
            for op in ops:
                for _ in range(args.warmup):
                    op.run(counter)
                    counter += 1
            per_round = max(1, args.calls // args.rounds)
            clock = time.perf_counter
            for _ in range(args.rounds):
                for op in ops:
                    for _ in range(per_round):
                        t0 = clock()
                        op.run(counter)
                        op.samples.append(clock() - t0)
                        counter += 1
        finally:
            kvmd_channel.close()
            echo_channel.close()
            echo_server.stop(None)
            daemon.stop()

    echo_op = ops[0]
    echo_p50 = percentile(echo_op.samples, 0.50)
    echo_p99 = percentile(echo_op.samples, 0.99)
    print(f"kvmd control-RPC latency vs a bare grpcio echo (Unix sockets, in-process, "
          f"{len(echo_op.samples)} timed calls each)")
    header = (f"{'operation':<46} {'RPCs':>4} {'p50 us':>9} {'p99 us':>9} "
              f"{'p50/echo':>9} {'p99/echo':>9}")
    print(header)
    print("-" * len(header))
    worst = 0.0
    for op in ops:
        p50 = percentile(op.samples, 0.50)
        p99 = percentile(op.samples, 0.99)
        r50 = p50 / (echo_p50 * op.rpcs)
        r99 = p99 / (echo_p99 * op.rpcs)
        if op is not echo_op:
            worst = max(worst, r50)
        print(f"{op.name:<46} {op.rpcs:>4} {p50 * 1e6:>9.1f} {p99 * 1e6:>9.1f} "
              f"{r50:>8.2f}x {r99:>8.2f}x")
    print("  the full cycle, step by step (p50 us, ratio to one echo): " + ", ".join(
        f"{name} {percentile(v, 0.5) * 1e6:.0f} ({percentile(v, 0.5) / echo_p50:.2f}x)"
        for name, v in steps.items()))
    print(f"(ratios are per round trip: an operation of n RPCs is compared with n echoes; "
          f"mean echo {statistics.fmean(echo_op.samples) * 1e6:.1f} us)")
    verdict = "within" if worst <= TARGET_RATIO else "OUTSIDE"
    print(f"worst p50 ratio {worst:.2f}x: {verdict} the {TARGET_RATIO}x target")


if __name__ == "__main__":
    main()
