/*
 * daxfs data plane, the published maps and what is served from them (see the
 * essay in _dataplane.c for how they fit in).
 *
 * A published map is Python's word on one inode: its size, whether in-place
 * writes are allowed, and its block runs, each marked owned when every block in
 * it has reference count 1.  dp_serve() answers from them, into a reply sink
 * (/dev/fuse or a ring entry): a READ by one writev straight from the image
 * (holes read as zeros, EOF clips); a WRITE in place when owned runs map all of
 * it inside the size, or through _cowplane.c (a COW break of the one block it
 * touches, or blocks an earlier break moved); the capability getxattr while no
 * inode has one.  For anything else it returns 0: Python serves it.
 *
 * Consistency: the maps live in one hash table under one reader-writer lock
 * (writer-preferring, so Python's revoke does not wait behind a stream of
 * readers).  dp_serve holds it for reading while it uses a map, memcpy and
 * writev included; Python publishes and revokes under it for writing, so once a
 * revoke returns no thread is inside that inode's map.
 */
#define _GNU_SOURCE
#include "_dataplane.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>

#define BLOCK_SHIFT DP_BLOCK_SHIFT
#define MAX_IOV 1024                  /* UIO_MAXIOV */
#define BUCKETS (1 << 14)
#define MAX_RUNS (1 << 22)
#define ZEROS (1 << 20)

static char zeros[ZEROS];             /* never written: .bss, the kernel's zero page */
struct dp_counts dp_counts;

/* ------------------------------------------------------------------ */
/* published maps                                                      */

static struct map *buckets[BUCKETS];
static pthread_rwlock_t maps_lock;
static pthread_once_t lock_once = PTHREAD_ONCE_INIT;

static void init_lock(void)
{
    /* Python's revoke must not wait behind a stream of new readers */
    pthread_rwlockattr_t a;
    pthread_rwlockattr_init(&a);
    pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&maps_lock, &a);
    pthread_rwlockattr_destroy(&a);
}

void dp_maps_init(void)
{
    pthread_once(&lock_once, init_lock);
}

static unsigned bucket_of(uint64_t ino)
{
    return (unsigned)((ino * 0x9E3779B97F4A7C15ull) >> (64 - 14));
}

static struct map *find(uint64_t ino)          /* lock held */
{
    struct map *m = buckets[bucket_of(ino)];
    while (m && m->ino != ino)
        m = m->next;
    return m;
}

static struct map *unlink_map(uint64_t ino)    /* write lock held */
{
    struct map **pp = &buckets[bucket_of(ino)];
    while (*pp && (*pp)->ino != ino)
        pp = &(*pp)->next;
    struct map *m = *pp;
    if (m)
        *pp = m->next;
    return m;
}

/* Index of the first run that ends after file block b (nruns if none). */
uint32_t dp_first_run(const struct map *m, uint64_t b)
{
    uint32_t lo = 0, hi = m->nruns;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        if (m->runs[mid].lblk + m->runs[mid].n <= b)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

long long realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* A store into the image made durable: msync of its pages on a disk file; -1: that failed. */
int dp_persist(void *p, size_t n)
{
    uintptr_t a = (uintptr_t)p & ~(uintptr_t)4095;
    return dp_persist_mode == PERSIST_MSYNC ? msync((void *)a, (uintptr_t)p + n - a, MS_SYNC) : 0;
}
/* ------------------------------------------------------------------ */
/* serving READ and WRITE                                              */

void dp_reply_err(struct dp_sink *sink, uint64_t unique, int err)
{
    struct wire_out out = {.len = sizeof(out), .error = -err, .unique = unique};
    struct iovec iov = {&out, sizeof(out)};
    sink->send(sink, &iov, 1);
}

/* 1: answered; 0: Python must serve it. */
static int serve_read(const struct wire_in *in, const struct wire_read_in *rd,
                      struct dp_sink *sink)
{
    struct iovec iov[MAX_IOV];
    struct wire_out out = {.error = 0, .unique = in->unique};
    int cnt = 1;
    size_t total = 0;

    pthread_rwlock_rdlock(&maps_lock);
    const struct map *m = find(in->nodeid);
    if (!m)
        goto forward;
    const struct cow_overlay *ov = cow_overlay_of(m);
    uint64_t pos = rd->offset, end = pos + rd->size;
    if (end > m->size || end < pos)
        end = m->size;
    uint32_t i = pos < end ? dp_first_run(m, pos >> BLOCK_SHIFT) : 0;
    while (pos < end) {
        const struct run *r = i < m->nruns ? &m->runs[i] : NULL;
        uint64_t e;
        if (r && r->lblk << BLOCK_SHIFT <= pos) {
            uint64_t re = (r->lblk + r->n) << BLOCK_SHIFT;
            e = re < end ? re : end;
            iov[cnt].iov_base = dp_image + (r->pblk << BLOCK_SHIFT) +
                                (pos - (r->lblk << BLOCK_SHIFT));
            if (ov)                                /* blocks moved by COW breaks: own pieces */
                e = cow_read_piece(ov, pos, e, &iov[cnt].iov_base);
            i += e == re;
        } else {                                   /* a hole: up to the next run */
            e = r ? r->lblk << BLOCK_SHIFT : end;
            e = e < end ? e : end;
            if (e - pos > ZEROS)
                e = pos + ZEROS;
            iov[cnt].iov_base = (void *)zeros;
        }
        iov[cnt].iov_len = e - pos;
        total += e - pos;
        pos = e;
        if (++cnt == MAX_IOV && pos < end)
            goto forward;                          /* too fragmented for one writev */
    }
    out.len = (uint32_t)(sizeof(out) + total);
    iov[0].iov_base = &out;
    iov[0].iov_len = sizeof(out);
    sink->send(sink, iov, cnt);
    pthread_rwlock_unlock(&maps_lock);
    atomic_fetch_add(&dp_counts.reads, 1);
    atomic_fetch_add(&dp_counts.read_bytes, total);
    return 1;
forward:
    pthread_rwlock_unlock(&maps_lock);
    return 0;
}

/* In place, when owned runs map all of [off, end): the time (ns); else 0.  Read lock held. */
static long long store_owned(const struct map *m, uint64_t off, uint64_t end, const char *data)
{
    uint64_t b0 = off >> BLOCK_SHIFT, b1 = (end - 1) >> BLOCK_SHIFT;
    uint32_t i0 = dp_first_run(m, b0), i = i0;
    for (uint64_t b = b0; b <= b1; i++) {          /* covered by owned runs, no gap */
        if (i >= m->nruns || m->runs[i].lblk > b || !m->runs[i].owned)
            return 0;
        b = m->runs[i].lblk + m->runs[i].n;
    }
    for (uint64_t pos = off; pos < end; i0++) {
        const struct run *r = &m->runs[i0];
        uint64_t e = (r->lblk + r->n) << BLOCK_SHIFT;
        e = e < end ? e : end;
        char *dst = dp_image + (r->pblk << BLOCK_SHIFT) + (pos - (r->lblk << BLOCK_SHIFT));
        memcpy(dst, data + (pos - off), e - pos);
        dp_persist(dst, e - pos);
        pos = e;
    }
    return realtime_ns();
}

/* Store when the range lies inside the size and owned blocks map all of it, or when _cowplane.c
 * can (blocks it moved, a COW break); else 0.  All or nothing: writeback ignores short counts. */
static int serve_write(const struct wire_in *in, const struct wire_write_in *wr,
                       const char *data, struct dp_sink *sink)
{
    if (!atomic_load(&dp_writes_on) || wr->size == 0)
        return 0;
    if (!(wr->write_flags & WIRE_WRITE_CACHE) && capability_xattrs)
        return 0;                                  /* Python drops security.capability */
    pthread_rwlock_rdlock(&maps_lock);
    struct map *m = find(in->nodeid);
    uint64_t off = wr->offset, end = off + wr->size;
    if (!m || !m->writable || end > m->size || end < off)
        goto forward;
    long long now = cow_overlay_of(m) ? 0 : store_owned(m, off, end, data);
    if (!now && !(now = cow_write(m, off, end, data)))
        goto forward;
    atomic_store(&m->mtime, now);
    pthread_rwlock_unlock(&maps_lock);

    struct {
        struct wire_out h;
        uint32_t size, padding;
    } out = {{sizeof(out), 0, in->unique}, wr->size, 0};
    struct iovec iov = {&out, sizeof(out)};
    sink->send(sink, &iov, 1);
    atomic_fetch_add(&dp_counts.writes, 1);
    atomic_fetch_add(&dp_counts.write_bytes, wr->size);
    return 1;
forward:
    pthread_rwlock_unlock(&maps_lock);
    return 0;
}

/* The kernel asks for security.capability before every write through its page cache (FUSE
 * mounts never get SB_NOSEC); while no inode has one, answer as _fuseops.c's hook_getxattr
 * does, here, instead of a round trip through Python's event loop. */
static int serve_getxattr(const struct wire_in *in, const char *name, size_t len,
                          struct dp_sink *sink)
{
    static const char cap[] = "security.capability";
    if (capability_xattrs || len < sizeof(cap) || memcmp(name, cap, sizeof(cap)) != 0)
        return 0;
    dp_reply_err(sink, in->unique, ENODATA);
    atomic_fetch_add(&dp_counts.getxattrs, 1);
    return 1;
}

int dp_serve(const struct wire_in *in, const char *op, size_t oplen, const char *data,
             size_t datalen, struct dp_sink *sink)
{
    if (in->opcode == WIRE_GETXATTR && oplen == 8 && datalen > 0)
        return serve_getxattr(in, data, datalen, sink);
    if (in->opcode == WIRE_READ && oplen >= sizeof(struct wire_read_in))
        return serve_read(in, (const struct wire_read_in *)op, sink);
    if (in->opcode == WIRE_WRITE && oplen == sizeof(struct wire_write_in)) {
        const struct wire_write_in *wr = (const struct wire_write_in *)op;
        return datalen == wr->size && serve_write(in, wr, data, sink);
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Python API: publish and revoke                                      */

PyObject *dp_py_publish(PyObject *self, PyObject *args)
{
    unsigned long long ino, size;
    int writable;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "KKpy*", &ino, &size, &writable, &v))
        return NULL;
    size_t n = (size_t)v.len / sizeof(struct run);
    struct map *m = NULL;
    if ((size_t)v.len % sizeof(struct run) || n > MAX_RUNS) {
        PyErr_SetString(PyExc_ValueError, "runs must be packed 24-byte records, at most 4M");
        goto out;
    }
    m = malloc(sizeof(*m) + n * sizeof(struct run));
    if (!m) {
        PyErr_NoMemory();
        goto out;
    }
    memcpy(m->runs, v.buf, n * sizeof(struct run));
    uint64_t blocks = dp_image_size >> BLOCK_SHIFT, prev_end = 0;
    for (size_t i = 0; i < n; i++) {               /* sorted, disjoint, inside the image */
        const struct run *r = &m->runs[i];
        if (r->n == 0 || r->lblk < prev_end || r->pblk >= blocks || r->n > blocks - r->pblk ||
            r->lblk > (UINT64_MAX >> BLOCK_SHIFT) - r->n) {
            PyErr_Format(PyExc_ValueError, "run %zu of inode %llu is out of order or "
                         "outside the image", i, ino);
            free(m);
            m = NULL;
            goto out;
        }
        prev_end = r->lblk + r->n;
    }
    m->ino = ino;
    m->size = size;
    m->writable = writable;
    m->nruns = (uint32_t)n;
    atomic_init(&m->overlay, NULL);
    pthread_rwlock_wrlock(&maps_lock);
    struct map *old = unlink_map(ino);
    atomic_init(&m->mtime, old ? atomic_load(&old->mtime) : 0);  /* keep an untaken time */
    unsigned b = bucket_of(ino);
    m->next = buckets[b];
    buckets[b] = m;
    pthread_rwlock_unlock(&maps_lock);
    cow_free_map(old);
out:
    PyBuffer_Release(&v);
    if (!m)
        return NULL;
    Py_RETURN_NONE;
}

PyObject *dp_py_revoke(PyObject *self, PyObject *arg)
{
    unsigned long long ino = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    dp_maps_init();
    pthread_rwlock_wrlock(&maps_lock);
    struct map *m = unlink_map(ino);
    pthread_rwlock_unlock(&maps_lock);
    long long t = m ? atomic_load(&m->mtime) : 0;
    cow_free_map(m);
    return PyLong_FromLongLong(t);
}

PyObject *dp_py_take_times(PyObject *self, PyObject *arg)
{
    unsigned long long ino = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    dp_maps_init();
    pthread_rwlock_rdlock(&maps_lock);
    struct map *m = find(ino);
    long long t = m ? atomic_exchange(&m->mtime, 0) : 0;
    pthread_rwlock_unlock(&maps_lock);
    return PyLong_FromLongLong(t);
}

/* [(ino, mtime_ns)] of the maps written since their time was last taken; with `drop`,
 * every map is revoked as well. */
static PyObject *collect(int drop)
{
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    dp_maps_init();
    if (drop)
        pthread_rwlock_wrlock(&maps_lock);
    else
        pthread_rwlock_rdlock(&maps_lock);
    for (unsigned b = 0; b < BUCKETS; b++) {
        struct map *m = buckets[b];
        if (drop)
            buckets[b] = NULL;
        while (m) {
            struct map *next = m->next;
            long long t = atomic_exchange(&m->mtime, 0);
            if (t && out) {
                PyObject *pair = Py_BuildValue("(KL)", (unsigned long long)m->ino, t);
                if (!pair || PyList_Append(out, pair) < 0)
                    Py_CLEAR(out);
                Py_XDECREF(pair);
            }
            if (drop)
                cow_free_map(m);
            m = next;
        }
    }
    pthread_rwlock_unlock(&maps_lock);
    return out;
}

PyObject *dp_py_take_all_times(PyObject *self, PyObject *unused)
{
    return collect(0);
}

PyObject *dp_py_revoke_all(PyObject *self, PyObject *unused)
{
    return collect(1);
}
