/*
 * daxfs FUSE-over-io_uring, the raw ring (see _uring.c for the transport on top).
 *
 * liburing is not a dependency, so this is the little of it the transport needs:
 * io_uring_setup with 128-byte SQEs (a FUSE uring command carries its
 * fuse_uring_cmd_req in the SQE), the three mappings, a submission queue that is
 * never full (SQ_ENTRIES >= DEPTH + 1: each entry has at most one command armed, plus
 * the eventfd poll), and io_uring_enter.  After ring_create, each ring is touched by
 * its own thread only, so there is no SQ lock and the barriers are the ones the
 * ring's protocol needs: release on our tail and head stores, acquire on the kernel's.
 */
#define _GNU_SOURCE
#include "_uring.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

struct io_uring_sqe *ring_get_sqe(struct ring *r)
{
    unsigned tail = *r->sq_tail;
    if (tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE) >= SQ_ENTRIES)
        return NULL;
    unsigned i = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = (struct io_uring_sqe *)(r->sqes + (size_t)i * SQE_SIZE);
    memset(sqe, 0, SQE_SIZE);
    r->sq_array[i] = i;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    r->to_submit++;
    return sqe;
}

int ring_enter(struct ring *r, unsigned wait)
{
    int n = (int)syscall(SYS_io_uring_enter, r->fd, r->to_submit, wait,
                         wait ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
    if (n > 0)
        r->to_submit -= (unsigned)n < r->to_submit ? (unsigned)n : r->to_submit;
    return n < 0 ? -errno : n;
}

void ring_arm_poll(struct ring *r)
{
    struct io_uring_sqe *sqe = ring_get_sqe(r);
    if (!sqe)
        return;
    sqe->opcode = IORING_OP_POLL_ADD;
    sqe->fd = r->efd;
    sqe->poll32_events = POLLIN;
    sqe->user_data = POLL_TAG;
}

int ring_create(struct ring *r, size_t payload_size)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE;
    p.cq_entries = 2 * SQ_ENTRIES;
    r->fd = (int)syscall(SYS_io_uring_setup, SQ_ENTRIES, &p);
    if (r->fd < 0)
        return -errno;
    if (p.sq_entries != SQ_ENTRIES)
        return -EINVAL;
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP)
        sq_len = cq_len = sq_len > cq_len ? sq_len : cq_len;
    char *sq = mmap(NULL, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                    IORING_OFF_SQ_RING);
    if (sq == MAP_FAILED)
        return -errno;
    char *cq = sq;
    if (!(p.features & IORING_FEAT_SINGLE_MMAP)) {
        cq = mmap(NULL, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                  IORING_OFF_CQ_RING);
        if (cq == MAP_FAILED)
            return -errno;
    }
    r->sqes = mmap(NULL, (size_t)p.sq_entries * SQE_SIZE, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED)
        return -errno;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    r->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (r->efd < 0)
        return -errno;
    char *hdrs = mmap(NULL, DEPTH * HDR_STRIDE, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *pay = mmap(NULL, DEPTH * payload_size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (hdrs == MAP_FAILED || pay == MAP_FAILED)
        return -ENOMEM;
    for (int i = 0; i < DEPTH; i++) {
        struct ent *e = &r->ents[i];
        e->ring = r;
        e->hdr = (struct uring_req_header *)(hdrs + (size_t)i * HDR_STRIDE);
        e->payload = pay + (size_t)i * payload_size;
        e->iov[0] = (struct iovec){e->hdr, sizeof(*e->hdr)};
        e->iov[1] = (struct iovec){e->payload, payload_size};
    }
    return 0;
}
