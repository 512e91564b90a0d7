/* daxfs FUSE-over-io_uring (see the essay in _uring.c): the kernel's structures for it, our
 * rings and their entries, shared by _uring.c (the transport) and _uringio.c (the raw ring). */
#ifndef DAXFS_URING_H
#define DAXFS_URING_H

#include "_dataplane.h"

#include <linux/io_uring.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/uio.h>

/* include/uapi/linux/fuse.h (7.42), spelled out: the installed header may predate it */
#define FUSE_IO_URING_CMD_REGISTER 1
#define FUSE_IO_URING_CMD_COMMIT_AND_FETCH 2
#define INIT_EXT (1u << 30)
#define OVER_IO_URING_FLAGS2 (1u << 9)      /* FUSE_OVER_IO_URING = 1ULL << 41 */

struct uring_ent_in_out {           /* struct fuse_uring_ent_in_out */
    uint64_t flags;
    uint64_t commit_id;             /* the request's unique, to name it at commit */
    uint32_t payload_sz;
    uint32_t padding;
    uint64_t reserved;
};
struct uring_req_header {           /* struct fuse_uring_req_header */
    char in_out[128];               /* fuse_in_header in, fuse_out_header out */
    char op_in[128];                /* in_args[0] */
    struct uring_ent_in_out ent;
};
struct uring_cmd_req {              /* struct fuse_uring_cmd_req, in the SQE's cmd area */
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};
_Static_assert(sizeof(struct uring_ent_in_out) == 32, "fuse_uring_ent_in_out is 32 bytes");
_Static_assert(sizeof(struct uring_req_header) == 288, "fuse_uring_req_header is 288 bytes");
_Static_assert(sizeof(struct uring_cmd_req) == 24, "fuse_uring_cmd_req is 24 bytes");

#define DEPTH 8                     /* entries per queue */
#define SQ_ENTRIES 16               /* >= DEPTH + 1 (the eventfd poll): never full */
#define SQE_SIZE 128
#define POLL_TAG 1ull               /* user_data of the eventfd poll (entries are pointers) */
#define TABLE 256
#define HDR_STRIDE 4096

enum { E_KERNEL, E_OURS, E_PYTHON, E_COMMIT, E_DEAD };

struct ring;
struct ent {
    struct dp_sink sink;            /* first: the sink is the entry */
    struct ring *ring;
    struct uring_req_header *hdr;
    char *payload;
    struct iovec iov[2];            /* header and payload, for REGISTER */
    uint64_t commit_id, unique;
    struct ent *next;               /* in the unique table or on the commit list */
    int state, last_cmd;
};

struct ring {
    int qid, fd, efd, started;
    atomic_int exited;
    pthread_t thread;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    char *sqes;
    struct io_uring_cqe *cqes;
    unsigned to_submit;
    pthread_mutex_t mu;             /* the commit list */
    struct ent *commits;
    uint64_t efd_val;
    struct ent ents[DEPTH];
};

/* _uringio.c: the raw ring, without liburing.  ring_create runs before the ring's thread starts;
 * the rest is called by that thread only. */
int ring_create(struct ring *r, size_t payload_size);   /* the ring, its mappings, eventfd and
                                                         * entry buffers; -errno */
struct io_uring_sqe *ring_get_sqe(struct ring *r);      /* a zeroed SQE queued; NULL: full */
int ring_enter(struct ring *r, unsigned wait);          /* submit, and wait for `wait` CQEs */
void ring_arm_poll(struct ring *r);                     /* POLLIN on the ring's eventfd */

#endif
