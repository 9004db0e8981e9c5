/* VM and vCPU state for snapshot/restore: the in-kernel PIC and IOAPIC (KVM_GET_IRQCHIP,
 * KVM_SET_IRQCHIP), whose struct kvm_irqchip is a union of both chips. */
#include "compat.h"

static void kvmd_pic_out(const struct kvm_pic_state *k, struct kvmd_pic_state *o)
{
    o->last_irr = k->last_irr;
    o->irr = k->irr;
    o->imr = k->imr;
    o->isr = k->isr;
    o->priority_add = k->priority_add;
    o->irq_base = k->irq_base;
    o->read_reg_select = k->read_reg_select;
    o->poll = k->poll;
    o->special_mask = k->special_mask;
    o->init_state = k->init_state;
    o->auto_eoi = k->auto_eoi;
    o->rotate_on_auto_eoi = k->rotate_on_auto_eoi;
    o->special_fully_nested_mode = k->special_fully_nested_mode;
    o->init4 = k->init4;
    o->elcr = k->elcr;
    o->elcr_mask = k->elcr_mask;
}

static void kvmd_pic_in(const struct kvmd_pic_state *i, struct kvm_pic_state *k)
{
    k->last_irr = i->last_irr;
    k->irr = i->irr;
    k->imr = i->imr;
    k->isr = i->isr;
    k->priority_add = i->priority_add;
    k->irq_base = i->irq_base;
    k->read_reg_select = i->read_reg_select;
    k->poll = i->poll;
    k->special_mask = i->special_mask;
    k->init_state = i->init_state;
    k->auto_eoi = i->auto_eoi;
    k->rotate_on_auto_eoi = i->rotate_on_auto_eoi;
    k->special_fully_nested_mode = i->special_fully_nested_mode;
    k->init4 = i->init4;
    k->elcr = i->elcr;
    k->elcr_mask = i->elcr_mask;
}

int kvmd_get_irqchip(int vmfd, struct kvmd_irqchip *chip)
{
    struct kvm_irqchip c;
    memset(&c, 0, sizeof(c));
    c.chip_id = chip->chip_id;
    if (ioctl(vmfd, KVM_GET_IRQCHIP, &c) < 0)
        return -errno;
    if (c.chip_id == KVM_IRQCHIP_IOAPIC) {
        const struct kvm_ioapic_state *k = &c.chip.ioapic;
        chip->ioapic.base_address = k->base_address;
        chip->ioapic.ioregsel = k->ioregsel;
        chip->ioapic.id = k->id;
        chip->ioapic.irr = k->irr;
        for (int i = 0; i < KVM_IOAPIC_NUM_PINS; i++)
            chip->ioapic.redirtbl[i] = k->redirtbl[i].bits;
    } else {
        kvmd_pic_out(&c.chip.pic, &chip->pic);
    }
    return 0;
}

int kvmd_set_irqchip(int vmfd, const struct kvmd_irqchip *chip)
{
    struct kvm_irqchip c;
    memset(&c, 0, sizeof(c));
    c.chip_id = chip->chip_id;
    if (c.chip_id == KVM_IRQCHIP_IOAPIC) {
        struct kvm_ioapic_state *k = &c.chip.ioapic;
        k->base_address = chip->ioapic.base_address;
        k->ioregsel = chip->ioapic.ioregsel;
        k->id = chip->ioapic.id;
        k->irr = chip->ioapic.irr;
        for (int i = 0; i < KVM_IOAPIC_NUM_PINS; i++)
            k->redirtbl[i].bits = chip->ioapic.redirtbl[i];
    } else {
        kvmd_pic_in(&chip->pic, &c.chip.pic);
    }
    return ioctl(vmfd, KVM_SET_IRQCHIP, &c) < 0 ? -errno : 0;
}

size_t kvmd_sizeof_irqchip(void) { return sizeof(struct kvm_irqchip); }
