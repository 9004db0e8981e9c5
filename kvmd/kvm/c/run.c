/* Entering the guest and completing exits. EXIT_COUNTER_SLOTS and the KVMD_COUNTER_*
 * slots are compiler definitions generated from _names.py by _build.py. */
#include "compat.h"

#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>


/* One KVM_RUN, then a copy of the exit out of kvm_run: the decoded exit is plain data and
 * kvm_run itself never leaves this module. `counters` (EXIT_COUNTER_SLOTS words, owned by the
 * vCPU) counts exits per reason without a lock: only this vCPU's thread writes them. */
static void kvmd_decode(struct kvm_run *run, struct kvmd_exit *out);

/* Count an exit: by reason, and IO/MMIO split by direction. */
static inline void kvmd_count(struct kvm_run *run, uint64_t *counters)
{
    uint32_t reason = run->exit_reason;
    counters[reason < KVMD_COUNTER_FIRST_EXTRA ? reason : EXIT_COUNTER_SLOTS - 1]++;
    if (reason == KVM_EXIT_IO)
        counters[run->io.direction == KVM_EXIT_IO_OUT ? KVMD_COUNTER_IO_OUT : KVMD_COUNTER_IO_IN]++;
    else if (reason == KVM_EXIT_MMIO)
        counters[run->mmio.is_write ? KVMD_COUNTER_MMIO_WRITE : KVMD_COUNTER_MMIO_READ]++;
}

int kvmd_run(int fd, struct kvm_run *run, struct kvmd_exit *out, uint64_t *counters)
{
    int ret = ioctl(fd, KVM_RUN, 0);
    if (ret < 0)
        return -errno;
    if (counters)
        kvmd_count(run, counters);
    kvmd_decode(run, out);
    return 0;
}

/* Run until an exit that userspace code must see. Port IO is completed here, without
 * returning, when the port's `pio_map` byte says so:
 *   KVMD_PIO_UNCLAIMED  writes dropped, reads all-ones, counted as unclaimed;
 *   KVMD_PIO_UART       the 16550 `uart` (uart.c): its registers, transmit ring and receive
 *                       FIFO; only a transmit that does not fit the ring comes back.
 * So a guest hammering an unclaimed port, or printing through COM1, costs no Python per
 * exit and holds no GIL. Returns -EINTR when kicked (immediate_exit or a signal), like
 * kvmd_run. */
static inline int kvmd_complete_pio(struct kvm_run *run, uint64_t *counters,
                                    const uint8_t *pio_map, struct kvmd_uart *uart)
{
    uint8_t kind = __atomic_load_n(&pio_map[run->io.port], __ATOMIC_RELAXED);
    if (kind == KVMD_PIO_UNCLAIMED) {
        if (run->io.direction == KVM_EXIT_IO_IN)
            memset((uint8_t *)run + run->io.data_offset, 0xff,
                   (size_t)run->io.size * run->io.count);
        counters[KVMD_COUNTER_UNCLAIMED_PIO]++;
        return 1;
    }
    if (kind == KVMD_PIO_UART && uart != NULL)
        return kvmd_uart_io(uart, run) == 0;
    return 0;
}

/* struct sched_attr, SCHED_ATTR_SIZE_VER0 (glibc has no wrapper for sched_setattr). */
struct kvmd_sched_attr {
    uint32_t size, policy;
    uint64_t flags;
    int32_t nice;
    uint32_t priority;
    uint64_t runtime, deadline, period;
};

/* Put the calling thread under `s`: the kernel's slice first, so a thread seen at its new
 * nice value has it already; then the policy and nice value in the order
 * kvmd.core.sched.set_thread_priority uses (leaving idle/batch before the nice value
 * changes, or after). */
static void kvmd_apply_sched(struct kvmd_sched *s)
{
    pid_t tid = (pid_t)syscall(SYS_gettid);
    struct sched_param param = {0};
    int failed = 0;
    if (s->default_slice) {
        struct kvmd_sched_attr attr;
        failed = syscall(SYS_sched_getattr, tid, &attr, sizeof attr, 0) != 0;
        if (!failed) {
            attr.size = sizeof attr;
            attr.flags = 0;
            attr.runtime = attr.deadline = attr.period = 0;  /* 0: the kernel's slice */
            failed = syscall(SYS_sched_setattr, tid, &attr, 0) != 0;
        }
    }
    if (!failed) {
        if (s->policy == SCHED_OTHER)
            failed = sched_setscheduler(tid, SCHED_OTHER, &param) != 0
                     || setpriority(PRIO_PROCESS, (id_t)tid, s->nice) != 0;
        else
            failed = setpriority(PRIO_PROCESS, (id_t)tid, s->nice) != 0
                     || sched_setscheduler(tid, s->policy, &param) != 0;
    }
    s->error = failed ? errno : 0;
}

int kvmd_run_loop(int fd, struct kvm_run *run, struct kvmd_exit *out, uint64_t *counters,
                  const uint8_t *pio_map, struct kvmd_uart *uart, struct kvmd_sched *sched)
{
    if (sched) {
        /* A kick since the caller decided to lower (it boosts the thread for the pause):
         * stay at that priority; the caller lowers on the next entry. */
        sched->applied = !__atomic_load_n(&run->immediate_exit, __ATOMIC_SEQ_CST);
        sched->error = 0;
        if (sched->applied)
            kvmd_apply_sched(sched);
    }
    for (;;) {
        int ret = ioctl(fd, KVM_RUN, 0);
        if (ret < 0)
            return -errno;
        kvmd_count(run, counters);
        if (run->exit_reason == KVM_EXIT_IO && kvmd_complete_pio(run, counters, pio_map, uart))
            continue;
        kvmd_decode(run, out);
        return 0;
    }
}

static void kvmd_decode(struct kvm_run *run, struct kvmd_exit *out)
{
    uint32_t reason = run->exit_reason;
    out->reason = reason;
    out->ndata = 0;
    out->data_len = 0;
    switch (reason) {
    case KVM_EXIT_IO: {
        uint64_t len = (uint64_t)run->io.size * run->io.count;
        out->direction = run->io.direction;
        out->address = run->io.port;
        out->size = run->io.size;
        out->count = run->io.count;
        if (run->io.direction == KVM_EXIT_IO_OUT) {
            if (len > sizeof(out->data))
                len = sizeof(out->data);
            memcpy(out->data, (uint8_t *)run + run->io.data_offset, len);
            out->data_len = (uint32_t)len;
        }
        break;
    }
    case KVM_EXIT_MMIO: {
        uint32_t len = run->mmio.len > 8 ? 8 : run->mmio.len;
        out->direction = run->mmio.is_write;
        out->address = run->mmio.phys_addr;
        out->size = run->mmio.len;
        if (run->mmio.is_write) {
            memcpy(out->data, run->mmio.data, len);
            out->data_len = len;
        }
        break;
    }
    case KVM_EXIT_UNKNOWN:
        out->value = run->hw.hardware_exit_reason;
        break;
    case KVM_EXIT_FAIL_ENTRY:
        out->value = run->fail_entry.hardware_entry_failure_reason;
        out->subtype = run->fail_entry.cpu;
        break;
    case KVM_EXIT_EXCEPTION:
        out->subtype = run->ex.exception;
        out->value = run->ex.error_code;
        break;
    case KVM_EXIT_DEBUG:
        out->subtype = run->debug.arch.exception;
        out->value = run->debug.arch.pc;
        out->words[0] = run->debug.arch.dr6;
        out->words[1] = run->debug.arch.dr7;
        out->ndata = 2;
        break;
    case KVM_EXIT_INTERNAL_ERROR: {
        uint32_t n = run->internal.ndata > 16 ? 16 : run->internal.ndata;
        out->subtype = run->internal.suberror;
        out->ndata = n;
        memcpy(out->words, run->internal.data, n * sizeof(uint64_t));
        break;
    }
    case KVM_EXIT_SYSTEM_EVENT: {
        uint32_t n = run->system_event.ndata > 16 ? 16 : run->system_event.ndata;
        out->subtype = run->system_event.type;
        out->value = run->system_event.flags;
        out->ndata = n;
        memcpy(out->words, run->system_event.data, n * sizeof(uint64_t));
        break;
    }
    case KVM_EXIT_IOAPIC_EOI:
        out->value = run->eoi.vector;
        break;
    case KVM_EXIT_X86_RDMSR:
    case KVM_EXIT_X86_WRMSR:
        out->address = run->msr.index;
        out->value = run->msr.data;
        out->subtype = run->msr.reason;
        /* Fail the access unless the caller completes it (as crosvm does). */
        run->msr.error = 1;
        break;
    case KVM_EXIT_HYPERV:
        out->subtype = run->hyperv.type;
        if (run->hyperv.type == KVM_EXIT_HYPERV_SYNIC) {
            out->words[0] = run->hyperv.u.synic.msr;
            out->words[1] = run->hyperv.u.synic.control;
            out->words[2] = run->hyperv.u.synic.evt_page;
            out->words[3] = run->hyperv.u.synic.msg_page;
            out->ndata = 4;
        } else if (run->hyperv.type == KVM_EXIT_HYPERV_HCALL) {
            out->words[0] = run->hyperv.u.hcall.input;
            out->words[1] = run->hyperv.u.hcall.params[0];
            out->words[2] = run->hyperv.u.hcall.params[1];
            out->ndata = 3;
        }
        break;
    case KVM_EXIT_HYPERCALL:
        out->value = run->hypercall.nr;
        memcpy(out->words, run->hypercall.args, 6 * sizeof(uint64_t));
        out->ndata = 6;
        break;
    case KVM_EXIT_TPR_ACCESS:
        out->value = run->tpr_access.rip;
        out->direction = run->tpr_access.is_write;
        break;
    default:
        break;
    }
}

int kvmd_complete_io_in(struct kvm_run *run, const uint8_t *data, uint32_t len)
{
    if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_IN)
        return -EINVAL;
    uint64_t want = (uint64_t)run->io.size * run->io.count;
    if (len != want)
        return -EINVAL;
    memcpy((uint8_t *)run + run->io.data_offset, data, len);
    return 0;
}

int kvmd_complete_mmio_read(struct kvm_run *run, const uint8_t *data, uint32_t len)
{
    if (run->exit_reason != KVM_EXIT_MMIO || run->mmio.is_write)
        return -EINVAL;
    if (len != run->mmio.len || len > 8)
        return -EINVAL;
    memcpy(run->mmio.data, data, len);
    return 0;
}

int kvmd_complete_msr(struct kvm_run *run, uint64_t data, uint8_t error)
{
    if (run->exit_reason == KVM_EXIT_X86_RDMSR)
        run->msr.data = data;
    else if (run->exit_reason != KVM_EXIT_X86_WRMSR)
        return -EINVAL;
    run->msr.error = error;
    return 0;
}

int kvmd_complete_hyperv(struct kvm_run *run, uint64_t result)
{
    if (run->exit_reason != KVM_EXIT_HYPERV || run->hyperv.type != KVM_EXIT_HYPERV_HCALL)
        return -EINVAL;
    run->hyperv.u.hcall.result = result;
    return 0;
}
