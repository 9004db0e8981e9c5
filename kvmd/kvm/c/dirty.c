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

/* Where scan_runs puts each run: two arrays, or two packed-varint bodies of at most `cap`
 * bytes each, or nowhere (only counted). */
struct run_sink {
    uint64_t *firsts, *counts;
    uint8_t *packed_firsts, *packed_counts;
    uint64_t cap, firsts_len, counts_len, pages, n;
};

static inline __attribute__((always_inline)) int
put_varint(uint8_t *out, uint64_t *len, uint64_t cap, uint64_t v)
{
    if (*len + 10 > cap) {
        uint64_t need = 1;
        for (uint64_t x = v; x >= 0x80; x >>= 7)
            need++;
        if (*len + need > cap)
            return 0;
    }
    uint8_t *p = out + *len;
    while (v >= 0x80) {
        *p++ = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    *p++ = (uint8_t)v;
    *len = (uint64_t)(p - out);
    return 1;
}

static inline __attribute__((always_inline)) int
emit_run(struct run_sink *s, uint64_t first, uint64_t count)
{
    if (s->firsts) {
        s->firsts[s->n] = first;
        s->counts[s->n] = count;
    } else if (s->packed_firsts) {
        if (!put_varint(s->packed_firsts, &s->firsts_len, s->cap, first) ||
            !put_varint(s->packed_counts, &s->counts_len, s->cap, count))
            return 0;
    }
    s->n++;
    s->pages += count;
    return 1;
}

/* The runs of set bits of a bitmap of `nwords` little-endian 64-bit words (bit i: page i),
 * into `sink`. Returns the number of runs, or UINT64_MAX when a packed body would pass its
 * cap. Word by word: an empty or full word costs one test, a mixed one a few
 * count-trailing-zeros. */
static inline __attribute__((always_inline)) uint64_t
scan_runs(const uint64_t *words, uint64_t nwords, struct run_sink *sink)
{
    const uint64_t none = UINT64_MAX;
    uint64_t open = none;
#define EMIT(first, count) do { if (!emit_run(sink, (first), (count))) return UINT64_MAX; \
                              } while (0)
    for (uint64_t i = 0; i < nwords; i++) {
        uint64_t w = words[i], base = i * 64;
        if (w == 0) {
            if (open != none) {
                EMIT(open, base - open);
                open = none;
            }
            continue;
        }
        if (w == ~(uint64_t)0) {
            if (open == none)
                open = base;
            continue;
        }
        uint64_t at = 0;
        while (at < 64) {
            uint64_t rest = w >> at;
            if (rest == 0) {
                if (open != none) {
                    EMIT(open, base + at - open);
                    open = none;
                }
                break;
            }
            uint64_t zeros = (uint64_t)__builtin_ctzll(rest);
            if (zeros && open != none) {
                EMIT(open, base + at - open);
                open = none;
            }
            at += zeros;
            /* The top `at` bits of ~(w >> at) are ones, so it is never 0 here. */
            uint64_t ones = (uint64_t)__builtin_ctzll(~(w >> at));
            if (open == none)
                open = base + at;
            at += ones;
            if (at < 64) {
                EMIT(open, base + at - open);
                open = none;
            }
        }
    }
    if (open != none)
        EMIT(open, nwords * 64 - open);
#undef EMIT
    return sink->n;
}

/* The runs as first pages and lengths into `firsts` and `counts` (both NULL: only count
 * them). Returns the number of runs; a caller counts first, then sizes its arrays
 * exactly. */
KVMD_BIT_LOOP
uint64_t kvmd_bitmap_runs(const uint64_t *words, uint64_t nwords, uint64_t *firsts,
                          uint64_t *counts)
{
    struct run_sink sink = {firsts, counts, NULL, NULL, 0, 0, 0, 0, 0};
    return scan_runs(words, nwords, &sink);
}

/* The runs in one pass as the bodies of two packed repeated fields (first pages, lengths),
 * each at most `cap` bytes: a caller that wants them only when shorter than the bitmap
 * gives the bitmap's size. Returns the number of runs, or UINT64_MAX past the cap; sets
 * lens[0], lens[1] to the bytes of each body and lens[2] to the pages they cover. */
KVMD_BIT_LOOP
uint64_t kvmd_bitmap_runs_packed(const uint64_t *words, uint64_t nwords, uint8_t *firsts,
                                 uint8_t *counts, uint64_t cap, uint64_t *lens)
{
    struct run_sink sink = {NULL, NULL, firsts, counts, cap, 0, 0, 0, 0};
    uint64_t n = scan_runs(words, nwords, &sink);
    lens[0] = sink.firsts_len;
    lens[1] = sink.counts_len;
    lens[2] = sink.pages;
    return n;
}

/* Set bits of a bitmap of `n` bytes (8 bytes at a time; the tail byte by byte). */
KVMD_BIT_LOOP
uint64_t kvmd_bitmap_popcount(const uint8_t *bytes, uint64_t n)
{
    uint64_t total = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, bytes + i, 8);
        total += (uint64_t)__builtin_popcountll(w);
    }
    for (; i < n; i++)
        total += (uint64_t)__builtin_popcount(bytes[i]);
    return total;
}

/* dst |= src over `n` bytes. */
KVMD_BIT_LOOP
void kvmd_bitmap_or(uint8_t *dst, const uint8_t *src, uint64_t n)
{
    uint64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t a, b;
        memcpy(&a, dst + i, 8);
        memcpy(&b, src + i, 8);
        a |= b;
        memcpy(dst + i, &a, 8);
    }
    for (; i < n; i++)
        dst[i] |= src[i];
}

/* `n` values as protobuf varints, back to back (the body of a packed repeated field), into
 * `out` (room for 10 bytes a value; put_varint, as the runs use); their sum into `*sum`.
 * Returns the bytes written. */
KVMD_BIT_LOOP
uint64_t kvmd_pack_varints(const uint64_t *values, uint64_t n, uint8_t *out, uint64_t *sum)
{
    uint64_t len = 0, s = 0;
    for (uint64_t i = 0; i < n; i++) {
        s += values[i];
        put_varint(out, &len, UINT64_MAX, values[i]);  /* `out` has room: no cap */
    }
    *sum = s;
    return len;
}

/* The largest of `n` values (0 when there are none). */
uint64_t kvmd_max_u64(const uint64_t *values, uint64_t n)
{
    uint64_t m = 0;
    for (uint64_t i = 0; i < n; i++)
        if (values[i] > m)
            m = values[i];
    return m;
}
