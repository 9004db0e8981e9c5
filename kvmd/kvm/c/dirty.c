/* Dirty-page tracking: KVM_CLEAR_DIRTY_LOG (a struct with a union) and harvesting a vCPU's
 * dirty ring into per-slot bitmaps without returning to Python per entry. */
#include "compat.h"

int kvmd_clear_dirty_log(int vmfd, uint32_t slot, uint64_t first_page, uint32_t num_pages,
                         void *bitmap)
{
    struct kvm_clear_dirty_log log;
    memset(&log, 0, sizeof(log));
    log.slot = slot;
    log.first_page = first_page;
    log.num_pages = num_pages;
    log.dirty_bitmap = bitmap;
    return ioctl(vmfd, KVM_CLEAR_DIRTY_LOG, &log) < 0 ? -errno : 0;
}

/* Collect the dirty entries of one vCPU's ring, as Documentation/virt/kvm/api.rst
 * (KVM_CAP_DIRTY_LOG_RING) prescribes: walk from the fetch index while the entry at it is
 * "dirty" (flags == DIRTY, read with acquire so its slot and offset are read after the
 * kernel published them), set the page's bit in the bitmap of its slot, hand the entry back
 * with a release store of RESET (so the kernel sees our reads done before reuse), advance.
 *
 * `bitmaps[slot]` is a uint64 bitmap of `npages[slot]` bits (NULL: the slot is not
 * tracked). Entries naming another address space, a slot beyond `nslots`, an untracked slot
 * or a page beyond the slot are still handed back (the ring must not stall) but counted in
 * `*dropped`, so the caller knows its bitmaps are incomplete. Returns the number of entries
 * harvested. At most `entries` are taken per call: the kernel cannot publish more than a
 * ring's worth before KVM_RESET_DIRTY_RINGS recycles them. */
int64_t kvmd_dirty_ring_harvest(struct kvm_dirty_gfn *ring, uint32_t entries,
                                uint32_t *fetch_index, uint64_t *const *bitmaps,
                                const uint64_t *npages, uint32_t nslots, uint64_t *dropped)
{
    uint32_t index = *fetch_index;
    uint32_t mask = entries - 1;
    int64_t n = 0;
    for (uint32_t i = 0; i < entries; i++) {
        struct kvm_dirty_gfn *gfn = &ring[index & mask];
        uint32_t flags = __atomic_load_n(&gfn->flags, __ATOMIC_ACQUIRE);
        if ((flags & KVM_DIRTY_GFN_F_MASK) != KVM_DIRTY_GFN_F_DIRTY)
            break;
        uint32_t slot = gfn->slot;
        uint64_t page = gfn->offset;
        /* slot is (address space << 16) | slot id; this binding uses address space 0. */
        if (slot < nslots && bitmaps[slot] != NULL && page < npages[slot])
            bitmaps[slot][page >> 6] |= 1ULL << (page & 63);
        else
            (*dropped)++;
        __atomic_store_n(&gfn->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
        index++;
        n++;
    }
    *fetch_index = index;
    return n;
}

size_t kvmd_sizeof_dirty_gfn(void) { return sizeof(struct kvm_dirty_gfn); }
