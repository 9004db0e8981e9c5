"""cffi (API mode) build script for the KVM binding.

Struct layouts come from the system's <linux/kvm.h> (Debian `linux-libc-dev`): every kernel
struct below is declared with `...;` so the C compiler, not this file, decides sizes and
offsets. Kernel structs with anonymous unions (kvm_run, kvm_irq_routing_entry, kvm_dirty_log)
are reached only through the small C helpers in `_SOURCE`, which copy them into flat
`kvmd_*` structs that this module defines itself. The ioctl numbers are the header's own
macros, listed once in `IOCTLS`.
"""

from __future__ import annotations

import os

from cffi import FFI

# The name tables live in _names.py so the runtime can use them without cffi's parser;
# loaded by path because the package itself cannot be imported before this build runs.
_names: dict = {}
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_names.py")) as _f:
    exec(compile(_f.read(), "_names.py", "exec"), _names)
IOCTLS = _names["IOCTLS"]
CAPABILITIES = _names["CAPABILITIES"]
EXIT_REASONS = _names["EXIT_REASONS"]
EXIT_COUNTER_SLOTS = _names["EXIT_COUNTER_SLOTS"]

_FALLBACK_DEFINES = """
#ifndef KVM_CAP_USER_MEMORY2
#define KVM_CAP_USER_MEMORY2 231
#endif
#ifndef KVM_CAP_MEMORY_FAULT_INFO
#define KVM_CAP_MEMORY_FAULT_INFO 232
#endif
#ifndef KVM_CAP_GUEST_MEMFD
#define KVM_CAP_GUEST_MEMFD 234
#endif
#ifndef KVM_EXIT_LOONGARCH_IOCSR
#define KVM_EXIT_LOONGARCH_IOCSR 38
#endif
#ifndef KVM_EXIT_MEMORY_FAULT
#define KVM_EXIT_MEMORY_FAULT 39
#endif
"""

# EXIT_COUNTER_SLOTS and the KVMD_COUNTER_* slot numbers (KVMD_COUNTER_IO_IN, ...).
_COUNTER_DEFINES = f"#define EXIT_COUNTER_SLOTS {EXIT_COUNTER_SLOTS}\n" + "".join(
    f"#define KVMD_COUNTER_{name.upper()} {slot}\n"
    for name, slot in _names["COUNTER_SLOTS"].items()
)

_CDEF_TYPES = """
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;
typedef short __s16;

struct kvm_userspace_memory_region {
    __u32 slot; __u32 flags; __u64 guest_phys_addr; __u64 memory_size; __u64 userspace_addr;
    ...;
};
struct kvm_irqfd { __u32 fd; __u32 gsi; __u32 flags; __u32 resamplefd; ...; };
struct kvm_ioeventfd { __u64 datamatch; __u64 addr; __u32 len; __s32 fd; __u32 flags; ...; };
struct kvm_dirty_log { __u32 slot; ...; };
struct kvm_irq_level { ...; };
struct kvm_irq_routing_entry { __u32 gsi; __u32 type; __u32 flags; ...; };
struct kvm_irq_routing { __u32 nr; __u32 flags; ...; };
struct kvm_run { __u8 request_interrupt_window; __u8 immediate_exit; __u32 exit_reason;
                 __u8 ready_for_interrupt_injection; __u8 if_flag; __u16 flags;
                 __u64 cr8; __u64 apic_base; ...; };
struct kvm_regs {
    __u64 rax, rbx, rcx, rdx; __u64 rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11; __u64 r12, r13, r14, r15; __u64 rip, rflags; ...;
};
struct kvm_segment {
    __u64 base; __u32 limit; __u16 selector; __u8 type; __u8 present, dpl, db, s, l, g, avl;
    __u8 unusable; ...;
};
struct kvm_dtable { __u64 base; __u16 limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss; struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8; __u64 efer; __u64 apic_base;
    __u64 interrupt_bitmap[4]; ...;
};
struct kvm_fpu {
    __u8 fpr[8][16]; __u16 fcw; __u16 fsw; __u8 ftwx; __u16 last_opcode;
    __u64 last_ip; __u64 last_dp; __u8 xmm[16][16]; __u32 mxcsr; ...;
};
struct kvm_cpuid_entry2 {
    __u32 function; __u32 index; __u32 flags; __u32 eax; __u32 ebx; __u32 ecx; __u32 edx; ...;
};
struct kvm_cpuid2 { __u32 nent; struct kvm_cpuid_entry2 entries[]; ...; };
struct kvm_msr_entry { __u32 index; __u32 reserved; __u64 data; ...; };
struct kvm_msrs { __u32 nmsrs; struct kvm_msr_entry entries[]; ...; };
struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; ...; };
struct kvm_mp_state { __u32 mp_state; ...; };
struct kvm_lapic_state { char regs[...]; ...; };
struct kvm_vcpu_events { __u32 sipi_vector; __u32 flags; ...; };
struct kvm_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 flags; __u32 devid; ...; };
struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; ...; };
struct kvm_create_device { __u32 type; __u32 fd; __u32 flags; ...; };
struct kvm_pit_config { __u32 flags; ...; };
struct kvm_clock_data { __u64 clock; __u32 flags; ...; };
struct kvm_stats_header {
    __u32 flags; __u32 name_size; __u32 num_desc; __u32 id_offset; __u32 desc_offset;
    __u32 data_offset; ...;
};
struct kvm_stats_desc { __u32 flags; __s16 exponent; __u16 size; __u32 offset;
                        __u32 bucket_size; ...; };
struct kvm_debugregs { __u64 db[4]; __u64 dr6; __u64 dr7; __u64 flags; ...; };
struct kvm_guest_debug { __u32 control; __u32 pad; ...; };

/* Flat copies of the union-bearing kernel structs, defined by this module. */
struct kvmd_exit {
    uint32_t reason;
    uint32_t direction;       /* IO: 1 out / 0 in; MMIO: 1 write / 0 read */
    uint64_t address;         /* IO port, MMIO address, MSR index */
    uint32_t size;            /* IO access size, MMIO length */
    uint32_t count;           /* IO repeat count */
    uint64_t value;           /* WRMSR data, HW reason, IOAPIC EOI vector, MSR exit reason */
    uint32_t subtype;         /* internal error suberror, system event type, hyperv type,
                                 FAIL_ENTRY cpu, exception number */
    uint32_t ndata;           /* number of valid words in `words` */
    uint64_t words[16];       /* internal error data, system event data, hyperv fields,
                                 debug exit arch info */
    uint32_t data_len;        /* bytes valid in data */
    uint8_t data[4096];       /* IO OUT / MMIO write payload */
};
struct kvmd_vcpu_events {
    uint8_t exception_injected, exception_nr, exception_has_error_code, exception_pending;
    uint32_t exception_error_code;
    uint8_t interrupt_injected, interrupt_nr, interrupt_soft, interrupt_shadow;
    uint8_t nmi_injected, nmi_pending, nmi_masked;
    uint32_t sipi_vector;
    uint32_t flags;
    uint8_t smi_smm, smi_pending, smi_smm_inside_nmi, smi_latched_init;
    uint8_t triple_fault_pending;
    uint8_t exception_has_payload;
    uint64_t exception_payload;
};
struct kvmd_route {
    uint32_t gsi;
    uint32_t kind;            /* 0 irqchip, 1 msi */
    uint32_t irqchip, pin;
    uint32_t address_lo, address_hi, data, flags, devid;
};
"""

_CDEF_FUNCS = """
int ioctl(int fd, unsigned long request, ...);
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int msync(void *addr, size_t length, int flags);
int madvise(void *addr, size_t length, int advice);
#define PROT_READ ...
#define PROT_WRITE ...
#define MAP_SHARED ...
#define MAP_NORESERVE ...
#define MS_SYNC ...
#define MADV_DONTNEED ...
#define KVM_API_VERSION ...
#define KVM_MEM_LOG_DIRTY_PAGES ...
#define KVM_MEM_READONLY ...
#define KVM_IRQFD_FLAG_DEASSIGN ...
#define KVM_IRQFD_FLAG_RESAMPLE ...
#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...
#define KVM_IRQ_ROUTING_IRQCHIP ...
#define KVM_IRQ_ROUTING_MSI ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...
#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...
#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...
#define KVM_SYSTEM_EVENT_WAKEUP ...
#define KVM_SYSTEM_EVENT_SUSPEND ...
#define KVM_SYSTEM_EVENT_SEV_TERM ...
#define KVM_INTERNAL_ERROR_EMULATION ...
#define KVM_INTERNAL_ERROR_SIMUL_EX ...
#define KVM_INTERNAL_ERROR_DELIVERY_EV ...
#define KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON ...
#define KVM_MP_STATE_RUNNABLE ...
#define KVM_MP_STATE_UNINITIALIZED ...
#define KVM_MP_STATE_INIT_RECEIVED ...
#define KVM_MP_STATE_HALTED ...
#define KVM_MP_STATE_SIPI_RECEIVED ...
#define KVM_DEV_TYPE_VFIO ...
#define KVM_STATS_TYPE_MASK ...
#define KVM_STATS_UNIT_MASK ...
#define KVM_STATS_BASE_MASK ...
#define KVM_GUESTDBG_ENABLE ...
#define KVM_GUESTDBG_SINGLESTEP ...
#define EXIT_COUNTER_SLOTS ...
#define KVMD_PIO_UNCLAIMED ...

/* Helpers (C, in _SOURCE): each is one ioctl or one copy, run with the GIL released. */
int kvmd_run(int fd, struct kvm_run *run, struct kvmd_exit *out, uint64_t *counters);
int kvmd_run_loop(int fd, struct kvm_run *run, struct kvmd_exit *out, uint64_t *counters,
                  const uint8_t *pio_map);
void kvmd_set_immediate_exit(struct kvm_run *run, int value);
int kvmd_complete_io_in(struct kvm_run *run, const uint8_t *data, uint32_t len);
int kvmd_complete_mmio_read(struct kvm_run *run, const uint8_t *data, uint32_t len);
int kvmd_complete_msr(struct kvm_run *run, uint64_t data, uint8_t error);
int kvmd_complete_hyperv(struct kvm_run *run, uint64_t result);
int kvmd_get_dirty_log(int vmfd, uint32_t slot, void *bitmap);
int kvmd_irq_line(int vmfd, uint32_t irq, uint32_t level);
int kvmd_set_gsi_routing(int vmfd, const struct kvmd_route *routes, uint32_t n);
int kvmd_get_vcpu_events(int fd, struct kvmd_vcpu_events *out);
int kvmd_set_vcpu_events(int fd, const struct kvmd_vcpu_events *in);
int kvmd_set_signal_mask(int fd, const int *signals, int n);
int kvmd_install_kick_handler(void);
int kvmd_kick_signal(void);
size_t kvmd_sizeof_irq_level(void);
size_t kvmd_sizeof_dirty_log(void);
size_t kvmd_sizeof_irq_routing_entry(void);
size_t kvmd_offsetof_run_io(void);
size_t kvmd_offsetof_run_mmio(void);
size_t kvmd_offsetof_run_msr(void);
"""

_SOURCE = r"""
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/kvm.h>
""" + _FALLBACK_DEFINES + _COUNTER_DEFINES + r"""
#define KVMD_PIO_UNCLAIMED 1

struct kvmd_exit {
    uint32_t reason;
    uint32_t direction;
    uint64_t address;
    uint32_t size;
    uint32_t count;
    uint64_t value;
    uint32_t subtype;
    uint32_t ndata;
    uint64_t words[16];
    uint32_t data_len;
    uint8_t data[4096];
};
struct kvmd_vcpu_events {
    uint8_t exception_injected, exception_nr, exception_has_error_code, exception_pending;
    uint32_t exception_error_code;
    uint8_t interrupt_injected, interrupt_nr, interrupt_soft, interrupt_shadow;
    uint8_t nmi_injected, nmi_pending, nmi_masked;
    uint32_t sipi_vector;
    uint32_t flags;
    uint8_t smi_smm, smi_pending, smi_smm_inside_nmi, smi_latched_init;
    uint8_t triple_fault_pending;
    uint8_t exception_has_payload;
    uint64_t exception_payload;
};
struct kvmd_route {
    uint32_t gsi;
    uint32_t kind;
    uint32_t irqchip, pin;
    uint32_t address_lo, address_hi, data, flags, devid;
};

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

/* Run until an exit that userspace code must see. Port IO to a port whose `pio_map` byte is
 * KVMD_PIO_UNCLAIMED is completed here without returning (writes dropped, reads all-ones)
 * and counted, so a guest hammering an unclaimed port costs no Python per exit. Returns
 * -EINTR when kicked (immediate_exit or a signal), like kvmd_run. */
int kvmd_run_loop(int fd, struct kvm_run *run, struct kvmd_exit *out, uint64_t *counters,
                  const uint8_t *pio_map)
{
    for (;;) {
        int ret = ioctl(fd, KVM_RUN, 0);
        if (ret < 0)
            return -errno;
        kvmd_count(run, counters);
        if (run->exit_reason == KVM_EXIT_IO
            && __atomic_load_n(&pio_map[run->io.port], __ATOMIC_RELAXED) == KVMD_PIO_UNCLAIMED) {
            if (run->io.direction == KVM_EXIT_IO_IN)
                memset((uint8_t *)run + run->io.data_offset, 0xff,
                       (size_t)run->io.size * run->io.count);
            counters[KVMD_COUNTER_UNCLAIMED_PIO]++;
            continue;
        }
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

void kvmd_set_immediate_exit(struct kvm_run *run, int value)
{
    __atomic_store_n(&run->immediate_exit, (uint8_t)value, __ATOMIC_SEQ_CST);
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

int kvmd_get_dirty_log(int vmfd, uint32_t slot, void *bitmap)
{
    struct kvm_dirty_log log;
    memset(&log, 0, sizeof(log));
    log.slot = slot;
    log.dirty_bitmap = bitmap;
    return ioctl(vmfd, KVM_GET_DIRTY_LOG, &log) < 0 ? -errno : 0;
}

int kvmd_irq_line(int vmfd, uint32_t irq, uint32_t level)
{
    struct kvm_irq_level l;
    memset(&l, 0, sizeof(l));
    l.irq = irq;
    l.level = level;
    return ioctl(vmfd, KVM_IRQ_LINE, &l) < 0 ? -errno : 0;
}

int kvmd_set_gsi_routing(int vmfd, const struct kvmd_route *routes, uint32_t n)
{
    size_t bytes = sizeof(struct kvm_irq_routing) + n * sizeof(struct kvm_irq_routing_entry);
    struct kvm_irq_routing *r = calloc(1, bytes);
    if (!r)
        return -ENOMEM;
    r->nr = n;
    for (uint32_t i = 0; i < n; i++) {
        struct kvm_irq_routing_entry *e = &r->entries[i];
        e->gsi = routes[i].gsi;
        if (routes[i].kind == 0) {
            e->type = KVM_IRQ_ROUTING_IRQCHIP;
            e->u.irqchip.irqchip = routes[i].irqchip;
            e->u.irqchip.pin = routes[i].pin;
        } else {
            e->type = KVM_IRQ_ROUTING_MSI;
            e->flags = routes[i].flags;
            e->u.msi.address_lo = routes[i].address_lo;
            e->u.msi.address_hi = routes[i].address_hi;
            e->u.msi.data = routes[i].data;
            e->u.msi.devid = routes[i].devid;
        }
    }
    int ret = ioctl(vmfd, KVM_SET_GSI_ROUTING, r) < 0 ? -errno : 0;
    free(r);
    return ret;
}

int kvmd_get_vcpu_events(int fd, struct kvmd_vcpu_events *o)
{
    struct kvm_vcpu_events e;
    memset(&e, 0, sizeof(e));
    if (ioctl(fd, KVM_GET_VCPU_EVENTS, &e) < 0)
        return -errno;
    o->exception_injected = e.exception.injected;
    o->exception_nr = e.exception.nr;
    o->exception_has_error_code = e.exception.has_error_code;
    o->exception_pending = e.exception.pending;
    o->exception_error_code = e.exception.error_code;
    o->interrupt_injected = e.interrupt.injected;
    o->interrupt_nr = e.interrupt.nr;
    o->interrupt_soft = e.interrupt.soft;
    o->interrupt_shadow = e.interrupt.shadow;
    o->nmi_injected = e.nmi.injected;
    o->nmi_pending = e.nmi.pending;
    o->nmi_masked = e.nmi.masked;
    o->sipi_vector = e.sipi_vector;
    o->flags = e.flags;
    o->smi_smm = e.smi.smm;
    o->smi_pending = e.smi.pending;
    o->smi_smm_inside_nmi = e.smi.smm_inside_nmi;
    o->smi_latched_init = e.smi.latched_init;
    o->triple_fault_pending = e.triple_fault.pending;
    o->exception_has_payload = e.exception_has_payload;
    o->exception_payload = e.exception_payload;
    return 0;
}

int kvmd_set_vcpu_events(int fd, const struct kvmd_vcpu_events *i)
{
    struct kvm_vcpu_events e;
    memset(&e, 0, sizeof(e));
    e.exception.injected = i->exception_injected;
    e.exception.nr = i->exception_nr;
    e.exception.has_error_code = i->exception_has_error_code;
    e.exception.pending = i->exception_pending;
    e.exception.error_code = i->exception_error_code;
    e.interrupt.injected = i->interrupt_injected;
    e.interrupt.nr = i->interrupt_nr;
    e.interrupt.soft = i->interrupt_soft;
    e.interrupt.shadow = i->interrupt_shadow;
    e.nmi.injected = i->nmi_injected;
    e.nmi.pending = i->nmi_pending;
    e.nmi.masked = i->nmi_masked;
    e.sipi_vector = i->sipi_vector;
    e.flags = i->flags;
    e.smi.smm = i->smi_smm;
    e.smi.pending = i->smi_pending;
    e.smi.smm_inside_nmi = i->smi_smm_inside_nmi;
    e.smi.latched_init = i->smi_latched_init;
    e.triple_fault.pending = i->triple_fault_pending;
    e.exception_has_payload = i->exception_has_payload;
    e.exception_payload = i->exception_payload;
    return ioctl(fd, KVM_SET_VCPU_EVENTS, &e) < 0 ? -errno : 0;
}

int kvmd_set_signal_mask(int fd, const int *signals, int n)
{
    /* The kernel's sigset is 8 bytes on x86_64, not glibc's 128-byte sigset_t. */
    struct { struct kvm_signal_mask hdr; uint8_t bits[8]; } m;
    sigset_t set;
    sigemptyset(&set);
    for (int i = 0; i < n; i++)
        if (sigaddset(&set, signals[i]) < 0)
            return -EINVAL;
    memset(&m, 0, sizeof(m));
    m.hdr.len = 8;
    memcpy(m.bits, &set, 8);
    return ioctl(fd, KVM_SET_SIGNAL_MASK, &m) < 0 ? -errno : 0;
}

static void kvmd_kick_handler(int signo) { (void)signo; }

/* The kick signal only needs to interrupt KVM_RUN with EINTR: a no-op C handler installed
 * without SA_RESTART, so Python's own signal machinery never sees it. */
int kvmd_install_kick_handler(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kvmd_kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    return sigaction(SIGRTMIN + 1, &sa, NULL) < 0 ? -errno : 0;
}

int kvmd_kick_signal(void) { return SIGRTMIN + 1; }

size_t kvmd_sizeof_irq_level(void) { return sizeof(struct kvm_irq_level); }
size_t kvmd_sizeof_dirty_log(void) { return sizeof(struct kvm_dirty_log); }
size_t kvmd_sizeof_irq_routing_entry(void) { return sizeof(struct kvm_irq_routing_entry); }
size_t kvmd_offsetof_run_io(void) { return offsetof(struct kvm_run, io); }
size_t kvmd_offsetof_run_mmio(void) { return offsetof(struct kvm_run, mmio); }
size_t kvmd_offsetof_run_msr(void) { return offsetof(struct kvm_run, msr); }
"""


def _defines() -> str:
    names = [name for name, _ in IOCTLS] + CAPABILITIES + EXIT_REASONS
    return "\n".join(f"#define {name} ..." for name in names)


ffibuilder = FFI()
ffibuilder.cdef(_CDEF_TYPES + _CDEF_FUNCS + _defines())
ffibuilder.set_source("kvmd.kvm._kvm_cffi", _SOURCE, extra_compile_args=["-O2", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
