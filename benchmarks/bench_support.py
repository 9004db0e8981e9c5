"""What the benchmarks share: the daemon as a process, a bare grpcio echo server as a process,
C references built on demand, real-mode test guests, and round statistics.

Every benchmark measures kvmd and its reference in the same run, in alternating rounds, and
reports the median over rounds with the spread (min-max), since the development hosts have
2 cores shared with other work. Not a test module: nothing here asserts on speed.

    python benchmarks/bench_support.py --echo-server SOCK   (used by the scripts)
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD_DIR = os.path.join(HERE, ".build")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from kvmd_proto import vmm_pb2 as pb  # noqa: E402
from kvmd_proto import vmm_pb2_grpc as rpc  # noqa: E402

CODE_ADDR = 0x1000
ECHO_UNARY = "/bench.Echo/Echo"
ECHO_BIDI = "/bench.Echo/PingPong"
SPIN = bytes([0xEB, 0xFE])  # jmp $


def percentile(samples: list[float], p: float) -> float:
    """The p-th percentile (0-100) by nearest rank."""
    ordered = sorted(samples)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def spread(values: list[float], scale: float = 1.0, fmt: str = "{:.0f}") -> str:
    """'median (min-max)' of per-round values."""
    if not values:
        return "-"
    med = statistics.median(values) * scale
    lo, hi = min(values) * scale, max(values) * scale
    return f"{fmt.format(med)} ({fmt.format(lo)}-{fmt.format(hi)})"


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def build_c(name: str) -> str:
    """Compile benchmarks/c/NAME.c into benchmarks/.build/NAME unless up to date."""
    source = os.path.join(HERE, "c", f"{name}.c")
    binary = os.path.join(BUILD_DIR, name)
    if os.path.exists(binary) and os.path.getmtime(binary) >= os.path.getmtime(source):
        return binary
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        sys.exit(f"{name}: no C compiler found to build the reference")
    os.makedirs(BUILD_DIR, exist_ok=True)
    subprocess.run([cc, "-O2", "-Wall", "-o", binary, source], check=True)
    return binary


def wait_for_socket(path: str, proc: subprocess.Popen[Any], what: str) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"{what} did not start")
        time.sleep(0.02)


def kvmd_command(address: str, *args: str) -> list[str]:
    """The command line of a benchmark's daemon on `address`. KVMD_BENCH_DAEMON names
    another build's kvmd (a before/after comparison); KVMD_BENCH_ARGS adds flags (a layout
    such as "--api-cpus 0")."""
    kvmd = os.environ.get("KVMD_BENCH_DAEMON") or os.path.join(
        os.path.dirname(sys.executable), "kvmd")
    return [kvmd, "--listen", address, "--log-level", "error", *args,
            *os.environ.get("KVMD_BENCH_ARGS", "").split()]


@dataclass
class Kvmd:
    """The daemon as its own process (as in production), with stubs on one channel."""

    proc: subprocess.Popen[bytes]
    address: str
    channel: grpc.Channel
    vms: rpc.VmsStub
    vcpus: rpc.VcpusStub
    memory: rpc.MemoryStub
    exits: rpc.ExitHandlersStub
    hypervisor: rpc.HypervisorStub

    @classmethod
    def start(cls, sock: str, *args: str) -> Kvmd:
        address = f"unix://{sock}"
        proc = subprocess.Popen(kvmd_command(address, "--metrics-listen", "off", *args))
        wait_for_socket(sock, proc, "kvmd")
        channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(channel).result(timeout=30)
        return cls(proc, address, channel, rpc.VmsStub(channel), rpc.VcpusStub(channel),
                   rpc.MemoryStub(channel), rpc.ExitHandlersStub(channel),
                   rpc.HypervisorStub(channel))

    def stop(self) -> None:
        self.channel.close()
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def boot(self, vm_id: str, code: bytes, vcpus: int = 1, memory: int = 0x10000) -> None:
        """A real-mode VM: `memory` bytes of RAM at 0, `code` at CODE_ADDR, every vCPU
        starting there."""
        self.vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id), timeout=30)
        self.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
            vm_id=vm_id, guest_addr=0, size=memory), timeout=30)
        self.memory.WriteGuestMemory(iter([pb.WriteGuestMemoryRequest(
            vm_id=vm_id, guest_addr=CODE_ADDR, data=code)]), timeout=30)
        for i in range(vcpus):
            self.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=i), timeout=30)
            ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=i)
            sregs = self.vcpus.GetSregs(ref, timeout=30)
            sregs.cs.base, sregs.cs.selector = 0, 0
            self.vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref, sregs=sregs), timeout=30)
            self.vcpus.SetRegs(pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(
                rip=CODE_ADDR, rsp=0x8000, rflags=2)), timeout=30)

    def delete(self, vm_id: str) -> None:
        self.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id), timeout=60)


# -- the bare grpcio reference server -------------------------------------------------------

def echo_server_main(sock: str) -> None:
    """A bare grpcio server (its own process): unary Echo returns its request, PingPong
    echoes a bidirectional stream; raw bytes both ways, no interceptors."""

    def ping_pong(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        yield from requests

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
        "PingPong": grpc.stream_stream_rpc_method_handler(ping_pong),
    })])
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    server.wait_for_termination()


class EchoServer:
    """The echo server process and a channel to it."""

    def __init__(self, sock: str) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__),
                                      "--echo-server", sock])
        wait_for_socket(sock, self.proc, "the echo server")
        self.channel = grpc.insecure_channel(f"unix://{sock}")
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.unary = self.channel.unary_unary(ECHO_UNARY, request_serializer=None,
                                              response_deserializer=None)
        self.bidi = self.channel.stream_stream(ECHO_BIDI, request_serializer=None,
                                               response_deserializer=None)

    def stop(self) -> None:
        self.channel.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--echo-server":
        echo_server_main(sys.argv[2])
    else:
        sys.exit(__doc__)
