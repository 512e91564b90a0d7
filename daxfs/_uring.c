/*
 * daxfs FUSE-over-io_uring transport (-o uring) for the data plane.
 *
 * Why.  The data plane's threads (_dataplane.c) answer READ and in-place WRITE without
 * Python, but they read /dev/fuse from whatever CPU they sleep on: a client on one vCPU
 * waits while a thread on the other is woken (an IPI, and on a VM a halted vCPU to wake),
 * serves, and wakes the client back.  With client and daemon pinned to one CPU the same
 * 4 KiB O_DIRECT jobs ran ~1.5-1.9x faster here.  FUSE-over-io_uring (kernel >= 6.14,
 * CONFIG_FUSE_IO_URING, module parameter enable_uring) gives that placement without pinning
 * the client: the kernel queues each request on the ring queue of the CPU the requesting
 * task runs on (qid = task_cpu), and we serve queue q from a thread pinned to CPU q.
 *
 * How it fits.
 *  - Negotiation.  libfuse 3.14 knows nothing of it.  A data plane worker reads the INIT
 *    request and tells us its flags (uring_note_init); the hook's custom writev sees the INIT
 *    reply (_fusehook.c io_writev).  If the kernel offered FUSE_OVER_IO_URING (flags2 bit 9,
 *    with FUSE_INIT_EXT) we create one io_uring (SQE128) per possible CPU, the entries'
 *    buffers and the pinned threads *before* the reply goes out, and add the bit only if all
 *    of that worked: once the kernel has the bit, every new request waits until every queue
 *    0..nr_cpu_ids-1 has an entry registered.  After the reply is written (the kernel has
 *    processed it when writev returns) the threads submit FUSE_IO_URING_CMD_REGISTER for
 *    their entries.  A REGISTER that fails makes the kernel drop uring for the connection,
 *    and requests keep coming through /dev/fuse, where the workers still read (FORGET,
 *    BATCH_FORGET and INTERRUPT always come that way).
 *  - An entry holds one request: fuse_in_header in in_out, the op's own struct (in_args[0])
 *    in op_in, everything else linearly in the payload, payload_sz in ring_ent_in_out; the
 *    size of op_in's part is fuse_in_header.len (the legacy total) - 40 - payload_sz.  The
 *    thread offers it to dp_serve() with the entry as the reply sink (the reply's out header
 *    goes to in_out, its arguments to the payload, their size to payload_sz) and then submits
 *    COMMIT_AND_FETCH, which answers and re-arms the entry in one step.
 *  - What C does not serve is linearized (header, op struct, payload) into a buffer of the
 *    data plane's pool and queued for pyfuse3 exactly like a request read from /dev/fuse;
 *    the entry is remembered under its unique.  libfuse answers through the session's custom
 *    writev, which calls uring_reply(): an entry waiting for that unique takes the reply, is
 *    put on its ring's commit list and the ring's eventfd is written.  Only a ring's own
 *    thread ever submits to it (no SQ lock; and the fetch armed by a commit belongs to the
 *    pinned thread's task, so the kernel copies the next request in that thread on that CPU,
 *    not in Python's).  The eventfd has a POLL_ADD armed on each ring, which also wakes the
 *    thread to stop.  Notifications (unique 0) and replies to /dev/fuse requests go to
 *    /dev/fuse as before.
 *  - Teardown.  On unmount or abort the kernel completes our commands with -ENOTCONN or
 *    -ECONNABORTED (the entry is then dead; a commit for a torn-down entry fails the same
 *    way).  fuse_session_destroy (interposed, _dataplane.c stop_workers) stops and joins the
 *    threads and closes the rings, which cancels what is still armed and drops their
 *    references on /dev/fuse.  On kill -9 the kernel does all of it (task exit cancels).
 *
 * What is atomic.  Entry ownership: an entry is the kernel's (command armed), the ring
 * thread's (serving), Python's (in the unique table) or on the commit list; only the owner
 * touches its buffers, and the handovers go through the table lock and the ring's lock.  The
 * published maps and their rwlock are the data plane's (dp_serve), unchanged.
 *
 * Scheduling.  The ring threads are SCHED_IDLE (see ring_main): on an idle VM the scheduler
 * otherwise wakes the answered client on the other, halted vCPU, every request.
 * DEFER_TASKRUN + SINGLE_ISSUER rings were tried and were slower (29k vs 47k IOPS).
 *
 * Not done: registered buffers, SQPOLL, DEFER_TASKRUN; notifications through the ring (the
 * kernel does not support them); freeing the entries' buffers at the end (the kernel may
 * still reference them until the rings' cancellation has run; the daemon is exiting).
 */
#define _GNU_SOURCE
#include "_uring.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sysinfo.h>
#include <unistd.h>

static int want;                    /* -o uring */
static int sched_other;             /* DAXFS_URING_SCHED=other: ring threads not SCHED_IDLE */
static atomic_uint init_flags, init_flags2;
static atomic_int init_seen, stop_flag, active, failed;
static atomic_int last_error;       /* -errno of the first command that failed */
static atomic_ullong st_requests;
static int nrings, fuse_fd = -1, offered;
static struct ring **rings;
static size_t payload_size;
static pthread_mutex_t go_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t go_cv = PTHREAD_COND_INITIALIZER;
static int go;                      /* 0: wait, 1: register, -1: leave */
static int ready;                   /* threads that started */

static pthread_mutex_t tab_mu = PTHREAD_MUTEX_INITIALIZER;
static struct ent *table[TABLE];
static atomic_int held;             /* entries in the table: writev skips the lock at 0 */

int uring_wanted(void) { return want; }

void uring_note_init(const char *buf, size_t n)
{
    if (n < sizeof(struct wire_in) + 20)
        return;
    uint32_t f, f2;
    memcpy(&f, buf + sizeof(struct wire_in) + 12, 4);
    memcpy(&f2, buf + sizeof(struct wire_in) + 16, 4);
    atomic_store(&init_flags, f);
    atomic_store(&init_flags2, (f & INIT_EXT) ? f2 : 0);
    atomic_store(&init_seen, 1);
}

/* ------------------------------------------------------------------ */
/* commands on the ring (the raw ring is _uringio.c)                   */

static void fail(int err)
{
    int zero = 0;
    atomic_compare_exchange_strong(&last_error, &zero, err);
}

static void submit_cmd(struct ring *r, struct ent *e, int cmd)
{
    struct io_uring_sqe *sqe = ring_get_sqe(r);
    if (!sqe) {                        /* cannot happen (SQ_ENTRIES): flush and retry */
        ring_enter(r, 0);
        if (!(sqe = ring_get_sqe(r))) {
            e->state = E_DEAD;
            fail(-EBUSY);
            return;
        }
    }
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fuse_fd;
    sqe->cmd_op = (uint32_t)cmd;
    sqe->user_data = (uint64_t)(uintptr_t)e;
    if (cmd == FUSE_IO_URING_CMD_REGISTER) {
        sqe->addr = (uint64_t)(uintptr_t)e->iov;
        sqe->len = 2;
    }
    struct uring_cmd_req req = {.commit_id = cmd == FUSE_IO_URING_CMD_REGISTER ? 0 : e->commit_id,
                                .qid = (uint16_t)r->qid};
    memcpy(sqe->cmd, &req, sizeof(req));
    e->last_cmd = cmd;
    e->state = E_KERNEL;
}

/* ------------------------------------------------------------------ */
/* replies into an entry                                               */

/* Copy a reply (out header, then its arguments) into the entry: the header to in_out, the
 * rest linearly into the payload, its size to payload_sz.  Too big: EIO instead. */
static void fill(struct ent *e, const struct iovec *iov, int cnt)
{
    size_t hleft = sizeof(struct wire_out), pos = 0;
    char *h = e->hdr->in_out;
    for (int i = 0; i < cnt; i++) {
        const char *p = iov[i].iov_base;
        size_t n = iov[i].iov_len;
        if (hleft) {
            size_t k = n < hleft ? n : hleft;
            memcpy(h + sizeof(struct wire_out) - hleft, p, k);
            hleft -= k;
            p += k;
            n -= k;
        }
        if (n && pos + n > payload_size) {
            struct wire_out *out = (struct wire_out *)h;
            out->error = -EIO;
            pos = 0;
            break;
        }
        memcpy(e->payload + pos, p, n);
        pos += n;
    }
    e->hdr->ent.payload_sz = (uint32_t)pos;
}

static void ent_send(struct dp_sink *sink, const struct iovec *iov, int cnt)
{
    fill((struct ent *)sink, iov, cnt);
}

static void reply_err(struct ent *e, int err)
{
    struct wire_out out = {sizeof(out), -err, e->unique};
    struct iovec iov = {&out, sizeof(out)};
    fill(e, &iov, 1);
}

int uring_reply(const struct iovec *iov, int count)
{
    if (!atomic_load(&held) || count < 1 || iov[0].iov_len < sizeof(struct wire_out))
        return 0;
    uint64_t unique = ((const struct wire_out *)iov[0].iov_base)->unique;
    if (!unique)
        return 0;                               /* a notification: /dev/fuse */
    pthread_mutex_lock(&tab_mu);
    struct ent **pp = &table[unique % TABLE];
    while (*pp && (*pp)->unique != unique)
        pp = &(*pp)->next;
    struct ent *e = *pp;
    if (e) {
        *pp = e->next;
        atomic_fetch_sub(&held, 1);
    }
    pthread_mutex_unlock(&tab_mu);
    if (!e)
        return 0;
    fill(e, iov, count);
    struct ring *r = e->ring;
    pthread_mutex_lock(&r->mu);
    e->state = E_COMMIT;
    e->next = r->commits;
    r->commits = e;
    pthread_mutex_unlock(&r->mu);
    uint64_t one = 1;
    (void)!write(r->efd, &one, sizeof(one));
    return 1;
}

/* ------------------------------------------------------------------ */
/* the ring threads                                                    */

static void request(struct ring *r, struct ent *e)
{
    atomic_fetch_add(&st_requests, 1);
    e->state = E_OURS;
    const struct wire_in *in = (const struct wire_in *)e->hdr->in_out;
    size_t psz = e->hdr->ent.payload_sz;
    e->commit_id = e->hdr->ent.commit_id;
    e->unique = in->unique;
    if (in->len < sizeof(*in) + psz || in->len - sizeof(*in) - psz > sizeof(e->hdr->op_in) ||
        psz > payload_size || in->len > DP_BUF_SIZE) {
        reply_err(e, EIO);
        goto commit;
    }
    size_t oplen = in->len - sizeof(*in) - psz;
    if (dp_serve(in, e->hdr->op_in, oplen, e->payload, psz, &e->sink))
        goto commit;
    char *buf = dp_buf_take();                  /* to Python, as if read from /dev/fuse */
    if (!buf) {
        reply_err(e, ENOMEM);
        goto commit;
    }
    memcpy(buf, in, sizeof(*in));
    memcpy(buf + sizeof(*in), e->hdr->op_in, oplen);
    memcpy(buf + sizeof(*in) + oplen, e->payload, psz);
    e->state = E_PYTHON;
    pthread_mutex_lock(&tab_mu);
    e->next = table[e->unique % TABLE];
    table[e->unique % TABLE] = e;
    atomic_fetch_add(&held, 1);
    pthread_mutex_unlock(&tab_mu);
    if (dp_enqueue(buf, in->len) == 0)
        return;
    pthread_mutex_lock(&tab_mu);                /* Python never saw it: take it back */
    struct ent **pp = &table[e->unique % TABLE];
    while (*pp != e)
        pp = &(*pp)->next;
    *pp = e->next;
    atomic_fetch_sub(&held, 1);
    pthread_mutex_unlock(&tab_mu);
    dp_buf_give(buf);
    reply_err(e, ENOMEM);
commit:
    submit_cmd(r, e, FUSE_IO_URING_CMD_COMMIT_AND_FETCH);
}

static void completion(struct ring *r, uint64_t data, int res)
{
    if (data == POLL_TAG) {                     /* Python answered, or stop */
        (void)!read(r->efd, &r->efd_val, sizeof(r->efd_val));
        pthread_mutex_lock(&r->mu);
        struct ent *e = r->commits;
        r->commits = NULL;
        pthread_mutex_unlock(&r->mu);
        for (; e; e = e->next)
            submit_cmd(r, e, FUSE_IO_URING_CMD_COMMIT_AND_FETCH);
        if (!atomic_load(&stop_flag))
            ring_arm_poll(r);
        return;
    }
    struct ent *e = (struct ent *)(uintptr_t)data;
    if (res == -EAGAIN || res == -EINTR) {      /* REGISTER before the INIT reply's effect */
        usleep(1000);
        submit_cmd(r, e, e->last_cmd);
    } else if (res == -ENOTCONN || res == -ECONNABORTED || res == -ECANCELED) {
        e->state = E_DEAD;                      /* unmounted or aborted */
    } else if (res < 0) {
        fail(res);
        if (e->last_cmd == FUSE_IO_URING_CMD_REGISTER) {
            e->state = E_DEAD;
            atomic_store(&failed, 1);           /* the kernel fell back to /dev/fuse */
        } else {                                /* a commit the kernel refused: the queue */
            submit_cmd(r, e, FUSE_IO_URING_CMD_REGISTER);   /* must not lose the entry */
        }
    } else {
        request(r, e);
    }
}

static void *ring_main(void *arg)
{
    struct ring *r = arg;
    sigset_t only;
    sigemptyset(&only);
    sigaddset(&only, DP_STOP_SIGNAL);
    pthread_sigmask(SIG_UNBLOCK, &only, NULL);
    /* SCHED_IDLE: while this thread runs (it answers a request and wakes the client), the
     * scheduler counts the CPU as idle and wakes the client here, next to its queue, instead
     * of moving it to the other, halted vCPU -- which costs the very IPI the rings avoid, on
     * every request (idle VM: 23-30k IOPS instead of 67-70k).  A client on this CPU still
     * preempts us at once, and no starvation showed under a CPU hog pinned to each CPU. */
    struct sched_param sp = {0};
    if (!sched_other && sched_setscheduler(0, SCHED_IDLE, &sp) != 0)
        fail(-errno);                           /* slower on an idle VM, still correct */
    pthread_mutex_lock(&go_mu);
    ready += 1;
    pthread_cond_broadcast(&go_cv);
    while (!go)
        pthread_cond_wait(&go_cv, &go_mu);
    int g = go;
    pthread_mutex_unlock(&go_mu);
    if (g > 0) {
        for (int i = 0; i < DEPTH; i++)
            submit_cmd(r, &r->ents[i], FUSE_IO_URING_CMD_REGISTER);
        ring_arm_poll(r);
    }
    while (g > 0 && !atomic_load(&stop_flag)) {
        int n = ring_enter(r, 1);
        if (n < 0 && n != -EINTR && n != -EAGAIN && n != -EBUSY) {
            fail(n);
            break;
        }
        unsigned head = *r->cq_head, tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        for (; head != tail; head++) {
            struct io_uring_cqe *c = &r->cqes[head & *r->cq_mask];
            uint64_t data = c->user_data;
            int res = c->res;
            __atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
            completion(r, data, res);
        }
    }
    atomic_store(&r->exited, 1);
    return NULL;
}

/* ------------------------------------------------------------------ */
/* start and stop                                                      */

static int possible_cpus(void)
{
    FILE *f = fopen("/sys/devices/system/cpu/possible", "re");
    int n = 0, a, b;
    char sep;
    if (f) {
        while (fscanf(f, "%d", &a) == 1) {
            b = a;
            if (fscanf(f, "%c", &sep) == 1 && sep == '-' && fscanf(f, "%d", &b) == 1)
                (void)!fscanf(f, "%c", &sep);
            n += b - a + 1;
        }
        fclose(f);
    }
    return n > 0 ? n : get_nprocs_conf();
}

static void join_all(void)
{
    for (int q = 0; q < nrings; q++) {
        struct ring *r = rings[q];
        if (!r || !r->started)
            continue;
        uint64_t one = 1;
        (void)!write(r->efd, &one, sizeof(one));
        while (!atomic_load(&r->exited)) {   /* a thread may wait in io_uring_enter */
            pthread_kill(r->thread, DP_STOP_SIGNAL);
            usleep(2000);
        }
        pthread_join(r->thread, NULL);
        r->started = 0;
    }
    for (int q = 0; q < nrings; q++) {       /* cancels what is armed, drops /dev/fuse refs */
        struct ring *r = rings[q];
        if (r && r->fd >= 0)
            close(r->fd);
        if (r && r->efd >= 0)
            close(r->efd);
        if (r)
            r->fd = r->efd = -1;
    }
}

static void leave(void)
{
    atomic_store(&stop_flag, 1);
    pthread_mutex_lock(&go_mu);
    go = -1;
    pthread_cond_broadcast(&go_cv);
    pthread_mutex_unlock(&go_mu);
    join_all();
    atomic_store(&active, 0);
}

/* The INIT reply is about to be written: make everything, and say whether to add the flag. */
int uring_init_reply(char *init_out, size_t len, int fd)
{
    if (!want || rings || !atomic_load(&init_seen) || len < 36)
        return 0;
    offered = (atomic_load(&init_flags2) & OVER_IO_URING_FLAGS2) != 0;
    if (!offered)
        return 0;
    uint32_t max_write;
    uint16_t max_pages;
    memcpy(&max_write, init_out + 20, 4);
    memcpy(&max_pages, init_out + 28, 2);
    size_t sz = max_write > 8192 ? max_write : 8192;
    sz = sz > (size_t)max_pages * 4096 ? sz : (size_t)max_pages * 4096;
    sz = sz > 32 * 4096 ? sz : 32 * 4096;       /* the kernel's default max_pages */
    payload_size = (sz + 4095) & ~(size_t)4095;
    fuse_fd = fd;
    nrings = possible_cpus();
    rings = calloc((size_t)nrings, sizeof(*rings));
    if (!rings) {
        nrings = 0;
        return 0;
    }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int err = 0;
    for (int q = 0; q < nrings && !err; q++) {
        struct ring *r = rings[q] = calloc(1, sizeof(struct ring));
        if (!r) {
            err = -ENOMEM;
            break;
        }
        r->qid = q;
        r->fd = r->efd = -1;
        pthread_mutex_init(&r->mu, NULL);
        for (int i = 0; i < DEPTH; i++)
            r->ents[i].sink.send = ent_send;
        if ((err = ring_create(r, payload_size)) != 0)
            break;
        pthread_attr_t a;
        cpu_set_t cpu;
        CPU_ZERO(&cpu);
        CPU_SET(q, &cpu);
        pthread_attr_init(&a);
        pthread_attr_setaffinity_np(&a, sizeof(cpu), &cpu);
        err = -pthread_create(&r->thread, &a, ring_main, r);
        pthread_attr_destroy(&a);
        if (err)                                 /* CPU q not online: unpinned */
            err = -pthread_create(&r->thread, NULL, ring_main, r);
        if (!err) {
            r->started = 1;
            char name[16];
            snprintf(name, sizeof(name), "daxfs-ring%u", (unsigned)q % 10000u);
            pthread_setname_np(r->thread, name);
        }
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_mutex_lock(&go_mu);             /* every thread up before the flag goes out */
    while (!err && ready < nrings)
        pthread_cond_wait(&go_cv, &go_mu);
    pthread_mutex_unlock(&go_mu);
    if (err) {
        fail(err);
        leave();
        return 0;
    }
    return 1;
}

void uring_init_replied(int ok)
{
    if (!ok) {
        leave();
        return;
    }
    atomic_store(&active, 1);
    pthread_mutex_lock(&go_mu);
    go = 1;
    pthread_cond_broadcast(&go_cv);
    pthread_mutex_unlock(&go_mu);
}

void uring_stop(void)
{
    if (rings && !atomic_load(&stop_flag))
        leave();
}

void uring_stats(int *on, unsigned long long *requests, int *queues)
{
    *on = atomic_load(&active) && !atomic_load(&failed);
    *requests = atomic_load(&st_requests);
    *queues = *on ? nrings : 0;
}

/* ------------------------------------------------------------------ */
/* Python API                                                          */

PyObject *uring_py_configure(PyObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    if (rings) {
        PyErr_SetString(PyExc_RuntimeError, "the rings are already set up");
        return NULL;
    }
    want = on;
    const char *d = getenv("DAXFS_URING_SCHED");
    sched_other = d && !strcmp(d, "other");
    Py_RETURN_NONE;
}

PyObject *uring_py_status(PyObject *self, PyObject *unused)
{
    int on, queues;
    unsigned long long requests;
    uring_stats(&on, &requests, &queues);
    int err = atomic_load(&last_error);
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:K,s:i,s:s}", "wanted", want,
                         "sched_idle", !sched_other, "init_seen", atomic_load(&init_seen),
                         "offered", offered, "active", on, "queues", queues,
                         "requests", requests, "errno", -err,
                         "error", err ? strerror(-err) : "");
}
