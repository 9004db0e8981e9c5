/* VM ioctls whose structs carry unions or flexible arrays. */
#include "compat.h"

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
