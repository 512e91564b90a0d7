/*
 * daxfs COW plane -- the data plane's threads break the sharing of a block themselves.
 *
 * Why.  A WRITE into a block that a file shares with a reflink clone (reference count > 1)
 * needs a block of its own: Python allocates one, copies, remaps and commits a journal
 * transaction, ~90 us per write, where an in-place write served in C (_dataplane.c) costs
 * ~16 us.  A cloned VM image or database written at random pays that on the first write of
 * every block.  The break itself is a copy and a pointer; what costs is Python's bookkeeping
 * (extent trees, reference counts, the journal), and that can wait and be done for many
 * breaks at once.
 *
 * How.  Python lends us a *pool* of blocks (cow_pool_add: allocated in its own view, still
 * free on the image) and an *intent ring* in the image (cow_configure).  A WRITE that touches
 * one file block b, mapped by a run that is not owned (b shared), of a published writable map
 * is served by the worker that read it (serve_write -> cow_write -> cow_break), holding the
 * maps' read lock as for any write, and the COW mutex, which serialises breaks:
 *   1. q = a block from the pool; p = b's shared block.  Unless the write covers all of b,
 *      copy p into q; then the write's bytes; persist q (msync with PERSIST_MSYNC);
 *   2. store the record {magic, seq, ino, b, q, p, mtime, check} in ring slot seq % slots,
 *      the check word last, and persist it;
 *   3. note b -> q in the map's *overlay*, so that the map's reads and writes of b go to q
 *      from now on, and append the record to the *pending* array cow_take() hands Python;
 *   4. reply: the write is done.
 * Python applies pending records to its structures in batches (one transaction for many) and
 * then calls cow_applied(seq), which frees their ring slots.  The eventfd cow_configure
 * returns tells it when: records piling up (drain_at) or the pool running low (pool_low).  C
 * breaks faster than Python applies: a break that finds no pool block or ring slot waits for
 * Python to make room (wait_for_room, up to ROOM_WAIT_NS), so breaks run at Python's pace;
 * only then, or without overlay room, does it give up and the write go to Python, as every
 * other write C does not serve.
 *
 * The overlay (_cowoverlay.c).  Per map, b -> q for the blocks broken here since the map was
 * published: an open addressing table of fixed size, allocated at the map's first break.  The
 * one breaker (COW mutex) inserts while readers (serve_read, serve_write: read lock only)
 * probe: the value is stored before the key, the key with release, readers load keys with
 * acquire.  Entries are never removed; the table is freed with its map (revoke, revoke_all,
 * publish replacing it).
 * It is 8 MiB of address space (resident: the pages touched; the breaks of a 1 GiB file fit);
 * once 3/4 full, the map's breaks go to Python, whose commit takes the map back, and the next
 * one starts empty.
 * Python must have the pending records for a file before it uses its own view of that file's
 * blocks, and this is how it can: a break runs under the read lock, so once revoke(ino)
 * returns no break of ino is running and none can start, and every record for ino is in the
 * next cow_take().
 *
 * The crash contract.  A write is acknowledged only after its block and then its record are
 * stored (and msync'ed, PERSIST_MSYNC), so an acknowledged write survives kill -9 of the
 * daemon (a MAP_SHARED image lives on in the page cache) and, on a disk file, a power cut.  At
 * mount Python replays every ring record whose magic and check match and whose seq is at least
 * the applied seq it keeps in its journal.  A record torn by a crash fails its check (the
 * check is written last); its write was never acknowledged, and its block, like every pool
 * block no record names, is still free on the image.  A record whose msync fails is wiped
 * and its write goes to Python.
 *
 * What Python must know when it applies a record: the file may have stopped sharing old_pblk
 * since the map was published (the other file deleted or rewritten), so the old block's count
 * can reach 0; and a record it took is applied exactly once (ring replay at mount skips seq <
 * applied).  And before it serves a write of a published file itself, it must take the file
 * back (revoke, then cow_take): a break of a block it is about to copy from its old place
 * would otherwise be lost under its own copy.
 *
 * Not done here: breaks of writes touching several blocks, or blocks in a hole (allocation),
 * or of files that are not published; DAX mappings (PERSIST_READS_ONLY: no C writes at all).
 */
#define _GNU_SOURCE
#include "_dataplane.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define BLOCK_SHIFT DP_BLOCK_SHIFT
#define BLOCK_SIZE (1u << BLOCK_SHIFT)
#define BLOCK_MASK ((uint64_t)BLOCK_SIZE - 1)

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "ring records are little-endian");

/* ------------------------------------------------------------------ */
/* the pool, the ring and the pending records (all under cow_mu)      */

struct cow_rec {                     /* format.py COW_RECORD_DTYPE */
    uint64_t w[8];
};
enum { W_MAGIC, W_SEQ, W_INO, W_LBLK, W_NEW, W_OLD, W_MTIME, W_CHECK };
_Static_assert(sizeof(struct cow_rec) == 64, "a ring record is 64 bytes");
#define COW_MAGIC 0x3130574F43584144ull          /* "DAXCOW01" */

static pthread_mutex_t cow_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cow_room = PTHREAD_COND_INITIALIZER;  /* the pool or ring got room */
static atomic_int cow_on;            /* breaks may be tried: read without cow_mu, which
                                      * cow_break re-checks it under */
static int configured, efd = -1;
static uint64_t ring_off, slots, next_seq, applied_seq, pool_low, drain_at;
static uint64_t *pool;               /* blocks pool[pool_head .. pool_n), taken in the order
                                      * given: runs Python hands over stay runs in the files */
static size_t pool_head, pool_n, pool_cap;
static struct cow_rec *pending;      /* `slots` of them: pending <= next_seq - applied_seq */
static atomic_size_t npending;       /* also read without cow_mu (cow_take's quick look) */
static atomic_int kicked;            /* the eventfd was written since cow_take drained it */

static atomic_ullong st_breaks, st_forwarded, st_short;   /* st_short: gave up for want of room */

void cow_stats(unsigned long long *breaks, unsigned long long *forwarded)
{
    *breaks = atomic_load(&st_breaks);
    *forwarded = atomic_load(&st_forwarded);
}

static uint64_t cow_check(const uint64_t *w)     /* over words 0..6; format.py cow_check */
{
    uint64_t h = 0x9E3779B97F4A7C15ull;
    for (int k = 0; k < W_CHECK; k++) {
        h ^= w[k];
        h *= 0xff51afd7ed558ccdull;
        h ^= h >> 33;
    }
    return h;
}

/* Make the eventfd readable, once until cow_take drains it.  cow_mu held. */
static void kick(void)
{
    if (atomic_load(&kicked))
        return;
    atomic_store(&kicked, 1);
    uint64_t one = 1;
    (void)!write(efd, &one, sizeof(one));
}

/* A break not done: the write goes to Python, which is asked to drain and refill (so the next
 * ones need not).  Unlocks cow_mu; returns 0. */
static long long give_up(void)
{
    atomic_fetch_add(&st_forwarded, 1);
    kick();
    pthread_mutex_unlock(&cow_mu);
    return 0;
}

/* Store a record in its ring slot, the check word last so that a record torn by a crash does
 * not count, and persist it.  -1: msync failed, and the slot is wiped (its write will not be
 * acknowledged, so it must not be replayed).  cow_mu held. */
static int put_record(const struct cow_rec *rec)
{
    uint64_t *slot = (uint64_t *)(dp_image + ring_off + rec->w[W_SEQ] % slots * sizeof(*rec));
    for (int k = 0; k < W_CHECK; k++)
        slot[k] = rec->w[k];
    __atomic_store_n(&slot[W_CHECK], rec->w[W_CHECK], __ATOMIC_RELEASE);
    if (dp_persist(slot, sizeof(*rec)) == 0)
        return 0;
    __atomic_store_n(&slot[W_CHECK], 0, __ATOMIC_RELAXED);
    return -1;
}

/* ------------------------------------------------------------------ */
/* serving writes                                                      */

static void store(char *dst, const char *src, size_t n)
{
    memcpy(dst, src, n);
    dp_persist(dst, n);
}

/* Where file block b is written in place: the block a break moved it to, else its block in
 * an owned run (*i: the index of a run not past b's, advanced); NULL: shared, or a hole. */
static char *owned_block(const struct map *m, const struct cow_overlay *ov, uint64_t b,
                         uint32_t *i)
{
    uint64_t q;
    if (cow_ov_get(ov, b, &q))
        return dp_image + (q << BLOCK_SHIFT);
    while (*i < m->nruns && m->runs[*i].lblk + m->runs[*i].n <= b)
        ++*i;
    const struct run *r = &m->runs[*i];
    if (*i == m->nruns || r->lblk > b || !r->owned)
        return NULL;
    return dp_image + ((r->pblk + (b - r->lblk)) << BLOCK_SHIFT);
}

/* A map with an overlay: [off, end) in place if each of its blocks moved or is owned; 1 when
 * stored, 0 (nothing written) else.  Read lock held. */
static int store_overlaid(const struct map *m, const struct cow_overlay *ov, uint64_t off,
                          uint64_t end, const char *data)
{
    uint64_t b0 = off >> BLOCK_SHIFT, b1 = (end - 1) >> BLOCK_SHIFT;
    uint32_t i0 = dp_first_run(m, b0), i = i0;
    for (uint64_t b = b0; b <= b1; b++)
        if (!owned_block(m, ov, b, &i))
            return 0;
    /* Again, storing: the blocks are the same (breaks only move shared ones, which the loop
     * above did not let through); each piece of consecutive image bytes in one store. */
    char *dst = NULL;
    size_t len = 0;
    uint64_t start = off, pos = off;
    for (uint64_t b = b0; b <= b1; b++) {
        uint64_t e = (b + 1) << BLOCK_SHIFT < end ? (b + 1) << BLOCK_SHIFT : end;
        char *d = owned_block(m, ov, b, &i0) + (pos & BLOCK_MASK);
        if (!dst || d != dst + len) {
            if (dst)
                store(dst, data + (start - off), len);
            dst = d;
            len = 0;
            start = pos;
        }
        len += e - pos;
        pos = e;
    }
    store(dst, data + (start - off), len);
    return 1;
}

/* The break of file block b of m, shared at p, by the write of data[0..n) at byte off inside
 * it: steps 1-4 of the essay.  The write's time (ns) once stored; 0: Python serves it.  Read
 * lock held. */
static int short_of_room(void)                     /* cow_mu held */
{
    return pool_head == pool_n || next_seq - applied_seq >= slots ||
           atomic_load(&npending) >= slots;
}

/* Wait up to ROOM_WAIT_NS for Python to refill the pool or apply records (cow_mu held across
 * the wait, released while waiting).  Why wait rather than hand the write to Python at once:
 * C breaks faster than Python applies, and a write Python serves itself takes the file back
 * from the data plane, which then serves nothing of it until Python publishes it again (a
 * pass over every block of the file); waiting here lets the breaks run at Python's pace. */
#define ROOM_WAIT_NS 50000000LL
static void wait_for_room(void)
{
    kick();
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    long long ns = until.tv_nsec + ROOM_WAIT_NS;
    until.tv_sec += ns / 1000000000LL;
    until.tv_nsec = ns % 1000000000LL;
    while (short_of_room() && atomic_load(&cow_on))
        if (pthread_cond_timedwait(&cow_room, &cow_mu, &until) == ETIMEDOUT)
            break;
}

static long long cow_break(struct map *m, uint64_t b, uint64_t p, uint64_t off,
                           const char *data, size_t n)
{
    pthread_mutex_lock(&cow_mu);
    if (short_of_room())
        wait_for_room();
    struct cow_overlay *ov = cow_overlay_of(m);
    uint64_t q;
    if (ov && cow_ov_get(ov, b, &q)) {                 /* another thread broke b meanwhile */
        pthread_mutex_unlock(&cow_mu);
        store(dp_image + (q << BLOCK_SHIFT) + (off & BLOCK_MASK), data, n);
        return realtime_ns();
    }
    if (!atomic_load(&cow_on)) {                   /* cow_disable ran since the quick look */
        pthread_mutex_unlock(&cow_mu);
        return 0;
    }
    int short_of = short_of_room();
    if (short_of)
        atomic_fetch_add(&st_short, 1);
    if (short_of || (ov && cow_overlay_full(ov)) || (!ov && !(ov = cow_new_overlay(m))))
        return give_up();
    q = pool[pool_head++];
    char *dst = dp_image + (q << BLOCK_SHIFT);
    if (n != BLOCK_SIZE)
        memcpy(dst, dp_image + (p << BLOCK_SHIFT), BLOCK_SIZE);
    memcpy(dst + (off & BLOCK_MASK), data, n);
    long long now = realtime_ns();
    struct cow_rec rec = {{COW_MAGIC, next_seq, m->ino, b, q, p, (uint64_t)now, 0}};
    rec.w[W_CHECK] = cow_check(rec.w);
    if (dp_persist(dst, BLOCK_SIZE) != 0 || put_record(&rec) != 0) {
        pool_head--;                               /* q unused: first out again */
        return give_up();
    }
    cow_ov_put(ov, b, q);
    size_t np = atomic_load(&npending);
    pending[np++] = rec;
    atomic_store(&npending, np);
    next_seq++;
    if (np >= drain_at || pool_n - pool_head < pool_low)
        kick();
    pthread_mutex_unlock(&cow_mu);
    atomic_fetch_add(&st_breaks, 1);
    return now;
}

/* Called by serve_write (read lock held) for a write [off, end) inside a writable map's size
 * that its owned runs alone do not cover (or any write, once the map has an overlay): in
 * place if every block moved or is owned, else a COW break if it touches one shared block.
 * The write's time (ns) once stored; 0: Python must serve it (nothing was written). */
long long cow_write(struct map *m, uint64_t off, uint64_t end, const char *data)
{
    const struct cow_overlay *ov = cow_overlay_of(m);
    if (ov && store_overlaid(m, ov, off, end, data))
        return realtime_ns();
    uint64_t b = off >> BLOCK_SHIFT;
    if (b != (end - 1) >> BLOCK_SHIFT || !atomic_load(&cow_on))
        return 0;                                  /* several blocks: Python breaks them */
    uint32_t i = dp_first_run(m, b);
    const struct run *r = &m->runs[i];
    if (i == m->nruns || r->lblk > b || r->owned)
        return 0;                                  /* a hole: allocating is Python's */
    return cow_break(m, b, r->pblk + (b - r->lblk), off, data, end - off);
}

/* ------------------------------------------------------------------ */
/* Python API (all safe while the threads serve)                      */

/* Python's side of cow_mu: a break holds it across up to two msyncs (disk writes), so wait
 * for it without the GIL. */
static void lock_py(void)
{
    if (pthread_mutex_trylock(&cow_mu) == 0)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&cow_mu);
    Py_END_ALLOW_THREADS
}

/* cow_configure(ring_off, slots, next_seq, applied_seq, pool_low, drain_at) -> eventfd.
 * After _dp_configure (the image).  Once; again only after cow_disable with nothing pending
 * and the pool taken back (the same eventfd then).  Breaks happen only if the data plane
 * writes (not read-only, not PERSIST_READS_ONLY). */
PyObject *cow_py_configure(PyObject *self, PyObject *args)
{
    long long ro, ns, next, applied, low, drain;
    if (!PyArg_ParseTuple(args, "LLLLLL", &ro, &ns, &next, &applied, &low, &drain))
        return NULL;
    if (!dp_image || !dp_image_size) {
        PyErr_SetString(PyExc_RuntimeError, "configure the data plane (its image) first");
        return NULL;
    }
    if (ro < 0 || ro % (long long)sizeof(struct cow_rec) || ns <= 0 ||
        (uint64_t)ro > dp_image_size ||
        (uint64_t)ns > (dp_image_size - (uint64_t)ro) / sizeof(struct cow_rec) ||
        applied < 0 || next < applied || next - applied > ns || low < 0 || drain < 0 ||
        drain > ns) {
        PyErr_SetString(PyExc_ValueError, "bad COW ring configuration (ring_off 64-aligned, "
                        "the ring inside the image, 0 <= applied_seq <= next_seq <= "
                        "applied_seq + slots, drain_at <= slots)");
        return NULL;
    }
    struct cow_rec *pend = malloc((size_t)ns * sizeof(*pend));
    if (!pend)
        return PyErr_NoMemory();
    lock_py();
    if (configured && (atomic_load(&cow_on) || atomic_load(&npending) || pool_head != pool_n)) {
        pthread_mutex_unlock(&cow_mu);
        free(pend);
        PyErr_SetString(PyExc_RuntimeError, "COW breaks are configured already");
        return NULL;
    }
    if (efd < 0 && (efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0) {
        pthread_mutex_unlock(&cow_mu);
        free(pend);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    free(pending);
    pending = pend;
    ring_off = (uint64_t)ro;
    slots = (uint64_t)ns;
    next_seq = (uint64_t)next;
    applied_seq = (uint64_t)applied;
    pool_low = (uint64_t)low;
    drain_at = (uint64_t)drain;
    pool_head = pool_n = 0;
    configured = 1;
    atomic_store(&cow_on, atomic_load(&dp_writes_on) && dp_persist_mode != PERSIST_READS_ONLY);
    pthread_mutex_unlock(&cow_mu);
    return PyLong_FromLong(efd);
}

/* Append n blocks (from an unaligned buffer) to the pool, all or none: 0; -1: no memory;
 * 1: *bad is the index of a block outside the image or in the ring.  cow_mu held. */
static int pool_append(const char *buf, size_t n, size_t *bad)
{
    if (pool_head) {                               /* what is left, to the front */
        memmove(pool, pool + pool_head, (pool_n - pool_head) * sizeof(*pool));
        pool_n -= pool_head;
        pool_head = 0;
    }
    if (pool_n + n > pool_cap) {
        size_t cap = pool_cap * 2 > pool_n + n ? pool_cap * 2 : pool_n + n;
        uint64_t *p = realloc(pool, cap * sizeof(*pool));
        if (!p)
            return -1;
        pool = p;
        pool_cap = cap;
    }
    memcpy(pool + pool_n, buf, n * sizeof(*pool));
    uint64_t blocks = dp_image_size >> BLOCK_SHIFT, r0 = ring_off >> BLOCK_SHIFT;
    uint64_t r1 = (ring_off + slots * sizeof(struct cow_rec) + BLOCK_MASK) >> BLOCK_SHIFT;
    for (size_t k = 0; k < n; k++) {
        uint64_t b = pool[pool_n + k];
        if (b >= blocks || (b >= r0 && b < r1)) {
            *bad = k;
            return 1;
        }
    }
    pool_n += n;
    return 0;
}

/* cow_pool_add(blocks): append a buffer of uint64 block numbers (each inside the image, none
 * in the ring) to the pool, all or none.  After cow_configure. */
PyObject *cow_py_pool_add(PyObject *self, PyObject *arg)
{
    Py_buffer v;
    if (PyObject_GetBuffer(arg, &v, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    size_t n = (size_t)v.len / sizeof(uint64_t), bad = 0;
    if (v.len % sizeof(uint64_t) || (v.itemsize != 1 && v.itemsize != sizeof(uint64_t))) {
        PyBuffer_Release(&v);
        PyErr_SetString(PyExc_ValueError, "blocks must be a buffer of uint64 block numbers");
        return NULL;
    }
    int r = -2;
    uint64_t blk = 0;
    lock_py();
    if (configured && n) {
        r = pool_append(v.buf, n, &bad);
        blk = r == 1 ? pool[pool_n + bad] : 0;
        pthread_cond_broadcast(&cow_room);
    }
    int ok = configured;
    pthread_mutex_unlock(&cow_mu);
    PyBuffer_Release(&v);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "call cow_configure first");
        return NULL;
    }
    if (r == -1)
        return PyErr_NoMemory();
    if (r == 1) {
        PyErr_Format(PyExc_ValueError, "pool block %llu (at %zu) is outside the image or in "
                     "the COW ring", (unsigned long long)blk, bad);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* cow_pool_take() -> bytes: every block still in the pool (uint64s), which is empty then. */
PyObject *cow_py_pool_take(PyObject *self, PyObject *unused)
{
    lock_py();
    size_t n = pool_n - pool_head;
    PyObject *out = PyBytes_FromStringAndSize(n ? (const char *)(pool + pool_head) : "",
                                              (Py_ssize_t)(n * sizeof(*pool)));
    if (out)
        pool_head = pool_n = 0;
    pthread_mutex_unlock(&cow_mu);
    return out;
}

/* cow_take() -> bytes: every pending record (64 bytes each, in seq order), and the eventfd
 * drained.  Cheap when there is nothing: Python calls it before every request it serves. */
PyObject *cow_py_take(PyObject *self, PyObject *unused)
{
    if (!atomic_load(&npending) && !atomic_load(&kicked))
        return PyBytes_FromStringAndSize(NULL, 0);
    lock_py();
    size_t n = atomic_load(&npending);
    PyObject *out = PyBytes_FromStringAndSize((const char *)pending,
                                              (Py_ssize_t)(n * sizeof(*pending)));
    if (out) {
        pthread_cond_broadcast(&cow_room);         /* the pending array has room again */
        atomic_store(&npending, 0);
        atomic_store(&kicked, 0);
        uint64_t v;
        (void)!read(efd, &v, sizeof(v));          /* EAGAIN: nothing to drain */
    }
    pthread_mutex_unlock(&cow_mu);
    return out;
}

/* cow_applied(seq): Python committed every record with seq < `seq`; their slots may be
 * reused.  ValueError for a seq past the records written (it would let the ring overwrite
 * records not yet applied). */
PyObject *cow_py_applied(PyObject *self, PyObject *arg)
{
    unsigned long long seq = PyLong_AsUnsignedLongLong(arg);
    if (seq == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    lock_py();
    unsigned long long written = next_seq;
    if (seq <= written && seq > applied_seq) {
        applied_seq = seq;
        pthread_cond_broadcast(&cow_room);
    }
    pthread_mutex_unlock(&cow_mu);
    if (seq > written) {
        PyErr_Format(PyExc_ValueError, "cow_applied(%llu): only records below %llu exist",
                     seq, written);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* cow_disable(): no break starts after this returns (none is running then either: cow_break
 * checks under cow_mu).  Blocks already moved stay in their maps' overlays. */
PyObject *cow_py_disable(PyObject *self, PyObject *unused)
{
    lock_py();
    atomic_store(&cow_on, 0);
    pthread_cond_broadcast(&cow_room);             /* no one waits for room any more */
    pthread_mutex_unlock(&cow_mu);
    Py_RETURN_NONE;
}

PyObject *cow_py_status(PyObject *self, PyObject *unused)
{
    lock_py();
    int on = atomic_load(&cow_on);
    unsigned long long in_pool = pool_n - pool_head, np = atomic_load(&npending),
                       next = next_seq, applied = applied_seq;
    pthread_mutex_unlock(&cow_mu);
    return Py_BuildValue("{s:N,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "enabled", PyBool_FromLong(on),
                         "pool", in_pool, "pending", np, "next_seq", next, "applied_seq",
                         applied, "breaks", (unsigned long long)atomic_load(&st_breaks),
                         "forwarded", (unsigned long long)atomic_load(&st_forwarded),
                         "short", (unsigned long long)atomic_load(&st_short));
}
