/* What every C file of the binding includes first: libc, the kernel's KVM header, constants
 * newer than the build host's headers, then kvmd.h. C only (cffi never parses this). */
#ifndef KVMD_COMPAT_H
#define KVMD_COMPAT_H

#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/kvm.h>

/* Bit loops over dirty bitmaps (popcount, runs, OR) built twice, for x86-64-v3 (POPCNT,
 * BMI, AVX2) and for the baseline, the loader picking one for the CPU (an ifunc): the
 * baseline's popcount is a dozen instructions a word. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KVMD_BIT_LOOP __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define KVMD_BIT_LOOP
#endif

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

#include "kvmd.h"

#endif
