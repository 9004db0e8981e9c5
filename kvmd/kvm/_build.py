"""cffi (API mode) build script for the KVM binding.

Struct layouts come from the system's <linux/kvm.h> (Debian `linux-libc-dev`): every kernel
struct below is declared with `...;` so the C compiler, not this file, decides sizes and
offsets. Kernel structs with anonymous unions (kvm_run, kvm_irq_routing_entry, kvm_dirty_log)
are reached only through the small C helpers in `c/*.c`, which copy them into flat `kvmd_*`
structs declared once, in `c/kvmd.h` (read by cffi's parser and by the C compiler alike).
The ioctl numbers are the header's own macros, listed once in `IOCTLS` (_names.py).
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

_C_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "c")
_C_SOURCES = ["run.c", "vm.c", "vcpu.c", "abi.c", "state.c", "dirty.c", "memory.c", "uart.c"]

# EXIT_COUNTER_SLOTS and the KVMD_COUNTER_* slot numbers (KVMD_COUNTER_IO_IN, ...), for the C
# files: the tables live in _names.py.
_COUNTER_MACROS = [("EXIT_COUNTER_SLOTS", str(EXIT_COUNTER_SLOTS))] + [
    (f"KVMD_COUNTER_{name.upper()}", str(slot))
    for name, slot in _names["COUNTER_SLOTS"].items()
]

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
struct kvm_clock_data { __u64 clock; __u32 flags; __u64 realtime; __u64 host_tsc; ...; };
struct kvm_stats_header {
    __u32 flags; __u32 name_size; __u32 num_desc; __u32 id_offset; __u32 desc_offset;
    __u32 data_offset; ...;
};
struct kvm_stats_desc { __u32 flags; __s16 exponent; __u16 size; __u32 offset;
                        __u32 bucket_size; ...; };
struct kvm_debugregs { __u64 db[4]; __u64 dr6; __u64 dr7; __u64 flags; ...; };
struct kvm_guest_debug { __u32 control; __u32 pad; ...; };
/* VM and vCPU state (snapshot/restore) */
struct kvm_xsave { __u32 region[1024]; ...; };
struct kvm_xcr { __u32 xcr; __u32 reserved; __u64 value; ...; };
struct kvm_xcrs { __u32 nr_xcrs; __u32 flags; struct kvm_xcr xcrs[...]; ...; };
struct kvm_pit_channel_state {
    __u32 count; __u16 latched_count; __u8 count_latched; __u8 status_latched; __u8 status;
    __u8 read_state; __u8 write_state; __u8 write_latch; __u8 rw_mode; __u8 mode; __u8 bcd;
    __u8 gate; int64_t count_load_time; ...;
};
struct kvm_pit_state2 { struct kvm_pit_channel_state channels[3]; __u32 flags; ...; };
/* Dirty-page tracking: one entry of a vCPU's dirty ring. */
struct kvm_dirty_gfn { __u32 flags; __u32 slot; __u64 offset; ...; };

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
#define KVM_MAX_XCRS ...
#define KVM_IOAPIC_NUM_PINS ...
#define KVM_CLOCK_TSC_STABLE ...
#define KVM_CLOCK_REALTIME ...
#define KVM_CLOCK_HOST_TSC ...
#define KVM_PIT_FLAGS_HPET_LEGACY ...
#define KVM_PIT_FLAGS_SPEAKER_DATA_ON ...
#define KVM_GUESTDBG_USE_SW_BP ...
#define KVM_GUESTDBG_USE_HW_BP ...
#define MAP_FIXED ...
#define MAP_PRIVATE ...
#define PROT_NONE ...
#define KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE ...
#define KVM_DIRTY_LOG_INITIALLY_SET ...
#define KVM_DIRTY_LOG_PAGE_OFFSET ...
#define KVM_DIRTY_GFN_F_DIRTY ...
#define KVM_DIRTY_GFN_F_RESET ...
"""

def _defines() -> str:
    names = [name for name, _ in IOCTLS] + CAPABILITIES + EXIT_REASONS
    return "\n".join(f"#define {name} ..." for name in names)


def _read(name: str) -> str:
    with open(os.path.join(_C_DIR, name)) as f:
        return f.read()


ffibuilder = FFI()
ffibuilder.cdef(_CDEF_TYPES + _read("kvmd.h") + _CDEF_FUNCS + _defines())
ffibuilder.set_source(
    "kvmd.kvm._kvm_cffi",
    '#include "compat.h"\n',
    sources=[os.path.relpath(os.path.join(_C_DIR, n)) for n in _C_SOURCES],
    include_dirs=[_C_DIR],
    define_macros=_COUNTER_MACROS,
    extra_compile_args=["-O2", "-Wall", "-pthread"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
