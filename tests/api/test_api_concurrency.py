"""16 clients at once creating, filling and deleting VMs; nothing may leak."""

from __future__ import annotations

import os
import threading
import time

from api_support import RunningDaemon, Stubs

from kvmd_proto import vmm_pb2 as pb

CLIENTS = 16
ROUNDS = 3
MEM_SIZE = 1 << 20


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the fd listdir itself used, closed since
            continue
    return fds


def _lifecycle(stubs: Stubs, vm_id: str, irqchip: bool) -> None:
    """One client's work on one VM, checked as it goes."""
    stubs.vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id, labels={"test": "concurrency"},
                                          options=pb.VmOptions(irqchip=irqchip)))
    region = stubs.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id=vm_id, guest_addr=0, size=MEM_SIZE, log_dirty=True))
    data = (vm_id.encode() * (MEM_SIZE // len(vm_id) + 1))[:MEM_SIZE]
    written = stubs.memory.WriteGuestMemory(iter([
        pb.WriteGuestMemoryRequest(vm_id=vm_id, guest_addr=0, data=data[: MEM_SIZE // 2]),
        pb.WriteGuestMemoryRequest(data=data[MEM_SIZE // 2 :])]))
    assert written.bytes_written == MEM_SIZE
    back = b"".join(c.data for c in stubs.memory.ReadGuestMemory(pb.ReadGuestMemoryRequest(
        vm_id=vm_id, guest_addr=0, length=MEM_SIZE, chunk_size=256 << 10)))
    assert back == data, f"{vm_id} read back someone else's memory"
    list(stubs.memory.GetDirtyLog(pb.GetDirtyLogRequest(vm_id=vm_id, slot=region.slot)))
    stubs.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=0))
    stubs.vcpus.SetRegs(pb.SetRegsRequest(vcpu=pb.VcpuRef(vm_id=vm_id),
                                          regs=pb.Regs(rip=0x1000, rflags=2)))
    assert stubs.vcpus.GetRegs(pb.VcpuRef(vm_id=vm_id)).rip == 0x1000
    stubs.ioevents.RegisterIoevent(pb.RegisterIoeventRequest(
        vm_id=vm_id, ioevent_id="doorbell", space=pb.MMIO, address=0xD000_0000, length=4))
    if irqchip:
        stubs.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(
            vm_id=vm_id, irqfd_id="irq", gsi=5, resample=True))
        stubs.interrupts.TriggerIrqfd(pb.TriggerIrqfdRequest(vm_id=vm_id, irqfd_id="irq"))
    got = stubs.vms.GetVm(pb.GetVmRequest(vm_id=vm_id))
    assert (got.vcpu_count, got.memory_slot_count, got.memory_bytes) == (1, 1, MEM_SIZE)
    stubs.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id))


def test_16_clients_create_fill_delete(api: RunningDaemon) -> None:
    # Warm up every code path once, so lazily created process-wide state (grpc's pollers,
    # the vCPU kick signal handler, the fd watcher) exists before the baseline is taken.
    warm = api.connect()
    _lifecycle(warm, "warm-up", irqchip=True)
    warm.close()
    api.assert_healthy()  # the main channel is connected (its sockets open) at both ends
    time.sleep(0.2)
    baseline = _open_fds()

    errors: list[BaseException] = []
    start = threading.Barrier(CLIENTS)

    def client(n: int) -> None:
        stubs = Stubs.connect(api.address)
        try:
            start.wait(timeout=30)
            for r in range(ROUNDS):
                _lifecycle(stubs, f"vm-{n}-{r}", irqchip=n % 2 == 0)
        except BaseException as exc:
            errors.append(exc)
        finally:
            stubs.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert errors == []

    assert list(api.vms.ListVms(pb.ListVmsRequest()).vms) == []
    info = api.hypervisor.GetInfo(pb.GetInfoRequest())
    assert (info.vm_count, info.memory_in_use_bytes) == (0, 0)

    # grpc closes the clients' sockets asynchronously: give it a moment.
    deadline = time.monotonic() + 10
    while True:
        now = _open_fds()
        leaked = {fd: target for fd, target in now.items() if fd not in baseline}
        if len(now) <= len(baseline) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(now) <= len(baseline), f"fds leaked: {leaked}"
    api.assert_healthy()


def test_concurrent_duplicate_creates_one_wins(api: RunningDaemon) -> None:
    results: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    def client() -> None:
        stubs = api.connect()
        start.wait(timeout=30)
        try:
            stubs.vms.CreateVm(pb.CreateVmRequest(vm_id="contested"))
            outcome = "OK"
        except Exception as exc:
            outcome = exc.code().name  # type: ignore[attr-defined]
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == ["ALREADY_EXISTS"] * (CLIENTS - 1) + ["OK"]
    assert [v.vm_id for v in api.vms.ListVms(pb.ListVmsRequest()).vms] == ["contested"]


def test_concurrent_region_adds_on_one_vm_never_overlap(api: RunningDaemon) -> None:
    api.create_vm("shared")
    results: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    def client(n: int) -> None:
        stubs = api.connect()
        start.wait(timeout=30)
        try:
            # Every client asks for the same range, and half also for a range of its own.
            stubs.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
                vm_id="shared", guest_addr=0, size=0x10000))
            outcome = "OK"
        except Exception as exc:
            outcome = exc.code().name  # type: ignore[attr-defined]
        if n % 2:
            stubs.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
                vm_id="shared", guest_addr=(n + 1) << 20, size=0x1000))
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == ["ALREADY_EXISTS"] * (CLIENTS - 1) + ["OK"]
    regions = api.memory.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm_id="shared")).regions
    assert len(regions) == 1 + CLIENTS // 2
    assert sorted(r.slot for r in regions) == list(range(1 + CLIENTS // 2))
    info = api.hypervisor.GetInfo(pb.GetInfoRequest())
    assert info.memory_in_use_bytes == 0x10000 + CLIENTS // 2 * 0x1000
