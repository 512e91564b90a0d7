/*
 * daxfs data plane -- READ and WRITE answered by C threads, without the GIL.
 *
 * Why.  Every request that pyfuse3 serves costs one Python thread about 25 us,
 * and there is only one such thread: 4 KiB direct reads top out near 40k IOPS
 * however many cores and jobs there are.  Most of what fio, databases and
 * mmap'ing programs send is READ, and WRITE into blocks that are already
 * there: copying bytes between the request and the mapped image.  That needs no
 * Python at all, once Python has said which blocks a file maps.
 *
 * How it fits into pyfuse3 (which we do not patch, see _fusehook.c):
 *
 *  - pyfuse3's loop waits until fuse_session_fd() is readable and then calls
 *    fuse_session_receive_buf() and fuse_session_process_buf().  We interpose
 *    the first two.  fuse_session_fd() starts `threads` workers on the real
 *    /dev/fuse descriptor and gives pyfuse3 an eventfd instead; the workers read
 *    every request, answer the READ and WRITE requests they can, and queue the
 *    rest; fuse_session_receive_buf() hands pyfuse3 the queued requests (the
 *    worker's buffer itself, no copy), which libfuse then processes and answers
 *    on the shared descriptor as before.  fuse_session_destroy() stops and joins
 *    the workers first.
 *
 *  - What a worker may serve comes from Python (_dpmaps.c): per inode, a
 *    *published map*: the file size, whether in-place writes are allowed (regular file, no
 *    setuid/setgid bits, image writable, persistence we can do: none on a RAM
 *    filesystem, msync on a disk file), and its mapped block runs, each marked
 *    *owned* when every block in it has reference count 1.  A READ of a
 *    published inode is answered by one writev() straight from the image (holes
 *    read as zeros, EOF clips); a WRITE is done in place when it lies inside the
 *    size and every block it touches is mapped and owned, or breaks the sharing of
 *    the one block it touches (_cowplane.c).  Anything else goes to Python:
 *    allocation, other COW breaks, size changes, all metadata.
 *
 *  - Consistency.  Maps live in a hash table under one reader-writer lock.
 *    Workers hold it for reading while they use a map, including the memcpy /
 *    writev.  Python *revokes* an inode (takes the lock for writing, so no worker
 *    is inside that map, and removes it) before an operation that changes the
 *    inode's mapping, size, mode or the sharing of its blocks, and again at the
 *    transaction's commit; only Python publishes.  So a worker never writes a
 *    block that is shared or freed, and never reads a block after the commit
 *    that freed it (freed blocks are not reused before that commit, alloc.py).
 *
 *  - Timestamps.  A worker's write sets the map's mtime (ns); Python takes it
 *    on revoke, on getattr and on sync and stores it like its own lazily kept
 *    timestamps of overwrites (txn.py).
 *
 *  - Transports.  READ/WRITE/getxattr are served by dp_serve() into a reply sink: one writev()
 *    on /dev/fuse here, or a ring entry with -o uring (_uring.c, whose threads hand what they
 *    do not serve to the same queue).
 *
 * What is not done here: DAX mappings (cache-line flushes stay in Python; the
 * workers then serve reads only), FUSE_INTERRUPT of a request a worker answered
 * (libfuse keeps a small record of it), splice.
 */
#define _GNU_SOURCE
#include "_dataplane.h"

#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define BUF_SIZE DP_BUF_SIZE
#define MAX_THREADS 64

/* ------------------------------------------------------------------ */
/* configuration (set by Python before mounting) and the real libfuse  */

static int want_threads;
static long long spin_ns;             /* after serving, poll this long before sleeping */
char *dp_image;                       /* base of the daemon's mapping of the image */
uint64_t dp_image_size;
int dp_persist_mode;
atomic_int dp_writes_on;

static int (*real_fd)(struct fuse_session *);
static int (*real_receive)(struct fuse_session *, struct fuse_buf *);
static void (*real_destroy)(struct fuse_session *);
static void (*real_exit)(struct fuse_session *);

static struct fuse_session *dp_se;    /* the session pyfuse3 made (through our hook) */
static int fuse_fd = -1, queue_fd = -1;
static pthread_t workers[MAX_THREADS];
static int nworkers;
static atomic_int started, ended, stopping;

static atomic_ullong st_forwarded;

int dp_resolve(void *h)
{
    real_fd = (int (*)(struct fuse_session *))dlvsym(h, "fuse_session_fd", "FUSE_3.0");
    real_receive = (int (*)(struct fuse_session *, struct fuse_buf *))dlvsym(
        h, "fuse_session_receive_buf", "FUSE_3.0");
    real_destroy = (void (*)(struct fuse_session *))dlvsym(h, "fuse_session_destroy",
                                                          "FUSE_3.0");
    real_exit = (void (*)(struct fuse_session *))dlvsym(h, "fuse_session_exit", "FUSE_3.0");
    return real_fd && real_receive && real_destroy && real_exit ? 0 : -1;
}

void dp_note_session(struct fuse_session *se)
{
    if (!atomic_load(&started))
        dp_se = se;
}

/* ------------------------------------------------------------------ */
/* replies on /dev/fuse, and requests read from it                   */

static void dev_send(struct dp_sink *sink, const struct iovec *iov, int cnt)
{
    (void)!writev(fuse_fd, iov, cnt);          /* ENOENT: the request was interrupted */
}

struct dp_sink dp_dev_sink = {.send = dev_send};


/* A request as read from /dev/fuse: one buffer, the op's struct right after the header. */
static int serve(const char *buf, size_t n)
{
    const struct wire_in *in = (const struct wire_in *)buf;
    if (n < sizeof(*in) || in->len != n)
        return 0;
    size_t oplen = in->opcode == WIRE_GETXATTR ? 8 : in->opcode == WIRE_WRITE ?
        sizeof(struct wire_write_in) : in->opcode == WIRE_READ ? sizeof(struct wire_read_in) : 0;
    if (in->opcode == WIRE_INIT)
        uring_note_init(buf, n);
    if (!oplen || n < sizeof(*in) + oplen)
        return 0;
    const char *op = buf + sizeof(*in);
    return dp_serve(in, op, oplen, op + oplen, n - sizeof(*in) - oplen, &dp_dev_sink);
}

/* ------------------------------------------------------------------ */
/* request buffers and the queue to Python                             */

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static char *pool[2 * MAX_THREADS + 64];
static int npool;

char *dp_buf_take(void)
{
    pthread_mutex_lock(&pool_mu);
    char *b = npool ? pool[--npool] : NULL;
    pthread_mutex_unlock(&pool_mu);
    return b ? b : malloc(BUF_SIZE);
}

void dp_buf_give(char *b)
{
    pthread_mutex_lock(&pool_mu);
    if (npool < (int)(sizeof(pool) / sizeof(pool[0]))) {
        pool[npool++] = b;
        b = NULL;
    }
    pthread_mutex_unlock(&pool_mu);
    free(b);
}

struct item {
    struct item *next;
    char *buf;
    size_t len;
};

static pthread_mutex_t q_mu = PTHREAD_MUTEX_INITIALIZER;
static struct item *q_head, *q_tail;

/* The eventfd is readable exactly while the queue is non-empty (or the session ended):
 * both are changed under q_mu. */
int dp_enqueue(char *buf, size_t len)
{
    struct item *it = malloc(sizeof(*it));
    if (!it)
        return -1;
    it->next = NULL;
    it->buf = buf;
    it->len = len;
    pthread_mutex_lock(&q_mu);
    if (q_tail)
        q_tail->next = it;
    else
        q_head = it;
    q_tail = it;
    uint64_t one = 1;
    (void)!write(queue_fd, &one, sizeof(one));
    pthread_mutex_unlock(&q_mu);
    atomic_fetch_add(&st_forwarded, 1);
    return 0;
}

static void session_over(void)
{
    pthread_mutex_lock(&q_mu);
    if (!atomic_exchange(&ended, 1)) {
        real_exit(dp_se);
        uint64_t one = 1;
        (void)!write(queue_fd, &one, sizeof(one));
    }
    pthread_mutex_unlock(&q_mu);
}

/* ------------------------------------------------------------------ */
/* the workers                                                         */

/* Workers block in read(): the kernel wakes one waiter per request (its wait is exclusive),
 * where poll() would wake them all.  To stop them, STOP_SIGNAL (whose handler does nothing,
 * installed without SA_RESTART) interrupts the read; it is resent until each has gone, since
 * one may arrive just before the read starts. */
#define STOP_SIGNAL DP_STOP_SIGNAL
static atomic_int exited;

static void on_stop_signal(int sig) { (void)sig; }

long long mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* After a request, look for the next one for up to spin_ns before sleeping in read(): on
 * these VMs waking a sleeping thread costs ~20 us, more than a 4 KiB request's whole service
 * (one job's direct 4 KiB reads here: 47k IOPS sleeping, 63k spinning). */
static atomic_int spinning, busy;
static atomic_int overlap;          /* ~256 x the recent share of requests served while
                                     * another thread was serving one too */

/* Called around serving a request: how often do requests overlap (several clients)? */
static void note_busy(int delta)
{
    if (delta > 0) {
        int n = atomic_fetch_add(&busy, 1) + 1;
        int o = atomic_load(&overlap);
        atomic_store(&overlap, (o * 15 + (n > 1 ? 256 : 0)) / 16);
    } else {
        atomic_fetch_sub(&busy, 1);
    }
}

static void spin_for_next(void)
{
    int idle = 0;
    /* One spinner at a time, and none while requests overlap (several clients): on 2 cores a
     * spinner then takes the CPU the clients need (2 jobs' direct reads: 161k IOPS without,
     * 96k with a spinner). */
    if (spin_ns <= 0 || atomic_load(&overlap) > 64 ||
        !atomic_compare_exchange_strong(&spinning, &idle, 1))
        return;
    struct pollfd p = {.fd = fuse_fd, .events = POLLIN};
    long long deadline = mono_ns() + spin_ns;
    while (!atomic_load(&stopping) && poll(&p, 1, 0) == 0 && mono_ns() < deadline)
        ;
    atomic_store(&spinning, 0);
}

static void *worker(void *arg)
{
    sigset_t only;
    sigemptyset(&only);
    sigaddset(&only, STOP_SIGNAL);
    pthread_sigmask(SIG_UNBLOCK, &only, NULL);
    char *buf = NULL;
    while (!atomic_load(&stopping)) {
        if (!buf && !(buf = dp_buf_take())) {
            usleep(1000);                          /* out of memory: try again */
            continue;
        }
        ssize_t n = read(fuse_fd, buf, BUF_SIZE);
        if (n < 0) {
            if (errno == EINTR || errno == ENOENT || errno == EAGAIN)
                continue;                          /* ENOENT: interrupted before we read it */
            session_over();                        /* ENODEV: unmounted, or aborted */
            break;
        }
        if (n == 0) {
            session_over();
            break;
        }
        note_busy(1);
        int served = serve(buf, (size_t)n);
        note_busy(-1);
        if (served) {
            spin_for_next();
            continue;
        }
        if (dp_enqueue(buf, (size_t)n) != 0) {
            dp_reply_err(&dp_dev_sink, ((struct wire_in *)buf)->unique, ENOMEM);
            continue;
        }
        buf = NULL;
    }
    if (buf)
        dp_buf_give(buf);
    atomic_fetch_add(&exited, 1);
    return NULL;
}

static int start(int fd)
{
    dp_maps_init();
    struct sigaction sa, old_sa;
    if (sigaction(STOP_SIGNAL, NULL, &old_sa) != 0 || old_sa.sa_handler != SIG_DFL)
        return -1;                                 /* someone else uses it */
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    if (sigaction(STOP_SIGNAL, &sa, NULL) != 0)
        return -1;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || ((fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0))
        return -1;
    queue_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (queue_fd < 0)
        return -1;
    fuse_fd = fd;
    /* signals stay with Python's thread (but STOP_SIGNAL, which each worker unblocks) */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    for (nworkers = 0; nworkers < want_threads; nworkers++) {
        if (pthread_create(&workers[nworkers], NULL, worker, NULL) != 0)
            break;
        char name[16];
        snprintf(name, sizeof(name), "daxfs-io%d", nworkers);
        pthread_setname_np(workers[nworkers], name);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (nworkers == 0) {
        close(queue_fd);
        queue_fd = -1;
        return -1;
    }
    atomic_store(&started, 1);
    return 0;
}

static void stop_workers(void)
{
    uring_stop();                                  /* its threads hand requests to our queue */
    if (!atomic_load(&started) || atomic_exchange(&stopping, 1))
        return;
    while (atomic_load(&exited) < nworkers) {
        for (int i = 0; i < nworkers; i++)
            pthread_kill(workers[i], STOP_SIGNAL);  /* a gone thread is still joinable */
        usleep(2000);
    }
    for (int i = 0; i < nworkers; i++)
        pthread_join(workers[i], NULL);
    nworkers = 0;
    pthread_mutex_lock(&q_mu);
    while (q_head) {                               /* never answered: the session is over */
        struct item *it = q_head;
        q_head = it->next;
        dp_buf_give(it->buf);
        free(it);
    }
    q_tail = NULL;
    pthread_mutex_unlock(&q_mu);
}

/* ------------------------------------------------------------------ */
/* the interposed libfuse functions                                    */

int hook_session_fd(struct fuse_session *se) __asm__("fuse_session_fd");
int hook_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
    __asm__("fuse_session_receive_buf");
void hook_session_destroy(struct fuse_session *se) __asm__("fuse_session_destroy");

int hook_session_fd(struct fuse_session *se)
{
    int fd = real_fd(se);
    if (se != dp_se || fd < 0)
        return fd;
    if (!atomic_load(&started) && (want_threads <= 0 || start(fd) != 0))
        return fd;
    return queue_fd;
}

int hook_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
{
    if (!atomic_load(&started) || se != dp_se)
        return real_receive(se, buf);
    pthread_mutex_lock(&q_mu);
    struct item *it = q_head;
    if (it) {
        q_head = it->next;
        if (!q_head)
            q_tail = NULL;
    }
    if (!q_head && !atomic_load(&ended)) {
        uint64_t v;
        (void)!read(queue_fd, &v, sizeof(v));     /* empty: not readable any more */
    }
    pthread_mutex_unlock(&q_mu);
    if (!it)
        return atomic_load(&ended) ? 0 : -EINTR;  /* pyfuse3 waits again on -EINTR */
    if (buf->mem)
        dp_buf_give(buf->mem);                     /* the previous one was ours too */
    buf->mem = it->buf;
    buf->size = it->len;
    buf->flags = 0;
    buf->fd = -1;
    buf->pos = 0;
    int n = (int)it->len;
    free(it);
    return n;
}

void hook_session_destroy(struct fuse_session *se)
{
    if (se == dp_se)
        stop_workers();
    real_destroy(se);
}

/* ------------------------------------------------------------------ */
/* Python API                                                          */

PyObject *dp_py_configure(PyObject *self, PyObject *args)
{
    int threads, persist, writes;
    long spin_us;
    unsigned long long base, size;
    if (!PyArg_ParseTuple(args, "iKKipl", &threads, &base, &size, &persist, &writes, &spin_us))
        return NULL;
    if (atomic_load(&started)) {
        PyErr_SetString(PyExc_RuntimeError, "the data plane is already running");
        return NULL;
    }
    if (threads < 0 || threads > MAX_THREADS || persist < PERSIST_NONE ||
        persist > PERSIST_READS_ONLY || (threads && (!base || !size)) || spin_us < 0 ||
        spin_us > 1000000) {
        PyErr_SetString(PyExc_ValueError, "bad data plane configuration");
        return NULL;
    }
    dp_maps_init();
    want_threads = threads;
    spin_ns = spin_us * 1000LL;
    dp_image = (char *)(uintptr_t)base;
    dp_image_size = size;
    dp_persist_mode = persist;
    atomic_store(&dp_writes_on, writes && persist != PERSIST_READS_ONLY);
    Py_RETURN_NONE;
}

PyObject *dp_py_stats(PyObject *self, PyObject *unused)
{
    int uring, queues;
    unsigned long long uring_requests, cow_breaks, cow_forwarded;
    uring_stats(&uring, &uring_requests, &queues);
    cow_stats(&cow_breaks, &cow_forwarded);
    return Py_BuildValue("{s:i,s:i,s:K,s:K,s:K,s:K,s:K,s:K,s:i,s:i,s:K,s:K,s:K}", "threads",
                         atomic_load(&started) ? nworkers : 0, "writes",
                         atomic_load(&dp_writes_on), "reads_served", atomic_load(&dp_counts.reads),
                         "writes_served", atomic_load(&dp_counts.writes), "bytes_read",
                         atomic_load(&dp_counts.read_bytes), "bytes_written",
                         atomic_load(&dp_counts.write_bytes), "forwarded",
                         atomic_load(&st_forwarded), "capability_getxattrs",
                         atomic_load(&dp_counts.getxattrs), "uring", uring, "uring_queues", queues,
                         "uring_requests", uring_requests, "cow_breaks", cow_breaks,
                         "cow_forwarded", cow_forwarded);
}

PyObject *dp_py_stop(PyObject *self, PyObject *unused)
{
    Py_BEGIN_ALLOW_THREADS
    stop_workers();
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}
