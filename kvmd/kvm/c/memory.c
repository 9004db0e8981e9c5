/* Guest memory backing: freeing pages of a memfd, and finding the pages that hold data. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/falloc.h>
#include "compat.h"

/* Free the host pages of [offset, offset+length) of a file: reads return zeros afterwards
 * and the file keeps its size. Every mapping of the range (ours, and KVM's through its MMU
 * notifier) drops the pages, so the next guest access faults in a fresh zero page. */
int kvmd_punch_hole(int fd, uint64_t offset, uint64_t length)
{
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset,
                     (off_t)length) < 0 ? -errno : 0;
}

static inline int page_is_zero(const uint8_t *page, uint64_t page_size)
{
    const uint64_t *w = (const uint64_t *)page;
    /* Eight words per test: cheap enough to stay at memory bandwidth, and a page with data
     * usually shows it in its first bytes. */
    for (uint64_t i = 0; i < page_size / 8; i += 8) {
        if (w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7])
            return 0;
    }
    return 1;
}

/* Scan `npages` pages at `base` (a mapping whose pages are all populated: reading a hole
 * of a shared memfd mapping would allocate it) and write the runs of pages holding any
 * non-zero byte as (first page, page count) pairs into `runs`. Stops when `max_runs` runs
 * are written and another would start; `*scanned` is then where the caller resumes.
 * Returns the number of runs written. */
int64_t kvmd_nonzero_page_runs(const uint8_t *base, uint64_t npages, uint64_t page_size,
                               uint64_t *runs, uint64_t max_runs, uint64_t *scanned)
{
    uint64_t page = 0;
    int64_t n = 0;
    while (page < npages) {
        if (page_is_zero(base + page * page_size, page_size)) {
            page++;
            continue;
        }
        if ((uint64_t)n == max_runs)
            break;
        uint64_t first = page++;
        while (page < npages && !page_is_zero(base + page * page_size, page_size))
            page++;
        runs[2 * n] = first;
        runs[2 * n + 1] = page - first;
        n++;
    }
    *scanned = page;
    return n;
}
