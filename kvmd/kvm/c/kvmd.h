/* kvmd's own C interface: the flat structs the binding copies kernel unions into, and the
 * helpers (each one ioctl or one copy, run with the GIL released).
 *
 * This file is read twice: by cffi's parser (ffibuilder.cdef, in _build.py) and by the C
 * compiler (every .c file includes it after <linux/kvm.h>). Both therefore see the one
 * definition of each struct. Keep it to what cffi can parse: no #include, no #if, integer
 * #defines only.
 */

/* A port's byte in a pio_map. Unclaimed is 0, so a fresh zero-filled map (pages the kernel
 * has not even touched yet) means "every port unclaimed". */
#define KVMD_PIO_UNCLAIMED 0
#define KVMD_PIO_CALLER 1
#define KVMD_PIO_UART 2

/* A decoded exit, copied out of kvm_run so kvm_run never leaves the binding. */
struct kvmd_exit {
    uint32_t reason;
    uint32_t direction;       /* IO: 1 out / 0 in; MMIO: 1 write / 0 read */
    uint64_t address;         /* IO port, MMIO address, MSR index */
    uint32_t size;            /* IO access size, MMIO length */
    uint32_t count;           /* IO repeat count */
    uint64_t value;           /* WRMSR data, HW reason, IOAPIC EOI vector, MSR exit reason */
    uint32_t subtype;         /* internal error suberror, system event type, hyperv type,
                                 FAIL_ENTRY cpu, exception number */
    uint32_t ndata;           /* number of valid words in `words` */
    uint64_t words[16];       /* internal error data, system event data, hyperv fields,
                                 debug exit arch info */
    uint32_t data_len;        /* bytes valid in data */
    uint8_t data[4096];       /* IO OUT / MMIO write payload */
};

/* struct kvm_vcpu_events without its anonymous structs. */
struct kvmd_vcpu_events {
    uint8_t exception_injected, exception_nr, exception_has_error_code, exception_pending;
    uint32_t exception_error_code;
    uint8_t interrupt_injected, interrupt_nr, interrupt_soft, interrupt_shadow;
    uint8_t nmi_injected, nmi_pending, nmi_masked;
    uint32_t sipi_vector;
    uint32_t flags;
    uint8_t smi_smm, smi_pending, smi_smm_inside_nmi, smi_latched_init;
    uint8_t triple_fault_pending;
    uint8_t exception_has_payload;
    uint64_t exception_payload;
};

/* One GSI route (struct kvm_irq_routing_entry without its union). */
struct kvmd_route {
    uint32_t gsi;
    uint32_t kind;            /* 0 irqchip, 1 msi */
    uint32_t irqchip, pin;
    uint32_t address_lo, address_hi, data, flags, devid;
};

/* uart.c: a 16550's registers, transmit ring and receive FIFO, completed in C by the run
 * loop for ports whose pio_map byte is KVMD_PIO_UART. The struct is opaque here. */
struct kvmd_uart;
struct kvmd_uart_regs {
    uint8_t ier, lcr, mcr, scr, dll, dlm, thre_pending;
};
struct kvmd_uart_stats {
    uint64_t tx_bytes;        /* bytes the guest transmitted (into the ring) */
    uint64_t ring_full;       /* transmit exits handed to the caller: the ring was full */
    uint64_t rx_overruns;     /* received bytes dropped: the FIFO was full (loopback) */
    uint64_t tx_pending;      /* bytes in the ring now */
    uint64_t rx_pending;      /* bytes in the receive FIFO now */
};
struct kvmd_uart *kvmd_uart_new(uint16_t base, uint32_t tx_bytes, uint32_t rx_bytes,
                                int notify_fd);
void kvmd_uart_free(struct kvmd_uart *u);
int kvmd_uart_io(struct kvmd_uart *u, struct kvm_run *run);
uint8_t kvmd_uart_read(struct kvmd_uart *u, uint16_t offset);
int kvmd_uart_write(struct kvmd_uart *u, uint16_t offset, uint8_t value);
uint32_t kvmd_uart_take_output(struct kvmd_uart *u, uint8_t *out, uint32_t max);
int kvmd_uart_arm(struct kvmd_uart *u);
uint32_t kvmd_uart_feed(struct kvmd_uart *u, const uint8_t *data, uint32_t len, int *rda);
uint32_t kvmd_uart_get_state(struct kvmd_uart *u, struct kvmd_uart_regs *regs, uint8_t *rx);
void kvmd_uart_set_state(struct kvmd_uart *u, const struct kvmd_uart_regs *regs,
                         const uint8_t *rx, uint32_t len);
void kvmd_uart_get_stats(struct kvmd_uart *u, struct kvmd_uart_stats *out);

/* run.c: entering the guest and completing exits. */
/* The scheduling a thread takes on its way into the guest (kvmd_run_loop's `sched`): set
 * there, after the caller released the GIL, so a thread lowered below the API's threads
 * never holds the GIL at that priority on its way in. */
struct kvmd_sched {
    int32_t policy;         /* SCHED_OTHER, SCHED_BATCH or SCHED_IDLE */
    int32_t nice;
    int32_t default_slice;  /* also go back to the kernel's default slice (sched_setattr) */
    int32_t applied;        /* out: 1 if set; 0 if skipped, the vCPU being kicked already */
    int32_t error;          /* out: the errno of the first call that failed, else 0 */
};
int kvmd_run(int fd, struct kvm_run *run, struct kvmd_exit *out, uint64_t *counters);
int kvmd_run_loop(int fd, struct kvm_run *run, struct kvmd_exit *out, uint64_t *counters,
                  const uint8_t *pio_map, struct kvmd_uart *uart, struct kvmd_sched *sched);
int kvmd_complete_io_in(struct kvm_run *run, const uint8_t *data, uint32_t len);
int kvmd_complete_mmio_read(struct kvm_run *run, const uint8_t *data, uint32_t len);
int kvmd_complete_msr(struct kvm_run *run, uint64_t data, uint8_t error);
int kvmd_complete_hyperv(struct kvm_run *run, uint64_t result);

/* vm.c: VM ioctls whose structs carry unions or flexible arrays. */
int kvmd_get_dirty_log(int vmfd, uint32_t slot, void *bitmap);
int kvmd_irq_line(int vmfd, uint32_t irq, uint32_t level);
int kvmd_set_gsi_routing(int vmfd, const struct kvmd_route *routes, uint32_t n);

/* vcpu.c: vCPU events, the signal mask and the kick signal. */
int kvmd_get_vcpu_events(int fd, struct kvmd_vcpu_events *out);
int kvmd_set_vcpu_events(int fd, const struct kvmd_vcpu_events *in);
int kvmd_set_signal_mask(int fd, const int *signals, int n);
int kvmd_install_kick_handler(void);
int kvmd_kick_signal(void);

/* abi.c: sizes and offsets of kernel structs, for the ABI test. */
size_t kvmd_sizeof_irq_level(void);
size_t kvmd_sizeof_dirty_log(void);
size_t kvmd_sizeof_irq_routing_entry(void);
size_t kvmd_offsetof_run_io(void);
size_t kvmd_offsetof_run_mmio(void);
size_t kvmd_offsetof_run_msr(void);

/* state.c: VM and vCPU state for snapshot/restore. struct kvm_irqchip carries a union (PIC
 * or IOAPIC) and the IOAPIC's redirection table is an array of unions: these flat copies
 * are what the binding sees. */
struct kvmd_pic_state {
    uint8_t last_irr, irr, imr, isr, priority_add, irq_base, read_reg_select, poll;
    uint8_t special_mask, init_state, auto_eoi, rotate_on_auto_eoi;
    uint8_t special_fully_nested_mode, init4, elcr, elcr_mask;
};

struct kvmd_ioapic_state {
    uint64_t base_address;
    uint32_t ioregsel, id, irr;
    uint64_t redirtbl[24];    /* KVM_IOAPIC_NUM_PINS entries, as the kernel's `bits` */
};

/* One chip: chip_id is passed to the kernel unchanged (so a bad id gets the kernel's
 * errno); `pic` is used for PIC_MASTER/PIC_SLAVE, `ioapic` for IOAPIC. */
struct kvmd_irqchip {
    uint32_t chip_id;
    struct kvmd_pic_state pic;
    struct kvmd_ioapic_state ioapic;
};

int kvmd_get_irqchip(int vmfd, struct kvmd_irqchip *chip);
int kvmd_set_irqchip(int vmfd, const struct kvmd_irqchip *chip);
size_t kvmd_sizeof_irqchip(void);

/* dirty.c, memory.c: dirty-page tracking (clear log, ring harvest) and guest memory
 * backing (hole punching, zero-page scan). */
int kvmd_clear_dirty_log(int vmfd, uint32_t slot, uint64_t first_page, uint32_t num_pages,
                         void *bitmap);
int64_t kvmd_dirty_ring_harvest(struct kvm_dirty_gfn *ring, uint32_t entries,
                                uint32_t *fetch_index, uint64_t *const *bitmaps,
                                const uint64_t *npages, uint32_t nslots, uint64_t *dropped);
size_t kvmd_sizeof_dirty_gfn(void);
uint64_t kvmd_bitmap_runs(const uint64_t *words, uint64_t nwords, uint64_t *firsts,
                          uint64_t *counts);
uint64_t kvmd_bitmap_popcount(const uint8_t *bytes, uint64_t n);
void kvmd_bitmap_or(uint8_t *dst, const uint8_t *src, uint64_t n);
uint64_t kvmd_bitmap_runs_packed(const uint64_t *words, uint64_t nwords, uint8_t *firsts,
                                 uint8_t *counts, uint64_t cap, uint64_t *lens);
uint64_t kvmd_pack_varints(const uint64_t *values, uint64_t n, uint8_t *out, uint64_t *sum);
uint64_t kvmd_max_u64(const uint64_t *values, uint64_t n);
int kvmd_punch_hole(int fd, uint64_t offset, uint64_t length);
int64_t kvmd_nonzero_page_runs(const uint8_t *base, uint64_t npages, uint64_t page_size,
                               uint64_t *runs, uint64_t max_runs, uint64_t *scanned);
