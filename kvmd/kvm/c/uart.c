/* A 16550 UART's registers, completed in C by the run loop (run.c) so a guest printing
 * through COM1 costs no Python per byte.
 *
 * Transmitted bytes go into a ring that Python drains in bulk (the core's Console); the
 * first byte after the drainer armed the UART signals `notify_fd` (an eventfd), so the first
 * byte is drained promptly and the rest in batches.
 * Received bytes wait in a bounded FIFO, as on real hardware: input beyond it is refused
 * (feed) or, in loopback mode, dropped and counted as an overrun (LSR.OE). Every access
 * takes the UART's mutex: several vCPUs and the API may touch it at once. A write that
 * does not fit the transmit ring is not done here: the run loop hands the exit to Python,
 * which drains the ring and retries, so no byte is ever lost.
 */
#include "compat.h"
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#define RBR_THR 0
#define IER 1
#define IIR_FCR 2
#define LCR 3
#define MCR 4
#define LSR 5
#define MSR 6
#define SCR 7
#define LCR_DLAB 0x80
#define LSR_DR 0x01
#define LSR_OE 0x02
#define LSR_THRE 0x20
#define LSR_TEMT 0x40
#define IER_RDA 0x01
#define IER_THRE 0x02
#define IIR_NONE 0x01
#define IIR_THRE 0x02
#define IIR_RDA 0x04
#define IIR_FIFO 0xC0
#define MCR_LOOP 0x10
#define MSR_CTS_DSR_DCD 0xB0

struct kvmd_uart {
    pthread_mutex_t lock;
    uint16_t base;
    int notify_fd;
    struct kvmd_uart_regs regs;
    /* transmit ring: [tx_tail, tx_head) holds bytes not drained yet (indices grow freely) */
    uint8_t *tx;
    uint32_t tx_size;          /* a power of two */
    uint64_t tx_head, tx_tail;
    /* receive FIFO */
    uint8_t *rx;
    uint32_t rx_size;
    uint32_t rx_start, rx_len;
    uint8_t overrun;           /* LSR.OE until the next LSR read */
    uint8_t armed;             /* the next transmitted byte signals notify_fd */
    struct kvmd_uart_stats stats;
};

struct kvmd_uart *kvmd_uart_new(uint16_t base, uint32_t tx_bytes, uint32_t rx_bytes,
                                int notify_fd)
{
    if (tx_bytes == 0 || (tx_bytes & (tx_bytes - 1)) || rx_bytes == 0)
        return NULL;
    struct kvmd_uart *u = calloc(1, sizeof(*u));
    if (u == NULL)
        return NULL;
    u->tx = malloc(tx_bytes);
    u->rx = malloc(rx_bytes);
    if (u->tx == NULL || u->rx == NULL) {
        free(u->tx);
        free(u->rx);
        free(u);
        return NULL;
    }
    pthread_mutex_init(&u->lock, NULL);
    u->base = base;
    u->notify_fd = notify_fd;
    u->tx_size = tx_bytes;
    u->rx_size = rx_bytes;
    u->regs.lcr = 0x03;
    u->regs.mcr = 0x08;
    u->regs.dll = 0x0C;
    u->armed = 1;
    return u;
}

void kvmd_uart_free(struct kvmd_uart *u)
{
    if (u == NULL)
        return;
    pthread_mutex_destroy(&u->lock);
    free(u->tx);
    free(u->rx);
    free(u);
}

static uint8_t iir(struct kvmd_uart *u)
{
    if ((u->regs.ier & IER_RDA) && u->rx_len)
        return IIR_FIFO | IIR_RDA;
    if ((u->regs.ier & IER_THRE) && u->regs.thre_pending)
        return IIR_FIFO | IIR_THRE;
    return IIR_FIFO | IIR_NONE;
}

static void rx_push(struct kvmd_uart *u, uint8_t value)
{
    if (u->rx_len == u->rx_size) {
        u->overrun = 1;
        u->stats.rx_overruns++;
        return;
    }
    u->rx[(u->rx_start + u->rx_len) % u->rx_size] = value;
    u->rx_len++;
}

/* Under the lock. */
static uint8_t reg_read(struct kvmd_uart *u, uint16_t offset)
{
    struct kvmd_uart_regs *r = &u->regs;
    int dlab = r->lcr & LCR_DLAB;
    uint8_t value;
    switch (offset) {
    case RBR_THR:
        if (dlab)
            return r->dll;
        if (!u->rx_len)
            return 0;
        value = u->rx[u->rx_start];
        u->rx_start = (u->rx_start + 1) % u->rx_size;
        u->rx_len--;
        return value;
    case IER:
        return dlab ? r->dlm : r->ier;
    case IIR_FCR:
        value = iir(u);
        if ((value & 0x0F) == IIR_THRE)
            r->thre_pending = 0;
        return value;
    case LCR:
        return r->lcr;
    case MCR:
        return r->mcr;
    case LSR:
        value = LSR_THRE | LSR_TEMT | (u->rx_len ? LSR_DR : 0) | (u->overrun ? LSR_OE : 0);
        u->overrun = 0;
        return value;
    case MSR:
        return MSR_CTS_DSR_DCD;
    default:
        return r->scr;
    }
}

/* Under the lock. Returns 0, or -ENOSPC for a byte to transmit that does not fit the
 * ring (nothing changed). */
static int reg_write(struct kvmd_uart *u, uint16_t offset, uint8_t value, int *notify)
{
    struct kvmd_uart_regs *r = &u->regs;
    int dlab = r->lcr & LCR_DLAB;
    switch (offset) {
    case RBR_THR:
        if (dlab) {
            r->dll = value;
        } else if (r->mcr & MCR_LOOP) {
            rx_push(u, value);
        } else {
            if (u->tx_head - u->tx_tail >= u->tx_size)
                return -ENOSPC;
            if (u->armed) {
                u->armed = 0;
                *notify = 1;
            }
            u->tx[u->tx_head & (u->tx_size - 1)] = value;
            u->tx_head++;
            u->stats.tx_bytes++;
            r->thre_pending = 1;
        }
        break;
    case IER:
        if (dlab) {
            r->dlm = value;
        } else {
            r->ier = value & 0x0F;
            r->thre_pending = (value & IER_THRE) != 0;
        }
        break;
    case LCR:
        r->lcr = value;
        break;
    case MCR:
        r->mcr = value;
        break;
    case SCR:
        r->scr = value;
        break;
    default:  /* FCR, LSR and MSR writes are accepted and ignored */
        break;
    }
    return 0;
}

static void signal_drain(struct kvmd_uart *u)
{
    if (u->notify_fd >= 0) {
        uint64_t one = 1;
        ssize_t n = write(u->notify_fd, &one, sizeof(one));
        (void)n;  /* an eventfd at its maximum is already signalled */
    }
}

/* The run loop's path: complete the IO exit in kvm_run (every element of a string
 * instruction), or return -ENOSPC, changing nothing, when the bytes to transmit do not
 * all fit the ring: the caller then hands the exit to Python. */
int kvmd_uart_io(struct kvmd_uart *u, struct kvm_run *run)
{
    uint16_t offset = run->io.port - u->base;
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    uint32_t size = run->io.size, count = run->io.count;
    int notify = 0;
    if (offset > SCR)
        return -EINVAL;
    pthread_mutex_lock(&u->lock);
    if (run->io.direction == KVM_EXIT_IO_OUT) {
        if (offset == RBR_THR && !(u->regs.lcr & LCR_DLAB) && !(u->regs.mcr & MCR_LOOP)
            && u->tx_head - u->tx_tail + count > u->tx_size) {
            u->stats.ring_full++;
            pthread_mutex_unlock(&u->lock);
            return -ENOSPC;
        }
        for (uint32_t i = 0; i < count; i++)
            reg_write(u, offset, data[i * size], &notify);
    } else {
        for (uint32_t i = 0; i < count; i++) {
            data[i * size] = reg_read(u, offset);
            if (size > 1)
                memset(data + i * size + 1, 0xff, size - 1);
        }
    }
    pthread_mutex_unlock(&u->lock);
    if (notify)
        signal_drain(u);
    return 0;
}

/* Python's path (exits the run loop returned, unit tests): one register access. */
uint8_t kvmd_uart_read(struct kvmd_uart *u, uint16_t offset)
{
    pthread_mutex_lock(&u->lock);
    uint8_t value = reg_read(u, offset);
    pthread_mutex_unlock(&u->lock);
    return value;
}

int kvmd_uart_write(struct kvmd_uart *u, uint16_t offset, uint8_t value)
{
    int notify = 0;
    pthread_mutex_lock(&u->lock);
    int ret = reg_write(u, offset, value, &notify);
    pthread_mutex_unlock(&u->lock);
    if (notify)
        signal_drain(u);
    return ret;
}

/* Take up to `max` transmitted bytes, oldest first; returns how many. */
uint32_t kvmd_uart_take_output(struct kvmd_uart *u, uint8_t *out, uint32_t max)
{
    pthread_mutex_lock(&u->lock);
    uint64_t n = u->tx_head - u->tx_tail;
    if (n > max)
        n = max;
    for (uint64_t i = 0; i < n; i++)
        out[i] = u->tx[(u->tx_tail + i) & (u->tx_size - 1)];
    u->tx_tail += n;
    pthread_mutex_unlock(&u->lock);
    return (uint32_t)n;
}

/* Ask for a signal on notify_fd at the next transmitted byte (signalling disarms itself, so
 * a guest printing fast costs one eventfd write per drain, not one per byte). Returns
 * whether bytes are waiting in the ring already: drain them, they will not signal. */
int kvmd_uart_arm(struct kvmd_uart *u)
{
    pthread_mutex_lock(&u->lock);
    u->armed = 1;
    int pending = u->tx_head != u->tx_tail;
    pthread_mutex_unlock(&u->lock);
    return pending;
}

/* Queue input for the guest, all or nothing: returns len when it fit, otherwise the room
 * there is (and queues nothing). *rda: the guest enabled the received-data interrupt. */
uint32_t kvmd_uart_feed(struct kvmd_uart *u, const uint8_t *data, uint32_t len, int *rda)
{
    pthread_mutex_lock(&u->lock);
    uint32_t room = u->rx_size - u->rx_len;
    if (len <= room) {
        for (uint32_t i = 0; i < len; i++)
            rx_push(u, data[i]);
        room = len;
    }
    *rda = (u->regs.ier & IER_RDA) != 0;
    pthread_mutex_unlock(&u->lock);
    return room;
}

/* Registers and the receive FIFO (oldest first, at most rx_size bytes into rx). */
uint32_t kvmd_uart_get_state(struct kvmd_uart *u, struct kvmd_uart_regs *regs, uint8_t *rx)
{
    pthread_mutex_lock(&u->lock);
    *regs = u->regs;
    uint32_t n = u->rx_len;
    for (uint32_t i = 0; i < n; i++)
        rx[i] = u->rx[(u->rx_start + i) % u->rx_size];
    pthread_mutex_unlock(&u->lock);
    return n;
}

/* Set registers and the receive FIFO (its newest rx_size bytes); the transmit ring is left
 * alone (drain it first). */
void kvmd_uart_set_state(struct kvmd_uart *u, const struct kvmd_uart_regs *regs,
                         const uint8_t *rx, uint32_t len)
{
    pthread_mutex_lock(&u->lock);
    u->regs = *regs;
    if (len > u->rx_size) {
        rx += len - u->rx_size;
        len = u->rx_size;
    }
    memcpy(u->rx, rx, len);
    u->rx_start = 0;
    u->rx_len = len;
    u->overrun = 0;
    pthread_mutex_unlock(&u->lock);
}

void kvmd_uart_get_stats(struct kvmd_uart *u, struct kvmd_uart_stats *out)
{
    pthread_mutex_lock(&u->lock);
    *out = u->stats;
    out->tx_pending = u->tx_head - u->tx_tail;
    out->rx_pending = u->rx_len;
    pthread_mutex_unlock(&u->lock);
}
