/* pio_loop: the C reference for benchmarks/pio_exits.py.
 *
 * Runs a real-mode guest whose code is given in hex on the command line (a tight
 * `out dx, al; jmp` loop) and times a plain KVM_RUN loop over a fixed number of port IO
 * exits, doing per exit only what any VMM must: check the exit reason and read the data.
 *
 *   pio_loop EXITS WARMUP CODE_HEX PORT
 *
 * Prints one line: "exits=N seconds=S exits_per_second=R".
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

#define MEM_SIZE 0x10000
#define CODE_ADDR 0x1000

static void die(const char *what)
{
    fprintf(stderr, "pio_loop: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int xioctl(int fd, unsigned long req, void *arg, const char *what)
{
    int r = ioctl(fd, req, arg);
    if (r < 0)
        die(what);
    return r;
}

static size_t parse_hex(const char *hex, uint8_t *out, size_t cap)
{
    size_t n = strlen(hex) / 2;
    if (n == 0 || n > cap || strlen(hex) % 2) {
        fprintf(stderr, "pio_loop: bad code hex\n");
        exit(2);
    }
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1) {
            fprintf(stderr, "pio_loop: bad code hex\n");
            exit(2);
        }
        out[i] = (uint8_t)v;
    }
    return n;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One exit: KVM_RUN, then insist on an OUT to `port` and read its byte. */
static uint8_t run_one(int vcpu, struct kvm_run *run, unsigned port)
{
    if (ioctl(vcpu, KVM_RUN, 0) < 0)
        die("KVM_RUN");
    if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT
        || run->io.port != port) {
        fprintf(stderr, "pio_loop: unexpected exit %u\n", run->exit_reason);
        exit(1);
    }
    return *((uint8_t *)run + run->io.data_offset);
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: pio_loop EXITS WARMUP CODE_HEX PORT\n");
        return 2;
    }
    long exits = atol(argv[1]);
    long warmup = atol(argv[2]);
    unsigned port = (unsigned)strtoul(argv[4], NULL, 0);

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("open /dev/kvm");
    if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
        die("KVM_GET_API_VERSION");
    int vm = xioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM");

    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap guest memory");
    parse_hex(argv[3], mem + CODE_ADDR, MEM_SIZE - CODE_ADDR);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
        .userspace_addr = (uintptr_t)mem,
    };
    xioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");

    int vcpu = xioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
    int mmap_size = xioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

    struct kvm_sregs sregs;
    xioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    xioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
    struct kvm_regs regs = { .rip = CODE_ADDR, .rflags = 2, .rsp = 0x8000 };
    xioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");

    unsigned sum = 0;
    for (long i = 0; i < warmup; i++)
        sum += run_one(vcpu, run, port);
    double start = now();
    for (long i = 0; i < exits; i++)
        sum += run_one(vcpu, run, port);
    double seconds = now() - start;

    printf("exits=%ld seconds=%.6f exits_per_second=%.0f checksum=%u\n",
           exits, seconds, exits / seconds, sum);
    munmap(run, mmap_size);
    munmap(mem, MEM_SIZE);
    close(vcpu);
    close(vm);
    close(kvm);
    return 0;
}
