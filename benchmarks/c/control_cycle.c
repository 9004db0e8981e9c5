/* control_cycle: the C reference for benchmarks/rpc_latency.py.
 *
 * The kernel work behind kvmd's control RPCs, done directly, each step timed:
 *
 *   create   KVM_CREATE_VM, KVM_SET_TSS_ADDR, KVM_SET_IDENTITY_MAP_ADDR (what any x86 VMM
 *            does when it makes a VM; kvmd's CreateVm does the same)
 *   add      a guest memory slot: memfd_create, ftruncate, mmap, KVM_SET_USER_MEMORY_REGION
 *   vcpu     KVM_CREATE_VCPU and the mmap of its kvm_run
 *   remove   KVM_SET_USER_MEMORY_REGION with size 0, munmap, close (the Add+Remove pair)
 *   destroy  munmap kvm_run, close the vCPU, close the VM, munmap and close its memory
 *
 *   control_cycle CYCLES SLOT_BYTES
 *
 * Prints one line of per-step medians in microseconds:
 *   "create=.. add=.. vcpu=.. remove=.. destroy=.. cycle=.." (cycle: create+add+vcpu+destroy,
 *   the median of whole cycles).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
    fprintf(stderr, "control_cycle: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, n, sizeof(double), cmp);
    return v[n / 2];
}

struct slot {
    int memfd;
    void *mem;
};

static struct slot add_slot(int vm, uint32_t number, uint64_t addr, uint64_t size)
{
    struct slot s;
    s.memfd = memfd_create("control-cycle", MFD_CLOEXEC);
    if (s.memfd < 0)
        die("memfd_create");
    if (ftruncate(s.memfd, size) < 0)
        die("ftruncate");
    s.mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, s.memfd, 0);
    if (s.mem == MAP_FAILED)
        die("mmap");
    struct kvm_userspace_memory_region r = {
        .slot = number, .guest_phys_addr = addr, .memory_size = size,
        .userspace_addr = (uint64_t)(uintptr_t)s.mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    return s;
}

static void release_slot(struct slot s, uint64_t size)
{
    munmap(s.mem, size);
    close(s.memfd);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: control_cycle CYCLES SLOT_BYTES\n");
        return 2;
    }
    int cycles = atoi(argv[1]);
    uint64_t size = strtoull(argv[2], NULL, 0);
    if (cycles <= 0 || size == 0) {
        fprintf(stderr, "control_cycle: bad arguments\n");
        return 2;
    }
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0)
        die("KVM_GET_VCPU_MMAP_SIZE");
    double *t[6];
    for (int i = 0; i < 6; i++)
        t[i] = calloc(cycles, sizeof(double));

    for (int i = 0; i < cycles; i++) {
        double t0 = now_us();
        int vm = ioctl(kvm, KVM_CREATE_VM, 0);
        if (vm < 0)
            die("KVM_CREATE_VM");
        if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000UL) < 0)
            die("KVM_SET_TSS_ADDR");
        uint64_t identity = 0xfffbc000UL;
        if (ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &identity) < 0)
            die("KVM_SET_IDENTITY_MAP_ADDR");
        double t1 = now_us();
        struct slot s = add_slot(vm, 0, 0, size);
        double t2 = now_us();
        int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
        if (vcpu < 0)
            die("KVM_CREATE_VCPU");
        void *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
        if (run == MAP_FAILED)
            die("mmap(kvm_run)");
        double t3 = now_us();
        /* The Add+Remove pair of rpc_latency, on the side: a second slot, removed. */
        double t4 = now_us();
        struct slot s2 = add_slot(vm, 1, size, size);
        double t5 = now_us();
        struct kvm_userspace_memory_region r = {.slot = 1, .guest_phys_addr = size};
        if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0)
            die("KVM_SET_USER_MEMORY_REGION(remove)");
        release_slot(s2, size);
        double t6 = now_us();
        munmap(run, run_size);
        close(vcpu);
        close(vm);
        release_slot(s, size);
        double t7 = now_us();
        t[0][i] = t1 - t0;
        t[1][i] = t2 - t1;
        t[2][i] = t3 - t2;
        t[3][i] = t6 - t5;  /* remove */
        (void)t4;
        t[4][i] = t7 - t6;
        t[5][i] = (t3 - t0) + (t7 - t6);
    }
    printf("create=%.1f add=%.1f vcpu=%.1f remove=%.1f destroy=%.1f cycle=%.1f\n",
           median(t[0], cycles), median(t[1], cycles), median(t[2], cycles),
           median(t[3], cycles), median(t[4], cycles), median(t[5], cycles));
    return 0;
}
