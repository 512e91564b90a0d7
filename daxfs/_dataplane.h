/* daxfs data plane (see _dataplane.c): what _fusehook.c, _fuseops.c, _dataplane.c, _dpmaps.c,
 * _uring.c, _uringio.c, _cowplane.c and _cowoverlay.c share. */
#ifndef DAXFS_DATAPLANE_H
#define DAXFS_DATAPLANE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/uio.h>

struct fuse_session;

/* The FUSE wire format (<linux/fuse.h>, protocol >= 7.9), spelled out here because that
 * header and libfuse's clash. */
struct wire_in {            /* struct fuse_in_header */
    uint32_t len;
    uint32_t opcode;
    uint64_t unique;
    uint64_t nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen;
    uint16_t padding;
};
struct wire_read_in {       /* struct fuse_read_in */
    uint64_t fh;
    uint64_t offset;
    uint32_t size;
    uint32_t read_flags;
    uint64_t lock_owner;
    uint32_t flags;
    uint32_t padding;
};
struct wire_write_in {      /* struct fuse_write_in */
    uint64_t fh;
    uint64_t offset;
    uint32_t size;
    uint32_t write_flags;
    uint64_t lock_owner;
    uint32_t flags;
    uint32_t padding;
};
struct wire_out {           /* struct fuse_out_header */
    uint32_t len;
    int32_t error;
    uint64_t unique;
};
_Static_assert(sizeof(struct wire_in) == 40, "fuse_in_header is 40 bytes");
_Static_assert(sizeof(struct wire_read_in) == 40, "fuse_read_in is 40 bytes");
_Static_assert(sizeof(struct wire_write_in) == 40, "fuse_write_in is 40 bytes");
_Static_assert(sizeof(struct wire_out) == 16, "fuse_out_header is 16 bytes");

#define WIRE_GETXATTR 22    /* followed by struct fuse_getxattr_in {size, padding}, name */
#define WIRE_READ 15
#define WIRE_WRITE 16
#define WIRE_INIT 26
#define WIRE_WRITE_CACHE (1u << 0)

/* interrupts a data plane or ring thread's wait, to stop it (its handler does nothing) */
#define DP_STOP_SIGNAL (SIGRTMAX - 3)
#define DP_BUF_SIZE ((1 << 20) + 8192)   /* max_write (1 MiB) + headers, as libfuse sizes it */

/* _fuseops.c: nonzero while some inode may carry a security.capability xattr (then a
 * write(2) must go to Python, which drops it) */
extern volatile int capability_xattrs;

/* Where a reply goes: /dev/fuse (dp_dev_sink: one writev) or a ring entry (_uring.c: copied
 * into the entry's buffers, committed by its ring's thread).  iov[0] is the fuse_out_header. */
struct dp_sink {
    void (*send)(struct dp_sink *sink, const struct iovec *iov, int cnt);
};
extern struct dp_sink dp_dev_sink;

/* _dpmaps.c: serving, shared with _uring.c.  A request in parts: its header, the op's own
 * struct (`op`, e.g. fuse_read_in) and what follows it (`data`: a write's bytes, a name).
 * 1: answered through `sink`; 0: Python must serve it. */
int dp_serve(const struct wire_in *in, const char *op, size_t oplen, const char *data,
             size_t datalen, struct dp_sink *sink);

/* _dataplane.c: request buffers and the queue of requests left to Python */
char *dp_buf_take(void);                     /* a DP_BUF_SIZE request buffer (NULL: no memory) */
void dp_buf_give(char *buf);
int dp_enqueue(char *buf, size_t len);       /* hand a request to Python; -1: no memory */

/* _uring.c: FUSE-over-io_uring (see the essay there) */
void uring_note_init(const char *buf, size_t n);    /* a worker read the INIT request */
int uring_wanted(void);
int uring_init_reply(char *init_out, size_t len, int fuse_fd);  /* 1: add the flag */
void uring_init_replied(int ok);             /* the INIT reply was written (ok) or not */
int uring_reply(const struct iovec *iov, int count);  /* 1: a ring entry took the reply */
void uring_stop(void);
void uring_stats(int *active, unsigned long long *requests, int *queues);
PyObject *uring_py_configure(PyObject *self, PyObject *arg);
PyObject *uring_py_status(PyObject *self, PyObject *unused);

/* _dataplane.c: what it was configured with (dp_py_configure) */
#define DP_BLOCK_SHIFT 12
enum { PERSIST_NONE = 0, PERSIST_MSYNC = 1, PERSIST_READS_ONLY = 2 };
extern char *dp_image;                       /* base of the daemon's mapping of the image */
extern uint64_t dp_image_size;
extern int dp_persist_mode;
extern atomic_int dp_writes_on;

/* _dpmaps.c: published maps.  Used under its rwlock: held for reading while serving (and
 * breaking), for writing while a map is added or removed. */
struct run {                  /* as Python packs it (dataplane.py RUN_DTYPE) */
    uint64_t lblk;
    uint64_t pblk;
    uint32_t n;
    uint32_t owned;           /* every block has reference count 1: writable in place */
};
_Static_assert(sizeof(struct run) == 24, "run is 24 bytes");

struct cow_overlay;
struct map {
    struct map *next;         /* hash chain */
    uint64_t ino;
    uint64_t size;
    int writable;
    uint32_t nruns;
    atomic_llong mtime;       /* ns of the last write done here, 0: none since taken */
    _Atomic(struct cow_overlay *) overlay;   /* blocks moved by C COW breaks (_cowplane.c);
                                              * NULL until the first */
    struct run runs[];
};

void dp_maps_init(void);                     /* the maps' lock; idempotent */
void dp_reply_err(struct dp_sink *sink, uint64_t unique, int err);
struct dp_counts {                           /* what dp_serve() answered */
    atomic_ullong reads, writes, read_bytes, write_bytes, getxattrs;
};
extern struct dp_counts dp_counts;
uint32_t dp_first_run(const struct map *m, uint64_t b);  /* first run ending after block b */
long long realtime_ns(void);                 /* CLOCK_REALTIME, ns */
int dp_persist(void *p, size_t n);           /* msync's pages if the mode says so; -1: failed */

/* _cowplane.c: COW breaks of one-block writes, and the overlay of the blocks they moved (see
 * the essay there).  Both with the maps' rwlock held for reading. */
static inline struct cow_overlay *cow_overlay_of(const struct map *m)
{
    return atomic_load_explicit(&m->overlay, memory_order_acquire);
}
/* [pos, e) lies inside one run and starts at *base: the end of its first piece (a block in
 * the overlay, or the run's blocks up to the next such), *base moved to where it is */
uint64_t cow_read_piece(const struct cow_overlay *ov, uint64_t pos, uint64_t e, void **base);
/* a write the owned runs alone do not cover: its time (ns) once stored; 0: Python serves it */
long long cow_write(struct map *m, uint64_t off, uint64_t end, const char *data);
void cow_free_map(struct map *m);            /* free(m) and its overlay; no reader left */
/* _cowoverlay.c: the overlay's table (lookups under the maps' read lock; the rest under the
 * COW mutex, whose holder is its only writer) */
int cow_ov_get(const struct cow_overlay *ov, uint64_t b, uint64_t *q);  /* 1: b moved to *q */
void cow_ov_put(struct cow_overlay *ov, uint64_t b, uint64_t q);  /* b not in it, not full */
int cow_overlay_full(const struct cow_overlay *ov);
struct cow_overlay *cow_new_overlay(struct map *m);   /* the map's first; NULL: no memory */
void cow_stats(unsigned long long *breaks, unsigned long long *forwarded);
PyObject *cow_py_configure(PyObject *self, PyObject *args);
PyObject *cow_py_pool_add(PyObject *self, PyObject *arg);
PyObject *cow_py_pool_take(PyObject *self, PyObject *unused);
PyObject *cow_py_take(PyObject *self, PyObject *unused);
PyObject *cow_py_applied(PyObject *self, PyObject *arg);
PyObject *cow_py_disable(PyObject *self, PyObject *unused);
PyObject *cow_py_status(PyObject *self, PyObject *unused);

/* _dataplane.c: the interposers' view */
void dp_note_session(struct fuse_session *se);
long long mono_ns(void);                     /* CLOCK_MONOTONIC, ns */
int dp_resolve(void *libfuse_handle);        /* fetch the real libfuse functions; 0 ok */

/* _dataplane.c (configure, stats, stop) and _dpmaps.c (the maps): Python methods, added to
 * _fusehook's method table */
PyObject *dp_py_configure(PyObject *self, PyObject *args);
PyObject *dp_py_publish(PyObject *self, PyObject *args);
PyObject *dp_py_revoke(PyObject *self, PyObject *arg);
PyObject *dp_py_take_times(PyObject *self, PyObject *arg);
PyObject *dp_py_take_all_times(PyObject *self, PyObject *unused);
PyObject *dp_py_revoke_all(PyObject *self, PyObject *unused);
PyObject *dp_py_stats(PyObject *self, PyObject *unused);
PyObject *dp_py_stop(PyObject *self, PyObject *unused);

#endif
