/* Sizes and offsets of kernel structs, compared with what cffi computed (test_kvm_abi). */
#include "compat.h"

size_t kvmd_sizeof_irq_level(void) { return sizeof(struct kvm_irq_level); }
size_t kvmd_sizeof_dirty_log(void) { return sizeof(struct kvm_dirty_log); }
size_t kvmd_sizeof_irq_routing_entry(void) { return sizeof(struct kvm_irq_routing_entry); }
size_t kvmd_offsetof_run_io(void) { return offsetof(struct kvm_run, io); }
size_t kvmd_offsetof_run_mmio(void) { return offsetof(struct kvm_run, mmio); }
size_t kvmd_offsetof_run_msr(void) { return offsetof(struct kvm_run, msr); }
