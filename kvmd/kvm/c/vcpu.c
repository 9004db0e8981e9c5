/* vCPU events, the signal mask and the kick signal. */
#include "compat.h"

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
